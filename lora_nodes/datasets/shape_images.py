"""Filled shapes in colours on plain backgrounds, each with a caption, drawn from a seed.

``builtin:shapes`` is trained on these images (``scripts/train_shapes.py``), and the same
generator makes LoRA training data: ask it for a colour or shape the base never saw
(``purple``, ``star``) and a LoRA has something new to teach.

Every image is ``a {colour} {shape} on a {background} background``: one shape, axis-aligned,
of a random size and position. :func:`classify` reads an image back into (colour, shape), which
is how the quality of a model that draws them is measured.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # annotations only: validation imports this module, and must not import torch or PIL
    import numpy as np
    from PIL import Image

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (35, 60, 220),
    "yellow": (240, 210, 30),
    "purple": (140, 40, 180),
}
"""Every colour the generator draws; ``purple`` is kept out of the base model's training."""

SHAPES = ("circle", "square", "triangle", "star")
"""Every shape the generator draws; ``star`` is kept out of the base model's training."""

BACKGROUNDS: dict[str, tuple[int, int, int]] = {"white": (255, 255, 255), "black": (0, 0, 0), "gray": (128, 128, 128)}

BASE_COLOURS = ("red", "green", "blue", "yellow")
BASE_SHAPES = ("circle", "square", "triangle")

STAR_INNER = 0.45  # the star's inner radius, as a fraction of its outer one


@dataclass(frozen=True)
class ShapeSpec:
    """One image to draw: what, where (top-left corner, pixels) and how big (side, pixels)."""

    colour: str
    shape: str
    background: str
    x: int
    y: int
    size: int

    @property
    def caption(self) -> str:
        return caption(self.colour, self.shape, self.background)


def caption(colour: str, shape: str, background: str = "white") -> str:
    """``a red circle on a white background``."""
    return f"a {colour} {shape} on a {background} background"


def _star_points(x: float, y: float, size: float) -> list[tuple[float, float]]:
    """A five-pointed star, point up, scaled to fill a ``size`` square box at (x, y)."""
    raw = []
    for i in range(10):
        radius = 1.0 if i % 2 == 0 else STAR_INNER
        angle = -math.pi / 2 + i * math.pi / 5
        raw.append((radius * math.cos(angle), radius * math.sin(angle)))
    xs, ys = [p[0] for p in raw], [p[1] for p in raw]
    left, top, width, height = min(xs), min(ys), max(xs) - min(xs), max(ys) - min(ys)
    return [(x + (px - left) / width * size, y + (py - top) / height * size) for px, py in raw]


def render(spec: ShapeSpec, image_size: int = 64, supersample: int = 4) -> Image.Image:
    """Draw one image (RGB, ``image_size`` square), antialiased by drawing larger and shrinking."""
    from PIL import Image, ImageDraw

    scale = supersample
    canvas = Image.new("RGB", (image_size * scale, image_size * scale), BACKGROUNDS[spec.background])
    draw = ImageDraw.Draw(canvas)
    colour = COLOURS[spec.colour]
    x0, y0, side = spec.x * scale, spec.y * scale, spec.size * scale
    x1, y1 = x0 + side - 1, y0 + side - 1
    if spec.shape == "circle":
        draw.ellipse((x0, y0, x1, y1), fill=colour)
    elif spec.shape == "square":
        draw.rectangle((x0, y0, x1, y1), fill=colour)
    elif spec.shape == "triangle":
        draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=colour)
    elif spec.shape == "star":
        draw.polygon(_star_points(x0, y0, side), fill=colour)
    else:
        raise ValueError(f"unknown shape {spec.shape!r}; known: {', '.join(SHAPES)}")
    return canvas.resize((image_size, image_size), Image.Resampling.BOX)


def random_spec(rng: random.Random, colours: Sequence[str] = BASE_COLOURS, shapes: Sequence[str] = BASE_SHAPES,
                backgrounds: Sequence[str] = tuple(BACKGROUNDS), image_size: int = 64,
                min_fraction: float = 0.3, max_fraction: float = 0.75) -> ShapeSpec:
    """A random image description: uniform choices, a side between the two fractions of the image."""
    side = rng.randint(round(min_fraction * image_size), round(max_fraction * image_size))
    return ShapeSpec(rng.choice(list(colours)), rng.choice(list(shapes)), rng.choice(list(backgrounds)),
                     rng.randint(0, image_size - side), rng.randint(0, image_size - side), side)


def make_dataset(count: int, seed: int = 0, colours: Sequence[str] = BASE_COLOURS,
                 shapes: Sequence[str] = BASE_SHAPES, backgrounds: Sequence[str] = tuple(BACKGROUNDS),
                 image_size: int = 64) -> tuple[np.ndarray, list[str], list[ShapeSpec]]:
    """``count`` images (uint8 ``[count, size, size, 3]``), their captions and specs; same seed, same data."""
    import numpy as np

    rng = random.Random(seed)
    specs = [random_spec(rng, colours, shapes, backgrounds, image_size) for _ in range(count)]
    images = np.stack([np.asarray(render(spec, image_size)) for spec in specs])
    return images, [spec.caption for spec in specs], specs


def _largest_blob(mask: np.ndarray) -> np.ndarray:
    """The largest 4-connected region of a boolean mask (a small flood fill; images are tiny)."""
    import numpy as np

    height, width = mask.shape
    labels = np.zeros(mask.shape, dtype=np.int32)
    best, best_size, current = 0, 0, 0
    for start in zip(*np.nonzero(mask), strict=True):
        if labels[start]:
            continue
        current += 1
        labels[start] = current
        stack, size = [start], 0
        while stack:
            r, c = stack.pop()
            size += 1
            for nr, nc in ((r + 1, c), (r - 1, c), (r, c + 1), (r, c - 1)):
                if 0 <= nr < height and 0 <= nc < width and mask[nr, nc] and not labels[nr, nc]:
                    labels[nr, nc] = current
                    stack.append((nr, nc))
        if size > best_size:
            best, best_size = current, size
    return labels == best if best else mask


def classify(image: np.ndarray, background: str = "white", colours: Sequence[str] = tuple(COLOURS),
             threshold: float = 0.4, min_pixels: int = 16, shapes: Sequence[str] = SHAPES) -> tuple[str, str, float]:
    """Read an image back: (colour, shape, fill ratio). ``none`` when nothing is drawn.

    ``image`` is ``[height, width, 3]``, floats in 0..1 or uint8. Pixels farther than
    ``threshold`` (RGB distance, 0..1 scale) from the background colour are the shape; its
    colour is the palette colour nearest their mean; its shape comes from how much of its
    bounding box its largest connected region fills (circle ~0.79, square 1, triangle 0.5,
    star ~0.38). Leave ``star`` out of ``shapes`` to read anything below a triangle's fill as a triangle.
    """
    import numpy as np

    pixels = np.asarray(image, dtype=np.float32)
    if pixels.max() > 1.5:
        pixels = pixels / 255.0
    back = np.array(BACKGROUNDS[background], dtype=np.float32) / 255.0
    mask = np.linalg.norm(pixels - back, axis=-1) > threshold
    if mask.sum() < min_pixels:
        return "none", "none", 0.0
    mean = pixels[mask].mean(axis=0) * 255.0
    colour = min(colours, key=lambda name: float(np.sum((mean - np.array(COLOURS[name])) ** 2)))
    blob = _largest_blob(mask)
    rows, cols = np.nonzero(blob)
    box = (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
    fill = float(blob.sum() / box)
    if fill > 0.9:
        shape = "square"
    elif fill > 0.68:
        shape = "circle"
    elif fill > 0.465 or "star" not in shapes:
        shape = "triangle"
    else:
        shape = "star"
    return colour, shape, fill
