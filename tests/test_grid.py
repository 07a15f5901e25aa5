"""Labelled grids: the Grid node and the grids a --sweep run writes (geometry, labels, cells, the workflow)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import write_workflow
from PIL import Image

from lora_nodes.cli import main
from lora_nodes.engine.context import NodeContext
from lora_nodes.graph import load_workflow
from lora_nodes.nodes.grid import draw_grid, grid_font, grid_node, short_label, wrap

WHITE = 255


def _solid(colour: tuple[int, int, int], size: int = 32) -> Image.Image:
    return Image.new("RGB", (size, size), colour)


def _crop(picture: Image.Image, box) -> np.ndarray:
    return np.asarray(picture.crop(box)).astype(int)


def _inked(area: np.ndarray) -> bool:
    """Dark pixels in a label area: something is written there."""
    return bool((area.min(axis=-1) < 128).sum() >= 3)


def test_grid_places_every_cell_as_it_was_and_labels_each_row_and_column_differently():
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (0, 255, 255), (255, 0, 255)]
    cells = [_solid(c) for c in colours]
    picture, layout = draw_grid(cells, 3, ["0", "0.5", "1"], ["first prompt", "second prompt"],
                                "styled.strength_model", "images.prompt")
    assert (layout.columns, layout.rows) == (3, 2) and picture.size == layout.size
    for index, colour in enumerate(colours):
        box = layout.cell_box(*divmod(index, 3))
        assert box[2] - box[0] == 32 and box[3] - box[1] == 32
        assert (_crop(picture, box) == colour).all(), index  # the cell is the picture, pixel for pixel
    columns = [_crop(picture, layout.column_label_box(c)) for c in range(3)]
    rows = [_crop(picture, layout.row_label_box(r)) for r in range(2)]
    assert all(_inked(a) for a in columns + rows)
    assert not np.array_equal(columns[0], columns[1]) and not np.array_equal(columns[1], columns[2])
    assert not np.array_equal(rows[0], rows[1])
    # the label areas lie outside the cells: above them, and left of them
    assert layout.column_label_box(0)[3] <= layout.cell_box(0, 0)[1]
    assert layout.row_label_box(0)[2] <= layout.cell_box(0, 0)[0]
    assert _inked(_crop(picture, layout.column_title_box()))


def test_a_missing_cell_is_grey_and_labels_without_titles_leave_no_title_band():
    picture, layout = draw_grid([_solid((255, 0, 0)), None], 2, ["a", "b"])
    assert layout.title_height == 0 and layout.left == 0
    grey = _crop(picture, layout.cell_box(0, 1))
    assert (grey == grey[0, 0]).all() and 100 < grey[0, 0, 0] < 250


def test_long_labels_wrap_to_the_cell_and_paths_are_shortened():
    font = grid_font(11)
    lines = wrap("a purple star on a white background", font, 70)
    assert len(lines) > 2 and all(font.getlength(line) <= 70 for line in lines)
    assert " ".join(lines) == "a purple star on a white background"
    assert wrap("averyveryverylongword", font, 20)[0] != "averyveryverylongword"
    assert short_label("/loras/style/my_style_v2.safetensors") == "my_style_v2"
    assert short_label(1.0) == "1" and short_label(0.5) == "0.5" and short_label("euler") == "euler"


def test_grid_node_enlarges_cells_by_whole_pixels_and_takes_images_from_several_inputs():
    red, blue = torch.zeros(1, 4, 4, 3), torch.zeros(2, 4, 4, 3)
    red[..., 0] = 1.0
    blue[..., 2] = 1.0
    ctx = NodeContext("grid", "Grid", Path("."), Path("."), lambda ev: None)
    (grid,) = grid_node.run(ctx, images_1=red, columns=0, column_labels="x\ny\nz", row_labels="", column_title="",
                            row_title="", cell_scale=3, images_2=blue, images_3=None, images_4=None, images_5=None,
                            images_6=None, images_7=None, images_8=None)
    assert grid.shape[0] == 1 and grid.shape[-1] == 3
    picture = Image.fromarray((grid[0].numpy() * 255).round().astype(np.uint8))
    _, layout = draw_grid([_solid((0, 0, 0), 12)] * 3, 3, ["x", "y", "z"])
    assert picture.size == layout.size  # three 12-pixel cells: 4 pixels times 3
    for column, colour in enumerate([(255, 0, 0), (0, 0, 255), (0, 0, 255)]):
        assert (_crop(picture, layout.cell_box(0, column)) == colour).all()


SWEEP_WORKFLOW = """
format: lora-nodes/1
nodes:
  base:   {type: LoadBase, inputs: {source: "builtin:tiny"}}
  images: {type: Sample, inputs: {model: [base, model], prompt: "a red circle", seed: 1, steps: 1,
                                  width: 32, height: 32}}
  save:   {type: SaveImages, inputs: {images: [images, images], prefix: sweep/img}}
"""


@pytest.fixture(scope="module")
def sweep_run(tmp_path_factory):
    """A 2 x 2 x 2 sweep through the CLI: two grids (one per value of the third sweep) and 8 images."""
    folder = tmp_path_factory.mktemp("grid-sweep")
    workflow = write_workflow(folder, SWEEP_WORKFLOW)
    out = folder / "out"
    code = main(["run", str(workflow), "--output-dir", str(out), "--sweep", "images.seed=1,2",
                 "--sweep", "images.cfg=1,7", "--sweep", "images.prompt:replace=red,blue"])
    return code, workflow, out


def test_a_sweep_writes_one_grid_per_value_of_its_third_axis_with_each_variants_image_in_its_cell(sweep_run):
    code, _, out = sweep_run
    assert code == 0
    grids = sorted((out / "sweep").glob("workflow_grid*.png"))
    assert [g.name for g in grids] == ["workflow_grid_images.prompt=blue_00001.png",
                                       "workflow_grid_images.prompt=red_00001.png"]
    for grid_file, word in zip(grids, ["blue", "red"], strict=True):
        grid = np.asarray(Image.open(grid_file).convert("RGB")).astype(int)
        where = {(seed, cfg): _find(grid, out / "sweep" / f"img_images.seed={seed}_images.cfg={cfg}_images.prompt={word}"
                                    "_00001.png") for seed in (1, 2) for cfg in (1, 7)}
        assert all(where.values()), where  # every variant's image is in its grid, pixel for pixel
        (y11, x11), (y21, x21), (y17, x17) = where[1, 1], where[2, 1], where[1, 7]
        assert y21 == y11 and x21 > x11  # the first sweep (seed) across
        assert x17 == x11 and y17 > y11  # the second (cfg) down
        assert _inked(grid[:y11, x11:x11 + 32]) and _inked(grid[y11:y11 + 32, :x11])  # labels above and left


def _find(grid: np.ndarray, image_file: Path) -> tuple[int, int] | None:
    """Where (top, left) the picture in ``image_file`` lies in ``grid`` exactly, or None."""
    return _find_array(grid, np.asarray(Image.open(image_file).convert("RGB")).astype(int))


def test_a_grid_png_carries_the_workflow_and_its_sweeps_and_runs_again(sweep_run, tmp_path):
    _, _, out = sweep_run
    grid = next((out / "sweep").glob("workflow_grid_images.prompt=red_*.png"))
    embedded = json.loads(Image.open(grid).info["lora-nodes"])
    assert embedded["sweep"] == ["images.seed=[1, 2]", "images.cfg=[1, 7]", 'images.prompt:replace=["red", "blue"]']
    assert {"prompt", "workflow"} <= set(Image.open(grid).info)  # ComfyUI's too, as on every PNG
    assert "sweep" not in load_workflow(next((out / "sweep").glob("img_*.png"))).extra
    again = tmp_path / "again"
    assert main(["run", str(grid), "--output-dir", str(again), "--no-grid"]) == 0
    assert len(list(again.rglob("img_*.png"))) == 8 and not list(again.rglob("*grid*"))


# --------------------------------------------------------------------------- the quickstart shows a LoRA working

PALETTE = {"red": (230, 30, 30), "green": (30, 170, 30), "blue": (30, 60, 230), "yellow": (240, 220, 30),
           "purple": (140, 40, 180)}  # the colours builtin:shapes draws, and the LoRA's


def _colour_name(area: np.ndarray) -> str:
    """The palette colour nearest the mean of the pixels that are not white background (the shape)."""
    pixels = area.reshape(-1, 3).astype(float)
    shape = pixels[np.linalg.norm(pixels - WHITE, axis=-1) > 0.25 * 255]
    assert len(shape) >= 10, "nothing drawn"
    mean = shape.mean(0)
    return min(PALETTE, key=lambda name: np.linalg.norm(mean - PALETTE[name]))


def test_the_quickstart_grid_shows_the_purple_star_lora_turning_a_blue_square_purple(quickstart_run):
    out, files = quickstart_run
    grid_file = next(f for f in files if Path(f).name.startswith("grid_"))
    grid = np.asarray(Image.open(grid_file).convert("RGB")).astype(int)
    assert "lora-nodes" in Image.open(grid_file).info  # the workflow, as in every PNG
    # the blue square's three pictures are saved too; the grid shows them twice as large, in its first row
    where = []
    for strength in ("0", "0.5", "1"):
        picture = np.asarray(Image.open(out / "quickstart" / f"strength_{strength}_00001.png"))
        large = np.repeat(np.repeat(picture, 2, axis=0), 2, axis=1)
        found = _find_array(grid, large)
        assert found, strength
        where.append(found)
    top, size = where[0][0], 128
    assert [w[0] for w in where] == [top] * 3 and where[0][1] < where[1][1] < where[2][1]
    first_row = [grid[top:top + size, left:left + size] for _, left in where]
    below = [grid[top + size:, left:left + size] for _, left in where]  # the purple-star prompt's row
    assert _colour_name(first_row[0]) == "blue"  # strength 0: the base's blue square
    assert _colour_name(first_row[2]) == "purple" and _colour_name(below[2]) == "purple"  # strength 1: purple
    assert _colour_name(below[0]) == "blue"  # the base never learnt purple: it draws blue


def _find_array(grid: np.ndarray, cell: np.ndarray) -> tuple[int, int] | None:
    height, width = cell.shape[:2]
    for top, left in np.argwhere((grid[:-height + 1, :-width + 1] == cell[0, 0]).all(-1)):
        if np.array_equal(grid[top:top + height, left:left + width], cell):
            return int(top), int(left)
    return None


def test_the_grid_node_runs_in_comfyui_as_its_generated_class():
    """The pack's class is made from the declaration: ComfyUI passes the inputs it has (no optional ones)."""
    from lora_nodes.comfyui.pack import NODE_CLASS_MAPPINGS

    grid_class = NODE_CLASS_MAPPINGS["lora-nodes.Grid"]
    types = grid_class.INPUT_TYPES()
    assert types["required"]["images_1"][0] == "IMAGE" and types["required"]["row_labels"][1]["multiline"]
    assert set(types["optional"]) == {f"images_{n}" for n in range(2, 9)}
    images = torch.rand(4, 8, 8, 3)
    (grid,) = grid_class().run(images_1=images, columns=2, column_labels="a\nb", row_labels="c\nd",
                               column_title="x", row_title="y", cell_scale=1)
    picture = np.asarray(Image.fromarray((grid[0].numpy() * 255).round().astype(np.uint8))).astype(int)
    expected = (images[3].numpy() * 255).round().astype(int)
    assert _find_array(picture, expected) is not None  # the last picture, in its cell
