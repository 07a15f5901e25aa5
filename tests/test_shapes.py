"""builtin:shapes: the shipped weights load, and the model draws the colour and shape it is asked for."""

import numpy as np
import pytest
import torch

from lora_nodes.datasets.shape_images import (
    BASE_COLOURS,
    BASE_SHAPES,
    COLOURS,
    SHAPES,
    caption,
    classify,
    make_dataset,
)
from lora_nodes.engine.context import NodeContext
from lora_nodes.engine.events import Collector
from lora_nodes.lora.recipe import ModelRecipe
from lora_nodes.models.base import BaseModel
from lora_nodes.models.builtin import SHAPES_WEIGHTS, build_shapes
from lora_nodes.nodes.sample import sample

SEEDS = (0, 1)  # fixed: 12 prompts x 2 seeds, 20 steps each, a few seconds in all


@pytest.fixture(scope="module")
def shapes_base():
    return BaseModel("builtin:shapes", build_shapes(), torch.float32, torch.device("cpu"))


def test_generator_draws_what_its_caption_says_and_the_classifier_reads_it_back():
    images, captions, specs = make_dataset(300, seed=5, colours=tuple(COLOURS), shapes=SHAPES, backgrounds=("white",))
    assert images.shape == (300, 64, 64, 3) and images.dtype == np.uint8
    assert captions[0] == f"a {specs[0].colour} {specs[0].shape} on a white background"
    read = [classify(image)[:2] for image in images]
    assert np.mean([r[0] == s.colour for r, s in zip(read, specs, strict=True)]) == 1.0
    assert np.mean([r[1] == s.shape for r, s in zip(read, specs, strict=True)]) > 0.95
    again, _, _ = make_dataset(300, seed=5, colours=tuple(COLOURS), shapes=SHAPES, backgrounds=("white",))
    assert np.array_equal(images, again)


def test_weights_are_small_and_load_the_same_every_time(shapes_base):
    assert SHAPES_WEIGHTS.stat().st_size <= 10_000_000
    assert shapes_base.native_size == 64 and shapes_base.family.id == "sd1"
    again = build_shapes()
    for name in ("unet", "vae", "text_encoder"):
        ours, theirs = shapes_base.components[name].state_dict(), again[name].state_dict()
        assert all(torch.equal(ours[key], theirs[key]) for key in ours)
        assert all(p.dtype == torch.float32 for p in shapes_base.components[name].parameters())


def read_back(base, seeds=SEEDS):
    """(asked colour, asked shape, read colour, read shape) for the 12 base prompts, 20 steps, via the Sample node."""
    recipe = ModelRecipe(base)
    results = []
    for colour in BASE_COLOURS:
        for shape in BASE_SHAPES:
            for seed in seeds:
                ctx = NodeContext("s", "Sample", None, None, Collector())
                image = sample.run(ctx, recipe, prompt=caption(colour, shape), negative_prompt="", seed=seed,
                                   steps=20, cfg=7.0, sampler="euler", width=0, height=0, batch_size=1)[0]
                assert image.shape == (1, 64, 64, 3)
                results.append((colour, shape, *classify(image[0].numpy())[:2]))
    return results


@pytest.fixture(scope="module")
def readings(shapes_base):
    return read_back(shapes_base)


def test_draws_the_asked_colour(readings):
    right = sum(asked == read for asked, _, read, _ in readings)
    assert right / len(readings) >= 0.9, f"colour right in {right}/{len(readings)}"


def test_draws_a_shape_of_about_the_right_size(readings):
    # a regression floor for the shipped weights: every sample has a shape in it
    assert all(read != "none" for *_, read in readings)


def test_draws_the_asked_shape(readings):
    right = sum(asked == read for _, asked, _, read in readings)
    assert right / len(readings) >= 0.8, f"shape right in {right}/{len(readings)}"


def test_a_lora_on_shapes_changes_the_picture_only_by_its_strength(shapes_base):
    """LoRA behaviour on a base that really draws: strength 0 is the base picture, 1 changes it."""
    from conftest import WORKFLOWS

    from lora_nodes.lora.files import read_lora
    from lora_nodes.lora.recipe import AppliedLoRA

    lora = read_lora(WORKFLOWS / "loras" / "shapes_style.safetensors")

    def draw(recipe):
        ctx = NodeContext("s", "Sample", None, None, Collector())
        return sample.run(ctx, recipe, prompt="a blue square on a white background", negative_prompt="", seed=3,
                          steps=20, cfg=7.0, sampler="euler", width=0, height=0, batch_size=1)[0]

    plain = draw(ModelRecipe(shapes_base))
    assert torch.equal(draw(ModelRecipe(shapes_base, (AppliedLoRA(lora, 0.0, 0.0),))), plain)
    styled = draw(ModelRecipe(shapes_base, (AppliedLoRA(lora, 1.0, 1.0),)))
    assert (styled - plain).abs().mean() > 1e-3
    assert torch.equal(draw(ModelRecipe(shapes_base)), plain)
    assert classify(plain[0].numpy())[:2] == ("blue", "square")
