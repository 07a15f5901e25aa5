"""The in-memory workflow: node ids mapped to a node type and its raw inputs."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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
