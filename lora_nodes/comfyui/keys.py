"""A node's cache key inside ComfyUI, computed from ComfyUI's API prompt by the scheduler's rule.

ComfyUI caches results in memory by its own rules; our disk cache and a training's checkpoints need
our key (:func:`lora_nodes.engine.keys.spec_key`), which is what makes them work across queues
and restarts. The pack asks ComfyUI for the whole prompt (the hidden ``PROMPT`` input) and walks
the node's upstream nodes in it: each is looked up in our catalogue (ours by their ``lora-nodes.``
id, ComfyUI's own core nodes by theirs), its literals are resolved as the pack resolves them for a
run, so fingerprints read the real files. An upstream node we do not know (another pack's) has no
key we could trust, and neither has anything after it: :class:`Unkeyable`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from ..engine.keys import Fingerprints, spec_key
from ..graph.comfy.widgets import without_editor_widgets
from ..nodes.spec import COMFY_PREFIX, REQUIRED, Catalogue, NodeSpec

# (spec, input name, value as the prompt has it) -> the value as the node runs with it (a path resolved)
Resolve = Callable[[NodeSpec, str, Any], Any]


class Unkeyable(Exception):
    """The prompt does not let us key a node: the reason names what is missing (a node type we do not know)."""


def comfy_spec(catalogue: Catalogue, class_type: Any) -> NodeSpec | None:
    """Our spec of a prompt node's ``class_type`` as ComfyUI names it, or None: ``lora-nodes.X`` is ours,
    an id without the prefix is ComfyUI's own node, known only where we declare it as a core node
    (ComfyUI's ``SaveLoRA`` is not our ``SaveLoRA``)."""
    if not isinstance(class_type, str):
        return None
    spec = catalogue.get(class_type)
    if spec is None:
        return None
    return spec if class_type.startswith(COMFY_PREFIX) or spec.comfy_core else None


def is_link(value: Any) -> bool:
    """Whether a prompt input is a link, as ComfyUI tells one: ``[node id, output index]``."""
    return isinstance(value, list) and len(value) == 2 and isinstance(value[1], int)


def prompt_key(prompt: Mapping[str, Any], node_id: str, catalogue: Catalogue, resolve: Resolve,
               fingerprints: Fingerprints) -> str:
    """The cache key of the prompt's node ``node_id``, as the scheduler would compute it for the same graph.

    Raises :class:`Unkeyable` when a node it depends on cannot be keyed; OSError when a file an input
    names exists but cannot be read.
    """
    keys: dict[str, str] = {}
    visiting: set[str] = set()

    def key_of(current: str) -> str:
        if current in keys:
            return keys[current]
        entry = prompt.get(current)
        if not isinstance(entry, Mapping):
            raise Unkeyable(f"node {current} is not in the prompt")
        spec = comfy_spec(catalogue, entry.get("class_type"))
        if spec is None:
            raise Unkeyable(f"node type {entry.get('class_type')!r} is not one lora-nodes knows")
        if current in visiting:
            raise Unkeyable(f"node {current} depends on itself")
        visiting.add(current)
        keys[current] = _node_key(spec, entry.get("inputs") or {}, key_of, resolve, fingerprints)
        return keys[current]

    return key_of(str(node_id))


def _node_key(spec: NodeSpec, given: Mapping[str, Any], key_of: Callable[[str], str], resolve: Resolve,
              fingerprints: Fingerprints) -> str:
    """One node's key from its prompt inputs: defaults filled in as validation fills them in headless."""
    inputs = without_editor_widgets(spec, dict(given))
    unknown = sorted(name for name in inputs if spec.input(name) is None)
    if spec.comfy_core and unknown:  # a newer ComfyUI's input we would leave out of the key
        raise Unkeyable(f"ComfyUI's {spec.id} has inputs lora-nodes does not know ({', '.join(unknown)})")
    literals: dict[str, Any] = {}
    upstream: dict[str, tuple[str, int]] = {}
    for decl in spec.inputs:
        if decl.name not in inputs:
            if not decl.optional and decl.default is not REQUIRED:
                literals[decl.name] = decl.default
            continue
        value = inputs[decl.name]
        if isinstance(value, Mapping) and "__value__" in value:  # ComfyUI's wrapping of a list widget value
            value = value["__value__"]
        if is_link(value):
            upstream[decl.name] = (key_of(str(value[0])), value[1])
        else:
            literals[decl.name] = resolve(spec, decl.name, value)
    return spec_key(spec, literals, upstream, fingerprints)
