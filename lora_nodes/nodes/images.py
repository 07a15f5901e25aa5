"""Nodes that write files."""

from __future__ import annotations

import itertools
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

from ..fileio import write_new_file
from ..pngchunks import png_info
from .sample import non_finite_rows
from .spec import IMAGE, STRING, Input, node

if TYPE_CHECKING:  # annotations only: declaring the nodes must not import torch
    import torch
    from PIL import Image


def next_free_index(folder: Path, stem: str) -> int:
    """1 + the highest counter of existing ``{stem}_NNNNN.png`` files: where new files start."""
    pattern = re.compile(rf"{re.escape(stem)}_(\d+)\.png$")
    try:
        names = [entry.name for entry in os.scandir(folder)]
    except OSError:  # no folder yet
        return 1
    return max((int(m.group(1)) for name in names if (m := pattern.match(name))), default=0) + 1


def to_pil(image: torch.Tensor, truncate: bool = False) -> Image.Image:
    """One [height, width, 3] float image in 0..1 as an 8-bit PIL image (NaN as black, infinities clamped).

    Levels are rounded to the nearest; ``truncate`` cuts them down instead, as ComfyUI's SaveImage
    does (so ComfyUI's own nodes, run headless, write the levels ComfyUI writes).
    """
    import numpy as np
    import torch
    from PIL import Image

    pixels = torch.nan_to_num(image.detach().float(), nan=0.0, posinf=1.0, neginf=0.0)
    levels = pixels.clamp(0, 1) * 255
    array = (levels if truncate else levels.round()).to(torch.uint8).cpu().numpy()
    return Image.fromarray(np.ascontiguousarray(array))


@node(
    "SaveImages",
    display_name="Save Images",
    category="io",
    output_node=True,
)
def save_images(
    ctx,
    images: Annotated[torch.Tensor, Input(IMAGE)],
    prefix: Annotated[str, Input(STRING, writes=True,
                                 description="file name start; may include sub-folders")] = "lora-nodes",
):
    """Write each image as a PNG under the output folder, with the workflow embedded to re-run it."""
    write_pngs(ctx, images, prefix)


def write_pngs(ctx, images: torch.Tensor, prefix: str, truncate: bool = False) -> None:
    """SaveImages' work: ``PREFIX_00001.png`` ... under the output folder, each name claimed atomically,
    the run's text chunks embedded (``truncate``: pixel levels as ComfyUI's SaveImage makes them)."""
    stem_path = ctx.output_path(f"{prefix}{ctx.file_suffix}")
    folder, stem = stem_path.parent, stem_path.name
    bad = int(non_finite_rows(images).sum())
    if bad:
        ctx.warn(f"{bad} of {len(images)} images have non-finite pixel values (NaN or infinity: usually a diverged "
                 "model or too high a LoRA strength); they are written with NaN as black and infinities clamped",
                 images=bad)
    # the workflow, to re-run it (ours, and ComfyUI's prompt and editor graph): made once per run by
    # whoever runs this node, not here, so a node never reads workflows (see lora_nodes.pngchunks)
    info = png_info(ctx.png_chunks())
    numbers = itertools.count(next_free_index(folder, stem))  # shared: each image goes on from the last
    for image in images:
        picture = to_pil(image, truncate)
        # each name is claimed atomically: a writer at the same moment (another thread or process
        # with the same prefix) makes this one take the next free number instead of overwriting
        path = write_new_file((folder / f"{stem}_{n:05d}.png" for n in numbers),
                              lambda tmp, picture=picture: picture.save(tmp, format="PNG", pnginfo=info))
        ctx.wrote(path)
