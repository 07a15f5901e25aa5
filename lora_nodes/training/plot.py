"""The loss curve as an IMAGE: loss per step (light) and its moving average (dark), drawn with PIL."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image, ImageDraw

WIDTH, HEIGHT = 512, 256
MARGIN_LEFT, MARGIN_RIGHT, MARGIN_TOP, MARGIN_BOTTOM = 52, 12, 12, 28
RAW, SMOOTH, AXES, GRID = (150, 180, 230), (20, 60, 160), (40, 40, 40), (225, 225, 225)


def smoothed(values: list[float], weight: float = 0.9) -> list[float]:
    """Exponential moving average, bias-corrected so the first points are not pulled to zero."""
    out, average = [], 0.0
    for n, value in enumerate(values, start=1):
        average = weight * average + (1 - weight) * value
        out.append(average / (1 - weight**n))
    return out


def loss_plot(losses: list[float], title: str = "loss") -> torch.Tensor:
    """A [1, 256, 512, 3] float image in 0..1 of ``losses`` against step (ComfyUI's IMAGE)."""
    image = Image.new("RGB", (WIDTH, HEIGHT), "white")
    draw = ImageDraw.Draw(image)
    left, right, top, bottom = MARGIN_LEFT, WIDTH - MARGIN_RIGHT, MARGIN_TOP, HEIGHT - MARGIN_BOTTOM
    values = [v for v in losses if np.isfinite(v)]
    low, high = (min(values), max(values)) if values else (0.0, 1.0)
    if high - low < 1e-12:
        low, high = low - 0.5, high + 0.5

    def point(step: int, value: float) -> tuple[float, float]:
        x = left + (right - left) * (step / max(1, len(losses) - 1))
        return x, bottom - (bottom - top) * (value - low) / (high - low)

    for fraction in (0.0, 0.25, 0.5, 0.75, 1.0):
        y = bottom - (bottom - top) * fraction
        draw.line([(left, y), (right, y)], fill=GRID)
        draw.text((4, y - 6), f"{low + (high - low) * fraction:.4g}", fill=AXES)
    draw.line([(left, top), (left, bottom), (right, bottom)], fill=AXES)
    draw.text((left, bottom + 8), "step 1", fill=AXES)
    draw.text((right - 60, bottom + 8), f"step {len(losses)}", fill=AXES)
    draw.text((left + 8, top + 2), title, fill=SMOOTH)
    for series, colour in ((losses, RAW), (smoothed(losses), SMOOTH)):
        points = [point(n, v) for n, v in enumerate(series) if np.isfinite(v)]
        if len(points) > 1:
            draw.line(points, fill=colour, width=1 if colour == RAW else 2)
    array = np.asarray(image, dtype=np.float32) / 255.0
    return torch.from_numpy(array)[None]
