"""Built-in base models, made in code: nothing is downloaded.

``builtin:tiny`` and ``builtin:tiny-sdxl`` have random weights from fixed seeds; ``builtin:shapes``
loads trained weights shipped in the package.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from .. import families
from ..families import Family
from .tokenizer import build_t5_tokenizer, build_tokenizer

# The noise schedule SD1.x and SDXL share (their scheduler configs), and what each adds.
_SD_SCHEDULE: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "prediction_type": "epsilon",
    "steps_offset": 1,
    "timestep_spacing": "leading",
}
SD1_SCHEDULE: dict[str, Any] = {**_SD_SCHEDULE, "clip_sample": False, "set_alpha_to_one": False}
SDXL_SCHEDULE: dict[str, Any] = {**_SD_SCHEDULE, "interpolation_type": "linear"}

TINY_UNET: dict[str, Any] = {
    "sample_size": 16,
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": (32, 64),
    "layers_per_block": 1,
    "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
    "cross_attention_dim": 32,
    "attention_head_dim": 8,
    "norm_num_groups": 8,
}
TINY_VAE: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "block_out_channels": (16, 32),
    "down_block_types": ("DownEncoderBlock2D", "DownEncoderBlock2D"),
    "up_block_types": ("UpDecoderBlock2D", "UpDecoderBlock2D"),
    "latent_channels": 4,
    "norm_num_groups": 8,
    "sample_size": 32,
}
TINY_TEXT: dict[str, Any] = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_attention_heads": 4,
    "num_hidden_layers": 2,
    "max_position_embeddings": 77,
    "projection_dim": 32,
}


def build_tiny(seed: int = 0) -> dict[str, Any]:
    """``builtin:tiny``: an SD1.5-architecture pipeline of about 1M parameters with random weights.

    The same seed gives the same weights, without touching the caller's random state.
    """
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel

    tokenizer = build_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**TINY_UNET)
        vae = AutoencoderKL(**TINY_VAE)
        text_encoder = CLIPTextModel(_tiny_text_config(tokenizer))
    return {
        "unet": unet,
        "vae": vae,
        "text_encoder": text_encoder,
        "tokenizer": tokenizer,
        "scheduler": DDIMScheduler(**SD1_SCHEDULE),
    }


TINY_SDXL_UNET: dict[str, Any] = {
    **{k: TINY_UNET[k] for k in ("sample_size", "in_channels", "out_channels", "block_out_channels", "layers_per_block")},
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"),
    "transformer_layers_per_block": (1, 2),
    "attention_head_dim": (2, 4),
    "use_linear_projection": True,
    "cross_attention_dim": 80,  # text_encoder hidden (32) + text_encoder_2 hidden (48), as in SDXL
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 8,
    "projection_class_embeddings_input_dim": 96,  # 6 time ids * 8 + text_encoder_2 projection (48)
    "norm_num_groups": 8,
}


def _tiny_text_config(tokenizer, **changes: Any):
    from transformers import CLIPTextConfig

    vocab = tokenizer.get_vocab()
    return CLIPTextConfig(**{**TINY_TEXT, **changes}, vocab_size=len(vocab), bos_token_id=vocab[tokenizer.bos_token],
                          eos_token_id=vocab[tokenizer.eos_token], pad_token_id=vocab[tokenizer.pad_token])


def build_tiny_sdxl(seed: int = 0) -> dict[str, Any]:
    """``builtin:tiny-sdxl``: an SDXL-architecture pipeline (two text encoders, text-time conditioning).

    Its UNet follows SDXL's layout (no attention in the first block, several transformer layers
    per block, linear projections), so SDXL LoRA names (kohya's SGM ``input_blocks_...``) are real.
    """
    import torch
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    tokenizer = build_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**TINY_SDXL_UNET)
        vae = AutoencoderKL(**TINY_VAE)
        text_encoder = CLIPTextModel(_tiny_text_config(tokenizer))
        # wider than the first, as SDXL's OpenCLIP encoder is (tools tell the two apart by width)
        text_encoder_2 = CLIPTextModelWithProjection(_tiny_text_config(
            tokenizer, hidden_act="gelu", hidden_size=48, intermediate_size=96, projection_dim=48))
    return {
        "unet": unet,
        "vae": vae,
        "text_encoder": text_encoder,
        "text_encoder_2": text_encoder_2,
        "tokenizer": tokenizer,
        "tokenizer_2": build_tokenizer(),
        "scheduler": EulerDiscreteScheduler(**SDXL_SCHEDULE),
    }


# --------------------------------------------------------------------------- builtin:tiny-flux
# FLUX.1's architecture at a few hundred thousand parameters: 2 double and 2 single blocks (so
# block indices are exercised), guidance-distilled like FLUX.1-dev, CLIP-L-like and T5-like text
# encoders, a 16-channel VAE without quant convs, FLUX.1-dev's flow-matching schedule.

TINY_FLUX_TRANSFORMER: dict[str, Any] = {
    "patch_size": 1,
    "in_channels": 64,  # 16 latent channels x a 2x2 patch
    "num_layers": 2,
    "num_single_layers": 2,
    "attention_head_dim": 16,
    "num_attention_heads": 2,
    "joint_attention_dim": 32,  # the T5 encoder's width
    "pooled_projection_dim": 32,  # the CLIP encoder's width
    "guidance_embeds": True,
    "axes_dims_rope": (4, 4, 8),  # must sum to the head dim
}
TINY_FLUX_VAE: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ("DownEncoderBlock2D",) * 2,
    "up_block_types": ("UpDecoderBlock2D",) * 2,
    "block_out_channels": (8, 16),
    "layers_per_block": 1,
    "norm_num_groups": 4,
    "latent_channels": 16,
    "use_quant_conv": False,
    "use_post_quant_conv": False,
    "shift_factor": 0.1159,  # FLUX.1's
    "scaling_factor": 0.3611,
    "sample_size": 32,  # the pixels it draws by default (FLUX.1's VAE says 1024)
}
TINY_T5: dict[str, Any] = {
    "d_model": 32,
    "d_kv": 8,
    "d_ff": 64,
    "num_layers": 2,
    "num_heads": 4,
    "relative_attention_num_buckets": 8,
    "feed_forward_proj": "gated-gelu",
    "dropout_rate": 0.0,
}
# FLUX.1-dev's scheduler: the shift of the schedule grows with the image's token count
FLUX_SCHEDULE: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "shift": 3.0,
    "use_dynamic_shifting": True,
    "base_shift": 0.5,
    "max_shift": 1.15,
    "base_image_seq_len": 256,
    "max_image_seq_len": 4096,
}


def build_tiny_flux(seed: int = 0) -> dict[str, Any]:
    """``builtin:tiny-flux``: a FLUX.1-architecture pipeline (about 250k parameters) with random weights."""
    import torch
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from transformers import CLIPTextModel, T5Config, T5EncoderModel

    tokenizer, tokenizer_2 = build_tokenizer(), build_t5_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = FluxTransformer2DModel(**TINY_FLUX_TRANSFORMER)
        vae = AutoencoderKL(**TINY_FLUX_VAE)
        text_encoder = CLIPTextModel(_tiny_text_config(tokenizer, num_attention_heads=2))
        text_encoder_2 = T5EncoderModel(T5Config(**TINY_T5, vocab_size=len(tokenizer_2), pad_token_id=0,
                                                 eos_token_id=1, decoder_start_token_id=0))
    components = {"transformer": transformer, "vae": vae, "text_encoder": text_encoder,
                  "text_encoder_2": text_encoder_2}
    for model in components.values():
        model.eval()  # built from configs, models start in training mode (dropout on)
    return {**components, "tokenizer": tokenizer, "tokenizer_2": tokenizer_2,
            "scheduler": FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULE)}


# --------------------------------------------------------------------------- builtin:shapes
# A small SD1.5-architecture pipeline trained to draw ``a {colour} {shape} on a {background}
# background`` for the colours red, green, blue and yellow, the shapes circle, square and triangle,
# and white, black or gray backgrounds, at 64x64 pixels. ``purple`` and ``star`` were kept out of its
# training on purpose, so a LoRA has something new to teach it. The weights (float16, about 9 MB)
# were made by ``scripts/train_shapes.py`` (see ``docs/shapes.md``). The components are the real
# diffusers and transformers classes with the package's tokenizer and SD1.5's noise schedule, so
# LoRA loading, merging, training and sampling run on it exactly as on SD1.5.

SHAPES_WEIGHTS = Path(__file__).with_name("weights") / "shapes.safetensors"

SHAPES_UNET: dict[str, Any] = {
    "sample_size": 16,  # latents 16x16 -> 64x64 pixels
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": (48, 96, 96),
    "layers_per_block": 1,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "cross_attention_dim": 64,  # the text encoder's hidden size
    "attention_head_dim": 8,
    "norm_num_groups": 16,
}
SHAPES_VAE: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "block_out_channels": (16, 32, 64),  # three blocks: downsampling factor 4
    "down_block_types": ("DownEncoderBlock2D",) * 3,
    "up_block_types": ("UpDecoderBlock2D",) * 3,
    "layers_per_block": 1,
    "latent_channels": 4,
    "norm_num_groups": 4,  # groups of 4+ channels (see scripts/train_shapes.py: the VAE's exact start)
    "sample_size": 64,
}
SHAPES_TEXT: dict[str, Any] = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_attention_heads": 4,
    "num_hidden_layers": 2,
    "max_position_embeddings": 77,
    "projection_dim": 64,
}
SHAPES_PREFIXES = ("unet", "vae", "text_encoder")  # keys in the weights file: "{component}.{parameter}"


def shapes_components(vae_scaling_factor: float = 1.0) -> dict[str, Any]:
    """The ``builtin:shapes`` pipeline with freshly initialised weights (its trainer starts from these)."""
    # diffusers and transformers take seconds to import: only when a model is built
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = build_tokenizer()
    vocab = tokenizer.get_vocab()
    text_config = CLIPTextConfig(**SHAPES_TEXT, vocab_size=len(vocab), bos_token_id=vocab[tokenizer.bos_token],
                                 eos_token_id=vocab[tokenizer.eos_token], pad_token_id=vocab[tokenizer.pad_token])
    return {
        "unet": UNet2DConditionModel(**SHAPES_UNET),
        "vae": AutoencoderKL(**SHAPES_VAE, scaling_factor=vae_scaling_factor),
        "text_encoder": CLIPTextModel(text_config),
        "tokenizer": tokenizer,
        "scheduler": DDIMScheduler(**SD1_SCHEDULE),
    }


def build_shapes(weights: str | Path = SHAPES_WEIGHTS) -> dict[str, Any]:
    """``builtin:shapes``: the trained pipeline, loaded from the weights shipped in the package (float32)."""
    import torch
    from safetensors import safe_open

    with safe_open(str(weights), framework="pt") as f:
        scaling = float((f.metadata() or {}).get("vae_scaling_factor", "1.0"))
        state = {key: f.get_tensor(key).float() for key in f.keys()}  # noqa: SIM118 (safe_open has no iterator)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # initialisation is overwritten; fixed anyway so nothing depends on global state
        components = shapes_components(scaling)
    for prefix in SHAPES_PREFIXES:
        part = {key[len(prefix) + 1:]: value for key, value in state.items() if key.startswith(prefix + ".")}
        result = components[prefix].load_state_dict(part, strict=False)
        missing = [k for k in result.missing_keys if not k.endswith("position_ids")]
        if missing or result.unexpected_keys:
            raise RuntimeError(f"{Path(weights).name}: {prefix} weights do not match its config "
                               f"(missing {missing[:3]}, unexpected {result.unexpected_keys[:3]})")
        components[prefix].eval().requires_grad_(False)
    return components


BUILTINS: dict[str, Callable[[], dict[str, Any]]] = {
    "builtin:tiny": build_tiny,
    "builtin:tiny-sdxl": build_tiny_sdxl,
    "builtin:tiny-flux": build_tiny_flux,
    "builtin:shapes": build_shapes,  # trained, shipped weights (see docs/shapes.md)
}


def shapes_scaling_factor(weights: str | Path = SHAPES_WEIGHTS) -> float:
    """The VAE scaling factor ``builtin:shapes`` was trained with, from its weights' metadata."""
    from safetensors import safe_open

    with safe_open(str(weights), framework="pt") as f:
        return float((f.metadata() or {}).get("vae_scaling_factor", "1.0"))


def _text_data(config: Any) -> dict[str, Any]:
    return {k: v for k, v in config.to_dict().items() if not k.startswith("_")}


def builtin_configs(name: str) -> dict[str, Any]:
    """What a built-in is built from, nothing built: each model part's config (as JSON data; the
    text encoders' as their transformers config dicts), ``scheduler`` (with its ``_class_name``)
    and ``tokenizer``: ``"builtin"``. Single files of a built-in are recognised by these."""
    tokenizer = build_tokenizer()
    if name == "builtin:tiny-flux":
        t5_vocab = len(build_t5_tokenizer())
        return {"transformer": dict(TINY_FLUX_TRANSFORMER), "vae": dict(TINY_FLUX_VAE),
                "text_encoder": _text_data(_tiny_text_config(tokenizer, num_attention_heads=2)),
                "text_encoder_2": {**TINY_T5, "vocab_size": t5_vocab, "pad_token_id": 0, "eos_token_id": 1,
                                   "decoder_start_token_id": 0},
                "scheduler": {"_class_name": "FlowMatchEulerDiscreteScheduler", **FLUX_SCHEDULE}, "tokenizer": "builtin"}
    if name == "builtin:tiny-sdxl":
        second = _tiny_text_config(tokenizer, hidden_act="gelu", hidden_size=48, intermediate_size=96, projection_dim=48)
        return {"unet": dict(TINY_SDXL_UNET), "vae": dict(TINY_VAE), "text_encoder": _text_data(_tiny_text_config(tokenizer)),
                "text_encoder_2": _text_data(second),
                "scheduler": {"_class_name": "EulerDiscreteScheduler", **SDXL_SCHEDULE}, "tokenizer": "builtin"}
    if name == "builtin:shapes":
        vocab = tokenizer.get_vocab()
        from transformers import CLIPTextConfig

        text = CLIPTextConfig(**SHAPES_TEXT, vocab_size=len(vocab), bos_token_id=vocab[tokenizer.bos_token],
                              eos_token_id=vocab[tokenizer.eos_token], pad_token_id=vocab[tokenizer.pad_token])
        return {"unet": dict(SHAPES_UNET), "vae": {**SHAPES_VAE, "scaling_factor": shapes_scaling_factor()},
                "text_encoder": _text_data(text), "scheduler": {"_class_name": "DDIMScheduler", **SD1_SCHEDULE},
                "tokenizer": "builtin"}
    if name == "builtin:tiny":
        return {"unet": dict(TINY_UNET), "vae": dict(TINY_VAE), "text_encoder": _text_data(_tiny_text_config(tokenizer)),
                "scheduler": {"_class_name": "DDIMScheduler", **SD1_SCHEDULE}, "tokenizer": "builtin"}
    raise KeyError(name)


def builtin_family(name: str) -> Family | None:
    """The family of a built-in, from its UNet config (nothing is built); None for an unknown name."""
    config = {"builtin:tiny": TINY_UNET, "builtin:tiny-sdxl": TINY_SDXL_UNET, "builtin:shapes": SHAPES_UNET,
              "builtin:tiny-flux": TINY_FLUX_TRANSFORMER}.get(name)
    return families.from_unet_config(config) if config is not None else None
