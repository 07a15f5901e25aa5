"""Our node catalogue as the editor asks for it (``/object_info``): ComfyUI's core nodes we run under
their own ids, ours under ``lora-nodes.<id>`` (as the ComfyUI pack registers them), and each input that
names a file of a models folder offered as the files there, our built-ins first."""

from __future__ import annotations

from typing import Any

from ..comfyui.object_info import object_info
from ..modelfolders import names_in
from ..nodes.spec import REQUIRED, Catalogue, Input, NodeSpec

CORE_MODULE = "nodes"  # where ComfyUI says its own nodes come from


def editor_object_info(catalogue: Catalogue) -> dict[str, dict[str, Any]]:
    """Every node of ``catalogue`` by the id the editor (and ComfyUI's files) use, as ``/object_info`` lists it.

    Call it inside the server's :func:`lora_nodes.modelfolders.using_folders` block: the file choices are
    listed from the folders in force.
    """
    return {spec.comfy_id: node_info(spec) for spec in catalogue.values()}


def node_info(spec: NodeSpec) -> dict[str, Any]:
    """One node's ``/object_info`` entry, with file inputs as choices of the files in the models folders."""
    info = object_info(spec)
    info["name"] = spec.comfy_id
    if spec.comfy_core:
        info["python_module"] = CORE_MODULE
    for group in ("required", "optional"):
        for name, (kind, options) in list(info["input"][group].items()):
            decl = spec.input(name)
            choices = file_choices(decl) if decl is not None else None
            if choices:
                options = dict(options)
                if decl.default is not REQUIRED and decl.default not in choices:
                    options.pop("default", None)
                info["input"][group][name] = [choices, options]
    return info


def file_choices(decl: Input) -> list[str] | None:
    """The names a file input offers: our built-ins, then the files of its kind in the models folders
    (None for an input that names no models-folder file, or when there is nothing to offer)."""
    if not decl.path or not decl.folder:
        return None
    names = [*decl.builtins, *names_in(decl.folder)]
    return names or None
