"""Reading LoRA files: safetensors (whole, or the header only) and pickles of plain tensors."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import TYPE_CHECKING

from .. import tensorfiles
from ..errors import LoRAError
from .formats import parse_lora
from .model import LoRA

if TYPE_CHECKING:  # annotations only: reading a LoRA's header (validation) must not import torch
    from torch import Tensor

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")


def read_state_dict(path: str | Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Tensors and metadata of a ``.safetensors`` file, or of a pickle file loaded without code.

    Anything that is not such a file (missing, a folder, empty, damaged, truncated, no tensors)
    raises :class:`LoRAError` naming it.
    """
    path = Path(path)
    _check_is_file(path)
    if path.suffix.lower() == ".safetensors":
        try:
            tensors, metadata = tensorfiles.read_tensors(path)
        except tensorfiles.UnreadableTensorFile as exc:
            raise LoRAError(str(exc)) from exc
    elif path.suffix.lower() in PICKLE_SUFFIXES:
        tensors, metadata = _read_pickle_weights_only(path), {}
    else:
        raise LoRAError(f"{path.name}: unknown file type '{path.suffix}' (expected .safetensors, or "
                        f"{', '.join(PICKLE_SUFFIXES)})")
    if not tensors:
        raise LoRAError(f"{path.name} holds no tensors: it is not a LoRA (or anything else with weights)")
    return tensors, metadata


def read_header(path: str | Path) -> tuple[dict[str, tensorfiles.HeaderTensor], dict[str, str]]:
    """A ``.safetensors`` file's keys as tensors of their shapes without values (as ``meta`` tensors, but
    without importing torch: :class:`~lora_nodes.tensorfiles.HeaderTensor`), and its metadata.

    Reads only the header (no weights), for checks that must be cheap; raises :class:`LoRAError`
    as :func:`read_state_dict` does for a file that is not readable.
    """
    path = Path(path)
    _check_is_file(path)
    try:
        header = tensorfiles.read_header(path)
    except tensorfiles.UnreadableTensorFile as exc:
        raise LoRAError(str(exc)) from exc
    return tensorfiles.header_tensors(header), header.metadata


def _check_is_file(path: Path) -> None:
    if path.is_dir():
        raise LoRAError(f"{path} is a folder; a LoRA is one file (.safetensors)")
    if not path.is_file():
        raise LoRAError(f"file not found: {path}")
    if path.stat().st_size == 0:
        raise LoRAError(f"{path.name} is empty (0 bytes): an interrupted download or copy?")


def _read_pickle_weights_only(path: Path) -> dict[str, Tensor]:
    import torch

    # weights_only=True refuses any pickle that would run code: tensors and plain containers only.
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise LoRAError(
            f"{path.name} was refused: it is not a pickle of plain tensors (loading it could run code, or it is "
            f"not a pickle at all). Convert it to .safetensors with a tool you trust."
        ) from exc
    except Exception as exc:  # torch.load raises EOFError, RuntimeError (zip), ... for damaged files
        raise LoRAError(f"{path.name} is not a readable {path.suffix} file (damaged or truncated?): "
                        f"{type(exc).__name__}: {str(exc)[:200]}") from exc
    if isinstance(data, dict) and isinstance(data.get("state_dict"), dict):
        data = data["state_dict"]
    if not isinstance(data, dict):
        raise LoRAError(f"{path.name} holds a {type(data).__name__}, not a dict of tensors")
    return {k: v for k, v in data.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}


def read_lora(path: str | Path) -> LoRA:
    """Read a LoRA file (kohya or diffusers/PEFT naming) into a :class:`LoRA`."""
    path = Path(path)
    tensors, metadata = read_state_dict(path)
    return parse_lora(tensors, metadata, name=path.stem, path=str(path))


def read_lora_header(path: str | Path) -> LoRA:
    """A LoRA of ``meta`` tensors from a ``.safetensors`` header: its modules, shapes and metadata.

    Every structural check of :func:`parse_lora` runs (so a malformed file is found without
    reading its weights); values (alphas, NaNs) are not known, so those checks wait for the load.
    """
    path = Path(path)
    tensors, metadata = read_header(path)
    if not tensors:
        raise LoRAError(f"{path.name} holds no tensors: it is not a LoRA (or anything else with weights)")
    return parse_lora(tensors, metadata, name=path.stem, path=str(path))
