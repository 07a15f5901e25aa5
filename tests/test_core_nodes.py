"""ComfyUI's core nodes on our engine: loaders, LoRA loaders, conditioning, samplers, latents, VAE.

The nodes are run as the engine runs them (their spec's function, by input name) on the built-in
tiny models at 32x32 and 2 steps; one workflow goes through validation and the engine. What is
checked is what a user would see: pictures that differ or are equal, errors and their advice.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import EXAMPLE_LORA, WORKFLOWS, write_workflow

from lora_nodes.engine.context import NodeContext
from lora_nodes.engine.events import Collector
from lora_nodes.errors import NodeError
from lora_nodes.lora.recipe import ModelRecipe
from lora_nodes.nodes.core import conditioning, latents, loaders, sampling
from lora_nodes.nodes.core.values import ClipRecipe, Latent

SDXL_LORA = WORKFLOWS / "loras" / "tiny_sdxl_style.safetensors"
FLUX_LORA = WORKFLOWS / "loras" / "tiny_flux_style.safetensors"
SIDE, STEPS = 32, 2


def run(spec, events: Collector | None = None, **inputs):
    """One node run as the engine runs it: its function with a context, inputs by name."""
    return spec.run(NodeContext("n", spec.id, None, None, events if events is not None else Collector()), **inputs)


def load(base) -> tuple[ModelRecipe, ClipRecipe, object]:
    """What CheckpointLoaderSimple gives for ``base`` (a session fixture: not loaded again)."""
    model = ModelRecipe(base)
    return model, ClipRecipe(model), base


def encode(clip: ClipRecipe, text: str):
    (cond,) = run(conditioning.clip_text_encode, text=text, clip=clip)
    return cond


def empty_latent(base) -> Latent:
    spec = latents.empty_latent_image if latents_channels(base) == 4 else latents.empty_sd3_latent_image
    (latent,) = run(spec, width=SIDE, height=SIDE, batch_size=1)
    return latent


def latents_channels(base) -> int:
    return base.components["vae"].config.latent_channels


def denoise(model: ModelRecipe, positive, negative, latent: Latent, seed: int = 3, **options) -> Latent:
    (out,) = run(sampling.ksampler, model=model, seed=seed, steps=STEPS, cfg=options.pop("cfg", 4.0),
                 sampler_name="euler", scheduler="simple", positive=positive, negative=negative,
                 latent_image=latent, **options)
    return out


def draw(model: ModelRecipe, clip: ClipRecipe, vae, prompt: str = "a red circle", latent: Latent | None = None,
         **options) -> torch.Tensor:
    """CLIPTextEncode -> KSampler -> VAEDecode: the picture, [1, H, W, 3] (from an empty latent by default)."""
    positive, negative = encode(clip, prompt), encode(clip, "")
    latent = latent or empty_latent(vae)
    (image,) = run(latents.vae_decode, samples=denoise(model, positive, negative, latent, **options), vae=vae)
    return image


def tiny_vae_latent(base) -> Latent:
    """An empty latent in the built-in's own cells: a model without a VAE (UNETLoader's) cannot know them."""
    cells = base.vae_scale_factor
    return Latent(torch.zeros(1, latents_channels(base), SIDE // cells, SIDE // cells), cells)


def with_lora(model, clip, path, strength_model=1.0, strength_clip=1.0, events=None):
    return run(loaders.lora_loader, events, model=model, clip=clip, lora_name=str(path),
               strength_model=strength_model, strength_clip=strength_clip)


# --------------------------------------------------------------------------- loaders and LoRAs


def test_a_checkpoint_is_loaded_once_and_shared():
    model, clip, vae = run(loaders.checkpoint_loader_simple, ckpt_name="builtin:tiny")
    assert model.base is clip.base is vae
    assert model.loras == () and clip.model.loras == () and clip.last_layer is None


def test_lora_loader_puts_each_strength_on_its_own_side(tiny):
    model, clip, _ = load(tiny)
    new_model, new_clip = with_lora(model, clip, EXAMPLE_LORA, strength_model=0.7, strength_clip=0.3)
    (on_model,), (on_clip,) = new_model.loras, new_clip.model.loras
    assert (on_model.strength_model, on_model.strength_text) == (0.7, 0.0)
    assert (on_clip.strength_model, on_clip.strength_text) == (0.0, 0.3)
    assert on_model.lora is on_clip.lora  # read once
    # the model's recipe patches only the UNet, the CLIP's only the text encoder
    assert {t.split(".")[0] for t in new_model.patch_plan()} == {"unet"}
    assert {t.split(".")[0] for t in new_clip.model.patch_plan()} == {"text_encoder"}
    assert new_clip.base is tiny and new_model.base is tiny  # nothing copied
    assert model.loras == () and clip.model.loras == ()  # the inputs are not changed


def test_a_side_at_strength_zero_is_left_as_it_came(tiny):
    model, clip, _ = load(tiny)
    new_model, new_clip = with_lora(model, clip, EXAMPLE_LORA, strength_model=0.7, strength_clip=0.0)
    assert new_clip is clip and len(new_model.loras) == 1
    new_model, new_clip = with_lora(model, clip, EXAMPLE_LORA, strength_model=0.0, strength_clip=0.5)
    assert new_model is model and [(a.strength_model, a.strength_text) for a in new_clip.model.loras] == [(0.0, 0.5)]


def test_lora_loaders_at_strength_zero_read_nothing(tiny, tmp_path):
    model, clip, _ = load(tiny)
    missing = tmp_path / "not_there.safetensors"
    assert with_lora(model, clip, missing, 0.0, 0.0) == (model, clip)  # as ComfyUI: not even opened
    assert run(loaders.lora_loader_model_only, model=model, lora_name=str(missing), strength_model=0.0) == (model,)
    with pytest.raises(NodeError):
        with_lora(model, clip, missing, 1.0, 0.0)


def test_lora_loader_reads_every_format_as_load_lora_does(tiny, write_lora):
    model, clip, _ = load(tiny)
    for fmt in ("kohya", "peft"):
        new_model, _ = with_lora(model, clip, write_lora(f"style_{fmt}", fmt=fmt))
        assert new_model.patch_plan(), fmt


def test_an_sd_lora_on_a_flux_model_says_what_to_do(flux):
    model, clip, _ = load(flux)
    with pytest.raises(NodeError) as error:
        with_lora(model, clip, EXAMPLE_LORA)
    message = str(error.value)
    assert "this LoRA is for SD1.5, the base is Flux" in message
    assert "Use a base of the LoRA's family, or a LoRA trained for this base" in message
    with pytest.raises(NodeError, match="this LoRA is for SD1.5"):
        run(loaders.lora_loader_model_only, model=model, lora_name=str(EXAMPLE_LORA), strength_model=1.0)


def test_validation_finds_the_wrong_family_and_a_clip_type_we_do_not_run(tmp_path, capsys):
    import json

    from lora_nodes.cli import main

    path = write_workflow(tmp_path, f"""
nodes:
  ckpt: {{type: CheckpointLoaderSimple, inputs: {{ckpt_name: "builtin:tiny"}}}}
  lora: {{type: LoraLoader, inputs: {{model: [ckpt, 0], clip: [ckpt, 1], lora_name: "{FLUX_LORA}"}}}}
  clip: {{type: CLIPLoader, inputs: {{clip_name: "{EXAMPLE_LORA}", type: mochi}}}}
  pos:  {{type: CLIPTextEncode, inputs: {{text: a, clip: [lora, 1]}}}}
  pos2: {{type: CLIPTextEncode, inputs: {{text: a, clip: [clip, 0]}}}}
  lat:  {{type: EmptyLatentImage, inputs: {{width: 32, height: 32}}}}
  ks:   {{type: KSampler, inputs: {{model: [lora, 0], positive: [pos, 0], negative: [pos2, 0], latent_image: [lat, 0]}}}}
  img:  {{type: VAEDecode, inputs: {{samples: [ks, 0], vae: [ckpt, 2]}}}}
  save: {{type: SaveImage, inputs: {{images: [img, 0]}}}}
""")
    assert main(["validate", str(path), "--json"]) == 2
    out = capsys.readouterr().out
    problems = {(p["node"], p["input"]): p for p in json.loads(out[out.index("["):])}
    assert problems[("lora", "lora_name")]["code"] == "family_mismatch"
    assert "this LoRA is for Flux, the base is SD1.5" in problems[("lora", "lora_name")]["message"]
    assert problems[("clip", "type")]["code"] == "unsupported_type"
    assert "'mochi'" in problems[("clip", "type")]["message"]
    assert "stable_diffusion" in problems[("clip", "type")]["message"]  # names the types we run


# --------------------------------------------------------------------------- pictures


@pytest.mark.parametrize(("fixture", "lora"), [("tiny", EXAMPLE_LORA), ("tiny_sdxl", SDXL_LORA), ("flux", FLUX_LORA)])
def test_lora_strength_changes_the_picture_and_zero_gives_the_base(request, fixture, lora):
    base = request.getfixturevalue(fixture)
    model, clip, vae = load(base)
    plain = draw(model, clip, vae)
    styled = draw(*with_lora(model, clip, lora, 1.0, 1.0), vae)
    # after the LoRA was merged in, strength 0 gives the base's picture back, bit for bit
    off = draw(*with_lora(model, clip, lora, 0.0, 0.0), vae)
    assert plain.shape == (1, SIDE, SIDE, 3)
    assert torch.isfinite(styled).all()
    assert (styled - plain).abs().max() > 1e-3
    assert torch.equal(off, plain)


def test_strength_clip_changes_only_the_conditioning_and_strength_model_only_the_denoising(tiny):
    model, clip, _ = load(tiny)
    prompt = "a red circle"
    plain_cond = encode(clip, prompt)
    clip_only_model, clip_only = with_lora(model, clip, EXAMPLE_LORA, strength_model=0.0, strength_clip=1.0)
    model_only, model_only_clip = with_lora(model, clip, EXAMPLE_LORA, strength_model=1.0, strength_clip=0.0)
    assert not torch.equal(encode(clip_only, prompt)[0].tensors["embeds"], plain_cond[0].tensors["embeds"])
    assert torch.equal(encode(model_only_clip, prompt)[0].tensors["embeds"], plain_cond[0].tensors["embeds"])
    negative = encode(clip, "")
    plain = denoise(model, plain_cond, negative, empty_latent(tiny)).samples
    assert torch.equal(denoise(clip_only_model, plain_cond, negative, empty_latent(tiny)).samples, plain)
    assert not torch.equal(denoise(model_only, plain_cond, negative, empty_latent(tiny)).samples, plain)


def test_clip_set_last_layer(tiny):
    _, clip, _ = load(tiny)
    (penultimate,) = run(conditioning.clip_set_last_layer, clip=clip, stop_at_clip_layer=-2)
    (last,) = run(conditioning.clip_set_last_layer, clip=clip, stop_at_clip_layer=-1)
    default = encode(clip, "a red circle")[0].tensors["embeds"]
    assert torch.equal(encode(last, "a red circle")[0].tensors["embeds"], default)  # SD1's own: the last layer
    assert not torch.allclose(encode(penultimate, "a red circle")[0].tensors["embeds"], default)


def test_sdxl_reads_the_last_layer_at_minus_one_without_the_final_norm(tiny_sdxl):
    # ComfyUI's SDXL encoders never normalise a layer they read: -1 is the last layer as it leaves the
    # transformer (not transformers' normalised last_hidden_state)
    _, clip, _ = load(tiny_sdxl)
    (last,) = run(conditioning.clip_set_last_layer, clip=clip, stop_at_clip_layer=-1)
    states, normalised = [], []
    with torch.no_grad():
        for encoder, tokenizer in (("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2")):
            tok = tiny_sdxl.components[tokenizer]
            ids = tok("a red circle", padding="max_length", max_length=tok.model_max_length, return_tensors="pt")
            output = tiny_sdxl.components[encoder](ids.input_ids, output_hidden_states=True)
            states.append(output.hidden_states[-1])
            normalised.append(output.last_hidden_state)
    embeds = encode(last, "a red circle")[0].tensors["embeds"]
    assert torch.allclose(embeds, torch.cat(states, dim=-1), atol=1e-5)
    assert not torch.allclose(embeds, torch.cat(normalised, dim=-1), atol=1e-3)


def test_minus_one_on_an_encoder_kept_without_its_last_layer_is_reported():
    from lora_nodes.families.sd1 import SD1
    from lora_nodes.families.sd2 import SD2
    from lora_nodes.models.conditioning import missing_layer_note

    assert "reads the penultimate layer" in missing_layer_note(SD2, -1)
    assert missing_layer_note(SD2, -2) is None and missing_layer_note(SD2, None) is None
    assert missing_layer_note(SD1, -1) is None


def test_emphasis_changes_the_conditioning_and_embeddings_are_reported(tiny):
    _, clip, _ = load(tiny)
    plain = encode(clip, "a red circle")[0].tensors["embeds"]
    assert torch.equal(encode(clip, "a (red:1.0) circle")[0].tensors["embeds"], plain)
    assert not torch.allclose(encode(clip, "a (red:1.5) circle")[0].tensors["embeds"], plain)
    events = Collector()
    run(conditioning.clip_text_encode, events, text="a red circle embedding:bad_hands", clip=clip)
    (warning,) = events.of("warning")
    assert "embedding:bad_hands" in warning["message"] and "textual-inversion" in warning["message"]


def test_flux_guidance_changes_a_flux_picture(flux):
    model, clip, _ = load(flux)
    positive, negative = encode(clip, "a red circle"), encode(clip, "")
    (low,) = run(conditioning.flux_guidance, conditioning=positive, guidance=1.0)
    (high,) = run(conditioning.flux_guidance, conditioning=positive, guidance=8.0)
    assert [c.guidance for c in high] == [8.0] and positive[0].guidance is None  # the input is not changed
    first = denoise(model, low, negative, empty_latent(flux), cfg=1.0).samples
    second = denoise(model, high, negative, empty_latent(flux), cfg=1.0).samples
    assert (first - second).abs().max() > 1e-4


def test_conditioning_combine_and_timestep_range(tiny):
    _, clip, _ = load(tiny)
    red, blue = encode(clip, "red"), encode(clip, "blue")
    (both,) = run(conditioning.conditioning_combine, conditioning_1=red, conditioning_2=blue)
    assert both == red + blue
    (late,) = run(conditioning.conditioning_set_timestep_range, conditioning=both, start=0.5, end=0.9)
    assert [(c.start, c.end) for c in late] == [(0.5, 0.9), (0.5, 0.9)]
    assert [c.tensors for c in late] == [c.tensors for c in both]


def test_img2img_at_low_denoise_keeps_the_picture(tiny):
    model, clip, vae = load(tiny)
    positive, negative = encode(clip, "a red circle"), encode(clip, "")
    picture = torch.zeros(1, SIDE, SIDE, 3)
    picture[:, 8:24, 8:24, 0] = 1.0  # a red square
    (latent,) = run(latents.vae_encode, pixels=picture, vae=vae)
    assert latent.samples.shape == (1, 4, SIDE // tiny.vae_scale_factor, SIDE // tiny.vae_scale_factor)
    (kept,) = run(latents.vae_decode, samples=denoise(model, positive, negative, latent, denoise=0.2), vae=vae)
    (redrawn,) = run(latents.vae_decode, samples=denoise(model, positive, negative, latent, denoise=1.0), vae=vae)
    (decoded,) = run(latents.vae_decode, samples=latent, vae=vae)
    assert (kept - decoded).abs().mean() < (redrawn - decoded).abs().mean()


def test_ksampler_advanced_in_two_halves(tiny):
    model, clip, _ = load(tiny)
    positive, negative = encode(clip, "a red circle"), encode(clip, "")

    def advanced(latent, add_noise, start, end, leftover):
        (out,) = run(sampling.ksampler_advanced, model=model, add_noise=add_noise, noise_seed=5, steps=4, cfg=4.0,
                     sampler_name="euler", scheduler="simple", positive=positive, negative=negative,
                     latent_image=latent, start_at_step=start, end_at_step=end, return_with_leftover_noise=leftover)
        return out

    whole = advanced(empty_latent(tiny), "enable", 0, 10000, "disable")
    first = advanced(empty_latent(tiny), "enable", 0, 2, "enable")
    second = advanced(first, "disable", 2, 10000, "disable")
    assert torch.allclose(second.samples, whole.samples, atol=1e-4)
    assert not torch.allclose(first.samples, whole.samples, atol=1e-2)


def test_conditioning_of_another_family_is_refused_naming_both(tiny, flux):
    model, _, _ = load(tiny)
    _, flux_clip, _ = load(flux)
    foreign, own = encode(flux_clip, "a red circle"), encode(load(tiny)[1], "")
    with pytest.raises(NodeError, match="encoded by the text encoders of a Flux model, but the model that "
                                        "samples is SD1.5"):
        denoise(model, foreign, own, empty_latent(tiny))


def test_validation_finds_conditioning_of_another_family(tmp_path):
    from lora_nodes.graph import load_workflow
    from lora_nodes.graph.validate import check
    from lora_nodes.nodes import catalogue

    path = write_workflow(tmp_path, """
nodes:
  sd:   {type: CheckpointLoaderSimple, inputs: {ckpt_name: "builtin:tiny"}}
  fx:   {type: CheckpointLoaderSimple, inputs: {ckpt_name: "builtin:tiny-flux"}}
  last: {type: CLIPSetLastLayer, inputs: {clip: [fx, 1], stop_at_clip_layer: -1}}
  pos:  {type: CLIPTextEncode, inputs: {text: a, clip: [last, 0]}}
  both: {type: ConditioningCombine, inputs: {conditioning_1: [pos, 0], conditioning_2: [pos, 0]}}
  neg:  {type: CLIPTextEncode, inputs: {text: "", clip: [sd, 1]}}
  lat:  {type: EmptyLatentImage, inputs: {width: 32, height: 32}}
  ks:   {type: KSampler, inputs: {model: [sd, 0], positive: [both, 0], negative: [neg, 0], latent_image: [lat, 0]}}
  img:  {type: VAEDecode, inputs: {samples: [ks, 0], vae: [sd, 2]}}
  save: {type: SaveImage, inputs: {images: [img, 0]}}
""")
    problems, _ = check(load_workflow(path), catalogue())
    assert [(p.node, p.input, p.code) for p in problems] == [("ks", "positive", "family_mismatch")]
    assert "Flux" in problems[0].message and "SD1.5" in problems[0].message


def test_a_sampler_the_family_lacks_is_refused_naming_those_it_has(tiny):
    model, clip, _ = load(tiny)
    missing = next((name for name in sampling.SAMPLER_NAMES if name not in tiny.family.samplers), None)
    if missing is None:
        pytest.skip("every ComfyUI sampler draws here")
    with pytest.raises(NodeError, match="euler"):
        run(sampling.ksampler, model=model, seed=0, steps=2, cfg=4.0, sampler_name=missing, scheduler="simple",
            positive=encode(clip, "a"), negative=encode(clip, ""), latent_image=empty_latent(tiny))


# --------------------------------------------------------------------------- latents


def test_empty_latents_are_comfyuis_and_fit_any_model(tiny, flux):
    (sd,) = run(latents.empty_latent_image, width=64, height=48, batch_size=2)
    (sd3,) = run(latents.empty_sd3_latent_image, width=64, height=48, batch_size=1)
    assert sd.samples.shape == (2, 4, 6, 8) and sd3.samples.shape == (1, 16, 6, 8)  # ComfyUI's: an eighth
    assert not sd.samples.any()
    # a model with another channel count or VAE scale gets an empty latent of its own, for the same size
    fitted = latents.fit_to_model(sd, channels=16, downscale=2)
    assert fitted.shape == (2, 16, 24, 32) and not fitted.any()
    assert latents.fit_to_model(sd, channels=4, downscale=None) is sd.samples  # a model without a VAE
    drawn = Latent(torch.ones(1, 4, 6, 8))
    assert latents.fit_to_model(drawn, channels=4, downscale=2) is drawn.samples
    with pytest.raises(NodeError, match="4 channels, this model's take 16"):
        latents.fit_to_model(drawn, channels=16, downscale=8)


def test_latent_upscale_sizes():
    latent = Latent(torch.randn(1, 4, 8, 12))  # a 96x64 picture
    cases = {  # (width, height) asked -> latent (height, width), worked out by ComfyUI's rules
        (192, 128): (16, 24),
        (0, 128): (16, 24),  # width from the aspect ratio
        (96, 0): (8, 12),
        (8, 8): (8, 8),  # never under 64 pixels a side
        (0, 0): (8, 12),  # unchanged
    }
    for (width, height), expected in cases.items():
        (out,) = run(latents.latent_upscale, samples=latent, upscale_method="nearest-exact", width=width,
                     height=height, crop="disabled")
        assert tuple(out.samples.shape[-2:]) == expected, (width, height)
    (by,) = run(latents.latent_upscale_by, samples=latent, upscale_method="bilinear", scale_by=1.5)
    assert tuple(by.samples.shape[-2:]) == (12, 18)
    # nearest-exact doubling repeats each cell
    (doubled,) = run(latents.latent_upscale_by, samples=latent, upscale_method="nearest-exact", scale_by=2.0)
    assert torch.equal(doubled.samples, latent.samples.repeat_interleave(2, -1).repeat_interleave(2, -2))
    # center crop to a square keeps the middle 8x8 cells
    (square,) = run(latents.latent_upscale, samples=latent, upscale_method="nearest-exact", width=64, height=64,
                    crop="center")
    assert torch.equal(square.samples, latent.samples[..., :, 2:10])


def test_bislerp_follows_the_arc_between_neighbours():
    # two cells side by side, pointing along two orthogonal channels, with lengths 1 and 3
    latent = torch.zeros(1, 2, 1, 2)
    latent[0, 0, 0, 0], latent[0, 1, 0, 1] = 1.0, 3.0
    out = latents.bislerp(latent, width=4, height=1)[0, :, 0]  # [channels, 4 cells]
    # new cell centres fall at 0, 0.25, 0.75, 1 of the way (half-cell centres, clamped at the edges)
    for cell, ratio in enumerate([0.0, 0.25, 0.75, 1.0]):
        angle, length = ratio * math.pi / 2, 1 + 2 * ratio
        expected = torch.tensor([math.cos(angle), math.sin(angle)]) * length
        assert torch.allclose(out[:, cell], expected, atol=1e-5), cell
    # a latent of one direction everywhere keeps the first neighbour (too parallel to interpolate)
    same = torch.ones(1, 2, 1, 2) * torch.tensor([1.0, 2.0]).view(1, 1, 1, 2)
    assert torch.allclose(latents.bislerp(same, 4, 1)[0, 0, 0], torch.tensor([1.0, 1.0, 1.0, 2.0]))


def test_vae_encode_cuts_the_picture_to_whole_latent_cells(tiny):
    picture = torch.rand(1, SIDE + 1, SIDE + 1, 3)
    (latent,) = run(latents.vae_encode, pixels=picture, vae=tiny)
    (exact,) = run(latents.vae_encode, pixels=picture[:, :SIDE, :SIDE], vae=tiny)
    assert torch.equal(latent.samples, exact.samples)
    # with 8-pixel cells (every real model's VAE) the middle is kept: 21x19 -> rows 2..17, columns 1..16
    picture = torch.rand(1, 21, 19, 3)
    assert torch.equal(latents.whole_cells(picture, 8), picture[:, 2:18, 1:17])


# --------------------------------------------------------------------------- part loaders


def write_part_files(base, folder) -> dict[str, str]:
    """``base``'s parts as files of their own, as ComfyUI keeps them: the denoiser in its original
    names (a bare LDM UNet, a BFL transformer), text encoders in Hugging Face names, the VAE in LDM names."""
    from safetensors.torch import load_file, save_file

    from lora_nodes.models.bfl import to_bfl
    from lora_nodes.models.ldm import vae_key_map
    from lora_nodes.models.save import save_single_file
    from lora_nodes.models.text_names import file_state_dict

    c = base.components
    files = {"denoiser": folder / "denoiser.safetensors", "vae": folder / "vae.safetensors"}
    if "transformer" in c:
        denoiser = to_bfl(c["transformer"].state_dict(), base.family, c["transformer"].config)
    else:
        whole = load_file(str(save_single_file(base, folder / "whole.safetensors")))
        prefix = "model.diffusion_model."
        denoiser = {k[len(prefix):]: v for k, v in whole.items() if k.startswith(prefix)}
    save_file({k: v.contiguous() for k, v in denoiser.items()}, str(files["denoiser"]))
    for text in base.family.text_encoders:
        files[text.component] = folder / f"{text.component}.safetensors"
        state = {k: v for k, v in file_state_dict(c[text.component]).items() if k != "encoder.embed_tokens.weight"}
        save_file(state, str(files[text.component]))
    names = vae_key_map(c["vae"].config)
    save_file({names[k]: (v.reshape(*v.shape, 1, 1) if ".attentions." in k and v.ndim == 2 else v).contiguous()
               for k, v in c["vae"].state_dict().items()}, str(files["vae"]))
    return {key: str(path) for key, path in files.items()}


def test_sd_parts_with_a_lora_draw_what_the_whole_checkpoint_draws(tiny, tmp_path):
    files = write_part_files(tiny, tmp_path)
    (model,) = run(loaders.unet_loader, unet_name=files["denoiser"], weight_dtype="default")
    (clip,) = run(loaders.clip_loader, clip_name=files["text_encoder"], type="stable_diffusion", device="default")
    vae = tiny  # VAELoader: see test_vae_loader_loads_a_vae_file_alone
    assert model.base is not clip.base
    parts_model, parts_clip = with_lora(model, clip, EXAMPLE_LORA, 0.8, 0.6)
    whole_model, whole_clip, whole_vae = load(tiny)
    latent = tiny_vae_latent(tiny)
    expected = draw(*with_lora(whole_model, whole_clip, EXAMPLE_LORA, 0.8, 0.6), whole_vae, latent=latent)
    assert torch.allclose(draw(parts_model, parts_clip, vae, latent=latent), expected, atol=1e-4)


def test_flux_parts_with_a_model_only_lora_and_guidance(flux, tmp_path):
    files = write_part_files(flux, tmp_path)
    (model,) = run(loaders.unet_loader, unet_name=files["denoiser"], weight_dtype="default")
    # DualCLIPLoader takes the two files in either order, as ComfyUI does
    (clip,) = run(loaders.dual_clip_loader, clip_name1=files["text_encoder_2"], clip_name2=files["text_encoder"],
                  type=flux.family.comfy_clip_types[0], device="default")
    vae = flux
    whole_model, whole_clip, whole_vae = load(flux)
    latent = tiny_vae_latent(flux)
    plain = draw(model, clip, vae, latent=latent)
    assert torch.allclose(plain, draw(whole_model, whole_clip, whole_vae, latent=latent), atol=1e-4)
    (styled,) = run(loaders.lora_loader_model_only, model=model, lora_name=str(FLUX_LORA), strength_model=1.0)
    assert not torch.allclose(draw(styled, clip, vae, latent=latent), plain, atol=1e-3)
    # the diffusion model file given to CheckpointLoaderSimple: validation says which loaders take it
    (problem,) = loaders.checkpoint_preflight({"ckpt_name": files["denoiser"]}, {}).problems
    assert problem[1] == "ckpt_name" and "UNETLoader" in problem[2] and "VAELoader" in problem[2]
    # LoraLoader with a LoRA that has no text-encoder modules leaves a CLIP of its own as it was
    styled_too, same_clip = with_lora(model, clip, FLUX_LORA)
    assert same_clip is clip and len(styled_too.loras) == 1


@pytest.mark.parametrize("fixture", ["tiny", "flux"])
def test_vae_loader_loads_a_vae_file_alone(request, fixture, tmp_path):
    """ComfyUI's VAELoader has no type input: the VAE file alone must tell what it is."""
    base = request.getfixturevalue(fixture)
    files = write_part_files(base, tmp_path)
    (vae,) = run(loaders.vae_loader, vae_name=files["vae"])
    assert vae.parts == ("vae",)
    latent = torch.randn(1, latents_channels(base), 8, 8)
    (image,) = run(latents.vae_decode, samples=Latent(latent, base.vae_scale_factor), vae=vae)
    (expected,) = run(latents.vae_decode, samples=Latent(latent, base.vae_scale_factor), vae=base)
    assert torch.allclose(image, expected, atol=1e-5)


def test_clip_loader_type_and_unet_weight_dtype(tiny, tmp_path):
    files = write_part_files(tiny, tmp_path)
    with pytest.raises(NodeError, match="'wan' is for a model family lora-nodes does not run"):
        run(loaders.clip_loader, clip_name=files["text_encoder"], type="wan", device="default")
    events = Collector()
    run(loaders.unet_loader, events, unet_name=files["denoiser"], weight_dtype="fp8_e4m3fn")
    (warning,) = events.of("warning")
    assert "fp8" in warning["message"]


# --------------------------------------------------------------------------- through the engine


def test_a_comfyui_graph_runs_on_the_engine_and_loads_the_checkpoint_once(tmp_path, monkeypatch):
    from lora_nodes.engine.scheduler import Runner
    from lora_nodes.graph import load_workflow
    from lora_nodes.models import loading

    loads = []
    real = loading.load_base
    monkeypatch.setattr(loading, "load_base", lambda *a, **k: loads.append(a) or real(*a, **k))
    path = write_workflow(tmp_path, f"""
nodes:
  ckpt: {{type: CheckpointLoaderSimple, inputs: {{ckpt_name: "builtin:tiny"}}}}
  lora: {{type: LoraLoader, inputs: {{model: [ckpt, 0], clip: [ckpt, 1], lora_name: "{EXAMPLE_LORA}",
                                      strength_model: 0.8, strength_clip: 0.5}}}}
  skip: {{type: CLIPSetLastLayer, inputs: {{clip: [lora, 1], stop_at_clip_layer: -2}}}}
  pos:  {{type: CLIPTextEncode, inputs: {{text: "a (red:1.2) circle", clip: [skip, 0]}}}}
  neg:  {{type: CLIPTextEncode, inputs: {{text: "", clip: [skip, 0]}}}}
  lat:  {{type: EmptyLatentImage, inputs: {{width: 32, height: 32}}}}
  ks:   {{type: KSampler, inputs: {{model: [lora, 0], seed: 1, steps: 2, cfg: 5.0, sampler_name: euler,
                                    scheduler: simple, positive: [pos, 0], negative: [neg, 0],
                                    latent_image: [lat, 0]}}}}
  up:   {{type: LatentUpscaleBy, inputs: {{samples: [ks, 0], upscale_method: bislerp, scale_by: 1.5}}}}
  ks2:  {{type: KSampler, inputs: {{model: [lora, 0], seed: 1, steps: 2, cfg: 5.0, sampler_name: euler,
                                    scheduler: simple, positive: [pos, 0], negative: [neg, 0],
                                    latent_image: [up, 0], denoise: 0.5}}}}
  img:  {{type: VAEDecode, inputs: {{samples: [ks2, 0], vae: [ckpt, 2]}}}}
  save: {{type: SaveImage, inputs: {{images: [img, 0], filename_prefix: core}}}}
""")
    events = Collector()
    result = Runner(output_dir=tmp_path / "out", emit=events).run(load_workflow(path))
    assert len(loads) == 1
    (png,) = sorted((tmp_path / "out").rglob("*.png"))
    from PIL import Image

    assert Image.open(png).size == (48, 48)
    assert not events.of("error"), events.of("error")
    assert result is not None


def test_validation_finds_a_clip_type_of_another_family_than_the_model(tiny, tmp_path, capsys):
    """DualCLIPLoader's type names one family: a KSampler fed its prompts with a model of another is refused
    before anything runs (the files are not even read)."""
    from lora_nodes.cli import main
    from lora_nodes.models.save import save_single_file

    model_file = tmp_path / "sd1.safetensors"
    save_single_file(tiny, model_file)
    (tmp_path / "clip_l.safetensors").write_bytes(b"")
    (tmp_path / "clip_g.safetensors").write_bytes(b"")
    path = write_workflow(tmp_path, f"""
nodes:
  ckpt: {{type: CheckpointLoaderSimple, inputs: {{ckpt_name: "{model_file}"}}}}
  clip: {{type: DualCLIPLoader, inputs: {{clip_name1: clip_l.safetensors, clip_name2: clip_g.safetensors, type: sdxl}}}}
  pos: {{type: CLIPTextEncode, inputs: {{text: a red circle, clip: [clip, 0]}}}}
  latent: {{type: EmptyLatentImage, inputs: {{width: 64, height: 64}}}}
  sample: {{type: KSampler, inputs: {{model: [ckpt, 0], positive: [pos, 0], negative: [pos, 0], latent_image: [latent, 0]}}}}
  image: {{type: VAEDecode, inputs: {{samples: [sample, 0], vae: [ckpt, 2]}}}}
  save: {{type: SaveImage, inputs: {{images: [image, 0]}}}}
""")
    assert main(["validate", str(path), "--json"]) == 2
    problems = json.loads(capsys.readouterr().out)
    mismatches = [p for p in problems if p["code"] == "family_mismatch"]
    assert mismatches and all(p["node"] == "sample" for p in mismatches), problems


def test_save_image_writes_comfyuis_pixel_levels_and_save_images_rounds(tmp_path):
    """ComfyUI's SaveImage cuts each level down (255 * value, then to 8 bits); ours rounds. Run headless,
    ComfyUI's node writes the levels ComfyUI would."""
    from PIL import Image

    from lora_nodes.nodes import images as our_images
    from lora_nodes.nodes.core import images as core_images

    picture = torch.tensor([0.0, 0.5, 0.999, 1.0 / 255 * 10.6]).view(1, 1, 4, 1).expand(1, 1, 4, 3).contiguous()
    context = NodeContext("n", "SaveImage", tmp_path, tmp_path, Collector())
    core_images.save_image.run(context, picture, "comfy")
    our_images.save_images.run(context, picture, "ours")
    comfy = list(Image.open(tmp_path / "comfy_00001.png").getdata())
    ours = list(Image.open(tmp_path / "ours_00001.png").getdata())
    assert [p[0] for p in comfy] == [0, 127, 254, 10]
    assert [p[0] for p in ours] == [0, 128, 255, 11]


def test_a_clip_skip_beyond_the_encoders_layers_says_how_many_there_are(tiny):
    _, clip, _ = load(tiny)
    layers = tiny.components["text_encoder"].config.num_hidden_layers
    with pytest.raises(NodeError, match=f"which has {layers}: use a clip skip .* of at most {layers}"):
        encode(clip.with_last_layer(-(layers + 2)), "a red circle")
