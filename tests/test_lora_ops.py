"""lora_nodes.lora.ops against definitions recomputed here in float64 (and PEFT's merge_utils when present)."""

from __future__ import annotations

import pytest
import torch

from lora_nodes.lora.ops import (
    LowRank,
    concat,
    dare_linear,
    dare_ties,
    extract,
    resize,
    svd_lowrank,
    svd_merge,
    ties,
)

try:
    from peft.utils import merge_utils as peft_merge
except ImportError:  # pragma: no cover - peft is a dependency, but keep the tests usable without it
    peft_merge = None

needs_peft = pytest.mark.skipif(peft_merge is None, reason="peft not importable")


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def rand_lora(out: int, inn: int, rank: int, alpha: float, seed: int, kernel: tuple[int, int] | None = None):
    g = gen(seed)
    if kernel is None:
        return LowRank(torch.randn(out, rank, generator=g), torch.randn(rank, inn, generator=g), alpha)
    return LowRank(torch.randn(out, rank, 1, 1, generator=g), torch.randn(rank, inn, *kernel, generator=g), alpha)


def ref_delta(lora: LowRank) -> torch.Tensor:
    """float64 delta straight from the definition."""
    r = lora.down.shape[0]
    mat = (lora.alpha / r) * lora.up.double().reshape(lora.up.shape[0], r) @ lora.down.double().reshape(r, -1)
    return mat.reshape(lora.up.shape[0], *lora.down.shape[1:])


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def weighted_sum(parts) -> torch.Tensor:
    return sum(w * ref_delta(lr) for lr, w in parts)


# ---------------------------------------------------------------- concat


@pytest.mark.parametrize("kernel", [None, (3, 3), (1, 1)])
def test_concat_is_the_exact_weighted_sum(kernel):
    parts = [(rand_lora(24, 16, 4, 2.0, 1, kernel), 0.7), (rand_lora(24, 16, 8, 8.0, 2, kernel), -1.3),
             (rand_lora(24, 16, 2, 1.0, 3, kernel), 0.25)]
    merged = concat(parts)
    assert merged.rank == 14 and merged.alpha == 14.0 and merged.scale == 1.0
    assert merged.shape == parts[0][0].shape
    assert rel(merged.delta(), weighted_sum(parts)) < 1e-5


def test_concat_mixes_linear_and_1x1_but_rejects_kernel_mismatch():
    lin = rand_lora(8, 6, 2, 2.0, 4)
    one = rand_lora(8, 6, 3, 3.0, 5, (1, 1))
    merged = concat([(lin, 1.0), (one, 0.5)])
    expected = ref_delta(lin) + 0.5 * ref_delta(one).reshape(8, 6)
    assert rel(merged.delta((8, 6)), expected) < 1e-5
    with pytest.raises(ValueError, match="kernel"):
        concat([(rand_lora(8, 6, 2, 2.0, 6, (3, 3)), 1.0), (one, 1.0)])
    with pytest.raises(ValueError, match="shape"):
        concat([(lin, 1.0), (rand_lora(8, 7, 2, 2.0, 7), 1.0)])


# ---------------------------------------------------------------- SVD


@pytest.mark.parametrize("kernel", [None, (3, 3)])
def test_svd_merge_full_rank_is_exact_and_truncation_is_eckart_young(kernel):
    parts = [(rand_lora(20, 12, 3, 3.0, 10, kernel), 1.0), (rand_lora(20, 12, 5, 2.5, 11, kernel), -0.6)]
    total = weighted_sum(parts)
    full, energy = svd_merge(parts, rank=8)
    assert full.rank == 8 and full.scale == 1.0
    assert rel(full.delta(), total) < 1e-5 and energy == pytest.approx(1.0, abs=1e-9)
    s = torch.linalg.svdvals(total.reshape(20, -1))
    for k in (1, 3, 5):
        low, energy = svd_merge(parts, rank=k)
        assert low.rank == k and tuple(low.down.shape[1:]) == tuple(total.shape[1:])
        err = float((low.delta().double() - total).norm())
        assert err == pytest.approx(float(s[k:].pow(2).sum().sqrt()), rel=1e-4)
        assert energy == pytest.approx(float(s[:k].pow(2).sum() / s.pow(2).sum()), rel=1e-5)


def test_svd_lowrank_clips_rank_and_balances_factors():
    g = gen(20)
    lin = torch.randn(5, 9, generator=g)
    lora, energy = svd_lowrank(lin, rank=64)
    assert lora.rank == 5 and energy == pytest.approx(1.0, abs=1e-6)
    assert rel(lora.delta(), lin) < 1e-5
    # sqrt(s) split: column norms of up equal row norms of down
    assert torch.allclose(lora.up.norm(dim=0), lora.down.norm(dim=1), rtol=1e-4)
    conv = torch.randn(6, 4, 3, 3, generator=g)
    lora, _ = svd_lowrank(conv, rank=5)
    assert lora.rank == 5 and lora.up.shape == (6, 5, 1, 1) and lora.down.shape == (5, 4, 3, 3)
    again, _ = svd_lowrank(conv, rank=3)
    assert torch.equal(again.up, svd_lowrank(conv, rank=3)[0].up)  # deterministic
    with pytest.raises(ValueError):
        svd_lowrank(lin, rank=0)


# ---------------------------------------------------------------- resize


def known_spectrum_lora(s: list[float], out: int = 40, inn: int = 30, alpha: float = 3.0) -> LowRank:
    """A LoRA whose delta has exactly the singular values ``s`` (scale folded back out of ``up``)."""
    r = len(s)
    qu, _ = torch.linalg.qr(torch.randn(out, r, generator=gen(30), dtype=torch.float64))
    qd, _ = torch.linalg.qr(torch.randn(inn, r, generator=gen(31), dtype=torch.float64))
    scale = alpha / r
    up = qu * torch.tensor(s, dtype=torch.float64) / scale
    return LowRank(up.float(), qd.T.contiguous().float(), alpha)


SPECTRUM = [8.0, 4.0, 2.0, 1.0, 0.5, 0.25]


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({"rank": 4}, 4),
        ({"rank": 10}, 6),  # cannot grow past the information there is
        ({"fro": 0.9}, 2),  # norm fractions: .866 .968 .992 .998 .9996 1
        ({"fro": 0.99}, 3),
        ({"fro": 0.999}, 5),
        ({"fro": 0.999, "rank": 3}, 3),  # rank caps dynamic methods
        ({"ratio": 3.0}, 2),  # keep s >= 8/3
        ({"ratio": 10.0}, 4),
        ({"ratio": 1000.0}, 6),
        ({"ratio": 1000.0, "rank": 2}, 2),
    ],
)
def test_resize_picks_ranks_like_kohya(kwargs, expected):
    lora = known_spectrum_lora(SPECTRUM)
    s_true = torch.linalg.svdvals(ref_delta(lora))
    assert torch.allclose(s_true[:6], torch.tensor(SPECTRUM, dtype=torch.float64)) and float(s_true[6]) < 1e-5
    new, info = resize(lora, **kwargs)
    assert info["rank"] == new.rank == expected
    assert new.scale == pytest.approx(lora.scale)  # kohya keeps the scale: alpha = scale * new_rank
    s = torch.tensor(SPECTRUM, dtype=torch.float64)
    kept = float(s[:expected].pow(2).sum() / s.pow(2).sum())
    assert info["energy_kept"] == pytest.approx(kept, rel=1e-5)
    assert info["fro_kept"] == pytest.approx(kept**0.5, rel=1e-5)
    actual = rel(new.delta(), ref_delta(lora)) if expected < 6 else 0.0
    assert info["rel_error"] == pytest.approx(actual, abs=2e-5)


def test_resize_never_forms_the_full_delta():
    # a full delta of this shape would need 40 GB of float32; the factored path needs a few MB
    big = rand_lora(100_000, 100_000, 8, 8.0, 40)
    block = ref_delta(LowRank(big.up[:50], big.down[:, :60], big.alpha))
    same, info = resize(big, rank=8)
    assert info["rel_error"] < 1e-5
    assert rel(LowRank(same.up[:50], same.down[:, :60], same.alpha).delta(), block) < 1e-4
    low, info = resize(big, rank=3)
    assert low.up.shape == (100_000, 3) and low.down.shape == (3, 100_000) and info["energy_kept"] < 1.0
    merged, energy = svd_merge([(big, 1.0), (big, 1.0)], rank=8)
    assert merged.rank == 8 and energy == pytest.approx(1.0, abs=1e-5)
    assert rel(LowRank(merged.up[:50], merged.down[:, :60], merged.alpha).delta(), 2 * block) < 1e-4


def test_resize_conv_zero_and_errors():
    conv = rand_lora(10, 4, 6, 3.0, 50, (3, 3))
    new, info = resize(conv, rank=6)
    assert new.up.shape == (10, 6, 1, 1) and new.down.shape == (6, 4, 3, 3)
    assert rel(new.delta(), ref_delta(conv)) < 1e-5 and info["rel_error"] < 1e-5
    zero = LowRank(torch.zeros(7, 3), torch.zeros(3, 5), 3.0)
    assert resize(zero, fro=0.9)[1]["rank"] == 1
    for bad in ({}, {"fro": 0.5, "ratio": 2.0}, {"fro": 1.5}, {"ratio": 0.5}, {"rank": 0}):
        with pytest.raises(ValueError):
            resize(conv, **bad)


# ---------------------------------------------------------------- TIES / DARE


def ref_ties_from_masks(deltas, weights, masks, density, method, rescale):
    """TIES-style merge per PEFT's description, in float64, given each part's keep-mask."""
    kept = torch.stack([d.double() * m / (density if rescale else 1.0) for d, m in zip(deltas, masks)])
    votes = kept.sum(0) if method == "total" else kept.sign().sum(0)
    elected = torch.where(votes >= 0, 1.0, -1.0).double()
    w = torch.tensor(weights, dtype=torch.float64).reshape(-1, *([1] * deltas[0].dim()))
    agree = (kept.sign() == elected).double()
    return (kept * w * agree).sum(0) / agree.sum(0).clamp(min=1.0)


def magnitude_mask(t: torch.Tensor, density: float) -> torch.Tensor:
    k = int(density * t.numel())
    order = t.abs().flatten().argsort(descending=True)
    mask = torch.zeros(t.numel(), dtype=torch.float64)
    mask[order[:k]] = 1.0
    return mask.reshape(t.shape)


def merge_parts(kernel=None):
    return [(rand_lora(12, 10, 3, 3.0, 60, kernel), 0.8), (rand_lora(12, 10, 2, 1.0, 61, kernel), 1.2),
            (rand_lora(12, 10, 4, 2.0, 62, kernel), -0.5)]


@pytest.mark.parametrize("method", ["total", "frequency"])
@pytest.mark.parametrize("kernel", [None, (3, 3)])
def test_ties_matches_the_definition(method, kernel):
    parts = merge_parts(kernel)
    deltas = [ref_delta(lr) for lr, _ in parts]
    weights = [w for _, w in parts]
    masks = [magnitude_mask(d, 0.3) for d in deltas]
    expected = ref_ties_from_masks(deltas, weights, masks, 0.3, method, rescale=False)
    got = ties(parts, 0.3, majority_sign_method=method)
    assert got.dtype == torch.float32 and got.shape == deltas[0].shape
    assert rel(got, expected) < 1e-5
    # full deltas are accepted as parts too, and density >= 1 prunes nothing
    assert torch.equal(ties([(lr.delta(), w) for lr, w in parts], 0.3, method), got)
    dense = ties(parts, 1.0, method)
    full_masks = [torch.ones_like(d) for d in deltas]
    assert rel(dense, ref_ties_from_masks(deltas, weights, full_masks, 1.0, method, rescale=False)) < 1e-5


@needs_peft
@pytest.mark.parametrize("method", ["total", "frequency"])
def test_ties_is_identical_to_peft(method):
    parts = merge_parts((3, 3))
    deltas = [lr.delta() for lr, _ in parts]
    weights = torch.tensor([w for _, w in parts])
    theirs = peft_merge.ties(deltas, weights, 0.4, majority_sign_method=method)
    assert torch.equal(ties(parts, 0.4, majority_sign_method=method), theirs)


def part_masks(parts, density, seed):
    """Recover the keep-mask drawn for each part: zero the other weights, same seed, same draws."""
    masks = []
    for i in range(len(parts)):
        solo = [(lr, 1.0 if j == i else 0.0) for j, (lr, _) in enumerate(parts)]
        masks.append((dare_linear(solo, density, seed) != 0).double())
    return masks


def test_dare_linear_is_random_pruning_with_rescale():
    parts = merge_parts()
    deltas = [ref_delta(lr) for lr, _ in parts]
    weights = [w for _, w in parts]
    got = dare_linear(parts, 0.5, seed=7)
    assert torch.equal(got, dare_linear(parts, 0.5, seed=7))
    assert not torch.equal(got, dare_linear(parts, 0.5, seed=8))
    masks = part_masks(parts, 0.5, 7)
    assert not torch.equal(masks[0], masks[1])
    expected = sum(w * d * m / 0.5 for d, w, m in zip(deltas, weights, masks))
    assert rel(got, expected) < 1e-5
    # statistics: keep rate ~ density, and the rescale makes the merge unbiased
    big = [(rand_lora(64, 64, 4, 4.0, 70), 1.0)]
    kept = float((part_masks(big, 0.3, 1)[0]).mean())
    assert abs(kept - 0.3) < 0.03
    mean = sum(dare_linear(big, 0.3, seed=s) for s in range(200)) / 200
    assert rel(mean, ref_delta(big[0][0])) < 0.15


@pytest.mark.parametrize("method", ["total", "frequency"])
def test_dare_ties_matches_the_definition(method):
    parts = merge_parts((3, 3))
    deltas = [ref_delta(lr) for lr, _ in parts]
    weights = [w for _, w in parts]
    masks = part_masks(parts, 0.4, 11)
    expected = ref_ties_from_masks(deltas, weights, masks, 0.4, method, rescale=True)
    assert rel(dare_ties(parts, 0.4, 11, majority_sign_method=method), expected) < 1e-5


@needs_peft
def test_dare_is_identical_to_peft_given_the_same_seed():
    # PEFT draws torch.bernoulli from the global CPU generator; ours uses a fresh Generator seeded the
    # same way, drawing the same tensors in the same order, so the masks coincide exactly
    parts = merge_parts()
    deltas = [lr.delta() for lr, _ in parts]
    weights = torch.tensor([w for _, w in parts])
    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(123)
        theirs_linear = peft_merge.dare_linear(deltas, weights, 0.35)
        torch.manual_seed(123)
        theirs_ties = peft_merge.dare_ties(deltas, weights, 0.35, majority_sign_method="total")
    finally:
        torch.random.set_rng_state(state)
    assert torch.equal(dare_linear(parts, 0.35, seed=123), theirs_linear)
    assert torch.equal(dare_ties(parts, 0.35, seed=123), theirs_ties)


def test_merges_reject_bad_input():
    with pytest.raises(ValueError):
        ties([], 0.5)
    with pytest.raises(ValueError):
        dare_linear(merge_parts(), -0.1, seed=0)
    with pytest.raises(ValueError):
        ties(merge_parts(), 0.5, majority_sign_method="mean")  # type: ignore[arg-type]


# ---------------------------------------------------------------- extract


@pytest.mark.parametrize("kernel", [None, (3, 3)])
def test_extract_recovers_an_exact_low_rank_difference(kernel):
    g = gen(80)
    diff = rand_lora(32, 16, 4, 4.0, 81, kernel)
    shape = diff.shape
    a = torch.randn(*shape, generator=g)
    b = (a.double() + ref_delta(diff)).float()
    lora, energy = extract(a, b, rank=4)
    assert lora.rank == 4 and lora.alpha == 4.0 and lora.shape == shape
    assert rel(lora.delta(), b.double() - a.double()) < 1e-5
    assert energy == pytest.approx(1.0, abs=1e-6)
    _, energy = extract(a, b, rank=2)
    s = torch.linalg.svdvals((b.double() - a.double()).reshape(32, -1))
    assert energy == pytest.approx(float(s[:2].pow(2).sum() / s.pow(2).sum()), rel=1e-5)
    with pytest.raises(ValueError):
        extract(a, b[:1], rank=2)
