"""The pack's node classes: one ComfyUI class per node declaration, generated, not written.

Every class attribute ComfyUI reads (``INPUT_TYPES``, ``RETURN_TYPES``, ``RETURN_NAMES``,
``FUNCTION``, ``CATEGORY``, ``DESCRIPTION``, ``OUTPUT_NODE``, ``OUTPUT_TOOLTIPS``) comes from our
:class:`~lora_nodes.nodes.spec.NodeSpec`, through its ``/object_info`` entry
(:mod:`.object_info`). Importing this module imports neither ComfyUI nor any model library:
ComfyUI's hooks (``folder_paths``, ``comfy.utils``, ``comfy.model_management``) are looked up when
a node runs or lists its inputs, and are optional.

Each node gets ComfyUI's whole prompt (a hidden input) and computes its cache key from it by the
scheduler's rule (:mod:`.keys`), so a node kept on disk (TrainLoRA) is taken from the disk cache
(:mod:`lora_nodes.engine.diskcache`) and resumes from its checkpoints inside ComfyUI as headless.
"""
from __future__ import annotations

import importlib
import inspect
import logging
import os
from pathlib import Path
from typing import Any

from ..engine.context import NodeContext
from ..engine.diskcache import DiskCache
from ..engine.events import Event, event
from ..engine.keys import Fingerprints
from ..graph.validate import BUILTIN_PREFIX
from ..modelfolders import ALSO_SEARCHED, DIFFUSERS_MARKER, INPUT
from ..nodes import catalogue
from ..nodes.spec import COMBO, REQUIRED, Input, NodeSpec
from ..pngchunks import chunk_texts
from .keys import Unkeyable, prompt_key
from .object_info import object_info

log = logging.getLogger("lora_nodes")

# where the disk cache and a training's checkpoints go inside ComfyUI; unset: <ComfyUI output>/../cache/lora-nodes
CACHE_DIR_VARIABLE = "LORA_NODES_CACHE_DIR"
# each file's fingerprint computed once per file version for the life of ComfyUI's process, as headless
FINGERPRINTS = Fingerprints()
_unkeyed_reasons: set[str] = set()  # told once each in ComfyUI's log


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
        if decl.type == COMBO:
            kind = list(decl.choices)
        types["optional" if decl.optional else "required"][decl.name] = (kind, options)
    # the prompt's node id, so that what a node logs names the node the user sees; the whole prompt, to
    # compute the node's cache key from (and, with the editor's graph, to embed in the PNGs a node writes)
    types["hidden"] = {"comfy_node_id": "UNIQUE_ID", "comfy_prompt": "PROMPT", "comfy_extra_pnginfo": "EXTRA_PNGINFO"}
    return types


def _resolve_file(spec: NodeSpec, name: str, value: Any) -> Any:
    """A file input's value as a path: ComfyUI's choice resolved in its models folder."""
    decl = spec.input(name)
    folder_paths = _comfy("folder_paths")
    if not (decl and decl.path and isinstance(value, str) and value) or value.startswith("builtin:"):
        return value
    if folder_paths is not None and decl.folder == INPUT and hasattr(folder_paths, "get_annotated_filepath"):
        return folder_paths.get_annotated_filepath(value)  # an image of ComfyUI's input folder (its LoadImage's)
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
        elif kind == "cached":
            log.info("lora-nodes: node %s (%s): cached on disk, not run again (%s)", ev["node"], ev["type"],
                     ev.get("folder", ""))
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


def _write_dir(spec: NodeSpec, output_dir: Path) -> Path:
    """Where ``spec``'s node writes: the first of ComfyUI's models folders of the kind its written path is
    declared for (SaveLoRA's: ``loras``, so LoadLoRA lists what it saves), else the output folder."""
    kind = next((d.folder for d in spec.inputs if d.writes and d.folder), None)
    folder_paths = _comfy("folder_paths")
    if kind is None or folder_paths is None:
        return output_dir
    try:
        return Path(folder_paths.get_folder_paths(kind)[0])
    except Exception:  # noqa: BLE001 - an older ComfyUI, or no folder of that kind: the output folder then
        return output_dir


def cache_dir(output_dir: Path) -> Path:
    """The disk cache (trained LoRAs, checkpoints) inside ComfyUI: $LORA_NODES_CACHE_DIR, else
    ``cache/lora-nodes`` beside ComfyUI's output folder (``<ComfyUI>/cache/lora-nodes`` by default)."""
    configured = os.environ.get(CACHE_DIR_VARIABLE)
    return Path(configured).expanduser() if configured else output_dir.parent / "cache" / "lora-nodes"


def cache_key(spec: NodeSpec, prompt: Any, node_id: Any) -> str:
    """The node's cache key from ComfyUI's prompt, as headless; "" (no disk cache, no checkpoints) where it
    cannot be computed: no prompt, or a node it depends on that we do not know (said once in the log)."""
    if not isinstance(prompt, dict) or node_id is None:
        return ""
    try:
        return prompt_key(prompt, str(node_id), catalogue(), _resolve_file, FINGERPRINTS)
    except (Unkeyable, OSError, ValueError) as exc:
        reason = str(exc)
    if spec.disk_cache is not None and reason not in _unkeyed_reasons:  # only where it costs the user work
        _unkeyed_reasons.add(reason)
        log.info("lora-nodes: node %s (%s) runs without the disk cache and checkpoints: %s", node_id, spec.id, reason)
    return ""


def _run(spec: NodeSpec, self: Any, **inputs: Any) -> Any:
    """What ComfyUI calls (``FUNCTION``): our node function with a context made for ComfyUI.

    A node kept on disk (TrainLoRA) is taken from the disk cache when its key is there, else run with its
    key (so its checkpoints are kept and resumed) and stored after, as headless.
    """
    prompt, extra = inputs.pop("comfy_prompt", None), inputs.pop("comfy_extra_pnginfo", None)
    node_id = inputs.pop("comfy_node_id", None)
    values = {d.name: _resolve_file(spec, d.name, inputs.get(d.name)) for d in spec.inputs}
    output_dir = _output_dir()
    # imported here, not with the pack: importing the pack imports no torch (this module does)
    from ..models.memory import MEMORY_CHECK_VARIABLE

    graph = (extra or {}).get("workflow")
    key = cache_key(spec, prompt, node_id)
    ctx = NodeContext(str(node_id) if node_id is not None else spec.comfy_id, spec.id, _write_dir(spec, output_dir),
                      cache_dir(output_dir), _ComfyProgress(),
                      # inside ComfyUI, PNGs embed ComfyUI's own prompt and editor graph, as its SaveImage does
                      png_chunks=lambda: chunk_texts(prompt=prompt, graph=graph), cache_key=key,
                      check_memory=os.environ.get(MEMORY_CHECK_VARIABLE, "1") != "0")
    outputs = _from_disk_or_run(spec, ctx, values)
    if not spec.output_node:
        return outputs
    return {"ui": {"images": [_ui_image(Path(f), output_dir) for f in ctx.files if f.endswith(".png")]},
            "result": outputs}


def _from_disk_or_run(spec: NodeSpec, ctx: NodeContext, values: dict[str, Any]) -> tuple[Any, ...]:
    """The node's result from the disk cache under its key, else run and stored there (nodes declared with
    a disk cache, and a key), under the key's lock, as the scheduler does headless."""
    key = ctx.cache_key
    if not key or spec.disk_cache is None:
        return _execute(spec, ctx, values)
    disk = DiskCache(ctx.cache_dir, ctx.emit)
    with disk.one_process_at_a_time(ctx.node_id, spec, key):
        outputs = disk.load(ctx.node_id, spec, key)
        if outputs is not None:
            ctx.emit(event("cached", node=ctx.node_id, type=spec.id, cache="disk", folder=str(disk.folder(spec, key))))
            return outputs
        outputs = _execute(spec, ctx, values)
        disk.save(ctx.node_id, spec, key, outputs)
    return outputs


def _execute(spec: NodeSpec, ctx: NodeContext, values: dict[str, Any]) -> tuple[Any, ...]:
    import torch  # deferred, as above: the pack loads without torch

    # ComfyUI runs nodes in inference mode; tensors made there can never take part in training, so
    # ours run in plain no-grad mode (TrainLoRA turns gradients on for itself)
    with torch.inference_mode(False), torch.no_grad():
        result = spec.run(ctx, **values)
    return tuple(result) if result is not None else ()


def _ui_image(path: Path, output_dir: Path) -> dict[str, str]:
    try:
        subfolder = str(path.parent.relative_to(output_dir))
    except ValueError:
        subfolder = ""
    return {"filename": path.name, "subfolder": "" if subfolder == "." else subfolder, "type": "output"}


def choice_problem(spec: NodeSpec, decl: Input, value: Any) -> str | None:
    """Why ComfyUI should refuse ``value`` for a path input it offers choices for, or None: a listed name,
    a ``builtin:`` name and any existing path (typed into an API prompt or a workflow file) are taken.
    A value that is not there yet (a link's) is left to the node."""
    if not isinstance(value, str) or value.startswith(BUILTIN_PREFIX):
        return None
    if value in (_file_choices(decl) or ()) or Path(_resolve_file(spec, decl.name, value)).exists():
        return None
    return (f"{value!r} is neither in ComfyUI's {decl.folder} folder nor an existing path: pick one of the listed "
            f"names, put the file in models/{decl.folder}, or type its full path")


def validate_inputs(spec: NodeSpec) -> classmethod | None:
    """ComfyUI's ``VALIDATE_INPUTS`` for ``spec``'s path inputs offered as choices (None when it has none).

    ComfyUI refuses a value that is not among an input's choices unless the class's ``VALIDATE_INPUTS``
    takes that input by name; it then leaves the input to it. So its signature names those inputs
    exactly (no ``**kwargs``, which would take every input away from ComfyUI's own checks).
    """
    offered = [decl for decl in spec.inputs if decl.path and decl.folder]
    if not offered:
        return None

    def validate(cls: type, **values: Any) -> bool | str:
        problems = [problem for decl in offered
                    if (problem := choice_problem(spec, decl, values.get(decl.name))) is not None]
        return "; ".join(problems) if problems else True

    parameter = inspect.Parameter.POSITIONAL_OR_KEYWORD
    validate.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
        [inspect.Parameter("cls", parameter)] + [inspect.Parameter(d.name, parameter, default=None) for d in offered])
    return classmethod(validate)


def comfy_class(spec: NodeSpec) -> type:
    """A ComfyUI node class for ``spec``, every attribute derived from the declaration."""

    def run(self, **inputs):
        return _run(spec, self, **inputs)

    validate = validate_inputs(spec)
    return type(spec.id, (), {
        **({"VALIDATE_INPUTS": validate} if validate is not None else {}),
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
