"""Single-file checkpoints: the one table of layouts (how each family's single files are laid out,
see ``Family.checkpoint_layout``), and reading a component from a file of its own.

* ``ldm``: every component in one file under its own prefix, original LDM/SGM names (SD1/SD2/SDXL;
  :mod:`.ldm`). The configs come from a config folder or the file's embedded metadata.
* ``bfl``: the transformer in BFL names, bare or prefixed, as Black Forest Labs release it and as
  ComfyUI loads it from ``diffusion_models``; a ComfyUI full checkpoint also holds the VAE and the
  text encoders, each under its prefix (:mod:`.bfl`). The transformer's config is read from its
  tensors; the other components may come from files of their own (ComfyUI's CLIP and VAE loaders'
  files) or from a config folder that has their weights.

A component's own file (``ae.safetensors``, ``clip_l.safetensors``, ``t5xxl_fp16.safetensors``)
holds one model: a VAE in LDM names (or diffusers'), a text encoder in Hugging Face names.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..families import Family, HostPiece
from . import bfl, known_configs
from .ldm import from_ldm_checkpoint, text_encoder_state, to_ldm_checkpoint, unet_key_map, vae_from_ldm
from .text_names import file_state_dict

if TYPE_CHECKING:  # annotations only: validation imports this module, and must not import torch
    import torch
    from torch import Tensor

# (state, family, configs) -> (configs with the denoiser's filled in, component -> state dict)
# ("Tensor" quoted: these aliases are built at import, and validation imports this module without torch)
Reader = Callable[[Mapping[str, "Tensor"], Family, Mapping[str, Any]], tuple[dict[str, Any], dict[str, dict[str, "Tensor"]]]]
Writer = Callable[[Mapping[str, Any], Family], dict[str, "Tensor"]]
# (state, family) -> every config the file needs, read from its tensors (see known_configs)
ConfigReader = Callable[[Mapping[str, "Tensor"], Family], dict[str, Any]]
# (family, denoiser config) -> the denoiser's parameter -> where the original tree keeps it (no prefix)
OriginalPieces = Callable[[Family, Mapping[str, Any]], dict[str, tuple[HostPiece, ...]]]


@dataclass(frozen=True)
class CheckpointLayout:
    """How one layout's single files are read and written."""

    read: Reader
    write: Writer  # components -> the file's state dict (tensors shared where no reshaping is needed)
    # the model parts a file with these keys holds (the rest must come from elsewhere)
    parts_in: Callable[[Sequence[str], Family], tuple[str, ...]]
    written_parts: Callable[[Family], tuple[str, ...]]  # the model parts ``write`` puts in a file
    denoiser_config_in_tensors: bool  # the denoiser's config is read from its tensors, no config file
    original_pieces: OriginalPieces  # where the file's tree keeps each denoiser parameter (and which rows)
    # every config read from the tensors, none needed from a folder; None: only the denoiser's (if that)
    configs_from_tensors: ConfigReader | None = None


# --------------------------------------------------------------------------- LDM


def _read_ldm(state: Mapping[str, Tensor], family: Family,
              configs: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, dict[str, Tensor]]]:
    return dict(configs), from_ldm_checkpoint(state, family, configs[family.denoiser], configs[family.vae])


def _ldm_pieces(family: Family, config: Mapping[str, Any]) -> dict[str, tuple[HostPiece, ...]]:
    """Every UNet parameter is one LDM/SGM tensor of the same shape."""
    return {name: (HostPiece(original),) for name, original in unet_key_map(config).items()}


def _meta(state: Mapping[str, Tensor], prefix: str) -> dict[str, Tensor]:
    """The tensors under ``prefix`` as meta tensors of their shapes (names kept): for reading names
    and shapes through the converters without copying weights."""
    import torch

    return {k: torch.empty(tuple(v.shape), device="meta") for k, v in state.items() if k.startswith(prefix)}


def _shapes_under(state: Mapping[str, Tensor], prefix: str) -> dict[str, tuple[int, ...]]:
    return {k[len(prefix):]: tuple(v.shape) for k, v in state.items() if k.startswith(prefix)}


def ldm_configs(state: Mapping[str, Tensor], family: Family) -> dict[str, Any]:
    """Every config an LDM/SGM single file needs, read from its tensors (meta tensors will do):
    each part it holds, the scheduler (what the model predicts: see
    :func:`.known_configs.objective_of`), and ``tokenizer``: ``"builtin"`` when its text encoders
    are a built-in's. A part the file lacks has no config here."""
    configs: dict[str, Any] = {}
    builtins: dict[str, str | None] = {}
    for text in family.text_encoders:
        hf = text_encoder_state(_meta(state, text.checkpoint_prefix), text)
        if hf:
            shapes = {k: tuple(v.shape) for k, v in hf.items()}
            configs[text.component], builtins[text.component] = known_configs.part_config(family, text.component, shapes)
    pooled = pooled_width(family, configs)
    for part, prefix in ((family.denoiser, family.denoiser_checkpoint_prefix), (family.vae, family.vae_checkpoint_prefix)):
        shapes = _shapes_under(state, prefix)
        if shapes:
            configs[part], builtins[part] = known_configs.part_config(family, part, shapes, pooled)
    builtin = builtins.get(family.denoiser)
    objective = known_configs.objective_of(family, state)
    if builtin is None:
        known_configs.apply_variant(configs, family, objective)
    schedule = known_configs.builtin_configs(builtin)["scheduler"] if builtin else None
    configs["scheduler"] = known_configs.scheduler_config(family, objective, known_configs.ZERO_SNR_MARKER in state,
                                                          schedule)
    return configs


def pooled_width(family: Family, configs: Mapping[str, Any]) -> int | None:
    """The width of the pooled text embedding the denoiser takes (SDXL's added conditioning): the
    last text encoder's projection in ``configs``; None for a family without one, or when that
    encoder's config is not known."""
    if not family.pooled_text_conditioning:
        return None
    return configs.get(family.text_components[-1], {}).get("projection_dim")


def _write_ldm(components: Mapping[str, Any], family: Family) -> dict[str, Tensor]:
    unet, vae = components[family.denoiser], components[family.vae]
    text_2 = file_state_dict(components["text_encoder_2"]) if "text_encoder_2" in components else None
    return to_ldm_checkpoint(unet.state_dict(), vae.state_dict(), file_state_dict(components["text_encoder"]),
                             unet.config, vae.config, text_encoder_2=text_2)


# --------------------------------------------------------------------------- BFL


def _under(state: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    return {key[len(prefix):]: value for key, value in state.items() if key.startswith(prefix)}


def _read_bfl(state: Mapping[str, Tensor], family: Family,
              configs: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, dict[str, Tensor]]]:
    transformer = bfl.transformer_state(state)
    config = bfl.transformer_config({k: v.shape for k, v in transformer.items()}, configs.get(family.denoiser))
    parts = {family.denoiser: bfl.from_bfl(transformer, family, config)}
    if family.vae in _bfl_parts(list(state), family):
        parts[family.vae] = vae_from_ldm(state, configs[family.vae], family.vae_checkpoint_prefix)
    for text in family.text_encoders:
        if text.component in _bfl_parts(list(state), family):
            parts[text.component] = _under(state, text.checkpoint_prefix)
    return {**configs, family.denoiser: config}, parts


def _bfl_parts(keys: Sequence[str], family: Family) -> tuple[str, ...]:
    """The transformer, and what else a ComfyUI full checkpoint holds under its prefixes."""
    prefixes = {family.vae: family.vae_checkpoint_prefix,
                **{text.component: text.checkpoint_prefix for text in family.text_encoders}}
    held = {name for name, prefix in prefixes.items() if any(key.startswith(prefix) for key in keys)}
    return tuple(name for name in family.model_parts if name == family.denoiser or name in held)


def _write_bfl(components: Mapping[str, Any], family: Family) -> dict[str, Tensor]:
    transformer = components[family.denoiser]
    return bfl.to_bfl(transformer.state_dict(), family, transformer.config)


LAYOUTS: dict[str, CheckpointLayout] = {
    "ldm": CheckpointLayout(_read_ldm, _write_ldm, lambda keys, family: family.model_parts,
                            lambda family: family.model_parts, denoiser_config_in_tensors=False,
                            original_pieces=_ldm_pieces, configs_from_tensors=ldm_configs),
    "bfl": CheckpointLayout(_read_bfl, _write_bfl, _bfl_parts, lambda family: (family.denoiser,),
                            denoiser_config_in_tensors=True, original_pieces=bfl.original_pieces),
}


def checkpoint_layout(family: Family) -> CheckpointLayout:
    """How single-file checkpoints of ``family`` are laid out (its ``checkpoint_layout``)."""
    if family.checkpoint_layout not in LAYOUTS:
        raise ValueError(f"single-file checkpoints of {family.display_name} ({family.checkpoint_layout} layout) "
                         "are not read or written yet: use a diffusers folder")
    return LAYOUTS[family.checkpoint_layout]


# --------------------------------------------------------------------------- one component's own file

# ComfyUI's scaled fp8 files keep a float8 weight and its scale: weight = float8 x scale
_SCALES = (".scale_weight", ".weight_scale")
_QUANTIZATION_EXTRAS = (".input_scale", "scaled_fp8")  # not weights: dropped


def dequantize(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """``state`` with ComfyUI's scaled fp8 weights multiplied out (float32) and its markers dropped;
    plain float8, bfloat16 and float16 tensors are left as they are (the loader casts them)."""
    out = {}
    for key, tensor in state.items():
        if key.endswith(_SCALES + _QUANTIZATION_EXTRAS):
            continue
        scale = next((state[key[: -len(".weight")] + s] for s in _SCALES
                      if key.endswith(".weight") and key[: -len(".weight")] + s in state), None)
        if scale is not None:
            scale = scale.float()
            if scale.dim() == 1 and scale.numel() == tensor.shape[0] and tensor.dim() > 1:
                scale = scale.reshape(-1, *([1] * (tensor.dim() - 1)))  # one scale per output row
            tensor = tensor.float() * scale
        out[key] = tensor
    return out


def _without_prefix(state: Mapping[str, Tensor], prefixes: Sequence[str]) -> dict[str, Tensor]:
    """``state`` without the first of ``prefixes`` that every key has (a component cut out of a
    full checkpoint keeps its place's prefix)."""
    for prefix in prefixes:
        if prefix and state and all(key.startswith(prefix) for key in state):
            return _under(state, prefix)
    return dict(state)


def _is_diffusers_vae(keys: Sequence[str]) -> bool:
    return any(key.startswith(("encoder.down_blocks.", "decoder.up_blocks.")) for key in keys)


def component_keys(state: Mapping[str, Tensor], name: str, family: Family) -> dict[str, Tensor]:
    """A file holding component ``name`` alone, without the prefix every key shares (see
    :func:`component_from_file`): the names its config is read from."""
    if name == family.vae:
        return _without_prefix(state, (family.vae_checkpoint_prefix, "first_stage_model.", "vae."))
    return _without_prefix(state, (family.text_encoder(name).checkpoint_prefix, "transformer."))


def component_from_file(state: Mapping[str, Tensor], name: str, family: Family,
                        configs: Mapping[str, Any]) -> dict[str, Tensor]:
    """The state dict (diffusers / Hugging Face names, file spelling) of component ``name`` from a
    file that holds it alone: a VAE in LDM names (BFL's ``ae.safetensors``, SD's VAE files) or
    diffusers', a text encoder in Hugging Face names; a prefix that every key shares (``vae.``,
    ``first_stage_model.``, ``text_encoders.clip_l.transformer.``) is removed. Raises ValueError
    when the file does not hold that component."""
    if name == family.vae:
        state = _without_prefix(state, (family.vae_checkpoint_prefix, "first_stage_model.", "vae."))
        return dict(state) if _is_diffusers_vae(list(state)) else vae_from_ldm(state, configs[family.vae])
    text = family.text_encoder(name)
    return _without_prefix(state, (text.checkpoint_prefix, "transformer."))


def expected_parts(family: Family) -> tuple[str, ...]:
    """The model parts that may come from files of their own: the VAE and the text encoders."""
    return tuple(name for name in family.model_parts if name != family.denoiser)


def config_parts(family: Family) -> tuple[str, ...]:
    """The model parts whose configs a single file of ``family`` needs from a folder or its metadata."""
    layout = checkpoint_layout(family)
    return tuple(name for name in family.model_parts
                 if not (layout.denoiser_config_in_tensors and name == family.denoiser))


def cast_floats(state: Mapping[str, Tensor], dtype: torch.dtype) -> dict[str, Tensor]:
    """Floating tensors in ``dtype`` (float8 and half precision upcast), the rest as they are."""
    return {k: v.to(dtype) if v.is_floating_point() and v.dtype != dtype else v for k, v in state.items()}
