"""Applying a LoRA: lora-nodes against diffusers' load_lora_weights + fuse_lora, in one run.

    python benchmarks/apply_speed.py                      # builtin:tiny and builtin:tiny-sdxl
    python benchmarks/apply_speed.py --source /models/sd15 --lora my_lora.safetensors

For each base it times, median of --repeats:
- first apply: read the file and merge it into the weights (ours: LoadLoRA + materialize;
  diffusers: load_lora_weights + fuse_lora);
- strength switch: go from strength 1 to 0.5 (ours: re-patch from the backup; diffusers:
  unfuse_lora + fuse_lora(lora_scale=0.5));
and prints the ratio (diffusers / ours; above 1 means we are faster).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time
from pathlib import Path

from safetensors.torch import save_file


def _median_seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(source: str, lora_path: Path | None, repeats: int) -> dict[str, float]:
    """Seconds for first apply and for a strength switch, ours and diffusers', on one base."""
    from lora_nodes.lora.files import read_lora
    from lora_nodes.lora.recipe import AppliedLoRA, ModelRecipe
    from lora_nodes.lora.synthetic import synthetic_lora
    from lora_nodes.models.loading import load_base
    from lora_nodes.nodes.sample import make_pipeline

    base = load_base(source, dtype="float32", device="cpu")
    with tempfile.TemporaryDirectory() as tmp:
        if lora_path is None:
            lora_path = Path(tmp) / "bench.safetensors"
            save_file(synthetic_lora(base, rank=8, seed=0), str(lora_path))

        def ours_first() -> None:
            ModelRecipe(base).materialize()
            ModelRecipe(base, (AppliedLoRA(read_lora(lora_path), 1.0, 1.0),)).materialize()

        lora = read_lora(lora_path)
        strengths = iter([0.5, 1.0] * repeats)

        def ours_switch() -> None:
            s = next(strengths)
            ModelRecipe(base, (AppliedLoRA(lora, s, s),)).materialize()

        ModelRecipe(base).materialize()
        reference = make_pipeline(base, "euler")
        pipes = [copy.deepcopy(reference) for _ in range(repeats)]

        def theirs_first() -> None:
            pipe = pipes.pop()
            pipe.load_lora_weights(str(lora_path))
            pipe.fuse_lora(lora_scale=1.0)

        pipe = copy.deepcopy(reference)
        pipe.load_lora_weights(str(lora_path))
        pipe.fuse_lora(lora_scale=1.0)
        scales = iter([0.5, 1.0] * repeats)

        def theirs_switch() -> None:
            pipe.unfuse_lora()
            pipe.fuse_lora(lora_scale=next(scales))

        result = {
            "ours_first": _median_seconds(ours_first, repeats),
            "diffusers_first": _median_seconds(theirs_first, repeats),
            "ours_switch": _median_seconds(ours_switch, repeats),
            "diffusers_switch": _median_seconds(theirs_switch, repeats),
        }
    ModelRecipe(base).materialize()
    return result


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", action="append", help="base (repeatable); default: both tiny built-ins")
    parser.add_argument("--lora", type=Path, help="a LoRA file for the base (default: a synthetic rank-8 one)")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    sources = args.source or ["builtin:tiny", "builtin:tiny-sdxl"]
    results = {source: measure(source, args.lora, args.repeats) for source in sources}
    print(f"\nApplying a LoRA, seconds (median of {args.repeats}); ratio = diffusers / lora-nodes")
    print(f"{'base':22}{'step':16}{'lora-nodes':>12}{'diffusers':>12}{'ratio':>9}")
    for source, r in results.items():
        for step in ("first", "switch"):
            ours, theirs = r[f"ours_{step}"], r[f"diffusers_{step}"]
            label = "load + apply" if step == "first" else "strength switch"
            print(f"{source:22}{label:16}{ours:>12.4f}{theirs:>12.4f}{theirs / ours:>8.1f}x")
    return results


if __name__ == "__main__":
    main()
