"""Sampling: text to images with the diffusers pipeline, on the recipe's weights."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Annotated

import torch

from .. import families
from ..errors import NodeError
from ..lora.recipe import ModelRecipe
from ..models.base import BaseModel
from ..models.memory import check_sample
from ..models.pipeline import pipeline_for
from .spec import COMBO, FLOAT, IMAGE, INT, MAX_SEED, MODEL, STRING, Input, Output, node

SAMPLERS = families.SAMPLER_NAMES  # names follow ComfyUI's; each family says how it draws with them


def make_pipeline(base: BaseModel, sampler: str):
    """A diffusers pipeline over the base's components (no copy) with the sampler's scheduler."""
    pipe = pipeline_for(base, base.family.make_scheduler(sampler, base.components["scheduler"]))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def image_size(base: BaseModel, width: int, height: int) -> tuple[int, int]:
    """Width and height in pixels; 0 means the model's native size. Both must be multiples of 8."""
    width, height = width or base.native_size, height or base.native_size
    if width % 8 or height % 8:
        raise NodeError(f"width and height must be multiples of 8, got {width}x{height}")
    return width, height


@node(
    "Sample",
    display_name="Sample",
    category="sampling",
    outputs=[Output("images", IMAGE, "float32 [batch, height, width, 3] in 0..1, as ComfyUI's IMAGE")],
)
def sample(
    ctx,
    model: Annotated[ModelRecipe, Input(MODEL)],
    prompt: Annotated[str, Input(STRING, multiline=True, description="what to draw")],
    negative_prompt: Annotated[str, Input(STRING, multiline=True, description="what to steer away from")] = "",
    seed: Annotated[int, Input(INT, min=0, max=MAX_SEED, description="same seed and inputs give the same image")] = 0,
    steps: Annotated[int, Input(INT, min=1, max=10000, description="denoising steps")] = 20,
    cfg: Annotated[float, Input(FLOAT, min=0.0, max=100.0, step=0.1, description="classifier-free guidance scale")] = 7.0,
    sampler: Annotated[str, Input(COMBO, choices=tuple(SAMPLERS), description="the sampling method")] = "euler",
    width: Annotated[int, Input(INT, min=0, max=16384, step=8, description="pixels; 0 is the model's native size")] = 0,
    height: Annotated[int, Input(INT, min=0, max=16384, step=8, description="pixels; 0 is the model's native size")] = 0,
    batch_size: Annotated[int, Input(INT, min=1, max=64, description="images per prompt")] = 1,
):
    """Draw images from a prompt with the model's weights (LoRAs merged in place, then reused)."""
    width, height = image_size(model.base, width, height)
    # before any work: an image too big for the machine is refused, not swapped to death or killed
    check_sample(model.base, width, height, batch_size, cfg, enabled=ctx.check_memory)
    base = model.materialize()
    pipe = make_pipeline(base, sampler)
    generator = torch.Generator("cpu").manual_seed(seed)  # CPU noise: the same image on any device
    final: dict[str, torch.Tensor] = {}

    def on_step(_pipe, step, _timestep, kwargs):
        ctx.progress(step + 1, steps)
        final["latents"] = kwargs["latents"]  # after the last step: what the VAE decodes
        return kwargs

    with torch.inference_mode(), decoder_watch(base.components["vae"]) as decoded:
        result = pipe(
            prompt, negative_prompt=negative_prompt or None, num_inference_steps=steps, guidance_scale=cfg,
            width=width, height=height, num_images_per_prompt=batch_size, generator=generator,
            output_type="pt", callback_on_step_end=on_step,
        )
    images = result.images.float().permute(0, 2, 3, 1).contiguous().cpu()
    warn_non_finite(ctx, final.get("latents"), torch.cat(decoded) if decoded else None, images)
    return (images,)


def non_finite_rows(batch: torch.Tensor) -> torch.Tensor:
    """Per item of a batch (first dimension), whether it holds a NaN or an infinity (a CPU bool tensor)."""
    return (~torch.isfinite(batch.detach())).flatten(1).any(dim=1).cpu()


@contextmanager
def decoder_watch(vae: torch.nn.Module) -> Iterator[list[torch.Tensor]]:
    """Record, per image, whether the VAE decoder's output holds NaN or infinities.

    Checked at the decoder's output, before the pipeline's post-processing clamps to 0..1 (which
    keeps NaN but turns infinities into plain white or black). A forward hook, removed on exit;
    one entry per decoder call (the batch, or each image with VAE slicing).
    """
    rows: list[torch.Tensor] = []

    def record(_module, _inputs, output) -> None:
        if isinstance(output, torch.Tensor):
            rows.append(non_finite_rows(output))

    decoder = getattr(vae, "decoder", None)
    handle = decoder.register_forward_hook(record) if isinstance(decoder, torch.nn.Module) else None
    try:
        yield rows
    finally:
        if handle is not None:
            handle.remove()


def warn_non_finite(ctx, latents: torch.Tensor | None, decoded: torch.Tensor | None, images: torch.Tensor) -> None:
    """Warn when images of the batch hold NaN or infinities (they come out black), naming the likely cause.

    The final latents tell the two usual causes apart: NaN there came from denoising (the UNet,
    with its LoRAs), NaN only after decoding came from the VAE.
    """
    count = len(images)
    bad = non_finite_rows(images)  # NaN survives the pipeline's clamp; infinities only show in decoded
    if decoded is not None and len(decoded) == count:
        bad |= decoded
    bad_latents = torch.zeros(count, dtype=torch.bool)
    if latents is not None and len(latents) == count:
        bad_latents = non_finite_rows(latents)
    bad |= bad_latents
    affected = int(bad.sum())
    if not affected:
        return
    if bad_latents.any():
        cause = ("the denoising produced them: usually a LoRA with huge or broken weights (lower its strength, "
                 "or check it with 'lora-nodes inspect'), or float16 overflow (load the base with dtype float32)")
    else:
        cause = ("the VAE produced them from finite latents: usually float16 overflow in the VAE (load the base "
                 "with dtype float32 or bfloat16)")
    ctx.warn(f"{affected} of {count} images have NaN or infinite values (NaN comes out black); {cause}",
             images=affected, batch=count, source="latents" if bad_latents.any() else "vae")
