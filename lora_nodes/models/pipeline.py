"""A diffusers pipeline over a base model's own components (nothing copied)."""

from __future__ import annotations

from typing import Any

from .base import BaseModel
from .loading import pipeline_parts


def pipeline_for(base: BaseModel, scheduler: Any | None = None):
    """``StableDiffusionPipeline`` (or the XL one) over ``base``'s components, with ``scheduler``
    (default: the base's own). No safety checker: images are the user's to judge."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    parts = {name: base.components[name] for name in pipeline_parts(base.architecture == "sdxl")}
    if scheduler is not None:
        parts["scheduler"] = scheduler
    if base.architecture == "sdxl":
        return StableDiffusionXLPipeline(**parts)
    return StableDiffusionPipeline(**parts, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
