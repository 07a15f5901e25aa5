"""Training data: a folder of captioned images, read once and checked before any training starts."""

from __future__ import annotations

from typing import Annotated

from ..datasets.folder import CROPS, IMAGE_EXTENSIONS, Dataset, read_folder
from .spec import BOOLEAN, COMBO, DATASET, INT, STRING, Input, Output, node


@node(
    "LoadDataset",
    display_name="Load Dataset",
    category="training",
    outputs=[Output("dataset", DATASET, "the decoded images with their captions and repeats, for TrainLoRA")],
)
def load_dataset(
    ctx,
    path: Annotated[str, Input(STRING, path=True, path_kind="folder", content_key=True,
                               description=f"a folder of images ({' '.join(IMAGE_EXTENSIONS)}) with same-named "
                                           "caption files; kohya-style '<repeats>_<name>' subfolders (e.g. "
                                           "'10_purple star') repeat their images and caption them with <name> "
                                           "when they have no caption file")],
    resolution: Annotated[int, Input(INT, min=0, max=4096, step=8,
                                     description="training size in pixels (area resolution x resolution); 0 is "
                                                 "the model's native size")] = 0,
    caption_extension: Annotated[str, Input(STRING, description="the caption files' extension")] = ".txt",
    default_caption: Annotated[str, Input(STRING, multiline=True,
                                          description="the caption of images with neither a caption file nor a "
                                                      "'<repeats>_<name>' folder")] = "",
    crop: Annotated[str, Input(COMBO, choices=CROPS,
                               description="center: resize the short side, crop the middle square; buckets: keep "
                                           "each image's aspect ratio in the nearest of kohya's aspect-ratio "
                                           "buckets of the same area")] = "center",
    shuffle_captions: Annotated[bool, Input(BOOLEAN, description="shuffle the comma-separated tags of a caption "
                                                                 "each time it is used")] = False,
    keep_tokens: Annotated[int, Input(INT, min=0, max=255,
                                      description="with shuffle_captions: the first tags that stay in place (e.g. "
                                                  "a trigger word)")] = 0,
    flip: Annotated[bool, Input(BOOLEAN, description="randomly mirror images left-right while training")] = False,
) -> tuple[Dataset]:
    """Read a folder of captioned training images (kohya's layout), decoding every image now.

    A broken image, a caption file that is not UTF-8 or a folder without images fails here,
    naming the file, before any training starts. Subfolders without a repeat count are ignored
    with a warning, as kohya ignores them.
    """
    dataset = read_folder(path, resolution, caption_extension, default_caption, crop, shuffle_captions,
                          keep_tokens, flip, warn=ctx.warn)
    summary = dataset.describe()
    ctx.info(_summary_line(summary), **summary)
    return (dataset,)


def _summary_line(summary: dict) -> str:
    """``16 images, 160 per epoch, 2 folders ('10_purple star' x10: 10 images, ...); buckets 64x64: 16``."""
    folders = ", ".join(f"'{name}' x{entry['n_repeats']}: {entry['img_count']} images"
                        for name, entry in summary["folders"].items())
    line = (f"{summary['images']} images, {summary['per_epoch']} per epoch, "
            f"{len(summary['folders'])} folder{'s' if len(summary['folders']) != 1 else ''} ({folders})")
    if summary["buckets"]:
        line += "; buckets " + ", ".join(f"{size}: {count}" for size, count in summary["buckets"].items())
    if summary["captions_missing"]:
        line += f"; {summary['captions_missing']} without caption"
    return line
