"""ComfyUI core nodes: sampling (see the package docstring).

KSampler and KSamplerAdvanced denoise a LATENT with a MODEL's denoiser (its LoRAs merged in),
guided by CONDITIONING, with ComfyUI's sampler and scheduler names (see
:mod:`lora_nodes.models.sampling`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any

from ... import families
from ...errors import NodeError
from ...models.conditioning import Conditioning
from ...models.sampling import conditioning_problem, latent_channels, sample_latents, sampling_problem
from ...models.schedules import SAMPLER_NAMES, SCHEDULER_NAMES
from ..lora import FAMILY_MISMATCH
from ..spec import (
    COMBO,
    CONDITIONING,
    CORE_MODEL,
    FLOAT,
    INT,
    LATENT,
    MAX_SEED,
    Input,
    Output,
    Preflight,
    node,
)
from .latents import fit_to_model, vae_downscale
from .values import Latent

if TYPE_CHECKING:  # annotations only: declaring the nodes must not import torch
    from ...lora.recipe import ModelRecipe

SWITCH = ("enable", "disable")  # KSamplerAdvanced's add_noise, in ComfyUI's order
SWITCH_OFF_FIRST = ("disable", "enable")  # its return_with_leftover_noise
MAX_STEP = 10000


def ksampler_preflight(literals: dict[str, Any], upstream: dict[str, dict[str, Any]]) -> Preflight:
    """KSampler(Advanced): a sampler or scheduler the model's family cannot draw with is refused by name,
    and so is conditioning whose text encoders are known to be of another family than the model."""
    family = families.by_id(upstream.get("model", {}).get("family"))
    sampler, scheduler = literals.get("sampler_name"), literals.get("scheduler")
    if family is None:
        return Preflight()
    problems = []
    if isinstance(sampler, str) and isinstance(scheduler, str):
        problem = sampling_problem(family, sampler, scheduler)
        if problem:
            blamed = "sampler_name" if sampler not in family.samplers else "scheduler"
            problems.append(("invalid_choice", blamed, problem))
    for side in ("positive", "negative"):
        problem = conditioning_problem(family, [upstream.get(side, {}).get("family")])
        if problem:
            problems.append((FAMILY_MISMATCH, side, problem))
    return Preflight(problems=problems)


def _seed(description: str) -> Input:
    return Input(INT, min=0, max=MAX_SEED, description=description)


STEPS = Input(INT, min=1, max=MAX_STEP, description="denoising steps")
CFG = Input(FLOAT, min=0.0, max=100.0, step=0.1,
            description="classifier-free guidance: how closely the picture follows the positive conditioning "
                        "rather than the negative (1: the negative is not used, one pass per step)")
SAMPLER = Input(COMBO, choices=SAMPLER_NAMES, description="the sampling method, as ComfyUI names it")
SCHEDULER = Input(COMBO, choices=SCHEDULER_NAMES, description="how the noise levels are spaced, as ComfyUI names it")
POSITIVE = Input(CONDITIONING, description="what to draw")
NEGATIVE = Input(CONDITIONING, description="what to steer away from")
LATENT_IMAGE = Input(LATENT, description="the latent to denoise (an empty latent, or an encoded image)")
ADD_NOISE = Input(COMBO, choices=SWITCH, description="disable: start from the latent as it is (it carries its noise)")
START_AT = Input(INT, min=0, max=MAX_STEP, description="the step of the schedule to start at")
END_AT = Input(INT, min=0, max=MAX_STEP, description="the step to stop at (past the last: run to the end)")
LEFTOVER_NOISE = Input(COMBO, choices=SWITCH_OFF_FIRST,
                       description="enable: stopping early, keep the noise left (for a second sampler to go on)")


@node(
    "KSampler",
    display_name="KSampler",
    category="sampling",
    outputs=[Output("LATENT", LATENT, "the denoised latent")],
    preflight=ksampler_preflight,
    comfy_core=True,
)
def ksampler(
    ctx,
    *,  # keyword-only: ComfyUI's order puts required links after inputs with defaults
    model: Annotated[ModelRecipe, Input(CORE_MODEL, description="the model that denoises (its LoRAs merged in)")],
    seed: Annotated[int, _seed("the noise's seed: the same seed and inputs give the same picture")] = 0,
    steps: Annotated[int, STEPS] = 20,
    cfg: Annotated[float, CFG] = 8.0,
    sampler_name: Annotated[str, SAMPLER] = SAMPLER_NAMES[0],
    scheduler: Annotated[str, SCHEDULER] = SCHEDULER_NAMES[0],
    positive: Annotated[Conditioning, POSITIVE],
    negative: Annotated[Conditioning, NEGATIVE],
    latent_image: Annotated[Latent, LATENT_IMAGE],
    denoise: Annotated[float, Input(FLOAT, min=0.0, max=1.0, step=0.01,
                                    description="how much of the latent is redrawn: below 1 keeps the structure "
                                                "of the latent's picture (img2img, hires fix)")] = 1.0,
):
    """Denoise a latent with the model, guided by the positive and negative conditioning."""
    return (_sample(ctx, model, latent_image, positive, negative, seed=seed, steps=steps, cfg=cfg,
                    sampler=sampler_name, scheduler=scheduler, denoise=denoise),)


@node(
    "KSamplerAdvanced",
    display_name="KSampler (Advanced)",
    category="sampling",
    outputs=[Output("LATENT", LATENT)],
    preflight=ksampler_preflight,
    comfy_core=True,
)
def ksampler_advanced(
    ctx,
    *,  # keyword-only, as KSampler's
    model: Annotated[ModelRecipe, Input(CORE_MODEL)],
    add_noise: Annotated[str, ADD_NOISE] = SWITCH[0],
    noise_seed: Annotated[int, _seed("the noise's seed")] = 0,
    steps: Annotated[int, STEPS] = 20,
    cfg: Annotated[float, CFG] = 8.0,
    sampler_name: Annotated[str, SAMPLER] = SAMPLER_NAMES[0],
    scheduler: Annotated[str, SCHEDULER] = SCHEDULER_NAMES[0],
    positive: Annotated[Conditioning, POSITIVE],
    negative: Annotated[Conditioning, NEGATIVE],
    latent_image: Annotated[Latent, LATENT_IMAGE],
    start_at_step: Annotated[int, START_AT] = 0,
    end_at_step: Annotated[int, END_AT] = MAX_STEP,
    return_with_leftover_noise: Annotated[str, LEFTOVER_NOISE] = SWITCH_OFF_FIRST[0],
):
    """Denoise part of a schedule: start and stop at given steps, with or without adding noise (to
    hand a latent from one sampler to another)."""
    return (_sample(ctx, model, latent_image, positive, negative, seed=noise_seed, steps=steps, cfg=cfg,
                    sampler=sampler_name, scheduler=scheduler, add_noise=add_noise == "enable",
                    start_step=start_at_step, end_step=end_at_step if end_at_step < steps else None,
                    leftover_noise=return_with_leftover_noise == "enable"),)


def _sample(ctx, model: ModelRecipe, latent: Latent, positive: Conditioning, negative: Conditioning, *,
            cfg: float, sampler: str, scheduler: str, **options: Any) -> Latent:
    """The latent denoised by ``model``: checks first, then the LoRAs merged in, then the sampler."""
    from ...models.memory import check_sample

    base = model.base
    encoded_by = (condition.family for condition in (*positive, *negative))
    problem = sampling_problem(base.family, sampler, scheduler) or conditioning_problem(base.family, encoded_by)
    if problem:  # before the LoRAs are merged in
        raise NodeError(problem)
    cells = vae_downscale(base) or latent.downscale
    samples = fit_to_model(latent, latent_channels(base), cells)
    height, width = samples.shape[-2:]
    # before any work: a picture too big for the machine is refused, not swapped to death or killed
    check_sample(base, width * cells, height * cells, samples.shape[0], cfg, enabled=ctx.check_memory)
    denoised = sample_latents(model.materialize(final=ctx.last_weight_use), positive, negative, samples, cfg=cfg, sampler=sampler,
                              scheduler=scheduler, progress=ctx.progress, **options)
    return Latent(denoised, cells)


SPECS = [ksampler, ksampler_advanced]
