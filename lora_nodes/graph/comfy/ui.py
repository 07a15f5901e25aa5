"""ComfyUI's UI format (the editor's ``workflow.json``): reading it.

Reading follows what ComfyUI's frontend does before it queues a graph: muted nodes (mode 2) are
left out together with the nodes that need their outputs, bypassed nodes (mode 4) pass each output
on from an input of the same type, ``Reroute`` passes its input through, a ``PrimitiveNode`` sets
the widgets it is linked to, and notes and groups are ignored. Each node's position, size and title
are kept (see :mod:`.shared`), so the graph written back looks as the user left it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ...nodes.spec import COMBO, INT, STRING, Catalogue, Input, NodeSpec
from ..links import users
from ..problems import Problem, WorkflowError, cut, shown
from ..workflow import Link, NodeCall, Workflow
from .shared import kept_layout, layout_extra, unsupported_nodes_error
from .widgets import CONTROL_VALUES, seed_named, widget_inputs

MODE_MUTED, MODE_BYPASSED = 2, 4
REROUTE, PRIMITIVE = "Reroute", "PrimitiveNode"

# Left out: the editor's notes (ComfyUI's core nodes are in the catalogue, PreviewImage too: see nodes.core)
IGNORED_TYPES = frozenset({"Note", "MarkdownNote"})
VIRTUAL_TYPES = frozenset({REROUTE, PRIMITIVE}) | IGNORED_TYPES


def is_ui_format(data: Any) -> bool:
    """Whether ``data`` is a ComfyUI editor (UI-format) workflow: a ``nodes`` list beside ``links``."""
    return (
        isinstance(data, dict)
        and isinstance(data.get("nodes"), list)
        and any(key in data for key in ("links", "last_node_id", "version"))
    )


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
    """Widget values from a list: one per widget, with a control value after each seed when present.

    A file saved before a node gained inputs (new inputs are declared last) holds fewer values than
    the node has widgets, so a control value is told by the value itself: one of CONTROL_VALUES
    right after a seed, where the next widget could not hold that string.
    """
    extra = len(raw) > len(widgets)  # the list surely carries control values (files without them exist too)
    found: dict[str, Any] = {}
    index = 0
    for position, decl in enumerate(widgets):
        if index >= len(raw):
            break
        found[decl.name] = raw[index]
        index += 1
        # seed_named, not has_control_widget: a file saved when the seed still had its control (TrainLoRA's
        # before it was declared without one) keeps that control value after it, which is skipped
        if seed_named(decl) and index < len(raw) and _is_control(raw[index]):
            following = widgets[position + 1] if position + 1 < len(widgets) else None
            if extra or not _could_hold(following, raw[index]):
                index += 1
    return found


def _could_hold(decl: Input | None, value: str) -> bool:
    """Whether a widget could take ``value`` (a string) as its own value."""
    if decl is None:
        return False
    return value in decl.choices if decl.type == COMBO else decl.type == STRING


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
    unsupported = {i: t for i in real if catalogue.get(t := graph.nodes[i]["type"]) is None}
    if unsupported:
        raise unsupported_nodes_error(unsupported)
    built = {node_id: _build_node(graph, node_id, catalogue) for node_id in real}
    _leave_out_unfed(graph, built)
    extra = layout_extra({node_id: kept_layout(graph.nodes[node_id]) for node_id in built})
    return Workflow({i: b.call for i, b in built.items()}, base_dir, "", source, extra)


def _build_node(graph: _UiGraph, node_id: str, catalogue: Catalogue) -> _Built:
    node = graph.nodes[node_id]
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
    linked_from = users({node_id: node.call for node_id, node in built.items()})  # node -> the nodes that use it
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
            pending += linked_from.get(node_id, [])
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
