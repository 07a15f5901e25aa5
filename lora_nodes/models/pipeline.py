"""A diffusers pipeline over a base model's own components (nothing copied)."""

from __future__ import annotations

from typing import Any

from .base import BaseModel


def pipeline_for(base: BaseModel, scheduler: Any | None = None) -> Any:
    """The family's diffusers pipeline over ``base``'s components, with ``scheduler`` (default: the
    base's own). No safety checker: images are the user's to judge."""
    parts = {name: base.components[name] for name in base.family.pipeline_parts}
    if scheduler is not None:
        parts["scheduler"] = scheduler
    return base.family.make_pipeline(parts)
