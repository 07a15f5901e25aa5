"""ComfyUI's own core nodes, run headless on our engine (their ids, inputs and outputs as ComfyUI has them).

Their values are ComfyUI's types (MODEL, CLIP, VAE, CONDITIONING, LATENT, IMAGE) inside this
vocabulary (see :mod:`.values`): MODEL is a recipe over a base, CLIP a recipe over the same base
seen by its text encoders, VAE the base itself, so a checkpoint is loaded once and shared.
They are never registered in the ComfyUI pack: ComfyUI has them already.
"""

from __future__ import annotations

from ..spec import NodeSpec


def core_specs() -> list[NodeSpec]:
    """Every ComfyUI core node we run headless."""
    from . import conditioning, images, latents, loaders, sampling

    return [*loaders.SPECS, *conditioning.SPECS, *sampling.SPECS, *latents.SPECS, *images.SPECS]
