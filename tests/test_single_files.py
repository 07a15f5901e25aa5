"""Single-file checkpoints alone (issue 13, point 2): SD-family files load with no config folder, the
family and every dimension read from the tensors; component files load as a base of those parts
(ComfyUI's UNETLoader, CLIPLoader, DualCLIPLoader, VAELoader) through ``load_parts``.

Expectations are written here: the released models' config values as their published configs state
them, CLIP token ids as OpenAI's tokenizer gives them, and pictures compared with the built-ins'.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from lora_nodes import families
from lora_nodes.errors import ModelLoadError
from lora_nodes.lora.recipe import ModelRecipe
from lora_nodes.models.base import BaseModel
from lora_nodes.models.checkpoints import ldm_configs
from lora_nodes.models.ldm import to_ldm_checkpoint, vae_key_map
from lora_nodes.models.loading import base_family, load_base
from lora_nodes.models.parts import load_parts
from lora_nodes.models.save import save_single_file
from lora_nodes.models.text_names import file_state_dict
from lora_nodes.models.tokenizer import build_clip_tokenizer
from lora_nodes.nodes.sample import make_pipeline


def draw(base, seed=0, size=None):
    pipe = make_pipeline(ModelRecipe(base).materialize(), "euler")
    kwargs = {"height": size, "width": size} if size else {}
    with torch.inference_mode():
        return pipe("a red circle on a white background", num_inference_steps=3, output_type="pt",
                    generator=torch.Generator().manual_seed(seed), **kwargs).images


def bare_single_file(base, path, dtype=None):
    """``base`` saved as a single file, then rewritten with our embedded configs stripped (only the
    tensors, as other tools' files are), optionally in another dtype."""
    save_single_file(base, path)
    state = load_file(str(path))
    if dtype is not None:
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    save_file(state, str(path), metadata={"format": "pt"})
    return path


# what saving a transformers model writes into its config (the version, its class, its dtype), not the model
SAVING_RECORDS = ("transformers_version", "architectures", "dtype", "torch_dtype")


def configs_of(base):
    """Each model part's config (and the scheduler's), without private entries and without what saving a
    model records about the saving (:data:`SAVING_RECORDS`, which save_pretrained adds to the shared
    built-in's config when another test saves it)."""
    configs = {}
    for name, part in base.components.items():
        config = getattr(part, "config", None)
        if config is not None:
            data = config.to_dict() if hasattr(config, "to_dict") else json.loads(json.dumps(dict(config)))
            configs[name] = {k: v for k, v in data.items() if not k.startswith("_") and k not in SAVING_RECORDS}
    return configs


@pytest.fixture(scope="module")
def shapes():
    return load_base("builtin:shapes", dtype="float32", device="cpu")


def test_shapes_single_file_without_configs_draws_the_same_picture(shapes, tmp_path):
    path = bare_single_file(shapes, tmp_path / "shapes.safetensors")
    with open(path, "rb") as f:
        assert b"lora_nodes_configs" not in f.read(200_000)  # nothing of ours but the tensors
    assert base_family(str(path)) == (families.by_id("sd1"), [])  # validation asks for no config folder
    loaded = load_base(str(path), dtype="float32", device="cpu")
    assert loaded.components["vae"].config.scaling_factor == pytest.approx(0.986, abs=5e-4)  # not SD1.5's 0.18215
    assert configs_of(loaded) == configs_of(shapes)
    assert loaded.components["tokenizer"].get_vocab() == shapes.components["tokenizer"].get_vocab()
    assert torch.equal(draw(loaded), draw(shapes))


# What a single file's shapes cannot tell, so that a file that is none of ours takes it from the family's
# released model (written here from what the shapes hold: a count of groups or heads splits no tensor;
# the token ids and the projection are the tokenizer's and the contrastive head's; the sample size and the
# VAE's scaling factor are how the model was trained, not how it is built).
UNTOLD_BY_SHAPES = {
    "unet": {"sample_size"},
    "vae": {"norm_num_groups", "sample_size", "scaling_factor"},
    "text_encoder": {"num_attention_heads", "projection_dim", "bos_token_id", "eos_token_id", "pad_token_id"},
}


def test_shapes_single_file_dimensions_come_from_the_shapes_not_from_recognising_it(shapes, tmp_path, monkeypatch):
    """The proof above with recognition of our built-ins switched off: every dimension is read from
    the tensors' shapes; what shapes cannot tell (UNTOLD_BY_SHAPES) is all that still needs the
    built-in's config, and given that, the picture is the same."""
    from lora_nodes.models import known_configs

    path = bare_single_file(shapes, tmp_path / "shapes.safetensors")
    monkeypatch.setattr(known_configs, "recognised", lambda *args, **kwargs: None)
    loaded = load_base(str(path), dtype="float32", device="cpu")
    ours, theirs = configs_of(loaded), configs_of(shapes)
    for name, untold in UNTOLD_BY_SHAPES.items():
        told = {k: v for k, v in ours[name].items() if k not in untold}
        assert told == {k: v for k, v in theirs[name].items() if k not in untold}, name
    assert ours["scheduler"] == theirs["scheduler"]
    # the tokenizer is still ours, told by the encoder's vocabulary size (no released CLIP has 640 tokens)
    assert loaded.components["tokenizer"].get_vocab() == shapes.components["tokenizer"].get_vocab()
    # with what shapes cannot tell given (the built-in's modules, holding the weights the file gave)
    given = dict(loaded.components)
    for name in UNTOLD_BY_SHAPES:
        given[name] = copy.deepcopy(shapes.components[name])
        given[name].load_state_dict(loaded.components[name].state_dict())  # strict: same names, same shapes
    assert torch.equal(draw(BaseModel(str(path), given, torch.float32, torch.device("cpu"))), draw(shapes))


def test_tiny_single_files_alone_in_half_precision(tiny, tiny_sdxl, tmp_path):
    for base, dtype in ((tiny, torch.float16), (tiny_sdxl, torch.bfloat16)):
        path = bare_single_file(base, tmp_path / f"{base.family.id}.safetensors", dtype)
        loaded = load_base(str(path), dtype="float32", device="cpu")
        assert loaded.family is base.family and configs_of(loaded) == configs_of(base)
        tolerance = {torch.float16: 2**-10, torch.bfloat16: 2**-7}[dtype]
        ours, theirs = file_state_dict(base.unet), file_state_dict(loaded.unet)
        assert all(torch.allclose(ours[k], theirs[k], rtol=tolerance, atol=tolerance) for k in ours)


def test_tiny_sdxl_single_file_alone_is_the_same_model(tiny_sdxl, tmp_path):
    """Same configs (above), same weights and tokenizers, same schedule: the same pictures."""
    loaded = load_base(str(bare_single_file(tiny_sdxl, tmp_path / "xl.safetensors")), dtype="float32", device="cpu")
    assert configs_of(loaded) == configs_of(tiny_sdxl)
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        ours, theirs = file_state_dict(tiny_sdxl.components[name]), file_state_dict(loaded.components[name])
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours), name
    for name in ("tokenizer", "tokenizer_2"):
        assert loaded.components[name].get_vocab() == tiny_sdxl.components[name].get_vocab()
        assert loaded.components[name].pad_token == tiny_sdxl.components[name].pad_token


def test_comfyui_scaled_fp8_single_file(tiny, tmp_path):
    """ComfyUI's scaled fp8: each weight in float8 with a scale beside it, and a marker key."""
    state = load_file(str(bare_single_file(tiny, tmp_path / "full.safetensors")))
    scaled = {}
    for key, value in state.items():
        if key.startswith("model.diffusion_model.") and key.endswith(".weight") and value.ndim == 2:
            scale = value.abs().max() / 448
            scaled[key] = (value / scale).to(torch.float8_e4m3fn)
            scaled[key[: -len(".weight")] + ".scale_weight"] = scale.reshape(1)
        else:
            scaled[key] = value
    scaled["scaled_fp8"] = torch.empty(0, dtype=torch.float8_e4m3fn)
    save_file(scaled, str(tmp_path / "fp8.safetensors"))
    loaded = load_base(str(tmp_path / "fp8.safetensors"), dtype="float32", device="cpu")
    ours, theirs = file_state_dict(tiny.unet), file_state_dict(loaded.unet)
    assert configs_of(loaded) == configs_of(tiny)
    assert all(torch.allclose(ours[k], theirs[k], rtol=2**-3, atol=ours[k].abs().max() * 2**-3) for k in ours)


# --------------------------------------------------------------------------- real sizes, from headers only

CLIP_L = {"hidden_size": 768, "intermediate_size": 3072, "num_attention_heads": 12, "num_hidden_layers": 12,
          "vocab_size": 49408, "max_position_embeddings": 77, "projection_dim": 768}
OPEN_CLIP_H = {**CLIP_L, "hidden_size": 1024, "intermediate_size": 4096, "num_attention_heads": 16,
               "num_hidden_layers": 24, "projection_dim": 1024, "hidden_act": "gelu"}
OPEN_CLIP_G = {**CLIP_L, "hidden_size": 1280, "intermediate_size": 5120, "num_attention_heads": 20,
               "num_hidden_layers": 32, "projection_dim": 1280, "hidden_act": "gelu"}
SD_VAE = {"block_out_channels": [128, 256, 512, 512], "layers_per_block": 2, "latent_channels": 4,
          "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4}
SD_BLOCKS = {"down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
             "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3}
SD15_UNET = {"block_out_channels": [320, 640, 1280, 1280], "layers_per_block": 2, "cross_attention_dim": 768,
             "attention_head_dim": 8, **SD_BLOCKS}
SD21_UNET = {**SD15_UNET, "cross_attention_dim": 1024, "attention_head_dim": [5, 10, 20, 20],
             "use_linear_projection": True}
SDXL_UNET = {"block_out_channels": [320, 640, 1280], "layers_per_block": 2, "cross_attention_dim": 2048,
             "transformer_layers_per_block": [1, 2, 10], "attention_head_dim": [5, 10, 20],
             "use_linear_projection": True, "addition_embed_type": "text_time", "addition_time_embed_dim": 256,
             "projection_class_embeddings_input_dim": 2816,
             "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
             "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"]}


def header_of(unet, vae, texts):
    """A single file of real shapes on the meta device: the released models' parts as diffusers and
    transformers build them from the configs above, in LDM/SGM names (no weights anywhere)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    with torch.device("meta"):
        u, v = UNet2DConditionModel(**unet), AutoencoderKL(**SD_VAE)
        encoders = [file_state_dict(CLIPTextModelWithProjection(CLIPTextConfig(**t))) for t in texts]
    if len(texts) == 1 and texts[0]["hidden_size"] == 768:  # SD1.5 keeps CLIP-L without its projection
        encoders[0] = {k: t for k, t in encoders[0].items() if not k.startswith("text_projection")}
    return to_ldm_checkpoint(u.state_dict(), v.state_dict(), encoders[0], u.config, v.config,
                             text_encoder_2=encoders[1] if len(encoders) > 1 else None)


def fields(config, expected):
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in config.items() if k in expected}


@pytest.mark.parametrize(("unet", "texts", "family_id"), [
    (SD15_UNET, [CLIP_L], "sd1"), (SD21_UNET, [OPEN_CLIP_H], "sd2"), (SDXL_UNET, [CLIP_L, OPEN_CLIP_G], "sdxl")],
    ids=["sd15", "sd21", "sdxl"])
def test_released_model_configs_are_read_from_shapes(unet, texts, family_id):
    state = header_of(unet, SD_VAE, texts)
    family = families.from_checkpoint({k: v.shape for k, v in state.items()})
    assert family.id == family_id
    configs = ldm_configs(state, family)
    assert fields(configs["unet"], unet) == unet
    assert fields(configs["vae"], SD_VAE) == SD_VAE and configs["vae"]["norm_num_groups"] == 32
    for component, text in zip(family.text_components, texts):
        want = {k: v for k, v in text.items() if k != "projection_dim" or component == "text_encoder_2"}
        if family_id == "sd2":  # diffusers keeps the OpenCLIP encoder without its last layer
            want["num_hidden_layers"] = 23
        assert fields(configs[component], want) == want, component
    assert configs["scheduler"]["prediction_type"] == "epsilon"  # meta tensors: no probe, no marker
    expected_scaling = {"sd1": 0.18215, "sd2": 0.18215, "sdxl": 0.13025}[family_id]
    assert configs["vae"]["scaling_factor"] == expected_scaling


def test_v_prediction_is_told_by_marker_or_by_the_weights():
    sd2 = families.by_id("sd2")
    state = header_of(SD21_UNET, SD_VAE, [OPEN_CLIP_H])
    probe = "model.diffusion_model.output_blocks.11.1.transformer_blocks.0.norm1.bias"
    assert probe in state
    generator = torch.Generator().manual_seed(0)
    state[probe] = torch.randn(320, generator=generator) * 0.2  # spread like the 768-v model's
    configs = ldm_configs(state, sd2)
    assert configs["scheduler"]["prediction_type"] == "v_prediction" and configs["unet"]["sample_size"] == 96
    state[probe] = torch.randn(320, generator=generator) * 0.02  # like the 512 px noise-prediction model's
    configs = ldm_configs(state, sd2)
    assert configs["scheduler"]["prediction_type"] == "epsilon" and configs["unet"]["sample_size"] == 64
    sdxl_state = header_of(SDXL_UNET, SD_VAE, [CLIP_L, OPEN_CLIP_G])
    assert ldm_configs(sdxl_state, families.by_id("sdxl"))["scheduler"]["prediction_type"] == "epsilon"
    sdxl_state["v_pred"] = torch.tensor([])  # ComfyUI's marker (a v-prediction SDXL fine-tune)
    assert ldm_configs(sdxl_state, families.by_id("sdxl"))["scheduler"]["prediction_type"] == "v_prediction"


def test_clip_tokenizer_from_the_shipped_merges():
    """OpenAI's CLIP ids for known words, CLIP's end-token padding, and OpenCLIP's "!" (id 0)."""
    tokenizer = build_clip_tokenizer()
    assert len(tokenizer) == 49408
    assert tokenizer("a photo of a cat")["input_ids"] == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert tokenizer("x", padding="max_length", max_length=5)["input_ids"][-1] == 49407
    assert build_clip_tokenizer("!")("x", padding="max_length", max_length=5)["input_ids"][-1] == 0


# --------------------------------------------------------------------------- parts (ComfyUI's loaders)


def test_flux_component_files_load_as_parts(flux, tmp_path):
    """The transformer alone (BFL names), clip_l (HF names), t5 (HF names, half) and ae (LDM names),
    as ComfyUI keeps them, with the two text encoders given in DualCLIPLoader's free order."""
    from lora_nodes.models.bfl import to_bfl

    c = flux.components
    files = {"denoiser": tmp_path / "flux1.safetensors", "text_encoder": tmp_path / "t5xxl.safetensors",
             "text_encoder_2": tmp_path / "clip_l.safetensors", "vae": tmp_path / "ae.safetensors"}
    save_file({k: v.contiguous() for k, v in to_bfl(c["transformer"].state_dict(), flux.family,
                                                    c["transformer"].config).items()}, str(files["denoiser"]))
    t5 = {k: v.half() for k, v in c["text_encoder_2"].state_dict().items() if k != "encoder.embed_tokens.weight"}
    save_file(t5, str(files["text_encoder"]))
    save_file(file_state_dict(c["text_encoder"]), str(files["text_encoder_2"]))
    names = vae_key_map(c["vae"].config)
    save_file({names[k]: (v.reshape(*v.shape, 1, 1) if ".attentions." in k and v.ndim == 2 else v).contiguous()
               for k, v in c["vae"].state_dict().items()}, str(files["vae"]))
    whole = load_parts(files, dtype="float32", device="cpu")
    assert whole.family is flux.family and configs_of(whole)["vae"]["scaling_factor"] == 0.3611
    assert configs_of(whole)["transformer"] == configs_of(flux)["transformer"]
    assert file_state_dict(whole.components["text_encoder"]).keys() == file_state_dict(c["text_encoder"]).keys()
    assert whole.components["tokenizer_2"].get_vocab() == flux.components["tokenizer_2"].get_vocab()
    clip_only = load_parts({"text_encoder": files["text_encoder_2"], "text_encoder_2": files["text_encoder"]},
                           family_hint="flux", dtype="float32", device="cpu")
    assert clip_only.family is flux.family and clip_only.parts == ("text_encoder", "text_encoder_2")
    assert "transformer.x_embedder" not in clip_only.lora_targets
    vae_only = load_parts({"vae": files["vae"]}, family_hint="flux", dtype="float32", device="cpu")
    assert vae_only.components["vae"].config.shift_factor == 0.1159


def test_sd_parts_load_by_comfyui_clip_type(tiny, tmp_path):
    full = load_file(str(bare_single_file(tiny, tmp_path / "tiny.safetensors")))
    unet = {k[len("model.diffusion_model."):]: v for k, v in full.items() if k.startswith("model.diffusion_model.")}
    save_file(unet, str(tmp_path / "unet.safetensors"))  # ComfyUI's diffusion_models: the UNet bare
    save_file(file_state_dict(tiny.components["text_encoder"]), str(tmp_path / "clip.safetensors"))
    model = load_parts({"denoiser": tmp_path / "unet.safetensors"}, dtype="float32", device="cpu")
    assert model.family is tiny.family and model.parts == ("unet",)
    assert all(torch.equal(a, b) for a, b in zip(model.unet.state_dict().values(), tiny.unet.state_dict().values()))
    clip = load_parts({"text_encoder": tmp_path / "clip.safetensors"}, family_hint="stable_diffusion",
                      dtype="float32", device="cpu")
    assert clip.family is tiny.family and clip.components["tokenizer"].get_vocab() == \
        tiny.components["tokenizer"].get_vocab()
    with pytest.raises(Exception, match="give its type"):
        load_parts({"text_encoder": tmp_path / "clip.safetensors"}, device="cpu")


def test_a_lora_on_a_base_of_some_parts_places_what_that_part_holds(tiny, tmp_path):
    """ComfyUI's LoraLoader patches MODEL and CLIP apart: on a text-encoder-only base the LoRA's UNet
    modules are for the other base, not modules without a place."""
    from lora_nodes.lora.files import read_lora
    from lora_nodes.lora.placement import check_placement
    from lora_nodes.lora.synthetic import synthetic_lora

    save_file(file_state_dict(tiny.components["text_encoder"]), str(tmp_path / "clip.safetensors"))
    clip = load_parts({"text_encoder": tmp_path / "clip.safetensors"}, family_hint="stable_diffusion",
                      dtype="float32", device="cpu")
    save_file(synthetic_lora(tiny, rank=2, seed=3, fmt="peft"), str(tmp_path / "lora.safetensors"))
    lora = read_lora(tmp_path / "lora.safetensors")
    placement = check_placement(lora, clip)
    text_modules = {k for k in lora.modules if families.component_of(k) == "text_encoder"}
    assert placement.unplaced == {} and set(placement.sources) == text_modules and text_modules


def test_a_text_encoder_whose_tokenizer_is_unknown_says_what_works(flux, tmp_path):
    """A T5 of a vocabulary we ship no tokenizer for (a real T5-XXL has 32128 tokens): the part loader names
    the file and says to load the model with LoadBase and a config folder (its tokenizer_2/)."""
    t5 = {k: v for k, v in flux.components["text_encoder_2"].state_dict().items() if k != "encoder.embed_tokens.weight"}
    t5["shared.weight"] = torch.cat([t5["shared.weight"], torch.zeros(7, t5["shared.weight"].shape[1])])
    save_file({k: v.contiguous() for k, v in t5.items()}, str(tmp_path / "t5xxl_other.safetensors"))
    save_file(file_state_dict(flux.components["text_encoder"]), str(tmp_path / "clip_l.safetensors"))
    with pytest.raises(ModelLoadError, match=r"t5xxl_other\.safetensors: no tokenizer is known.*LoadBase.*config"):
        load_parts({"text_encoder": tmp_path / "clip_l.safetensors", "text_encoder_2": tmp_path / "t5xxl_other.safetensors"},
                   family_hint="flux", dtype="float32", device="cpu")
