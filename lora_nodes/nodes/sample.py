"""Sampling: text to images with the diffusers pipeline, on the recipe's weights."""

from __future__ import annotations

import torch

from ..errors import NodeError
from ..models.pipeline import pipeline_for
from ..models.recipe import ModelRecipe
from .spec import COMBO, FLOAT, IMAGE, INT, MODEL, STRING, Input, Output, node

# sampler name -> (diffusers scheduler class, config changes); names follow ComfyUI's.
SAMPLERS: dict[str, tuple[str, dict]] = {
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_ancestral": ("EulerAncestralDiscreteScheduler", {}),
    "ddim": ("DDIMScheduler", {}),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
}
MAX_SEED = 2**64 - 1


def make_scheduler(sampler: str, base_scheduler):
    """A fresh scheduler of the named sampler on the base model's noise schedule."""
    import diffusers

    class_name, changes = SAMPLERS[sampler]
    return getattr(diffusers, class_name).from_config(base_scheduler.config, **changes)


def make_pipeline(base, sampler: str):
    """A diffusers pipeline over the base's components (no copy) with the sampler's scheduler."""
    pipe = pipeline_for(base, make_scheduler(sampler, base.components["scheduler"]))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def image_size(base, width: int, height: int) -> tuple[int, int]:
    """Width and height in pixels; 0 means the model's native size. Both must be multiples of 8."""
    width, height = width or base.native_size, height or base.native_size
    if width % 8 or height % 8:
        raise NodeError(f"width and height must be multiples of 8, got {width}x{height}")
    return width, height


@node(
    "Sample",
    display_name="Sample",
    category="sampling",
    inputs=[
        Input("model", MODEL),
        Input("prompt", STRING, multiline=True, description="what to draw"),
        Input("negative_prompt", STRING, "", multiline=True, description="what to steer away from"),
        Input("seed", INT, 0, min=0, max=MAX_SEED, description="same seed and inputs give the same image"),
        Input("steps", INT, 20, min=1, max=10000, description="denoising steps"),
        Input("cfg", FLOAT, 7.0, min=0.0, max=100.0, step=0.1, description="classifier-free guidance scale"),
        Input("sampler", COMBO, "euler", choices=tuple(SAMPLERS), description="the sampling method"),
        Input("width", INT, 0, min=0, max=16384, step=8, description="pixels; 0 is the model's native size"),
        Input("height", INT, 0, min=0, max=16384, step=8, description="pixels; 0 is the model's native size"),
        Input("batch_size", INT, 1, min=1, max=64, description="images per prompt"),
    ],
    outputs=[Output("images", IMAGE, "float32 [batch, height, width, 3] in 0..1, as ComfyUI's IMAGE")],
)
def sample(ctx, model: ModelRecipe, prompt: str, negative_prompt: str, seed: int, steps: int, cfg: float,
           sampler: str, width: int, height: int, batch_size: int):
    """Draw images from a prompt with the model's weights (LoRAs merged in place, then reused)."""
    base = model.materialize()
    width, height = image_size(base, width, height)
    pipe = make_pipeline(base, sampler)
    generator = torch.Generator("cpu").manual_seed(seed)  # CPU noise: the same image on any device

    def on_step(_pipe, step, _timestep, kwargs):
        ctx.progress(step + 1, steps)
        return kwargs

    with torch.inference_mode():
        result = pipe(
            prompt, negative_prompt=negative_prompt or None, num_inference_steps=steps, guidance_scale=cfg,
            width=width, height=height, num_images_per_prompt=batch_size, generator=generator,
            output_type="pt", callback_on_step_end=on_step,
        )
    return (result.images.float().permute(0, 2, 3, 1).contiguous().cpu(),)
