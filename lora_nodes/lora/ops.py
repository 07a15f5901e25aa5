"""Pure functions that combine and re-rank low-rank weight deltas, one module at a time.

A low-rank pair is ``up`` [out, r] (conv: [out, r, 1, 1]) and ``down`` [r, in] (conv: [r, in, kh, kw])
with ``alpha``; it stands for ``delta = (alpha / r) * up.flatten(1) @ down.flatten(1)`` reshaped to the
weight's shape. Everything is computed in float32 on the tensors' device; nothing here knows about files
or models.

Conventions chosen here:

* SVD factors are balanced: ``up = U * sqrt(s)`` and ``down = sqrt(s) * Vh`` (kohya and PEFT put all of
  ``s`` into ``up``; the product is the same, but balanced factors keep both halves in a similar range,
  which is kinder to fp16/bf16 storage).
* New LoRAs have ``alpha == rank`` (scale 1), except :func:`resize`, which keeps the input's scale the
  way kohya's ``resize_lora.py`` does (``alpha = old_scale * new_rank``).
* ``ties`` / ``dare_*`` follow ``peft.utils.merge_utils`` applied to full deltas (PEFT's ``*_svd``
  combination types): each part's delta already includes its own ``alpha / rank``, weights multiply
  after pruning and sign election, and the disjoint merge divides by the number of agreeing parts.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

SignMethod = Literal["total", "frequency"]


def add_lora_(weight32: Tensor, up: Tensor, down: Tensor, scale: float) -> Tensor:
    """``weight32 += scale * up @ down`` in place with one fused ``addmm_``; returns ``weight32``.

    ``weight32`` is float32; ``up`` and ``down`` are cast to it on its device, and conv kernels are
    flattened to ``[out, in * kh * kw]``, which covers LoCon's 3x3 down with a 1x1 up.
    """
    up2 = up.to(weight32.device, torch.float32).flatten(1)
    down2 = down.to(weight32.device, torch.float32).flatten(1)
    weight32.view(up2.shape[0], -1).addmm_(up2, down2, alpha=scale)
    return weight32


@dataclass(frozen=True, eq=False)
class LowRank:
    """One module's low-rank delta: ``(alpha / rank) * up @ down`` (conv kernels flattened)."""

    up: Tensor
    down: Tensor
    alpha: float

    def __post_init__(self) -> None:
        if self.up.shape[1] != self.down.shape[0]:
            raise ValueError(f"up {tuple(self.up.shape)} and down {tuple(self.down.shape)} ranks differ")

    @property
    def rank(self) -> int:
        """The inner dimension r."""
        return int(self.down.shape[0])

    @property
    def scale(self) -> float:
        """``alpha / rank``, the factor applied to ``up @ down``."""
        return float(self.alpha) / self.rank

    @property
    def shape(self) -> tuple[int, ...]:
        """The weight shape the factors imply: ``(out, in)`` or ``(out, in, kh, kw)``."""
        return (int(self.up.shape[0]), *(int(d) for d in self.down.shape[1:]))

    def delta(self, shape: Sequence[int] | None = None) -> Tensor:
        """The full float32 delta, reshaped to ``shape`` (default :attr:`shape`)."""
        up2 = self.up.flatten(1).float()
        down2 = self.down.to(up2.device).flatten(1).float()
        return (self.scale * (up2 @ down2)).reshape(tuple(shape) if shape is not None else self.shape)


Part = tuple[LowRank | Tensor, float]


def _as_delta(item: LowRank | Tensor) -> Tensor:
    return item.delta() if isinstance(item, LowRank) else item.float()


def _energy(s: Tensor, k: int) -> float:
    total = float((s.double() ** 2).sum())
    return 1.0 if total == 0.0 else float((s[:k].double() ** 2).sum()) / total


def _factors(u: Tensor, s: Tensor, vh: Tensor, k: int, shape: Sequence[int]) -> tuple[Tensor, Tensor]:
    """Balanced rank-k factors ``U sqrt(s)``, ``sqrt(s) Vh`` in the layout of a weight of ``shape``."""
    root = s[:k].sqrt()
    up, down = u[:, :k] * root, root[:, None] * vh[:k]
    if len(shape) == 4:
        up, down = up.reshape(shape[0], k, 1, 1), down.reshape(k, *shape[1:])
    return up.contiguous(), down.contiguous()


def concat(parts: Sequence[tuple[LowRank, float]]) -> LowRank:
    """``sum_i w_i * delta_i`` exactly, as one LoRA of rank ``sum(r_i)`` with ``alpha = rank``.

    Ups are stacked along the rank axis (each multiplied by ``w_i * scale_i``) and downs likewise.
    Linear ``[r, in]`` and 1x1 conv ``[r, in, 1, 1]`` downs mix freely (same math; the first part's
    layout wins). Otherwise every down must have the same kernel: a 1x1 down has no delta of a 3x3
    weight's shape under this convention (zero-padding it into the kernel centre is only equivalent for
    'same'-padded convs, which this function cannot see), so mismatches raise ``ValueError``.
    """
    if not parts:
        raise ValueError("concat needs at least one part")
    first = parts[0][0]
    out, feat = first.up.shape[0], first.down.flatten(1).shape[1]
    kernel = tuple(first.down.shape[2:])
    ups, downs = [], []
    for lora, weight in parts:
        k = tuple(lora.down.shape[2:])
        if k != kernel and not (set(k) <= {1} and set(kernel) <= {1}):
            raise ValueError(f"cannot concat conv kernels {kernel} and {k} exactly; resample one first")
        if lora.up.shape[0] != out or lora.down.flatten(1).shape[1] != feat:
            raise ValueError(f"shape mismatch: {first.shape} vs {lora.shape}")
        ups.append(lora.up.flatten(1).float().to(first.up.device) * (weight * lora.scale))
        downs.append(lora.down.flatten(1).float().to(first.up.device))
    up, down = torch.cat(ups, dim=1), torch.cat(downs, dim=0)
    rank = up.shape[1]
    if first.down.dim() == 4:
        up, down = up.reshape(out, rank, 1, 1), down.reshape(rank, *first.down.shape[1:])
    return LowRank(up, down, float(rank))


def svd_lowrank(delta: Tensor, rank: int) -> tuple[LowRank, float]:
    """Best rank-k LoRA of a full delta by truncated SVD; returns it and the energy kept.

    Conv deltas ``[out, in, kh, kw]`` are flattened to ``[out, in*kh*kw]`` (callers choose a rank for
    kernels bigger than 1x1, as kohya's ``conv_dim``; see ExtractLoRA). The rank is clipped to
    ``min(out, in*kh*kw)``. Energy kept is ``sum(kept s^2) / sum(s^2)`` (1.0 for a zero delta). The SVD is
    ``torch.linalg.svd`` in float32, ``full_matrices=False``, so results are deterministic. kohya's
    extractor additionally clamps factor entries at a quantile (``clamp_quantile=0.99``); that is lossy and
    not done here.
    """
    shape = tuple(delta.shape)
    if rank < 1:
        raise ValueError(f"rank must be >= 1, got {rank}")
    mat = delta.float().reshape(shape[0], -1)
    u, s, vh = torch.linalg.svd(mat, full_matrices=False)
    k = min(rank, s.numel())
    up, down = _factors(u, s, vh, k, shape)
    return LowRank(up, down, float(k)), _energy(s, k)


def _factored_svd(lora: LowRank) -> tuple[Tensor, Tensor, Tensor]:
    """SVD of ``up @ down`` (no scale) from the factors: QR of both, then SVD of the small core."""
    up = lora.up.flatten(1).float()
    down = lora.down.flatten(1).float().to(up.device)
    q_up, r_up = torch.linalg.qr(up)
    q_down, r_down = torch.linalg.qr(down.T)
    u, s, vh = torch.linalg.svd(r_up @ r_down.T, full_matrices=False)
    return q_up @ u, s, vh @ q_down.T


def svd_merge(parts: Sequence[tuple[LowRank, float]], rank: int) -> tuple[LowRank, float]:
    """``sum_i w_i * delta_i`` truncated to its best rank-``rank`` LoRA; returns it and the energy kept.

    The exact sum is :func:`concat`; its SVD comes from the factors (as in :func:`resize`), so the full
    delta is never formed. The result has ``alpha = rank``.
    """
    if rank < 1:
        raise ValueError(f"rank must be >= 1, got {rank}")
    merged = concat(parts)
    u, s, vh = _factored_svd(merged)
    k = min(rank, s.numel())
    up, down = _factors(u, s, vh, k, merged.shape)
    return LowRank(up, down, float(k)), _energy(s, k)


def resize(
    lora: LowRank, rank: int | None = None, *, fro: float | None = None, ratio: float | None = None
) -> tuple[LowRank, dict]:
    """Re-rank a LoRA by SVD of its delta, computed from the factors (never the full delta).

    Rules follow kohya's ``resize_lora.py``: a fixed ``rank``; or dynamic, with ``rank`` (default the
    current rank) as the upper limit: ``fro`` keeps the smallest k whose Frobenius-norm fraction
    ``sqrt(sum_k s^2 / sum s^2)`` reaches ``fro`` (kohya's ``sv_fro``), ``ratio`` keeps singular values
    ``>= s_max / ratio`` (kohya's ``sv_ratio`` uses a strict ``>``; they differ only at exact equality).
    At least one singular value is kept (a zero delta gives rank 1). The input's scale is kept:
    ``alpha = scale * new_rank``.

    Returns the LoRA and ``{'rank', 'fro_kept', 'energy_kept', 'rel_error'}`` where ``fro_kept`` is the
    norm fraction kept (kohya's ``fro_retained``), ``energy_kept`` its square and ``rel_error`` is
    ``||new - old|| / ||old||``, which by Eckart-Young equals ``sqrt(1 - energy_kept)``.
    """
    if fro is not None and ratio is not None:
        raise ValueError("give at most one of fro= and ratio=")
    if rank is None and fro is None and ratio is None:
        raise ValueError("give rank=, fro= or ratio=")
    if rank is not None and rank < 1:
        raise ValueError(f"rank must be >= 1, got {rank}")
    if fro is not None and not 0.0 < fro <= 1.0:
        raise ValueError(f"fro must be in (0, 1], got {fro}")
    if ratio is not None and ratio < 1.0:
        raise ValueError(f"ratio must be >= 1, got {ratio}")
    u, s, vh = _factored_svd(lora)
    cap = min(rank if rank is not None else lora.rank, s.numel())
    if float(s[0]) == 0.0:  # zero delta: keep one (zero) component, as kohya does
        k = 1
    elif fro is not None:
        cum = (s.double() ** 2).cumsum(0)
        k = int(torch.searchsorted(cum / cum[-1], torch.tensor(fro**2, dtype=torch.float64))) + 1
    elif ratio is not None:
        k = int((s >= s[0] / ratio).sum())
    else:
        k = cap
    k = max(1, min(k, cap))
    energy = _energy(s, k)
    up, down = _factors(u, s, vh, k, lora.shape)
    info = {"rank": k, "fro_kept": math.sqrt(energy), "energy_kept": energy,
            "rel_error": math.sqrt(max(0.0, 1.0 - energy))}
    return LowRank(up, down, lora.scale * k), info


def _prune(tensor: Tensor, density: float, method: str, generator: torch.Generator | None) -> Tensor:
    """PEFT's pruning: keep the top ``int(density * n)`` magnitudes, or a Bernoulli(density) mask / density."""
    if density >= 1:
        return tensor
    if density < 0:
        raise ValueError(f"density must be >= 0, got {density}")
    if method == "magnitude":
        mask = torch.zeros(tensor.numel(), dtype=tensor.dtype, device=tensor.device)
        mask[torch.topk(tensor.abs().flatten(), k=int(density * tensor.numel())).indices] = 1
        return tensor * mask.reshape(tensor.shape)
    keep = torch.bernoulli(torch.full_like(tensor, density), generator=generator)
    return tensor * keep / density


def _stack(parts: Sequence[Part], density: float, method: str, seed: int | None) -> tuple[Tensor, Tensor]:
    deltas = [_as_delta(item) for item, _ in parts]
    if not deltas:
        raise ValueError("need at least one part")
    generator = None
    if method == "random":
        generator = torch.Generator(device=deltas[0].device).manual_seed(int(seed))
    stacked = torch.stack([_prune(d, density, method, generator) for d in deltas])
    weights = torch.tensor([w for _, w in parts], dtype=torch.float32, device=stacked.device)
    return stacked, weights.reshape(-1, *([1] * (stacked.dim() - 1)))


def _elect_and_merge(stacked: Tensor, weights: Tensor, method: SignMethod) -> Tensor:
    """Sign election on the unweighted pruned tensors, then mean of the weighted agreeing entries."""
    if method == "total":
        votes = stacked.sum(0)
    elif method == "frequency":
        votes = stacked.sign().sum(0)
    else:
        raise ValueError(f"majority_sign_method must be 'total' or 'frequency', got {method!r}")
    agree = stacked.sign() == torch.where(votes >= 0, 1.0, -1.0)
    return (stacked * weights * agree).sum(0) / agree.sum(0).clamp(min=1.0)


def ties(parts: Sequence[Part], density: float, majority_sign_method: SignMethod = "total") -> Tensor:
    """TIES merge of full deltas (PEFT's definition): magnitude-prune each to ``density``, elect the sign,
    disjoint-merge. ``parts`` are ``(LowRank or full delta, weight)``; returns the merged float32 delta.
    """
    stacked, weights = _stack(parts, density, "magnitude", None)
    return _elect_and_merge(stacked, weights, majority_sign_method)


def dare_linear(parts: Sequence[Part], density: float, seed: int) -> Tensor:
    """DARE (PEFT's definition): random-prune each delta (keep with prob. ``density``, rescale by
    ``1/density``), then the weighted sum. Deterministic for a given ``seed`` (one ``torch.Generator``,
    parts drawn in order: on the CPU this matches PEFT after ``torch.manual_seed(seed)``).
    """
    stacked, weights = _stack(parts, density, "random", seed)
    return (stacked * weights).sum(0)


def dare_ties(
    parts: Sequence[Part], density: float, seed: int, majority_sign_method: SignMethod = "total"
) -> Tensor:
    """DARE pruning (as :func:`dare_linear`) followed by TIES sign election and disjoint merge."""
    stacked, weights = _stack(parts, density, "random", seed)
    return _elect_and_merge(stacked, weights, majority_sign_method)


def extract(weight_a: Tensor, weight_b: Tensor, rank: int) -> tuple[LowRank, float]:
    """LoRA approximating ``weight_b - weight_a`` (float32) by truncated SVD; returns it and the energy kept.

    Unlike kohya's extractor, factor entries are not clamped at a quantile: the truncation stays exact.
    """
    if weight_a.shape != weight_b.shape:
        raise ValueError(f"shapes differ: {tuple(weight_a.shape)} vs {tuple(weight_b.shape)}")
    return svd_lowrank(weight_b.float() - weight_a.float().to(weight_b.device), rank)
