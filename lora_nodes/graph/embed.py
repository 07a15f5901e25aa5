"""What the files a run writes embed, to re-run it: the workflow as run, and ComfyUI's views of it.

The PNGs SaveImages writes carry the workflow three times (see :mod:`lora_nodes.pngchunks`): in our
format, and as ComfyUI's API-format prompt and editor graph, so a PNG dropped into ComfyUI opens
the graph. They are made here, once per run, and handed to the node through its context: a node
never reads or converts workflows itself. Beside them each SaveImages' PNGs carry A1111's
``parameters`` of the images it is given, traced per node by :mod:`.parameters`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..nodes.spec import Catalogue
from ..pngchunks import chunk_texts
from .comfy.api import to_api
from .comfy.ui_write import to_ui
from .load import parse_workflow
from .validate import BoundNode, portable_value
from .workflow import Workflow


def embeddable_workflow(workflow: Workflow, bound: dict[str, BoundNode]) -> dict[str, Any]:
    """The workflow as run (overrides applied), to embed in the files it writes: files in a models
    folder by their name there (so the file moves between machines and to ComfyUI), other paths absolute."""
    data = workflow.to_dict()
    for node_id, node in bound.items():
        inputs = data["nodes"][node_id]["inputs"]
        for decl in node.spec.inputs:
            if decl.path and decl.name in inputs and decl.name in node.literals:
                inputs[decl.name] = portable_value(node.literals[decl.name], decl)
    return data


def png_chunks(embedded: dict[str, Any], base_dir: Path, catalogue: Catalogue) -> dict[str, str]:
    """The PNG text chunks for a run of ``embedded`` (an :func:`embeddable_workflow`): ours, and
    ComfyUI's prompt and editor graph made from it (nothing for an empty one)."""
    if not embedded:
        return {}
    # read back from what is embedded, not the run's Workflow: ComfyUI's views then hold what ours does
    workflow = parse_workflow(embedded, base_dir)
    return chunk_texts(embedded, to_api(workflow, catalogue), to_ui(workflow, catalogue))
