"""ComfyUI core nodes: latents (see the package docstring).

Empty latents, latent upscaling (hires fix) and the VAE's encoding and decoding. Latents are the
VAE's raw latents, as ComfyUI keeps them (see :class:`.values.Latent`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

from ...errors import NodeError
from ...models.sampling import decode_latents, encode_images, whole_cells
from ..spec import COMBO, FLOAT, IMAGE, INT, LATENT, VAE, Input, Output, node
from .images import CROP_METHODS, MAX_RESOLUTION, center_crop, resize_samples
from .values import COMFY_LATENT_DOWNSCALE, Latent

if TYPE_CHECKING:  # annotations only: declaring the nodes must not import torch
    import torch

    from ...models.base import BaseModel

LATENT_UPSCALE_METHODS = ("nearest-exact", "bilinear", "area", "bicubic", "bislerp")
EMPTY_LATENT_CHANNELS = 4  # what EmptyLatentImage makes (ComfyUI's; the sampler gives it the model's count)
EMPTY_SD3_LATENT_CHANNELS = 16  # what EmptySD3LatentImage makes (likewise)
MIN_UPSCALED_SIDE = 64  # LatentUpscale never makes a side smaller than this many pixels (ComfyUI's rule)
# slerp between two latent vectors this close to one direction (or to opposite ones) falls back
# to the first vector (or to a straight line between them): the angle is too small to divide by
SLERP_PARALLEL = 1e-5


# --------------------------------------------------------------------------- latents and models


def fit_to_model(latent: Latent, channels: int, downscale: int | None) -> torch.Tensor:
    """``latent``'s samples as a model whose latents have ``channels`` (and, where it holds a VAE,
    ``downscale``) takes them.

    An empty latent (all zeros) is remade with the model's channel count, as ComfyUI's sampler does
    (so EmptyLatentImage serves every model), and at the model's downscale for the same picture
    size (our built-in tiny models' VAEs downscale less than 8). Other latents must have the
    model's channels; they are taken at the size they have.
    """
    import torch

    samples = latent.samples
    if not torch.count_nonzero(samples):
        cells = downscale or latent.downscale
        if samples.shape[1] == channels and cells == latent.downscale:
            return samples
        width, height = latent.pixel_size
        return samples.new_zeros(samples.shape[0], channels, height // cells, width // cells)
    if samples.shape[1] != channels:
        raise NodeError(f"the latent has {samples.shape[1]} channels, this model's take {channels}: encode the "
                        "image with this model's VAE (VAEEncode), or start from an empty latent")
    return samples


def vae_downscale(base: BaseModel) -> int | None:
    """How many pixels a latent cell of ``base``'s own VAE stands for (``BaseModel.vae_scale_factor``), or
    None when it holds no VAE (UNETLoader's): then the latent's own downscale is kept."""
    return base.vae_scale_factor if base.family.vae in base.parts else None


def _empty(width: int, height: int, batch_size: int, channels: int) -> Latent:
    """ComfyUI's empty latent: zeros of ``channels`` at an eighth of the size (the sampler fits it to the model)."""
    import torch

    cells = COMFY_LATENT_DOWNSCALE
    return Latent(torch.zeros(batch_size, channels, height // cells, width // cells))


def _side(description: str, step: int = 8) -> Input:
    return Input(INT, min=16, max=MAX_RESOLUTION, step=step, description=description)


BATCH = Input(INT, min=1, max=4096, description="how many latent images")


# --------------------------------------------------------------------------- nodes


@node(
    "EmptyLatentImage",
    display_name="Empty Latent Image",
    category="latent",
    outputs=[Output("LATENT", LATENT, "the empty latent image batch")],
    comfy_core=True,
)
def empty_latent_image(
    ctx,
    width: Annotated[int, _side("the width of the images, in pixels")] = 512,
    height: Annotated[int, _side("the height of the images, in pixels")] = 512,
    batch_size: Annotated[int, BATCH] = 1,
):
    """A batch of empty latent images to denoise (the sampler gives them the model's channels)."""
    return (_empty(width, height, batch_size, EMPTY_LATENT_CHANNELS),)


@node(
    "EmptySD3LatentImage",
    display_name="EmptySD3LatentImage",
    category="latent/sd3",
    outputs=[Output("LATENT", LATENT)],
    comfy_core=True,
)
def empty_sd3_latent_image(
    ctx,
    width: Annotated[int, _side("the width of the images, in pixels", 16)] = 1024,
    height: Annotated[int, _side("the height of the images, in pixels", 16)] = 1024,
    batch_size: Annotated[int, BATCH] = 1,
):
    """A batch of empty 16-channel latent images (for 16-channel models; the sampler fits them to any)."""
    return (_empty(width, height, batch_size, EMPTY_SD3_LATENT_CHANNELS),)


@node(
    "LatentUpscale",
    display_name="Upscale Latent",
    category="latent",
    outputs=[Output("LATENT", LATENT)],
    comfy_core=True,
)
def latent_upscale(
    ctx,
    samples: Annotated[Latent, Input(LATENT)],
    upscale_method: Annotated[str, Input(COMBO, choices=LATENT_UPSCALE_METHODS,
                                         description="how new latent cells are made")] = LATENT_UPSCALE_METHODS[0],
    width: Annotated[int, Input(INT, min=0, max=MAX_RESOLUTION, step=8,
                                description="the new width in pixels; 0 keeps the aspect ratio")] = 512,
    height: Annotated[int, Input(INT, min=0, max=MAX_RESOLUTION, step=8,
                                 description="the new height in pixels; 0 keeps the aspect ratio")] = 512,
    crop: Annotated[str, Input(COMBO, choices=CROP_METHODS,
                               description="center: cut to the new aspect ratio first")] = CROP_METHODS[0],
):
    """Resize latents to a picture size (a hires fix: then sample again at denoise below 1)."""
    if width == 0 and height == 0:
        return (samples,)
    width, height = upscaled_size(samples, width, height)
    cells = samples.downscale
    return (Latent(resize_latents(samples.samples, width // cells, height // cells, upscale_method, crop), cells),)


def upscaled_size(latent: Latent, width: int, height: int) -> tuple[int, int]:
    """LatentUpscale's picture size: a side given as 0 keeps the aspect ratio; no side under 64 pixels."""
    old_width, old_height = latent.pixel_size
    if width == 0:
        height = max(MIN_UPSCALED_SIDE, height)
        width = round(old_width * height / old_height)
    elif height == 0:
        width = max(MIN_UPSCALED_SIDE, width)
        height = round(old_height * width / old_width)
    return max(MIN_UPSCALED_SIDE, width), max(MIN_UPSCALED_SIDE, height)


@node(
    "LatentUpscaleBy",
    display_name="Upscale Latent By",
    category="latent",
    outputs=[Output("LATENT", LATENT)],
    comfy_core=True,
)
def latent_upscale_by(
    ctx,
    samples: Annotated[Latent, Input(LATENT)],
    upscale_method: Annotated[str, Input(COMBO, choices=LATENT_UPSCALE_METHODS,
                                         description="how new latent cells are made")] = LATENT_UPSCALE_METHODS[0],
    scale_by: Annotated[float, Input(FLOAT, min=0.01, max=8.0, step=0.01,
                                     description="how many times larger each side becomes")] = 1.5,
):
    """Resize latents by a factor (a hires fix: then sample again at denoise below 1)."""
    height, width = samples.samples.shape[-2:]
    resized = resize_latents(samples.samples, round(width * scale_by), round(height * scale_by), upscale_method)
    return (Latent(resized, samples.downscale),)


def resize_latents(samples: torch.Tensor, width: int, height: int, method: str, crop: str = "disabled") -> torch.Tensor:
    """Latents ([B, C, H, W]) resized to ``width`` x ``height`` cells as ComfyUI's latent upscalers do."""
    if method != "bislerp":
        return resize_samples(samples, width, height, method, crop)
    if crop == "center":
        samples = center_crop(samples, width, height)
    return bislerp(samples, width, height)


def bislerp(samples: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """Resize latents ([B, C, H, W]) by spherical interpolation of neighbouring latent vectors.

    Bilinear resizing that, between two neighbouring cells, follows the arc between their channel
    vectors (their length interpolated linearly) instead of the chord: what ComfyUI calls bislerp.
    Done along the width, then along the height.
    """
    cells = samples.float().movedim(1, -1)  # [B, H, W, C]: one channel vector per cell
    cells = _slerp_axis(_slerp_axis(cells, width, dim=2), height, dim=1)
    return cells.movedim(-1, 1).to(samples.dtype)


def _slerp_axis(cells: torch.Tensor, size: int, dim: int) -> torch.Tensor:
    """Resize axis ``dim`` of channels-last cells to ``size``, by slerp between the two nearest old cells."""
    import torch

    old = cells.shape[dim]
    # where each new cell's centre falls among the old cells (half-cell centres, clamped at the edges)
    position = ((torch.arange(size, dtype=torch.float32) + 0.5) * old / size - 0.5).clamp(0, old - 1)
    first = position.floor().long()
    second = (first + 1).clamp(max=old - 1)
    shape = [1] * cells.dim()
    shape[dim] = size
    ratio = (position - first).view(shape)
    return _slerp(cells.index_select(dim, first), cells.index_select(dim, second), ratio)


def _slerp(a: torch.Tensor, b: torch.Tensor, ratio: torch.Tensor) -> torch.Tensor:
    """Spherical interpolation between vectors ``a`` and ``b`` (last dimension) at ``ratio``."""
    import torch

    norm_a, norm_b = a.norm(dim=-1, keepdim=True), b.norm(dim=-1, keepdim=True)
    unit_a = torch.where(norm_a == 0, 0.0, a / norm_a)
    unit_b = torch.where(norm_b == 0, 0.0, b / norm_b)
    dot = (unit_a * unit_b).sum(-1, keepdim=True)
    angle = torch.acos(dot.clamp(-1, 1))
    sine = torch.sin(angle)
    arc = (torch.sin((1 - ratio) * angle) * unit_a + torch.sin(ratio * angle) * unit_b) / sine
    result = arc * (norm_a * (1 - ratio) + norm_b * ratio)
    result = torch.where(dot > 1 - SLERP_PARALLEL, a, result)
    return torch.where(dot < SLERP_PARALLEL - 1, a * (1 - ratio) + b * ratio, result)


@node(
    "VAEDecode",
    display_name="VAE Decode",
    category="latent",
    outputs=[Output("IMAGE", IMAGE, "the decoded images")],
    comfy_core=True,
)
def vae_decode(
    ctx,
    samples: Annotated[Latent, Input(LATENT, description="the latents to decode")],
    vae: Annotated[BaseModel, Input(VAE, description="the VAE to decode them with")],
):
    """Decode latents into images."""
    # the VAE's own channel count: a VAE loaded alone (VAELoader) has no denoiser to ask
    latents = fit_to_model(samples, int(vae.vae_config["latent_channels"]), vae_downscale(vae))
    return (decode_latents(vae, latents),)


@node(
    "VAEEncode",
    display_name="VAE Encode",
    category="latent",
    outputs=[Output("LATENT", LATENT)],
    comfy_core=True,
)
def vae_encode(
    ctx,
    pixels: Annotated[torch.Tensor, Input(IMAGE, description="the images to encode")],
    vae: Annotated[BaseModel, Input(VAE, description="the VAE to encode them with")],
):
    """Encode images into latents (for img2img: sample them at denoise below 1)."""
    cells = vae.vae_scale_factor
    pixels = whole_cells(pixels[..., :3], cells)
    return (Latent(encode_images(vae, pixels), cells),)


SPECS = [empty_latent_image, empty_sd3_latent_image, latent_upscale, latent_upscale_by, vae_decode, vae_encode]
