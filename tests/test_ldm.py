"""diffusers <-> single-file LDM checkpoint conversion (lora_nodes.models.ldm), on tiny models."""

from __future__ import annotations

import json
import string
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from lora_nodes import families
from lora_nodes.families import SD1, SD2, SDXL
from lora_nodes.models.ldm import (
    from_ldm_checkpoint,
    to_ldm_checkpoint,
    unet_key_map,
    unet_module_map,
    vae_key_map,
)
from lora_nodes.models.text_names import file_state_dict

# where single-file checkpoints keep each part (the layout A1111 and ComfyUI read)
UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
SD2_TEXT_PREFIX = "cond_stage_model.model."
SDXL_TEXT_2_PREFIX = "conditioner.embedders.1.model."


def _detect(checkpoint):
    return families.from_checkpoint({k: tuple(v.shape) for k, v in checkpoint.items()})

SD1_UNET = {
    "sample_size": 16,
    "block_out_channels": (32, 64),
    "layers_per_block": 1,
    "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
    "cross_attention_dim": 32,
    "attention_head_dim": 4,
    "norm_num_groups": 8,
}
SD1_UNET_DEEP = dict(
    SD1_UNET,
    block_out_channels=(32, 32, 64),
    layers_per_block=2,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
)
SD2_UNET = dict(SD1_UNET, cross_attention_dim=1024, use_linear_projection=True)
SDXL_UNET = {
    "sample_size": 16,
    "block_out_channels": (32, 64),
    "layers_per_block": (1, 2),
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"),
    "transformer_layers_per_block": (1, 2),
    "attention_head_dim": (4, 8),
    "cross_attention_dim": 64,
    "use_linear_projection": True,
    "norm_num_groups": 8,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 8,
    "projection_class_embeddings_input_dim": 16 + 6 * 8,
}
VAE = {
    "block_out_channels": (16, 32),
    "down_block_types": ("DownEncoderBlock2D",) * 2,
    "up_block_types": ("UpDecoderBlock2D",) * 2,
    "norm_num_groups": 8,
    "latent_channels": 4,
    "sample_size": 32,
}
CLIP = {
    "hidden_size": 32,
    "intermediate_size": 37,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "vocab_size": 200,
    "max_position_embeddings": 77,
    "projection_dim": 16,
    "bos_token_id": 0,
    "eos_token_id": 1,
    "pad_token_id": 1,
}

# Real configs (only built on the meta device, so no memory and no download).
SD15_UNET_FULL = {
    "block_out_channels": (320, 640, 1280, 1280),
    "layers_per_block": 2,
    "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
    "sample_size": 64,
}
SDXL_UNET_FULL = {
    "block_out_channels": (320, 640, 1280),
    "layers_per_block": 2,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "transformer_layers_per_block": (1, 2, 10),
    "attention_head_dim": (5, 10, 20),
    "cross_attention_dim": 2048,
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,
    "sample_size": 128,
}


def _unet(config: dict, seed: int = 0):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(**config)


def _vae(seed: int = 0):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(**VAE)


def _clip(seed: int = 0, projection: bool = False):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    cls = CLIPTextModelWithProjection if projection else CLIPTextModel
    return cls(CLIPTextConfig(**CLIP))


def _sd1(config: dict = SD1_UNET, seed: int = 0) -> dict:
    return {"unet": _unet(config, seed), "vae": _vae(seed), "text_encoder": _clip(seed)}


@pytest.fixture(scope="module")
def sd1():
    return _sd1()


@pytest.fixture(scope="module")
def sdxl():
    return {
        "unet": _unet(SDXL_UNET),
        "vae": _vae(),
        "text_encoder": _clip(),
        "text_encoder_2": _clip(seed=1, projection=True),
    }


def _checkpoint(models: dict) -> dict[str, torch.Tensor]:
    """``to_ldm_checkpoint`` of live models, fed the models' own state-dict spellings."""
    te2 = models.get("text_encoder_2")
    return to_ldm_checkpoint(
        models["unet"].state_dict(),
        models["vae"].state_dict(),
        models["text_encoder"].state_dict(),
        models["unet"].config,
        models["vae"].config,
        text_encoder_2=te2.state_dict() if te2 is not None else None,
    )


def _expected(models: dict) -> dict[str, dict[str, torch.Tensor]]:
    """Each component's weights as from_ldm_checkpoint names them (text encoders in file spelling)."""
    out = {}
    for name, model in models.items():
        state = file_state_dict(model) if name.startswith("text_encoder") else model.state_dict()
        out[name] = {k: v for k, v in state.items() if not k.endswith("position_ids")}
    return out


def _assert_same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], what: str) -> None:
    assert set(got) == set(want), f"{what}: {sorted(set(got) ^ set(want))[:5]}"
    for key, value in want.items():
        assert got[key].dtype == value.dtype and got[key].shape == value.shape, f"{what}: {key}"
        assert torch.equal(got[key], value), f"{what}: {key} differs"


# --------------------------------------------------------------------------- 1. round trips, bijective maps


@pytest.mark.parametrize("config", [SD1_UNET, SD1_UNET_DEEP, SDXL_UNET, SD15_UNET_FULL, SDXL_UNET_FULL])
def test_unet_maps_cover_every_parameter_once(config):
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        names = set(UNet2DConditionModel(**config).state_dict())
    mapping = unet_key_map(config)
    assert set(mapping) == names
    assert len(set(mapping.values())) == len(mapping)
    modules = unet_module_map(config)
    assert len(set(modules.values())) == len(modules)
    for name, ldm in mapping.items():
        module, param = name.rsplit(".", 1)
        assert modules[module] + "." + param == ldm


def test_vae_map_covers_every_parameter_once(sd1):
    mapping = vae_key_map(sd1["vae"].config)
    assert set(mapping) == set(sd1["vae"].state_dict())
    assert len(set(mapping.values())) == len(mapping)


@pytest.mark.parametrize("config", [SD1_UNET, SD1_UNET_DEEP], ids=["sd1", "sd1-deep"])
def test_sd1_round_trip_is_bitwise_identical(config):
    models = _sd1(config)
    checkpoint = _checkpoint(models)
    back = from_ldm_checkpoint(checkpoint, SD1, models["unet"].config, models["vae"].config)
    assert set(back) == {"unet", "vae", "text_encoder"}
    for name, want in _expected(models).items():
        _assert_same(back[name], want, name)
    text_keys = [k for k in checkpoint if k.startswith("cond_stage_model.transformer.text_model.")]
    assert len(text_keys) == len(back["text_encoder"])


def test_sdxl_round_trip_is_bitwise_identical(sdxl):
    checkpoint = _checkpoint(sdxl)
    back = from_ldm_checkpoint(checkpoint, SDXL, sdxl["unet"].config, sdxl["vae"].config)
    assert set(back) == {"unet", "vae", "text_encoder", "text_encoder_2"}
    for name, want in _expected(sdxl).items():
        _assert_same(back[name], want, name)
    # every checkpoint key is accounted for by exactly one component entry (in_proj holds three)
    counted = sum(len(v) for v in back.values()) - 2 * 2 * CLIP["num_hidden_layers"]
    assert counted == len(checkpoint)


def test_sd2_text_encoder_round_trips_through_open_clip_layout():
    models = _sd1(SD2_UNET)
    checkpoint = _checkpoint(models)
    assert _detect(checkpoint) is SD2
    assert SD2_TEXT_PREFIX + "transformer.resblocks.1.attn.in_proj_weight" in checkpoint
    back = from_ldm_checkpoint(checkpoint, SD2, models["unet"].config, models["vae"].config)
    for name, want in _expected(models).items():
        _assert_same(back[name], want, name)


def test_checkpoint_saves_with_safetensors(tmp_path, sdxl):
    # safetensors refuses tensors that share memory (split q/k/v, transposed projection)
    checkpoint = _checkpoint(sdxl)
    path = tmp_path / "sdxl.safetensors"
    save_file(checkpoint, str(path))
    loaded = load_file(str(path))
    assert loaded.keys() == checkpoint.keys()
    assert all(torch.equal(loaded[k], checkpoint[k]) and loaded[k].dtype == checkpoint[k].dtype for k in checkpoint)
    # the file reads back as the same SDXL model
    assert _detect(loaded) is SDXL
    back = from_ldm_checkpoint(loaded, SDXL, sdxl["unet"].config, sdxl["vae"].config)
    for name, want in _expected(sdxl).items():
        _assert_same(back[name], want, name)


# --------------------------------------------------------------------------- 2. diffusers' own single-file loader


def _tiny_tokenizer(folder: Path):
    from transformers import CLIPTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    chars = sorted(set(string.printable) - set(string.whitespace))
    tokens = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=77)


def test_diffusers_from_single_file_reads_our_checkpoint(tmp_path, monkeypatch, sd1):
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # The config folder comes from models with other weights (seed 1), and its weight files are
    # deleted, so whatever diffusers loads can only come from our checkpoint.
    other = _sd1(seed=1)
    pipe = StableDiffusionPipeline(
        **other,
        tokenizer=_tiny_tokenizer(tmp_path / "tok"),
        scheduler=DDIMScheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    folder = tmp_path / "pipe"
    pipe.save_pretrained(folder)
    for weights in [*folder.rglob("*.safetensors"), *folder.rglob("*.bin")]:
        weights.unlink()
    path = tmp_path / "sd1.safetensors"
    save_file(_checkpoint(sd1), str(path))

    loaded = StableDiffusionPipeline.from_single_file(
        str(path), config=str(folder), local_files_only=True, safety_checker=None
    )
    for name in ("unet", "vae", "text_encoder"):
        want = {k: v for k, v in sd1[name].state_dict().items() if not k.endswith("position_ids")}
        got = getattr(loaded, name).state_dict()
        _assert_same({k: got[k] for k in want if k in got}, want, name)
        assert not torch.equal(got[next(iter(want))], other[name].state_dict()[next(iter(want))])


# --------------------------------------------------------------------------- 3. known names


def test_sd1_unet_names():
    mapping = unet_key_map(SD1_UNET)
    assert mapping["down_blocks.1.resnets.0.conv1.weight"] == "input_blocks.3.0.in_layers.2.weight"
    assert mapping["down_blocks.0.downsamplers.0.conv.weight"] == "input_blocks.2.0.op.weight"
    assert mapping["down_blocks.0.attentions.0.proj_in.weight"] == "input_blocks.1.1.proj_in.weight"
    assert mapping["down_blocks.1.resnets.0.conv_shortcut.bias"] == "input_blocks.3.0.skip_connection.bias"
    assert mapping["conv_in.weight"] == "input_blocks.0.0.weight"
    assert mapping["time_embedding.linear_2.bias"] == "time_embed.2.bias"
    assert mapping["conv_norm_out.weight"] == "out.0.weight"
    assert mapping["conv_out.bias"] == "out.2.bias"
    # middle block: resnet, attention, resnet
    assert mapping["mid_block.resnets.0.norm1.weight"] == "middle_block.0.in_layers.0.weight"
    assert mapping["mid_block.attentions.0.transformer_blocks.0.attn2.to_k.weight"] == (
        "middle_block.1.transformer_blocks.0.attn2.to_k.weight"
    )
    assert mapping["mid_block.resnets.1.time_emb_proj.weight"] == "middle_block.2.emb_layers.1.weight"
    assert mapping["mid_block.resnets.1.norm2.bias"] == "middle_block.2.out_layers.0.bias"
    assert mapping["mid_block.resnets.1.conv2.weight"] == "middle_block.2.out_layers.3.weight"
    # up block 0 has no attentions: the upsampler sits in slot 1
    assert mapping["up_blocks.0.resnets.1.conv1.weight"] == "output_blocks.1.0.in_layers.2.weight"
    assert mapping["up_blocks.0.upsamplers.0.conv.weight"] == "output_blocks.1.1.conv.weight"
    assert mapping["up_blocks.1.attentions.1.proj_out.bias"] == "output_blocks.3.1.proj_out.bias"


def test_deep_unet_names_and_module_map():
    mapping = unet_key_map(SD1_UNET_DEEP)
    assert mapping["down_blocks.2.resnets.1.conv1.weight"] == "input_blocks.8.0.in_layers.2.weight"
    assert mapping["up_blocks.0.upsamplers.0.conv.weight"] == "output_blocks.2.1.conv.weight"
    # up block 1 has attentions: the upsampler sits in slot 2 after resnet and attention
    assert mapping["up_blocks.1.upsamplers.0.conv.weight"] == "output_blocks.5.2.conv.weight"
    assert mapping["up_blocks.2.attentions.2.proj_in.weight"] == "output_blocks.8.1.proj_in.weight"
    modules = unet_module_map(SD1_UNET_DEEP)
    assert modules["down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"] == (
        "input_blocks.4.1.transformer_blocks.0.attn1.to_q"
    )
    assert modules["down_blocks.1.attentions.0"] == "input_blocks.4.1"
    assert modules["up_blocks.0.resnets.2.conv_shortcut"] != ""  # present when channels change
    assert "down_blocks.1" not in modules


def test_full_size_names():
    sd15 = unet_key_map(SD15_UNET_FULL)
    assert len(sd15) == 686
    assert sd15["up_blocks.0.upsamplers.0.conv.weight"] == "output_blocks.2.1.conv.weight"
    assert sd15["up_blocks.2.upsamplers.0.conv.weight"] == "output_blocks.8.2.conv.weight"
    assert sd15["down_blocks.3.resnets.1.conv2.weight"] == "input_blocks.11.0.out_layers.3.weight"
    assert sd15["up_blocks.3.attentions.2.proj_out.weight"] == "output_blocks.11.1.proj_out.weight"
    sdxl = unet_key_map(SDXL_UNET_FULL)
    assert sdxl["add_embedding.linear_1.weight"] == "label_emb.0.0.weight"
    assert sdxl["add_embedding.linear_2.bias"] == "label_emb.0.2.bias"
    assert sdxl["down_blocks.2.attentions.1.transformer_blocks.9.ff.net.2.weight"] == (
        "input_blocks.8.1.transformer_blocks.9.ff.net.2.weight"
    )
    assert sdxl["up_blocks.0.upsamplers.0.conv.weight"] == "output_blocks.2.2.conv.weight"
    assert sdxl["up_blocks.1.upsamplers.0.conv.weight"] == "output_blocks.5.2.conv.weight"
    assert unet_module_map(SDXL_UNET_FULL)["down_blocks.1.attentions.0.transformer_blocks.1.attn2.to_k"] == (
        "input_blocks.4.1.transformer_blocks.1.attn2.to_k"
    )


def test_vae_names_and_shapes(sd1):
    mapping = vae_key_map(VAE)
    assert mapping["decoder.up_blocks.0.resnets.1.conv1.weight"] == "decoder.up.1.block.1.conv1.weight"
    assert mapping["decoder.up_blocks.1.resnets.0.norm1.bias"] == "decoder.up.0.block.0.norm1.bias"
    assert mapping["decoder.up_blocks.0.upsamplers.0.conv.weight"] == "decoder.up.1.upsample.conv.weight"
    assert mapping["encoder.down_blocks.0.downsamplers.0.conv.bias"] == "encoder.down.0.downsample.conv.bias"
    assert mapping["encoder.down_blocks.1.resnets.0.conv_shortcut.weight"] == (
        "encoder.down.1.block.0.nin_shortcut.weight"
    )
    assert mapping["decoder.up_blocks.1.resnets.0.conv_shortcut.weight"] == (
        "decoder.up.0.block.0.nin_shortcut.weight"
    )
    assert mapping["encoder.mid_block.resnets.1.conv2.weight"] == "encoder.mid.block_2.conv2.weight"
    assert mapping["decoder.mid_block.attentions.0.group_norm.weight"] == "decoder.mid.attn_1.norm.weight"
    assert mapping["decoder.mid_block.attentions.0.to_q.weight"] == "decoder.mid.attn_1.q.weight"
    assert mapping["encoder.mid_block.attentions.0.to_out.0.bias"] == "encoder.mid.attn_1.proj_out.bias"
    assert mapping["encoder.conv_norm_out.weight"] == "encoder.norm_out.weight"
    assert mapping["post_quant_conv.weight"] == "post_quant_conv.weight"
    checkpoint = _checkpoint(sd1)
    assert checkpoint[VAE_PREFIX + "decoder.mid.attn_1.v.weight"].shape == (32, 32, 1, 1)
    assert checkpoint[VAE_PREFIX + "decoder.mid.attn_1.v.bias"].shape == (32,)


def test_sdxl_text_encoder_layouts(sdxl):
    checkpoint = _checkpoint(sdxl)
    te2 = sdxl["text_encoder_2"].state_dict()
    fused = checkpoint[SDXL_TEXT_2_PREFIX + "transformer.resblocks.1.attn.in_proj_weight"]
    assert fused.shape == (96, 32)
    assert torch.equal(fused[32:64], te2["text_model.encoder.layers.1.self_attn.k_proj.weight"])
    projection = checkpoint[SDXL_TEXT_2_PREFIX + "text_projection"]
    assert torch.equal(projection, te2["text_projection.weight"].t())
    assert SDXL_TEXT_2_PREFIX + "positional_embedding" in checkpoint
    assert SDXL_TEXT_2_PREFIX + "ln_final.weight" in checkpoint
    assert SDXL_TEXT_2_PREFIX + "transformer.resblocks.0.mlp.c_fc.weight" in checkpoint
    assert "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight" in checkpoint
    assert UNET_PREFIX + "label_emb.0.0.weight" in checkpoint


# --------------------------------------------------------------------------- 4. errors and detection


def test_missing_and_unexpected_keys_are_named(sd1):
    checkpoint = _checkpoint(sd1)
    config, vae_config = sd1["unet"].config, sd1["vae"].config
    broken = dict(checkpoint)
    del broken[UNET_PREFIX + "input_blocks.3.0.in_layers.2.weight"]
    broken[VAE_PREFIX + "decoder.up.7.block.0.conv1.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match=r"input_blocks\.3\.0\.in_layers\.2\.weight") as error:
        from_ldm_checkpoint(broken, SD1, config, vae_config)
    assert "decoder.up.7.block.0.conv1.weight" in str(error.value)
    assert "1 missing" in str(error.value) and "1 unexpected" in str(error.value)

    no_text = {k: v for k, v in checkpoint.items() if not k.startswith("cond_stage_model.")}
    with pytest.raises(ValueError, match="cond_stage_model.transformer"):
        from_ldm_checkpoint(no_text, SD1, config, vae_config)
    with pytest.raises(ValueError, match="conditioner.embedders.0"):
        from_ldm_checkpoint(checkpoint, SDXL, config, vae_config)
    # an SD1 checkpoint against a deeper UNet config: many missing keys, counted
    with pytest.raises(ValueError, match=r"missing keys: .*\(\d+ in all\)"):
        from_ldm_checkpoint(checkpoint, SD1, SD1_UNET_DEEP, vae_config)


def test_to_ldm_rejects_state_that_does_not_fit(sd1):
    unet = dict(sd1["unet"].state_dict())
    unet.pop("conv_in.weight")
    with pytest.raises(ValueError, match="conv_in.weight"):
        to_ldm_checkpoint(unet, sd1["vae"].state_dict(), sd1["text_encoder"].state_dict(), SD1_UNET, VAE)
    with pytest.raises(ValueError, match="text_encoder_2"):
        to_ldm_checkpoint(
            sd1["unet"].state_dict(),
            sd1["vae"].state_dict(),
            sd1["text_encoder"].state_dict(),
            SDXL_UNET,
            VAE,
        )


def test_extra_top_level_keys_are_ignored(sd1):
    checkpoint = dict(_checkpoint(sd1))
    checkpoint["alphas_cumprod"] = torch.zeros(10)
    checkpoint["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(77)[None]
    back = from_ldm_checkpoint(checkpoint, SD1, SD1_UNET, VAE)
    assert not any("position_ids" in k for k in back["text_encoder"])


def test_detect_architecture(sd1, sdxl):
    assert _detect(_checkpoint(sd1)) is SD1
    assert _detect(_checkpoint(sdxl)) is SDXL
    unet_only = {
        UNET_PREFIX + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": torch.zeros(320, 1024)
    }
    assert _detect(unet_only) is SD2
    with pytest.raises(ValueError):
        _detect({"foo.weight": torch.zeros(1)})


def test_old_clip_names_without_text_model_level_are_read(sd1):
    checkpoint = {
        k.replace("cond_stage_model.transformer.text_model.", "cond_stage_model.transformer."): v
        for k, v in _checkpoint(sd1).items()
    }
    back = from_ldm_checkpoint(checkpoint, SD1, SD1_UNET, VAE)
    _assert_same(back["text_encoder"], _expected(sd1)["text_encoder"], "text_encoder")
