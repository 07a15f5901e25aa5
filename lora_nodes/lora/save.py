"""State dicts (and metadata) for writing a :class:`LoRA` as a kohya or a diffusers/PEFT file.

Names are converted only through the base model (its placement and its ``kohya_names``):
kohya's underscores are ambiguous, so a name is never guessed. Module formats that the target
naming cannot express (LoHa, LoKr, DoRA, LoCon with a Tucker ``mid``, full diffs in diffusers
files) become plain LoRA by an SVD of the module's delta; in kohya files every LyCORIS module is
kept as it is (its keys are kohya-named), and the file says ``ss_network_module: lycoris.kohya``.

Where the two namings cut a weight differently (Flux: kohya's fused q/k/v is three diffusers
modules), a fused module becomes one plain module per separate weight (its up's rows, the same
down) in diffusers files, and separate modules are fused into one for kohya files (down the
concatenation of each part's scaled down, up block-diagonal with zero rows where no part writes,
alpha = the total rank): the same change, exactly. A module that kohya names as it is (a fused
file module, or one weight) is written unchanged.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .. import families
from ..errors import LoRAError
from ..families import LoRATarget
from .metadata import BASE_MODEL_VERSION, network_metadata, ss_metadata
from .model import FullModule, LoHaModule, LoKrModule, LoRA, LoRAModule, Module, RowsModule
from .ops import svd_lowrank
from .peft import ADAPTER_METADATA_KEY
from .placement import Placement, fused_rows_of, place
from .recipe import patcher_of

# Module class -> {attribute: kohya / LyCORIS key suffix}; the inverse of formats.SUFFIXES.
KOHYA_PARTS: dict[type, dict[str, str]] = {
    LoRAModule: {"down": ".lora_down.weight", "up": ".lora_up.weight", "mid": ".lora_mid.weight"},
    LoHaModule: {"w1a": ".hada_w1_a", "w1b": ".hada_w1_b", "w2a": ".hada_w2_a", "w2b": ".hada_w2_b",
                 "t1": ".hada_t1", "t2": ".hada_t2"},
    LoKrModule: {"w1": ".lokr_w1", "w1a": ".lokr_w1_a", "w1b": ".lokr_w1_b", "w2": ".lokr_w2",
                 "w2a": ".lokr_w2_a", "w2b": ".lokr_w2_b", "t2": ".lokr_t2"},
    FullModule: {"diff": ".diff"},
}
COMMON_PARTS = {"dora_scale": ".dora_scale", "bias": ".diff_b"}

ENERGY_WARNING = 0.9999


@dataclass
class LoRAFile:
    """What to write: tensors, string metadata, and the energy each SVD-converted module kept."""

    tensors: dict[str, Tensor]
    metadata: dict[str, str]
    energy: dict[str, float] = field(default_factory=dict)  # output module name -> energy kept


# --------------------------------------------------------------------------- names


def _is_diffusers(key: str) -> bool:
    return families.naming_of(key) == "diffusers" and families.component_of(key) != families.UNKNOWN_COMPONENT


def _kept_name(key: str, naming: str, has_base: bool) -> str:
    """The name of a module that has no place in the base (or there is no base): its own, when it is
    already in ``naming``; anything else would be a guess."""
    if (naming == "kohya" and families.is_kohya_key(key)) or (naming == "diffusers" and _is_diffusers(key)):
        return key
    if not has_base:
        raise LoRAError(f"module '{key}' must be renamed for a {naming} file, and names are converted only "
                        "through the base model: connect the model (the base this LoRA is for) to SaveLoRA")
    raise LoRAError(f"module '{key}' has no place in the connected model, so it cannot be renamed for a "
                    f"{naming} file; is the LoRA for another model?")


def _add(out: dict[str, tuple[str, Module]], name: str, key: str, module: Module) -> None:
    """Put ``module`` (from file key ``key``) under ``name``; two modules for one name is an error."""
    if name in out:
        raise LoRAError(f"modules '{out[name][0]}' and '{key}' both target '{name}'")
    out[name] = (key, module)


# --------------------------------------------------------------------------- conversion to plain LoRA


def numerical_rank(delta: Tensor) -> int:
    """The rank of ``delta`` (conv kernels flattened) at float32 precision; at least 1."""
    matrix = delta.float().reshape(delta.shape[0], -1)
    return max(1, int(torch.linalg.matrix_rank(matrix)))


def _target_shape(module: Module, target: str | None, base: LoRATarget | None) -> tuple[int, ...]:
    if target is not None and base is not None:
        return tuple(base.lora_targets[target].weight.shape)
    return tuple(module.delta_shape)


def effective_delta(module: Module, target: str | None, base: LoRATarget | None) -> Tensor:
    """The module's weight change at strength 1, in float32, shaped like its target weight.

    For DoRA this is the merged weight minus the base's original weight, which needs the base.
    """
    if module.dora_scale is None:
        return module.delta(_target_shape(module, target, base))
    if base is None or target is None:
        raise LoRAError(f"module '{module.key}' is DoRA: its change depends on the base weight, so it "
                        "becomes a plain LoRA only with the base: connect the model to SaveLoRA")
    original = patcher_of(base).original(target).detach().to("cpu", torch.float32)
    merged = original.clone()
    module.apply_(merged, 1.0)
    return merged - original


def _dtype_of(module: Module) -> torch.dtype:
    """The dtype of the module's factors (not of its DoRA scale or bias; a slice's, its whole module's)."""
    while isinstance(module, RowsModule):
        module = module.inner
    tensors = [v for k, v in vars(module).items()
               if k not in COMMON_PARTS and isinstance(v, Tensor) and v.is_floating_point()]
    return tensors[0].dtype if tensors else torch.float32


def to_plain(module: Module, target: str | None, base: LoRATarget | None, rank: int) -> tuple[LoRAModule, float]:
    """``module`` as a plain LoRA by exact SVD of its delta; returns it and the energy kept.

    ``rank`` 0 takes the delta's numerical rank (exact up to float32 rounding).
    """
    delta = effective_delta(module, target, base)
    low, energy = svd_lowrank(delta, rank or numerical_rank(delta))
    dtype = _dtype_of(module)
    plain = LoRAModule(key=module.key, alpha=low.alpha, bias=module.bias,
                       down=low.down.to(dtype), up=low.up.to(dtype))
    return plain, energy


def _in_layout(module: LoRAModule, shape: tuple[int, ...]) -> LoRAModule:
    """A plain module's factors shaped for a weight of ``shape`` (2-D factors on a 1x1 conv and back)."""
    down = module.down.reshape(module.rank, *shape[1:])
    up = module.up.reshape(shape[0], module.rank, *([1] * (len(shape) - 2)))
    if down.shape == module.down.shape and up.shape == module.up.shape:
        return module
    return LoRAModule(key=module.key, alpha=module.alpha, bias=module.bias, down=down, up=up)


def _as_plain(module: Module, target: str | None, base: LoRATarget | None, rank: int) -> tuple[LoRAModule, float | None]:
    """``module`` as a plain LoRA: itself when it is one, else by SVD (:func:`to_plain`, energy kept)."""
    if module.is_plain:
        return module, None
    return to_plain(module, target, base, rank)


# --------------------------------------------------------------------------- kohya


def _alpha(module: Module) -> float | None:
    """The alpha a kohya file states: the module's, or its rank when it has none (scale 1)."""
    if module.rank is None:
        return None
    return float(module.alpha) if module.alpha is not None else float(module.rank)


def kohya_tensors(name: str, module: Module) -> dict[str, Tensor]:
    """One module's kohya / LyCORIS keys (``name.lora_down.weight``, ``name.alpha``, ...)."""
    parts = {**KOHYA_PARTS[type(module)], **COMMON_PARTS}
    tensors = {name + suffix: getattr(module, attr) for attr, suffix in parts.items()
               if getattr(module, attr) is not None}
    alpha = _alpha(module)
    if alpha is not None:
        tensors[f"{name}.alpha"] = torch.tensor(alpha, dtype=torch.float32)
    return tensors


def base_model_version(lora: LoRA, base: LoRATarget | None = None) -> str | None:
    """kohya's ``ss_base_model_version`` for the base (or, without one, what the LoRA says or shows).

    SD2 with v-prediction is ``sd_v2_v``, as sd-scripts writes it.
    """
    if base is None:
        family = lora.family
        return lora.metadata.get(BASE_MODEL_VERSION) or (family.kohya_version if family else None)
    return kohya_version(base)


def kohya_version(base: LoRATarget) -> str:
    """``ss_base_model_version`` of a loaded base, as sd-scripts writes it for its family."""
    return base.family.kohya_version_for(base.components)


def kohya_metadata(lora: LoRA, modules: dict[str, Module], base: LoRATarget | None = None) -> dict[str, str]:
    """The ``ss_*`` metadata: the input file's, with network module, dim, alpha and base version set."""
    ranked = [m for m in modules.values() if m.rank is not None]
    family = base.family if base is not None else lora.family
    network_module = family.kohya_network_module if family is not None else "networks.lora"
    return network_metadata(lora.metadata, lycoris=any(not m.is_plain for m in modules.values()),
                            dims={m.rank for m in ranked}, alphas={_alpha(m) for m in ranked},
                            base_model_version=base_model_version(lora, base), network_module=network_module)


def addnet_hashes(tensors: dict[str, Tensor], metadata: dict[str, str]) -> tuple[str, str]:
    """``(sshs_model_hash, sshs_legacy_hash)`` as kohya sd-scripts computes them.

    Both are taken over ``safetensors.torch.save(tensors, ss_metadata)`` where ``ss_metadata`` keeps
    only the ``ss_*`` keys: the model hash is the SHA-256 (hex) of every byte after the header (the
    8-byte little-endian header length and the header), the legacy hash the first 8 hex digits of
    the SHA-256 of the 0x10000 bytes at offset 0x100000 (sd-webui-additional-networks' hashes).
    """
    from safetensors.torch import save

    data = save(tensors, ss_metadata(metadata))
    header = int.from_bytes(data[:8], "little")
    model_hash = hashlib.sha256(data[8 + header:]).hexdigest()
    legacy_hash = hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8]
    return model_hash, legacy_hash


def _kohya_groups(lora: LoRA, base: LoRATarget, placement: Placement) -> dict[str, list[str]]:
    """kohya name -> the file keys whose changes it holds (several where kohya fuses what they split)."""
    groups: dict[str, list[str]] = {}
    sources = placement.sources
    for key in lora.modules:
        targets = sources.get(key)
        names = dict.fromkeys(base.kohya_names[t] for t in targets) if targets else [_kept_name(key, "kohya", True)]
        for name in names:
            groups.setdefault(name, []).append(key)
    return groups


def _written_as_it_is(name: str, keys: list[str], base: LoRATarget, placement: Placement) -> bool:
    """Whether one file module is the whole of kohya's module ``name`` (the same weight, rows in the
    same order), so it is written unchanged: kohya's own names, BFL's, a module the namings share."""
    if len(keys) != 1:
        return False
    index = base.lora_name_index
    return keys[0] not in placement.sources or index.get(keys[0]) == index.get(name)


def _fused_rows(name: str, base: LoRATarget) -> tuple[dict[str, Tensor], int]:
    """The rows of kohya's module ``name`` each target holds (in the target's order), and its row count."""
    entry = base.lora_name_index[name]
    pieces = base.fused_targets.get(entry) or ((entry, 0, int(base.lora_targets[entry].weight.shape[0])),)
    rows, fused_rows = fused_rows_of(pieces)
    return {t: torch.tensor([r for piece in ranges for r in piece], dtype=torch.long)
            for t, ranges in rows.items()}, fused_rows


def _blocks(parts: dict[str, Module], base: LoRATarget,
            rank: int) -> tuple[list[tuple[Tensor, dict[str, Tensor]]], float | None]:
    """One file module's change as plain (scaled down, {target: up}) blocks, and the energy an SVD kept.

    A plain module split over several targets (a fused file module) is one block: its down is shared.
    """
    modules = list(parts.values())
    shared = all(isinstance(m, LoRAModule) and m.is_plain and m.down is modules[0].down for m in modules)
    if shared:
        return [(modules[0].down.float() * modules[0].scale, {t: m.up for t, m in parts.items()})], None
    blocks, energies = [], []
    for target, module in parts.items():
        plain, energy = _as_plain(module, target, base, rank)
        if energy is not None:
            energies.append(energy)
        blocks.append((plain.down.float() * plain.scale, {target: plain.up}))
    return blocks, min(energies) if energies else None


def _fuse(name: str, keys: list[str], lora: LoRA, base: LoRATarget, placement: Placement,
          rank: int) -> tuple[LoRAModule, float | None]:
    """The file modules ``keys`` (parts of kohya's fused module ``name``) as one plain module of it:
    down = the blocks' scaled downs stacked, up block-diagonal (zero rows where no block writes), alpha
    = rank (scale 1). Exactly the sum of their changes."""
    rows, fused_rows = _fused_rows(name, base)
    downs, ups, bias, energies = [], [], None, []
    for key in keys:
        parts = {t: placement.placed[t] for t in placement.sources[key]}
        blocks, energy = _blocks(parts, base, rank)
        if energy is not None:
            energies.append(energy)
        for down, up_by_target in blocks:
            up = torch.zeros(fused_rows, down.shape[0])
            for target, part_up in up_by_target.items():
                up[rows[target]] = part_up.float().flatten(1)
            downs.append(down.flatten(1))
            ups.append(up)
        for target, part in parts.items():
            if part.bias is not None:
                bias = torch.zeros(fused_rows) if bias is None else bias
                bias[rows[target]] += part.bias.float()
    dtype = _dtype_of(lora.modules[keys[0]])
    down, up = torch.cat(downs).to(dtype), torch.cat(ups, dim=1).to(dtype)
    fused = LoRAModule(key=name, alpha=float(down.shape[0]), down=down, up=up,
                       bias=None if bias is None else bias.to(dtype))
    return fused, min(energies) if energies else None


def kohya_modules(lora: LoRA, base: LoRATarget | None = None, rank: int = 0) -> tuple[dict[str, Module], dict[str, float]]:
    """``lora``'s modules under kohya's names, and the energy kept where one had to become plain LoRA.

    Without ``base`` kohya-named modules keep their names and nothing else can be named. With it,
    every placed module gets kohya's canonical name (SGM names for SDXL UNets, BFL names for Flux);
    a module that is the whole of one kohya module is kept as it is (plain factors in its target's
    layout), and modules that kohya fuses (Flux's q/k/v) are fused (see :func:`_fuse`; LyCORIS parts
    become plain LoRA by SVD at ``rank``, 0: exact).
    """
    if base is None:
        out: dict[str, tuple[str, Module]] = {}
        for key, module in lora.modules.items():
            _add(out, _kept_name(key, "kohya", False), key, module)
        return {name: module for name, (_, module) in out.items()}, {}
    placement = place(lora, base)
    modules, energy = {}, {}
    for name, keys in _kohya_groups(lora, base, placement).items():
        if _written_as_it_is(name, keys, base, placement):
            module = lora.modules[keys[0]]
            target = base.lora_name_index.get(keys[0])
            if module.is_plain and keys[0] in placement.sources and target in base.lora_targets:
                module = _in_layout(module, _target_shape(module, target, base))
            modules[name] = module
            continue
        unplaced = [k for k in keys if k not in placement.sources]
        if unplaced:  # a module with no place, already kohya-named as a placed one is named
            other = next(k for k in keys if k != unplaced[0])
            raise LoRAError(f"modules '{other}' and '{unplaced[0]}' both target '{name}'")
        modules[name], kept = _fuse(name, keys, lora, base, placement, rank)
        if kept is not None:
            energy[name] = kept
    return modules, energy


def kohya_file(lora: LoRA, base: LoRATarget | None = None, rank: int = 0) -> LoRAFile:
    """``lora`` in kohya naming: ``lora_unet_*`` / ``lora_te*_*`` keys (see :func:`kohya_modules`).

    LoCon ``mid``, LoHa, LoKr, full diffs and DoRA keep their LyCORIS keys where kohya names their
    module as the file does (``ss_network_module`` is then ``lycoris.kohya``).
    """
    modules, energy = kohya_modules(lora, base, rank)
    tensors: dict[str, Tensor] = {}
    for name, module in modules.items():
        tensors.update(kohya_tensors(name, module))
    metadata = kohya_metadata(lora, modules, base)
    tensors = _contiguous(tensors)
    metadata["sshs_model_hash"], metadata["sshs_legacy_hash"] = addnet_hashes(tensors, metadata)
    return LoRAFile(tensors, metadata, energy)


# --------------------------------------------------------------------------- diffusers


def _peft_name(name: str) -> str:
    """A module path as PEFT sees it inside its component: CLIP's ``text_model.`` level left out.

    PEFT matches ``target_modules`` and patterns as name suffixes, so the short form fits both
    CLIP spellings (transformers < 5 nests ``text_model.``; 5 does not).
    """
    path = name.split(".", 1)[1]
    return path.removeprefix("text_model.")


def _uniform(modules: dict[str, LoRAModule]) -> dict[str, tuple[int, float]] | None:
    """component -> (rank, alpha) when every module of each component shares both; else None."""
    found: dict[str, set[tuple[int, float]]] = {}
    for name, module in modules.items():
        found.setdefault(families.component_of(name), set()).add((module.rank, _alpha(module)))
    if any(len(pairs) != 1 for pairs in found.values()):
        return None
    return {component: pairs.pop() for component, pairs in found.items()}


def adapter_metadata(modules: dict[str, LoRAModule], uniform: dict[str, tuple[int, float]]) -> dict[str, object]:
    """diffusers' ``lora_adapter_metadata``: ``LoraConfig`` arguments per component, prefixed."""
    metadata: dict[str, object] = {}
    for component, (rank, alpha) in sorted(uniform.items()):
        targets = sorted(_peft_name(name) for name in modules if families.component_of(name) == component)
        config = {"r": rank, "lora_alpha": alpha, "target_modules": targets, "use_dora": False,
                  "lora_bias": False}
        metadata.update({f"{component}.{k}": v for k, v in config.items()})
    return metadata


def diffusers_modules(lora: LoRA, base: LoRATarget | None = None,
                      rank: int = 0) -> tuple[dict[str, LoRAModule], dict[str, float]]:
    """``lora``'s modules as plain LoRA under diffusers' names (its targets in ``base``), and the
    energy kept by those converted by SVD. A fused module becomes one module per target it covers
    (its up's rows; down, rank and alpha shared: exact). Without ``base`` only modules already
    diffusers-named can be written."""
    placement = place(lora, base) if base is not None else None
    out: dict[str, tuple[str, Module]] = {}
    energy: dict[str, float] = {}
    for key, module in lora.modules.items():
        targets = placement.sources.get(key, []) if placement is not None else []
        if not targets:
            parts = {_kept_name(key, "diffusers", base is not None): (None, module)}
        else:
            parts = {target: (target, placement.placed[target]) for target in targets}
        for name, (target, part) in parts.items():
            plain, kept = _as_plain(part, target, base, rank)
            _add(out, name, key, plain if target is None else _in_layout(plain, _target_shape(part, target, base)))
            if kept is not None:
                energy[name] = kept
    return {name: module for name, (_, module) in out.items()}, energy


def _folded(module: LoRAModule) -> LoRAModule:
    """The same delta with ``alpha / rank`` multiplied into ``up``, so that alpha = rank."""
    up = (module.up.float() * module.scale).to(module.up.dtype)
    return LoRAModule(key=module.key, alpha=float(module.rank), down=module.down, up=up)


def diffusers_file(lora: LoRA, base: LoRATarget | None = None, rank: int = 0) -> LoRAFile:
    """``lora`` in diffusers/PEFT naming (``unet.<path>.lora_A.weight`` / ``.lora_B.weight``).

    Modules that are not plain LoRA become plain LoRA by SVD of their delta (``rank``; 0: exact).
    DoRA's delta depends on the base weight, so it is taken against ``base``'s original weights
    (merged at strength 1 minus original): the plain LoRA equals the DoRA one at strength 1 only.

    Alpha: when every module of each component has the same rank and alpha, the factors are
    written as they are and diffusers' ``lora_adapter_metadata`` states ``r`` and ``lora_alpha``
    per component (what ``save_lora_weights`` writes; ``load_lora_weights`` and our reader honour
    it). Otherwise ``alpha / rank`` is folded into each ``lora_B`` and no alpha is written, which
    every reader takes as alpha = rank (diffusers then finds per-module ranks from the shapes).
    Readers that ignore the metadata (ComfyUI) see scale 1 in the first case.
    """
    if any(m.bias is not None for m in lora.modules.values()):
        raise LoRAError("this LoRA changes biases (.diff_b), which a diffusers LoRA file cannot hold; "
                        "save it in kohya format")
    modules, energy = diffusers_modules(lora, base, rank)
    uniform = _uniform(modules)
    metadata = {"format": "pt"}
    if uniform is None:
        modules = {name: _folded(m) for name, m in modules.items()}
    else:
        meta = adapter_metadata(modules, uniform)
        metadata[ADAPTER_METADATA_KEY] = json.dumps(meta, indent=2, sort_keys=True)
    tensors: dict[str, Tensor] = {}
    for name, module in modules.items():
        tensors[f"{name}.lora_A.weight"] = module.down
        tensors[f"{name}.lora_B.weight"] = module.up
    return LoRAFile(_contiguous(tensors), metadata, energy)


def _contiguous(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """Every tensor on the CPU, contiguous, and in memory of its own: safetensors refuses tensors that
    share storage (the one down of a fused module, given to each weight it is split over)."""
    out, seen = {}, set()
    for key, value in tensors.items():
        value = value.detach().to("cpu").contiguous()
        storage = value.untyped_storage().data_ptr()
        out[key] = value.clone() if storage in seen else value
        seen.add(storage)
    return out


BUILDERS: dict[str, Callable[..., LoRAFile]] = {
    "kohya": kohya_file,
    "diffusers": diffusers_file,
}


def lora_file(lora: LoRA, fmt: str, base: LoRATarget | None = None, rank: int = 0) -> LoRAFile:
    """The tensors and metadata of ``lora`` as a ``kohya`` or ``diffusers`` file."""
    if fmt not in BUILDERS:
        raise LoRAError(f"unknown LoRA file format {fmt!r} (kohya or diffusers)")
    return BUILDERS[fmt](lora, base, rank)
