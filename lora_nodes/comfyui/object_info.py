"""A node declaration as ComfyUI's ``/object_info`` describes a node type to its editor.

The pack's ``INPUT_TYPES`` and ``lora-nodes nodes --json`` are rendered from it. Its input order
and the seed rule are those ComfyUI's file formats use too, so they live with the formats
(:mod:`lora_nodes.graph.comfy.widgets`); importing this module does not build the pack's classes.
"""

from __future__ import annotations

from typing import Any

from ..graph.comfy.widgets import control_option, input_groups
from ..nodes.spec import COMBO, REQUIRED, Catalogue, Input, NodeSpec

PYTHON_MODULE = "custom_nodes.lora-nodes"  # where ComfyUI says a node comes from


def object_info(spec: NodeSpec) -> dict[str, Any]:
    """``spec`` described the way ComfyUI's ``/object_info`` describes a node."""
    groups = input_groups(spec)
    required, optional = ({i.name: input_info(i) for i in group} for group in groups)
    return {
        "input": {"required": required, "optional": optional},
        "input_order": {"required": list(required), "optional": list(optional)},
        "output": [o.type for o in spec.outputs],
        "output_is_list": [False for _ in spec.outputs],
        "output_name": [o.name for o in spec.outputs],
        "output_tooltips": [o.description for o in spec.outputs],
        "name": spec.id,
        "display_name": spec.display_name,
        "description": spec.description,
        "python_module": PYTHON_MODULE,
        "category": spec.category,
        "output_node": spec.output_node,
        "version": spec.version,
    }


def catalogue_object_info(catalogue: Catalogue) -> dict[str, dict[str, Any]]:
    """Every node of ``catalogue`` by id, as ComfyUI's ``/object_info`` lists them."""
    return {node_id: object_info(spec) for node_id, spec in catalogue.items()}


def input_info(decl: Input) -> list[Any]:
    """One input as ``/object_info`` gives it: ``[type or choices, {default, min, max, step, ...}]``."""
    options: dict[str, Any] = {}
    if decl.default is not REQUIRED:
        options["default"] = decl.default
    for key in ("min", "max", "step"):
        if getattr(decl, key) is not None:
            options[key] = getattr(decl, key)
    if decl.multiline:
        options["multiline"] = True
    options.update(control_option(decl))
    if decl.description:
        options["tooltip"] = decl.description
    kind: Any = list(decl.choices) if decl.type == COMBO else decl.type
    return [kind, options]
