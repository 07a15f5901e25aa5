"""Stable Diffusion 1.x: one CLIP text encoder (768-wide context), noise prediction."""

from __future__ import annotations

from .base import Family
from .stable_diffusion import (
    CLIP_TEXT,
    LDM_DENOISER,
    LDM_VAE,
    NAMING,
    NO_SAFETY_CHECKER,
    SAMPLERS,
    native_size,
)

SD1 = Family(
    id="sd1",
    display_name="SD1.5",
    text_encoders=(CLIP_TEXT,),
    naming=NAMING,
    denoiser_checkpoint_prefix=LDM_DENOISER,
    vae_checkpoint_prefix=LDM_VAE,
    unet_config_markers={},  # any other cross-attention UNet (tried last)
    checkpoint_markers=(CLIP_TEXT.checkpoint_prefix,),
    context_widths=(768,),
    builtin_context_widths=(32, 64),  # builtin:tiny, builtin:shapes
    kohya_version="sd_v1",
    kohya_version_prefixes=("sd_v1", "sd_1"),
    samplers=SAMPLERS,
    native_size_of=native_size,
    pipeline_class="StableDiffusionPipeline",
    pipeline_class_marker="StableDiffusion",
    pipeline_options=NO_SAFETY_CHECKER,
    comfy_clip_types=("stable_diffusion",),
)
