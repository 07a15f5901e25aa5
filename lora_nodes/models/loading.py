"""Loading base models: built-ins, diffusers folders and single-file checkpoints, all offline."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from ..errors import ModelLoadError
from .base import BaseModel
from .builtin import BUILTINS
from .text_names import state_dict_for

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
PIPELINE_PARTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
TOKENIZER_FILES = ("vocab.json", "merges.txt")  # or one tokenizer.json (what transformers 5 writes)


def pick_device(device: str = "auto") -> torch.device:
    """``auto`` is CUDA when there is a GPU, else Apple's MPS, else the CPU."""
    if device != "auto":
        return torch.device(device)
    if torch.cuda.is_available():
        return torch.device("cuda")
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
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        if name in components:
            _place(components[name], target_device, target_dtype)
    return BaseModel(source, components, target_dtype, target_device)


def _place(model: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> None:
    model.eval().requires_grad_(False)
    if model.dtype != dtype:
        model.to(dtype=dtype)
    if model.device != device:
        model.to(device=device)


def missing_pipeline_files(folder: Path) -> list[str]:
    """The files a diffusers SD pipeline folder needs that ``folder`` lacks."""
    needed = ["model_index.json", *(f"{part}/config.json" for part in ("unet", "vae", "text_encoder")),
              "scheduler/scheduler_config.json"]
    if not (folder / "tokenizer/tokenizer.json").is_file():
        needed += [f"tokenizer/{name}" for name in TOKENIZER_FILES]
    return [name for name in needed if not (folder / name).is_file()]


def _load_diffusers_folder(folder: Path) -> dict[str, Any]:
    from diffusers import StableDiffusionPipeline

    missing = missing_pipeline_files(folder)
    if missing:
        raise ModelLoadError(f"{folder} is not a complete diffusers pipeline folder: missing {', '.join(missing)}. "
                             "Copy them from the model's original repository (they are small), or pass a "
                             "single-file checkpoint with config: set to a folder that has them.")
    pipe = StableDiffusionPipeline.from_pretrained(
        folder, local_files_only=True, safety_checker=None, feature_extractor=None, requires_safety_checker=False
    )
    return {part: getattr(pipe, part) for part in PIPELINE_PARTS}


def _load_single_file(path: Path, config: Path | None) -> dict[str, Any]:
    """A single-file (LDM layout) checkpoint, with configs and tokenizer from a diffusers folder."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from safetensors.torch import load_file
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from .ldm import from_ldm_checkpoint

    if path.suffix.lower() != ".safetensors":
        raise ModelLoadError(f"{path.name}: single-file checkpoints are read from .safetensors only "
                             "(pickle .ckpt files can run code when loaded; convert them first)")
    if config is None:
        raise ModelLoadError(
            f"{path.name} is a single-file checkpoint, which holds weights but no configs or tokenizer, and "
            "nothing is downloaded. Set LoadBase's 'config' input to a diffusers folder of the same model "
            f"family that has {', '.join(missing_pipeline_files(Path('/nonexistent')))} (weights not needed)."
        )
    missing = [m for m in missing_pipeline_files(config) if m != "model_index.json"]
    if missing:
        raise ModelLoadError(f"config folder {config} lacks {', '.join(missing)}")
    unet_config = json.loads((config / "unet/config.json").read_text())
    vae_config = json.loads((config / "vae/config.json").read_text())
    try:
        parts = from_ldm_checkpoint(load_file(str(path)), unet_config, vae_config)
    except ValueError as exc:
        raise ModelLoadError(f"{path.name} does not fit the configs in {config}: {exc}") from exc
    unet = UNet2DConditionModel.from_config(unet_config)
    vae = AutoencoderKL.from_config(vae_config)
    text_encoder = CLIPTextModel(CLIPTextConfig.from_pretrained(config / "text_encoder"))
    for model, name in ((unet, "unet"), (vae, "vae"), (text_encoder, "text_encoder")):
        _load_exact(model, state_dict_for(model, parts[name]), name, path)
    return {
        "unet": unet,
        "vae": vae,
        "text_encoder": text_encoder,
        "tokenizer": CLIPTokenizer.from_pretrained(config / "tokenizer"),
        "scheduler": DDIMScheduler.from_pretrained(config / "scheduler"),
    }


def _load_exact(model: torch.nn.Module, state: dict[str, torch.Tensor], name: str, path: Path) -> None:
    result = model.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not k.endswith("position_ids")]
    if missing or result.unexpected_keys:
        raise ModelLoadError(f"{path.name}: the {name} weights do not match its config "
                             f"(missing {missing[:3]}, unexpected {result.unexpected_keys[:3]})")
