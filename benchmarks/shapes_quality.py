"""How well ``builtin:shapes`` draws what the prompt asks, and how fast.

For every prompt ``a {colour} {shape} on a white background`` (red/green/blue/yellow x
circle/square/triangle) and every seed in ``--seeds``, it samples one image at the native size
(64x64) with the real pipeline (``lora_nodes.nodes.sample.make_pipeline``), reads back the
colour (the palette colour nearest the mean of the non-background pixels, purple included) and
the shape (by how much of its bounding box it fills), and prints the colour and shape confusion
tables with the accuracies. Then it times one 20-step sample (cfg on, batch 1), process start and
model loading excluded.

    python benchmarks/shapes_quality.py                      # 12 prompts x 20 seeds
    python benchmarks/shapes_quality.py --weights other.safetensors --seeds 5
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lora_nodes.datasets.shape_images import BASE_COLOURS, BASE_SHAPES, COLOURS, SHAPES, caption, classify
from lora_nodes.models.base import BaseModel
from lora_nodes.models.builtin import SHAPES_WEIGHTS, build_shapes
from lora_nodes.nodes.sample import SAMPLERS, make_pipeline


def load(weights: Path = SHAPES_WEIGHTS) -> BaseModel:
    """``builtin:shapes`` as ``LoadBase`` gives it (float32, CPU)."""
    return BaseModel("builtin:shapes", build_shapes(weights), torch.float32, torch.device("cpu"))


def sample(base: BaseModel, prompts: list[str], seeds: list[int], steps: int = 20, cfg: float = 7.0,
           sampler: str = "euler") -> np.ndarray:
    """One image per (prompt, seed), ``[n, 64, 64, 3]`` in 0..1; seed s gives the Sample node's image for s."""
    pipe = make_pipeline(base, sampler)
    generators = [torch.Generator("cpu").manual_seed(seed) for seed in seeds]
    with torch.inference_mode():
        images = pipe(prompts, num_inference_steps=steps, guidance_scale=cfg, generator=generators,
                      width=base.native_size, height=base.native_size, output_type="pt").images
    return images.float().permute(0, 2, 3, 1).numpy()


def evaluate(base: BaseModel, seeds: list[int], steps: int = 20, cfg: float = 7.0, sampler: str = "euler",
             batch: int = 48) -> list[tuple[str, str, str, str, str]]:
    """(asked colour, asked shape, read colour, read shape, read shape among the base's three) per prompt and seed."""
    jobs = [(colour, shape, seed) for colour in BASE_COLOURS for shape in BASE_SHAPES for seed in seeds]
    results = []
    for start in range(0, len(jobs), batch):
        chunk = jobs[start:start + batch]
        images = sample(base, [caption(c, s) for c, s, _ in chunk], [seed for *_, seed in chunk], steps, cfg, sampler)
        for (colour, shape, _), image in zip(chunk, images, strict=True):
            read_colour, read_shape, _ = classify(image)
            results.append((colour, shape, read_colour, read_shape, classify(image, shapes=BASE_SHAPES)[1]))
    return results


def confusion(pairs: list[tuple[str, str]], rows: tuple[str, ...], columns: tuple[str, ...]) -> str:
    """A confusion table (asked in rows, read in columns) as text."""
    width = max(len(name) for name in (*rows, *columns, "asked\\read")) + 1
    lines = ["asked\\read".ljust(width) + "".join(c.rjust(width) for c in columns)]
    for row in rows:
        counts = [sum(1 for asked, read in pairs if asked == row and read == column) for column in columns]
        lines.append(row.ljust(width) + "".join(str(n).rjust(width) for n in counts))
    return "\n".join(lines)


def time_one_sample(base: BaseModel, steps: int = 20, cfg: float = 7.0, sampler: str = "euler",
                    repeats: int = 3) -> float:
    """Best wall time of one sample (batch 1, cfg on) at the native size, after a warm-up."""
    sample(base, [caption("red", "circle")], [0], 2, cfg, sampler)
    times = []
    for repeat in range(repeats):
        start = time.perf_counter()
        sample(base, [caption("blue", "square")], [repeat], steps, cfg, sampler)
        times.append(time.perf_counter() - start)
    return min(times)


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", type=Path, default=SHAPES_WEIGHTS, help="weights file (default: the shipped one)")
    parser.add_argument("--seeds", type=int, default=20, help="seeds 0..N-1 per prompt (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=20, help="sampling steps (default: %(default)s)")
    parser.add_argument("--cfg", type=float, default=7.0, help="guidance scale (default: %(default)s)")
    parser.add_argument("--sampler", default="euler", choices=tuple(SAMPLERS), help="sampler (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default: %(default)s)")
    parser.add_argument("--no-timing", action="store_true", help="skip the speed measurement")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    base = load(args.weights)
    results = evaluate(base, list(range(args.seeds)), args.steps, args.cfg, args.sampler)
    colour_ok = float(np.mean([asked == read for asked, _, read, *_ in results]))
    shape_ok = float(np.mean([asked == read for _, asked, _, read, _ in results]))
    shape3_ok = float(np.mean([asked == read for _, asked, _, _, read in results]))
    print(f"builtin:shapes, {len(results)} samples ({args.seeds} seeds x 12 prompts), {base.native_size}x"
          f"{base.native_size}, {args.steps} steps, {args.sampler}, cfg {args.cfg}")
    print(f"\ncolour (asked rows, read columns): accuracy {colour_ok:.1%} (target >= 90%)")
    print(confusion([(a, r) for a, _, r, *_ in results], BASE_COLOURS, (*COLOURS, "none")))
    print(f"\nshape (asked rows, read columns): accuracy {shape_ok:.1%} (target >= 80%)")
    print(confusion([(a, r) for _, a, _, r, _ in results], BASE_SHAPES, (*SHAPES, "none")))
    print(f"\nshape read among the base's three (star not a choice): accuracy {shape3_ok:.1%}")
    print(confusion([(a, r) for _, a, _, _, r in results], BASE_SHAPES, (*BASE_SHAPES, "none")))
    figures = {"colour_accuracy": colour_ok, "shape_accuracy": shape_ok, "shape_accuracy_base_choices": shape3_ok}
    if not args.no_timing:
        seconds = time_one_sample(base, args.steps, args.cfg, args.sampler)
        print(f"\none {args.steps}-step {base.native_size}x{base.native_size} sample (batch 1, cfg on, {args.threads} "
              f"threads): {seconds:.2f} s (target < 5 s)")
        figures["sample_s"] = seconds
    return figures


if __name__ == "__main__":
    main()
