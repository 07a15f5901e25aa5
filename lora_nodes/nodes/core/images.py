"""ComfyUI core nodes: images (see the package docstring).

LoadImage, ImageScale, SaveImage and PreviewImage, with ComfyUI's ids, inputs, defaults and outputs.
SaveImage writes what our SaveImages writes (the same code: PNGs with the workflow and A1111's
parameters embedded). PreviewImage shows an image in ComfyUI's editor; a headless run has no editor, so
it writes the images under ``previews/`` in the output folder: a graph whose only output is a preview
still runs, and what it would have shown can be looked at.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Annotated, Any

from ...errors import NodeError
from ..images import to_pil, write_pngs
from ..spec import COMBO, IMAGE, INT, MASK, STRING, Input, Output, Preflight, node

if TYPE_CHECKING:  # annotations only: declaring the nodes must not import torch
    import numpy as np
    import torch
    from PIL import Image

MAX_RESOLUTION = 16384  # ComfyUI's bound on an image or latent side
IMAGE_UPSCALE_METHODS = ("nearest-exact", "bilinear", "area", "bicubic", "lanczos")
CROP_METHODS = ("disabled", "center")
PREVIEW_PREFIX = "previews/ComfyUI"  # where PreviewImage's pictures go, under the output folder
# ComfyUI gives a picture without transparency this mask (its size is ComfyUI's, not the picture's)
EMPTY_MASK_SIDE = 64
# formats whose extra frames are not a sequence of pictures (an MPO's second frame is a stereo view)
SINGLE_FRAME_FORMATS = frozenset({"MPO"})


# ---------------------------------------------------------------------------------------------
# resizing, shared with the latent upscalers


def center_crop(samples: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """The middle of ``samples`` ([..., H, W]) with the aspect ratio of ``width`` x ``height``."""
    old_height, old_width = samples.shape[-2:]
    old_aspect, new_aspect = old_width / old_height, width / height
    x = y = 0
    if old_aspect > new_aspect:  # too wide: cut the sides
        x = round((old_width - old_width * new_aspect / old_aspect) / 2)
    elif old_aspect < new_aspect:  # too tall: cut top and bottom
        y = round((old_height - old_height * old_aspect / new_aspect) / 2)
    return samples[..., y:old_height - y, x:old_width - x]


def resize_samples(samples: torch.Tensor, width: int, height: int, method: str,
                   crop: str = "disabled") -> torch.Tensor:
    """``samples`` ([batch, channels, H, W]) resized to ``width`` x ``height`` as ComfyUI's upscalers do.

    ``crop="center"`` first cuts the middle to the new aspect ratio; "lanczos" resamples 8-bit
    pictures with PIL (images only: values in 0..1), the other methods are torch's interpolation.
    """
    import torch.nn.functional as F

    if crop == "center":
        samples = center_crop(samples, width, height)
    if method == "lanczos":
        return _lanczos(samples, width, height)
    return F.interpolate(samples, size=(height, width), mode=method)


def _lanczos(samples: torch.Tensor, width: int, height: int) -> torch.Tensor:
    import numpy as np
    import torch
    from PIL import Image

    pictures = [to_pil(picture.movedim(0, -1)).resize((width, height), Image.Resampling.LANCZOS)
                for picture in samples]
    stacked = np.stack([np.asarray(p, dtype=np.float32) / 255.0 for p in pictures])
    return torch.from_numpy(stacked).movedim(-1, 1).to(samples.device, samples.dtype)


def scaled_size(width: int, height: int, old_width: int, old_height: int) -> tuple[int, int]:
    """The size asked for, where 0 on one side keeps the aspect ratio (ComfyUI's rule)."""
    if width == 0:
        width = max(1, round(old_width * height / old_height))
    elif height == 0:
        height = max(1, round(old_height * width / old_width))
    return width, height


# ---------------------------------------------------------------------------------------------
# LoadImage


def read_picture(path: str) -> tuple[torch.Tensor, torch.Tensor]:
    """An image file as ComfyUI's LoadImage gives it: ([frames, H, W, 3] in 0..1, [frames, H, W] mask).

    Each frame of an animation that has the first frame's size is one picture of the batch; EXIF
    rotation is applied; the colour channels are kept as they are and the mask is 1 - alpha (a
    picture without transparency gets ComfyUI's empty 64x64 mask).
    """
    import numpy as np
    import torch
    from PIL import Image

    try:
        with Image.open(path) as opened:
            frames = [_frame(frame) for frame in _frames(opened)]
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        raise NodeError(f"cannot read {path} as an image: {error}; give a PNG, JPEG or WebP file") from error
    width, height = frames[0][0].size
    kept = [(rgb, alpha) for rgb, alpha in frames if rgb.size == (width, height)]
    images = torch.from_numpy(np.stack([np.asarray(rgb, dtype=np.float32) / 255.0 for rgb, _ in kept]))
    if all(alpha is None for _, alpha in kept):
        masks = torch.zeros((len(kept), EMPTY_MASK_SIDE, EMPTY_MASK_SIDE), dtype=torch.float32)
    else:  # frames without transparency among frames with it: nothing of theirs is masked
        masks = torch.stack([_mask(alpha, height, width) for _, alpha in kept])
    return images, masks


def _frames(opened: Image.Image) -> list[Image.Image]:
    from PIL import ImageSequence

    frames = [frame.copy() for frame in ImageSequence.Iterator(opened)]
    return frames[:1] if opened.format in SINGLE_FRAME_FORMATS else frames


def _frame(frame: Image.Image) -> tuple[Image.Image, np.ndarray | None]:
    """One frame upright as RGB, and its alpha channel (None when it has no transparency)."""
    import numpy as np
    from PIL import ImageOps

    frame = ImageOps.exif_transpose(frame)
    if frame.mode == "I":  # 32-bit integers: 16-bit greys, brought to 8 bits as ComfyUI brings them
        frame = frame.point(lambda value: value * (1 / 255))
    alpha = None
    if "A" in frame.getbands():
        alpha = np.asarray(frame.getchannel("A"), dtype=np.float32) / 255.0
    elif frame.mode == "P" and "transparency" in frame.info:
        alpha = np.asarray(frame.convert("RGBA").getchannel("A"), dtype=np.float32) / 255.0
    return frame.convert("RGB"), alpha


def _mask(alpha: np.ndarray | None, height: int, width: int) -> torch.Tensor:
    import torch

    if alpha is None:
        return torch.zeros((height, width), dtype=torch.float32)
    return 1.0 - torch.from_numpy(alpha)


def load_image_preflight(literals: dict[str, Any], upstream: dict[str, dict[str, Any]]) -> Preflight:
    """LoadImage before running: a file that is no picture is reported (only its header is read)."""
    from PIL import Image

    path = literals.get("image")
    if not isinstance(path, str) or not os.path.isfile(path):
        return Preflight()  # a missing path is the path check's
    try:
        with Image.open(path) as opened:
            width, height = opened.size
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        why = f"{path} is not an image PIL can read ({error}): give a PNG, JPEG or WebP file"
        return Preflight(problems=[("invalid_value", "image", why)])
    return Preflight(facts={"width": width, "height": height})


@node("LoadImage", display_name="Load Image", category="image", comfy_core=True,
      outputs=(Output("IMAGE", IMAGE, "the picture, [frames, H, W, 3] in 0..1"),
               Output("MASK", MASK, "1 - its alpha channel (where it was transparent)")),
      preflight=load_image_preflight)
def load_image(
    ctx,
    image: Annotated[str, Input(STRING, path=True, path_kind="file", folder="input",
                                description="a picture in the input folder (--input-dir) or a path")],
):
    """Load a picture (every same-sized frame of an animation) and its transparency as a mask."""
    return read_picture(image)


# ---------------------------------------------------------------------------------------------
# ImageScale


def _side(description: str) -> Input:
    return Input(INT, min=0, max=MAX_RESOLUTION, step=1, description=description)


@node("ImageScale", display_name="Upscale Image", category="image/upscaling", comfy_core=True,
      outputs=(Output("IMAGE", IMAGE),))
def image_scale(
    ctx,
    image: Annotated[torch.Tensor, Input(IMAGE)],
    upscale_method: Annotated[str, Input(COMBO, choices=IMAGE_UPSCALE_METHODS)] = IMAGE_UPSCALE_METHODS[0],
    width: Annotated[int, _side("pixels; 0 keeps the aspect ratio from the height")] = 512,
    height: Annotated[int, _side("pixels; 0 keeps the aspect ratio from the width")] = 512,
    crop: Annotated[str, Input(COMBO, choices=CROP_METHODS, description="center: cut the middle "
                               "to the new aspect ratio first")] = CROP_METHODS[0],
):
    """Resize pictures to a width and height (0 on one side keeps the aspect ratio; both 0: unchanged)."""
    if width == 0 and height == 0:
        return (image,)
    width, height = scaled_size(width, height, image.shape[2], image.shape[1])
    resized = resize_samples(image.movedim(-1, 1), width, height, upscale_method, crop)
    return (resized.movedim(1, -1),)


# ---------------------------------------------------------------------------------------------
# SaveImage, PreviewImage


@node("SaveImage", display_name="Save Image", category="image", comfy_core=True, output_node=True)
def save_image(
    ctx,
    images: Annotated[torch.Tensor, Input(IMAGE, description="the pictures to save")],
    filename_prefix: Annotated[str, Input(STRING, writes=True, description="file name start under the output "
                                          "folder; may include sub-folders")] = "ComfyUI",
):
    """Write each picture as a PNG under the output folder, as SaveImages does (the workflow embedded),
    with ComfyUI's pixel levels (cut down, not rounded), so its files are ComfyUI's to the last level."""
    write_pngs(ctx, images, filename_prefix, truncate=True)


@node("PreviewImage", display_name="Preview Image", category="image", comfy_core=True, output_node=True)
def preview_image(ctx, images: Annotated[torch.Tensor, Input(IMAGE)]):
    """Write the pictures under previews/ in the output folder: headless, no editor shows them."""
    write_pngs(ctx, images, PREVIEW_PREFIX, truncate=True)


# this module's node specs, in the order `lora-nodes nodes` lists them
SPECS: list = [load_image, image_scale, save_image, preview_image]
