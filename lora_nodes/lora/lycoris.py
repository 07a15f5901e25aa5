"""Weight deltas of the LyCORIS family (LoCon-Tucker, LoHa, LoKr) and DoRA, in float32.

Every function here is pure tensor math: no model, key or file knowledge. The ``*_delta``
functions return the *unscaled* delta shaped like the target weight; the caller multiplies it
by ``strength * scale`` with ``scale`` by the rules below (``Module.scale`` in :mod:`.model`).

Scale rules (LyCORIS, kohya sd-scripts and ComfyUI agree unless noted):

* LoRA / LoCon: ``alpha / rank`` with ``rank = lora_down.shape[0]``.
* LoHa: ``alpha / rank`` with ``rank = hada_w1_b.shape[0]``.
* LoKr: ``alpha / rank`` with the rank of a factored side (``lokr_w1_b`` or ``lokr_w2_b``
  row count); ``1.0`` when neither side is factored (both ``lokr_w1`` and ``lokr_w2`` full).
* A missing ``alpha`` means scale ``1.0`` everywhere. An explicit ``alpha == 0`` differs:
  LyCORIS and kohya treat it as ``alpha = rank`` (scale 1), ComfyUI uses ``0 / rank`` (scale 0);
  we follow ComfyUI.

See ``docs/formats-notes.md`` for tensor layouts, key names and tool differences.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = [
    "dora_apply",
    "locon_delta",
    "loha_delta",
    "lokr_delta",
    "lokr_rank",
    "tucker_rebuild",
]

Shape = torch.Size | Sequence[int]


def _f32(t: Tensor) -> Tensor:
    return t.to(torch.float32)


def tucker_rebuild(core: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """Rebuild a full kernel from a Tucker core and two factor matrices.

    ``core`` is ``[r1, r2, *k]``, ``a`` is ``[r1, out]`` and ``b`` is ``[r2, in]``; the result is
    ``[out, in, *k]`` with ``W[o, i, ...] = sum_{p, q} core[p, q, ...] * a[p, o] * b[q, i]``.
    This is the layout LoHa (``hada_t*`` with ``hada_w*_a`` as ``[r, out]``) and LoKr
    (``lokr_t2`` with ``lokr_w2_a`` as ``[r, out]``) files use in Tucker mode.
    """
    core32, a32, b32 = _f32(core), _f32(a.flatten(1)), _f32(b.flatten(1))
    r1, r2 = core32.shape[:2]
    k = core32.shape[2:]
    # contract the second core mode with b, then the first with a
    t = (core32.movedim(1, -1).reshape(-1, r2) @ b32)  # [r1 * k, in]
    t = t.reshape(r1, *k, b32.shape[1]).movedim(-1, 1)  # [r1, in, *k]
    w = a32.t() @ t.reshape(r1, -1)  # [out, in * k]
    return w.reshape(a32.shape[1], b32.shape[1], *k)


def locon_delta(up: Tensor, down: Tensor, mid: Tensor | None, shape: Shape) -> Tensor:
    """Unscaled LoCon delta ``up @ (mid) @ down`` shaped like the target weight.

    Without ``mid``: ``up`` is ``[out, r(, 1, 1)]`` and ``down`` is ``[r, in(, kh, kw)]`` (the
    down conv carries the kernel). With ``mid`` (``lora_mid.weight``, ``[r, r, kh, kw]``),
    ``down`` is a 1x1 conv ``[r, in, 1, 1]``, and the module is conv1x1(down) -> convkxk(mid) ->
    conv1x1(up), i.e. ``W[o, i] = sum_{p, q} up[o, p] * mid[p, q] * down[q, i]``.
    """
    up2 = _f32(up.flatten(1))
    if mid is None:
        return (up2 @ _f32(down.flatten(1))).reshape(shape)
    return tucker_rebuild(mid, up2.t(), down.flatten(1)).reshape(shape)


def _hada_factor(w_a: Tensor, w_b: Tensor, t: Tensor | None) -> Tensor:
    if t is None:
        return _f32(w_a.flatten(1)) @ _f32(w_b.flatten(1))
    return tucker_rebuild(t, w_a, w_b)


def loha_delta(
    w1a: Tensor,
    w1b: Tensor,
    w2a: Tensor,
    w2b: Tensor,
    t1: Tensor | None = None,
    t2: Tensor | None = None,
    *,
    shape: Shape,
) -> Tensor:
    """Unscaled LoHa delta ``(w1a @ w1b) * (w2a @ w2b)`` (Hadamard product) shaped like the weight.

    Plain mode: ``hada_w*_a`` is ``[out, r]``, ``hada_w*_b`` is ``[r, in * kh * kw]``.
    Tucker mode (``hada_t1``/``hada_t2`` ``[r, r, kh, kw]`` present): ``hada_w*_a`` is ``[r, out]``
    and ``hada_w*_b`` is ``[r, in]``, each factor rebuilt with :func:`tucker_rebuild`.
    ``t1`` and ``t2`` must both be given or both be omitted.
    """
    if (t1 is None) != (t2 is None):
        raise ValueError("LoHa Tucker needs both hada_t1 and hada_t2")
    m1 = _hada_factor(w1a, w1b, t1)
    m2 = _hada_factor(w2a, w2b, t2)
    return (m1 * m2).reshape(shape)


def _lokr_w1(w1: Tensor | None, w1a: Tensor | None, w1b: Tensor | None) -> Tensor:
    if w1 is not None:
        return _f32(w1)
    if w1a is None or w1b is None:
        raise ValueError("LoKr needs lokr_w1 or both lokr_w1_a and lokr_w1_b")
    return _f32(w1a) @ _f32(w1b)


def _lokr_w2(w2: Tensor | None, w2a: Tensor | None, w2b: Tensor | None, t2: Tensor | None) -> Tensor:
    if w2 is not None:
        return _f32(w2)
    if w2a is None or w2b is None:
        raise ValueError("LoKr needs lokr_w2 or both lokr_w2_a and lokr_w2_b")
    if t2 is not None:
        return tucker_rebuild(t2, w2a, w2b)
    return _f32(w2a) @ _f32(w2b.flatten(1))


def lokr_delta(
    w1: Tensor | None = None,
    w1a: Tensor | None = None,
    w1b: Tensor | None = None,
    w2: Tensor | None = None,
    w2a: Tensor | None = None,
    w2b: Tensor | None = None,
    t2: Tensor | None = None,
    *,
    shape: Shape,
) -> Tensor:
    """Unscaled LoKr delta ``kron(W1, W2)`` shaped like the target weight.

    ``W1`` is ``lokr_w1`` ``[a, c]`` or ``lokr_w1_a @ lokr_w1_b`` (``[a, r] @ [r, c]``). ``W2`` is
    ``lokr_w2`` (``[b, d]`` or, for conv, ``[b, d, kh, kw]``), or ``lokr_w2_a @ lokr_w2_b`` with
    ``[b, r] @ [r, d(*kh*kw)]``, or in Tucker mode (``lokr_t2`` ``[r, r, kh, kw]``) the rebuild of
    ``lokr_w2_a`` ``[r, b]`` and ``lokr_w2_b`` ``[r, d]``. The weight is ``[a*b, c*d(, kh, kw)]``:
    ``W[i*b + p, j*d + q, ...] = W1[i, j] * W2[p, q, ...]``. A 2-D ``W2`` holding a flattened
    kernel gives the same numbers, so both are reshaped to ``shape``.
    """
    m1 = _lokr_w1(w1, w1a, w1b)
    m2 = _lokr_w2(w2, w2a, w2b, t2)
    m1 = m1.reshape(*m1.shape, *([1] * (m2.dim() - m1.dim())))
    return torch.kron(m1, m2).reshape(shape)


def lokr_rank(
    w1b: Tensor | None = None,
    w2b: Tensor | None = None,
) -> int | None:
    """Rank used for a LoKr scale: rows of ``lokr_w2_b`` if W2 is factored, else of ``lokr_w1_b``.

    ``None`` when neither side is factored (scale is then 1.0 regardless of alpha). When both
    sides are factored LyCORIS files share one rank; if they ever differ, ComfyUI lets the W2 side
    win (as here) while LyCORIS' loader takes the W1 side.
    """
    if w2b is not None:
        return int(w2b.shape[0])
    if w1b is not None:
        return int(w1b.shape[0])
    return None


def _as_column_scale(dora_scale: Tensor, weight: Tensor) -> tuple[Tensor, bool]:
    """Return ``dora_scale`` broadcastable to ``weight`` and whether it is on the output axis."""
    m = _f32(dora_scale)
    if m.dim() == 1:  # PEFT-style magnitude vector [out]
        m = m.reshape(-1, *([1] * (weight.dim() - 1)))
    on_out = m.shape[0] == weight.shape[0]
    if on_out:
        return m.reshape(weight.shape[0], *([1] * (weight.dim() - 1))), True
    return m.reshape(1, weight.shape[1], *([1] * (weight.dim() - 2))), False


def _row_norm(w: Tensor) -> Tensor:
    """L2 norm per output channel (over input and kernel), shaped ``[out, 1, ...]``."""
    return w.flatten(1).norm(dim=1).reshape(w.shape[0], *([1] * (w.dim() - 1)))


def _col_norm(w: Tensor) -> Tensor:
    """L2 norm per input channel (over output and kernel), shaped ``[1, in, 1, ...]``."""
    n = w.transpose(0, 1).flatten(1).norm(dim=1)
    return n.reshape(1, w.shape[1], *([1] * (w.dim() - 2)))


def dora_apply(
    weight: Tensor,
    delta: Tensor,
    dora_scale: Tensor,
    strength: float = 1.0,
) -> Tensor:
    """The new weight for a DoRA adapter, as ComfyUI computes it (float32).

    ``delta`` is the adapter delta already multiplied by ``alpha / rank`` but *not* by strength.
    With ``W' = weight + delta`` and ``m = dora_scale``:

    * ``dora_scale`` ``[1, in, ...]`` (LyCORIS default, wd on input): ``D = W' * m / (||W'||_col + eps)``
      with the norm per input channel of the *updated* weight.
    * ``dora_scale`` ``[out, 1, ...]`` (or 1-D ``[out]``; LyCORIS ``wd_on_out``):
      ``D = W' * m / (||W||_row + eps)`` with the norm per output channel of the *original*
      weight -- ComfyUI's current behaviour (LyCORIS, PEFT and the DoRA paper use ``||W'||_row``).

    The result is ``weight + strength * (D - weight)`` (exactly ``D`` at strength 1), so strength 0
    leaves the weight unchanged. ``eps`` is ``torch.finfo(float32).eps``, added to the norm.
    Which axis is meant is decided like ComfyUI: ``dora_scale.shape[0] == weight.shape[0]``.
    """
    w = _f32(weight)
    eps = torch.finfo(torch.float32).eps
    updated = w + _f32(delta).reshape(w.shape)
    m, on_out = _as_column_scale(dora_scale, w)
    norm = _row_norm(w) if on_out else _col_norm(updated)
    decomposed = updated * (m / (norm + eps))
    if strength == 1.0:
        return decomposed
    return w + strength * (decomposed - w)
