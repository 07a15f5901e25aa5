"""The pack's node classes: one ComfyUI class per node declaration, generated, not written.

Every class attribute ComfyUI reads (``INPUT_TYPES``, ``RETURN_TYPES``, ``RETURN_NAMES``,
``FUNCTION``, ``CATEGORY``, ``DESCRIPTION``, ``OUTPUT_NODE``, ``OUTPUT_TOOLTIPS``) comes from our
:class:`~lora_nodes.nodes.spec.NodeSpec`, through its ``/object_info`` entry
(:mod:`.object_info`). Importing this module imports neither ComfyUI nor any model library:
ComfyUI's hooks (``folder_paths``, ``comfy.utils``, ``comfy.model_management``) are looked up when
a node runs or lists its inputs, and are optional.
"""
from __future__ import annotations

import importlib
import logging
import os
from pathlib import Path
from typing import Any

from ..engine.context import NodeContext
from ..engine.events import Event
from ..graph.comfy.widgets import has_control_widget
from ..modelfolders import ALSO_SEARCHED, DIFFUSERS_MARKER
from ..nodes import catalogue
from ..nodes.spec import COMBO, REQUIRED, NodeSpec
from ..pngchunks import chunk_texts
from .object_info import object_info

log = logging.getLogger("lora_nodes")


def _comfy(module: str) -> Any | None:
    """A ComfyUI module when running inside ComfyUI, else None."""
    try:
        return importlib.import_module(module)
    except ImportError:
        return None


def _file_choices(spec_input) -> list[str] | None:
    """The files ComfyUI has in the input's models folder, with our built-ins first."""
    folder_paths = _comfy("folder_paths")
    if folder_paths is None or spec_input.folder is None:
        return None
    try:
        files = folder_paths.get_filename_list(spec_input.folder)
    except Exception:  # noqa: BLE001 - an unknown folder name in an older ComfyUI: plain paths then
        return None
    pipelines = [name for kind in ALSO_SEARCHED.get(spec_input.folder, ()) for name in _pipeline_folders(kind)]
    return [*spec_input.builtins, *files, *pipelines]


def _pipeline_roots(kind: str) -> list[Path]:
    """ComfyUI's folders of ``kind`` (``diffusers``): none where its folder_paths does not know the kind."""
    folder_paths = _comfy("folder_paths")
    try:
        return [Path(root) for root in folder_paths.get_folder_paths(kind)]
    except Exception:  # noqa: BLE001 - an older ComfyUI, or a stand-in without the kind
        return []


def _pipeline_folders(kind: str) -> list[str]:
    """The diffusers pipeline folders (holding model_index.json) in ComfyUI's ``kind`` folders, by name."""
    names = []
    for root in _pipeline_roots(kind):
        try:
            entries = sorted(root.iterdir())
        except OSError:
            continue
        names += [entry.name for entry in entries if (entry / DIFFUSERS_MARKER).is_file()]
    return names


def input_types(spec: NodeSpec) -> dict[str, dict[str, Any]]:
    """``INPUT_TYPES()`` for a node: our declaration in ComfyUI's shape, file inputs as choices."""
    info = object_info(spec)["input"]
    types: dict[str, dict[str, Any]] = {"required": {}, "optional": {}}
    for decl in spec.inputs:
        kind, options = info["optional" if decl.optional else "required"][decl.name]
        options = dict(options)
        choices = _file_choices(decl) if decl.path else None
        if choices is not None:
            kind = choices
            if decl.default is not REQUIRED and decl.default not in choices:
                options.pop("default", None)
        if has_control_widget(decl):
            options["control_after_generate"] = True
        if decl.type == COMBO:
            kind = list(decl.choices)
        types["optional" if decl.optional else "required"][decl.name] = (kind, options)
    # the prompt's node id, so that what a node logs names the node the user sees
    types["hidden"] = {"comfy_node_id": "UNIQUE_ID"}
    if spec.output_node:
        types["hidden"].update({"comfy_prompt": "PROMPT", "comfy_extra_pnginfo": "EXTRA_PNGINFO"})
    return types


def _resolve_file(spec: NodeSpec, name: str, value: Any) -> Any:
    """A file input's value as a path: ComfyUI's choice resolved in its models folder."""
    decl = spec.input(name)
    folder_paths = _comfy("folder_paths")
    if not (decl and decl.path and isinstance(value, str) and value) or value.startswith("builtin:"):
        return value
    if folder_paths is not None and decl.folder and not Path(value).is_absolute():
        found = folder_paths.get_full_path(decl.folder, value)
        if found:
            return found
        for kind in ALSO_SEARCHED.get(decl.folder, ()):  # a base may be a diffusers folder (LoadBase's choices)
            pipeline = next((root / value for root in _pipeline_roots(kind) if (root / value / DIFFUSERS_MARKER).is_file()),
                            None)
            if pipeline is not None:
                return str(pipeline)
    if folder_paths is not None and decl.path_kind == "folder" and not Path(value).expanduser().is_absolute():
        # a relative folder the user brings (LoadDataset's images, LoadBase's config) is in ComfyUI's input
        # folder, not in whatever folder ComfyUI was started from
        return str((Path(folder_paths.get_input_directory()) / value).resolve())
    return str(Path(value).expanduser().resolve())


class _ComfyProgress:
    """Our events, shown in ComfyUI: progress on its bar, interrupts honoured, messages logged."""

    def __init__(self) -> None:
        self.bar = None

    def __call__(self, ev: Event) -> None:
        kind = ev["event"]
        if kind == "progress":
            self._progress(ev["value"], ev["max"])
        elif kind in ("warning", "info"):
            log.log(logging.WARNING if kind == "warning" else logging.INFO,
                    "lora-nodes: node %s (%s): %s", ev["node"], ev["type"], ev["message"])

    def _progress(self, value: int, maximum: int) -> None:
        management = _comfy("comfy.model_management")
        if management is not None:
            management.throw_exception_if_processing_interrupted()
        utils = _comfy("comfy.utils")
        if utils is None:
            return
        if self.bar is None:
            self.bar = utils.ProgressBar(maximum)
        self.bar.update_absolute(value, maximum)


def _output_dir() -> Path:
    folder_paths = _comfy("folder_paths")
    return Path(folder_paths.get_output_directory()) if folder_paths is not None else Path("outputs")


def _run(spec: NodeSpec, self: Any, **inputs: Any) -> Any:
    """What ComfyUI calls (``FUNCTION``): our node function with a context made for ComfyUI."""
    prompt, extra = inputs.pop("comfy_prompt", None), inputs.pop("comfy_extra_pnginfo", None)
    node_id = inputs.pop("comfy_node_id", None)
    values = {d.name: _resolve_file(spec, d.name, inputs.get(d.name)) for d in spec.inputs}
    output_dir = _output_dir()
    # imported here, not with the pack: importing the pack imports no torch (this module does)
    from ..models.memory import MEMORY_CHECK_VARIABLE

    graph = (extra or {}).get("workflow")
    ctx = NodeContext(str(node_id) if node_id is not None else spec.comfy_id, spec.id, output_dir, output_dir.parent / "cache" / "lora-nodes",
                      _ComfyProgress(),
                      # inside ComfyUI, PNGs embed ComfyUI's own prompt and editor graph, as its SaveImage does
                      png_chunks=lambda: chunk_texts(prompt=prompt, graph=graph),
                      check_memory=os.environ.get(MEMORY_CHECK_VARIABLE, "1") != "0")
    import torch  # deferred, as above: the pack loads without torch

    # ComfyUI runs nodes in inference mode; tensors made there can never take part in training, so
    # ours run in plain no-grad mode (TrainLoRA turns gradients on for itself)
    with torch.inference_mode(False), torch.no_grad():
        result = spec.run(ctx, **values)
    outputs = tuple(result) if result is not None else ()
    if not spec.output_node:
        return outputs
    return {"ui": {"images": [_ui_image(Path(f), output_dir) for f in ctx.files if f.endswith(".png")]},
            "result": outputs}


def _ui_image(path: Path, output_dir: Path) -> dict[str, str]:
    try:
        subfolder = str(path.parent.relative_to(output_dir))
    except ValueError:
        subfolder = ""
    return {"filename": path.name, "subfolder": "" if subfolder == "." else subfolder, "type": "output"}


def comfy_class(spec: NodeSpec) -> type:
    """A ComfyUI node class for ``spec``, every attribute derived from the declaration."""

    def run(self, **inputs):
        return _run(spec, self, **inputs)

    return type(spec.id, (), {
        "INPUT_TYPES": classmethod(lambda cls: input_types(spec)),
        "RETURN_TYPES": tuple(o.type for o in spec.outputs),
        "RETURN_NAMES": tuple(o.name for o in spec.outputs),
        "OUTPUT_TOOLTIPS": tuple(o.description for o in spec.outputs),
        "FUNCTION": "run",
        "CATEGORY": spec.category,
        "DESCRIPTION": spec.description,
        "OUTPUT_NODE": spec.output_node,
        "run": run,
        "__doc__": spec.description,
        "__module__": __package__,  # the pack (lora_nodes.comfyui), as before it was split up
    })


# ComfyUI's own core nodes (which we also run headless) are ComfyUI's to register, not ours
PACK_SPECS = [spec for spec in catalogue().values() if not spec.comfy_core]
NODE_CLASS_MAPPINGS: dict[str, type] = {spec.comfy_id: comfy_class(spec) for spec in PACK_SPECS}
NODE_DISPLAY_NAME_MAPPINGS: dict[str, str] = {
    spec.comfy_id: f"{spec.display_name} (lora-nodes)" for spec in PACK_SPECS
}
