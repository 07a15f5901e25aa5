"""Convert between diffusers' transformer and the "BFL" single-file layout (Black Forest Labs' own
checkpoints, which ComfyUI loads as diffusion models).

A BFL checkpoint names the transformer by the original module tree (``double_blocks.N.img_attn.qkv``,
``single_blocks.N.linear1``, ``final_layer.adaLN_modulation.1``), bare or under ``diffusion_model.`` /
``model.diffusion_model.`` (ComfyUI's full checkpoints, which may also hold the VAE under ``vae.`` and
the text encoders under ``text_encoders.<name>.transformer.``). It differs from diffusers' tree by more
than names: q/k/v (and the single blocks' MLP input) are one fused weight, and the final adaLN keeps
its (shift, scale) halves the other way round. The family's ``original_modules`` rules say which rows
of which fused weight each diffusers module holds; this module only applies them to whole tensors
(weights and biases alike, row slices) and renames the RMSNorm scales, which no LoRA targets.

Every size (hidden width, heads, MLP width, channels, context and pooled widths, block counts,
guidance input) is read from the tensors. The RoPE axes are not stored in such files: a config that
has them (a config folder, or the configs our own files embed) is used when they fit the head dim,
else :func:`rope_axes` picks them.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping, Sequence
from functools import lru_cache
from typing import TYPE_CHECKING, Any

from ..families import Family, HostPiece
from ..families.flux import BFL_ROOTS, CHECKPOINT_PREFIXES

if TYPE_CHECKING:  # annotations only: validation imports this module, and must not import torch
    import torch
    from torch import Tensor

# (diffusers parameter, first row, end row) with rows of the BFL tensor: a diffusers tensor is the
# concatenation of its pieces' rows in the order listed (see LoRATarget.fused_targets)
Pieces = tuple[tuple[str, int, int], ...]

# the blocks of each tree, and the RMSNorm scales below a block (BFL name -> diffusers name)
_BLOCKS = {"double_blocks": "transformer_blocks", "single_blocks": "single_transformer_blocks"}
_NORMS = {
    "double_blocks": {"img_attn.norm.query_norm.scale": "attn.norm_q.weight",
                      "img_attn.norm.key_norm.scale": "attn.norm_k.weight",
                      "txt_attn.norm.query_norm.scale": "attn.norm_added_q.weight",
                      "txt_attn.norm.key_norm.scale": "attn.norm_added_k.weight"},
    "single_blocks": {"norm.query_norm.scale": "attn.norm_q.weight",
                      "norm.key_norm.scale": "attn.norm_k.weight"},
}
# FLUX.1's RoPE axes (its head dim is 128): the first axis (a time/index axis, zero for images)
# takes an eighth of the head dim, the two image axes share the rest
RELEASED_HEAD_DIM, RELEASED_AXES = 128, (16, 56, 56)
_MAX_NAMED = 5


# --------------------------------------------------------------------------- the transformer's keys


def checkpoint_prefix(keys: Sequence[str]) -> str | None:
    """The prefix the transformer's keys carry in a file (``model.diffusion_model.``,
    ``diffusion_model.`` or none), or None when no key names a BFL transformer module."""
    for prefix in (*CHECKPOINT_PREFIXES, ""):
        if any(key.startswith(prefix) and key[len(prefix):].startswith(BFL_ROOTS) for key in keys):
            return prefix
    return None


def transformer_state(state: Mapping[str, Any]) -> dict[str, Any]:
    """The transformer's entries of a checkpoint (tensors or shapes), prefix removed; other
    components' keys (``vae.``, ``text_encoders.``) and anything else are left out."""
    prefix = checkpoint_prefix(list(state))
    if prefix is None:
        return {}
    return {key[len(prefix):]: value for key, value in state.items()
            if key.startswith(prefix) and key[len(prefix):].startswith(BFL_ROOTS)}


def _some(keys: Sequence[str]) -> str:
    keys = sorted(keys)
    shown = ", ".join(repr(k) for k in keys[:_MAX_NAMED])
    return shown + (f", ... ({len(keys)} in all)" if len(keys) > _MAX_NAMED else "")


# --------------------------------------------------------------------------- config from the tensors


def rope_axes(head_dim: int, given: Sequence[int] | None = None) -> tuple[int, int, int]:
    """The RoPE axes for a head dim: ``given`` when they fit (three even sizes summing to the head
    dim), FLUX.1's (16, 56, 56) for 128, else the same split scaled: an eighth of the head dim
    (at least 2) to the first axis and the rest halved between the two image axes, every axis even
    (rotary embeddings rotate pairs of channels)."""
    if given is not None and len(given) == 3 and sum(given) == head_dim and all(int(a) % 2 == 0 for a in given):
        return tuple(int(a) for a in given)  # type: ignore[return-value]
    if head_dim == RELEASED_HEAD_DIM:
        return RELEASED_AXES
    if head_dim % 2 or head_dim < 6:
        raise ValueError(f"head dim {head_dim} cannot be split into three even rotary axes")
    pairs = head_dim // 2
    first = max(1, round(pairs / 8))
    second = (pairs - first) // 2
    return 2 * first, 2 * second, 2 * (pairs - first - second)


def _count(keys: Iterable[str], blocks: str) -> int:
    """How many blocks ``blocks.N.`` the keys name: one more than the highest N (0 for none)."""
    pattern = re.compile(rf"{re.escape(blocks)}\.(\d+)\.")
    indices = {int(m.group(1)) for key in keys if (m := pattern.match(key))}
    return max(indices) + 1 if indices else 0


def _shape(shapes: Mapping[str, Sequence[int]], key: str) -> list[int]:
    if key not in shapes:
        raise ValueError(f"not a complete BFL transformer: it has no {key!r}")
    return [int(n) for n in shapes[key]]


def transformer_config(shapes: Mapping[str, Sequence[int]], known: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The diffusers transformer config of a BFL transformer, from its keys and shapes (prefix removed).

    ``known``: a config for the same model from elsewhere (a config folder, embedded metadata);
    only its RoPE axes are taken, when they fit the head dim. Raises ValueError for a transformer
    diffusers cannot hold (an MLP width other than 4x the hidden width) or one that lacks a key
    the sizes are read from.
    """
    keys = list(shapes)
    doubles, singles = _count(keys, "double_blocks"), _count(keys, "single_blocks")
    hidden, in_channels = _shape(shapes, "img_in.weight")
    if doubles:
        head_dim = _shape(shapes, "double_blocks.0.img_attn.norm.query_norm.scale")[0]
        mlp = _shape(shapes, "double_blocks.0.img_mlp.0.weight")[0]
    elif singles:
        head_dim = _shape(shapes, "single_blocks.0.norm.query_norm.scale")[0]
        mlp = _shape(shapes, "single_blocks.0.linear1.weight")[0] - 3 * hidden
    else:
        raise ValueError("not a BFL transformer: it has no double_blocks or single_blocks")
    if hidden % head_dim:
        raise ValueError(f"the hidden width {hidden} is not a multiple of the head dim {head_dim}")
    if mlp != 4 * hidden:
        raise ValueError(f"its MLP width {mlp} is not 4x its hidden width {hidden}, which diffusers' transformer "
                         "cannot hold")
    out_channels = _shape(shapes, "final_layer.linear.weight")[0]
    config: dict[str, Any] = {
        "patch_size": 1,  # the pipeline packs 2x2 latent patches into channels before the transformer
        "in_channels": in_channels,
        "out_channels": out_channels if out_channels != in_channels else None,
        "num_layers": doubles,
        "num_single_layers": singles,
        "attention_head_dim": head_dim,
        "num_attention_heads": hidden // head_dim,
        "joint_attention_dim": _shape(shapes, "txt_in.weight")[1],
        "pooled_projection_dim": _shape(shapes, "vector_in.in_layer.weight")[1],
        "guidance_embeds": "guidance_in.in_layer.weight" in shapes,
    }
    config["axes_dims_rope"] = rope_axes(head_dim, (known or {}).get("axes_dims_rope"))
    return config


# --------------------------------------------------------------------------- the key plan


def _config_json(config: Mapping[str, Any]) -> str:
    config = getattr(config, "config", config)
    return json.dumps({k: v for k, v in dict(config).items() if not k.startswith("_")}, sort_keys=True, default=str)


@lru_cache(maxsize=8)
def _diffusers_shapes(class_name: str, config_json: str) -> dict[str, tuple[int, ...]]:
    """Parameter name -> shape of the diffusers model built from the config on the meta device."""
    import diffusers  # deferred: diffusers takes seconds to import
    import torch

    with torch.device("meta"):
        model = getattr(diffusers, class_name).from_config(json.loads(config_json))
    return {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}


@lru_cache(maxsize=8)
def _plan(family: Family, config_json: str) -> dict[str, Pieces]:
    """BFL parameter name -> the diffusers parameters (and their rows) it holds, in its row order.

    Linear weights and biases follow the family's module rules; a fused module whose pieces another
    fused module already covers (a LoRA-only view of some of its rows) is not a tensor of the file.
    """
    if family.original_modules is None:
        raise ValueError(f"{family.display_name} has no original module tree to convert to")
    shapes = _diffusers_shapes(family.denoiser_class, config_json)
    linears = {name[: -len(".weight")]: shape for name, shape in shapes.items()
               if name.endswith(".weight") and len(shape) == 2}
    renamed, fused = family.original_modules(linears)
    modules: dict[str, Pieces] = {bfl: ((path, 0, linears[path][0]),) for path, bfl in renamed.items()}
    covered = {path for pieces in modules.values() for path, _, _ in pieces}
    for bfl, pieces in sorted(fused.items(), key=lambda item: -len(item[1])):
        paths = {path for path, _, _ in pieces}
        if not paths & covered:
            modules[bfl] = pieces
            covered |= paths
    plan = {f"{bfl}.{kind}": tuple((f"{path}.{kind}", start, end) for path, start, end in pieces)
            for bfl, pieces in modules.items() for kind in ("weight", "bias")
            if all(f"{path}.{kind}" in shapes for path, _, _ in pieces)}
    plan.update(_norm_plan(shapes))
    _check_covers(plan, shapes)
    return plan


def _norm_plan(shapes: Mapping[str, Sequence[int]]) -> dict[str, Pieces]:
    plan = {}
    for bfl_block, block in _BLOCKS.items():
        for n in range(_count(shapes, block)):
            for bfl, name in _NORMS[bfl_block].items():
                target = f"{block}.{n}.{name}"
                if target in shapes:
                    plan[f"{bfl_block}.{n}.{bfl}"] = ((target, 0, int(shapes[target][0])),)
    return plan


def _check_covers(plan: Mapping[str, Pieces], shapes: Mapping[str, Sequence[int]]) -> None:
    """Every diffusers parameter is held by exactly one BFL tensor, all of its rows once."""
    rows: dict[str, int] = {}
    for pieces in plan.values():
        for path, start, end in pieces:
            rows[path] = rows.get(path, 0) + end - start
    unmapped = [name for name in shapes if rows.get(name, 0) != (shapes[name][0] if shapes[name] else 1)]
    if unmapped:
        raise ValueError(f"unsupported transformer: no BFL name for {_some(unmapped)}")


def bfl_key_plan(family: Family, config: Mapping[str, Any]) -> dict[str, Pieces]:
    """BFL parameter name (no prefix) -> its pieces ``(diffusers parameter, first row, end row)``,
    rows of the BFL tensor, for a transformer with this diffusers config (see :data:`Pieces`)."""
    return dict(_plan(family, _config_json(config)))


def original_pieces(family: Family, config: Mapping[str, Any]) -> dict[str, tuple[HostPiece, ...]]:
    """The diffusers transformer's parameter -> where the BFL tree keeps it: each piece a BFL
    parameter (no prefix), its rows, and which of our rows they are (as :func:`from_bfl` cuts them)."""
    taken: dict[str, int] = {}
    pieces: dict[str, list[HostPiece]] = {}
    for key, plan in bfl_key_plan(family, config).items():
        for path, start, end in plan:
            first = taken.get(path, 0)
            pieces.setdefault(path, []).append(HostPiece(key, range(start, end), range(first, first + end - start)))
            taken[path] = first + end - start
    return {path: tuple(found) for path, found in pieces.items()}


# --------------------------------------------------------------------------- conversion


def from_bfl(state: Mapping[str, Tensor], family: Family, config: Mapping[str, Any],
             dtype: torch.dtype | None = None) -> dict[str, Tensor]:
    """A BFL transformer state dict (prefix removed) -> the diffusers transformer's, cast to ``dtype``
    (floating tensors; None keeps theirs). Fused tensors are split by rows, the final adaLN's halves
    swapped. Raises ValueError naming the missing and unexpected keys, or a tensor of the wrong size."""
    import torch

    plan = bfl_key_plan(family, config)
    missing, unexpected = set(plan) - set(state), set(state) - set(plan)
    if missing or unexpected:
        parts = [f"{len(missing)} missing keys: {_some(list(missing))}"] if missing else []
        parts += [f"{len(unexpected)} unexpected keys: {_some(list(unexpected))}"] if unexpected else []
        raise ValueError("transformer: " + "; ".join(parts))
    chunks: dict[str, list[Tensor]] = {}
    for key, pieces in plan.items():
        tensor = state[key]
        if dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(dtype)
        rows = max(end for _, _, end in pieces)
        if tensor.shape[0] != rows:
            raise ValueError(f"transformer: {key!r} has {tensor.shape[0]} rows where its config needs {rows}")
        for path, start, end in pieces:
            chunks.setdefault(path, []).append(tensor[start:end])
    return {path: parts[0] if len(parts) == 1 else torch.cat(parts) for path, parts in chunks.items()}


def to_bfl(state: Mapping[str, Tensor], family: Family, config: Mapping[str, Any]) -> dict[str, Tensor]:
    """The diffusers transformer's state dict -> BFL names (no prefix): q/k/v (and the single blocks'
    MLP input) concatenated by rows, the final adaLN's halves swapped. Renamed tensors are shared."""
    import torch

    out = {}
    for key, pieces in bfl_key_plan(family, config).items():
        placed, taken = [], {}  # (row in the BFL tensor, rows of a diffusers tensor); rows taken so far
        for path, start, end in pieces:
            first = taken.get(path, 0)
            placed.append((start, state[path][first:first + end - start]))
            taken[path] = first + end - start
        placed.sort(key=lambda item: item[0])
        parts = [tensor for _, tensor in placed]
        whole = len(parts) == 1 and parts[0].shape[0] == state[pieces[0][0]].shape[0]
        out[key] = state[pieces[0][0]] if whole else torch.cat(parts)
    return out
