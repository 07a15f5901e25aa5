"""Labelled image grids, as A1111's X/Y plot draws them: cells in rows and columns, each column and
row named by its value, the axes by what they vary.

The drawing (:func:`draw_grid`) is plain PIL and serves both the ``Grid`` node (pictures and labels
inside a workflow, headless or in ComfyUI) and the grids a ``--sweep`` run writes. The font is the
one Pillow carries (``ImageFont.load_default``: a scalable FreeType font since Pillow 10.1, a small
bitmap font before): nothing is downloaded or shipped.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

from ..errors import NodeError
from .images import to_pil
from .spec import IMAGE, INT, STRING, Input, Output, node

if TYPE_CHECKING:  # annotations only: declaring the node must not import torch or PIL
    import torch
    from PIL import Image, ImageDraw, ImageFont

Box = tuple[int, int, int, int]  # left, top, right, bottom (right and bottom excluded), as PIL crops
BACKGROUND, INK, EMPTY_CELL = (255, 255, 255), (0, 0, 0), (200, 200, 200)
GAP = 2  # pixels between cells: neighbouring pictures stay apart
MAX_ROW_LABEL_CELLS = 2.5  # a row label column is at most this many cells wide (long prompts wrap)
MAX_COLUMNS = 1024


# --------------------------------------------------------------------------- text


@lru_cache(maxsize=16)
def grid_font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """Pillow's own font at ``size`` pixels (its fixed-size bitmap font on a Pillow without FreeType)."""
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except (TypeError, ImportError, OSError):  # Pillow < 10.1 or no FreeType: one size only
        return ImageFont.load_default()


def font_size_for(cell_width: int, cell_height: int) -> int:
    """Labels grow with the pictures: a sixth of the smaller side, between 11 and 32 pixels."""
    return max(11, min(32, round(min(cell_width, cell_height) / 6)))


def short_label(value: object) -> str:
    """How a swept value reads in a grid: a LoRA or model path by its file name without extension."""
    text = str(value)
    if isinstance(value, str) and ("/" in text or "\\" in text or text.lower().endswith(".safetensors")):
        return Path(text.replace("\\", "/")).stem or text
    if isinstance(value, float) and value.is_integer():
        return str(int(value)) if abs(value) < 1e15 else text
    return text


def wrap(text: str, font, width: int) -> list[str]:
    """``text`` broken into lines no wider than ``width`` pixels: at spaces, then inside words too long
    for a line (after a ``.``, ``_``, ``=``, ``/`` or ``-`` where one fits: ``images.`` / ``seed``)."""
    lines: list[str] = []
    for paragraph in text.split("\n"):
        line = ""
        for word in paragraph.split(" "):
            candidate = f"{line} {word}" if line else word
            if font.getlength(candidate) <= width:
                line = candidate
                continue
            if line:
                lines.append(line)
            pieces = _broken_word(word, font, width)
            lines += pieces[:-1]
            line = pieces[-1]
        lines.append(line)
    return lines


def _broken_word(word: str, font, width: int) -> list[str]:
    """A word as lines no wider than ``width``: cut after punctuation where possible, else anywhere."""
    lines, line = [], ""
    for part in re.split(r"(?<=[._=/-])", word):
        if font.getlength(line + part) <= width:
            line += part
            continue
        if line:
            lines.append(line)
            line = ""
        for char in part:  # a part wider than a line is cut where it must be
            if line and font.getlength(line + char) > width:
                lines.append(line)
                line = ""
            line += char
    return [*lines, line]


def _line_height(font) -> int:
    bottom = font.getbbox("Ag")[3]
    return bottom + max(2, bottom // 5)


# --------------------------------------------------------------------------- layout


@dataclass(frozen=True)
class GridLayout:
    """Where everything of a grid is: cells, their labels, the axis titles (boxes in pixels)."""

    columns: int
    rows: int
    cell_width: int
    cell_height: int
    left: int  # width of the row-label column
    top: int  # height of the title band and the column-label band together
    title_height: int
    font_size: int

    @property
    def size(self) -> tuple[int, int]:
        return (self.left + self.columns * (self.cell_width + GAP),
                self.top + self.rows * (self.cell_height + GAP))

    def cell_box(self, row: int, column: int) -> Box:
        x = self.left + column * (self.cell_width + GAP)
        y = self.top + row * (self.cell_height + GAP)
        return x, y, x + self.cell_width, y + self.cell_height

    def column_label_box(self, column: int) -> Box:
        x = self.left + column * (self.cell_width + GAP)
        return x, self.title_height, x + self.cell_width, self.top

    def row_label_box(self, row: int) -> Box:
        y = self.top + row * (self.cell_height + GAP)
        return 0, y, self.left, y + self.cell_height

    def column_title_box(self) -> Box:
        return self.left, 0, self.size[0], self.title_height

    def row_title_box(self) -> Box:
        return 0, 0, self.left, self.top


def _text_height(lines: list[str], font) -> int:
    return len(lines) * _line_height(font) if any(lines) else 0


def grid_layout(cell_size: tuple[int, int], count: int, columns: int, column_labels: Sequence[str],
                row_labels: Sequence[str], column_title: str = "", row_title: str = "") -> GridLayout:
    """The layout of ``count`` cells of ``cell_size`` in ``columns`` columns, with room for the labels."""
    cell_width, cell_height = cell_size
    columns = max(1, min(columns, count)) if count else 1
    rows = max(1, math.ceil(count / columns), len(row_labels))
    size = font_size_for(cell_width, cell_height)
    font = grid_font(size)
    pad = max(3, size // 3)
    label_width = max(cell_width - 2, 8)
    column_band = max((_text_height(wrap(t, font, label_width), font) for t in column_labels), default=0)
    widest_row = max((font.getlength(line) for t in (*row_labels, row_title) for line in t.split("\n")), default=0)
    # at most a few cells wide (long prompts wrap), but room for a dozen characters beside small cells
    row_cap = max(round(MAX_ROW_LABEL_CELLS * cell_width), 12 * size)
    row_width = min(math.ceil(widest_row), row_cap) if widest_row else 0
    left = row_width + 2 * pad if row_width else 0
    title_height = _text_height(wrap(column_title, font, columns * cell_width), font) if column_title else 0
    title_height = title_height + pad if title_height else 0
    top = title_height + (column_band + 2 * pad if column_band else 0)
    if row_title and not top:  # the row title sits above the row labels: make room for one line
        top = _line_height(font) + 2 * pad
    return GridLayout(columns, rows, cell_width, cell_height, left, top, title_height, size)


# --------------------------------------------------------------------------- drawing


def _draw_centred(draw: ImageDraw.ImageDraw, box: Box, text: str, font, align_x: str = "centre") -> None:
    """``text`` wrapped to fit ``box``'s width and centred in it (vertically always)."""
    left, top, right, bottom = box
    lines = wrap(text, font, max(right - left - 4, 8))
    line_height = _line_height(font)
    y = top + max(0, (bottom - top - len(lines) * line_height) // 2)
    for line in lines:
        width = font.getlength(line)
        x = left + (right - left - width) / 2 if align_x == "centre" else right - 4 - width
        draw.text((x, y), line, fill=INK, font=font)
        y += line_height


def _fit(picture: Image.Image, width: int, height: int) -> Image.Image:
    """``picture`` on a cell of ``width`` x ``height``, centred (a smaller picture keeps its size)."""
    from PIL import Image

    if picture.size == (width, height):
        return picture
    cell = Image.new("RGB", (width, height), BACKGROUND)
    cell.paste(picture, ((width - picture.width) // 2, (height - picture.height) // 2))
    return cell


def draw_grid(cells: Sequence[Image.Image | None], columns: int, column_labels: Sequence[str] = (),
              row_labels: Sequence[str] = (), column_title: str = "", row_title: str = "",
              ) -> tuple[Image.Image, GridLayout]:
    """Draw ``cells`` (row by row; None: an empty grey cell, e.g. a variant that failed) in ``columns``
    columns, each column headed by its label and each row by its, with the axis titles above.

    Cells smaller than the largest are centred in theirs. Returns the picture and its layout.
    """
    from PIL import Image, ImageDraw

    if not cells:
        raise ValueError("a grid needs at least one cell")
    pictures = [c.convert("RGB") if c is not None else None for c in cells]
    present = [p for p in pictures if p is not None]
    cell_size = (max((p.width for p in present), default=64), max((p.height for p in present), default=64))
    layout = grid_layout(cell_size, len(cells), columns, column_labels, row_labels, column_title, row_title)
    grid = Image.new("RGB", layout.size, BACKGROUND)
    draw = ImageDraw.Draw(grid)
    font = grid_font(layout.font_size)
    for index, picture in enumerate(pictures):
        box = layout.cell_box(*divmod(index, layout.columns))
        if picture is None:
            draw.rectangle((box[0], box[1], box[2] - 1, box[3] - 1), fill=EMPTY_CELL)
        else:
            grid.paste(_fit(picture, *cell_size), box[:2])
    for column, label in enumerate(column_labels[:layout.columns]):
        _draw_centred(draw, layout.column_label_box(column), label, font)
    for row, label in enumerate(row_labels[:layout.rows]):
        _draw_centred(draw, layout.row_label_box(row), label, font, align_x="right")
    if column_title:
        _draw_centred(draw, layout.column_title_box(), column_title, font)
    if row_title:
        _draw_centred(draw, layout.row_title_box(), row_title, font, align_x="right")
    return grid, layout


def side_by_side(pictures: Sequence[Image.Image]) -> Image.Image:
    """Several pictures in one row (a variant that saved more than one picture fills its cell so)."""
    from PIL import Image

    if len(pictures) == 1:
        return pictures[0]
    width, height = sum(p.width for p in pictures) + GAP * (len(pictures) - 1), max(p.height for p in pictures)
    row = Image.new("RGB", (width, height), BACKGROUND)
    x = 0
    for picture in pictures:
        row.paste(picture.convert("RGB"), (x, 0))
        x += picture.width + GAP
    return row


# --------------------------------------------------------------------------- the node


def _labels(text: str) -> list[str]:
    """One label per line of a multiline widget (blank lines at the end ignored)."""
    return text.rstrip("\n").split("\n") if text.strip() else []


def _grid_columns(columns: int, column_labels: list[str], count: int) -> int:
    if columns:
        return columns
    return len(column_labels) if column_labels else count


MORE_IMAGES = Input(IMAGE, optional=True, description="more pictures, after those of the inputs above")


def labels_input(what: str) -> Input:
    return Input(STRING, multiline=True, description=f"one label per line, {what}; empty: none")


@node("Grid", display_name="Image Grid", category="image",
      outputs=(Output("grid", IMAGE, "one picture: the cells in rows and columns, with their labels"),))
def grid_node(
    ctx,
    images_1: Annotated[torch.Tensor, Input(IMAGE, description="the first pictures, filling the grid row by row")],
    columns: Annotated[int, Input(INT, min=0, max=MAX_COLUMNS,
                                  description="cells in a row; 0: one per column label (all in one row without)")] = 0,
    column_labels: Annotated[str, labels_input("left to right")] = "",
    row_labels: Annotated[str, labels_input("top to bottom")] = "",
    column_title: Annotated[str, Input(STRING, description="what changes from column to column, e.g. "
                                       "styled.strength_model")] = "",
    row_title: Annotated[str, Input(STRING, description="what changes from row to row")] = "",
    cell_scale: Annotated[int, Input(INT, min=1, max=8, description="enlarge each picture this many times "
                                     "(pixels repeated) so that small pictures and their labels read well")] = 1,
    images_2: Annotated[torch.Tensor | None, MORE_IMAGES] = None,
    images_3: Annotated[torch.Tensor | None, MORE_IMAGES] = None,
    images_4: Annotated[torch.Tensor | None, MORE_IMAGES] = None,
    images_5: Annotated[torch.Tensor | None, MORE_IMAGES] = None,
    images_6: Annotated[torch.Tensor | None, MORE_IMAGES] = None,
    images_7: Annotated[torch.Tensor | None, MORE_IMAGES] = None,
    images_8: Annotated[torch.Tensor | None, MORE_IMAGES] = None,
):
    """Put pictures in a labelled grid: every picture of images_1, then of images_2 ... fills the cells
    row by row; each column and row is named by its line of the labels, the axes by the titles."""
    import numpy as np
    import torch
    from PIL import Image

    batches = [b for b in (images_1, images_2, images_3, images_4, images_5, images_6, images_7, images_8)
               if b is not None]
    pictures = [to_pil(image) for batch in batches for image in batch]
    if not pictures:
        raise NodeError("Grid got no pictures: connect images_1 to a node's images")
    if cell_scale > 1:
        pictures = [p.resize((p.width * cell_scale, p.height * cell_scale), Image.Resampling.NEAREST)
                    for p in pictures]
    column_names, row_names = _labels(column_labels), _labels(row_labels)
    picture, layout = draw_grid(pictures, _grid_columns(columns, column_names, len(pictures)), column_names,
                                row_names, column_title, row_title)
    if len(column_names) > layout.columns or len(row_names) > layout.rows:
        ctx.warn(f"Grid has {layout.columns} columns and {layout.rows} rows but {len(column_names)} column and "
                 f"{len(row_names)} row labels; the labels left over are not drawn")
    pixels = torch.from_numpy(np.asarray(picture, dtype=np.float32) / 255.0)
    return (pixels.unsqueeze(0),)
