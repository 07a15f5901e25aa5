"""The in-memory workflow: node ids mapped to a node type and its raw inputs, and how a document's
node mapping is read into one (the part our format and ComfyUI's API format share)."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .problems import Problem, describe, shown

FORMAT = "lora-nodes/1"


@dataclass(frozen=True)
class Link:
    """A connection to output ``output`` (a name or an index) of node ``node``."""

    node: str
    output: str | int

    def to_json(self) -> list[Any]:
        return [self.node, self.output]


def is_link(value: Any) -> bool:
    """A two-item list ``[node_id, output]`` is a link, as in ComfyUI's API format."""
    return (
        isinstance(value, (list, tuple))
        and len(value) == 2
        and isinstance(value[0], (str, int))
        and not isinstance(value[0], bool)
        and isinstance(value[1], (str, int))
        and not isinstance(value[1], bool)
    )


@dataclass
class NodeCall:
    """One node of a workflow: its type and its inputs (literals or :class:`Link`)."""

    type: str
    inputs: dict[str, Any] = field(default_factory=dict)


@dataclass
class Workflow:
    """A parsed workflow. ``base_dir`` is where relative paths in it resolve."""

    nodes: dict[str, NodeCall]
    base_dir: Path
    description: str = ""
    source: Path | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def copy(self) -> Workflow:
        return copy.deepcopy(self)

    def to_dict(self) -> dict[str, Any]:
        """The workflow in our file format (what ``lora-nodes/1`` YAML and JSON files hold)."""
        data: dict[str, Any] = {"format": FORMAT}
        if self.description:
            data["description"] = self.description
        data["nodes"] = {
            node_id: {
                "type": call.type,
                "inputs": {k: v.to_json() if isinstance(v, Link) else v for k, v in call.inputs.items()},
            }
            for node_id, call in self.nodes.items()
        }
        data.update(self.extra)
        return data


# ---------------------------------------------------------------------------------------------
# reading the nodes of a document (our format and ComfyUI's API format)


def node_ids(mapping: dict[Any, Any]) -> tuple[dict[str, Any], list[Problem]]:
    """The entries of a mapping keyed by node id, ids as text; problems for ids that are not text or
    whole numbers, and for ids that collide once read as text (``1`` and ``'1'``)."""
    result: dict[str, Any] = {}
    problems: list[Problem] = []
    written: dict[str, Any] = {}
    for key, body in mapping.items():
        if not isinstance(key, (str, int)) or isinstance(key, bool):
            problems.append(Problem("parse_error", f"node id {shown(key)} is {describe(key)}, not text: quote it"))
            continue
        node_id = str(key)
        if node_id in written:
            problems.append(Problem("parse_error", f"node ids {shown(written[node_id])} and {shown(key)} are the "
                                    "same id once read as text: rename one", node_id))
            continue
        written[node_id], result[node_id] = key, body
    return result, problems


def parse_inputs(inputs: Any, node_id: str, node_type: str | None) -> tuple[dict[str, Any], list[Problem]]:
    """Input names to values (links as :class:`Link`), and problems with the mapping itself."""
    if inputs is None:
        return {}, []
    if not isinstance(inputs, dict):
        return {}, [Problem("parse_error", f"'inputs' must be a mapping of input names to values, not "
                            f"{describe(inputs)}", node_id, type=node_type)]
    parsed: dict[str, Any] = {}
    problems = []
    for name, value in inputs.items():
        if not isinstance(name, str):
            problems.append(Problem("parse_error", f"input name {shown(name)} is {describe(name)}, not text: quote "
                                    "it", node_id, type=node_type))
            continue
        parsed[name] = Link(str(value[0]), value[1]) if is_link(value) else value
    return parsed, problems
