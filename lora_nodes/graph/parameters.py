"""A1111's ``parameters`` chunk of the PNGs a SaveImages or SaveImage writes: how they were drawn, as
text that A1111's PNG Info and Civitai read (the text's format is :func:`lora_nodes.pngchunks.parameters_text`).

Traced from the workflow as bound, from the saved images back to the sampler that drew them:

- our Sample node: its prompt, negative prompt, steps, sampler, CFG, seed, clip skip, denoise;
- ComfyUI's KSampler / KSamplerAdvanced, reached through VAEDecode and the latent upscalers (a hires
  fix is described by its last sampler, the one that drew the saved picture): its settings, the
  prompts of the CLIPTextEncode nodes behind its positive and negative conditioning, FluxGuidance's
  guidance and CLIPSetLastLayer's clip skip on the way.

From the sampler's model back along the model links to the node that loads the base, with the LoRA
files applied on the way (ours: ApplyLoRA, ApplyLoRAStack, the LoRAStacks feeding it, the LoadLoRA
behind each LoRA; ComfyUI's: LoraLoader and LoraLoaderModelOnly, and a LoraLoader on the prompts'
CLIP alone). Files are found by their inputs' declarations (a path input offered from a models folder
of bases or of LoRAs), so a new loader of either kind is traced without changes here. Hashes are
A1111's: the model's is the first 10 hex digits of its file's sha256; a LoRA's the first 12 of its
``sshs_model_hash`` metadata, or of the sha256 of its tensor data after the safetensors header.

A graph of another shape (prompts combined or timed, a schedule split between samplers, an image
that no sampler drew) gets no chunk: a wrong description is worse than none.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import families
from ..models.schedules import DEFAULT_SCHEDULER
from ..nodes.spec import CLIP, CONDITIONING, CORE_MODEL, IMAGE, LATENT, LORA, LORA_STACK, MODEL
from ..pngchunks import PARAMETERS_KEY, parameters_text
from ..tensorfiles import file_sha256, read_header, tensor_data_sha256
from .validate import BUILTIN_PREFIX, BoundNode

SAMPLE_TYPES = ("Sample",)  # our nodes whose images the chunk describes
KSAMPLER, KSAMPLER_ADVANCED = "KSampler", "KSamplerAdvanced"  # ComfyUI's samplers the chunk describes
PROMPT_TYPES = {"CLIPTextEncode": "text"}  # ComfyUI's prompt encoders: node id -> its prompt input
GUIDANCE_TYPES = {"FluxGuidance": "guidance"}  # nodes setting a conditioning's distilled guidance
TIME_RANGE_TYPES = ("ConditioningSetTimestepRange",)  # harmless only over the whole schedule (0..1)
LAST_LAYER_TYPES = {"CLIPSetLastLayer": "stop_at_clip_layer"}  # -N reads prompts as A1111's clip skip N
EMPTY_LATENT_SIZE = ("width", "height")  # the inputs an empty latent's size is given by
# the model folders a base's path inputs offer (a checkpoint, a denoiser alone, a diffusers folder)
BASE_FOLDERS = ("checkpoints", "diffusion_models", "diffusers")
LORA_FOLDER = "loras"  # the folder a LoRA's path input offers
MODEL_KINDS, PICTURE_KINDS = (MODEL, CORE_MODEL), (IMAGE, LATENT)  # the link types a model / picture follows
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


@dataclass
class Drawing:
    """What a sampler node says of the images it drew, before the model's files are looked at."""

    prompt: str
    negative_prompt: str
    settings: dict[str, Any]  # A1111's keys, in its order, up to the seed
    model: BoundNode | None  # the node whose model the sampler denoised with
    extra: dict[str, Any] = field(default_factory=dict)  # A1111's keys after the model's (denoise, clip skip)
    guidance: float | None = None  # the distilled guidance it was given (Sample's input, FluxGuidance's)
    guidance_set: bool = False  # set on purpose (FluxGuidance): written unless the base's family ignores it
    clip: BoundNode | None = None  # the node whose CLIP encoded the prompt (ComfyUI's graphs)
    size: tuple[int, int] | None = None  # (width, height) from the inputs, where no image was made yet


def _compute(path: Path, compute: Callable[[Path], str]) -> str:
    return compute(path)


def parameters_chunk(bound: Mapping[str, BoundNode], save_id: str, outputs: Mapping[str, tuple[Any, ...]],
                     hashed: Hasher = _compute) -> dict[str, str]:
    """``{"parameters": text}`` for the PNGs the node ``save_id`` writes, or nothing where its images
    were not drawn by a sampler whose graph is traced (see the module). ``outputs`` (node id -> its
    outputs, as run) gives the images' size; ``hashed`` computes the file hashes (the engine's keeps
    each one per file version)."""
    link = _link(bound[save_id], (IMAGE,))
    sampler = _drawing(bound, bound[save_id])
    drawing = _described(bound, sampler) if sampler is not None else None
    if drawing is None:
        return {}
    fields = dict(drawing.settings)
    base, loras = model_sources(bound, drawing.model) if drawing.model is not None else (None, [])
    if drawing.clip is not None:  # a LoRA on the prompts' text encoders alone also changes the picture
        loras = list(dict.fromkeys(loras + _clip_lora_files(bound, drawing.clip)))
    if drawing.guidance is not None and _guidance_counts(base, drawing.guidance_set):
        fields["Guidance"] = _number(drawing.guidance)
    size = _image_size(outputs, link) or drawing.size
    if size:
        fields["Size"] = f"{size[0]}x{size[1]}"
    if base is not None:
        fields.update(model_fields(_base_file(base) or "", hashed))
    fields.update(drawing.extra)
    if loras:
        hashes = {Path(path).stem: lora_hash(Path(path), hashed)[:LORA_HASH_DIGITS] for path in loras}
        fields["Lora hashes"] = ", ".join(f"{name}: {digest}" for name, digest in hashes.items())
    fields = {key: value for key, value in fields.items() if value is not None}
    return {PARAMETERS_KEY: parameters_text(drawing.prompt, drawing.negative_prompt, fields)}


def a1111_sampler(name: Any) -> Any:
    """A1111's name of ComfyUI's (and our) sampler ``name``: ``euler_ancestral`` is ``Euler a``."""
    return A1111_SAMPLERS.get(name, name)


def a1111_schedule(name: Any) -> Any:
    """A1111's schedule type for ComfyUI's scheduler ``name`` (``karras`` is ``Karras``); none chosen,
    or our Sample's ``default`` (the base's own schedule), is A1111's ``Automatic``."""
    if not name or name == DEFAULT_SCHEDULER:
        return AUTOMATIC
    return A1111_SCHEDULERS.get(name, name)


def model_sources(bound: Mapping[str, BoundNode], node: BoundNode) -> tuple[BoundNode | None, list[str]]:
    """The node that loads the base behind ``node``'s model input, and the LoRA files applied on the
    way to it, in the order applied (without repeats)."""
    files: list[str] = []
    current = _linked(bound, node, MODEL_KINDS)
    seen: set[str] = set()
    while current is not None and current.id not in seen and _base_file(current) is None:
        seen.add(current.id)
        files = _lora_files(bound, current, "strength_model") + files
        current = _linked(bound, current, MODEL_KINDS)
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


def lora_hash(path: Path, hashed: Hasher = _compute) -> str:
    """A LoRA file's hash as A1111 takes it: its ``sshs_model_hash`` metadata, else the sha256 of
    its tensor data (a ``.safetensors`` file) or of the whole file (others). ``hashed`` computes
    them: the engine's is the one its file fingerprints hash with, so a LoRA's data is hashed once
    for both."""
    if path.suffix.lower() != ".safetensors":
        return hashed(path, file_sha256)
    return hashed(path, _stored_lora_hash) or hashed(path, tensor_data_sha256)


def _stored_lora_hash(path: Path) -> str:
    """The ``sshs_model_hash`` a ``.safetensors`` LoRA's metadata holds ("" without one), through
    ``hashed`` like the hashes: its header is read once per file version, not once per image."""
    return read_header(path).metadata.get("sshs_model_hash", "")


# --------------------------------------------------------------------------- from the images to a sampler


def _drawing(bound: Mapping[str, BoundNode], node: BoundNode | None) -> BoundNode | None:
    """The sampler node that drew the images ``node`` is given, following image and latent links
    upstream (VAEDecode, latent upscalers); None where a node on the way takes pictures from two
    places, or no sampler drew them."""
    seen: set[str] = set()
    while node is not None and node.id not in seen:
        seen.add(node.id)
        if node.spec.id in SAMPLE_TYPES or node.spec.id in (KSAMPLER, KSAMPLER_ADVANCED):
            return node
        if len(_links(node, PICTURE_KINDS)) > 1:
            return None
        node = _linked(bound, node, PICTURE_KINDS)
    return None


def _described(bound: Mapping[str, BoundNode], sampler: BoundNode) -> Drawing | None:
    if sampler.spec.id in SAMPLE_TYPES:
        return _our_sample(bound, sampler)
    return _ksampler(bound, sampler)


def _our_sample(bound: Mapping[str, BoundNode], sample: BoundNode) -> Drawing:
    """Our Sample node: every setting is one of its inputs."""
    values = sample.literals
    settings = {"Steps": values.get("steps"), "Sampler": a1111_sampler(values.get("sampler")),
                "Schedule type": a1111_schedule(values.get("scheduler")), "CFG scale": _number(values.get("cfg")),
                "Seed": values.get("seed")}  # the node's: one generator draws the whole batch
    extra = {}
    if "image" in sample.links and values.get("denoise", 1.0) < 1:
        extra["Denoising strength"] = _number(values["denoise"])
    if values.get("clip_skip", 1) > 1:
        extra["Clip skip"] = values["clip_skip"]
    width, height = values.get("width"), values.get("height")
    return Drawing(str(values.get("prompt") or ""), str(values.get("negative_prompt") or ""), settings, sample,
                   extra, guidance=values.get("guidance"), size=(width, height) if width and height else None)


def _ksampler(bound: Mapping[str, BoundNode], sampler: BoundNode) -> Drawing | None:
    """ComfyUI's KSampler, or a KSamplerAdvanced that runs the whole schedule (one that starts late,
    stops early or adds no noise shares the picture with another sampler: not described)."""
    values = sampler.literals
    if sampler.spec.id == KSAMPLER_ADVANCED:
        whole = (values.get("add_noise") == "enable" and values.get("start_at_step") == 0
                 and values.get("end_at_step", 0) >= values.get("steps", 0))
        if not whole:
            return None
    positive = _prompt(bound, sampler, "positive")
    negative = _prompt(bound, sampler, "negative")
    if positive is None or negative is None:
        return None
    settings = {"Steps": values.get("steps"), "Sampler": a1111_sampler(values.get("sampler_name")),
                "Schedule type": a1111_schedule(values.get("scheduler")), "CFG scale": _number(values.get("cfg")),
                "Seed": values.get("seed", values.get("noise_seed"))}
    extra = {}
    if values.get("denoise", 1.0) < 1:
        extra["Denoising strength"] = _number(values["denoise"])
    encoder = positive.encoder
    clip_skip = _clip_skip(bound, encoder)
    if clip_skip > 1:
        extra["Clip skip"] = clip_skip
    return Drawing(positive.text, negative.text, settings, sampler, extra, guidance=positive.guidance,
                   guidance_set=True, clip=encoder, size=_empty_latent_size(bound, sampler))


@dataclass
class _Prompt:
    text: str
    encoder: BoundNode  # the node that encoded it (its CLIP input leads to the text encoders)
    guidance: float | None  # the distilled guidance set on it, nearest the sampler first


def _prompt(bound: Mapping[str, BoundNode], sampler: BoundNode, input_name: str) -> _Prompt | None:
    """The prompt behind a sampler's conditioning input, through FluxGuidance and whole-schedule timestep
    ranges; None for anything else on the way (combined or timed conditioning, nodes we do not know)."""
    link = sampler.links.get(input_name)
    node = bound.get(link[0]) if link is not None else None
    guidance = None
    seen: set[str] = set()
    while node is not None and node.id not in seen:
        seen.add(node.id)
        kind = node.spec.id
        if kind in PROMPT_TYPES:
            return _Prompt(str(node.literals.get(PROMPT_TYPES[kind]) or ""), node, guidance)
        if kind in GUIDANCE_TYPES:
            guidance = node.literals.get(GUIDANCE_TYPES[kind]) if guidance is None else guidance
        elif kind in TIME_RANGE_TYPES:
            if (node.literals.get("start"), node.literals.get("end")) != (0, 1):
                return None
        else:
            return None
        node = _linked(bound, node, (CONDITIONING,))
    return None


def _clip_skip(bound: Mapping[str, BoundNode], encoder: BoundNode) -> int:
    """A1111's clip skip of the CLIP an encoder reads with: its nearest CLIPSetLastLayer's -layer, else 1."""
    node = _linked(bound, encoder, (CLIP,))
    seen: set[str] = set()
    while node is not None and node.id not in seen:
        seen.add(node.id)
        if node.spec.id in LAST_LAYER_TYPES:
            return -int(node.literals.get(LAST_LAYER_TYPES[node.spec.id], -1))
        node = _linked(bound, node, (CLIP,))
    return 1


def _clip_lora_files(bound: Mapping[str, BoundNode], encoder: BoundNode) -> list[str]:
    """The LoRA files on the text encoders an encoder reads with (a non-zero CLIP strength), in order."""
    files: list[str] = []
    node = _linked(bound, encoder, (CLIP,))
    seen: set[str] = set()
    while node is not None and node.id not in seen:
        seen.add(node.id)
        files = _lora_files(bound, node, "strength_clip") + files
        node = _linked(bound, node, (CLIP,))
    return files


def _empty_latent_size(bound: Mapping[str, BoundNode], sampler: BoundNode) -> tuple[int, int] | None:
    """(width, height) of the empty latent a sampler starts from, when it is linked straight to one."""
    node = _linked(bound, sampler, (LATENT,))
    if node is None or node.links:
        return None
    width, height = (node.literals.get(name) for name in EMPTY_LATENT_SIZE)
    return (width, height) if width and height else None


# --------------------------------------------------------------------------- links and files


def _links(node: BoundNode, kinds: tuple[str, ...]) -> list[tuple[str, int]]:
    """(upstream node id, output index) of each of ``node``'s linked inputs of a type in ``kinds``."""
    return [node.links[d.name] for d in node.spec.inputs if d.type in kinds and d.name in node.links]


def _link(node: BoundNode, kinds: tuple[str, ...]) -> tuple[str, int] | None:
    """(upstream node id, output index) of ``node``'s first linked input of a type in ``kinds``, or None."""
    return next(iter(_links(node, kinds)), None)


def _linked(bound: Mapping[str, BoundNode], node: BoundNode, kinds: tuple[str, ...]) -> BoundNode | None:
    """The node linked to ``node``'s first linked input of a type in ``kinds``, or None."""
    link = _link(node, kinds)
    return bound.get(link[0]) if link is not None else None


def _file_input(node: BoundNode, folders: tuple[str, ...]) -> str | None:
    """The value of ``node``'s path input offered from one of the models folders ``folders``, or None."""
    for decl in node.spec.inputs:
        if decl.path and decl.folder in folders and isinstance(node.literals.get(decl.name), str):
            return node.literals[decl.name]
    return None


def _base_file(node: BoundNode) -> str | None:
    return _file_input(node, BASE_FOLDERS)


def _lora_files(bound: Mapping[str, BoundNode], node: BoundNode, strength: str) -> list[str]:
    """The LoRA files ``node`` applies or collects, in order: an incoming stack's first, then its own
    LoRA inputs, then a LoRA file it loads itself (ComfyUI's LoraLoader) where its ``strength`` (the
    model's or the CLIP's) is not 0; a slot switched off, or with every strength 0, is left out (it
    draws nothing)."""
    stacked: list[str] = []
    own: list[str] = []
    for decl in node.spec.inputs:
        link = node.links.get(decl.name)
        if link is None or link[0] not in bound:
            continue
        upstream = bound[link[0]]
        if decl.type == LORA_STACK:
            stacked += _lora_files(bound, upstream, strength)
        elif decl.type == LORA and _slot_on(node, decl.name):
            path = _file_input(upstream, (LORA_FOLDER,))
            own += [path] if path else []
    loaded = _file_input(node, (LORA_FOLDER,))
    if loaded and node.literals.get(strength, 0) != 0:
        own.append(loaded)
    return stacked + own


def _slot_on(node: BoundNode, lora_input: str) -> bool:
    """Whether the LoRA input ``lora_input`` counts: its ``enabled`` switch (``enabled_1`` for
    ``lora_1``) on, and a strength (``strength_model``/``strength_text`` with the same ending) not 0."""
    ending = lora_input[len("lora"):]
    values = node.literals
    strengths = [values.get(f"{kind}{ending}", 1.0) for kind in ("strength_model", "strength_text")]
    return values.get(f"enabled{ending}", True) is not False and any(s != 0 for s in strengths)


def _family(base: BoundNode | None) -> families.Family | None:
    """The family of the base a node loads (read from file headers by its preflight), where it tells."""
    if base is None or base.spec.preflight is None:
        return None
    return families.by_id(base.spec.preflight(base.literals, {}).facts.get("family"))


def _guidance_counts(base: BoundNode | None, set_on_purpose: bool) -> bool:
    """Whether the guidance given is written: the base's family is guidance-distilled, or (guidance set
    on purpose, by FluxGuidance) its family is not told by the graph (a denoiser loaded alone)."""
    family = _family(base)
    return family.guidance_distilled if family is not None else set_on_purpose


def _image_size(outputs: Mapping[str, tuple[Any, ...]], link: tuple[str, int] | None) -> tuple[int, int] | None:
    """(width, height) of the images saved ([batch, height, width, 3]), once they are made."""
    value = outputs.get(link[0], ()) if link is not None else ()
    shape = getattr(value[link[1]], "shape", None) if link is not None and link[1] < len(value) else None
    if shape is not None and len(shape) == 4:
        return int(shape[2]), int(shape[1])
    return None


def _number(value: Any) -> Any:
    """A float as A1111 shows a setting: ``7`` for 7.0, ``7.5`` for 7.5."""
    return int(value) if isinstance(value, float) and value.is_integer() else value
