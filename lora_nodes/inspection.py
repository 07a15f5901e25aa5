"""``lora-nodes inspect``: what a base model or a LoRA file holds, and how a LoRA fits a base; what
a PNG's text chunks say (ours, ComfyUI's, A1111's)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from . import families, pngchunks, tensorfiles
from .errors import LoRAError, NodeError
from .lora.files import read_lora
from .lora.formats import SUFFIXES
from .lora.model import LoRA
from .lora.placement import check_placement, place
from .modelfolders import find_any
from .models.base import BaseModel
from .models.builtin import BUILTINS
from .models.loading import load_base
from .paths import input_path_problem


def is_lora_file(path: str | Path) -> bool:
    """True when a file's keys look like a LoRA's (read from the header only, no tensors loaded)."""
    path = Path(path)
    if path.suffix.lower() != ".safetensors":
        return True  # pickle files are only ever read as LoRAs, weights-only
    try:
        keys = list(tensorfiles.read_header(path).shapes)
    except tensorfiles.UnreadableTensorFile as exc:
        raise NodeError(str(exc)) from exc
    if not keys:
        raise NodeError(f"{path.name} holds no tensors: it is neither a LoRA nor a model")
    return any(key.endswith(suffix) for key in keys for suffix in SUFFIXES)


def inspect_source(source: str, base: str | None = None, config: str = "") -> dict[str, Any]:
    """A JSON-ready description of ``source`` (a base or a LoRA file), placed on ``base`` if given.

    ``source`` and ``base`` may also be names of files in the active model folders (``style/foo.safetensors``).
    """
    source, base = _by_name(source), _by_name(base) if base else base
    for given in (source, base or "", config):
        problem = input_path_problem(given, Path.cwd(), "any") if given and given not in BUILTINS else None
        if problem is not None:  # a FIFO, a device or a huge folder is refused before anything reads it
            raise NodeError(problem[1])
    if source not in BUILTINS and Path(source).is_file() and pngchunks.is_png(source):
        return inspect_png(source)
    if source in BUILTINS or not Path(source).is_file() or not is_lora_file(source):
        return {"kind": "base", **load_base(source, device="cpu", config=config).describe()}
    lora = read_lora(source)
    info: dict[str, Any] = {"kind": "lora", **lora.describe()}
    if base:
        model = load_base(base, device="cpu", config=config)
        placement = place(lora, model)
        info["placement"] = {
            "base": base,
            "architecture": model.family.id,
            "placed": len(placement.sources),  # file modules (a fused one may cover several targets)
            "targets": len(placement.placed),
            "total": len(lora.modules),
            "unplaced": placement.unplaced,
            "error": _placement_error(lora, model),
        }
    return info


def _by_name(given: str) -> str:
    """``given`` itself when it is a built-in or an existing path, else the model folder file of that name
    (left as it is when there is none: the path check then says it was not found)."""
    try:
        if given in BUILTINS or Path(given).expanduser().exists():
            return given
    except (OSError, RuntimeError, ValueError):  # no path at all (~user of no user, a NUL): the path check says so
        return given
    found = find_any(given)
    return str(found) if found is not None else given


def inspect_png(path: str | Path) -> dict[str, Any]:
    """What a PNG's text chunks say: our workflow's and ComfyUI's prompt's and editor graph's nodes
    (a summary), A1111's parameters parsed into fields. Any PNG: ours, ComfyUI's, A1111's."""
    try:
        chunks = pngchunks.read_chunks(path, pngchunks.TEXT_KEYS)
    except pngchunks.ChunkError as exc:
        raise NodeError(str(exc)) from exc
    info: dict[str, Any] = {"kind": "png", "path": str(path)}
    for key, text in chunks.items():
        if key == pngchunks.PARAMETERS_KEY:
            info[key] = pngchunks.parse_parameters(text)
        else:
            info[key] = _workflow_summary(key, text)
    return info


def _workflow_summary(key: str, text: str) -> dict[str, Any]:
    """The node types of a workflow chunk (ours: ``nodes`` by id; ComfyUI's prompt: ``class_type`` by
    id; its editor graph: a ``nodes`` list), or why it could not be read."""
    try:
        document = json.loads(text)
    except ValueError as exc:
        return {"error": f"not JSON: {exc}"}
    if key == pngchunks.PROMPT_KEY:
        nodes = document if isinstance(document, dict) else {}
        types = [node.get("class_type") for node in nodes.values() if isinstance(node, dict)]
    else:
        nodes = document.get("nodes") if isinstance(document, dict) else None
        listed = nodes.values() if isinstance(nodes, dict) else nodes if isinstance(nodes, list) else []
        types = [node.get("type") for node in listed if isinstance(node, dict)]
    counted: dict[str, int] = {}
    for kind in types:
        counted[str(kind)] = counted.get(str(kind), 0) + 1
    summary: dict[str, Any] = {"nodes": len(types), "types": counted}
    if key == pngchunks.WORKFLOW_KEY and isinstance(document, dict) and document.get("format"):
        summary["format"] = document["format"]
    return summary


def _placement_error(lora: LoRA, model: BaseModel) -> str | None:
    """What ApplyLoRA would refuse this LoRA for on this base, if anything."""
    try:
        check_placement(lora, model)
    except LoRAError as exc:
        return str(exc)
    return None


# what each PNG chunk is, as shown
CHUNK_TITLES = {pngchunks.WORKFLOW_KEY: "lora-nodes workflow", pngchunks.PROMPT_KEY: "ComfyUI prompt (API format)",
                pngchunks.GRAPH_KEY: "ComfyUI workflow (editor graph)", pngchunks.PARAMETERS_KEY: "A1111 parameters"}


def format_png(info: dict[str, Any]) -> str:
    """The human-readable form of :func:`inspect_png`'s result."""
    lines = [f"PNG: {info['path']}"]
    shown = [key for key in pngchunks.TEXT_KEYS if key in info]
    if not shown:
        lines.append(f"  no text chunks of lora-nodes, ComfyUI or A1111 ({', '.join(pngchunks.TEXT_KEYS)})")
    for key in shown:
        chunk = info[key]
        lines.append(f"  {CHUNK_TITLES[key]} ('{key}' chunk):")
        if key == pngchunks.PARAMETERS_KEY:
            lines += [f"    {name.replace('_', ' ')}: {_short(value)}" for name, value in chunk.items() if value]
        elif "error" in chunk:
            lines.append(f"    unreadable: {chunk['error']}")
        else:
            types = ", ".join(f"{kind} x{n}" if n > 1 else kind for kind, n in chunk["types"].items())
            lines.append(f"    {chunk['nodes']} nodes: {_short(types, 300)}")
    return "\n".join(lines)


def format_inspection(info: dict[str, Any]) -> str:
    """The human-readable form of :func:`inspect_source`'s result."""
    if info["kind"] == "png":
        return format_png(info)
    if info["kind"] == "base":
        modules = info["modules"]
        counts: dict[str, int] = {}
        for name, module in modules.items():
            key = f"{name.split('.', 1)[0]} {module['kind']}"
            counts[key] = counts.get(key, 0) + 1
        lines = [f"base model: {info['source']}", f"  architecture: {info['architecture']}",
                 f"  dtype: {info['dtype']}, native size: {info['native_size']}px",
                 f"  {denoiser_text(info['denoiser'])}",
                 f"  text encoders: {', '.join(f'{n} ({c})' for n, c in info['text_encoders'].items())}",
                 f"  single-file layout: {info['checkpoint_layout']}"]
        if info.get("blocks"):
            lines.append(f"  blocks: {blocks_text(info['blocks'])}")
        lines.append(f"  LoRA-targetable modules: {len(modules)}")
        lines += [f"    {key}: {n}" for key, n in sorted(counts.items())]
        lines.append("  (--json lists every module with its kind and shape)")
        return "\n".join(lines)
    lines = [f"LoRA: {info['path']}", f"  format: {info['format']}", f"  modules: {info['modules']}",
             f"  rank(s): {', '.join(map(str, info['ranks']))}",
             f"  kinds: {', '.join(info['kinds'])}",
             f"  alpha(s): {', '.join(f'{a:g}' for a in info['alphas'])}",
             f"  components: {', '.join(info['components'])}",
             f"  layout: {info['layout']}",
             f"  made for: {families.describe(families.by_id(info['architecture'])) if info['architecture'] else 'not recorded'}"]
    if info.get("blocks"):
        lines.append(f"  blocks: {blocks_text(info['blocks'])}")
    if info["trigger_words"]:
        lines.append(f"  trigger words: {', '.join(info['trigger_words'])}")
    lines += [f"  {name.replace('_', ' ')}: {value}" for name, value in info["training"].items()]
    lines += [f"  warning: {warning}" for warning in info.get("warnings", [])]
    if info["metadata"]:
        lines.append("  metadata (--json shows it whole):")
        lines += [f"    {k}: {_short(v)}" for k, v in sorted(info["metadata"].items())]
    placement = info.get("placement")
    if placement:
        lines.append(f"  on {placement['base']} ({placement['architecture']}): "
                     f"{placement['placed']} of {placement['total']} modules placed")
        lines += [f"    not placed: {k} ({why})" for k, why in sorted(placement["unplaced"].items())]
        if placement["error"]:
            lines.append(f"  error: {placement['error']}")
    return "\n".join(lines)


# the denoiser config entries that say its size (diffusers' names), in the order shown
SIZE_ENTRIES = ("num_layers", "num_single_layers", "num_attention_heads", "attention_head_dim", "block_out_channels",
                "layers_per_block", "transformer_layers_per_block", "in_channels", "cross_attention_dim",
                "joint_attention_dim", "pooled_projection_dim", "guidance_embeds")


def denoiser_text(denoiser: dict[str, Any]) -> str:
    """``denoiser: transformer (FluxTransformer2DModel): num_layers=2, ...``: its class and sizes."""
    config = denoiser["config"]
    sizes = ", ".join(f"{name}={config[name]}" for name in SIZE_ENTRIES if config.get(name) is not None)
    return f"denoiser: {denoiser['component']} ({denoiser['class']})" + (f": {sizes}" if sizes else "")


def blocks_text(blocks: dict[str, list[int]]) -> str:
    """``{"double blocks": [0, 1, 2, 5]}`` as ``double blocks 0-2, 5``; a group without indices by its name."""
    return "; ".join(f"{group} {_ranges(indices)}" if indices else group for group, indices in blocks.items())


def _ranges(indices: list[int]) -> str:
    runs: list[list[int]] = []
    for index in indices:
        if runs and index == runs[-1][-1] + 1:
            runs[-1].append(index)
        else:
            runs.append([index])
    return ", ".join(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]) for run in runs)


def _short(value: str, limit: int = 100) -> str:
    return value if len(value) <= limit else value[: limit - 3] + "..."
