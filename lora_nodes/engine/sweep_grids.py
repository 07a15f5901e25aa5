"""The labelled grids a ``--sweep`` run writes beside its images, as A1111's X/Y/Z plot draws them.

The first sweep runs across, the second down, and every value of the further sweeps gets a grid of
its own (its values named above the columns). A cell is what its variant saved as PNGs (several side
by side); a variant that failed leaves a grey cell. A grid PNG carries the workflow as every PNG we
write does, with the sweeps recorded under the workflow's ``sweep`` key, so ``lora-nodes run`` on
the grid draws the whole grid again.
"""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..fileio import write_new_file
from ..graph.overrides import REPLACE, Override, file_suffix
from ..graph.problems import WorkflowError
from ..graph.validate import bind
from ..graph.workflow import Workflow
from ..nodes.grid import draw_grid, short_label, side_by_side
from ..nodes.spec import Catalogue
from ..pngchunks import png_info

if TYPE_CHECKING:  # the CLI reads SWEEP_KEY from here to validate: that must not import PIL, nor what a run needs
    from PIL import Image

    from .workers import VariantOutcome

SWEEP_KEY = "sweep"  # the workflow key a grid PNG records its sweeps under (``--sweep`` arguments)
GRID_NAME = "grid"


def sweep_arguments(sweeps: list[list[Override]]) -> list[str]:
    """The ``--sweep`` arguments that give ``sweeps`` again (values as a JSON list: YAML reads it back)."""
    texts = []
    for sweep in sweeps:
        first = sweep[0]
        target = f"{first.node}.{first.input}{REPLACE if first.find is not None else ''}"
        texts.append(f"{target}={json.dumps([o.value for o in sweep], ensure_ascii=False)}")
    return texts


def _cell(outcome: VariantOutcome) -> Image.Image | None:
    from PIL import Image

    pictures = [Image.open(f) for f in outcome.files if f.lower().endswith(".png")]
    return side_by_side(pictures) if pictures and outcome.ok else None


def _grid_chunks(workflow: Workflow, sweeps: list[list[Override]], output_dir: Path,
                 catalogue: Catalogue) -> dict[str, str]:
    """The workflow as every PNG carries it, with the sweeps that made the grid recorded."""
    from ..graph.embed import embeddable_workflow, png_chunks

    try:
        embedded = embeddable_workflow(workflow, bind(workflow, catalogue))
    except WorkflowError:  # the workflow needs a swept value to be valid: embed it as written
        embedded = workflow.to_dict()
    embedded[SWEEP_KEY] = sweep_arguments(sweeps)
    return png_chunks(embedded, output_dir, catalogue)


def write_sweep_grids(workflow: Workflow, sweeps: list[list[Override]], outcomes: list[VariantOutcome],
                      output_dir: str | Path, catalogue: Catalogue) -> list[str]:
    """Draw and write the grids of a sweep run (``outcomes`` in the order of ``sweep_variants``); none
    when no variant saved a picture. Returns the files written."""
    from .workers import numbered_paths

    if not sweeps or len(outcomes) != math.prod(len(s) for s in sweeps):
        return []
    cells = [_cell(o) for o in outcomes]
    first_png = next((Path(f) for o in outcomes for f in o.files if f.lower().endswith(".png")), None)
    if first_png is None:
        return []
    across, down, further = sweeps[0], sweeps[1] if len(sweeps) > 1 else [], sweeps[2:]
    stem = f"{workflow.source.stem if workflow.source else 'sweep'}_{GRID_NAME}"
    info = png_info(_grid_chunks(workflow, sweeps, Path(output_dir), catalogue))
    written = []
    for choice in itertools.product(*(range(len(s)) for s in further)):
        picks = [cells[_variant_index(sweeps, column, row, choice)]
                 for row in range(max(1, len(down))) for column in range(len(across))]
        chosen = tuple(sweep[i] for sweep, i in zip(further, choice, strict=True))
        heading = ", ".join(f"{o.axis_title} = {short_label(o.value)}" for o in chosen)
        picture, _ = draw_grid(picks, len(across), [short_label(o.value) for o in across],
                               [short_label(o.value) for o in down],
                               "\n".join(t for t in (heading, across[0].axis_title) if t),
                               down[0].axis_title if down else "")
        path = write_new_file(numbered_paths(first_png.parent, f"{stem}{file_suffix(chosen)}"),
                              lambda tmp, picture=picture: picture.save(tmp, format="PNG", pnginfo=info))
        written.append(str(path))
    return written


def _variant_index(sweeps: list[list[Any]], column: int, row: int, further: tuple[int, ...]) -> int:
    """Where the variant with these values is in ``sweep_variants``' order (the first sweep changes slowest)."""
    index = 0
    for size, position in zip((len(s) for s in sweeps), (column, row, *further)[:len(sweeps)], strict=True):
        index = index * size + position
    return index
