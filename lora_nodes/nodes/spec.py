"""Typed node declarations: the single source of truth for every node.

A node is one function plus one :class:`NodeSpec`. Validation, the ``nodes`` catalogue, the
ComfyUI class attributes and the cache keys are all derived from the spec, never written twice.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

# Literal (widget) types, named as ComfyUI names them.
INT, FLOAT, STRING, BOOLEAN, COMBO = "INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"
LITERAL_TYPES = frozenset({INT, FLOAT, STRING, BOOLEAN, COMBO})

# Value types passed between nodes. Ours carry our own names so that they never connect to
# ComfyUI's MODEL or CLIP by mistake; IMAGE is ComfyUI's ([batch, height, width, 3] float32 in 0..1).
MODEL, LORA, LORA_STACK, IMAGE = "LN_MODEL", "LN_LORA", "LN_LORA_STACK", "IMAGE"
DATASET = "LN_DATASET"

CATEGORY_ROOT = "lora-nodes"
# In ComfyUI our node ids carry this prefix so they never collide with core nodes or other packs
# (ComfyUI has SaveImage, LoraLoader, SaveLoRA ...). Our files accept both spellings.
COMFY_PREFIX = "lora-nodes."


class _Required:
    def __repr__(self) -> str:
        return "REQUIRED"


REQUIRED: Any = _Required()


@dataclass(frozen=True)
class Input:
    """One declared input. Link inputs carry a value type; literal inputs a widget type."""

    name: str
    type: str
    default: Any = REQUIRED
    description: str = ""
    min: float | None = None
    max: float | None = None
    step: float | None = None
    choices: tuple[str, ...] = ()
    optional: bool = False  # may be left out entirely (no default is taken)
    path: bool = False  # a file or folder path: resolved, checked and fingerprinted
    path_kind: str = "any"  # with path: "file", "folder" or "any" (either); nothing else is accepted
    writes: bool = False  # a path the node writes under the output folder: checked before anything runs
    builtins: tuple[str, ...] = ()  # ``builtin:`` names this path input also accepts
    folder: str | None = None  # inside ComfyUI: offer the files of this models folder (loras, checkpoints)
    multiline: bool = False
    in_key: bool = True  # False: changes how the work is done, not its result (left out of the cache key)
    content_key: bool = False  # a path keyed by its files' names, sizes and contents only (not where or when)

    @property
    def is_link(self) -> bool:
        return self.type not in LITERAL_TYPES

    @property
    def required(self) -> bool:
        return self.default is REQUIRED and not self.optional


@dataclass(frozen=True)
class Output:
    name: str
    type: str
    description: str = ""


@dataclass
class Preflight:
    """What a node can tell before anything runs, from its literal inputs and its inputs' facts.

    ``facts`` describe the node's outputs to the nodes downstream (e.g. ``{"family": ...}`` of a
    model or a LoRA); ``problems`` are ``(code, input name or None, message)``. A preflight reads
    at most a file's header: it must be cheap, and it never raises for bad input (it reports it).
    """

    facts: dict[str, Any] = field(default_factory=dict)
    problems: list[tuple[str, str | None, str]] = field(default_factory=list)


# preflight(literals, upstream) -> Preflight, where upstream maps each linked input name to the
# facts of the node it links to (an empty dict when that node told nothing).
PreflightCheck = Callable[[dict[str, Any], dict[str, dict[str, Any]]], Preflight]


@dataclass(frozen=True)
class NodeSpec:
    """Everything there is to know about a node type, and the function that runs it."""

    id: str
    display_name: str
    category: str
    description: str
    inputs: tuple[Input, ...]
    outputs: tuple[Output, ...]
    run: Callable[..., Any] = field(compare=False, repr=False)
    version: int = 1
    output_node: bool = False
    # results also kept on disk, so a new process need not redo them: an object with
    # ``save(outputs, folder)`` and ``load(folder) -> outputs``
    disk_cache: Any = None
    preflight: PreflightCheck | None = field(default=None, compare=False, repr=False)

    @property
    def comfy_id(self) -> str:
        """The id this node has inside ComfyUI (namespaced)."""
        return COMFY_PREFIX + self.id

    def input(self, name: str) -> Input | None:
        return next((i for i in self.inputs if i.name == name), None)

    def output_index(self, output: str | int) -> int | None:
        """Index of an output given by name or position, or None when there is no such output."""
        if isinstance(output, bool):
            return None
        if isinstance(output, int):
            return output if 0 <= output < len(self.outputs) else None
        names = [o.name for o in self.outputs]
        return names.index(output) if output in names else None

    def object_info(self) -> dict[str, Any]:
        """This node described the way ComfyUI's ``/object_info`` describes a node."""
        required = {i.name: _input_info(i) for i in self.inputs if not i.optional}
        optional = {i.name: _input_info(i) for i in self.inputs if i.optional}
        return {
            "input": {"required": required, "optional": optional},
            "input_order": {"required": list(required), "optional": list(optional)},
            "output": [o.type for o in self.outputs],
            "output_is_list": [False for _ in self.outputs],
            "output_name": [o.name for o in self.outputs],
            "output_tooltips": [o.description for o in self.outputs],
            "name": self.id,
            "display_name": self.display_name,
            "description": self.description,
            "python_module": "custom_nodes.lora-nodes",
            "category": self.category,
            "output_node": self.output_node,
            "version": self.version,
        }


def _input_info(spec: Input) -> list[Any]:
    options: dict[str, Any] = {}
    if spec.default is not REQUIRED:
        options["default"] = spec.default
    for key in ("min", "max", "step"):
        if getattr(spec, key) is not None:
            options[key] = getattr(spec, key)
    if spec.multiline:
        options["multiline"] = True
    if spec.description:
        options["tooltip"] = spec.description
    kind: Any = list(spec.choices) if spec.type == COMBO else spec.type
    return [kind, options]


def node(
    id: str,
    *,
    display_name: str,
    category: str,
    inputs: tuple[Input, ...] | list[Input],
    outputs: tuple[Output, ...] | list[Output] = (),
    version: int = 1,
    output_node: bool = False,
    disk_cache: Any = None,
    preflight: PreflightCheck | None = None,
) -> Callable[[Callable[..., Any]], NodeSpec]:
    """Declare a node: decorates its run function (``fn(ctx, **inputs)``) and returns the spec.

    The function's docstring becomes the node's description. It returns a tuple with one value
    per declared output (or ``None`` for a node without outputs).
    """

    def declare(fn: Callable[..., Any]) -> NodeSpec:
        params = list(inspect.signature(fn).parameters.values())[1:]
        names = [i.name for i in inputs]
        takes_any = any(p.kind is p.VAR_KEYWORD for p in params)
        if not takes_any and [p.name for p in params] != names:
            raise TypeError(f"node {id}: function parameters {[p.name for p in params]} differ from declared inputs {names}")
        return NodeSpec(
            id=id,
            display_name=display_name,
            category=f"{CATEGORY_ROOT}/{category}",
            description=inspect.getdoc(fn) or "",
            inputs=tuple(inputs),
            outputs=tuple(outputs),
            run=fn,
            version=version,
            output_node=output_node,
            disk_cache=disk_cache,
            preflight=preflight,
        )

    return declare


class Catalogue(Mapping[str, NodeSpec]):
    """The node types a workflow may use, by id (short, or namespaced as in ComfyUI)."""

    def __init__(self, specs: list[NodeSpec]):
        self._specs = {s.id: s for s in specs}
        if len(self._specs) != len(specs):
            raise ValueError("two node specs share an id")

    def __getitem__(self, key: str) -> NodeSpec:
        return self._specs[key.removeprefix(COMFY_PREFIX) if isinstance(key, str) else key]

    def __iter__(self):
        return iter(self._specs)

    def __len__(self) -> int:
        return len(self._specs)

    def object_info(self) -> dict[str, dict[str, Any]]:
        return {node_id: spec.object_info() for node_id, spec in self._specs.items()}
