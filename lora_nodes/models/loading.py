"""Loading base models: built-ins, diffusers folders and single-file checkpoints, all offline."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

from .. import families, tensorfiles
from ..errors import ModelLoadError
from ..families import Family, TextEncoder
from . import known_configs
from .base import BaseModel
from .builtin import BUILTINS, builtin_family
from .checkpoints import (
    cast_floats,
    checkpoint_layout,
    component_from_file,
    component_keys,
    config_parts,
    dequantize,
    expected_parts,
)
from .ldm import unet_from_ldm
from .text_names import state_dict_for
from .tokenizer import build_t5_tokenizer, build_tokenizer, tokenizer_for, tokenizer_from_files

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
TOKENIZER_FILES = ("vocab.json", "merges.txt")  # or one tokenizer.json (what transformers 5 writes)


def pick_device(device: str = "auto") -> torch.device:
    """``auto`` is CUDA when there is a GPU, else Apple's MPS, else the CPU.

    Under ``accelerate launch`` / torchrun each process takes its own GPU (``LOCAL_RANK``).
    """
    if device != "auto":
        return torch.device(device)
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def pick_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """``auto`` is float16 on a GPU and float32 on the CPU (where half precision is slow)."""
    if dtype == "auto":
        return torch.float32 if device.type == "cpu" else torch.float16
    return DTYPES[dtype]


def load_base(source: str, dtype: str = "auto", device: str = "auto", config: str = "",
              component_files: Mapping[str, str] | None = None) -> BaseModel:
    """Load a base model from ``builtin:NAME``, a diffusers folder or a single ``.safetensors`` file.

    ``component_files`` (with a single file only) maps a component (``vae``, ``text_encoder``,
    ``text_encoder_2``) to a file that holds it alone, as ComfyUI's VAE and CLIP loaders take them;
    it replaces what the checkpoint or the config folder would give.
    """
    target_device = pick_device(device)
    target_dtype = pick_dtype(dtype, target_device)
    files = {name: Path(file) for name, file in (component_files or {}).items() if file}
    if files and (source in BUILTINS or not Path(source).is_file()):
        raise ModelLoadError(f"{', '.join(files)}: files of their own go with a single-file checkpoint, "
                                 f"not with {source}")
    if source in BUILTINS:
        components = BUILTINS[source]()
    elif Path(source).is_dir():
        components = _load_diffusers_folder(Path(source))
    elif Path(source).is_file():
        components = _load_single_file(Path(source), Path(config) if config else None, target_dtype, files)
    else:
        raise ModelLoadError(f"no base model at '{source}' (give builtin:NAME, a diffusers folder or a .safetensors file)")
    for part in components.values():
        if isinstance(part, torch.nn.Module):
            _place(part, target_device, target_dtype)
    return BaseModel(source, components, target_dtype, target_device)


def _place(model: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> None:
    model.eval().requires_grad_(False)
    if model.dtype != dtype:
        model.to(dtype=dtype)
    if model.device != device:
        model.to(device=device)


def missing_pipeline_files(folder: Path, family: Family | None = None, parts: Sequence[str] | None = None) -> list[str]:
    """The files a diffusers pipeline folder of ``family`` (default: the one its layout says) lacks:
    ``model_index.json``, the configs of ``parts`` (default: every model part), the scheduler's
    config and the tokenizers' files."""
    family = families.with_pipeline_layout_of(folder) if family is None else family
    needed = ["model_index.json", *(f"{part}/config.json" for part in (family.model_parts if parts is None else parts)),
              "scheduler/scheduler_config.json"]
    for text in family.text_encoders:
        if not (folder / text.tokenizer / "tokenizer.json").is_file():
            needed += [f"{text.tokenizer}/{name}" for name in _tokenizer_kind(text.model_class).files]
    return [name for name in needed if not (folder / name).is_file()]


def _folder_problem(folder: Path, family: Family) -> str | None:
    """Why ``folder`` is not a diffusers pipeline folder we can load, or None."""
    missing = missing_pipeline_files(folder, family)
    if not missing:
        return None
    what = "a diffusers pipeline folder (it has no model_index.json)" if "model_index.json" in missing else \
        "a complete diffusers pipeline folder"
    return (f"{folder} is not {what}: missing {', '.join(missing)}. Copy them from the model's original "
            "repository (they are small), or pass a single-file checkpoint with config: set to a folder that has them.")


def _load_diffusers_folder(folder: Path) -> dict[str, Any]:
    family = families.with_pipeline_layout_of(folder)
    problem = _folder_problem(folder, family)
    if problem:
        raise ModelLoadError(problem)
    pipe = family.load_pipeline(folder)
    return {part: getattr(pipe, part) for part in family.pipeline_parts}


# --------------------------------------------------------------------------- single files


def _read_model_file(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """A ``.safetensors`` model file's tensors (ComfyUI's scaled fp8 multiplied out) and metadata."""
    if path.suffix.lower() != ".safetensors":
        raise ModelLoadError(_NOT_SAFETENSORS.format(name=path.name))
    # a damaged file is named as such here too: inside ComfyUI no validation ran before
    try:
        state, metadata = tensorfiles.read_tensors(path)
    except tensorfiles.UnreadableTensorFile as exc:
        raise ModelLoadError(str(exc)) from exc
    return dequantize(state), metadata


def _load_single_file(path: Path, config: Path | None, dtype: torch.dtype,
                      files: Mapping[str, Path]) -> dict[str, Any]:
    """A single-file checkpoint, with configs and tokenizers from a diffusers folder or its metadata,
    and the components it lacks from files of their own or from the folder's weights."""
    state, metadata = _read_model_file(path)
    try:
        family = families.from_checkpoint({key: tensor.shape for key, tensor in state.items()})
        layout = checkpoint_layout(family)
    except ValueError as exc:
        raise ModelLoadError(f"{path.name} is not a model checkpoint we can read: {exc}") from exc
    embedded = metadata.get(EMBEDDED_CONFIG_KEY)
    held = layout.parts_in(list(state), family)
    if embedded and config is None:
        configs = json.loads(embedded)
    elif config is None and layout.configs_from_tensors is not None:
        configs = _configs_from_tensors(path, state, family, layout.configs_from_tensors)
    else:
        configs = _configs_from_folder(path, config, family, held)
    try:
        configs, parts = layout.read(state, family, configs)
    except (ValueError, KeyError) as exc:
        raise ModelLoadError(f"{path.name} does not fit the configs in {config or 'its metadata'}: {exc}") from exc
    del state  # the parts hold what is needed of it
    for name, file in files.items():
        parts[name] = _component_file(name, file, family, configs)
    components = {}
    for name in family.model_parts:
        if name in parts:
            source = files.get(name, path)  # the file the weights came from, for messages
            components[name] = _model_from_state(family, name, configs[name], parts.pop(name), dtype, source)
        elif config is not None and _has_weights(config / name):
            components[name] = _model_from_folder(family, name, config / name, dtype)
        else:
            raise ModelLoadError(_lacks_part(path.name, name, config))
    return {**components, **_tokenizers_and_scheduler(configs, config, family)}


def _configs_from_tensors(path: Path, state: Mapping[str, torch.Tensor], family: Family,
                          reader: Callable[[Mapping[str, torch.Tensor], Family], dict[str, Any]]) -> dict[str, Any]:
    try:
        return reader(state, family)
    except (ValueError, KeyError) as exc:
        raise ModelLoadError(f"{path.name}: its model parts cannot be read from its tensors ({exc}); set LoadBase's "
                             "'config' input to a diffusers folder of the same model") from exc


def _lacks_part(name: str, part: str, config: Path | None) -> str:
    where = f"the config folder {config} has no {part} weights" if config is not None else "no config folder is set"
    return (f"{name} holds no {part} and {where}: set LoadBase's '{part}' input to a file that holds it, or "
            f"'config' to a diffusers folder with its weights")


def _component_file(name: str, file: Path, family: Family, configs: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    if name not in expected_parts(family):
        raise ModelLoadError(f"{file.name}: a {family.display_name} base has no {name} that a file could replace")
    state, _ = _read_model_file(file)
    try:
        return component_from_file(state, name, family, configs)
    except (ValueError, KeyError) as exc:
        raise ModelLoadError(f"{file.name} does not hold a {name} for this base: {exc}") from exc


def _has_weights(folder: Path) -> bool:
    return folder.is_dir() and any(folder.glob("*.safetensors"))


EMBEDDED_CONFIG_KEY = "lora_nodes_configs"  # single files we write carry their configs (JSON)
_NOT_SAFETENSORS = ("{name}: single-file checkpoints are read from .safetensors only "
                    "(pickle .ckpt files can run code when loaded; convert them first)")


def _configs_from_folder(path: Path, config: Path | None, family: Family, held: Sequence[str]) -> dict[str, Any]:
    """The configs for a single file holding the parts ``held``, from a config folder (which must be set)."""
    kind = families.layout_name(family)
    needed = config_parts(family)
    if config is None:
        weights = "weights not needed" if set(held) >= set(needed) else \
            "with the weights of the parts the file lacks, or give those parts as files of their own"
        raise ModelLoadError(
            f"{path.name} is a single-file checkpoint, which holds weights but no configs or tokenizer, and "
            f"nothing is downloaded. Set LoadBase's 'config' input to {kind} diffusers folder of the same "
            f"model family that has {', '.join(missing_pipeline_files(Path('/nonexistent'), family, needed)[1:])} "
            f"({weights})."
        )
    missing = [m for m in missing_pipeline_files(config, family, needed) if m != "model_index.json"]
    if missing:
        raise ModelLoadError(f"config folder {config} lacks {', '.join(missing)}")
    configs = {part: json.loads((config / part / "config.json").read_text()) for part in family.model_parts
               if (config / part / "config.json").is_file()}
    configs["scheduler"] = json.loads((config / "scheduler" / "scheduler_config.json").read_text())
    return configs


def _model_class(family: Family, name: str) -> Any:
    import diffusers  # deferred: diffusers and transformers take seconds to import
    import transformers

    if name == family.denoiser:
        return getattr(diffusers, family.denoiser_class)
    if name == family.vae:
        return getattr(diffusers, family.vae_class)
    return getattr(transformers, family.text_encoder(name).model_class)


def _empty_model(family: Family, name: str, config: Mapping[str, Any]) -> torch.nn.Module:
    """Component ``name`` from its config, its parameters not allocated (the weights are assigned
    next): a full-size transformer would otherwise be initialised at random first, for minutes."""
    try:
        from accelerate import init_empty_weights  # diffusers' and peft's own way; buffers stay real
    except ImportError:  # pragma: no cover - accelerate comes with peft
        from contextlib import nullcontext as init_empty_weights
    cls = _model_class(family, name)
    with init_empty_weights():
        if name in family.text_components:  # a transformers model: built from its config class
            return cls(cls.config_class(**_text_config(config)))
        return cls.from_config(config)


def _text_config(config: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in config.items() if not k.startswith("_") and k not in ("architectures", "model_type")}


# weights some text-encoder files carry that the model has no place for: buffers, CLIP's contrastive
# head, the tokenizer ComfyUI keeps in some T5 files
_TOLERATED_EXTRAS = ("position_ids", "logit_scale", "text_projection.weight", "spiece_model")
_TEXT_LAYER = re.compile(r"(?:text_model\.)?encoder\.layers\.(\d+)\.")


def _model_from_state(family: Family, name: str, config: Mapping[str, Any], state: dict[str, torch.Tensor],
                      dtype: torch.dtype, path: Path) -> torch.nn.Module:
    """Component ``name`` built from its config and given ``state`` (cast to ``dtype``), exactly:
    a missing or unexpected weight is an error (text encoders' leftovers aside, see above)."""
    model = _empty_model(family, name, config)
    expected = model.state_dict()
    state = cast_floats(state_dict_for(model, state), dtype)
    if name in family.text_components:
        state = _text_state(model, state, expected)
    result = model.load_state_dict(state, strict=False, assign=True)
    missing = [k for k in result.missing_keys if not k.endswith("position_ids")]
    if missing or result.unexpected_keys:
        raise ModelLoadError(f"{path.name}: the {name} weights do not match its config "
                             f"(missing {missing[:3]}, unexpected {result.unexpected_keys[:3]})")
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    return model


def _text_state(model: torch.nn.Module, state: dict[str, torch.Tensor],
                expected: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """A text encoder's weights without leftovers its model has no place for (SD2's last OpenCLIP
    layer, CLIP's projection), and with tied weights (T5's embeddings) given under both names."""
    layers = getattr(model.config, "num_hidden_layers", None)
    kept = {}
    for key, value in state.items():
        layer = _TEXT_LAYER.match(key)
        extra = key.endswith(_TOLERATED_EXTRAS) or (layers is not None and layer and int(layer.group(1)) >= layers)
        if key in expected or not extra:
            kept[key] = value
    tied = getattr(model, "_tied_weights_keys", None)
    if isinstance(tied, Mapping):  # transformers 5: {tied name: source name}
        for target, source in tied.items():
            if target not in kept and source in kept:
                kept[target] = kept[source]
            elif source not in kept and target in kept:
                kept[source] = kept[target]
    return kept


def _model_from_folder(family: Family, name: str, folder: Path, dtype: torch.dtype) -> torch.nn.Module:
    try:
        return _model_class(family, name).from_pretrained(folder, local_files_only=True, torch_dtype=dtype)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{folder}: its {name} weights do not load: {exc}") from exc


@dataclass(frozen=True)
class _TokenizerKind:
    class_name: str  # its transformers class
    files: tuple[str, ...]  # the files it reads where a folder has no tokenizer.json
    builtin: Callable[[], Any]  # ours, for built-in bases


_TOKENIZERS = {
    "CLIPTextModel": _TokenizerKind("CLIPTokenizer", TOKENIZER_FILES, build_tokenizer),
    "CLIPTextModelWithProjection": _TokenizerKind("CLIPTokenizer", TOKENIZER_FILES, build_tokenizer),
    "T5EncoderModel": _TokenizerKind("T5TokenizerFast", ("spiece.model",), build_t5_tokenizer),
}


def _tokenizer_kind(model_class: str) -> _TokenizerKind:
    return _TOKENIZERS.get(model_class, _TOKENIZERS["CLIPTextModel"])


def _tokenizers_and_scheduler(configs: dict[str, Any], folder: Path | None, family: Family) -> dict[str, Any]:
    import diffusers  # deferred: diffusers and transformers take seconds to import
    import transformers

    embedded = configs.get("tokenizer")
    parts: dict[str, Any] = {}
    for text in family.text_encoders:
        kind = _tokenizer_kind(text.model_class)
        tokenizer_class = getattr(transformers, kind.class_name)
        if folder is not None:
            parts[text.tokenizer] = tokenizer_class.from_pretrained(folder / text.tokenizer)
        elif embedded == "builtin":
            parts[text.tokenizer] = kind.builtin()
        elif isinstance(embedded, dict) and text.tokenizer in embedded:
            # files SaveModel embedded: {part: {file name: text}}
            parts[text.tokenizer] = tokenizer_from_files(embedded[text.tokenizer], tokenizer_class)
        else:
            parts[text.tokenizer] = _tokenizer_by_vocabulary(text, configs.get(text.component))
    scheduler_class = getattr(diffusers, configs["scheduler"].get("_class_name", "DDIMScheduler"))
    parts["scheduler"] = scheduler_class.from_config(configs["scheduler"])
    return parts


def _tokenizer_by_vocabulary(text: TextEncoder, config: Mapping[str, Any] | None) -> Any:
    """The tokenizer a text encoder's vocabulary size tells (see :func:`.tokenizer.tokenizer_for`)."""
    vocab_size = int((config or {}).get("vocab_size", 0))
    tokenizer = tokenizer_for(text.model_class, vocab_size, text.pad_token) if vocab_size else None
    if tokenizer is None:
        raise ModelLoadError(
            f"no tokenizer is known for a {text.model_class} with {vocab_size} tokens ({text.component}): "
            f"give a diffusers folder with its {text.tokenizer} as config, or a file that carries its tokenizer")
    return tokenizer


# --------------------------------------------------------------------------- before loading


# (input, kind, message): kind "bad" (the input names something unusable) or "missing" (it must be set)
Problem = tuple[str, str, str]


def base_family(source: str, config: str = "",
                component_files: Mapping[str, str] | None = None) -> tuple[Family | None, list[Problem]]:
    """A base's family without loading it, and what would stop it loading.

    Built-ins by their configs, a diffusers folder by its denoiser's ``config.json``, a single file
    by its ``.safetensors`` header (keys and shapes; no weights read), and the files given for its
    components (see :func:`load_base`) by theirs. Problems are ``(input, kind, message)``, see
    :data:`Problem`; a source that does not exist gives neither (the path check reports it).
    Never raises.
    """
    files = {name: file for name, file in (component_files or {}).items() if file}
    path = Path(source)
    try:
        if source in BUILTINS or path.is_dir():
            family, problems = (builtin_family(source), []) if source in BUILTINS else _folder_family(path)
            message = f"files of their own go with a single-file checkpoint, not with {source}"
            return family, problems + [(name, "bad", message) for name in files]
        if path.is_file():
            stat = path.stat()
            family, problems, held, embedded = _single_file_header(str(path), stat.st_size, stat.st_mtime_ns)
            if family is None or problems:
                return family, list(problems)
            return family, _single_file_problems(path.name, family, held, embedded, config, files)
    except Exception as exc:  # noqa: BLE001 - a check that cannot decide must not stop validation
        return None, [("source", "bad", f"{path.name}: {exc}")]
    return None, []


def _folder_family(folder: Path) -> tuple[Family | None, list[Problem]]:
    layout = families.with_pipeline_layout_of(folder)
    problem = _folder_problem(folder, layout)
    if problem:
        return None, [("source", "bad", problem)]
    config_file = folder / layout.denoiser / "config.json"
    try:
        config = json.loads(config_file.read_text())
    except (OSError, ValueError) as exc:
        return None, [("source", "bad", f"{config_file} is not readable JSON: {exc}")]
    if not isinstance(config, dict):
        return None, [("source", "bad", f"{config_file} is not a {layout.denoiser} config")]
    return families.from_unet_config(config), []


@lru_cache(maxsize=64)
def _single_file_header(path: str, size: int, mtime_ns: int) -> tuple[Family | None, tuple[Problem, ...],
                                                                         tuple[str, ...], str | None]:
    """A single-file checkpoint's family, what is wrong with it, the model parts it holds and its
    embedded configs, from its header; cached while the file is unchanged."""
    name = Path(path).name
    if not path.lower().endswith(".safetensors"):
        return None, (("source", "bad", _NOT_SAFETENSORS.format(name=name)),), (), None
    try:
        header = tensorfiles.read_header(path)
    except tensorfiles.UnreadableTensorFile as exc:
        return None, (("source", "bad", str(exc)),), (), None
    try:
        family = families.from_checkpoint(header.shapes)
        held = checkpoint_layout(family).parts_in(list(header.shapes), family)
    except ValueError as exc:
        return None, (("source", "bad", f"{name} is not a model checkpoint we can read: {exc}"),), (), None
    embedded = header.metadata.get(EMBEDDED_CONFIG_KEY)
    if embedded:
        try:
            family = families.from_unet_config(json.loads(embedded)[family.denoiser])
        except (ValueError, KeyError, TypeError, StopIteration):
            message = f"{name}: its embedded configs ({EMBEDDED_CONFIG_KEY}) are not readable JSON"
            return family, (("source", "bad", message),), held, None
    return family, (), held, embedded


def _single_file_problems(name: str, family: Family, held: Sequence[str], embedded: str | None, config: str,
                          files: Mapping[str, str]) -> list[Problem]:
    """What a single file with these parts lacks that neither its config folder nor files give."""
    problems: list[Problem] = []
    needed = config_parts(family)
    if not config and not embedded and checkpoint_layout(family).configs_from_tensors is None:
        weights = "weights not needed" if set(held) >= set(needed) else "with weights for the parts it lacks"
        message = (f"{name} is a single-file checkpoint without configs or tokenizer: set config to "
                   f"{families.layout_name(family)} diffusers folder of the same model family ({weights})")
        problems.append(("config", "missing", message))
    elif config:
        missing = [m for m in missing_pipeline_files(Path(config), family, needed) if m != "model_index.json"]
        if missing:
            problems.append(("config", "missing", f"config folder {config} lacks {', '.join(missing)}"))
    for part, file in files.items():
        problem = _component_file_problem(part, file, family)
        if problem:
            problems.append((part, "bad", problem))
    for part in expected_parts(family):
        if part not in held and part not in files and not (config and _has_weights(Path(config) / part)):
            where = f"the config folder has no {part} weights" if config else "no config folder with weights is set"
            message = (f"{name} holds no {part} and {where}: set {part} to a file that holds it "
                       f"({_model_class_name(family, part)} weights), or config to a diffusers folder with its weights")
            problems.append((part, "missing", message))
    return problems


def _model_class_name(family: Family, part: str) -> str:
    return family.vae_class if part == family.vae else family.text_encoder(part).model_class


def _component_file_problem(part: str, file: str, family: Family) -> str | None:
    """Why ``file`` cannot give a base of ``family`` its ``part``, from the header, or None."""
    if part not in expected_parts(family):
        return f"a {family.display_name} base has no {part} that a file could give"
    path = Path(file)
    if not path.name.lower().endswith(".safetensors"):
        return _NOT_SAFETENSORS.format(name=path.name)
    try:
        keys = list(tensorfiles.read_header(path).shapes)
    except tensorfiles.UnreadableTensorFile as exc:
        return str(exc)
    if not keys:
        return f"{path.name} holds no tensors"
    if part == family.vae and not any("decoder." in key for key in keys):
        return f"{path.name} holds no VAE (no decoder weights)"
    return None


# --------------------------------------------------------------------------- parts of a base (ComfyUI's loaders)

PART_FILES = ("denoiser", "text_encoder", "text_encoder_2", "vae")  # the keys load_parts takes
_T5_MARKER = "encoder.block."  # a T5 encoder's keys; CLIP's are ``text_model.`` (or bare ``encoder.layers.``)


def load_parts(files: Mapping[str, str | Path], family_hint: str | None = None, dtype: str = "auto",
               device: str = "auto") -> BaseModel:
    """A base holding only the components given, each from a file of its own, as ComfyUI's
    UNETLoader (``denoiser``: a UNet in LDM names, bare or prefixed, or a BFL transformer),
    CLIPLoader / DualCLIPLoader (``text_encoder``, ``text_encoder_2``; their tokenizers come with
    them, told by the vocabulary) and VAELoader (``vae``) load them. No config folder: configs
    come from the tensors (see :mod:`.known_configs`) or from our files' embedded configs.

    The family is the denoiser's, else ``family_hint`` as ComfyUI's CLIP loaders' ``type`` names
    it (``Family.comfy_clip_types``) or a family id. Two text encoder files are put in the
    family's order whichever key they come under (DualCLIPLoader's order is free).
    """
    unknown = sorted(set(files) - set(PART_FILES))
    if unknown:
        raise ModelLoadError(f"load_parts takes {', '.join(PART_FILES)}, not {', '.join(unknown)}")
    paths = {key: Path(file) for key, file in files.items() if file}
    if not paths:
        raise ModelLoadError("no model file given")
    for path in paths.values():
        if not path.is_file():
            raise ModelLoadError(f"no model file at '{path}'")
    target_device = pick_device(device)
    target_dtype = pick_dtype(dtype, target_device)
    read = {key: _read_model_file(path) for key, path in paths.items()}
    family = _parts_family(read, family_hint)
    components: dict[str, Any] = {}
    configs: dict[str, Any] = {}
    builtin = None
    texts = _text_files(family, {k: v for k, v in read.items() if k.startswith("text_encoder")}, paths)
    for component, (state, metadata, path) in texts.items():
        part = component_from_file(state, component, family, {})
        config = _embedded(metadata, component) or _config_of(family, component, part, path)[0]
        components[component] = _model_from_state(family, component, config, part, target_dtype, path)
        configs[component] = config
    if "denoiser" in read:
        state, metadata = read["denoiser"]
        pooled = configs.get(family.text_components[-1], {}).get("projection_dim") if family.pooled_text_conditioning \
            else None
        config, weights, builtin = _denoiser_part(family, state, metadata, paths["denoiser"], pooled)
        components[family.denoiser] = _model_from_state(family, family.denoiser, config, weights, target_dtype,
                                                        paths["denoiser"])
        configs[family.denoiser] = config
    if "vae" in read:
        state, metadata = read["vae"]
        config = _embedded(metadata, family.vae) or \
            _config_of(family, family.vae, component_keys(state, family.vae, family), paths["vae"])[0]
        try:
            weights = component_from_file(state, family.vae, family, {family.vae: config})
        except (ValueError, KeyError) as exc:
            raise ModelLoadError(f"{paths['vae'].name} does not hold a VAE we can read: {exc}") from exc
        components[family.vae] = _model_from_state(family, family.vae, config, weights, target_dtype, paths["vae"])
    for text in family.text_encoders:
        if text.component in components:
            components[text.tokenizer] = _tokenizer_of(text, configs[text.component], texts[text.component])
    components["scheduler"] = _parts_scheduler(family, read.get("denoiser"), builtin)
    for part in components.values():
        if isinstance(part, torch.nn.Module):
            _place(part, target_device, target_dtype)
    source = str(paths.get("denoiser") or next(iter(paths.values())))
    return BaseModel(source, components, target_dtype, target_device,
                     meta={"family": family.id, "part_files": {k: str(v) for k, v in paths.items()}})


def _parts_family(read: Mapping[str, tuple[dict[str, torch.Tensor], dict[str, str]]], hint: str | None) -> Family:
    if "denoiser" in read:
        shapes = _denoiser_shapes(read["denoiser"][0])
        try:
            return families.from_checkpoint(shapes)
        except ValueError as exc:
            raise ModelLoadError(f"the denoiser file is no UNet or transformer we can read: {exc}") from exc
    text_shapes = {k: tuple(v.shape) for key, (state, _) in read.items() if key.startswith("text") for k, v in state.items()}
    family = families.by_comfy_clip_type(hint, text_shapes) if hint else None
    family = family or families.by_id(hint)
    if family is None and set(read) == {"vae"}:
        family = _vae_family(read["vae"][0])
    if family is None:
        types = sorted({name for f in families.FAMILIES for name in f.comfy_clip_types})
        raise ModelLoadError(f"which model these files are for cannot be told without the denoiser: give its "
                             f"type ({', '.join(types)})" + (f", not '{hint}'" if hint else ""))
    return family


def _vae_family(state: Mapping[str, torch.Tensor]) -> Family | None:
    """A family whose VAE takes as many latent channels as this VAE file's decoder (ComfyUI's VAELoader
    has no type). Families sharing a VAE layout decode raw latents alike, so the first that fits serves:
    the scaling that differs between them belongs to the model that samples (see models.sampling)."""
    channels = next((tensor.shape[1] for key, tensor in state.items()
                     if key.endswith("decoder.conv_in.weight") and tensor.ndim == 4), None)
    return next((family for family in families.FAMILIES
                 if known_configs.default_config(family, family.vae).get("latent_channels") == channels), None)


def _denoiser_shapes(state: Mapping[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    """A denoiser file's shapes as a full checkpoint names them: a bare LDM UNet gets its prefix."""
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    bare_unet = any(k.startswith(("input_blocks.", "middle_block.")) for k in shapes)
    return {_UNET_PREFIX + k: v for k, v in shapes.items()} if bare_unet else shapes


_UNET_PREFIX = "model.diffusion_model."  # the LDM UNet's place in a single file (the UNet families' prefix)


def _denoiser_part(family: Family, state: dict[str, torch.Tensor], metadata: Mapping[str, str], path: Path,
                   pooled: int | None) -> tuple[dict[str, Any], dict[str, torch.Tensor], str | None]:
    """The denoiser's config, its weights in diffusers names, and the built-in it is (or None)."""
    embedded = _embedded(metadata, family.denoiser)
    layout = checkpoint_layout(family)
    try:
        if layout.denoiser_config_in_tensors:  # a transformer: its config is in its tensors
            configs, parts = layout.read(state, family, {family.denoiser: embedded} if embedded else {})
            # what the tensors do not say (the RoPE axes) is a built-in's when the weights are one of ours
            found = None if embedded else known_configs.recognised(family, family.denoiser, configs[family.denoiser])
            if found is not None:
                return found[1][family.denoiser], parts[family.denoiser], found[0]
            return configs[family.denoiser], parts[family.denoiser], None
        prefix = family.denoiser_checkpoint_prefix
        unet = {k.removeprefix(prefix): v for k, v in state.items()}
        builtin = None
        if embedded is None:
            shapes = {k: tuple(v.shape) for k, v in unet.items()}
            embedded, builtin = known_configs.part_config(family, family.denoiser, shapes, pooled)
        return embedded, unet_from_ldm(unet, embedded), builtin
    except (ValueError, KeyError) as exc:
        raise ModelLoadError(f"{path.name} is not a {family.display_name} denoiser we can read: {exc}") from exc


def _embedded(metadata: Mapping[str, str], part: str) -> dict[str, Any] | None:
    """The config of ``part`` a file of ours embeds, if any."""
    embedded = metadata.get(EMBEDDED_CONFIG_KEY)
    if not embedded:
        return None
    try:
        config = json.loads(embedded).get(part)
    except (ValueError, AttributeError):
        return None
    return config if isinstance(config, dict) else None


def _config_of(family: Family, part: str, state: Mapping[str, torch.Tensor], path: Path) -> tuple[dict[str, Any], str | None]:
    try:
        return known_configs.part_config(family, part, {k: tuple(v.shape) for k, v in state.items()})
    except (ValueError, KeyError) as exc:
        raise ModelLoadError(f"{path.name} does not hold a {part} we can read: {exc}") from exc


def _text_files(family: Family, read: Mapping[str, tuple[dict[str, torch.Tensor], dict[str, str]]],
                paths: Mapping[str, Path]) -> dict[str, tuple[dict[str, torch.Tensor], dict[str, str], Path]]:
    """Text encoder files by the family's component each holds: a T5 goes to the family's T5, and
    of two CLIP encoders the narrower comes first (SDXL's CLIP-L before its wider OpenCLIP)."""
    given = [(key, *read[key], paths[key]) for key in sorted(read)]
    if len(given) > len(family.text_encoders):
        raise ModelLoadError(f"a {family.display_name} base has {len(family.text_encoders)} text encoder(s), "
                             f"{len(given)} files were given")
    if len(given) < 2:
        return {family.text_components[0]: given[0][1:]} if given else {}

    def order(item: tuple[Any, ...]) -> tuple[int, int]:
        state = item[1]
        width = next((int(v.shape[-1]) for k, v in state.items() if k.endswith("token_embedding.weight")), 0)
        return (1 if any(_T5_MARKER in k for k in state) else 0, width)

    kinds = [1 if family.text_encoder(c).model_class.startswith("T5") else 0 for c in family.text_components]
    ranked = sorted(given, key=order)
    if [order(item)[0] for item in ranked] != sorted(kinds):
        raise ModelLoadError(f"{', '.join(p.name for *_, p in given)}: not the text encoders a "
                             f"{family.display_name} base takes")
    return {component: item[1:] for component, item in zip(sorted(family.text_components,
                                                                  key=lambda c: kinds[family.text_components.index(c)]),
                                                           ranked)}


def _tokenizer_of(text: TextEncoder, config: Mapping[str, Any],
                  file: tuple[dict[str, torch.Tensor], dict[str, str], Path]) -> Any:
    _, metadata, path = file
    embedded = metadata.get(EMBEDDED_CONFIG_KEY)
    if embedded and json.loads(embedded).get("tokenizer") == "builtin":
        return _tokenizer_kind(text.model_class).builtin()
    try:
        return _tokenizer_by_vocabulary(text, config)
    except ModelLoadError as exc:
        raise ModelLoadError(f"{path.name}: {exc}") from exc


def _parts_scheduler(family: Family, denoiser: tuple[dict[str, torch.Tensor], dict[str, str]] | None,
                     builtin: str | None) -> Any:
    import diffusers  # deferred: diffusers takes seconds to import

    embedded = _embedded(denoiser[1], "scheduler") if denoiser else None
    if embedded is None:
        state = {_UNET_PREFIX + k if k.startswith(("input_blocks.", "output_blocks.")) else k: v
                 for k, v in (denoiser[0] if denoiser else {}).items()}
        schedule = known_configs.builtin_configs(builtin)["scheduler"] if builtin else None
        embedded = known_configs.scheduler_config(family, known_configs.objective_of(family, state),
                                                  known_configs.ZERO_SNR_MARKER in state, schedule)
    return getattr(diffusers, embedded.get("_class_name", "DDIMScheduler")).from_config(embedded)
