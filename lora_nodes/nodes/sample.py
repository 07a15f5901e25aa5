"""Sampling: text to images on the recipe's weights, by the family's diffusers pipeline, or by our sampling
core (models.sampling, ComfyUI's KSampler) where a ComfyUI scheduler, clip skip, an init image or denoise
below 1 is asked for (the default inputs draw with the pipeline, as they always have)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from typing import TYPE_CHECKING, Annotated, Any

from .. import families
from ..errors import NodeError
from ..families import Family
from ..models import schedules
from ..models.conditioning import clip_skip_layer, encode_prompt, reads_clip_layers
from ..models.sampling import (
    DEFAULT_GUIDANCE,
    decode_latents,
    encode_images,
    latent_channels,
    packs_latents,
    sample_latents,
    sampling_problem,
    whole_cells,
)
from ..models.schedules import DEFAULT_SCHEDULER, SCHEDULER_NAMES
from .spec import COMBO, FLOAT, IMAGE, INT, MAX_SEED, MODEL, STRING, Input, Output, Preflight, node

if TYPE_CHECKING:  # annotations only: declaring the nodes must not import torch
    import torch

    from ..lora.recipe import ModelRecipe
    from ..models.base import BaseModel

SAMPLERS = families.SAMPLER_NAMES  # names follow ComfyUI's; each family says which it draws with, and how
# the families that take the guidance scale as an input (one pass) rather than by classifier-free guidance
DISTILLED = "/".join(f.display_name for f in families.FAMILIES if f.guidance_distilled) or "none here"


def sample_preflight(literals: dict[str, Any], upstream: dict[str, dict[str, Any]]) -> Preflight:
    """Sample before running: a sampler the model's family cannot draw with is refused by name."""
    family = families.by_id(upstream.get("model", {}).get("family"))
    sampler, scheduler = literals.get("sampler", "euler"), literals.get("scheduler", DEFAULT_SCHEDULER)
    if family is None or not isinstance(sampler, str) or not isinstance(scheduler, str):
        return Preflight()
    problem = sampling_problem(family, sampler, scheduler)
    if problem is None:
        return Preflight()
    blamed = "sampler" if sampler not in family.samplers else "scheduler"
    return Preflight(problems=[("invalid_choice", blamed, problem)])


def make_pipeline(base: BaseModel, sampler: str, seed: int | None = None):
    """A diffusers pipeline over the base's components (no copy) with the sampler's scheduler (one the
    family draws with: see :func:`~lora_nodes.models.sampling.sampling_problem`); a sampler drawing its own noise draws it from ``seed``."""
    from ..models.pipeline import pipeline_for

    class_name, changes = base.family.samplers[sampler]
    scheduler = schedules.make_scheduler(class_name, changes, base.components["scheduler"].config, seed)
    pipe = pipeline_for(base, scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def guidance_arguments(base: BaseModel, pipe, cfg: float, guidance: float, negative_prompt: str) -> dict[str, Any]:
    """The pipeline's arguments for Sample's ``cfg``, ``guidance`` and ``negative_prompt`` on ``base``.

    Classifier-free guidance is diffusers' ``guidance_scale``; a guidance-distilled model takes
    ``guidance`` there instead (an input of the model, one pass per step), and classifier-free
    guidance becomes ``true_cfg_scale``, which the pipeline runs only against a negative prompt.
    A pipeline that pads its sequence text encoder's tokens pads to that tokenizer's length.
    """
    from ..training.flow import text_sequence_length

    negative = negative_prompt or None
    if base.family.guidance_distilled:
        arguments = {"guidance_scale": guidance, "true_cfg_scale": cfg, "negative_prompt": negative}
    else:
        arguments = {"guidance_scale": cfg, "negative_prompt": negative}
    return {**arguments, **text_sequence_length(base, pipe)}


def guidance_passes_scale(family: Family, cfg: float, negative_prompt: str) -> float:
    """The classifier-free guidance scale that decides whether a step runs two passes (memory check)."""
    return cfg if not family.guidance_distilled or negative_prompt else 1.0


def size_multiple(base: BaseModel) -> int:
    """Image sides must be multiples of this: 8, or more where the pipeline packs 2x2 latent patches
    into tokens (the VAE's downscaling times 2; such a pipeline would otherwise shrink the image)."""
    from ..training.flow import packed_size_multiple

    return max(8, packed_size_multiple(base)) if packs_latents(base.family) else 8


def image_size(base: BaseModel, width: int, height: int) -> tuple[int, int]:
    """Width and height in pixels; 0 means the model's native size. Both must be multiples of
    :func:`size_multiple` (8 for most models)."""
    width, height = width or base.native_size, height or base.native_size
    multiple = size_multiple(base)
    if width % multiple or height % multiple:
        raise NodeError(f"width and height must be multiples of {multiple}, got {width}x{height}")
    return width, height


@node(
    "Sample",
    display_name="Sample",
    category="sampling",
    outputs=[Output("images", IMAGE, "float32 [batch, height, width, 3] in 0..1, as ComfyUI's IMAGE")],
    preflight=sample_preflight,
)
def sample(
    ctx,
    model: Annotated[ModelRecipe, Input(MODEL)],
    prompt: Annotated[str, Input(STRING, multiline=True, description="what to draw")],
    negative_prompt: Annotated[str, Input(STRING, multiline=True, description="what to steer away from")] = "",
    seed: Annotated[int, Input(INT, min=0, max=MAX_SEED, description="same seed and inputs give the same image")] = 0,
    steps: Annotated[int, Input(INT, min=1, max=10000, description="denoising steps")] = 20,
    cfg: Annotated[float, Input(FLOAT, min=0.0, max=100.0, step=0.1,
                                description="classifier-free guidance scale (a second pass per step, steering away "
                                            f"from negative_prompt); on guidance-distilled models ({DISTILLED}) it "
                                            "runs only when negative_prompt is given, and 1 is off: set guidance "
                                            "instead")] = 7.0,
    sampler: Annotated[str, Input(COMBO, choices=tuple(SAMPLERS), description="the sampling method")] = "euler",
    width: Annotated[int, Input(INT, min=0, max=16384, step=8, description="pixels; 0 is the model's native size")] = 0,
    height: Annotated[int, Input(INT, min=0, max=16384, step=8, description="pixels; 0 is the model's native size")] = 0,
    batch_size: Annotated[int, Input(INT, min=1, max=64, description="images per prompt")] = 1,
    # after the older inputs: ComfyUI files list widget values by position
    guidance: Annotated[float, Input(FLOAT, min=0.0, max=100.0, step=0.1,
                                     description=f"the distilled guidance of guidance-distilled models ({DISTILLED}: "
                                                 "the model takes it as an input, one pass per step; 3.5 is usual); "
                                                 "ignored by others")] = DEFAULT_GUIDANCE,
    scheduler: Annotated[str, Input(COMBO, choices=(DEFAULT_SCHEDULER, *SCHEDULER_NAMES),
                                    description="the noise schedule, by ComfyUI's names; default is the model's "
                                                "own scheduler config, as diffusers' pipeline schedules it")] = (
        DEFAULT_SCHEDULER),
    clip_skip: Annotated[int, Input(INT, min=1, max=24,
                                    description="as A1111's: 1 reads prompts from the text encoder's usual layer, "
                                                "2 from one layer before it (ComfyUI's CLIPSetLastLayer -2) ...")] = 1,
    denoise: Annotated[float, Input(FLOAT, min=0.0, max=1.0, step=0.01,
                                    description="how much of the schedule to run on the init image (img2img): "
                                                "1 draws anew, lower keeps more of the image")] = 1.0,
    image: Annotated[torch.Tensor | None, Input(IMAGE, optional=True,
                                                description="init image (img2img), drawn over at denoise; "
                                                            "resized to width x height when those are set")] = None,
):
    """Draw images from a prompt with the model's weights (LoRAs merged in place, then reused)."""
    import torch

    from ..models.memory import check_sample

    family = model.base.family
    if image is not None:
        image = init_image(model.base, image, width, height)
        height, width = image.shape[1:3]
        if denoise >= 1.0:
            ctx.warn("at denoise 1 the init image gives only the size: the picture is drawn anew from noise; "
                     "lower denoise to keep some of the image", denoise=denoise)
    width, height = image_size(model.base, width, height)
    problem = sampling_problem(family, sampler, scheduler)
    if problem:  # before the LoRAs are merged in
        raise NodeError(problem)
    if clip_skip > 1 and not reads_clip_layers(family):
        ctx.warn(f"clip_skip does nothing on {family.display_name}: its prompts are read by a sequence encoder, "
                 "not from CLIP's layers", clip_skip=clip_skip)
        clip_skip = 1
    # before any work: an image too big for the machine is refused, not swapped to death or killed
    passes = guidance_passes_scale(family, cfg, negative_prompt)
    images_drawn = batch_size * (1 if image is None else len(image))
    check_sample(model.base, width, height, images_drawn, passes, enabled=ctx.check_memory)
    base = model.materialize(final=ctx.last_weight_use)
    if scheduler != DEFAULT_SCHEDULER or image is not None or clip_skip > 1 or denoise < 1:
        return (sample_with_core(ctx, base, prompt, negative_prompt, seed, steps, cfg, sampler, scheduler,
                                 width, height, batch_size, guidance, clip_skip, denoise, image),)
    pipe = make_pipeline(base, sampler, seed)
    generator = torch.Generator("cpu").manual_seed(seed)  # CPU noise: the same image on any device
    final: dict[str, torch.Tensor] = {}

    done = [0]

    def on_step(pipe_, _step, _timestep, kwargs):
        # a second-order sampler calls back per model pass: a step is done when it is back to its first stage
        if getattr(pipe_.scheduler, "state_in_first_order", True) and done[0] < steps:
            done[0] += 1
            ctx.progress(done[0], steps)
        final["latents"] = kwargs["latents"]  # after the last step: what the VAE decodes
        return kwargs

    with torch.inference_mode(), decoder_watch(base.components["vae"]) as decoded:
        result = pipe(
            prompt, num_inference_steps=steps, width=width, height=height, num_images_per_prompt=batch_size,
            generator=generator, output_type="pt", callback_on_step_end=on_step,
            **guidance_arguments(base, pipe, cfg, guidance, negative_prompt),
        )
    if done[0] < steps:  # (its last step, to 0, is a first stage only)
        ctx.progress(steps, steps)
    images = result.images.float().permute(0, 2, 3, 1).contiguous().cpu()
    warn_non_finite(ctx, final.get("latents"), torch.cat(decoded) if decoded else None, images)
    return (images,)


def init_image(base: BaseModel, image: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """The init image at the size it is drawn at: ``width`` x ``height`` where set (resized), else its
    own size cut to the sides the model takes (centred, as ComfyUI's VAEEncode cuts)."""
    import torch

    image = image.float()
    if image.ndim != 4 or image.shape[-1] < 3:
        raise NodeError(f"image must be [batch, height, width, 3] (ComfyUI's IMAGE), got {list(image.shape)}")
    image = image[..., :3]
    if width or height:
        size = (height or image.shape[1], width or image.shape[2])
        image = torch.nn.functional.interpolate(image.permute(0, 3, 1, 2), size=size, mode="bilinear",
                                                antialias=True, align_corners=False).permute(0, 2, 3, 1)
    return whole_cells(image, size_multiple(base)).clamp(0, 1).contiguous()


def sample_with_core(ctx, base: BaseModel, prompt: str, negative_prompt: str, seed: int, steps: int, cfg: float,
                     sampler: str, scheduler: str, width: int, height: int, batch_size: int, guidance: float,
                     clip_skip: int, denoise: float, image: torch.Tensor | None) -> torch.Tensor:
    """Sample by our sampling core (as ComfyUI's KSampler): a ComfyUI scheduler, clip skip, an init image
    or denoise below 1. The negative prompt of a guidance-distilled model is used only with it given."""
    import torch

    family = base.family
    layer = clip_skip_layer(family, clip_skip)
    positive = encode_prompt(base, prompt, layer)
    negative = encode_prompt(base, negative_prompt, layer)
    if family.guidance_distilled:
        positive, negative = replace(positive, guidance=guidance), replace(negative, guidance=guidance)
    scale = base.vae_scale_factor
    if image is None:  # ComfyUI's empty latent: zeros
        latents = torch.zeros(batch_size, latent_channels(base), height // scale, width // scale)
    else:
        latents = encode_images(base, image).repeat_interleave(batch_size, dim=0)
    latents = sample_latents(base, (positive,), (negative,), latents, seed=seed, steps=steps,
                             cfg=guidance_passes_scale(family, cfg, negative_prompt), sampler=sampler,
                             scheduler=scheduler, denoise=denoise, progress=ctx.progress)
    with decoder_watch(base.components["vae"]) as decoded:
        images = decode_latents(base, latents)
    warn_non_finite(ctx, latents, torch.cat(decoded) if decoded else None, images)
    return images


def non_finite_rows(batch: torch.Tensor) -> torch.Tensor:
    """Per item of a batch (first dimension), whether it holds a NaN or an infinity (a CPU bool tensor)."""
    import torch

    return (~torch.isfinite(batch.detach())).flatten(1).any(dim=1).cpu()


@contextmanager
def decoder_watch(vae: torch.nn.Module) -> Iterator[list[torch.Tensor]]:
    """Record, per image, whether the VAE decoder's output holds NaN or infinities.

    Checked at the decoder's output, before the pipeline's post-processing clamps to 0..1 (which
    keeps NaN but turns infinities into plain white or black). A forward hook, removed on exit;
    one entry per decoder call (the batch, or each image with VAE slicing).
    """
    import torch

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
    import torch

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
