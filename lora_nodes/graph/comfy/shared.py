"""What ComfyUI's two formats share: node ids and titles, the layout a UI file leaves, and the checks.

A workflow read from a UI file keeps each node's position, size and title under
``extra["ui"]["nodes"]``, so writing it back (either format) gives the user's graph, not a new one.
"""

from __future__ import annotations

import math
from typing import Any

from ...nodes.spec import Catalogue, NodeSpec
from ..problems import Problem, WorkflowError, cut, listing
from ..validate import check
from ..workflow import Link, Workflow

# problems that leave a graph no ComfyUI file can express (a missing file, a value out of range can be written)
STRUCTURAL_CODES = frozenset({"unknown_node_type", "missing_node", "missing_output", "type_mismatch", "cycle"})


# ---------------------------------------------------------------------------------------------
# reading


def unsupported_nodes_error(types_by_id: dict[str, str]) -> WorkflowError:
    """One problem that lists every node type we do not run (neither ours nor a ComfyUI core node we have),
    with the ids of its nodes."""
    by_type: dict[str, list[str]] = {}
    for node_id, node_type in types_by_id.items():
        by_type.setdefault(node_type, []).append(node_id)
    groups = [f"{cut(t, 80)} (node{'s' * (len(ids) > 1)} {listing(ids, 5)})" for t, ids in sorted(by_type.items())]
    listed = "; ".join(groups[:12]) + (f"; ... ({len(groups) - 12} more types)" if len(groups) > 12 else "")
    message = (f"this workflow uses node types that lora-nodes does not run: {listed}. Graphs of ComfyUI's core "
               "nodes run here, but only of those 'lora-nodes nodes' lists (with ours); custom nodes and the core "
               "nodes we lack run only inside ComfyUI: replace them with listed ones, or run the graph in ComfyUI")
    return WorkflowError([Problem("unsupported_nodes", message)])


# ---------------------------------------------------------------------------------------------
# the layout kept from a UI file


def kept_layout(node: dict[str, Any]) -> dict[str, Any]:
    """What we keep of a UI node's appearance: position, size, and a title the user gave it."""
    kept = {key: list(node[key]) for key in ("pos", "size") if _is_pair(node.get(key))}
    if isinstance(node.get("title"), str):
        kept["title"] = node["title"]
    return kept


def layout_extra(layouts: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The ``extra`` of a workflow read from a UI file: each node's kept layout (none: nothing)."""
    return {"ui": {"nodes": layouts}} if layouts else {}


def kept_layouts(workflow: Workflow) -> dict[str, dict[str, Any]]:
    """Each node's kept layout, by node id (a hand-edited ``extra`` may hold anything: only mappings count)."""
    ui = workflow.extra.get("ui")
    nodes = ui.get("nodes") if isinstance(ui, dict) else None
    return {str(k): v for k, v in nodes.items() if isinstance(v, dict)} if isinstance(nodes, dict) else {}


def pair(value: Any) -> list[float] | None:
    """A kept position or size as two floats; None when it is not two finite numbers."""
    return [float(v) for v in value] if _is_pair(value) else None


def _is_pair(value: Any) -> bool:
    return isinstance(value, (list, tuple)) and len(value) == 2 and all(_is_coordinate(v) for v in value)


def _is_coordinate(value: Any) -> bool:
    """A finite number a float can hold (a position from a file may be anything)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(float(value))
    except OverflowError:
        return False


# ---------------------------------------------------------------------------------------------
# writing


def check_convertible(workflow: Workflow, catalogue: Catalogue) -> dict[str, NodeSpec]:
    """The spec of every node; raises on what no ComfyUI file can express (files need not exist)."""
    problems, _ = check(workflow, catalogue)
    structural = [p for p in problems if p.code in STRUCTURAL_CODES]
    if structural:
        raise WorkflowError(structural)
    return {node_id: catalogue[call.type] for node_id, call in workflow.nodes.items()}


def comfy_ids(workflow: Workflow) -> dict[str, int]:
    """Integer ids for ComfyUI: kept when every id already is one, else 1, 2, ... in file order."""
    ids = list(workflow.nodes)
    # at most 15 digits: ComfyUI's ids are JavaScript numbers, exact up to 2**53
    if all(i.isascii() and i.isdigit() and len(i) <= 15 and str(int(i)) == i and int(i) > 0 for i in ids):
        return {i: int(i) for i in ids}
    return {node_id: n for n, node_id in enumerate(ids, start=1)}


def title(workflow: Workflow, node_id: str, ids: dict[str, int]) -> str | None:
    """The title a node gets in ComfyUI: one it had there, else our id when ComfyUI's id differs."""
    kept = kept_layouts(workflow).get(node_id, {}).get("title")
    if isinstance(kept, str):
        return kept
    return None if str(ids[node_id]) == node_id else node_id


def output_index(workflow: Workflow, catalogue: Catalogue, link: Link) -> int:
    """The index of the output ``link`` takes (ComfyUI's files name outputs by index only)."""
    index = catalogue[workflow.nodes[link.node].type].output_index(link.output)
    assert index is not None  # checked by check_convertible
    return index
