"""What a LoRA is once read: one module per target, each able to compute its weight change.

Every format (plain LoRA, LoCon, LoHa, LoKr, full diffs, with or without DoRA) is a subclass of
:class:`Module` with one ``delta`` by its definition; applying, merging and saving only ever
go through ``delta`` / ``apply_``, so there is one place per format to get right.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from .math import add_lora_


@dataclass(frozen=True, eq=False)
class Module:
    """One target module's change. Subclasses define ``delta_shape``, ``rank`` and ``delta``."""

    key: str
    alpha: float | None = None  # None: alpha = rank (scale 1)
    dora_scale: Tensor | None = None  # DoRA magnitude; None for plain (non-decomposed) updates
    bias: Tensor | None = None  # a change to the module's bias (``.diff_b``), unscaled

    kind = "module"

    @property
    def rank(self) -> int | None:
        return None

    @property
    def scale(self) -> float:
        """alpha / rank; 1 for formats without a rank."""
        rank = self.rank
        return 1.0 if rank is None or self.alpha is None else self.alpha / rank

    @property
    def delta_shape(self) -> tuple[int, ...]:
        """The delta's shape as the factors give it; some formats store kernels flattened."""
        raise NotImplementedError

    def fits(self, shape: tuple[int, ...]) -> bool:
        """Whether this module's delta can be added to a weight of ``shape``."""
        mine = self.delta_shape
        return mine[0] == shape[0] and math.prod(mine) == math.prod(shape)

    def unscaled_delta(self, shape: tuple[int, ...]) -> Tensor:
        """The format's product of factors, float32, shaped ``shape`` (the target weight's)."""
        raise NotImplementedError

    def delta(self, shape: tuple[int, ...], device: torch.device | str = "cpu") -> Tensor:
        """``scale * unscaled_delta``: the weight change at strength 1 (before any DoRA)."""
        return self.unscaled_delta(shape).to(device) * self.scale

    def apply_(self, weight32: Tensor, strength: float) -> None:
        """Update a float32 weight in place to this module's result at ``strength``."""
        delta = self.delta(tuple(weight32.shape), weight32.device)
        if self.dora_scale is not None:
            from .lycoris import dora_apply

            weight32.copy_(dora_apply(weight32, delta, self.dora_scale.to(weight32.device).float(), strength))
        else:
            weight32.add_(delta, alpha=strength)

    def write_(self, out: Tensor, original: Tensor, strength: float) -> None:
        """``out = original`` updated to this module's result at ``strength`` (all float32)."""
        out.copy_(original)
        self.apply_(out, strength)

    def apply_bias_(self, bias32: Tensor, strength: float) -> None:
        if self.bias is not None:
            bias32.add_(self.bias.to(bias32.device, torch.float32), alpha=strength)


@dataclass(frozen=True, eq=False)
class LoRAModule(Module):
    """A low-rank pair (LoRA, LoCon): dW = alpha/rank * up @ [mid @] down."""

    down: Tensor = None  # [rank, in] or [rank, in, kh, kw]
    up: Tensor = None  # [out, rank] or [out, rank, 1, 1]
    mid: Tensor | None = None  # LoCon's Tucker core [rank, rank, kh, kw] (down is then 1x1)

    kind = "lora"

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def delta_shape(self) -> tuple[int, ...]:
        kernel = self.mid.shape[2:] if self.mid is not None else self.down.shape[2:]
        return (self.up.shape[0], self.down.shape[1], *kernel)

    def unscaled_delta(self, shape: tuple[int, ...]) -> Tensor:
        if self.mid is not None:
            from .lycoris import locon_delta

            return locon_delta(self.up.float(), self.down.float(), self.mid.float(), shape)
        return add_lora_(torch.zeros(shape), self.up, self.down, 1.0)

    @property
    def _plain(self) -> bool:
        return self.mid is None and self.dora_scale is None

    def apply_(self, weight32: Tensor, strength: float) -> None:
        if self._plain:  # the common case: one fused addmm_
            add_lora_(weight32, self.up, self.down, strength * self.scale)
        else:
            super().apply_(weight32, strength)

    def write_(self, out: Tensor, original: Tensor, strength: float) -> None:
        if self._plain:  # out = original + s * up @ down in one pass, no copy first
            up, down = (t.to(out.device, torch.float32).flatten(1) for t in (self.up, self.down))
            torch.addmm(original.view(up.shape[0], -1), up, down, alpha=strength * self.scale,
                        out=out.view(up.shape[0], -1))
        else:
            super().write_(out, original, strength)


@dataclass(frozen=True, eq=False)
class LoHaModule(Module):
    """LoHa: dW = alpha/rank * (w1a @ w1b) * (w2a @ w2b), Tucker cores t1/t2 for convs."""

    w1a: Tensor = None
    w1b: Tensor = None
    w2a: Tensor = None
    w2b: Tensor = None
    t1: Tensor | None = None
    t2: Tensor | None = None

    kind = "loha"

    @property
    def rank(self) -> int:
        return int(self.w1b.shape[0])

    @property
    def delta_shape(self) -> tuple[int, ...]:
        if self.t1 is not None:  # Tucker: w1a [rank, out], w1b [rank, in], t1 [rank, rank, kh, kw]
            return (self.w1a.shape[1], self.w1b.shape[1], *self.t1.shape[2:])
        return (self.w1a.shape[0], *self.w1b.shape[1:])  # conv kernels may be stored flattened

    def unscaled_delta(self, shape: tuple[int, ...]) -> Tensor:
        from .lycoris import loha_delta

        f = _float
        return loha_delta(f(self.w1a), f(self.w1b), f(self.w2a), f(self.w2b), f(self.t1), f(self.t2), shape=shape)


@dataclass(frozen=True, eq=False)
class LoKrModule(Module):
    """LoKr: dW = scale * kron(w1, w2), each side whole or factored (a @ b, Tucker core t2)."""

    w1: Tensor | None = None
    w1a: Tensor | None = None
    w1b: Tensor | None = None
    w2: Tensor | None = None
    w2a: Tensor | None = None
    w2b: Tensor | None = None
    t2: Tensor | None = None

    kind = "lokr"

    @property
    def rank(self) -> int | None:
        """The factored side's rank; None when neither side is factored (then scale is 1)."""
        from .lycoris import lokr_rank

        return lokr_rank(self.w1b, self.w2b)

    @property
    def delta_shape(self) -> tuple[int, ...]:
        """kron(w1, w2)'s shape: [a*c, b*d, *kernel] (a conv w2 may be stored flattened)."""
        a, b = self.w1.shape if self.w1 is not None else (self.w1a.shape[0], self.w1b.shape[1])
        if self.w2 is not None:
            c, d, *kernel = self.w2.shape
        elif self.t2 is not None:  # Tucker: w2a [rank, c], w2b [rank, d], t2 [rank, rank, kh, kw]
            c, d, kernel = self.w2a.shape[1], self.w2b.shape[1], list(self.t2.shape[2:])
        else:
            c, d, kernel = self.w2a.shape[0], self.w2b.shape[1], []
        return (a * c, b * d, *kernel)

    def unscaled_delta(self, shape: tuple[int, ...]) -> Tensor:
        from .lycoris import lokr_delta

        f = _float
        return lokr_delta(w1=f(self.w1), w1a=f(self.w1a), w1b=f(self.w1b), w2=f(self.w2), w2a=f(self.w2a),
                          w2b=f(self.w2b), t2=f(self.t2), shape=shape)


def _float(tensor: Tensor | None) -> Tensor | None:
    return None if tensor is None else tensor.float()


@dataclass(frozen=True, eq=False)
class FullModule(Module):
    """A full weight difference (``.diff``, optional ``.diff_b``): dW = diff."""

    diff: Tensor = None

    kind = "full"

    @property
    def delta_shape(self) -> tuple[int, ...]:
        return tuple(self.diff.shape)

    def unscaled_delta(self, shape: tuple[int, ...]) -> Tensor:
        return self.diff.float().reshape(shape)


@dataclass(eq=False)
class LoRA:
    """A LoRA read from a file. Identity matters: the patcher compares modules by object."""

    name: str
    format: str
    modules: dict[str, Module]
    metadata: dict[str, str] = field(default_factory=dict)
    path: str = ""

    def components(self) -> list[str]:
        from .formats import component_of

        return sorted({component_of(key) for key in self.modules})

    def describe(self) -> dict[str, Any]:
        """What ``inspect`` shows of a LoRA file."""
        from .architecture import lora_architecture
        from .metadata import training_summary, trigger_words

        ranked = [m for m in self.modules.values() if m.rank is not None]
        return {
            "path": self.path,
            "format": self.format,
            "modules": len(self.modules),
            "kinds": sorted({m.kind for m in self.modules.values()}),
            "ranks": sorted({m.rank for m in ranked}),
            "alphas": sorted({m.alpha if m.alpha is not None else float(m.rank) for m in ranked}),
            "components": self.components(),
            "architecture": lora_architecture(self),
            "trigger_words": trigger_words(self.metadata),
            "training": training_summary(self.metadata),
            "metadata": self.metadata,
        }
