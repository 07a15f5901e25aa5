"""ComfyUI's file formats: the editor's UI format (``workflow.json``) and the API format (prompt).

Reading a UI-format file follows what ComfyUI's frontend does before it queues a graph: muted
nodes (mode 2) are left out together with the nodes that need their outputs, bypassed nodes
(mode 4) pass each output on from an input of the same type, ``Reroute`` passes its input
through, a ``PrimitiveNode`` sets the widgets it is linked to, and notes and groups are ignored.
Writing gives files a ComfyUI with our pack installed opens: namespaced node types, every widget
value present, and a left-to-right layout when the workflow carries no positions.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import networkx as nx
import yaml

from ..nodes.spec import BOOLEAN, COMBO, FLOAT, INT, REQUIRED, STRING, Catalogue, Input, NodeSpec
from .problems import Problem, WorkflowError, cut, listing, shown
from .workflow import Link, NodeCall, Workflow

FORMATS = ("yaml", "json", "comfyui-api", "comfyui-ui")
UI_VERSION = 0.4
MODE_MUTED, MODE_BYPASSED = 2, 4
REROUTE, PRIMITIVE = "Reroute", "PrimitiveNode"
# Left out: notes, and PreviewImage (a viewer in the editor; a headless run has no one to show it to).
IGNORED_TYPES = frozenset({"Note", "MarkdownNote", "PreviewImage"})
# ComfyUI core nodes with an exact counterpart here: type -> (our type, [(their widget, our input)]).
CORE_EQUIVALENTS: dict[str, tuple[str, list[tuple[str, str]]]] = {
    "SaveImage": ("SaveImages", [("filename_prefix", "prefix")]),
}
VIRTUAL_TYPES = frozenset({REROUTE, PRIMITIVE}) | IGNORED_TYPES
SEED_NAMES = frozenset({"seed", "noise_seed"})  # INT widgets the frontend gives a control widget
CONTROL_VALUES = frozenset({"fixed", "increment", "decrement", "randomize"})
WRITTEN_CONTROL = "fixed"  # what we write after a seed: the file reproduces the same image
STRUCTURAL_CODES = frozenset({"unknown_node_type", "missing_node", "missing_output", "type_mismatch", "cycle"})
_ZERO = {INT: 0, FLOAT: 0.0, STRING: "", BOOLEAN: False}


# ---------------------------------------------------------------------------------------------
# shared helpers


def is_ui_format(data: Any) -> bool:
    """Whether ``data`` is a ComfyUI editor (UI-format) workflow: a ``nodes`` list beside ``links``."""
    return (
        isinstance(data, dict)
        and isinstance(data.get("nodes"), list)
        and any(key in data for key in ("links", "last_node_id", "version"))
    )


def widget_inputs(spec: NodeSpec) -> list[Input]:
    """The literal inputs of ``spec`` in ComfyUI's widget order (required, then optional)."""
    return [i for i in _comfy_order(spec) if not i.is_link]


def socket_inputs(spec: NodeSpec) -> list[Input]:
    """The link inputs of ``spec`` in ComfyUI's slot order (required, then optional)."""
    return [i for i in _comfy_order(spec) if i.is_link]


def _comfy_order(spec: NodeSpec) -> list[Input]:
    order = spec.object_info()["input_order"]
    return [spec.input(name) for name in [*order["required"], *order["optional"]]]


def has_control_widget(decl: Input) -> bool:
    """ComfyUI's frontend adds a ``control_after_generate`` widget after INT ``seed`` inputs."""
    return decl.type == INT and decl.name in SEED_NAMES


def unsupported_nodes_error(types_by_id: dict[str, str]) -> WorkflowError:
    """One problem that lists every node type we do not implement, with the ids of its nodes."""
    by_type: dict[str, list[str]] = {}
    for node_id, node_type in types_by_id.items():
        by_type.setdefault(node_type, []).append(node_id)
    groups = [f"{cut(t, 80)} (node{'s' * (len(ids) > 1)} {listing(ids, 5)})" for t, ids in sorted(by_type.items())]
    listed = "; ".join(groups[:12]) + (f"; ... ({len(groups) - 12} more types)" if len(groups) > 12 else "")
    message = (f"this workflow uses node types that lora-nodes does not implement: {listed}. "
               "They run inside ComfyUI; build the graph from lora-nodes nodes ('lora-nodes nodes' lists them) "
               "to run it here")
    return WorkflowError([Problem("unsupported_nodes", message)])


def _fail(code: str, message: str, node: str | None = None) -> WorkflowError:
    return WorkflowError([Problem(code, message, node)])


# ---------------------------------------------------------------------------------------------
# reading the UI format


@dataclass(frozen=True)
class _UiLink:
    id: int
    origin: str
    origin_slot: int
    target: str
    type: str


@dataclass(frozen=True)
class _Resolved:
    """Where a UI link leads after virtual, bypassed and muted nodes: a node output, a value, or nothing."""

    link: Link | None = None
    value: Any = None
    is_value: bool = False
    dropped_at: str | None = None  # the muted/bypassed node whose output is missing

    @property
    def dropped(self) -> bool:
        return self.link is None and not self.is_value


@dataclass
class _Built:
    """A node read from the UI file: its call, the widget values its links may fall back on."""

    call: NodeCall
    spec: NodeSpec
    fallbacks: dict[str, Any] = field(default_factory=dict)
    lost: dict[str, str] = field(default_factory=dict)  # required link input -> node that left it


class _UiGraph:
    """The nodes and links of a UI-format file, and how links resolve as ComfyUI resolves them."""

    def __init__(self, data: dict[str, Any]):
        self.nodes: dict[str, dict[str, Any]] = {}
        problems: list[Problem] = []
        for node in data.get("nodes") or []:
            node_id, problem = _ui_node_problem(node)
            if problem is None and node_id in self.nodes:
                problem = Problem("parse_error", "two nodes of the ComfyUI workflow have this id", node_id)
            if problem is not None:
                problems.append(problem)
                continue
            self.nodes[node_id] = node
        if problems:
            raise WorkflowError(problems[:20])
        links = data.get("links")
        parsed = (_parse_link(item) for item in (links if isinstance(links, list) else []))
        self.links = {link.id: link for link in parsed if link}
        self._answers: dict[tuple[Any, str], _Resolved] = {}  # (link id, target type) -> where it leads
        self._walking: set[Any] = set()  # the links of the walk under way (a second visit is a loop)

    def mode(self, node_id: str) -> int:
        return self.nodes[node_id].get("mode") or 0

    def is_real(self, node_id: str) -> bool:
        """A node that runs: not muted, not bypassed, not a reroute, primitive or note."""
        return self.mode(node_id) not in (MODE_MUTED, MODE_BYPASSED) and self.nodes[node_id]["type"] not in VIRTUAL_TYPES

    def resolve(self, link_id: Any, target_type: str) -> _Resolved:
        """Follow link ``link_id`` upstream to the node output (or primitive value) that feeds it.

        A loop, not a recursion: a chain of hundreds of reroutes is an ordinary graph. A link
        followed twice means the chain loops; it ends like a link that leads nowhere. Each link's
        answer is remembered, so many inputs fed through one long chain cost the chain once.
        """
        walked: list[Any] = []  # the links followed, each through a reroute or bypassed node
        passed: str | None = None  # the last of those nodes: where a dead end is reported
        while True:
            known = self._answers.get((link_id, target_type)) if _is_link_id(link_id) else None
            if known is not None and not _is_dead_end(known):
                return self._remember(walked, target_type, known)
            link = self.links.get(link_id) if _is_link_id(link_id) else None
            origin = self.nodes.get(link.origin) if link is not None else None
            looped = link is not None and link_id in self._walking
            if known is not None or origin is None or looped or _is_empty_primitive(origin):
                if origin is not None and not looped:  # a dead end right here, from its own point of view
                    self._answers[(link_id, target_type)] = _Resolved()
                return self._remember(walked, target_type, _Resolved(dropped_at=passed))
            answer, index = self._step(origin, link, target_type)
            if answer is None:
                inputs = origin.get("inputs") or []
                upstream = inputs[index].get("link") if index is not None and index < len(inputs) else None
                if upstream is not None:
                    walked.append(link_id)
                    self._walking.add(link_id)
                    passed, link_id = link.origin, upstream
                    continue
                answer = _Resolved(dropped_at=link.origin)
            return self._remember([*walked, link_id], target_type, answer)

    def _step(self, origin: dict[str, Any], link: _UiLink, target_type: str) -> tuple[_Resolved | None, int | None]:
        """What one link's origin gives: an answer, or (None, the input to follow through it)."""
        if origin["type"] == PRIMITIVE:
            return _Resolved(value=origin["widgets_values"][0], is_value=True), None
        mode = self.mode(link.origin)
        if mode == MODE_MUTED or origin["type"] in IGNORED_TYPES:
            return _Resolved(dropped_at=link.origin), None
        if mode == MODE_BYPASSED:
            return None, self._bypass_index(origin, link, target_type)
        if origin["type"] == REROUTE:
            return None, link.origin_slot
        return _Resolved(link=Link(link.origin, link.origin_slot)), None

    def _remember(self, walked: list[Any], target_type: str, answer: _Resolved) -> _Resolved:
        """Keep ``answer`` as the answer of every link followed, and return it.

        It is theirs too: a dead end reached through pass-through nodes is reported at the last of
        them, which is the same node wherever upstream of it a walk starts.
        """
        for link_id in walked:
            self._answers[(link_id, target_type)] = answer
        self._walking.clear()
        return answer

    @staticmethod
    def _bypass_index(origin: dict[str, Any], link: _UiLink, target_type: str) -> int | None:
        """The input a bypassed node passes on in place of the output ``link`` leaves from."""
        outputs = origin.get("outputs") or []
        output_type = outputs[link.origin_slot].get("type", link.type) if link.origin_slot < len(outputs) else link.type
        return bypass_input_index(origin.get("inputs") or [], link.origin_slot, str(output_type), target_type)


def _is_empty_primitive(node: dict[str, Any]) -> bool:
    """A PrimitiveNode with no value: a link from it leads nowhere."""
    values = node.get("widgets_values")
    return node["type"] == PRIMITIVE and not (isinstance(values, list) and values)


def _is_dead_end(answer: _Resolved) -> bool:
    """An answer that leads nowhere and names no node: the walk that meets it names the node it passed."""
    return answer.dropped and answer.dropped_at is None


def _is_link_id(value: Any) -> bool:
    """Link ids are numbers (or text); anything else in a file is a malformed link, not a crash."""
    return isinstance(value, (int, str)) and not isinstance(value, bool)


def _ui_node_problem(node: Any) -> tuple[str, Problem | None]:
    """A UI node's id as text, and what is wrong with its shape (None when nothing is)."""
    if not isinstance(node, dict) or not _is_link_id(node.get("id")):
        found = f"a node with id {shown(node.get('id'))}" if isinstance(node, dict) else shown(node)
        return "", Problem("parse_error", f"each node of a ComfyUI workflow needs an 'id' (a number); found {found}")
    if not isinstance(node.get("type"), str):
        return str(node["id"]), Problem("parse_error", f"the node's 'type' must be text, not {shown(node.get('type'))}",
                                        str(node["id"]))
    node_id = str(node["id"])
    for key in ("inputs", "outputs"):
        slots = node.get(key)
        if slots is not None and (not isinstance(slots, list) or not all(isinstance(x, dict) for x in slots)):
            return node_id, Problem("parse_error", f"'{key}' must be a list of slots (mappings)", node_id,
                                    type=cut(node["type"], 100))
    return node_id, None


def _parse_link(item: Any) -> _UiLink | None:
    """A link as the UI format writes it: ``[id, origin, origin_slot, target, target_slot, type]`` or a dict."""
    if isinstance(item, dict):
        item = [item.get(k) for k in ("id", "origin_id", "origin_slot", "target_id", "target_slot", "type")]
    if not isinstance(item, (list, tuple)) or len(item) < 5:
        return None
    link_type = item[5] if len(item) > 5 else ""
    if not _is_link_id(item[0]) or not all(_is_link_id(i) for i in (item[1], item[3])):
        return None  # a malformed link: what it fed is reported as unset
    try:
        slot = int(item[2])
    except (TypeError, ValueError, OverflowError):
        return None
    return _UiLink(item[0], str(item[1]), slot, str(item[3]), cut(str(link_type), 200)) if slot >= 0 else None


def _compatible(slot_type: Any, wanted: Any) -> bool:
    """LiteGraph's type check, simplified: equal, a wildcard, or overlapping comma-separated lists."""
    a, b = str(slot_type or "*"), str(wanted or "*")
    return a == "*" or b == "*" or bool(set(a.split(",")) & set(b.split(",")))


def bypass_input_index(inputs: list[dict[str, Any]], slot: int, output_type: str, target_type: str) -> int | None:
    """The input of a bypassed node that takes the place of its output ``slot``, as ComfyUI picks it.

    A wildcard target takes the input at the same index; otherwise the same-index input when its
    type fits both the output and the target, else the first input of exactly the target's type,
    else the first that fits both. None: no input fits, so the link is dropped.
    """
    if not inputs:
        return None
    if target_type in ("*", ""):
        return slot if slot < len(inputs) else 0
    types = [i.get("type") for i in inputs]
    if slot < len(types) and _compatible(types[slot], output_type) and _compatible(types[slot], target_type):
        return slot
    exact = [n for n, t in enumerate(types) if t == target_type]
    if exact:
        return exact[0]
    fitting = [n for n, t in enumerate(types) if _compatible(t, output_type) and _compatible(t, target_type)]
    return fitting[0] if fitting else None


def widget_values_by_name(node: dict[str, Any], spec: NodeSpec) -> dict[str, Any]:
    """A UI node's ``widgets_values`` (a list in widget order, a dict by name, or null) by input name."""
    raw = node.get("widgets_values")
    widgets = widget_inputs(spec)
    if isinstance(raw, dict):
        found = {w.name: raw[w.name] for w in widgets if w.name in raw}
    elif isinstance(raw, list):
        found = _positional_widgets(raw, widgets)
    else:
        found = {}
    return {name: _coerce(spec.input(name), value) for name, value in found.items() if value is not None}


def _positional_widgets(raw: list[Any], widgets: list[Input]) -> dict[str, Any]:
    """Widget values from a list: one per widget, with a control value after each seed when present."""
    extra = len(raw) > len(widgets)  # the list carries control values (files without them exist too)
    found: dict[str, Any] = {}
    index = 0
    for decl in widgets:
        if index >= len(raw):
            break
        found[decl.name] = raw[index]
        index += 1
        if has_control_widget(decl) and extra and index < len(raw) and _is_control(raw[index]):
            index += 1
    return found


def _is_control(value: Any) -> bool:
    return isinstance(value, str) and value in CONTROL_VALUES


def _coerce(decl: Input, value: Any) -> Any:
    """JSON numbers as the widget's type: ``7.0`` for an INT is 7 (ComfyUI writes either)."""
    if decl.type == INT and isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def from_ui(data: dict, base_dir: Path, catalogue: Catalogue, source: Path | None = None) -> Workflow:
    """A :class:`Workflow` from a ComfyUI editor file; node ids are the UI node ids as strings.

    Raises :class:`WorkflowError` listing every node type we do not implement (``unsupported_nodes``),
    and (``muted_input``) when an output node needs a node that is muted or bypassed away.
    """
    graph = _UiGraph(data)
    real = [node_id for node_id in graph.nodes if graph.is_real(node_id)]
    unsupported = {i: t for i in real if catalogue.get(t := graph.nodes[i]["type"]) is None and t not in CORE_EQUIVALENTS}
    if unsupported:
        raise unsupported_nodes_error(unsupported)
    built = {node_id: _build_node(graph, node_id, catalogue) for node_id in real}
    _leave_out_unfed(graph, built)
    layout = {node_id: _layout_of(graph.nodes[node_id]) for node_id in built}
    extra = {"ui": {"nodes": layout}} if layout else {}
    return Workflow({i: b.call for i, b in built.items()}, base_dir, "", source, extra)


def _build_node(graph: _UiGraph, node_id: str, catalogue: Catalogue) -> _Built:
    node = graph.nodes[node_id]
    if node["type"] in CORE_EQUIVALENTS:
        spec, widgets = _core_equivalent(node, catalogue)
    else:
        spec = catalogue[node["type"]]
        widgets = widget_values_by_name(node, spec)
    built = _Built(NodeCall(spec.id, dict(widgets)), spec)
    for slot in node.get("inputs") or []:
        if slot.get("link") is None:
            continue
        widget = slot.get("widget")
        name = (widget.get("name") if isinstance(widget, dict) else None) or slot.get("name")
        if not isinstance(name, str):
            continue  # a slot without a name feeds nothing we could name
        decl = spec.input(name)
        target_type = cut(str(slot.get("type") or (decl.type if decl else "*")), 200)
        _set_linked_input(built, name, decl, graph.resolve(slot["link"], target_type), widgets)
    inputs = built.call.inputs
    declared = {d.name: inputs[d.name] for d in spec.inputs if d.name in inputs}
    built.call.inputs = {**declared, **{k: v for k, v in inputs.items() if k not in declared}}
    return built


def _core_equivalent(node: dict[str, Any], catalogue: Catalogue) -> tuple[NodeSpec, dict[str, Any]]:
    """Our spec standing in for a ComfyUI core node, and its widget values under our input names."""
    ours, renames = CORE_EQUIVALENTS[node["type"]]
    raw = node.get("widgets_values")
    if isinstance(raw, list):
        raw = {theirs: value for (theirs, _), value in zip(renames, raw)}
    raw = raw if isinstance(raw, dict) else {}
    return catalogue[ours], {mine: raw[theirs] for theirs, mine in renames if raw.get(theirs) is not None}


def _set_linked_input(built: _Built, name: str, decl: Input | None, resolved: _Resolved,
                      widgets: dict[str, Any]) -> None:
    """A linked input wins over its widget; a link that resolves to nothing falls back to the widget."""
    inputs = built.call.inputs
    if resolved.is_value:
        inputs[name] = _coerce(decl, resolved.value) if decl else resolved.value
    elif resolved.link is not None:
        inputs[name] = resolved.link
        if name in widgets:
            built.fallbacks[name] = widgets[name]
    elif decl is not None and decl.required and decl.is_link and resolved.dropped_at is not None:
        built.lost[name] = resolved.dropped_at


def _leave_out_unfed(graph: _UiGraph, built: dict[str, _Built]) -> None:
    """Leave out nodes whose required inputs come from muted/bypassed-away nodes, as ComfyUI does.

    Raises when an output node is among them: it cannot run, and the user should know why.
    """
    reasons: dict[str, tuple[str, str]] = {}  # left-out node -> (input, upstream node)
    order = {node_id: n for n, node_id in enumerate(built)}
    users: dict[str, list[str]] = {}  # node -> the nodes that link to it
    for node_id, node in built.items():
        for value in node.call.inputs.values():
            if isinstance(value, Link):
                users.setdefault(value.node, []).append(node_id)
    # a work list, not passes until nothing changes: a long chain in reverse file order stays linear
    pending = list(reversed(order))
    outputs: list[str] = []
    while pending:
        node = built.get(node_id := pending.pop())
        missing = _missing_input(node, built) if node is not None else None
        if node is not None and missing is not None:
            reasons[node_id] = missing
            outputs += [node_id] if node.spec.output_node else []
            del built[node_id]
            pending += users.get(node_id, [])
    outputs.sort(key=order.__getitem__)
    if outputs:
        raise WorkflowError([_unfed_problem(graph, node_id, reasons) for node_id in outputs])


def _missing_input(node: _Built, built: dict[str, _Built]) -> tuple[str, str] | None:
    """The first required input of ``node`` that nothing feeds any more; drops optional ones."""
    if node.lost:
        return next(iter(node.lost.items()))
    for name, value in list(node.call.inputs.items()):
        if not isinstance(value, Link) or value.node in built:
            continue
        decl = node.spec.input(name)
        if name in node.fallbacks:
            node.call.inputs[name] = node.fallbacks[name]
        elif decl is not None and not decl.required:
            del node.call.inputs[name]
        else:
            return name, value.node
    return None


def _unfed_problem(graph: _UiGraph, node_id: str, reasons: dict[str, tuple[str, str]]) -> Problem:
    name, upstream = reasons[node_id]
    path = [upstream]
    while path[-1] in reasons and len(path) <= len(reasons):
        path.append(reasons[path[-1]][1])
    mode = graph.mode(path[-1])
    why = ("bypassed with no input of the matching type" if mode == MODE_BYPASSED else "muted" if mode == MODE_MUTED
           else "fed by a link that is missing or goes round in a loop")
    needs = ", which needs ".join(_describe(graph, i) for i in path)
    message = (f"this output cannot run: it needs {needs}, which is {why} in the ComfyUI file; "
               "unmute that node, or mute or remove this output")
    return Problem("muted_input", message, node_id, name, graph.nodes[node_id]["type"])


def _describe(graph: _UiGraph, node_id: str) -> str:
    return f"node {node_id} ({graph.nodes[node_id]['type']})"


def _layout_of(node: dict[str, Any]) -> dict[str, Any]:
    """What we keep of a UI node's appearance: position, size, and a title the user gave it."""
    kept = {key: list(node[key]) for key in ("pos", "size") if _is_pair(node.get(key))}
    if isinstance(node.get("title"), str):
        kept["title"] = node["title"]
    return kept


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
# writing both ComfyUI formats


def _check_convertible(workflow: Workflow, catalogue: Catalogue) -> dict[str, NodeSpec]:
    """The spec of every node; raises on what no ComfyUI file can express (files need not exist)."""
    from .validate import check

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


def _title(workflow: Workflow, node_id: str, ids: dict[str, int]) -> str | None:
    """The title a node gets in ComfyUI: one it had there, else our id when ComfyUI's id differs."""
    kept = _ui_nodes(workflow).get(node_id, {}).get("title")
    if isinstance(kept, str):
        return kept
    return None if str(ids[node_id]) == node_id else node_id


def _ui_nodes(workflow: Workflow) -> dict[str, dict[str, Any]]:
    ui = workflow.extra.get("ui")
    nodes = ui.get("nodes") if isinstance(ui, dict) else None
    return {str(k): v for k, v in nodes.items() if isinstance(v, dict)} if isinstance(nodes, dict) else {}


def _literal(call: NodeCall, decl: Input) -> Any:
    """The value a widget shows: the workflow's, else the default, else the type's empty value."""
    value = call.inputs.get(decl.name, REQUIRED)
    if value is REQUIRED or isinstance(value, Link):
        value = decl.default
    if value is REQUIRED:
        return decl.choices[0] if decl.type == COMBO and decl.choices else _ZERO.get(decl.type, "")
    return value


def to_api(workflow: Workflow, catalogue: Catalogue) -> dict:
    """The workflow as a ComfyUI API-format prompt: ``{"<id>": {"class_type", "inputs", "_meta"}}``.

    Types are namespaced, links are ``[source_id, output_index]``, and every input that has a
    default is written out (ComfyUI needs each required widget value).
    """
    specs = _check_convertible(workflow, catalogue)
    ids = comfy_ids(workflow)
    prompt: dict[str, Any] = {}
    for node_id, call in workflow.nodes.items():
        spec = specs[node_id]
        inputs: dict[str, Any] = {}
        for decl in spec.inputs:
            value = call.inputs.get(decl.name, REQUIRED)
            if isinstance(value, Link):
                inputs[decl.name] = [str(ids[value.node]), _output_index(workflow, catalogue, value)]
            elif value is not REQUIRED:
                inputs[decl.name] = value
            elif decl.default is not REQUIRED and not decl.optional:
                inputs[decl.name] = decl.default
        title = _title(workflow, node_id, ids) or spec.display_name
        prompt[str(ids[node_id])] = {"class_type": spec.comfy_id, "inputs": inputs, "_meta": {"title": title}}
    return prompt


def _output_index(workflow: Workflow, catalogue: Catalogue, link: Link) -> int:
    index = catalogue[workflow.nodes[link.node].type].output_index(link.output)
    assert index is not None  # checked by _check_convertible
    return index


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
        title = _title(self.workflow, node_id, self.ids)
        if title is not None:
            node["title"] = title
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
            index = _output_index(self.workflow, self.catalogue, value)
            link_id = len(self.links) + 1
            output = self.nodes[value.node]["outputs"][index]
            output["links"] = [*(output["links"] or []), link_id]
            slots[slot]["link"] = link_id
            self.links.append([link_id, self.ids[value.node], index, self.ids[node_id], slot, output["type"]])


def to_ui(workflow: Workflow, catalogue: Catalogue) -> dict:
    """The workflow as a ComfyUI editor file (version 0.4), laid out from ``extra["ui"]`` or by depth."""
    specs = _check_convertible(workflow, catalogue)
    writer = _UiWriter(workflow, catalogue, specs, comfy_ids(workflow))
    order = _topological(workflow)
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


def _graph(workflow: Workflow) -> nx.DiGraph:
    graph = nx.DiGraph()
    graph.add_nodes_from(workflow.nodes)
    for node_id, call in workflow.nodes.items():
        for value in call.inputs.values():
            if isinstance(value, Link) and value.node in workflow.nodes:
                graph.add_edge(value.node, node_id)
    return graph


def _topological(workflow: Workflow) -> list[str]:
    position = {node_id: n for n, node_id in enumerate(workflow.nodes)}
    return list(nx.lexicographical_topological_sort(_graph(workflow), key=position.__getitem__))


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
    kept = _ui_nodes(workflow)
    graph = _graph(workflow)
    depth: dict[str, int] = {}
    for node_id in _topological(workflow):
        depth[node_id] = max((depth[p] + 1 for p in graph.predecessors(node_id)), default=0)
    sizes = {i: _pair(kept.get(i, {}).get("size")) or estimated_size(specs[i]) for i in workflow.nodes}
    columns = [[i for i in workflow.nodes if depth[i] == col] for col in range(max(depth.values(), default=-1) + 1)]
    placed: dict[str, tuple[list[float], list[float]]] = {}
    x = 50.0
    for column in columns:
        y = 50.0
        for node_id in column:
            pos = _pair(kept.get(node_id, {}).get("pos")) or [x, y]
            placed[node_id] = (pos, sizes[node_id])
            y += sizes[node_id][1] + 60
        x += max(sizes[i][0] for i in column) + 80
    return placed


def _pair(value: Any) -> list[float] | None:
    return [float(v) for v in value] if _is_pair(value) else None


def convert(workflow: Workflow, to: str, catalogue: Catalogue) -> str:
    """The workflow as the text of a file in format ``to``: yaml, json, comfyui-api or comfyui-ui."""
    if to == "yaml":
        return yaml.safe_dump(workflow.to_dict(), sort_keys=False, default_flow_style=None, allow_unicode=True)
    if to == "json":
        return json.dumps(workflow.to_dict(), indent=2) + "\n"
    if to == "comfyui-api":
        return json.dumps(to_api(workflow, catalogue), indent=2) + "\n"
    if to == "comfyui-ui":
        return json.dumps(to_ui(workflow, catalogue), indent=2) + "\n"
    raise ValueError(f"unknown format {to!r} (formats: {', '.join(FORMATS)})")
