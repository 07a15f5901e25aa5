"""The one reader of ``.safetensors`` headers: key names, shapes and metadata without the weights.

Cheap checks (validation's preflights, ``inspect``, telling a LoRA from a model) read only this.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


class UnreadableTensorFile(ValueError):
    """A file that is not a readable ``.safetensors`` file; the message names it and says why."""


@dataclass(frozen=True)
class TensorFileHeader:
    shapes: dict[str, list[int]]  # key -> shape
    metadata: dict[str, str]


def read_header(path: str | Path) -> TensorFileHeader:
    """The header of a ``.safetensors`` file; :class:`UnreadableTensorFile` when it is damaged,
    truncated or not one (no weights are read)."""
    from safetensors import SafetensorError, safe_open  # deferred, as torch's own loaders are

    path = Path(path)
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            shapes = {k: list(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118 - not a dict
            metadata = dict(f.metadata() or {})
    except (SafetensorError, OSError, ValueError, RuntimeError, TypeError) as exc:
        raise UnreadableTensorFile(f"{path.name} is not a readable .safetensors file (damaged or truncated?): "
                                   f"{exc}") from exc
    return TensorFileHeader(shapes, metadata)
