"""Validation: every problem of a workflow at once, before anything runs.

Validation also binds the workflow: defaults filled in, paths resolved, links pointed at output
indices. The scheduler only ever sees bound nodes, so what it runs is what was checked.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import networkx as nx

from ..nodes.spec import BOOLEAN, COMBO, FLOAT, INT, STRING, Catalogue, Input, NodeSpec
from .problems import Problem, WorkflowError
from .workflow import Link, Workflow

BUILTIN_PREFIX = "builtin:"


@dataclass(frozen=True)
class BoundNode:
    """A checked node: its spec, literal inputs (defaults and paths resolved) and links."""

    id: str
    spec: NodeSpec
    literals: dict[str, Any]
    links: dict[str, tuple[str, int]]  # input name -> (upstream node id, output index)


def resolve_path(value: str, base_dir: Path) -> str:
    """A path input as an absolute path; ``builtin:`` names and empty strings stay as they are."""
    if not value or value.startswith(BUILTIN_PREFIX):
        return value
    path = Path(value).expanduser()
    return str(path if path.is_absolute() else (base_dir / path).resolve())


def rebase_paths(workflow: Workflow, catalogue: Catalogue, new_dir: Path) -> Workflow:
    """A copy whose relative file paths still point at the same files from ``new_dir``.

    Paths inside ``new_dir`` stay relative to it (so a shared folder keeps working); others become
    absolute.
    """
    result = workflow.copy()
    result.base_dir = new_dir.resolve()
    for call in result.nodes.values():
        spec = catalogue.get(call.type)
        for name, value in call.inputs.items():
            decl = spec.input(name) if spec else None
            if decl is None or not decl.path or not isinstance(value, str) or not value:
                continue
            if value.startswith(BUILTIN_PREFIX) or Path(value).expanduser().is_absolute():
                continue
            target = Path(resolve_path(value, workflow.base_dir))
            call.inputs[name] = (str(target.relative_to(result.base_dir)) if target.is_relative_to(result.base_dir)
                                 else str(target))
    return result


def check(workflow: Workflow, catalogue: Catalogue) -> tuple[list[Problem], dict[str, BoundNode]]:
    """Every problem in ``workflow``, and the bound nodes (meaningful only when there are none)."""
    problems: list[Problem] = []
    bound: dict[str, BoundNode] = {}
    for node_id, call in workflow.nodes.items():
        spec = catalogue.get(call.type)
        if spec is None:
            problems.append(Problem("unknown_node_type", _unknown_type_message(call.type, catalogue), node_id))
            continue
        node_problems, literals, links = _check_node(node_id, spec, call.inputs, workflow, catalogue)
        problems += node_problems
        bound[node_id] = BoundNode(node_id, spec, literals, links)
    cycles = _cycles(workflow)
    problems += cycles
    if not cycles:
        problems += _preflight(bound)
    if not any(catalogue[c.type].output_node for c in workflow.nodes.values() if c.type in catalogue):
        problems.append(Problem("no_outputs", "the workflow has no output node (SaveImages, ...): nothing would run"))
    return problems, bound


def bind(workflow: Workflow, catalogue: Catalogue) -> dict[str, BoundNode]:
    """The bound nodes of a valid workflow; raises :class:`WorkflowError` listing every problem."""
    problems, bound = check(workflow, catalogue)
    if problems:
        raise WorkflowError(problems)
    return bound


def _unknown_type_message(node_type: str, catalogue: Catalogue) -> str:
    import difflib

    close = difflib.get_close_matches(node_type, list(catalogue), n=1)
    hint = f"; did you mean '{close[0]}'?" if close else "; 'lora-nodes nodes' lists the node types"
    return f"unknown node type '{node_type}'{hint}"


def _check_node(node_id: str, spec: NodeSpec, inputs: dict[str, Any], workflow: Workflow, catalogue: Catalogue):
    problems: list[Problem] = []
    literals: dict[str, Any] = {}
    links: dict[str, tuple[str, int]] = {}

    def problem(code: str, message: str, name: str | None) -> None:
        problems.append(Problem(code, message, node_id, name, spec.id))

    for name in inputs:
        if spec.input(name) is None:
            problem("unknown_input", f"{spec.id} has no input '{name}' (inputs: {', '.join(i.name for i in spec.inputs)})", name)
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
            for code, message in _check_literal(decl, value, workflow.base_dir):
                problem(code, message, decl.name)
            literals[decl.name] = resolve_path(value, workflow.base_dir) if decl.path else value
    return problems, literals, links


def _check_link(link: Link, decl: Input, workflow: Workflow, catalogue: Catalogue, problem) -> tuple[str, int] | None:
    upstream = workflow.nodes.get(link.node)
    if upstream is None:
        problem("missing_node", f"links to node '{link.node}', which is not in the workflow")
        return None
    upstream_spec = catalogue.get(upstream.type)
    if upstream_spec is None:
        return None  # reported as unknown_node_type on that node
    index = upstream_spec.output_index(link.output)
    if index is None:
        outputs = ", ".join(o.name for o in upstream_spec.outputs) or "none"
        problem("missing_output", f"node '{link.node}' ({upstream.type}) has no output {link.output!r} (outputs: {outputs})")
        return None
    produced = upstream_spec.outputs[index].type
    accepted = STRING if decl.type == COMBO else decl.type
    if produced != accepted:
        problem("type_mismatch", f"expects {decl.type}, but '{link.node}' output '{upstream_spec.outputs[index].name}' is {produced}")
        return None
    return link.node, index


def _check_literal(decl: Input, value: Any, base_dir: Path) -> list[tuple[str, str]]:
    kind_ok = {
        INT: isinstance(value, int) and not isinstance(value, bool),
        FLOAT: isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value),
        STRING: isinstance(value, str),
        BOOLEAN: isinstance(value, bool),
        COMBO: isinstance(value, str),
    }[decl.type]
    if not kind_ok:
        if isinstance(value, float) and not math.isfinite(value):
            return [("invalid_value", f"expects a finite number, got {value!r}")]
        return [("invalid_value", f"expects {decl.type.lower()}, got {type(value).__name__} {value!r}")]
    if decl.type == COMBO and value not in decl.choices:
        return [("invalid_choice", f"{value!r} is not one of: {', '.join(decl.choices)}")]
    below = decl.min is not None and value < decl.min
    above = decl.max is not None and value > decl.max
    if decl.type in (INT, FLOAT) and (below or above):
        return [("out_of_range", f"{value} is outside {decl.min}..{decl.max}")]
    if decl.type == INT and decl.step and value % decl.step:
        return [("out_of_range", f"{value} is not a multiple of {decl.step}")]
    if decl.path:
        return _check_path(decl, value, base_dir)
    return []


def _check_path(decl: Input, value: str, base_dir: Path) -> list[tuple[str, str]]:
    if not value:
        return [] if decl.optional or decl.default == "" else [("missing_input", "a path is required")]
    if value.startswith(BUILTIN_PREFIX):
        if value in decl.builtins:
            return []
        known = ", ".join(decl.builtins) or "none"
        return [("invalid_choice", f"unknown built-in '{value}' (built-ins here: {known})")]
    resolved = Path(resolve_path(value, base_dir))
    if not resolved.exists():
        return [("file_not_found", f"file not found: {value} (looked for {resolved})")]
    return []


def _preflight(bound: dict[str, BoundNode]) -> list[Problem]:
    """Run each node's preflight in link order, passing facts downstream (see :class:`Preflight`)."""
    graph = nx.DiGraph()
    graph.add_nodes_from(bound)
    for node in bound.values():
        graph.add_edges_from((upstream, node.id) for upstream, _ in node.links.values() if upstream in bound)
    facts: dict[str, dict[str, Any]] = {}
    problems: list[Problem] = []
    for node_id in nx.lexicographical_topological_sort(graph):
        node = bound[node_id]
        facts[node_id] = {}
        if node.spec.preflight is None:
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
    graph = nx.DiGraph()
    for node_id, call in workflow.nodes.items():
        for value in call.inputs.values():
            if isinstance(value, Link) and value.node in workflow.nodes:
                graph.add_edge(value.node, node_id)
    problems = []
    for cycle in nx.simple_cycles(graph):
        nodes = " -> ".join([*cycle, cycle[0]])
        problems.append(Problem("cycle", f"the links form a cycle: {nodes}", cycle[0]))
        if len(problems) >= 10:
            break
    return problems
