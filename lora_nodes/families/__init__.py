"""Model families, and how to tell which one a config, a checkpoint or a LoRA file is for.

A new family is one module here declaring a :class:`Family`, added to :data:`FAMILIES`.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from .base import Family, HostPiece, LoRANaming, LoRATarget, TextEncoder
from .flux import FLUX
from .sd1 import SD1
from .sd2 import SD2
from .sdxl import SDXL

__all__ = [
    "FAMILIES",
    "LORA_COMPONENTS",
    "SAMPLER_NAMES",
    "TEXT_COMPONENTS",
    "Family",
    "HostPiece",
    "LoRANaming",
    "LoRATarget",
    "TextEncoder",
    "blocks_of",
    "by_comfy_clip_type",
    "by_id",
    "component_of",
    "describe",
    "from_checkpoint",
    "from_components",
    "from_lora",
    "from_unet_config",
    "is_kohya_key",
    "layout_name",
    "layout_of",
    "mismatch",
    "naming_of",
    "normalize_key",
    "with_pipeline_layout_of",
]

# Most specific first: detection takes the first family that fits.
FAMILIES: tuple[Family, ...] = (FLUX, SDXL, SD2, SD1)

UNKNOWN_COMPONENT = "unknown"

# Across all families, each once, simplest family first: what any LoRA may change, which of those
# are text encoders, the samplers some family draws with, and the distinct LoRA namings.
LORA_COMPONENTS: tuple[str, ...] = tuple(dict.fromkeys(c for f in reversed(FAMILIES) for c in f.lora_components))
TEXT_COMPONENTS: tuple[str, ...] = tuple(dict.fromkeys(c for f in reversed(FAMILIES) for c in f.text_components))
SAMPLER_NAMES: tuple[str, ...] = tuple(dict.fromkeys(name for f in reversed(FAMILIES) for name in f.samplers))
_NAMINGS: tuple[LoRANaming, ...] = tuple(
    f.naming for i, f in enumerate(FAMILIES) if all(f.naming is not g.naming for g in FAMILIES[:i]))


def by_id(family_id: str | None) -> Family | None:
    """The family with this id (as files and ``inspect --json`` spell it), or None."""
    return next((f for f in FAMILIES if f.id == family_id), None)


def by_comfy_clip_type(name: str, shapes: Mapping[str, Sequence[int]] | None = None) -> Family | None:
    """The family whose text encoders ComfyUI's CLIP loaders load under ``type`` ``name``
    (``Family.comfy_clip_types``), or None. Where families share a name, the first text encoder's
    width in ``shapes`` (a text-encoder file's keys and shapes) tells them apart; without one that
    fits, the simplest of them."""
    candidates = [f for f in reversed(FAMILIES) if name in f.comfy_clip_types]
    if len(candidates) <= 1:
        return candidates[0] if candidates else None
    width = next((int(shape[-1]) for key, shape in (shapes or {}).items()
                  if key.endswith("token_embedding.weight") and len(shape) == 2), None)
    fitting = [f for f in candidates if width in f.all_context_widths]
    return (fitting or candidates)[0]


def from_unet_config(config: Mapping[str, Any]) -> Family:
    """The family of a diffusers UNet config (a dict or a diffusers FrozenDict)."""
    return next(f for f in FAMILIES if f.matches_unet_config(config))


def from_components(components: Mapping[str, Any]) -> Family:
    """The family of a loaded pipeline's components, from its denoiser's config."""
    for family in FAMILIES:
        denoiser = components.get(family.denoiser)
        if denoiser is not None and family.matches_unet_config(denoiser.config):
            return family
    raise ValueError(f"no model family has these components: {', '.join(sorted(components))}")


def from_checkpoint(shapes: Mapping[str, Sequence[int]]) -> Family:
    """The family of a single-file checkpoint, from its key names (and a UNet's context width).

    Each family has key prefixes only it has (a text encoder's place, SDXL's ``label_emb``); a
    checkpoint without a text encoder is told by the width its cross-attention reads. Raises
    ValueError when nothing fits.
    """
    keys = list(shapes)
    for family in FAMILIES:
        if family.matches_checkpoint(keys):
            return family
    family = next((f for f in FAMILIES
                   if _context_width(shapes, f.denoiser_checkpoint_prefix, f.context_key)
                   in f.all_context_widths), None)
    if family is None:
        names = "/".join(f.display_name for f in reversed(FAMILIES))
        raise ValueError(f"not a recognised {names} single-file checkpoint (no known text encoder or UNet)")
    return family


def _context_width(shapes: Mapping[str, Sequence[int]], denoiser_prefix: str, context_key: str) -> int | None:
    """The width the checkpoint's cross-attention key projections read, if it has any."""
    return next((int(shape[-1]) for key, shape in shapes.items()
                 if key.startswith(denoiser_prefix) and key.endswith(f"{context_key}.weight")), None)


def with_pipeline_layout_of(folder: Path) -> Family:
    """A family whose pipeline folders look like ``folder`` (which parts it must hold).

    By ``model_index.json``'s class name, else by which text encoder folders exist. Families that
    share a layout are not told apart here: use the result for its parts only (the family itself
    is the UNet config's, see :func:`from_unet_config`).
    """
    try:
        class_name = str(json.loads((folder / "model_index.json").read_text()).get("_class_name", ""))
    except (OSError, ValueError, AttributeError):
        return next((f for f in FAMILIES if all((folder / part).is_dir() for part in (f.denoiser, *f.text_components))),
                    FAMILIES[-1])
    return next((f for f in FAMILIES if f.pipeline_class_marker in class_name), FAMILIES[-1])


def component_of(key: str) -> str:
    """The model component a LoRA module key belongs to (``unet``, ``text_encoder``, ...)."""
    for naming in _NAMINGS:
        component = naming.component_of(key)
        if component is not None:
            return component
    return UNKNOWN_COMPONENT


def normalize_key(key: str) -> str:
    """A LoRA file key in the one spelling its module is read by (every family naming's rules)."""
    for naming in _NAMINGS:
        key = naming.normalize(key)
    return key


def is_kohya_key(key: str) -> bool:
    """Whether a LoRA key is spelled the kohya way (any of its namings)."""
    return naming_of(key).startswith("kohya")


def naming_of(key: str) -> str:
    """Which naming a LoRA key uses (see :class:`LoRANaming`)."""
    for naming in _NAMINGS:
        if naming.component_of(key) is not None:
            return naming.naming_of(key)
    return _NAMINGS[0].naming_of(key)


def layout_of(key: str) -> str:
    """The naming of a LoRA key as the file writes it (before :func:`normalize_key`), for people:
    what :func:`naming_of` says of it, asked of the naming its normalized form belongs to (so
    that a layout the normalization rewrites, such as XLabs' processor names, is still told).
    kohya's ``lora_te1_`` spelling of the first text encoder is plain ``kohya`` here: the file's
    layout is kohya's either way."""
    normalized = normalize_key(key)
    naming = next((n for n in _NAMINGS if n.component_of(normalized) is not None), None)
    layout = naming.naming_of(key) if naming is not None else naming_of(key)
    return "kohya" if layout == "kohya te1" else layout


def blocks_of(family: Family | None, keys: Iterable[str]) -> dict[str, list[int]]:
    """The blocks a LoRA's module keys change, by group in the family's words (``double blocks``:
    ``[0, 1, ...]``; a group without indices, like a final layer, maps to ``[]``), in the order
    the family lists its groups. Empty when the family is unknown or names no blocks."""
    if family is None or family.naming.block_of is None:
        return {}
    block_of, order = family.naming.block_of, family.naming.block_groups
    groups: dict[str, set[int]] = {}
    for key in keys:
        found = block_of(key)
        if found is not None:
            group, index = found
            groups.setdefault(group, set()).update(() if index is None else (index,))
    return {group: sorted(groups[group]) for group in sorted(groups, key=order.index)}


def from_lora(base_model_version: str, keys: Iterable[str],
              delta_shape: Callable[[str], Sequence[int]]) -> Family | None:
    """The family a LoRA was made for, or None when nothing in the file tells.

    In order: the base model version its metadata records (kohya's spelling); a module only one
    family has (Flux's transformer, SDXL's second text encoder: a component, and for text encoders
    the model its module names are of); the width a cross-attention key projection reads
    (``attn2.to_k``; the shape of a module's weight change is asked only for those).
    """
    version = str(base_model_version or "")
    for family in FAMILIES:
        if version.startswith(family.kohya_version_prefixes) and family.kohya_version_prefixes:
            return family
    keys = list(keys)
    kinds = {_module_kind(key) for key in keys}
    for family in FAMILIES:
        others = {kind for f in FAMILIES if f is not family for kind in _KINDS[f]}
        if kinds & (_KINDS[family] - others):
            return family
    for key in keys:
        spelled = key.replace(".", "_")
        candidates = [f for f in FAMILIES if spelled.endswith(f.context_key.replace(".", "_"))]
        if not candidates:
            continue
        shape = delta_shape(key)
        if len(shape) >= 2:  # 1-D: fits nothing
            width = int(shape[1])
            family = next((f for f in candidates if width in f.all_context_widths), None)
            if family is not None:
                return family
    return None


def _kinds_of(family: Family) -> set[tuple[str, str]]:
    """(component, model marker) of every module kind a LoRA for ``family`` may change."""
    kinds = {(family.denoiser, "")}
    for text in family.text_encoders:
        kinds.update((text.component, marker) for marker in text.key_markers)
    return kinds


_KINDS: dict[Family, set[tuple[str, str]]] = {f: _kinds_of(f) for f in FAMILIES}
_TEXT_MARKERS = tuple(dict.fromkeys(m for f in FAMILIES for t in f.text_encoders for m in t.key_markers))


def _module_kind(key: str) -> tuple[str, str]:
    """A LoRA key's (component, model marker): the marker tells whose text encoder it is."""
    component = component_of(key)
    if component not in TEXT_COMPONENTS:
        return component, ""
    return component, next((m for m in _TEXT_MARKERS if m in key), "")


def layout_name(family: Family) -> str:
    """The families whose pipeline folders look like ``family``'s, for messages: 'an SD1.5/SD2.x'."""
    names = "/".join(f.display_name for f in reversed(FAMILIES) if f.same_layout(family))
    return ("an " if names[:1] in "AEFHILMNORSX" else "a ") + names


def describe(family: Family | None) -> str:
    """A family as people write it (``SD1.5``, ``SDXL``), or 'an unknown model'."""
    return family.display_name if family is not None else "an unknown model"


def mismatch(lora_family: Family | None, base_family: Family | None) -> str | None:
    """The sentence for a LoRA made for another family than the base's, or None when they fit or are unknown.

    The same words at validation (from file headers) and at run time (from the loaded files).
    """
    if lora_family is None or base_family is None or lora_family is base_family:
        return None
    return f"this LoRA is for {describe(lora_family)}, the base is {describe(base_family)}"

