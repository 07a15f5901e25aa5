"""Scheduler overhead and sweep memory, measured against the plain diffusers call in the same run.

    python benchmarks/sample_overhead.py                 # builtin:tiny, 20 steps, 11 repeats
    python benchmarks/sample_overhead.py --source /models/sd15 --steps 30 --size 512

Prints two tables:
1. the Sample node run through the scheduler vs ``StableDiffusionPipeline.__call__`` on the same
   model, seed and settings (goal: under 5% overhead);
2. peak memory (max RSS of a fresh process) of a 4-variant strength sweep vs a single run
   (goal: at most 1.15x): variants must share one copy of the base weights.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
EXAMPLE_LORA = REPO / "workflows" / "loras" / "tiny_style.safetensors"


def workflow_text(source: str, lora: Path, steps: int, size: int) -> str:
    return f"""
format: lora-nodes/1
nodes:
  base:   {{type: LoadBase, inputs: {{source: "{source}"}}}}
  lora:   {{type: LoadLoRA, inputs: {{path: "{lora}"}}}}
  styled: {{type: ApplyLoRA, inputs: {{model: [base, model], lora: [lora, lora], strength_model: 1.0}}}}
  images: {{type: Sample, inputs: {{model: [styled, model], prompt: "a red circle", seed: 0, steps: {steps},
            width: {size}, height: {size}}}}}
  save:   {{type: SaveImages, inputs: {{images: [images, images], prefix: bench}}}}
"""


def time_sample_node(runner, workflow, seed: int) -> float:
    """Seconds of the Sample node in one run; a new seed makes only Sample and SaveImages re-run."""
    from lora_nodes.engine.events import Collector

    variant = workflow.copy()
    variant.nodes["images"].inputs["seed"] = seed
    events = Collector()
    runner.emit = events
    runner.run(variant)
    return next(e["seconds"] for e in events.of("executed") if e["node"] == "images")


def time_direct_pipeline(pipe, steps: int, size: int, seed: int) -> float:
    """Seconds of one plain diffusers pipeline call on the same (already patched) weights."""
    import torch

    start = time.perf_counter()
    with torch.inference_mode():
        pipe("a red circle", num_inference_steps=steps, guidance_scale=7.0, width=size, height=size,
             generator=torch.Generator("cpu").manual_seed(seed), output_type="pt")
    return time.perf_counter() - start


def interleaved_medians(runner, workflow, recipe, steps: int, size: int, repeats: int) -> tuple[float, float]:
    """Median seconds of the node and of the direct call, alternating so drift hits both alike."""
    from lora_nodes.nodes.sample import make_pipeline

    pipe = make_pipeline(recipe.materialize(), "euler")
    node, direct = [], []
    for seed in range(1, repeats + 1):
        node.append(time_sample_node(runner, workflow, seed))
        direct.append(time_direct_pipeline(pipe, steps, size, seed))
    return statistics.median(node), statistics.median(direct)


def peak_rss_mb(workflow: Path, sweep: str | None, out: Path) -> float:
    """Max resident memory (MB) of a fresh process that runs the workflow (optionally swept)."""
    code = (
        "import json, resource, sys\n"
        "from lora_nodes.cli import main\n"
        "args = sys.argv[1:]\n"
        "rc = main(args)\n"
        "assert rc == 0, rc\n"
        "print(json.dumps(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss))\n"
    )
    args = ["run", str(workflow), "--output-dir", str(out), "--events", "jsonl"]
    if sweep:
        args += ["--sweep", sweep]
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1]) / 1024  # Linux reports KiB


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", default="builtin:tiny", help="base model (builtin:NAME or a diffusers folder)")
    parser.add_argument("--lora", type=Path, default=EXAMPLE_LORA, help="LoRA file for that base")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--size", type=int, default=0, help="image size in pixels (0: native)")
    parser.add_argument("--repeats", type=int, default=11)
    args = parser.parse_args(argv)

    from lora_nodes.engine.scheduler import Runner
    from lora_nodes.graph import parse_workflow

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        text = workflow_text(args.source, args.lora.resolve(), args.steps, args.size)
        (folder / "bench.yaml").write_text(text)
        import yaml

        workflow = parse_workflow(yaml.safe_load(text), folder)
        runner = Runner(output_dir=folder / "out")
        first = runner.run(workflow)  # warm-up: loads the base and the LoRA
        recipe = first.outputs["styled"][0]
        size = args.size or recipe.base.native_size
        node, direct = interleaved_medians(runner, workflow, recipe, args.steps, size, args.repeats)
        single = peak_rss_mb(folder / "bench.yaml", None, folder / "single")
        sweep = peak_rss_mb(folder / "bench.yaml", "styled.strength_model=0.25,0.5,0.75,1", folder / "sweep")

    overhead = node / direct - 1
    print(f"\nSample node vs direct diffusers call ({args.source}, {args.steps} steps, median of {args.repeats})")
    print(f"{'':24}{'seconds':>10}")
    print(f"{'diffusers pipeline':24}{direct:>10.4f}")
    print(f"{'lora-nodes Sample':24}{node:>10.4f}")
    print(f"{'overhead':24}{overhead:>+10.1%}   (goal: < 5%)")
    print("\nPeak memory (max RSS of a fresh process)")
    print(f"{'single run':24}{single:>10.1f} MB")
    print(f"{'4-variant sweep':24}{sweep:>10.1f} MB")
    print(f"{'ratio':24}{sweep / single:>10.3f}x   (goal: <= 1.15x)")
    return {"node_s": node, "direct_s": direct, "overhead": overhead, "single_mb": single, "sweep_mb": sweep}


if __name__ == "__main__":
    main()
