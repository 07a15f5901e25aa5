"""The configs of a model's parts when no config folder is given: read from the tensors' shapes as
far as shapes tell, the rest from the shipped configs of the released models (``configs/<family
id>.json``), or from a built-in's own configs when the weights are recognised as one of ours.

What shapes tell: every width and count (UNet channels per level, ResNets per level, which levels
attend, transformer layers per level, the context width, linear or convolutional projections,
SDXL-style added conditioning; the VAE's channels and latent channels; a text encoder's width,
depth, MLP width, vocabulary and positions, its projection).

What they do not: attention heads (the released models use 64-wide heads, or 8 heads per block
where their shipped config says so), GroupNorm groups (32), activations, the VAE's scaling and
shift factors, the size a model was trained at, the noise schedule and what the model predicts.
Those come from the family's shipped config; what a model predicts from a ``v_pred`` marker key
(ComfyUI writes one, and so do we) or the family's weight probe (see ``Family.v_prediction_probe``).

Our built-in models are recognised by their weights: a part whose parameters have exactly the
shapes of a built-in's part of the same family takes that built-in's config (heads, groups, its
VAE factors: ``builtin:shapes``' VAE scaling factor of about 0.986, which its weights file records).
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Mapping, Sequence
from functools import lru_cache
from math import gcd
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..families import Family
from .builtin import BUILTINS, builtin_family
from .builtin import builtin_configs as _build_builtin_configs

if TYPE_CHECKING:  # annotations only: validation imports this module, and must not import torch
    from torch import Tensor

CONFIGS = Path(__file__).with_name("configs")
V_PREDICTION_MARKER, ZERO_SNR_MARKER = "v_pred", "ztsnr"  # ComfyUI's keys beside the weights
Shapes = Mapping[str, Sequence[int]]
_GROUPS = 32  # GroupNorm groups of every released SD/Flux UNet and VAE


# --------------------------------------------------------------------------- shipped configs


@lru_cache(maxsize=8)
def _shipped(family_id: str) -> dict[str, Any]:
    path = CONFIGS / f"{family_id}.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def default_config(family: Family, part: str) -> dict[str, Any]:
    """The shipped config of ``part`` (``unet``, ``vae``, ``text_encoder``, ``scheduler`` ...) of
    the family's released model: what a base lacking that part assumes (the VAE's with its
    scaling_factor / shift_factor). A fresh copy; raises ValueError when none is shipped."""
    config = _shipped(family.id).get(part)
    if config is None:
        raise ValueError(f"no shipped {part} config for {family.display_name}")
    return copy.deepcopy(config)


def _variant(family: Family, objective: str) -> dict[str, dict[str, Any]]:
    """Config changes for a model of the family that predicts ``objective`` (the shipped file's
    ``variants``: e.g. the noise-prediction model trained at a smaller size)."""
    return copy.deepcopy(_shipped(family.id).get("variants", {}).get(objective, {}))


@lru_cache(maxsize=8)
def _builtin_configs(name: str) -> dict[str, Any]:
    return _build_builtin_configs(name)


def builtin_configs(name: str) -> dict[str, Any]:
    """A built-in's configs (see :func:`.builtin.builtin_configs`), a fresh copy; made once."""
    return copy.deepcopy(_builtin_configs(name))


# --------------------------------------------------------------------------- model classes


def model_class(family: Family, part: str) -> Any:
    """The diffusers or transformers class of a family's model part."""
    import diffusers  # deferred: diffusers and transformers take seconds to import
    import transformers

    if part == family.denoiser:
        return getattr(diffusers, family.denoiser_class)
    if part == family.vae:
        return getattr(diffusers, family.vae_class)
    return getattr(transformers, family.text_encoder(part).model_class)


def text_model_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """A text encoder's config as its transformers config class takes it (no private keys)."""
    return {k: v for k, v in config.items() if not k.startswith("_") and k not in ("architectures", "model_type")}


@lru_cache(maxsize=32)
def _parameter_shapes(family: Family, part: str, config_json: str) -> tuple[tuple[str, tuple[int, ...]], ...]:
    """The parameter names and shapes of ``part`` built from the config on the meta device."""
    import torch

    cls, config = model_class(family, part), json.loads(config_json)
    with torch.device("meta"):
        if part in family.text_components:
            model = cls(cls.config_class(**text_model_config(config)))
        else:
            model = cls.from_config(config)
    return tuple(sorted((name, tuple(t.shape)) for name, t in model.state_dict().items()))


def _same_architecture(family: Family, part: str, one: Mapping[str, Any], other: Mapping[str, Any]) -> bool:
    try:
        return _parameter_shapes(family, part, json.dumps(one, sort_keys=True)) == \
            _parameter_shapes(family, part, json.dumps(other, sort_keys=True))
    except (ValueError, TypeError, AttributeError):  # a built-in config that cannot hold it
        return False


def recognised(family: Family, part: str, config: Mapping[str, Any]) -> tuple[str, dict[str, Any]] | None:
    """The built-in (name, its configs) whose ``part`` has exactly the parameters ``config``
    builds, among the built-ins of ``family``; None when the part is none of ours."""
    for name in BUILTINS:
        if builtin_family(name) is not family:
            continue
        configs = _builtin_configs(name)
        if part in configs and _cheap_fit(config, configs[part]) and \
                _same_architecture(family, part, config, configs[part]):
            return name, copy.deepcopy(configs)
    return None


_WIDTHS = ("block_out_channels", "hidden_size", "d_model", "in_channels", "num_layers")


def _cheap_fit(config: Mapping[str, Any], builtin: Mapping[str, Any]) -> bool:
    """Whether the widths that both configs state agree (before building anything to compare)."""
    return all(list(_listed(config[k])) == list(_listed(builtin[k])) for k in _WIDTHS if k in config and k in builtin)


def _listed(value: Any) -> list[Any]:
    return list(value) if isinstance(value, (list, tuple)) else [value]


# --------------------------------------------------------------------------- from shapes: helpers


def _indices(shapes: Shapes, pattern: str) -> list[int]:
    """The sorted distinct N of keys matching ``pattern`` (a regex with one ``(\\d+)`` group)."""
    compiled = re.compile(pattern)
    return sorted({int(m.group(1)) for key in shapes if (m := compiled.match(key))})


def _shape(shapes: Shapes, key: str) -> list[int]:
    if key not in shapes:
        raise ValueError(f"it has no {key!r}")
    return [int(n) for n in shapes[key]]


def _groups(channels: Sequence[int], preferred: int) -> int:
    """``preferred`` GroupNorm groups where they divide every width, else the largest that does."""
    divisor = preferred
    for width in channels:
        divisor = gcd(divisor, int(width))
    return divisor


def _heads(width: int, head_width: int) -> int:
    """How many heads of ``head_width`` a ``width`` holds (1 when it holds none whole)."""
    return width // head_width if head_width and width % head_width == 0 and width >= head_width else 1


# --------------------------------------------------------------------------- the UNet (LDM names)


def _unet_levels(shapes: Shapes) -> list[dict[str, int]]:
    """Per down level of an LDM UNet: its width, ResNets, and transformer layers (0: no attention)."""
    levels: list[dict[str, int]] = [{"width": 0, "resnets": 0, "transformers": 0}]
    for index in _indices(shapes, r"input_blocks\.(\d+)\."):
        if index == 0:
            continue
        if f"input_blocks.{index}.0.op.weight" in shapes or f"input_blocks.{index}.0.op.bias" in shapes:
            levels.append({"width": 0, "resnets": 0, "transformers": 0})  # a downsampler closes the level
            continue
        level = levels[-1]
        level["width"] = _shape(shapes, f"input_blocks.{index}.0.out_layers.3.weight")[0]
        level["resnets"] += 1
        depth = _indices(shapes, rf"input_blocks\.{index}\.1\.transformer_blocks\.(\d+)\.")
        level["transformers"] = max(level["transformers"], len(depth))
    if not levels[0]["resnets"]:
        raise ValueError("it has no UNet input blocks")
    return levels


def unet_config(shapes: Shapes, family: Family) -> dict[str, Any]:
    """A diffusers UNet2DConditionModel config from an LDM UNet's keys and shapes (prefix removed),
    the rest from the family's shipped config (see the module's docstring)."""
    config = default_config(family, family.denoiser)
    levels = _unet_levels(shapes)
    widths = [level["width"] for level in levels]
    attends = [level["transformers"] > 0 for level in levels]
    layers = [level["resnets"] for level in levels]
    first = _shape(shapes, "input_blocks.0.0.weight")
    context = next((_shape(shapes, k)[1] for k in shapes if k.endswith("attn2.to_k.weight")), None)
    config.update({
        "in_channels": first[1],
        "out_channels": _shape(shapes, "out.2.weight")[0],
        "block_out_channels": widths,
        "layers_per_block": layers[0] if len(set(layers)) == 1 else layers,
        "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attends],
        "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attends)],
        "norm_num_groups": _groups(widths, config.get("norm_num_groups", _GROUPS)),
    })
    depths = [level["transformers"] or 1 for level in levels]
    if any(d != 1 for d in depths):
        config["transformer_layers_per_block"] = depths
    else:
        config.pop("transformer_layers_per_block", None)
    if context is not None:
        config["cross_attention_dim"] = context
    projection = next((k for k in shapes if k.endswith(".proj_in.weight")), None)
    config["use_linear_projection"] = projection is not None and len(shapes[projection]) == 2
    if not any(k.startswith("middle_block.1.transformer_blocks.") for k in shapes):
        config["mid_block_type"] = "UNetMidBlock2D"
    config["attention_head_dim"] = _unet_heads(config, widths, attends)
    _added_conditioning(config, shapes)
    return config


def _unet_heads(config: Mapping[str, Any], widths: Sequence[int], attends: Sequence[bool]) -> Any:
    """Heads per level (diffusers calls them ``attention_head_dim``): the shipped config's rule, 8
    heads everywhere (an int) or 64-wide heads (a list), applied to these widths."""
    shipped = config.get("attention_head_dim", 8)
    if isinstance(shipped, int):
        return shipped if all(w % shipped == 0 for w in widths) else 1
    head_width = max(config.get("block_out_channels", [64])) // max(shipped)  # 64 for the released models
    return [_heads(w, head_width) for w in widths]


def _added_conditioning(config: dict[str, Any], shapes: Shapes) -> None:
    """SDXL-style added conditioning (pooled text and size ids) when the UNet has ``label_emb``."""
    if "label_emb.0.0.weight" not in shapes:
        for key in ("addition_embed_type", "addition_time_embed_dim", "projection_class_embeddings_input_dim"):
            config.pop(key, None)
        return
    config["addition_embed_type"] = "text_time"
    config["projection_class_embeddings_input_dim"] = _shape(shapes, "label_emb.0.0.weight")[1]
    config.setdefault("addition_time_embed_dim", 256)


def fit_time_ids(config: dict[str, Any], pooled_width: int | None) -> None:
    """The width of each size/crop id's embedding, from the added conditioning's input width and
    the pooled text embedding's width (six ids), where they fit."""
    total = config.get("projection_class_embeddings_input_dim")
    if total is not None and pooled_width and total > pooled_width and (total - pooled_width) % 6 == 0:
        config["addition_time_embed_dim"] = (total - pooled_width) // 6


# --------------------------------------------------------------------------- the VAE (LDM or diffusers names)


def vae_config(shapes: Shapes, family: Family) -> dict[str, Any]:
    """A diffusers AutoencoderKL config from a VAE's keys and shapes (LDM names as single files
    keep them, or diffusers'; prefix removed), the rest from the family's shipped config."""
    config = default_config(family, family.vae)
    diffusers_names = any(k.startswith("encoder.down_blocks.") for k in shapes)
    level, resnet = (r"encoder\.down_blocks\.(\d+)\.", "encoder.down_blocks.{}.resnets") if diffusers_names else \
        (r"encoder\.down\.(\d+)\.", "encoder.down.{}.block")
    levels = _indices(shapes, level)
    if not levels:
        raise ValueError("it has no VAE encoder blocks")
    widths = [_shape(shapes, f"{resnet.format(i)}.0.conv2.weight")[0] for i in levels]
    layers = len(_indices(shapes, re.escape(resnet.format(0)) + r"\.(\d+)\."))
    mid_attention = "encoder.mid_block.attentions.0" if diffusers_names else "encoder.mid.attn_1"
    config.update({
        "in_channels": _shape(shapes, "encoder.conv_in.weight")[1],
        "out_channels": _shape(shapes, "decoder.conv_out.weight")[0],
        "latent_channels": _shape(shapes, "decoder.conv_in.weight")[1],
        "block_out_channels": widths,
        "layers_per_block": layers,
        "down_block_types": ["DownEncoderBlock2D"] * len(widths),
        "up_block_types": ["UpDecoderBlock2D"] * len(widths),
        "norm_num_groups": _groups(widths, config.get("norm_num_groups", _GROUPS)),
        "use_quant_conv": "quant_conv.weight" in shapes,
        "use_post_quant_conv": "post_quant_conv.weight" in shapes,
        "mid_block_add_attention": any(k.startswith(mid_attention) for k in shapes),
    })
    return config


# --------------------------------------------------------------------------- text encoders (Hugging Face names)


def text_config(shapes: Shapes, family: Family, part: str) -> dict[str, Any]:
    """A text encoder's transformers config from its keys and shapes (Hugging Face names, file
    spelling), the rest from the family's shipped config (heads keep its head width)."""
    config = default_config(family, part)
    if family.text_encoder(part).model_class.startswith("T5"):
        return _t5_config(shapes, config)
    hidden_key = next((k for k in shapes if k.endswith("embeddings.token_embedding.weight")), None)
    if hidden_key is None:
        raise ValueError("it has no CLIP token embedding")
    prefix = hidden_key[: -len("embeddings.token_embedding.weight")]
    vocab, hidden = _shape(shapes, hidden_key)
    head_width = config["hidden_size"] // config["num_attention_heads"]
    layers = _indices(shapes, re.escape(prefix) + r"encoder\.layers\.(\d+)\.")
    config.update({
        "vocab_size": vocab,
        "hidden_size": hidden,
        "num_attention_heads": _heads(hidden, head_width),
        "num_hidden_layers": len(layers),
        "intermediate_size": _shape(shapes, f"{prefix}encoder.layers.0.mlp.fc1.weight")[0],
        "max_position_embeddings": _shape(shapes, f"{prefix}embeddings.position_embedding.weight")[0],
    })
    if "text_projection.weight" in shapes:
        config["projection_dim"] = _shape(shapes, "text_projection.weight")[0]
        if family.text_encoder(part).cuts_last_layer:  # the whole original model: diffusers keeps one layer less
            config["num_hidden_layers"] -= 1
    return config


def _t5_config(shapes: Shapes, config: dict[str, Any]) -> dict[str, Any]:
    embedding = next((k for k in ("shared.weight", "encoder.embed_tokens.weight") if k in shapes), None)
    if embedding is None:
        raise ValueError("it has no T5 token embedding")
    vocab, width = _shape(shapes, embedding)
    attention = "encoder.block.0.layer.0.SelfAttention."
    buckets, heads = _shape(shapes, attention + "relative_attention_bias.weight")
    gated = "encoder.block.0.layer.1.DenseReluDense.wi_0.weight" in shapes
    feed = "encoder.block.0.layer.1.DenseReluDense." + ("wi_0.weight" if gated else "wi.weight")
    config.update({
        "vocab_size": vocab,
        "d_model": width,
        "num_heads": heads,
        "d_kv": _shape(shapes, attention + "q.weight")[0] // heads,
        "d_ff": _shape(shapes, feed)[0],
        "num_layers": len(_indices(shapes, r"encoder\.block\.(\d+)\.")),
        "relative_attention_num_buckets": buckets,
        "feed_forward_proj": config.get("feed_forward_proj", "gated-gelu") if gated else "relu",
    })
    return config


# --------------------------------------------------------------------------- a whole base


def part_config(family: Family, part: str, shapes: Shapes,
                pooled_width: int | None = None) -> tuple[dict[str, Any], str | None]:
    """The config of one model part from its state's shapes (names as :func:`unet_config`,
    :func:`vae_config` and :func:`text_config` read them), and the built-in it is when its
    parameters are exactly a built-in's (then that built-in's config). ``pooled_width``: the
    pooled text embedding's width, for a UNet with added conditioning."""
    if part == family.denoiser:
        config = unet_config(shapes, family)
        fit_time_ids(config, pooled_width)
    elif part == family.vae:
        config = vae_config(shapes, family)
    else:
        config = text_config(shapes, family, part)
    found = recognised(family, part, config)
    return (copy.deepcopy(found[1][part]), found[0]) if found else (config, None)


def objective_of(family: Family, state: Mapping[str, Tensor]) -> str:
    """What a checkpoint's denoiser predicts: ``v_prediction`` when it carries the ``v_pred``
    marker, or when the family's probe weight spreads wider than its threshold; else ``epsilon``
    (flow-matching families: ``flow_matching``)."""
    if family.flow_matching:
        return "flow_matching"
    if V_PREDICTION_MARKER in state:
        return "v_prediction"
    probe = family.v_prediction_probe
    weight = state.get(probe[0]) if probe is not None else None
    if weight is not None and weight.device.type != "meta" and float(weight.float().std(unbiased=False)) > probe[1]:
        return "v_prediction"
    return "epsilon"


def scheduler_config(family: Family, objective: str, zero_snr: bool = False,
                     builtin: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The noise schedule of a base: a built-in's own, else the family's shipped one, predicting
    ``objective``; ``zero_snr``: trained with a zero terminal SNR (ComfyUI's ``ztsnr`` marker)."""
    config = copy.deepcopy(dict(builtin)) if builtin is not None else default_config(family, "scheduler")
    if objective in ("epsilon", "v_prediction"):
        config["prediction_type"] = objective
    if zero_snr:
        config.update(rescale_betas_zero_snr=True, timestep_spacing="trailing")
    return config


def apply_variant(configs: dict[str, Any], family: Family, objective: str) -> None:
    """The shipped changes for a model predicting ``objective`` (the size it was trained at)."""
    for part, changes in _variant(family, objective).items():
        if part in configs:
            configs[part].update(changes)
