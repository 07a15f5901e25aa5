"""Validation: every problem of a workflow at once, before anything runs.

Validation also binds the workflow: defaults filled in, paths resolved, links pointed at output
indices. The scheduler only ever sees bound nodes, so what it runs is what was checked.
"""

from __future__ import annotations

import difflib
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..modelfolders import find_model, not_found_hint, portable_name
from ..nodes.spec import BOOLEAN, COMBO, FLOAT, INT, STRING, Catalogue, Input, NodeSpec
from ..paths import expand_input_path, input_path_problem, output_name_problem
from .links import bound_graph, cycles, link_order
from .problems import Problem, WorkflowError, listing, shown
from .workflow import Link, Workflow

BUILTIN_PREFIX = "builtin:"
# every INT ends in a 64-bit integer, signed or (seeds) unsigned: torch, numpy, safetensors
INT_MIN, INT_MAX = -(2**63), 2**64 - 1


@dataclass(frozen=True)
class BoundNode:
    """A checked node: its spec, literal inputs (defaults and paths resolved) and links."""

    id: str
    spec: NodeSpec
    literals: dict[str, Any]
    links: dict[str, tuple[str, int]]  # input name -> (upstream node id, output index)


def resolve_path(value: str, base_dir: Path, folder: str | None = None) -> str:
    """A path input as an absolute path; ``builtin:`` names and empty strings stay as they are.

    The one place a path input is looked up: an existing path (relative to ``base_dir``, or absolute)
    first; else, for an input offered from a models folder of kind ``folder``, the file of that name
    in the active model folders (:func:`lora_nodes.modelfolders.find_model`). A path that cannot be
    resolved (a NUL in it, ``~user`` of no user) stays as it is: validation reports it.
    """
    if not isinstance(value, str) or not value or value.startswith(BUILTIN_PREFIX):
        return value
    try:
        path = expand_input_path(value, base_dir)
    except ValueError:
        return value
    if folder and not os.path.exists(path):
        return str(find_model(value, folder) or path)
    return str(path)


def rebase_paths(workflow: Workflow, catalogue: Catalogue, new_dir: Path | None = None) -> Workflow:
    """A copy whose file paths still point at the same files from ``new_dir``, and that names each
    file lying in a models folder by its name there, so the copy moves between machines (and to ComfyUI).

    Other paths inside ``new_dir`` stay relative to it (so a shared folder keeps working); others
    become absolute. ``new_dir`` None: the copy stays where the workflow is, and only model folder
    files change (to their names).
    """
    result = workflow.copy()
    result.base_dir = (new_dir or workflow.base_dir).resolve()
    for call in result.nodes.values():
        spec = _spec(catalogue, call.type)
        for name, value in call.inputs.items():
            decl = spec.input(name) if spec else None
            if decl is None or not decl.path or not isinstance(value, str) or not value:
                continue
            portable = _portable(value, decl, workflow.base_dir)
            if portable is not None:
                call.inputs[name] = portable
                continue
            if new_dir is None or value.startswith((BUILTIN_PREFIX, "~")) or Path(value).is_absolute():
                continue
            target = Path(resolve_path(value, workflow.base_dir))
            if not target.is_absolute():
                continue  # not resolvable: left as it is, for validation to report
            if decl.folder and not target.exists():
                continue  # a name for a models folder this machine lacks: the machine that runs it looks it up
            call.inputs[name] = (str(target.relative_to(result.base_dir)) if target.is_relative_to(result.base_dir)
                                 else str(target))
    return result


def _portable(value: str, decl: Input, base_dir: Path) -> str | None:
    """The name a path input's file has in a models folder of its kind, or None (not in one, or no kind)."""
    if not decl.folder or value.startswith(BUILTIN_PREFIX):
        return None
    return portable_name(resolve_path(value, base_dir, decl.folder), decl.folder)


def portable_value(value: Any, decl: Input) -> Any:
    """A bound path input's value as a file written for others should carry it: the name of a models
    folder file in that folder, other values as they are (what :func:`rebase_paths` does to a workflow)."""
    if not (decl.path and decl.folder and isinstance(value, str) and value) or value.startswith(BUILTIN_PREFIX):
        return value
    return portable_name(value, decl.folder) or value


def check(workflow: Workflow, catalogue: Catalogue,
          suffix_bytes: int = 0) -> tuple[list[Problem], dict[str, BoundNode]]:
    """Every problem in ``workflow``, and the bound nodes (meaningful only when there are none).

    ``suffix_bytes``: how long a suffix the run adds to output names (a sweep variant's label), so
    that a name too long for the file system is reported here rather than after sampling.
    """
    problems: list[Problem] = []
    bound: dict[str, BoundNode] = {}
    for node_id, call in workflow.nodes.items():
        spec = _spec(catalogue, call.type)
        if spec is None:
            problems.append(Problem("unknown_node_type", _unknown_type_message(call.type, catalogue), node_id))
            continue
        node_problems, literals, links = _check_node(node_id, spec, call.inputs, workflow, catalogue, suffix_bytes)
        problems += node_problems
        bound[node_id] = BoundNode(node_id, spec, literals, links)
    cycles = _cycles(workflow)
    problems += cycles
    if not cycles:  # a node with problems of its own is not looked at further (its values are not usable)
        problems += _preflight(bound, flawed={p.node for p in problems})
    if not any(spec.output_node for c in workflow.nodes.values() if (spec := _spec(catalogue, c.type))):
        problems.append(Problem("no_outputs", "the workflow has no output node (SaveImages, SaveImage, ...): nothing "
                                "would run"))
    return problems, bound


def bind(workflow: Workflow, catalogue: Catalogue, suffix_bytes: int = 0) -> dict[str, BoundNode]:
    """The bound nodes of a valid workflow; raises :class:`WorkflowError` listing every problem."""
    problems, bound = check(workflow, catalogue, suffix_bytes)
    if problems:
        raise WorkflowError(problems)
    return bound


def _spec(catalogue: Catalogue, node_type: Any) -> NodeSpec | None:
    """The spec of ``node_type``; None for an unknown type or one that is not text."""
    return catalogue.get(node_type) if isinstance(node_type, str) else None


def _unknown_type_message(node_type: Any, catalogue: Catalogue) -> str:
    if not isinstance(node_type, str):
        return f"the node type must be text, not {shown(node_type)}"
    # difflib is quadratic in the length: a long bogus name gets no suggestion
    close = difflib.get_close_matches(node_type, list(catalogue), n=1) if len(node_type) <= 100 else []
    hint = f"; did you mean '{close[0]}'?" if close else "; 'lora-nodes nodes' lists the node types"
    return f"unknown node type {shown(node_type)}{hint}"


def _check_node(node_id: str, spec: NodeSpec, inputs: dict[str, Any], workflow: Workflow, catalogue: Catalogue,
                suffix_bytes: int = 0):
    problems: list[Problem] = []
    literals: dict[str, Any] = {}
    links: dict[str, tuple[str, int]] = {}

    def problem(code: str, message: str, name: str | None) -> None:
        problems.append(Problem(code, message, node_id, name, spec.id))

    for name in inputs:
        if spec.input(name) is None:
            problem("unknown_input", f"{spec.id} has no input {shown(name)} (inputs: "
                    f"{', '.join(i.name for i in spec.inputs)})", name)
    for decl in spec.inputs:
        if decl.name not in inputs:
            if decl.required:
                problem("missing_input", f"required input '{decl.name}' ({decl.type}) is not set", decl.name)
            elif not decl.optional:
                literals[decl.name] = decl.default
            continue
        value = inputs[decl.name]
        if isinstance(value, Link):
            target = _check_link(value, decl, workflow, catalogue, lambda c, m, n=decl.name: problem(c, m, n))
            if target is not None:
                links[decl.name] = target
        elif decl.is_link:
            problem("type_mismatch", f"expects a link to a {decl.type} output, e.g. [node_id, output]", decl.name)
        else:
            found = _check_literal(decl, value, workflow.base_dir, suffix_bytes)
            for code, message in found:
                problem(code, message, decl.name)
            literals[decl.name] = resolve_path(value, workflow.base_dir, decl.folder) if decl.path and not found else value
    return problems, literals, links


def _check_link(link: Link, decl: Input, workflow: Workflow, catalogue: Catalogue, problem) -> tuple[str, int] | None:
    upstream = workflow.nodes.get(link.node)
    if upstream is None:
        problem("missing_node", f"links to node {shown(link.node)}, which is not in the workflow")
        return None
    upstream_spec = _spec(catalogue, upstream.type)
    if upstream_spec is None:
        return None  # reported as unknown_node_type on that node
    index = upstream_spec.output_index(link.output)
    if index is None:
        outputs = ", ".join(o.name for o in upstream_spec.outputs) or "none"
        problem("missing_output", f"node {shown(link.node)} ({upstream.type}) has no output {shown(link.output)} "
                f"(outputs: {outputs})")
        return None
    produced = upstream_spec.outputs[index].type
    accepted = STRING if decl.type == COMBO else decl.type
    if produced != accepted:
        problem("type_mismatch", f"expects {decl.type}, but {shown(link.node)} output "
                f"'{upstream_spec.outputs[index].name}' is {produced}")
        return None
    return link.node, index


def _check_literal(decl: Input, value: Any, base_dir: Path, suffix_bytes: int = 0) -> list[tuple[str, str]]:
    """Problems of a literal input value: its type first (nothing else is looked at when that is
    wrong), then choices, range and step, then paths (read or written)."""
    wrong = _type_problem(decl, value)
    if wrong is not None:
        return [("invalid_value", wrong)]
    if decl.type == COMBO and value not in decl.choices:
        return [("invalid_choice", f"{shown(value)} is not one of: {listing(decl.choices, 30)}")]
    if decl.type in (INT, FLOAT):
        below = decl.min is not None and value < decl.min
        above = decl.max is not None and value > decl.max
        if below or above:
            return [("out_of_range", f"{shown(value)} is outside {decl.min}..{decl.max}")]
        if decl.type == INT and not INT_MIN <= value <= INT_MAX:
            return [("out_of_range", f"{shown(value)} does not fit in 64 bits")]
        if decl.type == INT and decl.step and value % decl.step:
            return [("out_of_range", f"{value} is not a multiple of {decl.step}")]
    if decl.writes:
        reason = output_name_problem(value, reserve=suffix_bytes)
        return [("invalid_value", reason)] if reason else []
    if decl.path:
        return _check_path(decl, value, base_dir)
    return []


def _type_problem(decl: Input, value: Any) -> str | None:
    """Why ``value`` is not of ``decl``'s widget type, or None. Only the declared type is tested:
    a test for another type may not apply to this value (``math.isfinite(10**400)`` raises)."""
    if decl.type == INT:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif decl.type == FLOAT:
        if isinstance(value, int) and not isinstance(value, bool) and abs(value) > sys.float_info.max:
            return f"{shown(value)} is too large for a floating-point number"
        if isinstance(value, float) and not math.isfinite(value):
            return f"expects a finite number, got {value!r}"
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    elif decl.type == BOOLEAN:
        ok = isinstance(value, bool)
    else:  # STRING, COMBO
        ok = isinstance(value, str)
    if ok:
        return None
    if isinstance(value, float) and not math.isfinite(value):
        return f"expects a finite number, got {value!r}"
    return f"expects {decl.type.lower()}, got {type(value).__name__} {shown(value)}"


def _check_path(decl: Input, value: str, base_dir: Path) -> list[tuple[str, str]]:
    if not value:
        return [] if decl.optional or decl.default == "" else [("missing_input", "a path is required")]
    if value.startswith(BUILTIN_PREFIX):
        if value in decl.builtins:
            return []
        known = ", ".join(decl.builtins) or "none"
        return [("invalid_choice", f"unknown built-in {shown(value)} (built-ins here: {known})")]
    found = input_path_problem(value, base_dir, decl.path_kind)
    if found is not None and found[0] == "file_not_found" and decl.folder:
        located = find_model(value, decl.folder)
        if located is None:
            return [(found[0], found[1] + not_found_hint(value, decl.folder))]
        found = input_path_problem(str(located), base_dir, decl.path_kind)
    return [found] if found else []


def _preflight(bound: dict[str, BoundNode], flawed: set[str | None]) -> list[Problem]:
    """Run each node's preflight in link order, passing facts downstream (see :class:`Preflight`).

    Nodes in ``flawed`` already have problems: they are skipped and tell nothing downstream.
    """
    facts: dict[str, dict[str, Any]] = {}
    problems: list[Problem] = []
    for node_id in link_order(bound_graph(bound)):
        node = bound[node_id]
        facts[node_id] = {}
        if node.spec.preflight is None or node_id in flawed:
            continue
        upstream = {name: facts.get(up, {}) for name, (up, _) in node.links.items()}
        try:
            result = node.spec.preflight(node.literals, upstream)
        except Exception:  # noqa: BLE001, S112 - a check that cannot decide says nothing; the node reports it at run time
            continue
        facts[node_id] = result.facts
        problems += [Problem(code, message, node_id, name, node.spec.id) for code, name, message in result.problems]
    return problems


def _cycles(workflow: Workflow) -> list[Problem]:
    return [Problem("cycle", f"the links form a cycle: {' -> '.join([*cycle, cycle[0]])}", cycle[0])
            for cycle in cycles(workflow)]
