"""ComfyUI's API format (a prompt, as ``POST /prompt`` takes it): reading and writing.

A prompt is ``{"<id>": {"class_type": ..., "inputs": {...}, "_meta": {"title": ...}}}``, with links
as ``[source_id, output_index]``: our own format with names allowed in links, so reading one is
reading our nodes under other keys.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ...nodes.spec import REQUIRED, Catalogue
from ..problems import Problem, WorkflowError, describe
from ..workflow import Link, NodeCall, Workflow, node_ids, parse_inputs
from .shared import check_convertible, comfy_ids, output_index, title, unsupported_nodes_error
from .widgets import without_editor_widgets


def is_api_format(data: dict[Any, Any]) -> bool:
    """Whether ``data`` is a ComfyUI API-format prompt: every entry a node with a ``class_type``."""
    return bool(data) and all(isinstance(v, dict) and "class_type" in v for v in data.values())


def from_api(data: dict[str, Any], base_dir: Path, catalogue: Catalogue, source: Path | None = None) -> Workflow:
    """A :class:`Workflow` from a ComfyUI API-format prompt; node ids are the prompt's keys.

    Raises :class:`WorkflowError` for entries that are not nodes, and (``unsupported_nodes``) listing
    every node type we do not implement.
    """
    bodies, problems = node_ids(data)
    nodes: dict[str, NodeCall] = {}
    unknown: dict[str, str] = {}
    for node_id, body in bodies.items():
        node_type = body["class_type"]
        if not isinstance(node_type, str):
            problems.append(Problem("parse_error", f"'class_type' must be text, not {describe(node_type)}", node_id))
            continue
        inputs, input_problems = parse_inputs(body.get("inputs"), node_id, node_type)
        problems += input_problems
        spec = catalogue.get(node_type)
        if spec is None:
            unknown[node_id] = node_type
        else:
            inputs = without_editor_widgets(spec, inputs)
        nodes[node_id] = NodeCall(node_type, inputs)
    if problems:
        raise WorkflowError(problems)
    if unknown:
        raise unsupported_nodes_error(unknown)
    return Workflow(nodes, base_dir, "", source)


def to_api(workflow: Workflow, catalogue: Catalogue) -> dict:
    """The workflow as a ComfyUI API-format prompt: ``{"<id>": {"class_type", "inputs", "_meta"}}``.

    Our types are namespaced (ComfyUI's core nodes keep their own ids), links are
    ``[source_id, output_index]``, and every input that has a default is written out (ComfyUI needs
    each required widget value).
    """
    specs = check_convertible(workflow, catalogue)
    ids = comfy_ids(workflow)
    prompt: dict[str, Any] = {}
    for node_id, call in workflow.nodes.items():
        spec = specs[node_id]
        inputs: dict[str, Any] = {}
        for decl in spec.inputs:
            value = call.inputs.get(decl.name, REQUIRED)
            if isinstance(value, Link):
                inputs[decl.name] = [str(ids[value.node]), output_index(workflow, catalogue, value)]
            elif value is not REQUIRED:
                inputs[decl.name] = value
            elif decl.default is not REQUIRED and not decl.optional:
                inputs[decl.name] = decl.default
        name = title(workflow, node_id, ids) or spec.display_name
        prompt[str(ids[node_id])] = {"class_type": spec.comfy_id, "inputs": inputs, "_meta": {"title": name}}
    return prompt
