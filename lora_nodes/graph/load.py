"""Reading workflow files: our YAML/JSON format, ComfyUI API-format prompts, and PNGs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from .comfy import from_ui, is_ui_format
from .problems import Problem, WorkflowError
from .workflow import FORMAT, Link, NodeCall, Workflow, is_link

PNG_WORKFLOW_KEY = "lora-nodes"  # PNG text chunk that holds our workflow (JSON)
# Chunks a PNG's workflow is read from, in order: ours, ComfyUI's API-format prompt, its editor graph.
PNG_CHUNKS = (PNG_WORKFLOW_KEY, "prompt", "workflow")


def _fail(code: str, message: str) -> WorkflowError:
    return WorkflowError([Problem(code, message)])


def load_workflow(path: str | Path) -> Workflow:
    """Read a workflow from a ``.yaml``/``.yml``/``.json`` file or a PNG that embeds one."""
    path = Path(path)
    if not path.is_file():
        raise _fail("file_not_found", f"workflow file not found: {path}")
    if path.suffix.lower() == ".png":
        data = _read_png_workflow(path)
    else:
        text = path.read_text(encoding="utf-8")
        try:
            data = json.loads(text) if path.suffix.lower() == ".json" else yaml.safe_load(text)
        except (json.JSONDecodeError, yaml.YAMLError) as exc:
            raise _fail("parse_error", f"{path} is not valid {path.suffix.lstrip('.').upper()}: {exc}") from exc
    return parse_workflow(data, base_dir=path.resolve().parent, source=path)


def _read_png_workflow(path: Path) -> Any:
    """The workflow a PNG embeds: ours if it has one, else ComfyUI's ``prompt``, else its ``workflow``."""
    from PIL import Image

    with Image.open(path) as image:
        info = dict(image.info)
    for key in PNG_CHUNKS:
        text = info.get(key)
        if isinstance(text, str):
            try:
                return json.loads(text)
            except json.JSONDecodeError as exc:
                raise _fail("parse_error", f"{path}: its '{key}' text chunk is not valid JSON: {exc}") from exc
    names = ", ".join(f"'{k}'" for k in PNG_CHUNKS)
    raise _fail("no_workflow", f"{path} holds no workflow (none of the text chunks {names})")


def parse_workflow(data: Any, base_dir: Path, source: Path | None = None) -> Workflow:
    """Build a :class:`Workflow` from parsed file contents: our format, or ComfyUI's API or UI format."""
    if not isinstance(data, dict):
        raise _fail("parse_error", "a workflow must be a mapping with a 'nodes' key")
    if isinstance(data.get("nodes"), dict):
        return _parse_ours(data, base_dir, source)
    if is_ui_format(data):
        from ..nodes import catalogue

        return from_ui(data, base_dir, catalogue(), source)
    if data and all(isinstance(v, dict) and "class_type" in v for v in data.values()):
        return _parse_comfy_api(data, base_dir, source)
    raise _fail("parse_error", f"not a workflow: expected 'format: {FORMAT}' with a 'nodes' mapping")


def _parse_ours(data: dict[str, Any], base_dir: Path, source: Path | None) -> Workflow:
    fmt = data.get("format", FORMAT)
    if fmt != FORMAT:
        raise _fail("unsupported_format", f"unknown workflow format '{fmt}' (this version reads '{FORMAT}')")
    nodes: dict[str, NodeCall] = {}
    problems: list[Problem] = []
    for node_id, body in data["nodes"].items():
        node_id = str(node_id)
        if not isinstance(body, dict) or not isinstance(body.get("type"), str):
            problems.append(Problem("parse_error", "each node needs a 'type' and an 'inputs' mapping", node_id))
            continue
        inputs = body.get("inputs") or {}
        if not isinstance(inputs, dict):
            problems.append(Problem("parse_error", "'inputs' must be a mapping", node_id, type=body["type"]))
            continue
        nodes[node_id] = NodeCall(body["type"], _parse_inputs(inputs))
    if problems:
        raise WorkflowError(problems)
    extra = {k: v for k, v in data.items() if k not in ("format", "nodes", "description")}
    return Workflow(nodes, base_dir, str(data.get("description") or ""), source, extra)


def _parse_comfy_api(data: dict[str, Any], base_dir: Path, source: Path | None) -> Workflow:
    from ..nodes import catalogue
    from .comfy import unsupported_nodes_error

    unknown = {str(i): body["class_type"] for i, body in data.items() if body["class_type"] not in catalogue()}
    if unknown:
        raise unsupported_nodes_error(unknown)
    nodes = {str(i): NodeCall(body["class_type"], _parse_inputs(body.get("inputs") or {})) for i, body in data.items()}
    return Workflow(nodes, base_dir, "", source)


def _parse_inputs(inputs: dict[str, Any]) -> dict[str, Any]:
    return {str(k): Link(str(v[0]), v[1]) if is_link(v) else v for k, v in inputs.items()}

