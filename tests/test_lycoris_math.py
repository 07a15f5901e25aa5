"""LyCORIS-family deltas and DoRA checked against independent float64 computations."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from lora_nodes.lora.lycoris import (
    dora_apply,
    locon_delta,
    loha_delta,
    lokr_delta,
    lokr_rank,
    tucker_rebuild,
)

TOL = 1e-5


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    got64, ref64 = got.double(), ref.double()
    return float((got64 - ref64).norm() / ref64.norm().clamp_min(1e-30))


@pytest.fixture
def gen() -> torch.Generator:
    return torch.Generator().manual_seed(1234)


def rnd(gen: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=gen, dtype=torch.float32)


# ---------------------------------------------------------------- Tucker / LoCon


def test_tucker_rebuild_matches_index_sum(gen):
    core, a, b = rnd(gen, 3, 4, 3, 3), rnd(gen, 3, 5), rnd(gen, 4, 6)
    ref = torch.zeros(5, 6, 3, 3, dtype=torch.float64)
    for p in range(3):
        for q in range(4):
            ref += core[p, q].double() * torch.outer(a[p].double(), b[q].double())[:, :, None, None]
    got = tucker_rebuild(core, a, b)
    assert got.dtype == torch.float32 and got.shape == (5, 6, 3, 3)
    assert rel_err(got, ref) < TOL


def test_locon_linear(gen):
    up, down = rnd(gen, 7, 3), rnd(gen, 3, 9)
    ref = torch.einsum("or,ri->oi", up.double(), down.double())
    assert rel_err(locon_delta(up, down, None, (7, 9)), ref) < TOL


def test_locon_conv_without_mid_as_layers(gen):
    down, up = rnd(gen, 4, 5, 3, 3), rnd(gen, 6, 4, 1, 1)
    x = rnd(gen, 2, 5, 8, 8).double()
    ref = F.conv2d(F.conv2d(x, down.double(), padding=1), up.double())
    delta = locon_delta(up, down, None, (6, 5, 3, 3))
    assert rel_err(F.conv2d(x, delta.double(), padding=1), ref) < TOL


def test_locon_conv_with_mid_as_layers(gen):
    down, mid, up = rnd(gen, 4, 5, 1, 1), rnd(gen, 4, 4, 3, 3), rnd(gen, 6, 4, 1, 1)
    x = rnd(gen, 2, 5, 8, 8).double()
    ref = F.conv2d(F.conv2d(F.conv2d(x, down.double()), mid.double(), padding=1), up.double())
    delta = locon_delta(up, down, mid, (6, 5, 3, 3))
    assert delta.shape == (6, 5, 3, 3)
    assert rel_err(F.conv2d(x, delta.double(), padding=1), ref) < TOL


# ---------------------------------------------------------------- LoHa


def test_loha_linear(gen):
    w1a, w1b, w2a, w2b = rnd(gen, 6, 2), rnd(gen, 2, 5), rnd(gen, 6, 2), rnd(gen, 2, 5)
    ref = torch.empty(6, 5, dtype=torch.float64)
    for o in range(6):
        for i in range(5):
            m1 = sum(w1a[o, r].double() * w1b[r, i].double() for r in range(2))
            m2 = sum(w2a[o, r].double() * w2b[r, i].double() for r in range(2))
            ref[o, i] = m1 * m2
    assert rel_err(loha_delta(w1a, w1b, w2a, w2b, shape=(6, 5)), ref) < TOL


def test_loha_conv_flattened(gen):
    w1a, w1b = rnd(gen, 6, 3), rnd(gen, 3, 4 * 9)
    w2a, w2b = rnd(gen, 6, 3), rnd(gen, 3, 4 * 9)
    m1 = torch.einsum("or,rk->ok", w1a.double(), w1b.double())
    m2 = torch.einsum("or,rk->ok", w2a.double(), w2b.double())
    ref = (m1 * m2).reshape(6, 4, 3, 3)
    assert rel_err(loha_delta(w1a, w1b, w2a, w2b, shape=(6, 4, 3, 3)), ref) < TOL


def _tucker_as_layers(t: torch.Tensor, wa: torch.Tensor, wb: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """conv1x1(wb) -> convkxk(t) -> conv1x1(wa^T): the module structure of a Tucker factor."""
    h = F.conv2d(x, wb.double()[:, :, None, None])
    h = F.conv2d(h, t.double(), padding=1)
    return F.conv2d(h, wa.double().t()[:, :, None, None])


def test_loha_conv_tucker(gen):
    t1, w1a, w1b = rnd(gen, 3, 3, 3, 3), rnd(gen, 3, 6), rnd(gen, 3, 4)
    t2, w2a, w2b = rnd(gen, 3, 3, 3, 3), rnd(gen, 3, 6), rnd(gen, 3, 4)
    m1 = torch.einsum("pqhw,po,qi->oihw", t1.double(), w1a.double(), w1b.double())
    m2 = torch.einsum("pqhw,po,qi->oihw", t2.double(), w2a.double(), w2b.double())
    got = loha_delta(w1a, w1b, w2a, w2b, t1, t2, shape=(6, 4, 3, 3))
    assert rel_err(got, m1 * m2) < TOL
    # each Tucker factor equals its three-conv composite
    x = rnd(gen, 1, 4, 7, 7).double()
    assert rel_err(F.conv2d(x, m1, padding=1), _tucker_as_layers(t1, w1a, w1b, x)) < TOL


def test_loha_tucker_needs_both_cores(gen):
    with pytest.raises(ValueError):
        loha_delta(rnd(gen, 2, 3), rnd(gen, 2, 3), rnd(gen, 2, 3), rnd(gen, 2, 3), rnd(gen, 2, 2, 3, 3),
                   shape=(3, 3, 3, 3))


# ---------------------------------------------------------------- LoKr


def _kron_ref(m1: torch.Tensor, m2: torch.Tensor) -> torch.Tensor:
    """Kronecker product by explicit index placement (float64)."""
    a, c = m1.shape
    b, d = m2.shape[:2]
    k = m2.shape[2:]
    out = torch.zeros(a * b, c * d, *k, dtype=torch.float64)
    for i in range(a):
        for j in range(c):
            out[i * b:(i + 1) * b, j * d:(j + 1) * d] = m1[i, j] * m2
    return out


def _lokr_case(gen, conv: bool, w1_mode: str, w2_mode: str):
    a, c, b, d, r = 2, 3, 4, 5, 2
    k = (3, 3) if conv else ()
    kk = 9 if conv else 1
    parts: dict[str, torch.Tensor] = {}
    if w1_mode == "full":
        parts["w1"] = rnd(gen, a, c)
        m1 = parts["w1"].double()
    else:
        parts["w1a"], parts["w1b"] = rnd(gen, a, r), rnd(gen, r, c)
        m1 = parts["w1a"].double() @ parts["w1b"].double()
    if w2_mode == "full":
        parts["w2"] = rnd(gen, b, d, *k)
        m2 = parts["w2"].double()
    elif w2_mode == "lora":
        parts["w2a"], parts["w2b"] = rnd(gen, b, r), rnd(gen, r, d * kk)
        m2 = (parts["w2a"].double() @ parts["w2b"].double()).reshape(b, d, *k)
    else:  # tucker
        parts["t2"], parts["w2a"], parts["w2b"] = rnd(gen, r, r, *k), rnd(gen, r, b), rnd(gen, r, d)
        m2 = torch.einsum("pq...,pb,qd->bd...", parts["t2"].double(), parts["w2a"].double(),
                          parts["w2b"].double())
    return parts, _kron_ref(m1, m2), (a * b, c * d, *k)


LOKR_CASES = [
    (conv, w1, w2)
    for conv, w1, w2 in itertools.product((False, True), ("full", "lora"), ("full", "lora", "tucker"))
    if conv or w2 != "tucker"
]


@pytest.mark.parametrize("conv,w1_mode,w2_mode", LOKR_CASES)
def test_lokr_every_combination(gen, conv, w1_mode, w2_mode):
    parts, ref, shape = _lokr_case(gen, conv, w1_mode, w2_mode)
    got = lokr_delta(**parts, shape=shape)
    assert got.shape == shape and got.dtype == torch.float32
    assert rel_err(got, ref) < TOL


def test_lokr_linear_on_input_matches_grouped_application(gen):
    """kron(W1, W2) @ x equals reshaping x to [c, d], applying W2 then W1 (LyCORIS bypass idea)."""
    w1, w2a, w2b = rnd(gen, 2, 3), rnd(gen, 4, 2), rnd(gen, 2, 5)
    x = rnd(gen, 7, 15).double()
    h = x.reshape(7, 3, 5) @ (w2a.double() @ w2b.double()).t()  # [n, c, b]
    ref = torch.einsum("ac,ncb->nab", w1.double(), h).reshape(7, 8)
    got = lokr_delta(w1=w1, w2a=w2a, w2b=w2b, shape=(8, 15))
    assert rel_err(x @ got.double().t(), ref) < TOL


def test_lokr_missing_side_raises(gen):
    with pytest.raises(ValueError):
        lokr_delta(w1=rnd(gen, 2, 2), shape=(4, 4))


def test_lokr_rank(gen):
    w1b, w2b = rnd(gen, 3, 4), rnd(gen, 5, 6)
    assert lokr_rank() is None
    assert lokr_rank(w1b=w1b) == 3
    assert lokr_rank(w2b=w2b) == 5
    assert lokr_rank(w1b=w1b, w2b=w2b) == 5  # ComfyUI: W2 side wins


# ---------------------------------------------------------------- DoRA


def _dora_ref(w, delta, m, strength, axis_out):
    """Per-channel loops in float64, following ComfyUI's weight_decompose."""
    w, delta, m = w.double(), delta.double(), m.double().flatten()
    eps = torch.finfo(torch.float32).eps
    upd = w + delta
    out = upd.clone()
    if axis_out:
        for o in range(w.shape[0]):
            out[o] = upd[o] * m[o] / (torch.sqrt((w[o] ** 2).sum()) + eps)
    else:
        for i in range(w.shape[1]):
            out[:, i] = upd[:, i] * m[i] / (torch.sqrt((upd[:, i] ** 2).sum()) + eps)
    return w + strength * (out - w)


DORA_CASES = list(itertools.product(((6, 5), (6, 5, 3, 3)), (True, False), (1.0, 0.5)))


@pytest.mark.parametrize("shape,axis_out,strength", DORA_CASES)
def test_dora_apply_comfyui(gen, shape, axis_out, strength):
    w, delta = rnd(gen, *shape), 0.3 * rnd(gen, *shape)
    tail = [1] * (len(shape) - 2)
    m_shape = (shape[0], 1, *tail) if axis_out else (1, shape[1], *tail)
    m = rnd(gen, *m_shape).abs() + 0.5
    got = dora_apply(w, delta, m, strength)
    assert got.dtype == torch.float32 and got.shape == w.shape
    assert rel_err(got, _dora_ref(w, delta, m, strength, axis_out)) < TOL


@pytest.mark.parametrize("strength", (1.0, 0.5))
def test_dora_1d_scale_is_on_the_output_axis(gen, strength):
    w, delta = rnd(gen, 6, 5), 0.3 * rnd(gen, 6, 5)
    m = rnd(gen, 6).abs() + 0.5
    assert rel_err(dora_apply(w, delta, m, strength), _dora_ref(w, delta, m, strength, True)) < TOL
    assert rel_err(dora_apply(w, delta, m.reshape(6, 1), strength), _dora_ref(w, delta, m, strength, True)) < TOL


def test_dora_strength_zero_is_identity(gen):
    w, delta = rnd(gen, 4, 3, 3, 3), rnd(gen, 4, 3, 3, 3)
    m = rnd(gen, 1, 3, 1, 1).abs()
    assert torch.equal(dora_apply(w, delta, m, 0.0), w)
