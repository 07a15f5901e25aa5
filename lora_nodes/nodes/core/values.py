"""The values ComfyUI's core nodes pass, in this vocabulary (see the package docstring).

- MODEL: a :class:`~lora_nodes.lora.recipe.ModelRecipe`, the same class our LN_MODEL carries.
- CLIP: a :class:`ClipRecipe`: a recipe over the same base, whose LoRAs change only its text
  encoders, and the layer the prompt is read from.
- VAE: the :class:`~lora_nodes.models.base.BaseModel` itself (its VAE is what is used).
- CONDITIONING: :data:`lora_nodes.models.conditioning.Conditioning`.
- LATENT: a :class:`Latent`.

A checkpoint loader gives all three of MODEL, CLIP and VAE over one base: it is loaded once, and
each value sees it through its own recipe (the patcher switches the shared weights between them).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # annotations only: declaring the nodes must not import torch
    from torch import Tensor

    from ...lora.recipe import AppliedLoRA, ModelRecipe
    from ...models.base import BaseModel

COMFY_LATENT_DOWNSCALE = 8  # pixels per latent cell along a side, as ComfyUI's empty latents assume


@dataclass(frozen=True, eq=False)
class ClipRecipe:
    """What a CLIP output carries: the text encoders of a base, seen through their own LoRAs.

    ``model``'s LoRAs are applied at their text strengths only (LoraLoader adds each with
    strength_model 0), so materializing it leaves the denoiser as the base has it. ``last_layer``:
    CLIPSetLastLayer's value (-1 the last layer, -2 the penultimate ...); None until one is set,
    which lets the family choose (see :func:`lora_nodes.models.conditioning.encode_prompt`).
    """

    model: ModelRecipe
    last_layer: int | None = None

    @property
    def base(self) -> BaseModel:
        return self.model.base

    def with_loras(self, *applied: AppliedLoRA) -> ClipRecipe:
        """This CLIP with ``applied`` added (costs nothing until a prompt is encoded)."""
        return replace(self, model=self.model.with_loras(*applied))

    def with_last_layer(self, layer: int) -> ClipRecipe:
        """This CLIP reading the prompt from ``layer`` (CLIPSetLastLayer)."""
        return replace(self, last_layer=layer)

    def materialize(self) -> BaseModel:
        """Patch the shared base to this CLIP's weights and return it (to encode a prompt)."""
        return self.model.materialize()


@dataclass(frozen=True, eq=False)
class Latent:
    """What a LATENT output carries: ComfyUI's ``{"samples": ...}``.

    ``samples`` is [batch, channels, height, width] in the VAE's raw latent space (before the
    model's scaling and shift), as ComfyUI keeps it. ``downscale`` is how many pixels one latent
    cell stands for along a side: 8 for the VAE of every real model and for ComfyUI's empty latents
    (which are made before any model is known); our built-in tiny models' VAEs downscale less.
    """

    samples: Tensor
    downscale: int = COMFY_LATENT_DOWNSCALE

    @property
    def pixel_size(self) -> tuple[int, int]:
        """(width, height) of the picture these latents stand for."""
        return self.samples.shape[-1] * self.downscale, self.samples.shape[-2] * self.downscale
