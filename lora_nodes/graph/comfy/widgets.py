"""How ComfyUI's editor shows a node (ours, or a core node): its inputs, the widgets and sockets they become.

ComfyUI groups a node's inputs as required, then optional (the ``input_order`` of its
``/object_info``); literal inputs become widgets, whose values a UI-format file lists in that order,
and links become sockets. The pack's ``INPUT_TYPES`` and ``/object_info``, and both UI-format
readers and writers, take the order and the seed rule from here.
"""

from __future__ import annotations

from typing import Any

from ...nodes.spec import INT, Input, NodeSpec

# INT widgets that ComfyUI's editor follows with a "control_after_generate" widget unless the input's options
# say control_after_generate: false; a UI-format file holds its value (one of CONTROL_VALUES) right after the seed's
SEED_NAMES = frozenset({"seed", "noise_seed"})
CONTROL_VALUES = frozenset({"fixed", "increment", "decrement", "randomize"})
# widgets ComfyUI's editor adds to a core node beside its declared inputs, whose values API-format prompts
# carry too (LoadImage's upload button: "upload": "image"); they mean nothing to the node
EDITOR_WIDGETS: dict[str, frozenset[str]] = {"LoadImage": frozenset({"upload"})}


def input_groups(spec: NodeSpec) -> tuple[list[Input], list[Input]]:
    """The inputs of ``spec`` as ComfyUI groups them: (required, optional), each in declaration order."""
    return [i for i in spec.inputs if not i.optional], [i for i in spec.inputs if i.optional]


def comfy_order(spec: NodeSpec) -> list[Input]:
    """The inputs of ``spec`` in ComfyUI's order: required, then optional."""
    required, optional = input_groups(spec)
    return required + optional


def widget_inputs(spec: NodeSpec) -> list[Input]:
    """The literal inputs of ``spec`` in ComfyUI's widget order (required, then optional)."""
    return [i for i in comfy_order(spec) if not i.is_link]


def socket_inputs(spec: NodeSpec) -> list[Input]:
    """The link inputs of ``spec`` in ComfyUI's slot order (required, then optional)."""
    return [i for i in comfy_order(spec) if i.is_link]


def seed_named(decl: Input) -> bool:
    """Whether ComfyUI's editor gives this input a control widget unless told not to: an INT named as a seed."""
    return decl.type == INT and decl.name in SEED_NAMES


def has_control_widget(decl: Input) -> bool:
    """Whether ComfyUI's editor puts a ``control_after_generate`` widget after this one: INT seeds, but for
    those declared without (``seed_control=False``, whose options say so: see :func:`control_option`)."""
    return seed_named(decl) and decl.seed_control


def control_option(decl: Input) -> dict[str, bool]:
    """The ``control_after_generate`` option an input's ComfyUI options carry: for a seed-named INT only,
    and false said out loud where it has no control (the editor's default for such a name is a control)."""
    return {"control_after_generate": decl.seed_control} if seed_named(decl) else {}


def without_editor_widgets(spec: NodeSpec, inputs: dict[str, Any]) -> dict[str, Any]:
    """``inputs`` less the values of widgets the editor adds to ``spec``'s node (see EDITOR_WIDGETS)."""
    extra = EDITOR_WIDGETS.get(spec.id, frozenset()) if spec.comfy_core else frozenset()
    return {name: value for name, value in inputs.items()
            if name not in extra or spec.input(name) is not None}
