"""Built-in base models, made in code from fixed seeds: nothing is downloaded."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from .tokenizer import build_tokenizer

# The SD1.x noise schedule (what SD1.5's scheduler config says).
SD1_SCHEDULE: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "prediction_type": "epsilon",
    "steps_offset": 1,
    "clip_sample": False,
    "set_alpha_to_one": False,
    "timestep_spacing": "leading",
}

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
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = build_tokenizer()
    vocab = tokenizer.get_vocab()
    text_config = CLIPTextConfig(
        **TINY_TEXT,
        vocab_size=len(vocab),
        bos_token_id=vocab[tokenizer.bos_token],
        eos_token_id=vocab[tokenizer.eos_token],
        pad_token_id=vocab[tokenizer.pad_token],
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**TINY_UNET)
        vae = AutoencoderKL(**TINY_VAE)
        text_encoder = CLIPTextModel(text_config)
    return {
        "unet": unet,
        "vae": vae,
        "text_encoder": text_encoder,
        "tokenizer": tokenizer,
        "scheduler": DDIMScheduler(**SD1_SCHEDULE),
    }


BUILTINS: dict[str, Callable[[], dict[str, Any]]] = {"builtin:tiny": build_tiny}
