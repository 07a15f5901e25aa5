"""Sampling: deterministic, and LoRAs change the picture only as much as their strength says."""

import pytest
import torch

from lora_nodes.engine.context import NodeContext
from lora_nodes.engine.events import Collector
from lora_nodes.errors import NodeError
from lora_nodes.families.sd1 import SD1
from lora_nodes.lora.files import read_lora
from lora_nodes.lora.recipe import AppliedLoRA, ModelRecipe, patcher_of
from lora_nodes.nodes.sample import sample


def draw(recipe, events=None, **overrides):
    ctx = NodeContext("s", "Sample", None, None, events or Collector())
    inputs = {"prompt": "a red circle", "negative_prompt": "", "seed": 3, "steps": 4, "cfg": 7.0,
              "sampler": "euler", "width": 0, "height": 0, "batch_size": 1}
    inputs.update(overrides)
    return sample.run(ctx, recipe, **inputs)[0]


def test_image_is_comfyui_shaped_and_deterministic(tiny):
    images = draw(ModelRecipe(tiny), batch_size=2, width=48, height=32)
    assert images.shape == (2, 32, 48, 3) and images.dtype == torch.float32
    assert 0.0 <= images.min() and images.max() <= 1.0
    assert torch.equal(draw(ModelRecipe(tiny), batch_size=2, width=48, height=32), images)
    assert not torch.equal(draw(ModelRecipe(tiny), seed=4, batch_size=2, width=48, height=32), images)


def test_strength_zero_gives_the_base_picture_and_strength_one_another(tiny, write_lora):
    lora = read_lora(write_lora(seed=9))
    base_image = draw(ModelRecipe(tiny))
    assert torch.equal(draw(ModelRecipe(tiny, (AppliedLoRA(lora, 0.0, 0.0),))), base_image)
    styled = draw(ModelRecipe(tiny, (AppliedLoRA(lora, 1.0, 1.0),)))
    assert (styled - base_image).abs().mean() > 0.01
    half = draw(ModelRecipe(tiny, (AppliedLoRA(lora, 0.5, 0.5),)))
    assert 0 < (half - base_image).abs().mean() < (styled - base_image).abs().mean()
    # after sampling a variant, the base draws exactly its own picture again (weights restored bitwise)
    assert torch.equal(draw(ModelRecipe(tiny)), base_image)


def test_text_strength_only_changes_the_text_encoder(tiny, write_lora):
    lora = read_lora(write_lora(seed=10))
    base_image = draw(ModelRecipe(tiny))
    text_only = draw(ModelRecipe(tiny, (AppliedLoRA(lora, 0.0, 1.0),)))
    assert not torch.equal(text_only, base_image)
    unet = tiny.components["unet"]
    assert all(torch.equal(p, patcher_of(tiny).original(f"unet.{n[:-7]}")) for n, p in unet.named_parameters()
               if f"unet.{n[:-7]}" in tiny.lora_targets and n.endswith(".weight"))


@pytest.mark.parametrize("sampler", list(SD1.samplers))  # builtin:tiny's; tests/test_flux_sample.py has Flux's
def test_every_sampler_runs_and_reports_progress(tiny, sampler):
    events = Collector()
    images = draw(ModelRecipe(tiny), events=events, sampler=sampler, steps=3)
    assert torch.isfinite(images).all()
    assert [(e["value"], e["max"]) for e in events.of("progress")] == [(1, 3), (2, 3), (3, 3)]


def test_sizes_must_be_multiples_of_8(tiny):
    with pytest.raises(NodeError, match="multiples of 8"):
        draw(ModelRecipe(tiny), width=30)
