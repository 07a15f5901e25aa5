"""A1111's ``parameters`` chunk of the PNGs a SaveImages writes: how they were drawn, as text that
A1111's PNG Info and Civitai read (the text's format is :func:`lora_nodes.pngchunks.parameters_text`).

Traced from the workflow as bound: from the SaveImages node's images back to the Sample node that
drew them (its prompt, negative prompt, steps, sampler, CFG, seed), and from Sample's model back
along the MODEL links to the base (LoadBase's source) with the LoRA files applied on the way
(ApplyLoRA, ApplyLoRAStack, the LoRAStacks feeding it, and the LoadLoRA behind each LoRA). Files
are found by their inputs' declarations (a path input offered from the ``checkpoints`` or ``loras``
folder), so a new node of either kind is traced without changes here. Hashes are A1111's: the
model's is the first 10 hex digits of its file's sha256; a LoRA's the first 12 of its
``sshs_model_hash`` metadata, or of the sha256 of its tensor data after the safetensors header.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from .. import families
from ..nodes.spec import IMAGE, LORA, LORA_STACK, MODEL
from ..pngchunks import PARAMETERS_KEY, parameters_text
from ..tensorfiles import file_sha256, read_header, tensor_data_sha256
from .validate import BUILTIN_PREFIX, BoundNode

SAMPLE_TYPES = ("Sample",)  # the nodes whose images the chunk describes
BASE_FOLDER, LORA_FOLDER = "checkpoints", "loras"  # the model folders a base's and a LoRA's path inputs offer
MODEL_HASH_DIGITS, LORA_HASH_DIGITS = 10, 12  # as A1111 shortens them
AUTOMATIC = "Automatic"  # A1111's schedule type where none is chosen
# A1111's names for the samplers and schedulers, by ComfyUI's (which ours follow); others are written as they are
A1111_SAMPLERS = {
    "euler": "Euler", "euler_ancestral": "Euler a", "heun": "Heun", "dpm_2": "DPM2", "dpm_2_ancestral": "DPM2 a",
    "lms": "LMS", "dpm_fast": "DPM fast", "dpm_adaptive": "DPM adaptive", "dpmpp_2s_ancestral": "DPM++ 2S a",
    "dpmpp_sde": "DPM++ SDE", "dpmpp_2m": "DPM++ 2M", "dpmpp_2m_sde": "DPM++ 2M SDE",
    "dpmpp_3m_sde": "DPM++ 3M SDE", "ddim": "DDIM", "plms": "PLMS", "uni_pc": "UniPC", "uni_pc_bh2": "UniPC",
    "lcm": "LCM",
}
A1111_SCHEDULERS = {
    "normal": "Normal", "karras": "Karras", "exponential": "Exponential", "sgm_uniform": "SGM Uniform",
    "simple": "Simple", "ddim_uniform": "DDIM", "beta": "Beta", "kl_optimal": "KL Optimal",
}

# a file hash computed once per file version: (path, how) -> hex digest (the engine's cache, or a plain call)
Hasher = Callable[[Path, Callable[[Path], str]], str]


def _compute(path: Path, compute: Callable[[Path], str]) -> str:
    return compute(path)


def parameters_chunk(bound: Mapping[str, BoundNode], save_id: str, outputs: Mapping[str, tuple[Any, ...]],
                     hashed: Hasher = _compute) -> dict[str, str]:
    """``{"parameters": text}`` for the PNGs the node ``save_id`` writes, or nothing where its images
    were not drawn by a Sample node. ``outputs`` (node id -> its outputs, as run) gives the images'
    size; ``hashed`` computes the file hashes (the engine's keeps each one per file version)."""
    images = _linked(bound, bound[save_id], IMAGE)
    sample = _drawing(bound, images)
    if sample is None:
        return {}
    values = sample.literals
    fields: dict[str, Any] = {
        "Steps": values.get("steps"),
        "Sampler": A1111_SAMPLERS.get(values.get("sampler"), values.get("sampler")),
        "Schedule type": A1111_SCHEDULERS.get(values.get("scheduler"), values.get("scheduler") or AUTOMATIC),
        "CFG scale": _number(values.get("cfg")),
    }
    base, loras = model_sources(bound, sample)
    if base is not None and _guidance_distilled(base) and "guidance" in values:
        fields["Guidance"] = _number(values["guidance"])
    fields["Seed"] = values.get("seed")  # the node's: one generator draws the whole batch
    size = _image_size(outputs, sample, _link(bound[save_id], IMAGE))
    if size:
        fields["Size"] = f"{size[0]}x{size[1]}"
    if base is not None:
        fields.update(model_fields(_file_input(base, BASE_FOLDER) or "", hashed))
    if loras:
        hashes = {Path(path).stem: hashed(Path(path), lora_hash)[:LORA_HASH_DIGITS] for path in loras}
        fields["Lora hashes"] = ", ".join(f"{name}: {digest}" for name, digest in hashes.items())
    fields = {key: value for key, value in fields.items() if value is not None}
    text = parameters_text(str(values.get("prompt") or ""), str(values.get("negative_prompt") or ""), fields)
    return {PARAMETERS_KEY: text}


def model_sources(bound: Mapping[str, BoundNode], node: BoundNode) -> tuple[BoundNode | None, list[str]]:
    """The node that loads the base behind ``node``'s model input, and the LoRA files applied on the
    way to it, in the order applied (without repeats)."""
    files: list[str] = []
    current = _linked(bound, node, MODEL)
    while current is not None and _file_input(current, BASE_FOLDER) is None:
        files = _lora_files(bound, current) + files
        current = _linked(bound, current, MODEL)
    return current, list(dict.fromkeys(files))


def model_fields(source: str, hashed: Hasher = _compute) -> dict[str, str]:
    """``Model hash`` (files only) and ``Model`` (the file's stem, the folder's or the built-in's name)."""
    if not source:
        return {}
    if source.startswith(BUILTIN_PREFIX):
        return {"Model": source[len(BUILTIN_PREFIX):]}
    path = Path(source)
    if path.is_file():
        return {"Model hash": hashed(path, file_sha256)[:MODEL_HASH_DIGITS], "Model": path.stem}
    return {"Model": path.name}


def lora_hash(path: Path) -> str:
    """A LoRA file's hash as A1111 takes it: its ``sshs_model_hash`` metadata, else the sha256 of
    its tensor data (a ``.safetensors`` file) or of the whole file (others)."""
    if path.suffix.lower() != ".safetensors":
        return file_sha256(path)
    return read_header(path).metadata.get("sshs_model_hash") or tensor_data_sha256(path)


def _drawing(bound: Mapping[str, BoundNode], node: BoundNode | None) -> BoundNode | None:
    """The Sample node that drew the images ``node`` outputs, following image links upstream."""
    seen: set[str] = set()
    while node is not None and node.id not in seen and node.spec.id not in SAMPLE_TYPES:
        seen.add(node.id)
        node = _linked(bound, node, IMAGE)
    return node


def _link(node: BoundNode, kind: str) -> tuple[str, int] | None:
    """(upstream node id, output index) of ``node``'s first linked input of type ``kind``, or None."""
    return next((node.links[d.name] for d in node.spec.inputs if d.type == kind and d.name in node.links), None)


def _linked(bound: Mapping[str, BoundNode], node: BoundNode, kind: str) -> BoundNode | None:
    """The node linked to ``node``'s first linked input of type ``kind``, or None."""
    link = _link(node, kind)
    return bound.get(link[0]) if link is not None else None


def _file_input(node: BoundNode, folder: str) -> str | None:
    """The value of ``node``'s path input offered from the models folder ``folder``, or None."""
    for decl in node.spec.inputs:
        if decl.path and decl.folder == folder and isinstance(node.literals.get(decl.name), str):
            return node.literals[decl.name]
    return None


def _lora_files(bound: Mapping[str, BoundNode], node: BoundNode) -> list[str]:
    """The LoRA files ``node`` applies or collects, in order: an incoming stack's first, then its own
    LoRA inputs; a slot switched off, or with every strength 0, is left out (it draws nothing)."""
    stacked: list[str] = []
    own: list[str] = []
    for decl in node.spec.inputs:
        link = node.links.get(decl.name)
        if link is None or link[0] not in bound:
            continue
        upstream = bound[link[0]]
        if decl.type == LORA_STACK:
            stacked += _lora_files(bound, upstream)
        elif decl.type == LORA and _slot_on(node, decl.name):
            path = _file_input(upstream, LORA_FOLDER)
            own += [path] if path else []
    return stacked + own


def _slot_on(node: BoundNode, lora_input: str) -> bool:
    """Whether the LoRA input ``lora_input`` counts: its ``enabled`` switch (``enabled_1`` for
    ``lora_1``) on, and a strength (``strength_model``/``strength_text`` with the same ending) not 0."""
    ending = lora_input[len("lora"):]
    values = node.literals
    strengths = [values.get(f"{kind}{ending}", 1.0) for kind in ("strength_model", "strength_text")]
    return values.get(f"enabled{ending}", True) is not False and any(s != 0 for s in strengths)


def _guidance_distilled(base: BoundNode) -> bool:
    """Whether the base is of a guidance-distilled family (read from file headers by its preflight)."""
    if base.spec.preflight is None:
        return False
    family = families.by_id(base.spec.preflight(base.literals, {}).facts.get("family"))
    return family is not None and family.guidance_distilled


def _image_size(outputs: Mapping[str, tuple[Any, ...]], sample: BoundNode,
                link: tuple[str, int] | None) -> tuple[int, int] | None:
    """(width, height) of the images saved ([batch, height, width, 3]), else Sample's width and height."""
    value = outputs.get(link[0], ()) if link is not None else ()
    shape = getattr(value[link[1]], "shape", None) if link is not None and link[1] < len(value) else None
    if shape is not None and len(shape) == 4:
        return int(shape[2]), int(shape[1])
    width, height = sample.literals.get("width"), sample.literals.get("height")
    return (width, height) if width and height else None


def _number(value: Any) -> Any:
    """A float as A1111 shows a setting: ``7`` for 7.0, ``7.5`` for 7.5."""
    return int(value) if isinstance(value, float) and value.is_integer() else value
