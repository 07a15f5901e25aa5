"""Image folders with captions, as LoRA trainers read them (kohya sd-scripts' DreamBooth layout).

A dataset folder holds images (``.png .jpg .jpeg .webp .bmp``) with same-named caption files
(``star_01.png`` + ``star_01.txt``). Subfolders named ``<repeats>_<name>`` (``10_purple star``)
hold images that are shown ``repeats`` times per epoch and whose caption, when they have no
caption file, is ``name``. Images directly in the folder are shown once per epoch. Subfolders
without a leading repeat count are ignored with a warning, as kohya ignores them.

Every image is decoded when the folder is read, so a broken file fails the LoadDataset node,
not a training run an hour later. :class:`Dataset` is immutable; the trainer asks it for
:meth:`Dataset.examples` (pixels cropped to the training size), :meth:`Dataset.epoch_batches`
(which examples go together, per epoch) and :meth:`Dataset.caption` (tags shuffled per use).
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import NodeError

if TYPE_CHECKING:  # annotations only: validation imports this module, and must not import torch or PIL
    import numpy as np
    import torch
    from PIL import Image

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
"""The image files a dataset folder is searched for (any letter case)."""

CROPS = ("center", "buckets")
"""``center``: one square size for all; ``buckets``: kohya aspect-ratio buckets."""

# "10_purple star" -> (10, "purple star"); "10" alone is 10 repeats and no folder caption (as kohya).
_REPEATS_FOLDER = re.compile(r"(\d+)(?:_(.*))?", re.ASCII | re.DOTALL)


@dataclass(frozen=True, eq=False)  # eq=False: arrays have no single truth value; items compare by identity
class DatasetItem:
    """One image of the dataset, decoded, with its caption and how often an epoch shows it."""

    path: str  # the image file
    caption: str  # raw caption (before shuffling)
    repeats: int
    image: np.ndarray  # uint8 [H, W, 3], read-only


@dataclass(frozen=True, eq=False)  # eq=False: tensors have no single truth value
class Example:
    """One image ready for training: cropped and resized to its bucket, scaled to -1..1."""

    pixels: torch.Tensor  # float32 [3, h, w] in -1..1 (already cropped/resized); shared, do not modify
    caption: str  # raw caption
    original_size: tuple[int, int]  # (height, width) of the source image (SDXL micro-conditioning)
    crop_top_left: tuple[int, int]  # (top, left) of the crop in the resized image


@dataclass(frozen=True)
class Dataset:
    """A captioned image folder and how to train on it (immutable; nodes never change it)."""

    folder: str
    items: tuple[DatasetItem, ...]
    resolution: int  # training size (square area resolution**2); 0: the model's native size
    crop: str  # one of CROPS
    shuffle_captions: bool
    keep_tokens: int
    flip: bool  # random horizontal flips: applied by the trainer
    # examples() per resolution. A memo only: the same inputs always give the same examples.
    _examples: dict[tuple[int, int], tuple[Example, ...]] = field(
        default_factory=dict, init=False, repr=False, compare=False)

    def __len__(self) -> int:
        """Images shown per epoch, repeats counted."""
        return sum(item.repeats for item in self.items)

    def training_size(self, resolution: int = 0) -> int:
        """The resolution examples are made at: this dataset's own, else ``resolution`` (the model's)."""
        size = self.resolution or resolution
        if size <= 0:
            raise NodeError("the dataset has no training resolution: set LoadDataset's resolution, "
                            "or train a model that has a native size")
        if size % 8:
            raise NodeError(f"training resolution {size} is not a multiple of 8 (the VAE needs multiples of 8)")
        return size

    def examples(self, resolution: int, multiple: int = 8) -> list[Example]:
        """One example per image (not expanded by repeats), in ``items`` order.

        ``resolution`` is used only when the dataset's own is 0 (the model's native size is given
        here by the trainer); bucket sides are multiples of ``multiple`` too (what the model's
        UNet needs). Computed once per size; the pixels are shared, never modify them.
        """
        size = self.training_size(resolution)
        step = _lcm(bucket_step(size), multiple)
        cached = self._examples.get((size, step))
        if cached is None:
            cached = tuple(_example(item, size, self.crop, step) for item in self.items)
            self._examples[(size, step)] = cached
        return list(cached)

    def epoch_batches(self, examples: list[Example], batch_size: int, epoch: int, seed: int) -> list[list[int]]:
        """Which examples train together in ``epoch``: batches of indices into ``examples``.

        Each index appears as many times as its item's repeats, exactly once per occurrence.
        The occurrences are shuffled, grouped by pixel size (a batch never mixes buckets) into
        batches of up to ``batch_size``, and the batches shuffled: the same (seed, epoch) always
        gives the same batches, on any machine.
        """
        import torch

        if len(examples) != len(self.items):
            raise ValueError(f"expected the {len(self.items)} examples of this dataset, got {len(examples)}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        generator = torch.Generator().manual_seed(_epoch_seed(seed, epoch))
        occurrences = [index for index, item in enumerate(self.items) for _ in range(item.repeats)]
        order = torch.randperm(len(occurrences), generator=generator).tolist()
        by_size: dict[tuple[int, int], list[int]] = {}
        for position in order:
            index = occurrences[position]
            by_size.setdefault(tuple(examples[index].pixels.shape[-2:]), []).append(index)
        batches = [group[start:start + batch_size] for group in by_size.values()
                   for start in range(0, len(group), batch_size)]
        return [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]

    def caption(self, example: Example, generator: torch.Generator) -> str:
        """The caption to train ``example`` with this time.

        With ``shuffle_captions`` its comma-separated tags are shuffled (``torch.randperm`` on
        ``generator``), the first ``keep_tokens`` staying in place, and joined with ", "
        (kohya's shuffle_caption); otherwise the raw caption.
        """
        import torch

        if not self.shuffle_captions:
            return example.caption
        tags = [tag.strip() for tag in example.caption.split(",")]
        tags = [tag for tag in tags if tag]
        kept, rest = tags[:self.keep_tokens], tags[self.keep_tokens:]
        if len(rest) > 1:
            rest = [rest[i] for i in torch.randperm(len(rest), generator=generator).tolist()]
        return ", ".join(kept + rest)

    def tag_frequency(self) -> dict[str, dict[str, int]]:
        """kohya's ``ss_tag_frequency``: {folder name: {tag: images whose caption has it}}.

        Tags are the comma-separated parts of the raw captions, stripped and lower-cased, counted
        once per image (not per repeat), as kohya sd-scripts counts them. Root images count under
        the root folder's name.
        """
        frequency: dict[str, dict[str, int]] = {}
        for item in self.items:
            counts = frequency.setdefault(Path(item.path).parent.name, {})
            for tag in item.caption.split(","):
                tag = tag.strip().lower()
                if tag:
                    counts[tag] = counts.get(tag, 0) + 1
        return frequency

    def folders(self) -> dict[str, dict[str, int]]:
        """kohya's ``ss_dataset_dirs``: {folder name: {"n_repeats": r, "img_count": images}}."""
        folders: dict[str, dict[str, int]] = {}
        for item in self.items:
            entry = folders.setdefault(Path(item.path).parent.name, {"n_repeats": item.repeats, "img_count": 0})
            entry["img_count"] += 1
        return folders

    def buckets(self, resolution: int = 0) -> dict[str, int]:
        """{"WxH": images} of the sizes the images are cropped to (cheap: no pixels are resized)."""
        size = self.training_size(resolution)
        counts: dict[str, int] = {}
        for item in self.items:
            height, width = item.image.shape[:2]
            bucket_width, bucket_height = target_size(height, width, size, self.crop)
            name = f"{bucket_width}x{bucket_height}"
            counts[name] = counts.get(name, 0) + 1
        return dict(sorted(counts.items(), key=lambda kv: -kv[1]))

    def describe(self, resolution: int = 0) -> dict[str, Any]:
        """What the dataset holds, JSON-ready, for info events and LoRA metadata.

        Buckets are listed when the training size is known (the dataset's own, or ``resolution``).
        """
        known = self.resolution or resolution
        return {
            "folder": self.folder,
            "images": len(self.items),
            "per_epoch": len(self),
            "folders": self.folders(),
            "captions_missing": sum(1 for item in self.items if not item.caption),
            "resolution": self.resolution,
            "crop": self.crop,
            "buckets": self.buckets(known) if known else None,
        }


def read_folder(folder: str | Path, resolution: int = 0, caption_extension: str = ".txt",
                default_caption: str = "", crop: str = "center", shuffle_captions: bool = False,
                keep_tokens: int = 0, flip: bool = False,
                warn: Callable[[str], None] | None = None) -> Dataset:
    """Read and decode every image of a dataset folder (see the module docs for the layout).

    A caption is, in order: the first non-empty line of the image's caption file, the name of
    its ``<repeats>_<name>`` folder, ``default_caption``; else empty (trained unconditionally,
    with a warning). ``warn`` receives what went partly wrong (ignored folders, empty captions).
    Raises :class:`NodeError` naming the file or folder for anything unreadable.
    """
    warn = warn or (lambda _message: None)
    root = Path(folder)
    if crop not in CROPS:
        raise NodeError(f"crop must be one of {', '.join(CROPS)}, got {crop!r}")
    if resolution < 0 or resolution % 8:
        raise NodeError(f"resolution must be 0 (the model's native size) or a multiple of 8, got {resolution}")
    if keep_tokens < 0:
        raise NodeError(f"keep_tokens must be 0 or more, got {keep_tokens}")
    if not root.exists():
        raise NodeError(f"dataset folder not found: {root}; give the folder that holds the training images")
    if not root.is_dir():
        raise NodeError(f"{root} is a file, not a folder; give the folder that holds the training images")
    extension = caption_extension.strip()
    if extension and not extension.startswith("."):
        extension = "." + extension  # "txt" means ".txt"

    sources, ignored = _find_images(root, warn)
    if not sources:
        wanted = " ".join(IMAGE_EXTENSIONS)
        also = f" (ignored subfolders: {', '.join(ignored)})" if ignored else ""
        raise NodeError(f"no images in {root}: looked for {wanted} files in the folder and in its "
                        f"'<repeats>_<name>' subfolders (e.g. '10_purple star'){also}")

    items, extra_lines = [], 0
    for path, repeats, folder_caption in sources:
        text, more = _read_caption(path, extension)
        extra_lines += more
        caption = text or folder_caption or default_caption.strip()
        items.append(DatasetItem(str(path), caption, repeats, read_image(path)))
    if extra_lines:
        warn(f"{extra_lines} caption files have more than one line: only the first is used (as kohya does)")
    missing = sum(1 for item in items if not item.caption)
    if missing:
        warn(f"{missing} of {len(items)} images have no caption (no caption file, no folder name, no "
             "default_caption): they are trained with an empty caption")
    return Dataset(str(root), tuple(items), resolution, crop, shuffle_captions, keep_tokens, flip)


def _find_images(root: Path, warn: Callable[[str], None]) -> tuple[list[tuple[Path, int, str]], list[str]]:
    """(image, repeats, folder caption) for every image, root first, then subfolders by name."""
    sources: list[tuple[Path, int, str]] = []
    ignored: list[str] = []
    entries = sorted((p for p in root.iterdir() if not p.name.startswith(".")), key=lambda p: p.name)
    sources += [(p, 1, "") for p in entries if _is_image(p)]
    for sub in (p for p in entries if p.is_dir()):
        match = _REPEATS_FOLDER.fullmatch(sub.name)
        if match is None or int(match.group(1)) == 0:
            why = "its name does not start with a repeat count" if match is None else "it repeats 0 times"
            warn(f"ignored subfolder '{sub.name}': {why}; name it '<repeats>_<caption>' (e.g. '10_purple star') "
                 "to train on its images")
            ignored.append(sub.name)
            continue
        repeats, name = int(match.group(1)), (match.group(2) or "").strip()
        inside = sorted((p for p in sub.iterdir() if not p.name.startswith(".")), key=lambda p: p.name)
        sources += [(p, repeats, name) for p in inside if _is_image(p)]
        nested = [p.name for p in inside if p.is_dir()]
        if nested:
            warn(f"subfolders of '{sub.name}' are not read ({', '.join(nested)}): move their images up a level")
    return sources, ignored


def _is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS and path.is_file()


def _read_caption(image: Path, extension: str) -> tuple[str, int]:
    """The image's caption from its caption file ("" if none) and how many further lines were ignored."""
    if not extension:
        return "", 0
    path = image.with_suffix(extension)
    if path == image or not path.is_file():
        return "", 0
    try:
        text = path.read_bytes().decode("utf-8-sig")  # -sig: editors on Windows add a byte-order mark
    except UnicodeDecodeError as error:
        raise NodeError(f"caption file {path} is not UTF-8 text (bad byte at position {error.start}); "
                        "save it with UTF-8 encoding") from error
    except OSError as error:
        raise NodeError(f"cannot read caption file {path}: {error}") from error
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return (lines[0], int(len(lines) > 1)) if lines else ("", 0)


def read_image(path: str | Path) -> np.ndarray:
    """An image file as read-only uint8 [H, W, 3] RGB: EXIF rotation applied, transparency on white.

    Decodes the whole file, so a truncated or corrupt image fails here with its name.
    """
    import numpy as np
    from PIL import Image, ImageOps

    try:
        with Image.open(path) as opened:
            opened.load()
            image = ImageOps.exif_transpose(opened)
            array = np.asarray(_to_rgb(image), dtype=np.uint8)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        raise NodeError(f"cannot read image {path}: {error}; replace the file or remove it from the dataset") \
            from error
    array = np.ascontiguousarray(array)
    array.setflags(write=False)  # the dataset is immutable, its pixels too
    return array


def _to_rgb(image: Image.Image) -> Image.Image:
    import numpy as np
    from PIL import Image

    if image.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        # 16-bit greys: PIL's convert("RGB") would clip them to white; scale to 8 bits instead.
        values = np.asarray(image, dtype=np.float32)
        if values.max(initial=0) > 255:
            values = values / 257.0
        image = Image.fromarray(values.clip(0, 255).round().astype(np.uint8), "L")
    has_alpha = image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info
    if not has_alpha:
        return image.convert("RGB")
    rgba = image.convert("RGBA")
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, rgba).convert("RGB")


def bucket_step(resolution: int) -> int:
    """Bucket sides are multiples of this: 64 from 256 pixels up (kohya's default), else 8."""
    return 64 if resolution >= 256 else 8


def bucket_sizes(resolution: int, step: int = 0) -> tuple[tuple[int, int], ...]:
    """The (width, height) buckets for a training resolution, kohya's way.

    The square bucket, and for each width from resolution/2 to resolution*2 (in steps of
    :func:`bucket_step`) the largest height that keeps width*height <= resolution**2, both
    orientations. At 512 that is kohya's default 256..1024 in steps of 64. ``step`` 0 is
    :func:`bucket_step`'s.
    """
    step = step or bucket_step(resolution)
    area = resolution * resolution
    sizes = {(resolution // step * step,) * 2}
    smallest = max(step, resolution // 2 // step * step)
    largest = resolution * 2 // step * step
    for width in range(smallest, largest + 1, step):
        height = min(largest, area // width // step * step)
        if height >= smallest:
            sizes |= {(width, height), (height, width)}
    return tuple(sorted(sizes))


def target_size(height: int, width: int, resolution: int, crop: str, step: int = 0) -> tuple[int, int]:
    """The (width, height) an image of this size is cropped to.

    ``center``: resolution x resolution. ``buckets``: the bucket whose aspect ratio is nearest
    the image's (nearest in log ratio, so 2:1 and 1:2 are equally far from square), larger area
    first on a tie.
    """
    if crop == "center":
        return resolution, resolution
    aspect = math.log(width / height)
    return min(bucket_sizes(resolution, step), key=lambda wh: (abs(math.log(wh[0] / wh[1]) - aspect), -wh[0] * wh[1]))


def _lcm(a: int, b: int) -> int:
    return a * b // math.gcd(a, b)


def _example(item: DatasetItem, resolution: int, crop: str, step: int = 0) -> Example:
    """Resize ``item`` to cover its target size (keeping its aspect ratio), then crop the middle."""
    import numpy as np
    import torch
    from PIL import Image

    height, width = item.image.shape[:2]
    target_width, target_height = target_size(height, width, resolution, crop, step)
    scale = max(target_width / width, target_height / height)
    resized_width = max(target_width, round(width * scale))
    resized_height = max(target_height, round(height * scale))
    image = Image.fromarray(item.image)
    if (resized_width, resized_height) != (width, height):
        image = image.resize((resized_width, resized_height), Image.Resampling.LANCZOS)
    top, left = (resized_height - target_height) // 2, (resized_width - target_width) // 2
    image = image.crop((left, top, left + target_width, top + target_height))
    pixels = torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1).float().div_(127.5).sub_(1.0)
    return Example(pixels.contiguous(), item.caption, (height, width), (top, left))


def _epoch_seed(seed: int, epoch: int) -> int:
    """A generator seed for (seed, epoch): hashed, so nearby seeds and epochs give unrelated orders."""
    digest = hashlib.blake2b(f"lora-nodes dataset {seed} {epoch}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") & (2**63 - 1)
