"""Stable Diffusion 2.x: one OpenCLIP text encoder (1024-wide context); the 768 px models
predict v, which sd-scripts records as ``sd_v2_v``."""

from __future__ import annotations

from .base import Family
from .stable_diffusion import (
    LDM_DENOISER,
    LDM_VAE,
    NAMING,
    NO_SAFETY_CHECKER,
    OPEN_CLIP_TEXT,
    SAMPLERS,
    native_size,
)

SD2 = Family(
    id="sd2",
    display_name="SD2.x",
    text_encoders=(OPEN_CLIP_TEXT,),
    naming=NAMING,
    denoiser_checkpoint_prefix=LDM_DENOISER,
    vae_checkpoint_prefix=LDM_VAE,
    unet_config_markers={"cross_attention_dim": 1024},
    checkpoint_markers=(OPEN_CLIP_TEXT.checkpoint_prefix,),
    context_widths=(1024,),
    kohya_version="sd_v2",
    kohya_version_prefixes=("sd_v2", "sd_2"),
    kohya_v_prediction_version="sd_v2_v",
    samplers=SAMPLERS,
    native_size_of=native_size,
    pipeline_class="StableDiffusionPipeline",
    pipeline_class_marker="StableDiffusion",
    pipeline_options=NO_SAFETY_CHECKER,
    comfy_clip_types=("stable_diffusion",),  # as ComfyUI names SD1.5's too: the encoder's width tells
    # The released 768 px v-prediction model and the 512 px noise-prediction one share every shape.
    # Measured on the released weights (a fact ComfyUI's detection also relies on): the first
    # transformer norm's bias of the last output block spreads far wider in the v model (std above
    # 0.09). Files that mark v prediction (a ``v_pred`` key) need no probe.
    v_prediction_probe=(LDM_DENOISER + "output_blocks.11.1.transformer_blocks.0.norm1.bias", 0.09),
)
