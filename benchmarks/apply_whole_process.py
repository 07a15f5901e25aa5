"""Applying three LoRAs as a user waits for it: whole processes, lora-nodes against diffusers, beside
the apply step timed inside one process (``apply_lora.py``), in one table.

    python benchmarks/apply_whole_process.py                 # SD1.5-shaped UNet (~860M params, float32, CPU)
    python benchmarks/apply_whole_process.py --repeats 5
    python benchmarks/apply_whole_process.py --tiny          # builtin:tiny's pipeline (a quick check)

Issue 17's measure. ``benchmarks/apply_lora.py`` times the apply step inside one process; a user
waits for a whole run. Here each side runs as its own process, twice: once with three kohya
rank-32 LoRAs (every attention and feed-forward linear of the UNet's transformer blocks, as
apply_lora.py makes them) and once without, and the LoRAs' cost is the difference.

- ours: ``lora-nodes run`` of LoadBase (a diffusers folder) + 3 x (LoadLoRA, ApplyLoRA) + a
  1-step 64x64 Sample + SaveImages; without: LoadBase + Sample + SaveImages. Two ways: with
  the cache dir kept from run to run, as a user's is (it remembers the LoRA files' hashes; no
  result of these nodes is kept on disk, so every node runs every time), and with a fresh cache
  dir per run (a first run: every file hashed).
- diffusers: ``from_pretrained`` + 3 x ``load_lora_weights`` + ``set_adapters`` + ``fuse_lora`` +
  the same 1-step sample; without: ``from_pretrained`` + the sample.

The model is an SD1.5-shaped UNet with random weights, a one-layer CLIP text encoder of SD1.5's
width (768) and builtin:tiny's VAE and tokenizer, saved once as a diffusers folder in a scratch
folder. One untimed round runs every kind first (files in the page cache for all alike); then
rounds of every kind follow, each in its own shuffled order. The table gives each kind's median
of --repeats and the LoRAs' cost: the median of the rounds' differences (with the LoRAs minus
without, both from the same round), then how much each kind varied.
The in-process rows are apply_lora.py's (best of --repeats): the full apply, one strength changed
and a run's last use in place, against diffusers, the bare in-place merge (the floor) and the
bound (the floor and the bytes each row must move beyond it; see apply_lora.py).
Goals (issue 17): whole process at least 5x cheaper than diffusers, in process within 1.05x of
the floor.
"""

from __future__ import annotations

import argparse
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from apply_lora import SD15_UNET, STRENGTHS, TARGETS, random_model, write_kohya_unet

PROMPT, STEPS, SIDE = "a red circle", 1, 64

DIFFUSERS_RUN = """
import sys, torch
from diffusers import StableDiffusionPipeline
folder, out, loras, strengths = sys.argv[1], sys.argv[2], sys.argv[3:6] if len(sys.argv) > 3 else [], {strengths}
pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
if loras:
    names = [f"l{{i}}" for i in range(len(loras))]
    for path, name in zip(loras, names):
        pipe.load_lora_weights(path, adapter_name=name)
    pipe.set_adapters(names, adapter_weights=list(strengths))
    pipe.fuse_lora(adapter_names=names)
image = pipe({prompt!r}, num_inference_steps={steps}, width={side}, height={side},
             generator=torch.Generator().manual_seed(7)).images[0]
image.save(out)
"""


def make_model(folder: Path) -> None:
    """The SD1.5-shaped pipeline folder (see the module docstring)."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from lora_nodes.models.builtin import build_tiny

    tiny = build_tiny()
    tokenizer = tiny["tokenizer"]
    text = CLIPTextModel(CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=768, intermediate_size=3072,
                                        num_hidden_layers=1, num_attention_heads=12, max_position_embeddings=77,
                                        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                        pad_token_id=tokenizer.pad_token_id))
    unet = random_model(UNet2DConditionModel, SD15_UNET)
    pipe = StableDiffusionPipeline(vae=tiny["vae"], text_encoder=text, tokenizer=tokenizer, unet=unet,
                                   scheduler=tiny["scheduler"], safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(folder)


def make_loras(folder: Path, model: Path, rank: int = 32) -> list[Path]:
    """Three kohya LoRAs of ``rank`` over the UNet's attention and feed-forward linears."""
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(model / "unet")
    targets = {n: m for n, m in unet.named_modules() if TARGETS.search(n)}
    paths = [folder / f"lora_{i}.safetensors" for i in range(3)]
    for seed, path in enumerate(paths):
        write_kohya_unet(targets, rank, seed, path)
    return paths


def workflow(model: Path, loras: list[Path]) -> str:
    """Our workflow, with the LoRAs or without."""
    lines = ["format: lora-nodes/1", "nodes:", f"  base: {{type: LoadBase, inputs: {{source: '{model}'}}}}"]
    last = "base"
    for i, (path, strength) in enumerate(zip(loras, STRENGTHS)):
        lines += [f"  l{i}: {{type: LoadLoRA, inputs: {{path: '{path}'}}}}",
                  (f"  a{i}: {{type: ApplyLoRA, inputs: {{model: [{last}, model], lora: [l{i}, lora], "
                  f"strength_model: {strength}, strength_text: {strength}}}}}")]
        last = f"a{i}"
    lines += [(f"  draw: {{type: Sample, inputs: {{model: [{last}, model], prompt: '{PROMPT}', seed: 7, "
              f"steps: {STEPS}, width: {SIDE}, height: {SIDE}}}}}"),
              "  save: {type: SaveImages, inputs: {images: [draw, images], prefix: out}}"]
    return "\n".join(lines) + "\n"


def timed(command: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(command, check=True, capture_output=True)
    return time.perf_counter() - start


def make_tiny(folder: Path) -> None:
    """builtin:tiny's pipeline, saved as a diffusers folder (for --tiny)."""
    from diffusers import StableDiffusionPipeline

    from lora_nodes.models.builtin import build_tiny

    parts = build_tiny()
    StableDiffusionPipeline(**{k: parts[k] for k in ("vae", "text_encoder", "tokenizer", "unet", "scheduler")},
                            safety_checker=None, feature_extractor=None, requires_safety_checker=False
                            ).save_pretrained(folder)


def commands(root: Path, model: Path, loras: list[Path]) -> dict[tuple[str, str], Callable[[int], list[str]]]:
    """Each kind of run: (side, with or without LoRAs) -> run number -> its command line."""
    ours = {"with": root / "with.yaml", "without": root / "without.yaml"}
    ours["with"].write_text(workflow(model, loras))
    ours["without"].write_text(workflow(model, []))
    script = root / "diffusers_run.py"
    script.write_text(DIFFUSERS_RUN.format(strengths=list(STRENGTHS), prompt=PROMPT, steps=STEPS, side=SIDE))

    def lora_nodes(kind: str, fresh: bool) -> Callable[[int], list[str]]:
        cache = (lambda n: root / f"cache_{kind}_{n}") if fresh else (lambda n: root / f"cache_{kind}")
        return lambda n: [sys.executable, "-m", "lora_nodes.cli", "run", str(ours[kind]),
                          "--output-dir", str(root / f"out_{kind}_{fresh}_{n}"), "--cache-dir", str(cache(n))]

    def diffusers(kind: str) -> Callable[[int], list[str]]:
        return lambda n: [sys.executable, str(script), str(model), str(root / f"d_{kind}_{n}.png"),
                          *(map(str, loras) if kind == "with" else ())]

    return {("ours", "with"): lora_nodes("with", False), ("ours", "without"): lora_nodes("without", False),
            ("ours, first run", "with"): lora_nodes("with", True),
            ("diffusers", "with"): diffusers("with"), ("diffusers", "without"): diffusers("without")}


def whole_process(model: Path, loras: list[Path], root: Path, repeats: int) -> dict[tuple[str, str], list[float]]:
    """Seconds of each kind of run, every timed run (after one untimed round of all).

    Every round runs each kind once, in an order shuffled per round (seeded): load on the machine
    falls on all alike, and no kind always follows the same one (on a virtual machine, what the
    process before left in memory changes how fast the next one gets its own, by a second or more).
    """
    kinds = commands(root, model, loras)
    seconds: dict[tuple[str, str], list[float]] = {key: [] for key in kinds}
    for n in range(repeats + 1):
        order = list(kinds)
        if n:
            random.Random(n).shuffle(order)
        for key in order:
            took = timed(kinds[key](n))
            if n:
                seconds[key].append(took)
    return seconds


def in_process(tiny: bool, repeats: int) -> dict[str, float]:
    """apply_lora.py's figures for the same LoRAs' shape (its own table is printed too)."""
    from apply_lora import main as apply_lora_main

    return apply_lora_main([*(["--tiny"] if tiny else []), "--repeats", str(repeats)])


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each kind (median)")
    parser.add_argument("--tiny", action="store_true", help="builtin:tiny's pipeline and rank-4 LoRAs (seconds)")
    args = parser.parse_args(argv)
    torch.set_grad_enabled(False)
    with tempfile.TemporaryDirectory(prefix="apply-whole-") as scratch:
        root = Path(scratch)
        model = root / "model"
        (make_tiny if args.tiny else make_model)(model)
        loras = make_loras(root, model, rank=4 if args.tiny else 32)
        runs = whole_process(model, loras, root, args.repeats)
    medians = {key: statistics.median(values) for key, values in runs.items()}
    figures = in_process(args.tiny, args.repeats)
    torch.set_grad_enabled(True)
    cost = lora_costs(runs)
    print_table(args, medians, cost, figures)
    print_spread(runs)
    return {"whole_ours": cost["ours"], "whole_ours_first_run": cost["ours, first run"],
            "whole_diffusers": cost["diffusers"], **{f"in_process_{k}": v for k, v in figures.items()}}


def lora_costs(runs: dict[tuple[str, str], list[float]]) -> dict[str, float]:
    """The LoRAs' cost for each side: the median of the rounds' differences, with the LoRAs minus
    without, both from the same round (a drift of the machine over the rounds falls on both runs of
    a difference). A first run is set against ours without LoRAs: a run without has no file to hash."""
    return {side: statistics.median(with_ - without for with_, without in zip(
                runs[(side, "with")], runs[(side if side != "ours, first run" else "ours", "without")], strict=True))
            for side in ("ours", "ours, first run", "diffusers")}


def print_spread(runs: dict[tuple[str, str], list[float]]) -> None:
    """How much each kind of whole run varies: a cost read off medians is only as good as this."""
    print("spread of the whole runs, seconds (lowest, lower quartile, median, upper quartile, highest):")
    for (side, kind), values in runs.items():
        low, mid, high = statistics.quantiles(values, n=4) if len(values) > 1 else values * 3
        print(f"  {side + ', ' + kind + ' LoRAs':34}{min(values):7.2f}{low:7.2f}{mid:7.2f}{high:7.2f}{max(values):7.2f}")


def print_table(args: argparse.Namespace, medians: dict[tuple[str, str], float], cost: dict[str, float],
                figures: dict[str, float]) -> None:
    model = "builtin:tiny" if args.tiny else "an SD1.5-shaped UNet"
    print(f"\n3 kohya LoRAs on {model}: whole processes (median of {args.repeats}) and the apply step in one "
          f"process (best of {args.repeats}), seconds")
    print(f"{'':34}{'with LoRAs':>11}{'without':>9}{'cost':>11}{'diffusers':>11}{'vs diffusers':>14}"
          f"{'floor':>7}{'vs floor':>10}{'vs bound':>10}")
    for side in ("ours", "ours, first run"):
        ratio = f"{cost['diffusers'] / cost[side]:13.1f}x" if min(cost[side], cost["diffusers"]) > 0 else f"{'n/a':>14}"
        print(f"{'whole process, ' + side:34}{medians[(side, 'with')]:11.2f}{medians[('ours', 'without')]:9.2f}"
              f"{cost[side]:11.2f}{cost['diffusers']:11.2f}{ratio}{'':27}   (goal >= 5x)")
    print(f"{'whole process, diffusers':34}{medians[('diffusers', 'with')]:11.2f}"
          f"{medians[('diffusers', 'without')]:9.2f}{cost['diffusers']:11.2f}")
    ours_run, their_run = medians[("ours", "with")], medians[("diffusers", "with")]
    print(f"(a whole run with the LoRAs, as a user waits for it: {ours_run:.2f} s ours, {their_run:.2f} s "
          f"diffusers', {their_run / ours_run:.1f}x)")
    floor, reads, copies = figures["floor"], figures["bound_reads"], figures["bound_copies"]
    for label, row, their in (("in process, full apply", "full", "diffusers_full"),
                              ("in process, one strength changed", "switch", "diffusers_switch"),
                              ("in process, last use in place", "last_use", "diffusers_full")):
        ours, theirs, bound = figures[f"ours_{row}"], figures.get(their), figures[f"bound_{row}"]
        print(f"{label:34}{'':20}{ours:11.3f}" + (f"{theirs:11.3f}{theirs / ours:13.1f}x" if theirs else
              f"{'n/a':>11}{'':14}") + f"{floor:7.3f}{ours / floor:9.2f}x{ours / bound:9.2f}x   (goal <= 1.05x the floor)")
    print(f"(in process, the bound is the floor + {reads:.3f} s reading the files' bytes once where a row reads them "
          f"+ {copies:.3f} s copying the weights once where it keeps the originals: see apply_lora.py)")


if __name__ == "__main__":
    main()
