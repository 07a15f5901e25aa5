"""MergeLoRAs, ResizeLoRA and ExtractLoRA: results checked by applying them to the model."""

import pytest
import torch

from lora_nodes.engine.context import NodeContext
from lora_nodes.engine.events import Collector
from lora_nodes.errors import LoRAError
from lora_nodes.lora.files import read_lora
from lora_nodes.lora.recipe import AppliedLoRA, ModelRecipe
from lora_nodes.nodes.merge import extract_lora, merge_loras, resize_lora


def ctx():
    return NodeContext("n", "T", None, None, Collector())


def weights_of(recipe):
    plan = recipe.patch_plan()
    return {t: recipe.weight(t, plan) for t in recipe.base.lora_targets}


def max_rel_err(a, b):
    return max(((a[t] - b[t]).norm() / b[t].norm()).item() for t in a)


@pytest.fixture
def stack(tiny, write_lora):
    a = read_lora(write_lora("a", rank=4, alpha=2.0, seed=41))
    b = read_lora(write_lora("b", fmt="peft", rank=2, seed=42))
    return (AppliedLoRA(a, 0.7, 0.3), AppliedLoRA(b, -0.5, 1.2))


def test_concat_merge_applies_exactly_like_the_stack(tiny, stack):
    lora, report = merge_loras.run(ctx(), stack, "concat", 0, 0.5, 0, ModelRecipe(tiny))
    assert "energy kept min 1.0000" in report
    assert {m.rank for m in lora.modules.values()} == {6}
    merged = weights_of(ModelRecipe(tiny, (AppliedLoRA(lora, 1.0, 1.0),)))
    assert max_rel_err(merged, weights_of(ModelRecipe(tiny, stack))) < 1e-5


def test_merging_mixed_namings_needs_the_model(stack):
    with pytest.raises(LoRAError, match="connect the 'model' input"):  # merged by key, half would never apply
        merge_loras.run(ctx(), stack, "concat", 0, 0.5, 0, None)


def test_svd_merge_at_lower_rank_reports_energy(tiny, stack):
    events = Collector()
    context = NodeContext("m", "MergeLoRAs", None, None, events)
    lora, _ = merge_loras.run(context, stack, "svd", 3, 0.5, 0, ModelRecipe(tiny))
    assert {m.rank for m in lora.modules.values()} == {3}
    kept = events.of("info")[0]["energy_kept"]
    assert all(0.5 < e < 1.0 for e in kept.values())
    full, _ = merge_loras.run(ctx(), stack, "svd", 6, 0.5, 0, ModelRecipe(tiny))
    exact = weights_of(ModelRecipe(tiny, stack))
    assert max_rel_err(weights_of(ModelRecipe(tiny, (AppliedLoRA(full, 1.0, 1.0),))), exact) < 1e-4


@pytest.mark.parametrize("method", ["ties", "dare_linear", "dare_ties"])
def test_ties_and_dare_merges_run_and_change_the_model(tiny, stack, method):
    lora, _ = merge_loras.run(ctx(), stack, method, 0, 0.5, 7, ModelRecipe(tiny))
    merged = weights_of(ModelRecipe(tiny, (AppliedLoRA(lora, 1.0, 1.0),)))
    base = weights_of(ModelRecipe(tiny))
    assert max_rel_err(merged, base) > 1e-3
    again, _ = merge_loras.run(ctx(), stack, method, 0, 0.5, 7, ModelRecipe(tiny))
    key = next(iter(lora.modules))
    assert torch.equal(lora.modules[key].diff, again.modules[key].diff)  # same seed, same result


def test_resize_to_fixed_rank_and_by_frobenius(tiny, write_lora):
    lora = read_lora(write_lora("big", rank=8, seed=43))
    smaller, report = resize_lora.run(ctx(), lora, 4, "fixed", 0.9)
    assert {m.rank for m in smaller.modules.values()} == {4} and "rank 8 -> 4" in report
    same, _ = resize_lora.run(ctx(), lora, 8, "fixed", 0.9)
    exact = weights_of(ModelRecipe(tiny, (AppliedLoRA(lora, 1.0, 1.0),)))
    assert max_rel_err(weights_of(ModelRecipe(tiny, (AppliedLoRA(same, 1.0, 1.0),))), exact) < 1e-5
    dynamic, _ = resize_lora.run(ctx(), lora, 0, "sv_fro", 0.5)
    assert max(m.rank for m in dynamic.modules.values()) < 8
    with pytest.raises(LoRAError, match="needs a rank"):
        resize_lora.run(ctx(), lora, 0, "fixed", 0.9)


def test_extract_recovers_a_lora_from_two_models(tiny, write_lora):
    lora = read_lora(write_lora("src", rank=4, seed=44))
    target = ModelRecipe(tiny, (AppliedLoRA(lora, 1.0, 1.0),))
    extracted, report = extract_lora.run(ctx(), ModelRecipe(tiny), target, 4, 0, 1e-6)
    assert {t.split(".")[0] for t in extracted.modules} == {"unet", "text_encoder"}
    assert "energy kept min 1.0000" in report
    rebuilt = weights_of(ModelRecipe(tiny, (AppliedLoRA(extracted, 1.0, 1.0),)))
    assert max_rel_err(rebuilt, weights_of(target)) < 1e-5
    with pytest.raises(LoRAError, match="do not differ"):
        extract_lora.run(ctx(), ModelRecipe(tiny), ModelRecipe(tiny), 4, 0, 1e-6)


def test_merge_and_extract_on_sdxl(tiny_sdxl, write_lora):
    a = read_lora(write_lora("xa", base=tiny_sdxl, rank=4, seed=45))
    b = read_lora(write_lora("xb", base=tiny_sdxl, fmt="peft", rank=2, seed=46))
    stack = (AppliedLoRA(a, 0.5, 1.0), AppliedLoRA(b, 1.0, -0.5))
    merged, _ = merge_loras.run(ctx(), stack, "concat", 0, 0.5, 0, ModelRecipe(tiny_sdxl))
    exact = weights_of(ModelRecipe(tiny_sdxl, stack))
    assert max_rel_err(weights_of(ModelRecipe(tiny_sdxl, (AppliedLoRA(merged, 1.0, 1.0),))), exact) < 1e-5
    extracted, _ = extract_lora.run(ctx(), ModelRecipe(tiny_sdxl), ModelRecipe(tiny_sdxl, stack), 6, 0, 1e-6)
    assert {t.split(".")[0] for t in extracted.modules} == {"unet", "text_encoder", "text_encoder_2"}
    rebuilt = weights_of(ModelRecipe(tiny_sdxl, (AppliedLoRA(extracted, 1.0, 1.0),)))
    assert max_rel_err(rebuilt, exact) < 1e-4
