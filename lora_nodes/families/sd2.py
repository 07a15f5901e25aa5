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
)
