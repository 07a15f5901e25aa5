"""Flow-matching training: the straight path from data to noise, and how its noise levels are drawn.

A flow-matching denoiser (``family.flow_matching``) sees ``x_t = (1 - s) * x0 + s * noise`` at a
noise level ``s`` in [0, 1] and learns the velocity ``noise - x0``, as diffusers' and kohya's
trainers for such models teach it. The pipelines of these models draw on latents packed 2x2 into
tokens, with a position id per token; training uses the pipeline's own packing helpers, so it
sees exactly what sampling feeds the denoiser.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from ..errors import NodeError
from ..models.sampling import resolution_mu

if TYPE_CHECKING:  # annotations only: declaring TrainLoRA imports this module, and must not import torch
    import torch
    from torch import Tensor

# How the noise level of each training image is drawn (TrainConfig.timestep_sampling):
#   uniform        s ~ U(0, 1): diffusers' default ("none" weighting) and kohya's "uniform";
#   logit_normal   s = sigmoid(N(0, 1)): diffusers' "logit_normal", kohya's "sigmoid";
#   shift          logit-normal, then shifted toward noise by the schedule's ``shift`` (3 for the
#                  guidance-distilled release): kohya's "shift";
#   resolution_shift  logit-normal, then shifted by the image's token count as the sampler shifts
#                  its schedule (the exponential shift, mu on the line through the schedule's
#                  (base_image_seq_len, base_shift) and (max_image_seq_len, max_shift)): kohya's
#                  resolution-dependent shift.
TIMESTEP_SAMPLING = ("uniform", "logit_normal", "shift", "resolution_shift")


def packed_size_multiple(base: Any) -> int:
    """Image sides a pipeline that packs 2x2 latent patches into tokens takes: multiples of the VAE's
    downscaling times 2 (other sizes it would shrink)."""
    return base.vae_scale_factor * 2


def text_sequence_length(base: Any, pipe: Any) -> dict[str, int]:
    """``{"max_sequence_length": n}`` for a pipeline that pads its sequence text encoder's tokens to a
    length it is told (``{}`` for one that is not told): the tokenizer's own ``model_max_length``,
    at most the pipeline's default (a tokenizer saved without a limit says 1e30)."""
    parameter = inspect.signature(pipe.__call__).parameters.get("max_sequence_length")
    if parameter is None:
        return {}
    tokenizer = base.components[base.family.text_encoders[-1].tokenizer]  # the sequence encoder's: the last
    limit = parameter.default if isinstance(parameter.default, int) else tokenizer.model_max_length
    return {"max_sequence_length": int(min(tokenizer.model_max_length, limit))}


def noise_levels(sampling: str, count: int, generator: torch.Generator, schedule: Mapping[str, Any],
                 tokens: int) -> Tensor:
    """``count`` noise levels in [0, 1] drawn as ``sampling`` says (see :data:`TIMESTEP_SAMPLING`).

    ``schedule`` is the base scheduler's config (its ``shift`` and resolution-shift line),
    ``tokens`` the packed token count of the batch's images.
    """
    import torch

    if sampling == "uniform":
        return torch.rand(count, generator=generator)
    levels = torch.sigmoid(torch.randn(count, generator=generator))
    if sampling == "logit_normal":
        return levels
    if sampling == "shift":
        shift = float(schedule.get("shift", 1.0))
        return shift * levels / (1 + (shift - 1) * levels)
    if sampling == "resolution_shift":
        mu = resolution_mu(tokens, schedule)
        return math.exp(mu) / (math.exp(mu) + (1 / levels - 1))
    raise NodeError(f"timestep_sampling {sampling!r} is none of {', '.join(TIMESTEP_SAMPLING)}")


class FlowMatching:
    """One flow-matching transformer's training step: text, packed noisy latents, the velocity target."""

    def __init__(self, base: Any, pipe: Any, sampling: str, guidance: float):
        if not hasattr(pipe, "_pack_latents"):
            raise NodeError(f"training on {base.family.display_name} is not supported yet: its pipeline "
                            f"({type(pipe).__name__}) does not pack latents into tokens")
        self.base, self.pipe, self.sampling = base, pipe, sampling
        self.schedule = base.components["scheduler"].config
        # a guidance-distilled transformer takes the guidance scale as an input: training gives it one
        self.guidance = guidance if base.denoiser.config.get("guidance_embeds", False) else None
        self.text_length = text_sequence_length(base, pipe)

    @property
    def size_multiple(self) -> int:
        """Image sides must be multiples of this (see :func:`packed_size_multiple`)."""
        return packed_size_multiple(self.base)

    def encode_text(self, captions: list[str]) -> tuple[Tensor, Tensor]:
        """(sequence embeddings, pooled embedding) of each caption, as the pipeline encodes prompts."""
        embeds, pooled, _ = self.pipe.encode_prompt(prompt=captions, device=self.base.device,
                                                    num_images_per_prompt=1, **self.text_length)
        return embeds, pooled

    def loss(self, latents: Tensor, noise: Tensor, generator: torch.Generator,
             text: tuple[Tensor, Tensor]) -> Tensor:
        """Per image: the mean squared error of the predicted velocity at a drawn noise level.

        ``latents`` and ``noise`` are ``[batch, channels, height, width]`` (the VAE's, shifted and
        scaled); ``text`` is :meth:`encode_text`'s (or its cache's) for the batch's captions.
        """
        batch, channels, height, width = latents.shape
        levels = noise_levels(self.sampling, batch, generator, self.schedule, (height // 2) * (width // 2))
        levels = levels.to(latents.device)
        s = levels.view(-1, 1, 1, 1)
        noisy = (1 - s) * latents + s * noise
        target = noise - latents
        prediction = self.predict(noisy, levels, *text)
        packed_target = self.pipe._pack_latents(target, batch, channels, height, width)
        return (prediction.float() - packed_target.float()).pow(2).mean(dim=(1, 2))

    def predict(self, noisy: Tensor, levels: Tensor, embeds: Tensor, pooled: Tensor) -> Tensor:
        """The transformer's velocity for ``noisy`` latents at noise ``levels``, packed as the pipeline packs."""
        import torch

        batch, channels, height, width = noisy.shape
        dtype, device = self.base.dtype, noisy.device
        packed = self.pipe._pack_latents(noisy, batch, channels, height, width).to(dtype)
        image_ids = self.pipe._prepare_latent_image_ids(batch, height // 2, width // 2, device, dtype)
        text_ids = torch.zeros(embeds.shape[1], 3, device=device, dtype=dtype)
        guidance = None if self.guidance is None else torch.full((batch,), float(self.guidance), device=device)
        # the pipeline passes timestep / 1000 with timestep = 1000 * level: the transformer takes the level
        return self.base.denoiser(hidden_states=packed, timestep=levels.to(dtype), guidance=guidance,
                                  pooled_projections=pooled.to(dtype), encoder_hidden_states=embeds.to(dtype),
                                  txt_ids=text_ids, img_ids=image_ids, return_dict=False)[0]
