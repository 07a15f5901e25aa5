"""Write workflows/datasets/purple_star: 16 purple stars on white, 64x64, each with its caption file.

A shape and a colour ``builtin:shapes`` never saw, so a LoRA trained on this folder has something
visible to teach. Deterministic (fixed seed): running it again rewrites the same files.

    python scripts/make_star_dataset.py [--out FOLDER] [--count 16] [--seed 0]
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # runs from a checkout without installing the package

from lora_nodes.datasets.shape_images import random_spec, render

OUT = REPO / "workflows" / "datasets" / "purple_star"
IMAGE_SIZE = 64


def make_star_dataset(out: Path = OUT, count: int = 16, seed: int = 0) -> list[Path]:
    """Draw ``count`` purple stars on white into ``out`` as star_NN.png + star_NN.txt; returns the PNGs."""
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    written = []
    for number in range(1, count + 1):
        spec = random_spec(rng, colours=("purple",), shapes=("star",), backgrounds=("white",),
                           image_size=IMAGE_SIZE)
        path = out / f"star_{number:02d}.png"
        # optimize=True keeps the files small in git; PNG has no timestamps, so reruns are byte-identical.
        render(spec, IMAGE_SIZE).save(path, optimize=True)
        path.with_suffix(".txt").write_text(spec.caption + "\n", encoding="utf-8")
        written.append(path)
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUT, help="the folder to write (default: %(default)s)")
    parser.add_argument("--count", type=int, default=16, help="how many images (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="the random seed (default: %(default)s)")
    args = parser.parse_args()
    written = make_star_dataset(args.out, args.count, args.seed)
    print(f"wrote {len(written)} images with captions to {args.out}")


if __name__ == "__main__":
    main()
