"""ComfyUI's UI format (the editor's ``workflow.json``): writing it, and laying the graph out.

The file written opens in a ComfyUI with our pack installed: our node types namespaced (ComfyUI's
core nodes under their own ids), every widget
value present (a seed followed by its control value), the same ids and titles as the API format
written from the same workflow, and the layout a UI file left, or else a left-to-right one by depth.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ...nodes.spec import BOOLEAN, COMBO, FLOAT, INT, REQUIRED, STRING, Catalogue, Input, NodeSpec
from ..links import depths, link_order, workflow_graph
from ..workflow import Link, NodeCall, Workflow
from .shared import check_convertible, comfy_ids, kept_layouts, output_index, pair, title
from .widgets import has_control_widget, socket_inputs, widget_inputs

UI_VERSION = 0.4
WRITTEN_CONTROL = "fixed"  # what we write after a seed: the file reproduces the same image
_ZERO = {INT: 0, FLOAT: 0.0, STRING: "", BOOLEAN: False}


def _literal(call: NodeCall, decl: Input) -> Any:
    """The value a widget shows: the workflow's, else the default, else the type's empty value."""
    value = call.inputs.get(decl.name, REQUIRED)
    if value is REQUIRED or isinstance(value, Link):
        value = decl.default
    if value is REQUIRED:
        return decl.choices[0] if decl.type == COMBO and decl.choices else _ZERO.get(decl.type, "")
    return value


@dataclass
class _UiWriter:
    """Builds the UI-format dict: nodes with their slots and widgets, and the link table."""

    workflow: Workflow
    catalogue: Catalogue
    specs: dict[str, NodeSpec]
    ids: dict[str, int]
    nodes: dict[str, dict[str, Any]] = field(default_factory=dict)
    links: list[list[Any]] = field(default_factory=list)

    def node(self, node_id: str, order: int, pos: list[float], size: list[float]) -> None:
        spec, call = self.specs[node_id], self.workflow.nodes[node_id]
        node: dict[str, Any] = {
            "id": self.ids[node_id], "type": spec.comfy_id, "pos": pos, "size": size, "flags": {},
            "order": order, "mode": 0,
            "inputs": [{"name": d.name, "type": d.type, "link": None} for d in socket_inputs(spec)],
            "outputs": [{"name": o.name, "type": o.type, "links": None, "slot_index": n}
                        for n, o in enumerate(spec.outputs)],
            "properties": {"Node name for S&R": spec.comfy_id},
            "widgets_values": self._widgets(spec, call),
        }
        name = title(self.workflow, node_id, self.ids)
        if name is not None:
            node["title"] = name
        self.nodes[node_id] = node

    @staticmethod
    def _widgets(spec: NodeSpec, call: NodeCall) -> list[Any]:
        values: list[Any] = []
        for decl in widget_inputs(spec):
            values.append(_literal(call, decl))
            if has_control_widget(decl):
                values.append(WRITTEN_CONTROL)
        return values

    def connect(self, node_id: str) -> None:
        """Add a link for every linked input of ``node_id`` (a linked widget becomes a socket)."""
        spec, target = self.specs[node_id], self.nodes[node_id]
        for decl in spec.inputs:
            value = self.workflow.nodes[node_id].inputs.get(decl.name)
            if not isinstance(value, Link):
                continue
            slots = target["inputs"]
            slot = next((n for n, s in enumerate(slots) if s["name"] == decl.name), None)
            if slot is None:
                slots.append({"name": decl.name, "type": decl.type, "widget": {"name": decl.name}, "link": None})
                slot = len(slots) - 1
            index = output_index(self.workflow, self.catalogue, value)
            link_id = len(self.links) + 1
            output = self.nodes[value.node]["outputs"][index]
            output["links"] = [*(output["links"] or []), link_id]
            slots[slot]["link"] = link_id
            self.links.append([link_id, self.ids[value.node], index, self.ids[node_id], slot, output["type"]])


def to_ui(workflow: Workflow, catalogue: Catalogue) -> dict:
    """The workflow as a ComfyUI editor file (version 0.4), laid out from ``extra["ui"]`` or by depth."""
    specs = check_convertible(workflow, catalogue)
    writer = _UiWriter(workflow, catalogue, specs, comfy_ids(workflow))
    order = _file_link_order(workflow)
    placed = layout(workflow, specs)
    for node_id in workflow.nodes:
        pos, size = placed[node_id]
        writer.node(node_id, order.index(node_id), pos, size)
    for node_id in workflow.nodes:
        writer.connect(node_id)
    return {
        "last_node_id": max(writer.ids.values(), default=0),
        "last_link_id": len(writer.links),
        "nodes": [writer.nodes[node_id] for node_id in workflow.nodes],
        "links": writer.links,
        "groups": [],
        "config": {},
        "extra": {"ds": {"scale": 1, "offset": [0, 0]}},
        "version": UI_VERSION,
    }


def _file_link_order(workflow: Workflow) -> list[str]:
    """The nodes in link order, ties in file order: each node's ``order`` in the file, and the layout's."""
    position = {node_id: n for n, node_id in enumerate(workflow.nodes)}
    return link_order(workflow_graph(workflow), key=position.__getitem__)


def estimated_size(spec: NodeSpec) -> list[float]:
    """About the size ComfyUI draws a node at: a title, a row per slot, a row per widget."""
    widgets = widget_inputs(spec)
    rows = max(len(socket_inputs(spec)), len(spec.outputs))
    controls = sum(has_control_widget(d) for d in widgets)
    text_boxes = sum(d.multiline for d in widgets)
    height = 30 + 22 * rows + 24 * (len(widgets) + controls) + 60 * text_boxes
    return [400.0 if text_boxes else 315.0, float(height)]


def layout(workflow: Workflow, specs: dict[str, NodeSpec]) -> dict[str, tuple[list[float], list[float]]]:
    """Each node's position and size: kept from ``extra["ui"]``, else left to right by graph depth.

    A node's column is the longest path to it from a node without inputs; a column's nodes are
    stacked top to bottom in file order.
    """
    kept = kept_layouts(workflow)
    depth = depths(workflow_graph(workflow), _file_link_order(workflow))
    sizes = {i: pair(kept.get(i, {}).get("size")) or estimated_size(specs[i]) for i in workflow.nodes}
    columns = [[i for i in workflow.nodes if depth[i] == col] for col in range(max(depth.values(), default=-1) + 1)]
    placed: dict[str, tuple[list[float], list[float]]] = {}
    x = 50.0
    for column in columns:
        y = 50.0
        for node_id in column:
            pos = pair(kept.get(node_id, {}).get("pos")) or [x, y]
            placed[node_id] = (pos, sizes[node_id])
            y += sizes[node_id][1] + 60
        x += max(sizes[i][0] for i in column) + 80
    return placed
