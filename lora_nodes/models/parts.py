"""A base of some parts only, each from a file of its own, as ComfyUI's part loaders load them:
UNETLoader (the denoiser), CLIPLoader / DualCLIPLoader (text encoders, their tokenizers told by the
vocabulary) and VAELoader (the VAE). No config folder: configs come from the tensors (see
:mod:`.known_configs`) or from our files' embedded configs.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import families
from ..errors import ModelLoadError
from ..families import Family, TextEncoder
from ..families.stable_diffusion import LDM_DENOISER
from . import known_configs
from .base import BaseModel
from .checkpoints import checkpoint_layout, component_from_file, component_keys, pooled_width
from .ldm import unet_from_ldm
from .loading import (
    EMBEDDED_CONFIG_KEY,
    model_from_state,
    pick_device,
    pick_dtype,
    place_module,
    read_model_file,
    tokenizer_by_vocabulary,
    tokenizer_kind,
)

if TYPE_CHECKING:  # annotations only: validation imports this module, and must not import torch
    import torch

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
    import torch

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
    read = {key: read_model_file(path) for key, path in paths.items()}
    family = _parts_family(read, family_hint)
    components: dict[str, Any] = {}
    configs: dict[str, Any] = {}
    builtin = None
    texts = _text_files(family, {k: v for k, v in read.items() if k.startswith("text_encoder")}, paths)
    for component, (state, metadata, path) in texts.items():
        part = component_from_file(state, component, family, {})
        config = _embedded(metadata, component) or _config_of(family, component, part, path)[0]
        components[component] = model_from_state(family, component, config, part, target_dtype, path)
        configs[component] = config
    if "denoiser" in read:
        state, metadata = read["denoiser"]
        pooled = pooled_width(family, configs)
        config, weights, builtin = _denoiser_part(family, state, metadata, paths["denoiser"], pooled)
        components[family.denoiser] = model_from_state(family, family.denoiser, config, weights, target_dtype,
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
        components[family.vae] = model_from_state(family, family.vae, config, weights, target_dtype, paths["vae"])
    for text in family.text_encoders:
        if text.component in components:
            components[text.tokenizer] = _tokenizer_of(text, configs[text.component], texts[text.component])
    components["scheduler"] = _parts_scheduler(family, read.get("denoiser"), builtin)
    for part in components.values():
        if isinstance(part, torch.nn.Module):
            place_module(part, target_device, target_dtype)
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
    """A denoiser file's shapes as a full checkpoint names them (see :func:`_as_in_checkpoint`)."""
    return _as_in_checkpoint({k: tuple(v.shape) for k, v in state.items()})


_BARE_UNET_BLOCKS = ("input_blocks.", "middle_block.", "output_blocks.")  # an LDM UNet's own top-level blocks


def _as_in_checkpoint(state: Mapping[str, Any]) -> dict[str, Any]:
    """A denoiser file's entries as a full checkpoint names them: a bare LDM UNet's weights (ComfyUI's
    diffusion_models files) get the UNet families' prefix; ComfyUI's markers beside the weights
    (``v_pred``, ``ztsnr``) stay at the top, as in a full checkpoint; anything else is kept as it is."""
    if not any(k.startswith(_BARE_UNET_BLOCKS) for k in state):
        return dict(state)
    return {k if k in _MARKERS else LDM_DENOISER + k: v for k, v in state.items()}


_MARKERS = (known_configs.V_PREDICTION_MARKER, known_configs.ZERO_SNR_MARKER)


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
        return tokenizer_kind(text.model_class).builtin()
    try:
        return tokenizer_by_vocabulary(text, config)
    except ModelLoadError:
        # a part loader has no config input: say what works instead (LoadBase takes a config folder)
        raise ModelLoadError(
            f"{path.name}: no tokenizer is known for this {text.model_class} ({text.component}) and the file carries "
            "none; lora-nodes ships CLIP's tokenizer only. Load the model with lora-nodes' LoadBase instead, with "
            f"its 'config' set to a diffusers folder of the model that has {text.tokenizer}/ (no weights needed)"
        ) from None


def _parts_scheduler(family: Family, denoiser: tuple[dict[str, torch.Tensor], dict[str, str]] | None,
                     builtin: str | None) -> Any:
    import diffusers  # deferred: diffusers takes seconds to import

    embedded = _embedded(denoiser[1], "scheduler") if denoiser else None
    if embedded is None:
        state = _as_in_checkpoint(denoiser[0] if denoiser else {})
        schedule = known_configs.builtin_configs(builtin)["scheduler"] if builtin else None
        embedded = known_configs.scheduler_config(family, known_configs.objective_of(family, state),
                                                  known_configs.ZERO_SNR_MARKER in state, schedule)
    return getattr(diffusers, embedded.get("_class_name", "DDIMScheduler")).from_config(embedded)
