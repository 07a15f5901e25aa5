"""Convert between diffusers state dicts and single-file "LDM" checkpoints (SD1.x, SD2.x, SDXL).

Single-file checkpoints (A1111 / ComfyUI ``.safetensors``) keep every component in one flat
state dict, each under its own prefix and with the original latent-diffusion (LDM / SGM) names:

* UNet under ``model.diffusion_model.`` (``input_blocks``, ``middle_block``, ``output_blocks``);
* VAE under ``first_stage_model.`` (``encoder.down.N.block.M``, ``decoder.up.N`` counted upwards);
* the text encoder(s): HF CLIP names under ``cond_stage_model.transformer.`` (SD1) or
  ``conditioner.embedders.0.transformer.`` (SDXL), and the OpenCLIP layout under
  ``cond_stage_model.model.`` (SD2) or ``conditioner.embedders.1.model.`` (SDXL's second encoder).

Every mapping is derived from the component's config: the parameter names come from the model
built on the ``meta`` device (no memory, no weights), and block indices from its block counts,
so the same code serves tiny test models and full-size checkpoints. Text-encoder names are in
the file spelling (``text_model.encoder...``) on the diffusers side, whatever the installed
transformers version calls them (see :mod:`lora_nodes.models.text_names`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import TYPE_CHECKING, Any

from .. import families
from ..families import Family
from .text_names import FILE_LEVEL, file_spelling

if TYPE_CHECKING:  # annotations only: validation imports this module, and must not import torch
    from torch import Tensor

_RESNET_RENAMES = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
_VAE_RESNET_RENAMES = {"conv_shortcut": "nin_shortcut"}
_VAE_ATTENTION_RENAMES = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
_VAE_ATTENTION_LINEARS = ("to_q", "to_k", "to_v", "to_out.0")

# Text-encoder entries that are buffers or training leftovers, not weights of the HF model.
_IGNORED_TEXT_SUFFIXES = ("position_ids", "logit_scale", "attn_mask")
_MAX_NAMED = 5


# --------------------------------------------------------------------------- name rules


@dataclass(frozen=True)
class _Rule:
    """``src`` module path (diffusers) <-> ``dst`` module path (LDM), with renames below it.

    ``renames`` maps a dotted path just below ``src`` to its LDM spelling below ``dst``.
    """

    src: str
    dst: str
    renames: Mapping[str, str] = field(default_factory=dict)


def _longest_prefix(parts: Sequence[str], table: Mapping[str, Any]) -> tuple[int, Any]:
    """Length and entry of the longest dotted prefix of ``parts`` found in ``table``; (0, None) if none."""
    for size in range(len(parts), 0, -1):
        entry = table.get(".".join(parts[:size]))
        if entry is not None:
            return size, entry
    return 0, None


def _translate(name: str, rules: Mapping[str, _Rule]) -> str | None:
    """``name`` (a diffusers module or parameter path) in LDM spelling, or None if no rule covers it."""
    parts = name.split(".")
    size, rule = _longest_prefix(parts, rules)
    if rule is None:
        return None
    rest = parts[size:]
    renamed, new = _longest_prefix(rest, rule.renames)
    tail = ([new] if new is not None else []) + rest[renamed:]
    return ".".join([rule.dst, *tail])


def _per_block(value: Any, count: int, what: str) -> list[int]:
    """An int-or-sequence config value as one int per block."""
    if isinstance(value, int):
        return [value] * count
    values = [int(v) for v in value]
    if len(values) != count:
        raise ValueError(f"{what} has {len(values)} entries for {count} blocks")
    return values


def _has(names: Iterable[str], prefix: str) -> bool:
    return any(n.startswith(prefix) for n in names)


# --------------------------------------------------------------------------- configs & parameter names


def _plain_config(config: Any) -> dict[str, Any]:
    """A config (dict, FrozenDict, or a model with ``.config``) as a plain dict without private keys."""
    config = getattr(config, "config", config)
    return {k: v for k, v in dict(config).items() if not k.startswith("_")}


def _config_key(config: Mapping[str, Any]) -> str:
    return json.dumps(_plain_config(config), sort_keys=True, default=str)


@lru_cache(maxsize=16)
def _parameter_names(kind: str, config_json: str) -> tuple[str, ...]:
    """State-dict names of the diffusers model ``kind`` built from the config, on the meta device."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel

    cls = {"unet": UNet2DConditionModel, "vae": AutoencoderKL}[kind]
    with torch.device("meta"):
        model = cls.from_config(json.loads(config_json))
    return tuple(model.state_dict())


# --------------------------------------------------------------------------- UNet


def _unet_rules(config: Mapping[str, Any], names: Sequence[str]) -> dict[str, _Rule]:
    """Module-path rules for a UNet2DConditionModel with this config and these parameter names."""
    rules = [
        _Rule("conv_in", "input_blocks.0.0"),
        _Rule("time_embedding.linear_1", "time_embed.0"),
        _Rule("time_embedding.linear_2", "time_embed.2"),
        _Rule("add_embedding.linear_1", "label_emb.0.0"),
        _Rule("add_embedding.linear_2", "label_emb.0.2"),
        _Rule("conv_norm_out", "out.0"),
        _Rule("conv_out", "out.2"),
    ]
    blocks = len(config["down_block_types"])
    layers = _per_block(config.get("layers_per_block", 2), blocks, "layers_per_block")
    rules += _unet_down_rules(layers, names)
    rules += _unet_mid_rules(names)
    rules += _unet_up_rules(list(reversed(layers)), names)
    return {rule.src: rule for rule in rules}


def _unet_down_rules(layers: Sequence[int], names: Sequence[str]) -> list[_Rule]:
    rules, index = [], 1
    for i, count in enumerate(layers):
        for j in range(count):
            rules.append(_Rule(f"down_blocks.{i}.resnets.{j}", f"input_blocks.{index}.0", _RESNET_RENAMES))
            rules.append(_Rule(f"down_blocks.{i}.attentions.{j}", f"input_blocks.{index}.1"))
            index += 1
        if _has(names, f"down_blocks.{i}.downsamplers.0."):
            rules.append(_Rule(f"down_blocks.{i}.downsamplers.0", f"input_blocks.{index}.0", {"conv": "op"}))
            index += 1
    return rules


def _unet_mid_rules(names: Sequence[str]) -> list[_Rule]:
    rules = [_Rule("mid_block.resnets.0", "middle_block.0", _RESNET_RENAMES)]
    if _has(names, "mid_block.attentions.0."):
        rules.append(_Rule("mid_block.attentions.0", "middle_block.1"))
        rules.append(_Rule("mid_block.resnets.1", "middle_block.2", _RESNET_RENAMES))
    else:
        rules.append(_Rule("mid_block.resnets.1", "middle_block.1", _RESNET_RENAMES))
    return rules


def _unet_up_rules(layers: Sequence[int], names: Sequence[str]) -> list[_Rule]:
    rules, index = [], 0
    for i, count in enumerate(layers):
        for j in range(count + 1):
            rules.append(_Rule(f"up_blocks.{i}.resnets.{j}", f"output_blocks.{index}.0", _RESNET_RENAMES))
            rules.append(_Rule(f"up_blocks.{i}.attentions.{j}", f"output_blocks.{index}.1"))
            index += 1
        slot = 2 if _has(names, f"up_blocks.{i}.attentions.") else 1
        rules.append(_Rule(f"up_blocks.{i}.upsamplers.0", f"output_blocks.{index - 1}.{slot}"))
    return rules


def _checked_map(names: Sequence[str], rules: Mapping[str, _Rule], what: str) -> dict[str, str]:
    """Every name translated; raises ValueError when a name has no rule or two names collide."""
    mapping = {name: _translate(name, rules) for name in names}
    unmapped = [name for name, ldm in mapping.items() if ldm is None]
    if unmapped:
        raise ValueError(f"unsupported {what} config: no LDM name for {_some(unmapped)}")
    if len(set(mapping.values())) != len(mapping):
        raise ValueError(f"unsupported {what} config: two parameters map to one LDM name")
    return mapping  # type: ignore[return-value]


@lru_cache(maxsize=16)
def _unet_key_map(config_json: str) -> dict[str, str]:
    names = _parameter_names("unet", config_json)
    return _checked_map(names, _unet_rules(json.loads(config_json), names), "UNet")


def unet_key_map(unet_config: Mapping[str, Any]) -> dict[str, str]:
    """diffusers UNet2DConditionModel parameter name -> LDM/SGM name (without 'model.diffusion_model.')."""
    return dict(_unet_key_map(_config_key(unet_config)))


def unet_module_map(unet_config: Mapping[str, Any], names: Sequence[str] | None = None) -> dict[str, str]:
    """diffusers module path -> LDM/SGM module path.

    e.g. ``down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q`` ->
    ``input_blocks.4.1.transformer_blocks.0.attn1.to_q`` (SD1.5). Covers every module that holds
    parameters and every module between it and a block (containers such as ``down_blocks.1`` that
    have no single LDM counterpart are left out). Used to name kohya SDXL LoRA keys
    (``lora_unet_input_blocks_4_1_...``). ``names``: the UNet's state-dict names where a UNet is at
    hand (else one is built on the meta device for them, a tenth of a second for SD1.5's).
    """
    config_json = _config_key(unet_config)
    names = _parameter_names("unet", config_json) if names is None else names
    rules = _unet_rules(json.loads(config_json), names)
    modules: dict[str, str] = {}
    for name in names:
        parts = name.split(".")
        for size in range(1, len(parts)):
            path = ".".join(parts[:size])
            if path not in modules:
                ldm = _translate(path, rules)
                if ldm is not None:
                    modules[path] = ldm
    return modules


# --------------------------------------------------------------------------- VAE


def _vae_rules(config: Mapping[str, Any]) -> dict[str, _Rule]:
    """Module-path rules for an AutoencoderKL with this config."""
    blocks = len(config["block_out_channels"])
    layers = int(config.get("layers_per_block", 1))
    same = ("encoder.conv_in", "encoder.conv_out", "decoder.conv_in", "decoder.conv_out")
    rules = [_Rule(name, name) for name in (*same, "quant_conv", "post_quant_conv")]
    for part in ("encoder", "decoder"):
        rules += [
            _Rule(f"{part}.conv_norm_out", f"{part}.norm_out"),
            _Rule(f"{part}.mid_block.resnets.0", f"{part}.mid.block_1", _VAE_RESNET_RENAMES),
            _Rule(f"{part}.mid_block.resnets.1", f"{part}.mid.block_2", _VAE_RESNET_RENAMES),
            _Rule(f"{part}.mid_block.attentions.0", f"{part}.mid.attn_1", _VAE_ATTENTION_RENAMES),
        ]
    for i in range(blocks):
        down, up = f"encoder.down.{i}", f"decoder.up.{blocks - 1 - i}"
        rules.append(_Rule(f"encoder.down_blocks.{i}.downsamplers.0", f"{down}.downsample"))
        rules.append(_Rule(f"decoder.up_blocks.{i}.upsamplers.0", f"{up}.upsample"))
        for j in range(layers):
            rules.append(
                _Rule(f"encoder.down_blocks.{i}.resnets.{j}", f"{down}.block.{j}", _VAE_RESNET_RENAMES)
            )
        for j in range(layers + 1):
            rules.append(_Rule(f"decoder.up_blocks.{i}.resnets.{j}", f"{up}.block.{j}", _VAE_RESNET_RENAMES))
    return {rule.src: rule for rule in rules}


@lru_cache(maxsize=16)
def _vae_key_map(config_json: str) -> dict[str, str]:
    names = _parameter_names("vae", config_json)
    return _checked_map(names, _vae_rules(json.loads(config_json)), "VAE")


def vae_key_map(vae_config: Mapping[str, Any]) -> dict[str, str]:
    """diffusers AutoencoderKL parameter name -> LDM name (without 'first_stage_model.')."""
    return dict(_vae_key_map(_config_key(vae_config)))


def _is_vae_attention_linear(name: str) -> bool:
    """A mid-block attention q/k/v/out weight: Linear [c, c] in diffusers, 1x1 conv in LDM."""
    return any(name.endswith(f"mid_block.attentions.0.{layer}.weight") for layer in _VAE_ATTENTION_LINEARS)


# --------------------------------------------------------------------------- text encoders


def _is_ignored_text_key(name: str) -> bool:
    return name.rsplit(".", 1)[-1] in _IGNORED_TEXT_SUFFIXES


def _clip_to_ldm(state: Mapping[str, Tensor], prefix: str) -> dict[str, Tensor]:
    """HF CLIP text model -> HF names under ``prefix`` (file spelling)."""
    return {prefix + file_spelling(k): v for k, v in state.items() if not _is_ignored_text_key(k)}


def _clip_from_ldm(state: Mapping[str, Tensor], prefix: str) -> tuple[dict[str, Tensor], list[str]]:
    """HF names under ``prefix`` -> HF CLIP state dict, and the keys that are not CLIP weights.

    Names without the ``text_model.`` level (old checkpoints) come out with it.
    """
    out, unexpected = {}, []
    for key, value in state.items():
        if not key.startswith(prefix) or _is_ignored_text_key(key):
            continue
        name = file_spelling(key[len(prefix) :])
        if name.startswith(FILE_LEVEL) or name == "text_projection.weight":
            out[name] = value
        else:
            unexpected.append(key)
    return out, unexpected


_OPEN_CLIP_LAYER = {
    "self_attn.out_proj": "attn.out_proj",
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
}
_OPEN_CLIP_TOP = {
    "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
    "text_model.embeddings.position_embedding.weight": "positional_embedding",
    "text_model.final_layer_norm.weight": "ln_final.weight",
    "text_model.final_layer_norm.bias": "ln_final.bias",
}
_QKV = ("q_proj", "k_proj", "v_proj")
_HF_LAYER = re.compile(r"text_model\.encoder\.layers\.(\d+)\.(.+)\.(weight|bias)$")
_OC_LAYER = re.compile(r"transformer\.resblocks\.(\d+)\.(.+)\.(weight|bias)$")
_OC_IN_PROJ = re.compile(r"transformer\.resblocks\.(\d+)\.attn\.in_proj_(weight|bias)$")


def _open_clip_to_ldm(state: Mapping[str, Tensor], prefix: str) -> dict[str, Tensor]:
    """HF CLIP text model (file spelling or flattened) -> OpenCLIP layout under ``prefix``."""
    import torch

    hf = {file_spelling(k): v for k, v in state.items() if not _is_ignored_text_key(k)}
    out: dict[str, Tensor] = {}
    qkv: dict[tuple[str, str], dict[str, Tensor]] = {}
    for name, value in hf.items():
        if name in _OPEN_CLIP_TOP:
            out[prefix + _OPEN_CLIP_TOP[name]] = value
        elif name == "text_projection.weight":
            out[prefix + "text_projection"] = value.t().contiguous()
        elif (match := _HF_LAYER.match(name)) is None:
            raise ValueError(f"text encoder weight {name!r} has no OpenCLIP name")
        elif match[2].startswith("self_attn.") and match[2][len("self_attn.") :] in _QKV:
            qkv.setdefault((match[1], match[3]), {})[match[2][len("self_attn.") :]] = value
        elif match[2] in _OPEN_CLIP_LAYER:
            out[f"{prefix}transformer.resblocks.{match[1]}.{_OPEN_CLIP_LAYER[match[2]]}.{match[3]}"] = value
        else:
            raise ValueError(f"text encoder weight {name!r} has no OpenCLIP name")
    for (layer, kind), parts in qkv.items():
        if set(parts) != set(_QKV):
            raise ValueError(f"text encoder layer {layer} lacks some of q/k/v {kind}")
        fused = torch.cat([parts[p] for p in _QKV], dim=0)
        out[f"{prefix}transformer.resblocks.{layer}.attn.in_proj_{kind}"] = fused
    return out


def _open_clip_from_ldm(state: Mapping[str, Tensor], prefix: str) -> tuple[dict[str, Tensor], list[str]]:
    """OpenCLIP layout under ``prefix`` -> HF CLIP state dict (file spelling), and unknown keys."""
    top = {v: k for k, v in _OPEN_CLIP_TOP.items()}
    layer_names = {v: k for k, v in _OPEN_CLIP_LAYER.items()}
    out, unexpected = {}, []
    for key, value in state.items():
        if not key.startswith(prefix) or _is_ignored_text_key(key):
            continue
        name = key[len(prefix) :]
        if name in top:
            out[top[name]] = value
        elif name == "text_projection":
            out["text_projection.weight"] = value.t().contiguous()
        elif (match := _OC_IN_PROJ.match(name)) is not None:
            for part, chunk in zip(_QKV, value.chunk(3, dim=0)):
                out[f"text_model.encoder.layers.{match[1]}.self_attn.{part}.{match[2]}"] = chunk.clone()
        elif (match := _OC_LAYER.match(name)) is not None and match[2] in layer_names:
            out[f"text_model.encoder.layers.{match[1]}.{layer_names[match[2]]}.{match[3]}"] = value
        else:
            unexpected.append(key)
    return out, unexpected


# --------------------------------------------------------------------------- whole checkpoints


def _some(keys: Iterable[str]) -> str:
    keys = sorted(keys)
    shown = ", ".join(repr(k) for k in keys[:_MAX_NAMED])
    return shown + (f", ... ({len(keys)} in all)" if len(keys) > _MAX_NAMED else "")


def _mismatch(what: str, missing: Iterable[str], unexpected: Iterable[str]) -> str | None:
    """A sentence about missing/unexpected keys, or None when there are none."""
    missing, unexpected = list(missing), list(unexpected)
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing keys: {_some(missing)}")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected keys: {_some(unexpected)}")
    return f"{what}: " + "; ".join(parts) if parts else None


def _raise_if(problems: Iterable[str | None], context: str) -> None:
    found = [p for p in problems if p]
    if found:
        raise ValueError(f"{context} - " + " | ".join(found))


def _rename(
    state: Mapping[str, Tensor], mapping: Mapping[str, str], prefix: str, what: str
) -> dict[str, Tensor]:
    """diffusers ``state`` renamed by ``mapping`` and prefixed; raises on missing/unexpected names."""
    problem = _mismatch(what, set(mapping) - set(state), set(state) - set(mapping))
    _raise_if([problem], "state dict does not fit the config")
    return {prefix + mapping[name]: value for name, value in state.items()}


def to_ldm_checkpoint(
    unet: Mapping[str, Tensor],
    vae: Mapping[str, Tensor],
    text_encoder: Mapping[str, Tensor],
    unet_config: Mapping[str, Any],
    vae_config: Mapping[str, Any],
    text_encoder_2: Mapping[str, Tensor] | None = None,
) -> dict[str, Tensor]:
    """diffusers component state dicts -> one single-file LDM checkpoint state dict.

    The family (from the UNet config) says where each part goes and in which layout: e.g. SD1
    writes HF CLIP names under ``cond_stage_model.transformer.``; SDXL needs ``text_encoder_2``
    and writes both ``conditioner.embedders`` entries; SD2 writes OpenCLIP names under
    ``cond_stage_model.model.`` for the layers it is given (diffusers' SD2 text encoder has one
    layer fewer than the original and no projection, so the result has only those). Tensors are
    shared with the inputs wherever no reshaping is needed.
    """
    family = families.from_unet_config(_plain_config(unet_config))
    texts = {"text_encoder": text_encoder, "text_encoder_2": text_encoder_2}
    if (text_encoder_2 is not None) != ("text_encoder_2" in family.text_components):
        need = "needs" if text_encoder_2 is None else "takes no"
        raise ValueError(f"{families.layout_name(family)} checkpoint {need} text_encoder_2")
    out = _rename(unet, unet_key_map(unet_config), family.denoiser_checkpoint_prefix, "UNet")
    vae_prefix = family.vae_checkpoint_prefix
    vae_out = _rename(vae, vae_key_map(vae_config), vae_prefix, "VAE")
    for name, ldm in vae_key_map(vae_config).items():
        if _is_vae_attention_linear(name) and vae[name].ndim == 2:
            vae_out[vae_prefix + ldm] = vae[name].reshape(*vae[name].shape, 1, 1)
    out.update(vae_out)
    for text in family.text_encoders:
        convert = _open_clip_to_ldm if text.open_clip else _clip_to_ldm
        out.update(convert(texts[text.component], text.checkpoint_prefix))  # type: ignore[arg-type]
    return out


def _component_from_ldm(
    state: Mapping[str, Tensor], mapping: Mapping[str, str], prefix: str, what: str
) -> tuple[dict[str, Tensor], str | None]:
    """One component's diffusers state dict from ``state``, and a sentence on missing/unexpected keys."""
    inverse = {prefix + ldm: name for name, ldm in mapping.items()}
    present = {key for key in state if key.startswith(prefix)}
    problem = _mismatch(what, set(inverse) - present, present - set(inverse))
    return {inverse[key]: state[key] for key in present & set(inverse)}, problem


def _text_from_ldm(
    state: Mapping[str, Tensor], prefix: str, open_clip: bool, what: str
) -> tuple[dict[str, Tensor], str | None]:
    convert = _open_clip_from_ldm if open_clip else _clip_from_ldm
    out, unexpected = convert(state, prefix)
    missing = [] if out else [f"{prefix}..."]
    return out, _mismatch(what, missing, unexpected)


def text_encoder_state(state: Mapping[str, Tensor], text: Any) -> dict[str, Tensor]:
    """A text encoder's Hugging Face state dict (file spelling) from a checkpoint that keeps it
    under ``text.checkpoint_prefix`` (a :class:`~lora_nodes.families.TextEncoder`), in HF CLIP or
    OpenCLIP layout; empty when the checkpoint holds none there."""
    convert = _open_clip_from_ldm if text.open_clip else _clip_from_ldm
    return convert(state, text.checkpoint_prefix)[0]


def _vae_from_ldm(state: Mapping[str, Tensor], vae_config: Mapping[str, Any],
                  prefix: str) -> tuple[dict[str, Tensor], str | None]:
    vae, problem = _component_from_ldm(state, vae_key_map(vae_config), prefix, "VAE")
    for name, value in list(vae.items()):
        if _is_vae_attention_linear(name) and value.ndim == 4:
            vae[name] = value.reshape(value.shape[0], value.shape[1])
    return vae, problem


def vae_from_ldm(state: Mapping[str, Tensor], vae_config: Mapping[str, Any], prefix: str = "") -> dict[str, Tensor]:
    """An LDM-named VAE (under ``prefix``; a VAE file such as BFL's ``ae.safetensors`` has none) ->
    the diffusers AutoencoderKL state dict. Raises ValueError naming missing and unexpected keys."""
    vae, problem = _vae_from_ldm({k: v for k, v in state.items() if k.startswith(prefix)}, vae_config, prefix)
    _raise_if([problem], "VAE weights do not fit the config")
    return vae


def unet_from_ldm(state: Mapping[str, Tensor], unet_config: Mapping[str, Any], prefix: str = "") -> dict[str, Tensor]:
    """An LDM-named UNet (under ``prefix``) -> the diffusers UNet2DConditionModel state dict.
    Raises ValueError naming missing and unexpected keys."""
    present = {k: v for k, v in state.items() if k.startswith(prefix)}
    unet, problem = _component_from_ldm(present, unet_key_map(unet_config), prefix, "UNet")
    _raise_if([problem], "UNet weights do not fit the config")
    return unet


def from_ldm_checkpoint(
    state: Mapping[str, Tensor],
    family: Family,
    unet_config: Mapping[str, Any],
    vae_config: Mapping[str, Any],
) -> dict[str, dict[str, Tensor]]:
    """A single-file LDM checkpoint -> ``{'unet', 'vae', 'text_encoder'[, 'text_encoder_2']}`` state dicts.

    UNet and VAE names come out as diffusers names, text encoders as HF CLIP names in file
    spelling (``text_model.encoder...``; OpenCLIP layouts are unfused and transposed back). An SD2
    text encoder comes out whole (every OpenCLIP layer and ``text_projection.weight``); diffusers'
    SD2 ``CLIPTextModel`` has one layer fewer and no projection, so the caller drops the rest.
    Keys outside the component prefixes (noise-schedule buffers, ``model_ema.``) are ignored.
    Raises ValueError naming the missing and unexpected keys (the first few and the counts) when
    the checkpoint does not fit the configs.
    """
    unet, unet_problem = _component_from_ldm(state, unet_key_map(unet_config), family.denoiser_checkpoint_prefix, "UNet")
    vae, vae_problem = _vae_from_ldm(state, vae_config, family.vae_checkpoint_prefix)
    result = {"unet": unet, "vae": vae}
    problems = [unet_problem, vae_problem]
    for number, text in enumerate(family.text_encoders, start=1):
        what = "text encoder" + (f" {number}" if number > 1 else "")
        result[text.component], problem = _text_from_ldm(state, text.checkpoint_prefix, text.open_clip, what)
        problems.append(problem)
    _raise_if(problems, "checkpoint does not fit the configs")
    return result
