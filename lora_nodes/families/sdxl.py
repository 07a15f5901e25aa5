"""Stable Diffusion XL: two text encoders (CLIP and OpenCLIP, a 2048-wide context), the pooled
text embedding and size/crop ids as added conditioning, and kohya LoRAs named by the original
(SGM) UNet tree with ``lora_te1_``/``lora_te2_``."""

from __future__ import annotations

from .base import Family
from .stable_diffusion import (
    FIRST_OF_TWO_TEXT,
    LDM_DENOISER,
    LDM_VAE,
    NAMING,
    SAMPLERS,
    SECOND_OF_TWO_TEXT,
    native_size,
)

SDXL = Family(
    id="sdxl",
    display_name="SDXL",
    text_encoders=(FIRST_OF_TWO_TEXT, SECOND_OF_TWO_TEXT),
    naming=NAMING,
    denoiser_checkpoint_prefix=LDM_DENOISER,
    vae_checkpoint_prefix=LDM_VAE,
    unet_config_markers={"addition_embed_type": "text_time"},
    checkpoint_markers=("conditioner.embedders.1.", LDM_DENOISER + "label_emb."),
    context_widths=(2048,),
    builtin_context_widths=(80,),  # builtin:tiny-sdxl
    kohya_version="sdxl_base_v1-0",
    kohya_version_prefixes=("sdxl",),
    kohya_original_unet_names=True,
    samplers=SAMPLERS,
    native_size_of=native_size,
    pipeline_class="StableDiffusionXLPipeline",
    pipeline_class_marker="XL",
    pooled_text_conditioning=True,
    text_layer=-2,  # both encoders' penultimate layer
    vae_upcast_in_fp16=True,
    comfy_clip_types=("sdxl",),
    comfy_dual_clip_place=0,  # ComfyUI: sdxl, sd3, flux, hunyuan_video, hidream, hunyuan_image
)
