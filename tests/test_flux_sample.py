"""Sample on a flow-matching, guidance-distilled base (builtin:tiny-flux): what FluxPipeline draws,
``guidance`` and ``cfg`` each meaningful, the flow-matching samplers, and a sampler a family
cannot draw with refused by name before anything runs."""

from __future__ import annotations

import pytest
import torch
from conftest import EXAMPLE_LORA, WORKFLOWS, write_workflow

from lora_nodes.engine.context import NodeContext
from lora_nodes.engine.events import Collector
from lora_nodes.errors import NodeError
from lora_nodes.graph import load_workflow
from lora_nodes.graph.validate import check
from lora_nodes.lora.recipe import ModelRecipe
from lora_nodes.nodes import catalogue
from lora_nodes.nodes.sample import sample

FLUX_SAMPLERS = ("euler", "dpmpp_2m", "uni_pc_bh2")
FLUX_LORA = WORKFLOWS / "loras" / "tiny_flux_style.safetensors"


def draw(base, events=None, **overrides) -> torch.Tensor:
    ctx = NodeContext("s", "Sample", None, None, events or Collector())
    inputs = {"prompt": "a red circle", "negative_prompt": "", "seed": 3, "steps": 4, "cfg": 1.0,
              "sampler": "euler", "width": 0, "height": 0, "batch_size": 1, "guidance": 3.5}
    inputs.update(overrides)
    return sample.run(ctx, ModelRecipe(base), **inputs)[0]


def flux_pipeline(base, scheduler=None):
    """FluxPipeline built here over the base's components (its euler scheduler unless one is given)."""
    from diffusers import FluxPipeline

    parts = {name: base.components[name] for name in ("transformer", "vae", "text_encoder", "tokenizer",
                                                       "text_encoder_2", "tokenizer_2", "scheduler")}
    if scheduler is not None:
        parts["scheduler"] = scheduler
    pipe = FluxPipeline(**parts)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def pipeline_images(pipe, **call) -> torch.Tensor:
    defaults = {"prompt": "a red circle", "num_inference_steps": 4, "height": 32, "width": 32,
                "max_sequence_length": 32, "output_type": "pt", "generator": torch.Generator().manual_seed(3)}
    with torch.inference_mode():
        images = pipe(**{**defaults, **call}).images
    return images.float().permute(0, 2, 3, 1)


def test_sample_draws_what_flux_pipeline_draws_with_the_distilled_guidance(flux):
    """guidance is FluxPipeline's guidance_scale (the transformer's guidance input), T5 pads to its
    tokenizer's length (32 here), and the noise comes from a CPU generator seeded with the seed."""
    assert flux.components["tokenizer_2"].model_max_length == 32
    ours = draw(flux, guidance=3.5)
    assert ours.shape == (1, 32, 32, 3)
    assert torch.equal(ours, pipeline_images(flux_pipeline(flux), guidance_scale=3.5))
    assert torch.equal(draw(flux, guidance=3.5), ours)  # same seed, same image
    assert not torch.equal(draw(flux, seed=4), ours)
    assert (draw(flux, guidance=1.0) - ours).abs().mean() > 1e-4  # the model hears the guidance


def test_any_size_in_multiples_of_eight_comes_out_as_asked(flux):
    """FluxPipeline shrinks sides that are not multiples of twice the VAE's downscaling (4 here, 16
    for FLUX.1); Sample asks for multiples of 8 and of that, so the image is the size asked for."""
    assert draw(flux, width=40, height=24, steps=1).shape == (1, 24, 40, 3)
    with pytest.raises(NodeError, match="multiples of 8"):
        draw(flux, width=36)


def test_cfg_on_flux_is_real_guidance_against_the_negative_prompt(flux):
    """cfg is FluxPipeline's true_cfg_scale: a second pass against negative_prompt. Without a
    negative prompt there is no second pass, so cfg changes nothing (the default 7 included)."""
    plain = draw(flux)
    assert torch.equal(draw(flux, cfg=7.0), plain)
    guided = draw(flux, cfg=4.0, negative_prompt="a blue square")
    expected = pipeline_images(flux_pipeline(flux), guidance_scale=3.5, true_cfg_scale=4.0,
                               negative_prompt="a blue square")
    assert torch.equal(guided, expected)
    assert (guided - plain).abs().mean() > 1e-4
    assert torch.equal(draw(flux, cfg=1.0, negative_prompt="a blue square"), plain)  # 1 is off


def test_the_t5_sequence_is_padded_to_the_tokenizers_length(flux):
    seen = []
    handle = flux.components["transformer"].register_forward_pre_hook(
        lambda _m, _a, kwargs: seen.append(kwargs["encoder_hidden_states"].shape[1]), with_kwargs=True)
    try:
        draw(flux, steps=1)
    finally:
        handle.remove()
    assert seen == [flux.components["tokenizer_2"].model_max_length]


def test_guidance_is_ignored_by_a_model_that_is_not_guidance_distilled(tiny):
    assert torch.equal(draw(tiny, cfg=7.0, guidance=0.0), draw(tiny, cfg=7.0, guidance=9.0))


@pytest.mark.parametrize("sampler", FLUX_SAMPLERS)
def test_every_flux_sampler_is_deterministic_and_reports_progress(flux, sampler):
    events = Collector()
    images = draw(flux, events=events, sampler=sampler, steps=3)
    assert torch.isfinite(images).all()
    assert [(e["value"], e["max"]) for e in events.of("progress")] == [(1, 3), (2, 3), (3, 3)]
    assert torch.equal(draw(flux, sampler=sampler, steps=3), images)


def flow_latents(base, sampler: str, steps: int, seed: int = 3) -> torch.Tensor:
    """What the transformer draws (the latents before the VAE) with ``sampler`` in ``steps`` steps."""
    from lora_nodes.nodes.sample import make_pipeline

    pipe = make_pipeline(base, sampler)
    with torch.inference_mode():
        return pipe("a red circle", height=32, width=32, num_inference_steps=steps, guidance_scale=3.5,
                    max_sequence_length=32, generator=torch.Generator().manual_seed(seed),
                    output_type="latent").images


@pytest.fixture(scope="module")
def flow_end(flux):
    """euler in 32 steps (near where the flow leads) for seed 3, and how far seed 4's end is from it."""
    reference = flow_latents(flux, "euler", 32)
    return reference, (flow_latents(flux, "euler", 32, seed=4) - reference).abs().mean()


@pytest.mark.parametrize("sampler", ["dpmpp_2m", "uni_pc_bh2"])
def test_the_multistep_samplers_follow_the_same_flow_as_euler(flux, flow_end, sampler):
    """Every sampler reaches the image the flow leads to: in 8 steps a second-order solver is
    nearer to euler's 32-step end than euler's own 8 steps are, and a hundred times nearer than
    another seed's end."""
    reference, other_seed = flow_end
    euler = (flow_latents(flux, "euler", 8) - reference).abs().mean()
    ours = (flow_latents(flux, sampler, 8) - reference).abs().mean()
    assert ours < 0.75 * euler and euler < 0.02 * other_seed, (float(ours), float(euler), float(other_seed))


def test_the_flux_schedule_is_fluxpipelines_shifted_sigmas(flux):
    """euler's sigmas are FluxPipeline's: linspace(1, 1/N, N) shifted by mu from the token count
    (docs/flux-notes.md section 4), ending at 0."""
    import math

    from lora_nodes.nodes.sample import make_pipeline

    pipe = make_pipeline(flux, "euler")
    steps, tokens = 4, (32 // 2 // 2) ** 2
    seen = []
    step = pipe.scheduler.step
    pipe.scheduler.step = lambda *a, **k: (seen.append(pipe.scheduler.sigmas.clone()), step(*a, **k))[1]
    with torch.inference_mode():
        pipe("a", height=32, width=32, num_inference_steps=steps, max_sequence_length=32, output_type="latent",
             generator=torch.Generator().manual_seed(0))
    mu = 0.5 + (1.15 - 0.5) * (tokens - 256) / (4096 - 256)
    expected = [math.exp(mu) / (math.exp(mu) + (1 / s - 1)) for s in torch.linspace(1, 1 / steps, steps).tolist()]
    assert torch.allclose(seen[0], torch.tensor([*expected, 0.0]), atol=1e-6)


# --------------------------------------------------------------------------- samplers a family lacks


def test_a_sampler_flux_cannot_draw_with_is_refused_naming_its_samplers(flux, tiny):
    with pytest.raises(NodeError) as refused:
        draw(flux, sampler="ddim")
    assert "'ddim' does not draw with Flux" in str(refused.value)
    assert "euler, dpmpp_2m, uni_pc_bh2" in str(refused.value)
    with pytest.raises(NodeError, match="'uni_pc_bh2' does not draw with SD1.5; its samplers are euler, "):
        draw(tiny, sampler="uni_pc_bh2")


@pytest.mark.parametrize(("source", "sampler", "family"), [("builtin:tiny-flux", "euler_ancestral", "Flux"),
                                                           ("builtin:tiny", "uni_pc_bh2", "SD1.5")])
def test_validation_finds_a_sampler_the_models_family_cannot_draw_with(tmp_path, source, sampler, family):
    path = write_workflow(tmp_path, f"""
nodes:
  base:   {{type: LoadBase, inputs: {{source: "{source}"}}}}
  styled: {{type: ApplyLoRA, inputs: {{model: [base, model], lora: [lora, lora]}}}}
  lora:   {{type: LoadLoRA, inputs: {{path: {EXAMPLE_LORA if family == "SD1.5" else FLUX_LORA}}}}}
  images: {{type: Sample, inputs: {{model: [styled, model], prompt: a, sampler: {sampler}}}}}
  other:  {{type: Sample, inputs: {{model: [base, model], prompt: a, sampler: euler}}}}
  save:   {{type: SaveImages, inputs: {{images: [images, images]}}}}
  save2:  {{type: SaveImages, inputs: {{images: [other, images]}}}}
""")
    problems, _ = check(load_workflow(path), catalogue())
    assert [(p.node, p.type, p.input, p.code) for p in problems] == [("images", "Sample", "sampler", "invalid_choice")]
    assert f"'{sampler}' does not draw with {family}; its samplers are euler" in problems[0].message
