"""The one reader of ``.safetensors`` files: their headers (key names, shapes and metadata, without
the weights) for cheap checks, and their tensors, with one way of saying a file is damaged; and the
hashes A1111 gives model files.

Cheap checks (validation's preflights, ``inspect``, telling a LoRA from a model) read only headers.
"""

from __future__ import annotations

import hashlib
import json
import math
import mmap
import os
import sys
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
    places: dict[str, tuple[str, int, int]]  # key -> (dtype, first byte, end byte) from the file's start


@contextmanager
def _named_failures(path: Path) -> Iterator[None]:
    """Turn whatever reading a damaged, truncated or foreign file raises (here, or in safetensors) into
    :class:`UnreadableTensorFile` naming it."""
    from safetensors import SafetensorError  # deferred, as torch's own loaders are

    try:
        yield
    except (SafetensorError, OSError, ValueError, RuntimeError, TypeError) as exc:
        raise UnreadableTensorFile(f"{path.name} is not a readable .safetensors file (damaged or truncated?): "
                                   f"{exc}") from exc


# The safetensors format (huggingface/safetensors): an 8-byte little-endian header length N, N bytes of
# UTF-8 JSON ({name: {"dtype", "shape", "data_offsets": [begin, end]}}, and an optional "__metadata__"
# of strings), then the tensors' bytes, which the offsets must cover exactly, in order.
MAX_HEADER_BYTES = 100_000_000  # the safetensors library refuses larger headers
DTYPE_BITS = {"BOOL": 8, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8,
              "F8_E8M0": 8, "F8_E4M3FNUZ": 8, "F8_E5M2FNUZ": 8, "I16": 16, "U16": 16, "F16": 16, "BF16": 16,
              "I32": 32, "U32": 32, "F32": 32, "C64": 64, "F64": 64, "I64": 64, "U64": 64}
_USIZE_MAX = 2**64 - 1
METADATA_KEY = "__metadata__"


def read_header(path: str | Path) -> TensorFileHeader:
    """The header of a ``.safetensors`` file; :class:`UnreadableTensorFile` when it is damaged,
    truncated or not one (no weights are read).

    Read here in plain Python, checked as the safetensors library checks a header before it reads a
    tensor (the tests hold the two to the same verdicts): that library opens a file only for a
    framework, which it imports (torch; numpy), and validation must not wait for either.
    """
    path = Path(path)
    with _named_failures(path), open(path, "rb") as f:
        return _header_of(f)


def _header_of(f) -> TensorFileHeader:
    """The checked header of the open file ``f``, read from its start."""
    size = os.fstat(f.fileno()).st_size
    if size < 8:
        raise ValueError(f"{size} bytes, less than the 8 of a header length")
    f.seek(0)
    length = int.from_bytes(f.read(8), "little")
    if length > MAX_HEADER_BYTES or 8 + length > size:
        raise ValueError(f"a header length of {length} bytes, in a file of {size}")
    return _parsed_header(json.loads(f.read(length).decode("utf-8")), 8 + length, size)


def _parsed_header(header: object, data_start: int, size: int) -> TensorFileHeader:
    """The shapes (by name, as safetensors lists keys), metadata and byte ranges of a header's JSON
    (the tensors' bytes start at ``data_start`` in a file of ``size``), after checking it."""
    if not isinstance(header, dict):
        raise TypeError("the header is not a JSON object")
    metadata = header.pop(METADATA_KEY, None)
    metadata = {} if metadata is None else metadata
    if not (isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())):
        raise TypeError(f"its {METADATA_KEY} is not a map of strings")
    entries = sorted(header.items())
    shapes = {name: _checked_shape(name, entry) for name, entry in entries}
    _check_offsets(header, size - data_start)
    places = {name: (entry["dtype"], data_start + entry["data_offsets"][0], data_start + entry["data_offsets"][1])
              for name, entry in entries}
    return TensorFileHeader(shapes, metadata, places)


def _is_usize(value: object) -> bool:
    return type(value) is int and 0 <= value <= _USIZE_MAX


def _checked_shape(name: str, entry: object) -> list[int]:
    """A header entry's shape, after checking its dtype, shape and offsets are well-formed and agree."""
    if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= entry.keys():
        raise ValueError(f"tensor '{name}' lacks its dtype, shape or data_offsets")
    shape, offsets, bits = entry["shape"], entry["data_offsets"], DTYPE_BITS.get(entry["dtype"])
    if bits is None:
        raise ValueError(f"tensor '{name}' has an unknown dtype {entry['dtype']!r}")
    if not (isinstance(shape, list) and all(_is_usize(n) for n in shape)):
        raise ValueError(f"tensor '{name}' has a malformed shape {shape!r}")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_usize(n) for n in offsets)):
        raise ValueError(f"tensor '{name}' has malformed data_offsets {offsets!r}")
    bit_count = math.prod(shape) * bits
    if bit_count % 8 or offsets[1] - offsets[0] != bit_count // 8:
        raise ValueError(f"tensor '{name}': {entry['dtype']} {shape} does not fill bytes {offsets}")
    return shape


def _check_offsets(header: dict[str, dict], data_bytes: int) -> None:
    """The tensors' byte ranges must follow one another from 0 and end where the file does."""
    end = 0
    for name, entry in sorted(header.items(), key=lambda item: item[1]["data_offsets"]):
        begin, stop = entry["data_offsets"]
        if begin != end or stop < begin:
            raise ValueError(f"tensor '{name}' has invalid data_offsets {[begin, stop]}")
        end = stop
    if end != data_bytes:
        raise ValueError(f"the tensors' data ends at byte {end} but the file holds {data_bytes} after the header")


@dataclass(frozen=True)
class HeaderTensor:
    """A tensor as a header tells it: a shape, no values. What ``torch.empty(shape, device="meta")`` is to
    the checks that read shapes only (a LoRA's structure), without importing torch."""

    shape: tuple[int, ...]
    is_meta = True  # no values, as a ``meta`` tensor

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def dim(self) -> int:
        return len(self.shape)

    def numel(self) -> int:
        return math.prod(self.shape)


def header_tensors(header: TensorFileHeader) -> dict[str, HeaderTensor]:
    """Each tensor of ``header`` as a :class:`HeaderTensor` (its shape)."""
    return {name: HeaderTensor(tuple(shape)) for name, shape in header.shapes.items()}


# safetensors' dtypes as torch names them; a file holding any other is read by the safetensors library
TORCH_DTYPES = {"BOOL": "bool", "U8": "uint8", "I8": "int8", "I16": "int16", "U16": "uint16", "I32": "int32",
                "U32": "uint32", "I64": "int64", "U64": "uint64", "F16": "float16", "BF16": "bfloat16",
                "F32": "float32", "F64": "float64", "C64": "complex64", "F8_E4M3": "float8_e4m3fn",
                "F8_E5M2": "float8_e5m2", "F8_E8M0": "float8_e8m0fnu", "F8_E4M3FNUZ": "float8_e4m3fnuz",
                "F8_E5M2FNUZ": "float8_e5m2fnuz"}


def read_tensors(path: str | Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Every tensor of a ``.safetensors`` file (on the CPU) and its metadata;
    :class:`UnreadableTensorFile` when it is damaged, truncated or not one.

    The tensors are views of one private (copy-on-write) mapping of the file, as the safetensors
    library makes them, but made here from the checked header in one step per tensor: that library
    slices a storage per tensor in Python (three 48 MB LoRAs of 480 tensors each: 0.032 s there,
    0.015 s here).
    """
    import torch

    path = Path(path)
    with _named_failures(path), open(path, "rb") as f:
        header = _header_of(f)
        dtypes = {name: getattr(torch, TORCH_DTYPES.get(dtype, ""), None) for name, (dtype, *_) in header.places.items()}
        if sys.byteorder != "little" or None in dtypes.values():
            return _read_with_safetensors(path)
        data = torch.frombuffer(mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY), dtype=torch.uint8)
    tensors = {name: _tensor_at(data, dtypes[name], begin, end, header.shapes[name])
               for name, (_, begin, end) in header.places.items()}
    return tensors, header.metadata


def _tensor_at(data: Tensor, dtype, begin: int, end: int, shape: list[int]) -> Tensor:
    """The tensor in bytes ``[begin, end)`` of ``data``: a view, or a copy where its bytes do not start
    at a multiple of its item size (the format does not promise they do; a view needs it)."""
    raw = data[begin:end]
    if begin % dtype.itemsize:
        raw = raw.clone()
    return raw.view(dtype).view(shape)


def _read_with_safetensors(path: Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    from safetensors import safe_open

    with _named_failures(path), safe_open(str(path), framework="pt", device="cpu") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - not a dict
        metadata = dict(f.metadata() or {})
    return tensors, metadata


# ---------------------------------------------------------------------------------------------
# hashes, as A1111 computes them (its PNGs' "Model hash" and "Lora hashes")

_HASH_BLOCK = 1 << 20


def _sha256_of(f, start: int, end: int | None = None) -> str:
    """The sha256 (hex) of bytes ``[start, end)`` of the open file ``f`` (to its end without ``end``)."""
    digest, block = hashlib.sha256(), memoryview(bytearray(_HASH_BLOCK))
    f.seek(start)
    left = math.inf if end is None else max(end - start, 0)
    while left and (count := f.readinto(block[: min(_HASH_BLOCK, left)])):
        digest.update(block[:count])
        left -= count
    return digest.hexdigest()


def _data_start(f) -> int:
    """Where a ``.safetensors`` file's tensor data starts: after its 8-byte header length and the header
    (at its end, where the length says more than the file holds: a damaged file is hashed all the same)."""
    f.seek(0)
    return min(8 + int.from_bytes(f.read(8), "little"), os.fstat(f.fileno()).st_size)


def file_sha256(path: str | Path) -> str:
    """The sha256 of a whole file (hex): A1111's model hash (its first 10 digits)."""
    with open(path, "rb", buffering=0) as f:
        return _sha256_of(f, 0)


def tensor_data_sha256(path: str | Path) -> str:
    """The sha256 (hex) of a ``.safetensors`` file's bytes after its header: the hash kohya's
    sd-scripts write as ``sshs_model_hash`` and A1111 computes for a LoRA file without one."""
    with open(path, "rb", buffering=0) as f:
        return _sha256_of(f, _data_start(f))


def header_sha256(path: str | Path) -> str:
    """The sha256 (hex) of a ``.safetensors`` file's bytes before its tensor data (the header's
    length and the header): with :func:`tensor_data_sha256`, what tells the file's content apart."""
    with open(path, "rb", buffering=0) as f:
        return _sha256_of(f, 0, _data_start(f))
