"""One spelling for CLIP text-encoder names, whatever the installed transformers version.

Files (kohya ``lora_te_text_model_...``, PEFT ``text_encoder.text_model....``, single-file
checkpoints) name CLIP modules under ``text_model.``. transformers 5 dropped that level from
``CLIPTextModel``'s own module tree. We always speak the file spelling and translate at the
boundary with the live module, here and nowhere else.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # annotations only: validation imports this module, and must not import torch
    from torch import nn

FILE_LEVEL = "text_model."
_FLATTENED_CHILDREN = ("embeddings", "encoder", "final_layer_norm")


def is_flattened(model: nn.Module) -> bool:
    """True for a CLIP text model whose modules sit at the top (transformers >= 5)."""
    return not hasattr(model, "text_model") and hasattr(model, "encoder") and hasattr(model, "embeddings")


def file_spelling(name: str) -> str:
    """``name`` with the ``text_model.`` level put back where it was left out."""
    return FILE_LEVEL + name if name.split(".", 1)[0] in _FLATTENED_CHILDREN else name


def to_file_name(name: str, model: nn.Module) -> str:
    """A module or parameter name of ``model`` in the spelling files use."""
    return file_spelling(name) if is_flattened(model) else name


def to_model_name(name: str, model: nn.Module) -> str:
    """A name in file spelling as ``model`` spells it."""
    if is_flattened(model) and name.startswith(FILE_LEVEL):
        return name[len(FILE_LEVEL):]
    return name


def state_dict_for(model: nn.Module, state: Mapping[str, Any]) -> dict[str, Any]:
    """``state`` (file spelling) renamed for loading into ``model``."""
    return {to_model_name(k, model): v for k, v in state.items()}


def file_state_dict(model: nn.Module) -> dict[str, Any]:
    """``model.state_dict()`` in file spelling."""
    return {to_file_name(k, model): v for k, v in model.state_dict().items()}
