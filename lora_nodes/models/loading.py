"""Loading base models: built-ins, diffusers folders and single-file checkpoints, all offline."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import families, tensorfiles
from ..errors import ModelLoadError
from ..families import Family, TextEncoder
from .builtin import BUILTINS, builtin_family
from .tokenizer import build_t5_tokenizer, build_tokenizer, tokenizer_for, tokenizer_from_files

if TYPE_CHECKING:  # annotations only: validation imports this module, and must not import torch
    import torch

    from .base import BaseModel

TOKENIZER_FILES = ("vocab.json", "merges.txt")  # or one tokenizer.json (what transformers 5 writes)


def pick_device(device: str = "auto") -> torch.device:
    """``auto`` is CUDA when there is a GPU, else Apple's MPS, else the CPU.

    Under ``accelerate launch`` / torchrun each process takes its own GPU (``LOCAL_RANK``).
    """
    import torch

    if device != "auto":
        return torch.device(device)
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def pick_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """``auto`` is float16 on a GPU and float32 on the CPU (where half precision is slow)."""
    import torch

    if dtype == "auto":
        return torch.float32 if device.type == "cpu" else torch.float16
    return torch_dtype(dtype)


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype a ``dtype`` input names: ``float32``, ``float16`` or ``bfloat16``."""
    import torch

    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[name]


def load_base(source: str, dtype: str = "auto", device: str = "auto", config: str = "",
              component_files: Mapping[str, str] | None = None) -> BaseModel:
    """Load a base model from ``builtin:NAME``, a diffusers folder or a single ``.safetensors`` file.

    ``component_files`` (with a single file only) maps a component (``vae``, ``text_encoder``,
    ``text_encoder_2``) to a file that holds it alone, as ComfyUI's VAE and CLIP loaders take them;
    it replaces what the checkpoint or the config folder would give.
    """
    import torch

    from .base import BaseModel

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
            place_module(part, target_device, target_dtype)
    return BaseModel(source, components, target_dtype, target_device)


def place_module(model: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> None:
    """Put a loaded component on ``device`` in ``dtype``, for inference (eval mode, no gradients)."""
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
            needed += [f"{text.tokenizer}/{name}" for name in tokenizer_kind(text.model_class).files]
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


def read_model_file(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """A ``.safetensors`` model file's tensors (ComfyUI's scaled fp8 multiplied out) and metadata."""
    from .checkpoints import dequantize

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
    from .checkpoints import checkpoint_layout

    state, metadata = read_model_file(path)
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
            components[name] = model_from_state(family, name, configs[name], parts.pop(name), dtype, source)
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
    from .checkpoints import component_from_file, expected_parts

    if name not in expected_parts(family):
        raise ModelLoadError(f"{file.name}: a {family.display_name} base has no {name} that a file could replace")
    state, _ = read_model_file(file)
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
    from .checkpoints import config_parts

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


def model_from_state(family: Family, name: str, config: Mapping[str, Any], state: dict[str, torch.Tensor],
                      dtype: torch.dtype, path: Path) -> torch.nn.Module:
    """Component ``name`` built from its config and given ``state`` (cast to ``dtype``), exactly:
    a missing or unexpected weight is an error (text encoders' leftovers aside, see above)."""
    from .checkpoints import cast_floats
    from .text_names import state_dict_for

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


def tokenizer_kind(model_class: str) -> _TokenizerKind:
    """The kind of tokenizer a text encoder of ``model_class`` (a transformers class name) reads with."""
    return _TOKENIZERS.get(model_class, _TOKENIZERS["CLIPTextModel"])


def _tokenizers_and_scheduler(configs: dict[str, Any], folder: Path | None, family: Family) -> dict[str, Any]:
    import diffusers  # deferred: diffusers and transformers take seconds to import
    import transformers

    embedded = configs.get("tokenizer")
    parts: dict[str, Any] = {}
    for text in family.text_encoders:
        kind = tokenizer_kind(text.model_class)
        tokenizer_class = getattr(transformers, kind.class_name)
        if folder is not None:
            parts[text.tokenizer] = tokenizer_class.from_pretrained(folder / text.tokenizer)
        elif embedded == "builtin":
            parts[text.tokenizer] = kind.builtin()
        elif isinstance(embedded, dict) and text.tokenizer in embedded:
            # files SaveModel embedded: {part: {file name: text}}
            parts[text.tokenizer] = tokenizer_from_files(embedded[text.tokenizer], tokenizer_class)
        else:
            parts[text.tokenizer] = tokenizer_by_vocabulary(text, configs.get(text.component))
    scheduler_class = getattr(diffusers, configs["scheduler"].get("_class_name", "DDIMScheduler"))
    parts["scheduler"] = scheduler_class.from_config(configs["scheduler"])
    return parts


def tokenizer_by_vocabulary(text: TextEncoder, config: Mapping[str, Any] | None) -> Any:
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
    from .checkpoints import checkpoint_layout

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
    from .checkpoints import checkpoint_layout, config_parts, expected_parts

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
    from .checkpoints import expected_parts

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
