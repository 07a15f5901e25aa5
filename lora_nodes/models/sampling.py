"""The sampling core: ComfyUI's KSampler on a base's denoiser, with diffusers' schedulers.

Latents here are the VAE's raw latents (ComfyUI's LATENT ``samples``), before the model's scaling
and shift; the core scales them in and out. Noise is drawn on the CPU from the seed as ComfyUI
draws it (one ``randn`` of the whole batch), so a seed gives the same picture on any device.

One run: the sigmas (:mod:`.schedules`: a ComfyUI scheduler name, or ``default``, the base's own
scheduler config as its diffusers pipeline schedules it), cut for ``denoise`` and the advanced
sampler's steps; the noisy start as ComfyUI makes it (``x0 + sigma noise`` for diffusion models,
times ``sqrt(1 + sigma^2)`` when sampling starts at the model's highest level; ``sigma noise +
(1 - sigma) x0`` for flow matching); then the sampler's diffusers scheduler steps along the sigmas
with the denoiser's classifier-free-guided prediction, ``uncond + cfg (cond - uncond)``, each side
the mean of its conditions active at that step (one pass when cfg is 1, as ComfyUI does). A side
with no condition active at a step predicts a clean image of zeros, as ComfyUI's mean of no
denoised predictions is zero.
"""

from __future__ import annotations

import inspect
import math
import warnings
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any

from .. import families
from ..errors import NodeError
from . import schedules
from .conditioning import Condition, Conditioning
from .schedules import DEFAULT_SCHEDULER, SCHEDULER_NAMES, NoiseLevels

if TYPE_CHECKING:
    from torch import Tensor

    from ..families import Family
    from .base import BaseModel

__all__ = ["SCHEDULER_NAMES", "conditioning_problem", "decode_latents", "encode_images", "latent_channels",
           "sample_latents", "sampling_problem", "whole_cells"]

DEFAULT_GUIDANCE = 3.5  # the distilled guidance of a condition that sets none (ComfyUI's and diffusers')


def sampling_problem(family: Family, sampler: str, scheduler: str) -> str | None:
    """Why ``sampler`` with ``scheduler`` cannot draw on a base of ``family`` (naming the names it has), or None."""
    if sampler not in family.samplers:
        return (f"sampler {sampler!r} does not draw with {family.display_name}; its samplers are "
                f"{', '.join(family.samplers)}")
    if scheduler not in (*SCHEDULER_NAMES, DEFAULT_SCHEDULER):
        return f"scheduler {scheduler!r} is not one we have; the schedulers are {', '.join(SCHEDULER_NAMES)}"
    return None


def conditioning_problem(family: Family, encoded_by: Iterable[str | None]) -> str | None:
    """Why conditioning encoded by the text encoders of the families ``encoded_by`` (ids; None: not
    known) cannot guide a denoiser of ``family``, or None."""
    others = [f for f in dict.fromkeys(encoded_by) if f is not None and f != family.id]
    if not others:
        return None
    names = ", ".join(families.describe(families.by_id(f)) for f in others)
    return (f"the conditioning was encoded by the text encoders of a {names} model, but the model that samples "
            f"is {family.display_name}: encode the prompts with text encoders of the same family as the model "
            "(its checkpoint's CLIP, or CLIPLoader / DualCLIPLoader with the type for it)")


# -- what the base says: scheduler config, latent scaling, packing ---------------------------------------

def scheduler_config(base: BaseModel) -> Mapping[str, Any]:
    """The base's noise schedule config (its scheduler's; the family's shipped one for a base without)."""
    scheduler = base.components.get("scheduler")
    if scheduler is not None:
        return dict(scheduler.config)
    from .known_configs import default_config

    return default_config(base.family, "scheduler")


def latent_scaling(base: BaseModel) -> tuple[float, float]:
    """(scaling_factor, shift_factor): the denoiser sees ``(raw - shift) * scale``."""
    config = base.vae_config
    return float(config.get("scaling_factor") or 1.0), float(config.get("shift_factor") or 0.0)


def pipeline_class(family: Family) -> Any:
    import diffusers  # deferred: diffusers takes seconds to import

    return getattr(diffusers, family.pipeline_class)


def packs_latents(family: Family) -> bool:
    """Whether the family's denoiser reads latents packed 2x2 into tokens (a transformer with position ids)."""
    return hasattr(pipeline_class(family), "_pack_latents")


def latent_channels(base: BaseModel) -> int:
    """The channels of the latents the denoiser takes, unpacked (4 for SD, 16 for Flux)."""
    channels = int(base.denoiser.config.in_channels)
    return channels // 4 if packs_latents(base.family) else channels


# -- sigmas ---------------------------------------------------------------------------------------

def default_sigmas(base: BaseModel, sampler: str, steps: int, latent_shape: tuple[int, ...]) -> list[float]:
    """The sigmas the family's diffusers pipeline would step along with ``sampler`` for ``steps`` steps
    (the base's scheduler config as it is), each once, ending in 0."""
    import torch

    family, config = base.family, scheduler_config(base)
    class_name, changes = schedules.sampler_class(family.samplers, sampler, along_sigmas=True)
    scheduler = schedules.make_scheduler(class_name, changes, config)
    accepted = inspect.signature(scheduler.set_timesteps).parameters
    arguments: dict[str, Any] = {"num_inference_steps": steps}
    if family.flow_matching and "sigmas" in accepted and not scheduler.config.get("use_flow_sigmas"):
        # as the flow pipelines set them: evenly spaced, shifted (by the image's size) by the scheduler
        arguments = {"sigmas": torch.linspace(1.0, 1.0 / steps, steps).tolist()}
    if family.flow_matching and "mu" in accepted and config.get("use_dynamic_shifting"):
        height, width = latent_shape[-2:]
        arguments["mu"] = resolution_mu((height // 2) * (width // 2), config)
    scheduler.set_timesteps(device="cpu", **arguments)
    values = [float(s) for s in scheduler.sigmas]
    # second-order schedulers list a sigma once per stage: each once
    return [s for i, s in enumerate(values) if i == 0 or s != values[i - 1]]


def resolution_mu(tokens: int, config: Mapping[str, Any]) -> float:
    """The time shift a flow pipeline uses for images of ``tokens`` packed tokens: on the line through
    (base_image_seq_len, base_shift) and (max_image_seq_len, max_shift) of the schedule."""
    first, last = config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096)
    low, high = config.get("base_shift", 0.5), config.get("max_shift", 1.15)
    return low + (high - low) * (tokens - first) / (last - first)


def sampling_sigmas(base: BaseModel, levels: NoiseLevels, sampler: str, scheduler: str, steps: int,
                    denoise: float, latent_shape: tuple[int, ...]) -> list[float]:
    """The sigmas of a KSampler run before KSamplerAdvanced's cut (see :func:`schedules.comfy_sigmas`)."""
    if scheduler != DEFAULT_SCHEDULER:
        return schedules.comfy_sigmas(levels, scheduler, sampler, steps, denoise)
    return schedules.denoised_tail(lambda count: default_sigmas(base, sampler, count, latent_shape), steps, denoise)


# -- the run --------------------------------------------------------------------------------------

def sample_latents(base: BaseModel, positive: Conditioning, negative: Conditioning, latents: Tensor, *,
                   seed: int, steps: int, cfg: float, sampler: str, scheduler: str, denoise: float = 1.0,
                   add_noise: bool = True, start_step: int = 0, end_step: int | None = None,
                   leftover_noise: bool = False, progress: Callable[[int, int], None] | None = None) -> Tensor:
    """Denoise ``latents`` ([B, C, H, W], raw latent space) as ComfyUI's KSampler / KSamplerAdvanced do.

    Uses only the base's denoiser (and its scheduler config). ``denoise`` < 1 runs the last
    ``steps`` steps of a schedule of ``int(steps / denoise)`` (img2img, hires fix);
    ``start_step`` / ``end_step`` cut the schedule (KSamplerAdvanced), ``leftover_noise`` keeps the
    noise left at ``end_step`` (else the last sigma is 0). ``add_noise`` False starts from
    ``latents`` as they are. ``scheduler`` may also be ``"default"``: the base's own scheduler
    config. Returns raw latents of the same shape (float32, on the CPU).
    """
    import torch

    family = base.family
    problem = sampling_problem(family, sampler, scheduler)
    if problem:
        raise NodeError(problem)
    if not positive:
        raise NodeError("the positive conditioning is empty: connect an encoded prompt")
    problem = conditioning_problem(family, (c.family for c in (*positive, *negative)))
    if problem:
        raise NodeError(problem)
    config = scheduler_config(base)
    levels = schedules.noise_levels(config, family.flow_matching)
    raw = latents.detach().float().cpu()
    sigmas = sampling_sigmas(base, levels, sampler, scheduler, steps, denoise, tuple(raw.shape))
    sigmas = schedules.cut_sigmas(sigmas, start_step, end_step, leftover_noise)
    if scheduler != DEFAULT_SCHEDULER:  # (the default schedule ends as its pipeline ends it)
        sigmas = schedules.sampler_final_sigma(sigmas, sampler)
    if len(sigmas) < 2:  # nothing to denoise (denoise 0, or a start past the end)
        return raw
    scale, shift = latent_scaling(base)
    clean = (raw - shift) * scale
    generator = torch.Generator("cpu").manual_seed(int(seed))
    noise = torch.randn(raw.shape, generator=generator) if add_noise else torch.zeros_like(raw)
    # a whole default schedule starts as its pipeline starts: all noise (its first level need not be the highest)
    whole = scheduler == DEFAULT_SCHEDULER and denoise > 0.9999 and start_step == 0
    start = noisy_start(clean, noise, sigmas[0], levels, from_the_top=whole)
    run = Run(base, levels, positive, negative, cfg, tuple(raw.shape))
    with torch.no_grad():  # (not inference mode: callers may change the result in place)
        result = run.denoise(start, sigmas, sampler, seed, progress)
    return result / scale + shift


def noisy_start(clean: Tensor, noise: Tensor, sigma: float, levels: NoiseLevels, from_the_top: bool = False) -> Tensor:
    """Where sampling starts, as ComfyUI makes it (see the module docstring)."""
    if levels.flow:
        return sigma * noise + (1.0 - sigma) * clean
    # from the highest level: all noise, at the variance-preserving scale
    from_the_top = from_the_top or sigma >= levels.sigma_max * (1 - 1e-5)
    return clean + noise * (math.sqrt(1.0 + sigma ** 2) if from_the_top else sigma)


class Run:
    """One sampling run's model side: conditions, classifier-free guidance and the denoiser's inputs."""

    def __init__(self, base: BaseModel, levels: NoiseLevels, positive: Conditioning, negative: Conditioning,
                 cfg: float, shape: tuple[int, ...]):
        self.base, self.levels, self.cfg, self.shape = base, levels, float(cfg), shape
        self.positive, self.negative = tuple(positive), tuple(negative)
        self.packed = packs_latents(base.family)
        self.device, self.dtype = base.device, base.dtype
        self.prediction_type = scheduler_config(base).get("prediction_type", "epsilon")

    def denoise(self, start: Tensor, sigmas: list[float], sampler: str, seed: int,
                progress: Callable[[int, int], None] | None) -> Tensor:
        """Step from ``start`` (at ``sigmas[0]``) along ``sigmas`` with the sampler's scheduler."""
        family, flow = self.base.family, self.levels.flow
        class_name, changes = schedules.sampler_class(family.samplers, sampler, along_sigmas=True)
        scheduler = schedules.make_scheduler(class_name, changes, scheduler_config(self.base), seed=seed)
        total = schedules.install_sigmas(scheduler, sigmas, flow)
        # a scheduler whose model input is its sample as it is keeps variance-preserving samples:
        # x / sqrt(1 + sigma^2) of ComfyUI's (flow-matching samples are the same in both)
        preserving = not flow and variance_preserving(scheduler)
        x = start / math.sqrt(1 + sigmas[0] ** 2) if preserving else start
        step_options = step_arguments(scheduler, seed)
        with warnings.catch_warnings():
            # torchsde's Brownian tree (dpmpp_sde) warns of float32 rounding at the schedule's ends
            warnings.filterwarnings("ignore", message="Should have t", category=UserWarning)
            x = self.steps(scheduler, x, total, step_options, progress)
        last = sigmas[-1]
        if preserving:
            x = x * math.sqrt(1 + last ** 2)
        elif flow and 0 < last < 1:  # ComfyUI's LATENT of a flow model keeps noise as (x0 + ...) / (1 - sigma)
            x = x / (1.0 - last)
        return x.float().cpu()

    def steps(self, scheduler: Any, x: Tensor, total: int, step_options: dict[str, Any],
              progress: Callable[[int, int], None] | None) -> Tensor:
        """Run the scheduler's steps (``total`` of them; a second-order step is done when the scheduler
        is back to its first stage)."""
        done = 0
        for timestep in scheduler.timesteps:
            model_input = scheduler.scale_model_input(x, timestep) if hasattr(scheduler, "scale_model_input") else x
            prediction = self.guided(model_input, timestep)
            x = scheduler.step(prediction, timestep, x, **step_options, return_dict=False)[0]
            if getattr(scheduler, "state_in_first_order", True):
                done += 1
                if progress is not None:
                    progress(min(done, total), total)
                if done >= total:
                    break
        if progress is not None and done < total:
            progress(total, total)
        return x

    def sigma_at(self, timestep: Tensor) -> float:
        """The noise level of a model timestep (for the conditions' active ranges)."""
        if self.levels.flow:
            return float(timestep) / 1000.0
        return self.levels.sigma_of(float(timestep))

    def guided(self, x: Tensor, timestep: Tensor) -> Tensor:
        """The classifier-free-guided prediction at ``timestep`` (one pass when cfg is 1)."""
        sigma = self.sigma_at(timestep)
        positive = self.predict_mean(self.positive, x, timestep, sigma)
        if math.isclose(self.cfg, 1.0):
            return positive
        negative = self.predict_mean(self.negative, x, timestep, sigma)
        return negative + self.cfg * (positive - negative)

    def predict_mean(self, conditions: Conditioning, x: Tensor, timestep: Tensor, sigma: float) -> Tensor:
        """The mean prediction of the conditions active at ``sigma``; when none is, the prediction of a
        clean image of zeros (ComfyUI averages denoised images, and its mean of none is zero)."""
        import torch

        active = [c for c in conditions if self.is_active(c, sigma)]
        if not active:
            return self.zero_image_prediction(x, sigma)
        return torch.stack([self.predict(c, x, timestep) for c in active]).mean(dim=0)

    def zero_image_prediction(self, x: Tensor, sigma: float) -> Tensor:
        """The raw prediction whose denoised image is all zeros, at model input ``x`` and level ``sigma``.

        The model input is ``alpha x0 + s noise`` with ``alpha = 1 / sqrt(1 + sigma^2)`` and
        ``s = sigma alpha`` (diffusion), or ``(1 - sigma) x0 + sigma noise`` (flow matching); with
        ``x0 = 0`` the noise is ``x / s`` (or ``x / sigma``), v is ``alpha noise`` and the velocity
        ``noise - x0`` is ``x / sigma``.
        """
        import torch

        x = x.float().cpu()
        if sigma <= 0.0:  # the input is the clean image itself: no prediction can make it zero
            return torch.zeros_like(x)
        if self.levels.flow:
            return x / sigma
        alpha = 1.0 / math.sqrt(1.0 + sigma ** 2)
        noise = x / (sigma * alpha)
        return noise * alpha if self.prediction_type == "v_prediction" else noise

    def is_active(self, condition: Condition, sigma: float) -> bool:
        """Whether ``sigma`` lies in the condition's part of the schedule (ConditioningSetTimestepRange)."""
        return self.percent_sigma(condition.end) <= sigma <= self.percent_sigma(condition.start)

    def percent_sigma(self, percent: float) -> float:
        """The noise level at a fraction of the schedule, as ComfyUI reads ConditioningSetTimestepRange."""
        if percent <= 0.0:
            return math.inf
        if percent >= 1.0:
            return 0.0
        if self.levels.flow:
            return self.levels.sigma_of(self.levels.timestep_of(1.0) * (1.0 - percent))
        return self.levels.sigma_of((len(self.levels.sigmas) - 1) * (1.0 - percent))

    def predict(self, condition: Condition, x: Tensor, timestep: Tensor) -> Tensor:
        """The denoiser's raw prediction (noise, v or velocity) for one condition, float32."""
        import torch

        batch = x.shape[0]
        tensors = {k: v.to(self.device, self.dtype).expand(batch, *v.shape[1:]) for k, v in condition.tensors.items()}
        model_input = x.to(self.device, self.dtype)
        if self.packed:
            return self.predict_packed(condition, tensors, model_input, timestep)
        time = torch.as_tensor(timestep, device=self.device).expand(batch)
        extra = {}
        if self.base.family.pooled_text_conditioning:
            extra["added_cond_kwargs"] = {"text_embeds": tensors["pooled"], "time_ids": self.time_ids(batch)}
        output = self.base.denoiser(model_input, time, encoder_hidden_states=tensors["embeds"], return_dict=False,
                                    **extra)[0]
        return output.float().cpu()

    def time_ids(self, batch: int) -> Tensor:
        """Added size conditioning: original size, crop (0, 0), target size, all the image's size (as
        ComfyUI sets them when the conditioning gives none)."""
        import torch

        height, width = (side * self.base.vae_scale_factor for side in self.shape[-2:])
        ids = torch.tensor([[height, width, 0, 0, height, width]], device=self.device, dtype=self.dtype)
        return ids.expand(batch, -1)

    def predict_packed(self, condition: Condition, tensors: dict[str, Tensor], x: Tensor, timestep: Tensor) -> Tensor:
        """The prediction of a denoiser that reads 2x2-packed latent tokens (Flux's transformer)."""
        import torch

        pipeline = pipeline_class(self.base.family)
        batch, channels, height, width = x.shape
        packed = pipeline._pack_latents(x, batch, channels, height, width)
        image_ids = pipeline._prepare_latent_image_ids(batch, height // 2, width // 2, self.device, self.dtype)
        text_ids = torch.zeros(tensors["embeds"].shape[1], 3, device=self.device, dtype=self.dtype)
        guidance = None
        if self.base.denoiser.config.get("guidance_embeds", False):
            value = DEFAULT_GUIDANCE if condition.guidance is None else float(condition.guidance)
            guidance = torch.full((batch,), value, device=self.device, dtype=torch.float32)
        # the transformer takes the noise level itself (the pipelines pass timestep / 1000)
        level = (torch.as_tensor(timestep, dtype=torch.float32) / 1000.0).to(self.device, self.dtype).expand(batch)
        output = self.base.denoiser(hidden_states=packed, timestep=level, guidance=guidance,
                                    pooled_projections=tensors["pooled"], encoder_hidden_states=tensors["embeds"],
                                    txt_ids=text_ids, img_ids=image_ids, return_dict=False)[0]
        scale = self.base.vae_scale_factor
        return pipeline._unpack_latents(output, height * scale, width * scale, scale).float().cpu()


def variance_preserving(scheduler: Any) -> bool:
    """Whether a scheduler's samples are variance-preserving (``alpha x0 + sigma_t noise``): its model
    input is the sample unchanged, where k-diffusion-style schedulers divide by ``sqrt(1 + sigma^2)``."""
    import torch

    probe = torch.ones(1)
    first = scheduler.timesteps[0]
    scaled = scheduler.scale_model_input(probe, first)
    if hasattr(scheduler, "_step_index"):  # the probe must not leave the scheduler mid-way
        scheduler._step_index = None
    return torch.equal(scaled, probe)


def step_arguments(scheduler: Any, seed: int) -> dict[str, Any]:
    """What ``scheduler.step`` takes besides the sample: a CPU generator from the seed for its noise
    (ancestral and SDE samplers), so a seed draws the same picture on every device."""
    import torch

    parameters = inspect.signature(scheduler.step).parameters
    return {"generator": torch.Generator("cpu").manual_seed(int(seed))} if "generator" in parameters else {}


# -- the VAE --------------------------------------------------------------------------------------

def the_vae(base: BaseModel) -> Any:
    vae = base.components.get(base.family.vae)
    if vae is None:
        raise NodeError(f"{base.source} holds no VAE: load one (VAELoader) to encode or decode images")
    return vae


def whole_cells(images: Tensor, cells: int) -> Tensor:
    """The middle of ``images`` ([B, H, W, C]) with sides a multiple of ``cells`` (as ComfyUI's VAE cuts them)."""
    height, width = images.shape[1:3]
    keep_height, keep_width = height // cells * cells, width // cells * cells
    if not keep_height or not keep_width:
        raise NodeError(f"the image is {width}x{height} pixels; both sides must be at least {cells}")
    top, left = (height - keep_height) // 2, (width - keep_width) // 2
    return images[:, top:top + keep_height, left:left + keep_width]


def encode_images(base: BaseModel, images: Tensor) -> Tensor:
    """Images ([B, H, W, 3] in 0..1) -> the VAE's raw latents ([B, C, H/8, W/8]); the distribution's
    mode (deterministic)."""
    import torch

    vae = the_vae(base)
    pixels = images[..., :3].permute(0, 3, 1, 2).to(base.device, vae.dtype) * 2.0 - 1.0
    with torch.no_grad():
        return vae.encode(pixels).latent_dist.mode().float().cpu()


def decode_latents(base: BaseModel, latents: Tensor) -> Tensor:
    """The VAE's raw latents -> images ([B, H, W, 3] in 0..1, float32 on the CPU)."""
    import torch

    vae = the_vae(base)
    with torch.no_grad():
        pixels = vae.decode(latents.to(base.device, vae.dtype), return_dict=False)[0]
    return ((pixels.float() + 1.0) / 2.0).clamp(0.0, 1.0).permute(0, 2, 3, 1).contiguous().cpu()
