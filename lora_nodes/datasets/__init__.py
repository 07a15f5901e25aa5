"""Procedural datasets: images drawn in code, with their captions (no downloads)."""

from .shape_images import (
    BACKGROUNDS,
    BASE_COLOURS,
    BASE_SHAPES,
    COLOURS,
    SHAPES,
    ShapeSpec,
    caption,
    classify,
    make_dataset,
    render,
)

__all__ = [
    "BACKGROUNDS", "BASE_COLOURS", "BASE_SHAPES", "COLOURS", "SHAPES", "ShapeSpec", "caption", "classify",
    "make_dataset", "render",
]
