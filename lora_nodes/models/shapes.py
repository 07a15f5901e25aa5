"""``builtin:shapes``: a small SD1.5-architecture pipeline trained to draw coloured shapes.

It draws ``a {colour} {shape} on a {background} background`` for the colours red, green,
blue and yellow, the shapes circle, square and triangle, and white, black or gray
backgrounds, at 64x64 pixels. ``purple`` and ``star`` were kept out of its training on purpose,
so a LoRA has something new to teach it. The weights ship in the package
(``weights/shapes.safetensors``, float16, about 9 MB) and were made by
``scripts/train_shapes.py`` (see ``docs/shapes.md``).

The components are the real diffusers and transformers classes (``UNet2DConditionModel``,
``AutoencoderKL``, ``CLIPTextModel``) with the package's tokenizer and SD1.5's noise schedule,
so LoRA loading, merging, training and sampling run on it exactly as on SD1.5.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

WEIGHTS = Path(__file__).with_name("weights") / "shapes.safetensors"

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
PREFIXES = ("unet", "vae", "text_encoder")  # keys in the weights file: "{component}.{parameter}"


def make_components(vae_scaling_factor: float = 1.0) -> dict[str, Any]:
    """The pipeline with freshly initialised weights (the trainer starts from these)."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from .builtin import SD1_SCHEDULE
    from .tokenizer import build_tokenizer

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


def build_shapes(weights: str | Path = WEIGHTS) -> dict[str, Any]:
    """``builtin:shapes``: the trained pipeline, loaded from the weights shipped in the package (float32)."""
    from safetensors import safe_open

    with safe_open(str(weights), framework="pt") as f:
        scaling = float((f.metadata() or {}).get("vae_scaling_factor", "1.0"))
        state = {key: f.get_tensor(key).float() for key in f.keys()}  # noqa: SIM118 (safe_open has no iterator)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # initialisation is overwritten; fixed anyway so nothing depends on global state
        components = make_components(scaling)
    for prefix in PREFIXES:
        part = {key[len(prefix) + 1:]: value for key, value in state.items() if key.startswith(prefix + ".")}
        result = components[prefix].load_state_dict(part, strict=False)
        missing = [k for k in result.missing_keys if not k.endswith("position_ids")]
        if missing or result.unexpected_keys:
            raise RuntimeError(f"{Path(weights).name}: {prefix} weights do not match its config "
                               f"(missing {missing[:3]}, unexpected {result.unexpected_keys[:3]})")
        components[prefix].eval().requires_grad_(False)
    return components
