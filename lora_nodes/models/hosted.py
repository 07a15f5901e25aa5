"""A model another program holds (ComfyUI's MODEL and CLIP), seen through our names.

ComfyUI keeps a denoiser under ``diffusion_model.`` in its original tree (LDM/SGM names for Stable
Diffusion, BFL names with fused q/k/v for Flux) and each text encoder under
``<name>.transformer.`` in Hugging Face names (``clip_l``, ``clip_g``, ``clip_h``, ``t5xxl``: the
family's ``TextEncoder.comfy_name``). To place a LoRA there by our own rules, :func:`hosted_model`
builds the base that model would be for us on the meta device (shapes only: no memory, no
weights) and says which of the host's tensors, and which rows, hold each of our parameters.
The ``lora`` package places LoRAs on the skeleton and turns the placed modules into the host's
patches (:mod:`lora_nodes.lora.hosted`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import ModelLoadError
from ..families import Family, HostPiece
from . import known_configs
from .base import BaseModel
from .checkpoints import checkpoint_layout, pooled_width
from .loading import _empty_model
from .parts import _denoiser_part, _parts_family
from .text_names import file_state_dict

HOST_DENOISER_PREFIX = "diffusion_model."  # where ComfyUI's MODEL keeps the denoiser's original tree
HOST_TEXT_ROOT = "transformer."  # below a text encoder's ComfyUI name: its Hugging Face names


@dataclass(eq=False)
class HostedModel:
    """The base a host's model is for us (on the meta device), and where the host keeps each of
    our parameters (``component.path.weight`` / ``.bias``, file spelling) that it holds."""

    base: BaseModel
    pieces: dict[str, tuple[HostPiece, ...]]


def _meta(shapes: Mapping[str, Sequence[int]], prefix: str) -> dict[str, torch.Tensor]:
    return {key[len(prefix):]: torch.empty(tuple(shape), device="meta")
            for key, shape in shapes.items() if key.startswith(prefix)}


def text_prefix(comfy_name: str) -> str:
    """Where ComfyUI's CLIP keeps the text encoder it calls ``comfy_name``."""
    return f"{comfy_name}.{HOST_TEXT_ROOT}"


def hosted_model(shapes: Mapping[str, Sequence[int]], source: str) -> HostedModel:
    """The base (meta device) that a host model with these parameters (ComfyUI's MODEL and, if
    given, CLIP state dict names -> shapes) is for us, and where it keeps our parameters.

    The family is told by the denoiser's tensors; its text encoders are found under their
    ComfyUI names. Raises ModelLoadError for a denoiser we cannot read.
    """
    denoiser_state = _meta(shapes, HOST_DENOISER_PREFIX)
    if not denoiser_state:
        raise ModelLoadError(f"{source} holds no diffusion model we know (no '{HOST_DENOISER_PREFIX}' weights)")
    family = _parts_family({"denoiser": (denoiser_state, {})}, None)
    components, configs = {}, {}
    for text in family.text_encoders:
        state = _meta(shapes, text_prefix(text.comfy_name)) if text.comfy_name else {}
        if state:
            config, _ = known_configs.part_config(family, text.component, {k: tuple(v.shape) for k, v in state.items()})
            components[text.component], configs[text.component] = _empty_model(family, text.component, config), config
    config, _weights, _builtin = _denoiser_part(family, denoiser_state, {}, Path(source), pooled_width(family, configs))
    components[family.denoiser] = _empty_model(family, family.denoiser, config)
    base = BaseModel(source, components, torch.float32, torch.device("meta"), meta={"family": family.id})
    return HostedModel(base, _pieces(family, components, config, set(shapes)))


def _pieces(family: Family, components: Mapping[str, torch.nn.Module], denoiser_config: Mapping,
            held: set[str]) -> dict[str, tuple[HostPiece, ...]]:
    """Our parameter -> the host's pieces that hold it (parameters the host lacks are left out)."""
    pieces: dict[str, tuple[HostPiece, ...]] = {}
    original = checkpoint_layout(family).original_pieces(family, denoiser_config)
    for name, found in original.items():
        hosted = tuple(piece._replace(key=HOST_DENOISER_PREFIX + piece.key) for piece in found)
        if all(piece.key in held for piece in hosted):
            pieces[f"{family.denoiser}.{name}"] = hosted
    for text in family.text_encoders:
        if text.component not in components:
            continue
        for name in file_state_dict(components[text.component]):
            key = text_prefix(text.comfy_name) + name
            if key in held:
                pieces[f"{text.component}.{name}"] = (HostPiece(key),)
    return pieces
