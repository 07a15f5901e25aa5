"""Loading base models: built-ins, diffusers folders and single-file checkpoints, all offline."""

from __future__ import annotations

import json
import os
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

from .. import families, tensorfiles
from ..errors import ModelLoadError
from ..families import Family
from .base import BaseModel
from .builtin import BUILTINS, builtin_family
from .ldm import checkpoint_reader
from .text_names import state_dict_for
from .tokenizer import build_tokenizer, tokenizer_from_files

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


def load_base(source: str, dtype: str = "auto", device: str = "auto", config: str = "") -> BaseModel:
    """Load a base model from ``builtin:NAME``, a diffusers folder or a single ``.safetensors`` file."""
    target_device = pick_device(device)
    target_dtype = pick_dtype(dtype, target_device)
    if source in BUILTINS:
        components = BUILTINS[source]()
    elif Path(source).is_dir():
        components = _load_diffusers_folder(Path(source))
    elif Path(source).is_file():
        components = _load_single_file(Path(source), Path(config) if config else None)
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


def missing_pipeline_files(folder: Path, family: Family | None = None) -> list[str]:
    """The files a diffusers pipeline folder of ``family`` (default: the one its layout says) lacks."""
    family = families.with_pipeline_layout_of(folder) if family is None else family
    needed = ["model_index.json", *(f"{part}/config.json" for part in family.model_parts),
              "scheduler/scheduler_config.json"]
    for tokenizer in family.tokenizers:
        if not (folder / tokenizer / "tokenizer.json").is_file():
            needed += [f"{tokenizer}/{name}" for name in TOKENIZER_FILES]
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


def _load_single_file(path: Path, config: Path | None) -> dict[str, Any]:
    """A single-file (LDM layout) checkpoint, with configs and tokenizer from a diffusers folder."""
    if path.suffix.lower() != ".safetensors":
        raise ModelLoadError(_NOT_SAFETENSORS.format(name=path.name))
    # a damaged file is named as such here too: inside ComfyUI no validation ran before
    try:
        state, metadata = tensorfiles.read_tensors(path)
    except tensorfiles.UnreadableTensorFile as exc:
        raise ModelLoadError(str(exc)) from exc
    embedded = metadata.get(EMBEDDED_CONFIG_KEY)
    try:
        family = families.from_checkpoint({key: tensor.shape for key, tensor in state.items()})
    except ValueError as exc:
        raise ModelLoadError(f"{path.name} is not a Stable Diffusion checkpoint we can read: {exc}") from exc
    configs = json.loads(embedded) if embedded and config is None else _configs_from_folder(path, config, family)
    try:
        parts = checkpoint_reader(family)(state, family, configs[family.denoiser], configs[family.vae])
    except ValueError as exc:
        raise ModelLoadError(f"{path.name} does not fit the configs in {config or 'its metadata'}: {exc}") from exc
    components = _models_from_configs(configs, family)
    for name, model in components.items():
        _load_exact(model, state_dict_for(model, parts[name]), name, path)
    return {**components, **_tokenizers_and_scheduler(configs, config, family)}


EMBEDDED_CONFIG_KEY = "lora_nodes_configs"  # single files we write carry their configs (JSON)
_NOT_SAFETENSORS = ("{name}: single-file checkpoints are read from .safetensors only "
                    "(pickle .ckpt files can run code when loaded; convert them first)")


def _configs_from_folder(path: Path, config: Path | None, family: Family) -> dict[str, Any]:
    kind = families.layout_name(family)
    if config is None:
        raise ModelLoadError(
            f"{path.name} is a single-file checkpoint, which holds weights but no configs or tokenizer, and "
            f"nothing is downloaded. Set LoadBase's 'config' input to {kind} diffusers folder of the same "
            f"model family that has {', '.join(missing_pipeline_files(Path('/nonexistent'), family)[1:])} "
            "(weights not needed)."
        )
    missing = [m for m in missing_pipeline_files(config, family) if m != "model_index.json"]
    if missing:
        raise ModelLoadError(f"config folder {config} lacks {', '.join(missing)}")
    configs = {part: json.loads((config / part / "config.json").read_text()) for part in family.model_parts}
    configs["scheduler"] = json.loads((config / "scheduler" / "scheduler_config.json").read_text())
    return configs


def _models_from_configs(configs: dict[str, Any], family: Family) -> dict[str, torch.nn.Module]:
    import diffusers  # deferred: diffusers and transformers take seconds to import
    import transformers

    models = {family.denoiser: getattr(diffusers, family.denoiser_class).from_config(configs[family.denoiser]),
              family.vae: getattr(diffusers, family.vae_class).from_config(configs[family.vae])}
    for text in family.text_encoders:
        config = transformers.CLIPTextConfig(**_clip_config(configs[text.component]))
        models[text.component] = getattr(transformers, text.model_class)(config)
    return models


def _clip_config(config: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in config.items() if not k.startswith("_") and k not in ("architectures", "model_type")}


def _tokenizers_and_scheduler(configs: dict[str, Any], folder: Path | None, family: Family) -> dict[str, Any]:
    import diffusers  # deferred: diffusers and transformers take seconds to import
    from transformers import CLIPTokenizer

    tokenizers = family.tokenizers
    embedded = configs.get("tokenizer")
    if folder is not None:
        parts = {name: CLIPTokenizer.from_pretrained(folder / name) for name in tokenizers}
    elif embedded == "builtin":
        parts = {name: build_tokenizer() for name in tokenizers}
    elif isinstance(embedded, dict) and all(name in embedded for name in tokenizers):
        # files SaveModel embedded: {part: {file name: text}}
        parts = {name: tokenizer_from_files(embedded[name]) for name in tokenizers}
    else:
        raise ModelLoadError("the checkpoint's metadata names no tokenizer; pass config: a diffusers folder")
    scheduler_class = getattr(diffusers, configs["scheduler"].get("_class_name", "DDIMScheduler"))
    parts["scheduler"] = scheduler_class.from_config(configs["scheduler"])
    return parts


def _load_exact(model: torch.nn.Module, state: dict[str, torch.Tensor], name: str, path: Path) -> None:
    result = model.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not k.endswith("position_ids")]
    if missing or result.unexpected_keys:
        raise ModelLoadError(f"{path.name}: the {name} weights do not match its config "
                             f"(missing {missing[:3]}, unexpected {result.unexpected_keys[:3]})")


# --------------------------------------------------------------------------- before loading


def base_family(source: str, config: str = "") -> tuple[Family | None, list[tuple[str, str]]]:
    """A base's family without loading it, and what would stop it loading.

    Built-ins by their configs, a diffusers folder by ``unet/config.json``, a single file by its
    ``.safetensors`` header (keys and shapes; no weights read). Problems are ``(input, message)``;
    a source that does not exist gives neither (the path check reports it). Never raises.
    """
    if source in BUILTINS:
        return builtin_family(source), []
    path = Path(source)
    try:
        if path.is_dir():
            return _folder_family(path)
        if path.is_file():
            stat = path.stat()
            return _single_file_family(str(path), stat.st_size, stat.st_mtime_ns, config)
    except Exception as exc:  # noqa: BLE001 - a check that cannot decide must not stop validation
        return None, [("source", f"{path.name}: {exc}")]
    return None, []


def _folder_family(folder: Path) -> tuple[Family | None, list[tuple[str, str]]]:
    problem = _folder_problem(folder, families.with_pipeline_layout_of(folder))
    if problem:
        return None, [("source", problem)]
    try:
        unet = json.loads((folder / "unet" / "config.json").read_text())
    except (OSError, ValueError) as exc:
        return None, [("source", f"{folder / 'unet' / 'config.json'} is not readable JSON: {exc}")]
    if not isinstance(unet, dict):
        return None, [("source", f"{folder / 'unet' / 'config.json'} is not a UNet config")]
    return families.from_unet_config(unet), []


@lru_cache(maxsize=64)
def _single_file_family(path: str, size: int, mtime_ns: int, config: str) -> tuple[Family | None, list[tuple[str, str]]]:
    """The family of a single-file checkpoint from its header; cached while the file is unchanged."""
    name = Path(path).name
    if not path.lower().endswith(".safetensors"):
        return None, [("source", _NOT_SAFETENSORS.format(name=name))]
    try:
        header = tensorfiles.read_header(path)
    except tensorfiles.UnreadableTensorFile as exc:
        return None, [("source", str(exc))]
    embedded = header.metadata.get(EMBEDDED_CONFIG_KEY)
    try:
        family = families.from_checkpoint(header.shapes)
    except ValueError as exc:
        return None, [("source", f"{name} is not a Stable Diffusion checkpoint we can read: {exc}")]
    if embedded and not config:
        try:
            return families.from_unet_config(json.loads(embedded)["unet"]), []
        except (ValueError, KeyError, TypeError):
            return family, [("source", f"{name}: its embedded configs ({EMBEDDED_CONFIG_KEY}) are not readable JSON")]
    if not config:
        message = (f"{name} is a single-file checkpoint without configs or tokenizer: set config to "
                   f"{families.layout_name(family)} "
                   "diffusers folder of the same model family (weights not needed)")
        return family, [("config", message)]
    missing = [m for m in missing_pipeline_files(Path(config), family) if m != "model_index.json"]
    if missing:
        return family, [("config", f"config folder {config} lacks {', '.join(missing)}")]
    return family, []
