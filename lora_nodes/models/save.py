"""Writing a base model (with whatever LoRAs are merged into it): a diffusers folder or one file.

Nothing here changes the model's weights: callers materialize the recipe first, and a dtype
other than the model's is written from a cast copy of one component at a time.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..fileio import atomic_folder, atomic_write
from .base import BaseModel
from .checkpoints import checkpoint_layout
from .known_configs import V_PREDICTION_MARKER
from .loading import EMBEDDED_CONFIG_KEY, torch_dtype
from .pipeline import pipeline_for
from .tokenizer import tokenizer_files


def target_dtype(base: BaseModel, dtype: str) -> torch.dtype:
    """``same`` is the model's own dtype; otherwise ``float16``, ``bfloat16`` or ``float32``."""
    return base.dtype if dtype == "same" else torch_dtype(dtype)


@contextmanager
def cast(module: nn.Module, dtype: torch.dtype) -> Iterator[nn.Module]:
    """``module`` itself when it already has ``dtype``, else a copy in ``dtype`` (freed afterwards)."""
    if module.dtype == dtype:
        yield module
        return
    copied = copy.deepcopy(module).to(dtype=dtype)
    try:
        yield copied
    finally:
        del copied


def write_diffusers_folder(base: BaseModel, folder: Path, dtype: torch.dtype) -> None:
    """The pipeline as ``save_pretrained`` lays it out: ``model_index.json`` and one folder per part.

    Each part is saved with its own ``save_pretrained`` (safetensors weights), one at a time, so
    a dtype change holds at most one component's copy in memory.
    """
    pipeline_for(base).save_config(folder)
    for name in base.family.pipeline_parts:
        part = base.components[name]
        if isinstance(part, nn.Module):
            with cast(part, dtype) as saved:
                saved.save_pretrained(folder / name)
        else:
            part.save_pretrained(folder / name)


def save_diffusers_folder(base: BaseModel, path: str | Path, dtype: str = "same",
                          overwrite: bool = False) -> Path:
    """Write ``base`` (as its weights are now) as a diffusers pipeline folder at ``path``, atomically.

    An existing ``path`` is replaced only with ``overwrite``, and only when it is a diffusers model
    folder itself (FileExistsError otherwise).
    """
    wanted = target_dtype(base, dtype)
    path = Path(path)
    if overwrite and path.exists() and not (path / "model_index.json").is_file():
        raise FileExistsError(f"{path} exists and is not a diffusers model folder: it is never replaced")
    return atomic_folder(path, lambda tmp: write_diffusers_folder(base, tmp, wanted), overwrite)


# --------------------------------------------------------------------------- single file


def _config(part: Any) -> dict[str, Any]:
    """A component's config as JSON data (diffusers' ``to_json_string`` adds ``_class_name``)."""
    config = part.config
    return json.loads(config.to_json_string() if hasattr(config, "to_json_string") else part.to_json_string())


def embedded_configs(base: BaseModel) -> dict[str, Any]:
    """Every component config, the scheduler config, and the tokenizer(s) for a single file.

    ``tokenizer`` is ``"builtin"`` for built-in bases (the loader builds ours); otherwise
    ``{"tokenizer": {file: text}, "tokenizer_2": ...}``, what ``save_pretrained`` writes.
    """
    configs = {name: _config(base.components[name]) for name in base.family.model_parts}
    configs["scheduler"] = json.loads(base.components["scheduler"].to_json_string())
    if base.source.startswith("builtin:"):
        configs["tokenizer"] = "builtin"
    else:
        configs["tokenizer"] = {name: tokenizer_files(base.components[name]) for name in base.family.tokenizers}
    return configs


def single_file_parts(base: BaseModel) -> tuple[str, ...]:
    """The components a single file of ``base``'s family holds: every model part (an LDM/SGM
    checkpoint), or the denoiser alone (a BFL transformer file; the VAE and text encoders stay in
    files of their own, as ComfyUI loads them)."""
    return checkpoint_layout(base.family).written_parts(base.family)


def single_file_state_dict(base: BaseModel, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The base's weights as one single-file checkpoint state dict in its family's layout (LDM/SGM
    for Stable Diffusion, BFL for a transformer of that tree), in ``dtype``, on the CPU."""
    state = checkpoint_layout(base.family).write(base.components, base.family)
    if base.family.training_objective(base.components["scheduler"].config) == "v_prediction":
        state[V_PREDICTION_MARKER] = torch.tensor([])  # ComfyUI's marker: no shape tells v prediction
    return {k: v.detach().to("cpu", dtype if v.is_floating_point() else v.dtype).contiguous()
            for k, v in state.items()}


def save_single_file(base: BaseModel, path: str | Path, dtype: str = "same", overwrite: bool = True) -> Path:
    """Write ``base`` as one ``.safetensors`` checkpoint (A1111 / ComfyUI layout), atomically.

    Its metadata (``EMBEDDED_CONFIG_KEY``) holds every config and the tokenizers, so ``load_base``
    reads it back with no config folder (a file that holds only the denoiser, see
    :func:`single_file_parts`, takes the other parts' weights from files of their own). Without ``overwrite`` an existing file,
    even one that appears while writing, is never replaced (FileExistsError).
    """
    from safetensors.torch import save_file

    state = single_file_state_dict(base, target_dtype(base, dtype))
    metadata = {"format": "pt", EMBEDDED_CONFIG_KEY: json.dumps(embedded_configs(base))}
    return atomic_write(path, lambda tmp: save_file(state, str(tmp), metadata=metadata), overwrite=overwrite)
