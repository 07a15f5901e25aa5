"""A prompt the editor posts, checked by our validator, and what is wrong with it in ComfyUI's shape.

ComfyUI answers an invalid ``POST /prompt`` with ``{"error": {...}, "node_errors": {id: {"errors":
[...], "dependent_outputs": [...], "class_type": ...}}}``; the editor marks each node and input
named there. Our validator reports every problem at once, with the node and input, so each maps onto
one entry.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..graph import Problem, Workflow, WorkflowError, parse_workflow
from ..graph.validate import BUILTIN_PREFIX, BoundNode, bind
from ..nodes.spec import Catalogue

OUTSIDE_MESSAGE = "paths outside the model/input folders are refused when the server is reachable from other machines"


@dataclass
class CheckedPrompt:
    """A valid prompt: the workflow to run and the output nodes it runs."""

    workflow: Workflow
    outputs: list[str]


class InvalidPrompt(Exception):
    """A prompt that cannot run; ``body`` is the JSON answer, in ComfyUI's shape."""

    def __init__(self, body: dict[str, Any]):
        self.body = body
        super().__init__(body["error"]["message"])


def check_prompt(prompt: Any, base_dir: Path, catalogue: Catalogue,
                 allowed_roots: Sequence[Path] | None = None) -> CheckedPrompt:
    """Parse and validate an API-format prompt (relative paths against ``base_dir``).

    Raises :class:`InvalidPrompt` carrying ComfyUI's error shape. Call it where the server's model
    folders are in force (names are looked up in them). ``allowed_roots``: when given, every file a
    path input reads must lie inside one of them (a server others can reach must not hand out any file
    of the machine: a LoadImage of ``/home/me/.ssh/...`` then SaveImage would copy it where ``/view``
    serves it); ``builtin:`` names are fine.
    """
    if not isinstance(prompt, dict) or not prompt:
        raise InvalidPrompt(error_body("invalid_prompt", "the prompt must be a mapping of node ids to nodes", ""))
    try:
        workflow = parse_workflow(prompt, base_dir)
        bound = bind(workflow, catalogue)
    except WorkflowError as exc:
        raise InvalidPrompt(problems_body(exc.problems, prompt)) from None
    if allowed_roots is not None:
        outside = paths_outside(bound, allowed_roots)
        if outside:
            raise InvalidPrompt(problems_body(outside, prompt))
    return CheckedPrompt(workflow, [node_id for node_id, node in bound.items() if node.spec.output_node])


def paths_outside(bound: dict[str, BoundNode], roots: Sequence[Path]) -> list[Problem]:
    """A problem for each path input read from outside ``roots`` (paths written are the engine's to
    confine to the output folder)."""
    resolved_roots = [Path(root).resolve() for root in roots]
    problems = []
    for node_id, node in bound.items():
        for decl in node.spec.inputs:
            value = node.literals.get(decl.name)
            if (not decl.path or decl.writes or not isinstance(value, str) or not value
                    or value.startswith(BUILTIN_PREFIX)):
                continue
            where = Path(value).resolve()
            if not any(where.is_relative_to(root) for root in resolved_roots):
                problems.append(Problem("path_outside_folders", OUTSIDE_MESSAGE, node_id, decl.name))
    return problems


def error_body(kind: str, message: str, details: str, node_errors: dict[str, Any] | None = None) -> dict[str, Any]:
    """ComfyUI's answer to a prompt it refuses."""
    return {"error": {"type": kind, "message": message, "details": details, "extra_info": {}},
            "node_errors": node_errors or {}}


def problems_body(problems: list[Problem], prompt: dict[str, Any]) -> dict[str, Any]:
    """Our validation problems as ComfyUI's refusal: each node's problems under its id."""
    node_errors: dict[str, Any] = {}
    outputs = _output_ids(prompt)
    for problem in problems:
        if problem.node is None or problem.node not in prompt:
            continue
        entry = node_errors.setdefault(problem.node, {"errors": [], "dependent_outputs": outputs,
                                                      "class_type": _class_type(prompt, problem.node)})
        extra = {"input_name": problem.input} if problem.input else {}
        entry["errors"].append({"type": problem.code, "message": problem.message,
                                "details": f"{problem.input}: {problem.message}" if problem.input else problem.message,
                                "extra_info": extra})
    details = "\n".join(str(problem) for problem in problems)
    kind = "prompt_outputs_failed_validation" if node_errors else (problems[0].code if problems else "invalid_prompt")
    message = ("Prompt outputs failed validation" if node_errors
               else (problems[0].message if problems else "the prompt is invalid"))
    return error_body(kind, message, details, node_errors)


def _class_type(prompt: dict[str, Any], node_id: str) -> Any:
    body = prompt.get(node_id)
    return body.get("class_type") if isinstance(body, dict) else None


def _output_ids(prompt: dict[str, Any]) -> list[str]:
    """Ids of the prompt's nodes that look like outputs (a hint for the editor; exactness is not needed)."""
    return [node_id for node_id, body in prompt.items()
            if isinstance(body, dict) and str(body.get("class_type", "")).split(".")[-1].startswith(("Save", "Preview"))]
