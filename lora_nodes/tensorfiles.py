"""The one reader of ``.safetensors`` files: their headers (key names, shapes and metadata, without
the weights) for cheap checks, and their tensors, with one way of saying a file is damaged; and the
hashes A1111 gives model files.

Cheap checks (validation's preflights, ``inspect``, telling a LoRA from a model) read only headers.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # annotations only: reading a header must not import torch
    from torch import Tensor


class UnreadableTensorFile(ValueError):
    """A file that is not a readable ``.safetensors`` file; the message names it and says why."""


@dataclass(frozen=True)
class TensorFileHeader:
    shapes: dict[str, list[int]]  # key -> shape
    metadata: dict[str, str]


@contextmanager
def _named_failures(path: Path) -> Iterator[None]:
    """Turn whatever safetensors raises for a damaged, truncated or foreign file into
    :class:`UnreadableTensorFile` naming it."""
    from safetensors import SafetensorError  # deferred, as torch's own loaders are

    try:
        yield
    except (SafetensorError, OSError, ValueError, RuntimeError, TypeError) as exc:
        raise UnreadableTensorFile(f"{path.name} is not a readable .safetensors file (damaged or truncated?): "
                                   f"{exc}") from exc


def read_header(path: str | Path) -> TensorFileHeader:
    """The header of a ``.safetensors`` file; :class:`UnreadableTensorFile` when it is damaged,
    truncated or not one (no weights are read)."""
    from safetensors import safe_open

    path = Path(path)
    with _named_failures(path), safe_open(str(path), framework="pt", device="cpu") as f:
        shapes = {k: list(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118 - not a dict
        metadata = dict(f.metadata() or {})
    return TensorFileHeader(shapes, metadata)


def read_tensors(path: str | Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Every tensor of a ``.safetensors`` file (on the CPU) and its metadata;
    :class:`UnreadableTensorFile` when it is damaged, truncated or not one."""
    from safetensors import safe_open

    path = Path(path)
    with _named_failures(path), safe_open(str(path), framework="pt", device="cpu") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - not a dict
        metadata = dict(f.metadata() or {})
    return tensors, metadata


# ---------------------------------------------------------------------------------------------
# hashes, as A1111 computes them (its PNGs' "Model hash" and "Lora hashes")

_HASH_BLOCK = 1 << 20


def _sha256_from(f, offset: int) -> str:
    digest = hashlib.sha256()
    f.seek(offset)
    for block in iter(lambda: f.read(_HASH_BLOCK), b""):
        digest.update(block)
    return digest.hexdigest()


def file_sha256(path: str | Path) -> str:
    """The sha256 of a whole file (hex): A1111's model hash (its first 10 digits)."""
    with open(path, "rb") as f:
        return _sha256_from(f, 0)


def tensor_data_sha256(path: str | Path) -> str:
    """The sha256 (hex) of a ``.safetensors`` file's bytes after its header: the hash kohya's
    sd-scripts write as ``sshs_model_hash`` and A1111 computes for a LoRA file without one."""
    with open(path, "rb") as f:
        header_length = int.from_bytes(f.read(8), "little")
        return _sha256_from(f, 8 + header_length)
