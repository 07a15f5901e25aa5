"""What a LoRA is once read: modules (down, up, alpha) under the names its file gives them."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import Tensor


@dataclass(frozen=True, eq=False)
class LoRAModule:
    """One low-rank pair for one target module. ``alpha`` None means alpha = rank."""

    key: str
    down: Tensor  # [rank, in] or [rank, in, kh, kw]
    up: Tensor  # [out, rank] or [out, rank, 1, 1]
    alpha: float | None = None

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def scale(self) -> float:
        return (self.alpha if self.alpha is not None else self.rank) / self.rank

    @property
    def delta_shape(self) -> tuple[int, ...]:
        return (self.up.shape[0], *self.down.shape[1:])


@dataclass(eq=False)
class LoRA:
    """A LoRA read from a file. Identity matters: the patcher compares LoRAs by object."""

    name: str
    format: str
    modules: dict[str, LoRAModule]
    metadata: dict[str, str] = field(default_factory=dict)
    path: str = ""

    def components(self) -> list[str]:
        from .formats import component_of

        return sorted({component_of(key) for key in self.modules})

    def describe(self) -> dict[str, Any]:
        """What ``inspect`` shows of a LoRA file."""
        ranks = sorted({m.rank for m in self.modules.values()})
        alphas = sorted({m.alpha if m.alpha is not None else float(m.rank) for m in self.modules.values()})
        return {
            "path": self.path,
            "format": self.format,
            "modules": len(self.modules),
            "ranks": ranks,
            "alphas": alphas,
            "components": self.components(),
            "metadata": self.metadata,
        }
