"""What a LoRA is once read: one module per target, each able to compute its weight change.

Every format (plain LoRA, LoCon, LoHa, LoKr, full diffs, with or without DoRA) is a subclass of
:class:`Module` with one ``delta`` by its definition; applying, merging and saving only ever
go through ``delta`` / ``apply_``, so there is one place per format to get right.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .. import families
from ..families import Family
from .metadata import BASE_MODEL_VERSION, training_summary, trigger_words

if TYPE_CHECKING:  # annotations only: reading a LoRA's header (validation) must not import torch
    import torch
    from torch import Tensor

# alpha / rank beyond this is refused: trainers write alpha <= rank (kohya, PEFT defaults), some
# 2-16x rank, rsLoRA files alpha * sqrt(rank); a thousandfold scale only ever comes from a broken
# file, and it turns every picture into noise or black.
MAX_SCALE = 1e3


def _shape(tensor: Tensor) -> list[int]:
    return list(tensor.shape)


def _empty_part(parts: dict[str, Tensor | None]) -> str | None:
    """Why one of ``parts`` has no values (a zero-sized dimension), or None."""
    for name, tensor in parts.items():
        if tensor is not None and tensor.numel() == 0:
            return f"{name} is empty (shape {_shape(tensor)})"
    return None


def _dims_error(name: str, tensor: Tensor, allowed: tuple[int, ...], layout: str) -> str | None:
    if tensor.dim() in allowed:
        return None
    return f"{name} is {tensor.dim()}-D (shape {_shape(tensor)}); expected {layout}"


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
    def is_plain(self) -> bool:
        """A low-rank pair without Tucker core or DoRA: what every LoRA file format can hold."""
        return False

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
        return self.fit_error(shape) is None

    def fit_error(self, shape: tuple[int, ...]) -> str | None:
        """Why this module cannot change a weight of ``shape``, or None when it can."""
        mine = self.delta_shape
        if mine[0] != shape[0] or math.prod(mine) != math.prod(shape):
            return f"shape {list(mine)} does not fit the module's {list(shape)}"
        inputs = shape[1] if len(shape) > 1 else 1
        if self.dora_scale is not None and not _dora_fits(self.dora_scale, shape[0], inputs, exact=True):
            return f"dora_scale {_shape(self.dora_scale)} does not fit the module's {list(shape)}"
        return None

    def unscaled_delta(self, shape: tuple[int, ...]) -> Tensor:
        """The format's product of factors, float32, shaped ``shape`` (the target weight's)."""
        raise NotImplementedError

    def delta(self, shape: tuple[int, ...], device: torch.device | str = "cpu") -> Tensor:
        """``scale * unscaled_delta``: the weight change at strength 1 (before any DoRA)."""
        return self.unscaled_delta(shape).to(device) * self.scale

    def apply_(self, weight32: Tensor, strength: float) -> None:
        """Update a float32 weight in place to this module's result at ``strength``."""
        from .lycoris import dora_apply

        delta = self.delta(tuple(weight32.shape), weight32.device)
        if self.dora_scale is not None:
            weight32.copy_(dora_apply(weight32, delta, self.dora_scale.to(weight32.device).float(), strength))
        else:
            weight32.add_(delta, alpha=strength)

    def write_(self, out: Tensor, original: Tensor, strength: float) -> None:
        """``out = original`` updated to this module's result at ``strength`` (all float32)."""
        out.copy_(original)
        self.apply_(out, strength)

    def apply_bias_(self, bias32: Tensor, strength: float) -> None:
        import torch

        if self.bias is not None:
            bias32.add_(self.bias.to(bias32.device, torch.float32), alpha=strength)

    def structure_error(self) -> str | None:
        """Why these tensors cannot be this format, or None; shapes only (meta tensors work).

        Checked once where modules are built from a file's tensors, so that nothing later (scale,
        delta, placement, DoRA) meets a zero rank, mismatched factors or a shape error mid-run.
        """
        error = self._factor_error()
        if error:
            return error
        if self.alpha is not None and not math.isfinite(self.alpha):
            return f"alpha is {self.alpha}"
        rank = self.rank
        if self.alpha is not None and rank is not None and abs(self.alpha) > MAX_SCALE * rank:
            return (f"alpha {self.alpha:g} at rank {rank} scales the update {abs(self.alpha) / rank:g}-fold "
                    f"(more than {MAX_SCALE:g}x is refused as absurd)")
        out, inputs = self.delta_shape[0], self.delta_shape[1] if len(self.delta_shape) > 1 else 1
        if self.dora_scale is not None and not _dora_fits(self.dora_scale, out, inputs):
            return (f"dora_scale has shape {_shape(self.dora_scale)}; a [{out}, {inputs}, ...] update needs "
                    f"[{out}, 1, ...] (per output) or [1, {inputs}, ...] (per input)")
        if self.bias is not None and (self.bias.dim() != 1 or self.bias.shape[0] != out):
            return f"diff_b has shape {_shape(self.bias)}; the module has {out} outputs, so [{out}] is expected"
        return None

    def _factor_error(self) -> str | None:
        """The format's own shape rules (factors present, ranks agreeing); see :meth:`structure_error`."""
        return None


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

    def _factor_error(self) -> str | None:
        up, down, mid = self.up, self.down, self.mid
        error = (_dims_error("down", down, (2, 4), "[rank, in] or [rank, in, kh, kw]")
                 or _dims_error("up", up, (2, 4), "[out, rank] or [out, rank, 1, 1]"))
        if error:
            return error
        if down.shape[0] == 0:
            return f"rank 0: down has shape {_shape(down)}"
        error = _empty_part({"down": down, "up": up, "mid": mid})
        if error:
            return error
        up_rank = math.prod(up.shape[1:])  # a [out, rank, kh, kw] up only works as a 1x1 conv
        if mid is None:
            if up_rank != down.shape[0]:
                return f"up has shape {_shape(up)} but down has rank {down.shape[0]} (shape {_shape(down)})"
            return None
        if mid.dim() != 4 or (mid.shape[0], mid.shape[1]) != (up_rank, down.shape[0]) or math.prod(down.shape[2:]) != 1:
            return (f"the Tucker mid has shape {_shape(mid)}; with up {_shape(up)} and down {_shape(down)} it must be "
                    f"[{up_rank}, {down.shape[0]}, kh, kw], and down a 1x1 kernel")
        return None

    @property
    def delta_shape(self) -> tuple[int, ...]:
        kernel = self.mid.shape[2:] if self.mid is not None else self.down.shape[2:]
        return (self.up.shape[0], self.down.shape[1], *kernel)

    def unscaled_delta(self, shape: tuple[int, ...]) -> Tensor:
        import torch

        from .lycoris import locon_delta
        from .ops import add_lora_

        if self.mid is not None:
            return locon_delta(self.up.float(), self.down.float(), self.mid.float(), shape)
        return add_lora_(torch.zeros(shape), self.up, self.down, 1.0)

    @property
    def is_plain(self) -> bool:
        return self.mid is None and self.dora_scale is None

    def apply_(self, weight32: Tensor, strength: float) -> None:
        from .ops import add_lora_

        if self.is_plain:  # the common case: one fused addmm_
            add_lora_(weight32, self.up, self.down, strength * self.scale)
        else:
            super().apply_(weight32, strength)

    def write_(self, out: Tensor, original: Tensor, strength: float) -> None:
        import torch

        if self.is_plain:  # out = original + s * up @ down in one pass, no copy first
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

    def _factor_error(self) -> str | None:
        parts = {"hada_w1_a": self.w1a, "hada_w1_b": self.w1b, "hada_w2_a": self.w2a, "hada_w2_b": self.w2b}
        if (self.t1 is None) != (self.t2 is None):
            return "has one of hada_t1 and hada_t2 but not the other (Tucker LoHa needs both)"
        tucker = self.t1 is not None
        for name, tensor in parts.items():
            allowed = (2,) if tucker or name.endswith("_a") else (2, 3, 4)
            error = _dims_error(name, tensor, allowed, "[out, rank] / [rank, in]" if not tucker else "[rank, out|in]")
            if error:
                return error
        error = _empty_part({**parts, "hada_t1": self.t1, "hada_t2": self.t2})
        if error:
            return error
        if tucker:
            return self._tucker_error()
        for side, (a, b) in {"w1": (self.w1a, self.w1b), "w2": (self.w2a, self.w2b)}.items():
            if a.shape[1] != b.shape[0]:
                return f"hada_{side}_a has shape {_shape(a)} but hada_{side}_b has rank {b.shape[0]} (shape {_shape(b)})"
        one = (self.w1a.shape[0], math.prod(self.w1b.shape[1:]))
        two = (self.w2a.shape[0], math.prod(self.w2b.shape[1:]))
        if one != two:
            return f"the two Hadamard factors differ: w1a @ w1b is {list(one)}, w2a @ w2b is {list(two)}"
        return None

    def _tucker_error(self) -> str | None:
        shapes = []
        for side, (t, a, b) in {"1": (self.t1, self.w1a, self.w1b), "2": (self.t2, self.w2a, self.w2b)}.items():
            if t.dim() < 3 or (t.shape[0], t.shape[1]) != (a.shape[0], b.shape[0]):
                return (f"hada_t{side} has shape {_shape(t)}; with hada_w{side}_a {_shape(a)} and hada_w{side}_b "
                        f"{_shape(b)} it must be [{a.shape[0]}, {b.shape[0]}, kh, kw]")
            shapes.append([a.shape[1], b.shape[1], *t.shape[2:]])
        if shapes[0] != shapes[1]:
            return f"the two Hadamard factors differ: the first rebuilds to {shapes[0]}, the second to {shapes[1]}"
        return None

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

    def _factor_error(self) -> str | None:
        parts = {"lokr_w1": self.w1, "lokr_w1_a": self.w1a, "lokr_w1_b": self.w1b, "lokr_w2": self.w2,
                 "lokr_w2_a": self.w2a, "lokr_w2_b": self.w2b, "lokr_t2": self.t2}
        if self.w1 is None and (self.w1a is None or self.w1b is None):
            return "needs lokr_w1, or both lokr_w1_a and lokr_w1_b"
        if self.w2 is None and (self.w2a is None or self.w2b is None):
            return "needs lokr_w2, or both lokr_w2_a and lokr_w2_b"
        if self.t2 is not None and self.w2 is not None:
            return "has lokr_t2 with a whole lokr_w2 (a Tucker core needs lokr_w2_a and lokr_w2_b)"
        error = _empty_part(parts)
        if error:
            return error
        w2_dims = (2, 4) if self.w2 is not None else (2,)
        for name, tensor in parts.items():
            allowed = w2_dims if name == "lokr_w2" else (3, 4) if name == "lokr_t2" else (2,)
            if tensor is not None and (error := _dims_error(name, tensor, allowed, f"{' or '.join(map(str, allowed))}-D")):
                return error
        if self.w1 is None and self.w1a.shape[1] != self.w1b.shape[0]:
            return f"lokr_w1_a has shape {_shape(self.w1a)} but lokr_w1_b has rank {self.w1b.shape[0]}"
        if self.w2 is None and self.t2 is None and self.w2a.shape[1] != self.w2b.shape[0]:
            return f"lokr_w2_a has shape {_shape(self.w2a)} but lokr_w2_b has rank {self.w2b.shape[0]}"
        if self.t2 is not None and (self.t2.shape[0], self.t2.shape[1]) != (self.w2a.shape[0], self.w2b.shape[0]):
            return (f"lokr_t2 has shape {_shape(self.t2)}; with lokr_w2_a {_shape(self.w2a)} and lokr_w2_b "
                    f"{_shape(self.w2b)} it must be [{self.w2a.shape[0]}, {self.w2b.shape[0]}, kh, kw]")
        return None

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


def _dora_fits(scale: Tensor, out: int, inputs: int, exact: bool = False) -> bool:
    """Whether a DoRA magnitude fits a [out, in, ...] update the way :func:`.lycoris.dora_apply` reads it.

    Per output it is [out] or [out, 1, ...]; per input [1, in, ...]. Some formats store conv kernels
    flattened ([out, in * kh * kw]), so before the target is known (``exact`` off) ``in`` need only
    divide the update's second dimension.
    """
    if scale.numel() == out and scale.shape[0] == out:
        return True
    if scale.dim() < 2 or scale.shape[0] != 1 or scale.numel() != scale.shape[1]:
        return False
    return scale.shape[1] == inputs if exact else inputs % scale.shape[1] == 0


@dataclass(frozen=True, eq=False)
class FullModule(Module):
    """A full weight difference (``.diff``, optional ``.diff_b``): dW = diff."""

    diff: Tensor = None

    kind = "full"

    def _factor_error(self) -> str | None:
        if self.diff.dim() == 0:
            return "diff is a single number; expected the weight's shape"
        return _empty_part({"diff": self.diff})

    @property
    def delta_shape(self) -> tuple[int, ...]:
        return tuple(self.diff.shape)

    def unscaled_delta(self, shape: tuple[int, ...]) -> Tensor:
        return self.diff.float().reshape(shape)


@dataclass(frozen=True, eq=False)
class RowsModule(Module):
    """Some output rows of another module's change: a file's fused module (Flux's q/k/v in one
    weight) on one of the separate weights a base holds. ``rows`` index the fused output rows in
    the order the target's rows take them (a reordering too: Flux's swapped adaLN halves)."""

    inner: Module = None
    rows: Tensor = None  # 1-D long: fused rows, in target order
    fused_rows: int = 0  # the fused module's output rows

    @property
    def kind(self) -> str:  # type: ignore[override]
        return self.inner.kind

    @property
    def rank(self) -> int | None:
        return self.inner.rank

    @property
    def delta_shape(self) -> tuple[int, ...]:
        return (int(self.rows.numel()), *self.inner.delta_shape[1:])

    def unscaled_delta(self, shape: tuple[int, ...]) -> Tensor:
        return self.inner.unscaled_delta((self.fused_rows, *shape[1:]))[self.rows]


def rows_of(module: Module, rows: list[int] | range, fused_rows: int) -> Module | str:
    """``module``'s change on ``rows`` of its output (see :class:`RowsModule`), or why it cannot be split.

    A plain LoRA stays one (its up's rows taken: same down, rank and alpha, so the same scale);
    other formats are computed whole and sliced. A DoRA magnitude per output row is sliced with
    its rows; one per input column normalises over every row of the fused weight, which the
    separate weights do not hold together.
    """
    import torch

    if isinstance(rows, range) and rows.step == 1:  # one block of rows: views, no index tensor, no copy
        index, pick = torch.arange(rows.start, rows.stop), slice(rows.start, rows.stop)
    else:
        index = pick = torch.tensor(rows, dtype=torch.long)
    dora = module.dora_scale
    if dora is not None:
        if dora.shape[0] != fused_rows or (dora.dim() > 1 and dora.numel() != fused_rows):
            return ("its DoRA magnitude is per input column (older LyCORIS), which needs the fused weight "
                    "whole; the base holds it as separate weights")
        dora = dora[pick]
    bias = module.bias[pick] if module.bias is not None else None
    if isinstance(module, LoRAModule) and module.mid is None:
        return LoRAModule(key=module.key, alpha=module.alpha, dora_scale=dora, bias=bias,
                          down=module.down, up=module.up[pick])
    return RowsModule(key=module.key, alpha=module.alpha, dora_scale=dora, bias=bias, inner=module,
                      rows=index, fused_rows=fused_rows)


@dataclass(eq=False)
class LoRA:
    """A LoRA read from a file. Identity matters: the patcher compares modules by object."""

    name: str
    format: str
    modules: dict[str, Module]
    metadata: dict[str, str] = field(default_factory=dict)
    path: str = ""
    warnings: list[str] = field(default_factory=list)  # metadata that did not parse (the weights are fine)
    # how its keys name modules as the file writes them (families.layout_of: kohya, diffusers, a
    # family's own such as an original checkpoint tree's), '+'-joined; "" when not read from a file
    layout: str = ""

    def components(self) -> list[str]:
        return sorted({families.component_of(key) for key in self.modules})

    @property
    def family(self) -> Family | None:
        """The model family it was made for, or None when nothing in the file tells."""
        version = self.metadata.get(BASE_MODEL_VERSION, "")
        return families.from_lora(version, self.modules, lambda key: self.modules[key].delta_shape)

    def describe(self) -> dict[str, Any]:
        """What ``inspect`` shows of a LoRA file."""
        ranked = [m for m in self.modules.values() if m.rank is not None]
        family = self.family
        return {
            "path": self.path,
            "format": self.format,
            "modules": len(self.modules),
            "kinds": sorted({m.kind for m in self.modules.values()}),
            "ranks": sorted({m.rank for m in ranked}),
            "alphas": sorted({m.alpha if m.alpha is not None else float(m.rank) for m in ranked}),
            "components": self.components(),
            "layout": self.layout or self.format,
            "architecture": family.id if family else None,
            "blocks": families.blocks_of(family, self.modules),
            "trigger_words": trigger_words(self.metadata),
            "training": training_summary(self.metadata),
            "metadata": self.metadata,
            "warnings": list(self.warnings),
        }
