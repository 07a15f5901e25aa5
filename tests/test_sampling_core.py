"""The sampling core (ComfyUI's KSampler on our bases): every sampler and scheduler draws, the default
schedule draws what diffusers' pipeline draws, denoise and the advanced steps behave as ComfyUI's, and
Sample's new inputs (scheduler, clip_skip, denoise, init image) change what they should."""

import pytest
import torch
from conftest import write_workflow

from lora_nodes.engine.context import NodeContext
from lora_nodes.engine.events import Collector
from lora_nodes.errors import NodeError
from lora_nodes.families.sd1 import SD1
from lora_nodes.graph import load_workflow
from lora_nodes.graph.validate import check
from lora_nodes.lora.recipe import ModelRecipe
from lora_nodes.models.base import BaseModel
from lora_nodes.models.conditioning import MAX_WORD_LENGTH, Condition, clip_windows, encode_prompt
from lora_nodes.models.sampling import (
    SCHEDULER_NAMES,
    decode_latents,
    encode_images,
    latent_channels,
    sample_latents,
    sampling_problem,
)
from lora_nodes.nodes import catalogue
from lora_nodes.nodes.sample import guidance_arguments, make_pipeline, sample

PROMPT = "a red circle"


def conditions(base, prompt=PROMPT):
    return (encode_prompt(base, prompt),), (encode_prompt(base, ""),)


def empty(base, size=8, batch=1):
    return torch.zeros(batch, latent_channels(base), size, size)


def run(base, sampler="euler", scheduler="karras", steps=3, cfg=5.0, latents=None, **options):
    positive, negative = conditions(base)
    return sample_latents(base, positive, negative, empty(base) if latents is None else latents, seed=5,
                          steps=steps, cfg=cfg, sampler=sampler, scheduler=scheduler, **options)


@pytest.mark.parametrize("sampler", list(SD1.samplers))
def test_every_sampler_draws_a_finite_image(tiny, sampler):
    latents = run(tiny, sampler, scheduler="normal")
    images = decode_latents(tiny, latents)
    assert images.shape == (1, 16, 16, 3) and torch.isfinite(images).all()
    assert latents.abs().max() > 0.1  # it drew something
    assert torch.equal(run(tiny, sampler, scheduler="normal"), latents)  # the seed decides, ancestral noise too


@pytest.mark.parametrize("scheduler", SCHEDULER_NAMES)
def test_every_scheduler_draws_a_finite_image(tiny, scheduler):
    assert torch.isfinite(run(tiny, "euler", scheduler)).all()


def pipeline_latents(base, sampler, cfg, size=32):
    pipe = make_pipeline(base, sampler)
    latents = pipe(PROMPT, num_inference_steps=4, width=size, height=size, output_type="latent",
                   generator=torch.Generator("cpu").manual_seed(5),
                   **guidance_arguments(base, pipe, cfg, 3.5, "")).images
    if base.family.flow_matching:
        latents = pipe._unpack_latents(latents, size, size, base.vae_scale_factor)
    config = base.components["vae"].config
    return latents / config.scaling_factor + (config.get("shift_factor") or 0.0)  # raw, as ComfyUI keeps them


@pytest.mark.parametrize(("fixture", "sampler", "cfg"), [("tiny", "euler", 5.0), ("tiny", "dpmpp_2m", 5.0),
                                                         ("tiny", "heun", 5.0), ("tiny_sdxl", "euler", 1.0),
                                                         ("flux", "euler", 1.0)])
def test_the_default_schedule_draws_what_the_diffusers_pipeline_draws(request, fixture, sampler, cfg):
    # SD-like (epsilon, CFG), SDXL-like (pooled embeddings + time ids) and Flux (packed latents, guidance):
    # our conditioning, noise and loop give diffusers' own latents (SDXL at cfg 1: its pipeline zeroes
    # an empty negative prompt, where ComfyUI encodes it)
    base = request.getfixturevalue(fixture)
    expected = pipeline_latents(base, sampler, cfg)
    ours = run(base, sampler, "default", steps=4, cfg=cfg, latents=empty(base, 32 // base.vae_scale_factor))
    assert (ours - expected).abs().max() < 1e-3 * expected.abs().max()


def test_sdxl_and_flux_draw_with_comfyui_schedulers(tiny_sdxl, flux):
    for base in (tiny_sdxl, flux):
        latents = run(base, "euler", "simple", latents=empty(base, 8))
        assert torch.isfinite(latents).all() and latents.shape == empty(base, 8).shape


def test_guidance_of_a_condition_reaches_a_guidance_distilled_model(flux):
    positive, negative = conditions(flux)
    options = {"seed": 1, "steps": 2, "cfg": 1.0, "sampler": "euler", "scheduler": "simple"}
    low = sample_latents(flux, (Condition(positive[0].tensors, guidance=1.0),), negative, empty(flux), **options)
    high = sample_latents(flux, (Condition(positive[0].tensors, guidance=8.0),), negative, empty(flux), **options)
    assert not torch.allclose(low, high)


def test_denoise_below_one_keeps_the_start_and_one_does_not(tiny):
    start = run(tiny, steps=4, cfg=3.0)  # a drawn picture's latents
    kept = run(tiny, steps=4, cfg=3.0, latents=start, denoise=0.3)
    redrawn = run(tiny, steps=4, cfg=3.0, latents=start, denoise=1.0)
    assert (kept - start).abs().mean() < 0.5 * (redrawn - start).abs().mean()
    assert torch.equal(run(tiny, latents=start, denoise=0.0), start)  # nothing to do


def test_two_advanced_halves_make_the_whole_run(tiny):
    # KSamplerAdvanced: steps 0-2 keeping the leftover noise, then 2-4 adding none, is steps 0-4
    whole = run(tiny, steps=4)
    first = run(tiny, steps=4, end_step=2, leftover_noise=True)
    second = run(tiny, steps=4, latents=first, start_step=2, add_noise=False)
    assert torch.allclose(second, whole, atol=1e-4)
    assert not torch.allclose(first, whole, atol=1e-2)  # the first half alone is still noisy


def test_conditions_average_and_keep_to_their_part_of_the_schedule(tiny):
    positive, negative = conditions(tiny)
    other = encode_prompt(tiny, "a blue square")
    options = {"seed": 2, "steps": 3, "cfg": 5.0, "sampler": "euler", "scheduler": "normal"}
    one = sample_latents(tiny, positive, negative, empty(tiny), **options)
    twice = sample_latents(tiny, positive * 2, negative, empty(tiny), **options)
    assert torch.allclose(one, twice, atol=1e-5)  # the mean of equal predictions
    both = sample_latents(tiny, (positive[0], other), negative, empty(tiny), **options)
    assert not torch.allclose(both, one, atol=1e-3)
    never = Condition(other.tensors, start=0.0, end=0.0)  # active nowhere: as if it were not there
    assert torch.allclose(sample_latents(tiny, (positive[0], never), negative, empty(tiny), **options), one, atol=1e-5)


@pytest.mark.parametrize("fixture", ["tiny", "flux"])
def test_a_side_with_no_active_condition_predicts_a_clean_image_of_zeros(request, fixture):
    # ComfyUI averages the denoised images of the active conditions, and the mean of none is zero: with
    # no condition ever active, every Euler step aims at x0 = 0 and the last step (to sigma 0) lands there
    base = request.getfixturevalue(fixture)
    positive, _ = conditions(base)
    never = Condition(positive[0].tensors, start=0.0, end=0.0, family=positive[0].family)
    result = sample_latents(base, (never,), (never,), empty(base), seed=2, steps=3, cfg=1.0, sampler="euler",
                            scheduler="simple")
    shift = base.components["vae"].config.get("shift_factor") or 0.0  # the raw latent of a scaled zero
    assert torch.allclose(result, torch.full_like(result, shift), atol=1e-5)


class WindowTokenizer:
    """A tokenizer of windows of 10 (8 tokens between start and end), to count windows by hand."""

    model_max_length, bos_token_id, eos_token_id, pad_token_id = 10, 1, 2, 0


def test_a_short_weighted_piece_is_kept_in_one_window_and_a_long_one_is_split():
    short, other = [(5, 1.0)] * 6, [(6, 1.2)] * 4  # 4 < MAX_WORD_LENGTH: does not fit after 6, starts a window
    assert MAX_WORD_LENGTH == 8
    assert clip_windows(WindowTokenizer, [short, other]) == [
        [(1, 1.0), *short, (2, 1.0), (0, 1.0), (0, 1.0)],
        [(1, 1.0), *other, (2, 1.0), *[(0, 1.0)] * 4],
    ]
    long = [(7, 1.0)] * 8  # 8 tokens: fills the 2 places left, the other 6 go on in the next window
    assert clip_windows(WindowTokenizer, [short, long]) == [
        [(1, 1.0), *short, (7, 1.0), (7, 1.0), (2, 1.0)],
        [(1, 1.0), *[(7, 1.0)] * 6, (2, 1.0), (0, 1.0), (0, 1.0)],
    ]
    assert clip_windows(WindowTokenizer, []) == [[(1, 1.0), (2, 1.0), *[(0, 1.0)] * 8]]


def test_progress_counts_steps_not_model_passes(tiny):
    seen = []
    run(tiny, "heun", steps=3, progress=lambda done, total: seen.append((done, total)))
    assert seen[-1] == (3, 3) and [d for d, _ in seen] == sorted({d for d, _ in seen})


def test_a_base_holding_only_the_denoiser_samples_with_the_familys_latent_scaling(tiny):
    # (ComfyUI's UNETLoader): the latent scale comes from the family's shipped VAE config, SD1.5's 0.18215,
    # which builtin:tiny shares, so the picture is the full base's
    parts = {k: v for k, v in tiny.components.items() if k != "vae"}
    denoiser_only = BaseModel("unet only", parts, tiny.dtype, tiny.device)
    assert torch.allclose(run(denoiser_only), run(tiny), atol=1e-5)
    with pytest.raises(NodeError, match="holds no VAE"):
        decode_latents(denoiser_only, run(tiny))


def test_images_round_trip_through_the_vae_in_raw_latent_space(tiny):
    images = torch.rand(2, 16, 24, 3)
    latents = encode_images(tiny, images)
    assert latents.shape == (2, 4, 16 // tiny.vae_scale_factor, 24 // tiny.vae_scale_factor)
    assert decode_latents(tiny, latents).shape == (2, 16, 24, 3)


def test_a_name_we_lack_is_a_problem_naming_what_we_have(flux):
    assert "the schedulers are simple, sgm_uniform, karras" in sampling_problem(SD1, "euler", "align_your_steps")
    assert "its samplers are euler, euler_ancestral" in sampling_problem(SD1, "res_multistep", "normal")
    assert "does not draw with Flux" in sampling_problem(flux.family, "heun", "simple")
    assert sampling_problem(SD1, "dpmpp_2m_sde", "karras") is None
    with pytest.raises(NodeError, match="its samplers are"):
        run(flux, "lms", "simple")


def test_validation_lists_the_schedulers_for_a_name_we_lack(tmp_path):
    path = write_workflow(tmp_path, """
nodes:
  base:   {type: LoadBase, inputs: {source: "builtin:tiny"}}
  images: {type: Sample, inputs: {model: [base, model], prompt: a, scheduler: align_your_steps}}
  save:   {type: SaveImages, inputs: {images: [images, images]}}
""")
    problems, _ = check(load_workflow(path), catalogue())
    assert [(p.node, p.input, p.code) for p in problems] == [("images", "scheduler", "invalid_choice")]
    assert "karras" in problems[0].message and "beta" in problems[0].message


def draw(recipe, events=None, **overrides):
    ctx = NodeContext("s", "Sample", None, None, Collector() if events is None else events)
    inputs = {"prompt": PROMPT, "negative_prompt": "", "seed": 3, "steps": 3, "cfg": 5.0, "sampler": "euler",
              "width": 32, "height": 32, "batch_size": 1}
    return sample.run(ctx, recipe, **{**inputs, **overrides})[0]


def test_sample_with_a_comfyui_scheduler_and_clip_skip_draws_another_picture(tiny):
    default = draw(ModelRecipe(tiny))
    karras = draw(ModelRecipe(tiny), scheduler="karras")
    assert karras.shape == default.shape and (karras - default).abs().mean() > 1e-3
    assert torch.equal(draw(ModelRecipe(tiny), scheduler="karras"), karras)
    skipped = draw(ModelRecipe(tiny), scheduler="karras", clip_skip=2)
    assert (skipped - karras).abs().mean() > 1e-3  # the penultimate layer reads the prompt otherwise


@pytest.fixture(scope="module")
def shapes():
    """builtin:shapes: a trained model and VAE, so that pictures can be compared by their pixels."""
    from lora_nodes.models.loading import load_base

    return load_base("builtin:shapes", dtype="float32", device="cpu")


def test_sample_draws_over_an_init_image_as_much_as_denoise_says(shapes):
    image = draw(ModelRecipe(shapes), steps=4)  # a picture of the model's own; redrawn from other noise:
    light = draw(ModelRecipe(shapes), image=image, denoise=0.3, width=0, height=0, batch_size=2, seed=8)
    events = Collector()
    full = draw(ModelRecipe(shapes), events, image=image, denoise=1.0, width=0, height=0, seed=8)
    (warning,) = events.of("warning")  # at denoise 1 the image gives only the size: the user is told
    assert "denoise" in warning["message"] and "anew" in warning["message"]
    assert light.shape == (2, 32, 32, 3)  # the image's size; batch_size pictures per init image
    assert (light[:1] - image).abs().mean() < 0.25 * (full - image).abs().mean()
    resized = draw(ModelRecipe(shapes), image=image, denoise=0.5, width=48, height=24)
    assert resized.shape == (1, 24, 48, 3)
