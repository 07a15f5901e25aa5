"""State dicts (and metadata) for writing a :class:`LoRA` as a kohya or a diffusers/PEFT file.

Names are converted only through the base model (its placement and its ``kohya_names``):
kohya's underscores are ambiguous, so a name is never guessed. Module formats that the target
naming cannot express (LoHa, LoKr, DoRA, LoCon with a Tucker ``mid``, full diffs in diffusers
files) become plain LoRA by an SVD of the module's delta; in kohya files every LyCORIS module is
kept as it is (its keys are kohya-named), and the file says ``ss_network_module: lycoris.kohya``.
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
from .model import FullModule, LoHaModule, LoKrModule, LoRA, LoRAModule, Module
from .ops import svd_lowrank
from .peft import ADAPTER_METADATA_KEY
from .placement import place
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


def _targets(lora: LoRA, base: LoRATarget | None) -> dict[str, str]:
    """file key -> target for every module of ``lora`` that has a place in ``base``."""
    if base is None:
        return {}
    return {module.key: target for target, module in place(lora, base).placed.items()}


def _output_name(key: str, naming: str, targets: dict[str, str], kohya_names: dict[str, str]) -> str:
    target = targets.get(key)
    if naming == "kohya":
        if target is not None:
            return kohya_names[target]
        if families.is_kohya_key(key):
            return key
    else:
        if target is not None:
            return target
        if _is_diffusers(key):
            return key
    if not targets:
        raise LoRAError(f"module '{key}' must be renamed for a {naming} file, and names are converted only "
                        "through the base model: connect the model (the base this LoRA is for) to SaveLoRA")
    raise LoRAError(f"module '{key}' has no place in the connected model, so it cannot be renamed for a "
                    f"{naming} file; is the LoRA for another model?")


def output_names(lora: LoRA, naming: str, base: LoRATarget | None = None) -> dict[str, str]:
    """file key -> the module's name in ``naming`` (``kohya`` or ``diffusers``).

    Names already in that naming are kept when the module has no place in ``base`` (or there is no
    base); every other name is converted through ``base``, and a module that needs converting
    without a base (or has no place in it) raises :class:`LoRAError`.
    """
    targets = _targets(lora, base)
    kohya_names = dict(base.kohya_names) if base is not None else {}
    names = {key: _output_name(key, naming, targets, kohya_names) for key in lora.modules}
    seen: dict[str, str] = {}
    for key, name in names.items():
        if name in seen:
            raise LoRAError(f"modules '{seen[name]}' and '{key}' both target '{name}'")
        seen[name] = key
    return names


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
    """The dtype of the module's factors (not of its DoRA scale or bias)."""
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


def _plain_modules(lora: LoRA, base: LoRATarget | None, rank: int) -> tuple[dict[str, LoRAModule], dict[str, float]]:
    """Every module of ``lora`` as a plain LoRA (converted where needed), in its target's layout."""
    targets = _targets(lora, base)
    modules, energy = {}, {}
    for key, module in lora.modules.items():
        target = targets.get(key)
        if module.is_plain:
            plain = module
        else:
            plain, energy[key] = to_plain(module, target, base, rank)
        if target is not None:
            plain = _in_layout(plain, _target_shape(module, target, base))
        modules[key] = plain
    return modules, energy


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
    return network_metadata(lora.metadata, lycoris=any(not m.is_plain for m in modules.values()),
                            dims={m.rank for m in ranked}, alphas={_alpha(m) for m in ranked},
                            base_model_version=base_model_version(lora, base))


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


def kohya_file(lora: LoRA, base: LoRATarget | None = None) -> LoRAFile:
    """``lora`` in kohya naming: ``lora_unet_*`` / ``lora_te*_*`` keys, every module kept as it is.

    LoCon ``mid``, LoHa, LoKr, full diffs and DoRA keep their LyCORIS keys (``ss_network_module`` is
    then ``lycoris.kohya``). With ``base`` every placed module gets kohya's canonical name (SGM names
    for SDXL UNets) and plain factors the layout of their target.
    """
    names = output_names(lora, "kohya", base)
    targets = _targets(lora, base)
    tensors: dict[str, Tensor] = {}
    for key, module in lora.modules.items():
        if module.is_plain and key in targets:
            module = _in_layout(module, _target_shape(module, targets[key], base))
        tensors.update(kohya_tensors(names[key], module))
    metadata = kohya_metadata(lora, lora.modules, base)
    tensors = _contiguous(tensors)
    metadata["sshs_model_hash"], metadata["sshs_legacy_hash"] = addnet_hashes(tensors, metadata)
    return LoRAFile(tensors, metadata)


# --------------------------------------------------------------------------- diffusers


def _peft_name(name: str) -> str:
    """A module path as PEFT sees it inside its component: CLIP's ``text_model.`` level left out.

    PEFT matches ``target_modules`` and patterns as name suffixes, so the short form fits both
    CLIP spellings (transformers < 5 nests ``text_model.``; 5 does not).
    """
    path = name.split(".", 1)[1]
    return path.removeprefix("text_model.")


def _uniform(modules: dict[str, LoRAModule], names: dict[str, str]) -> dict[str, tuple[int, float]] | None:
    """component -> (rank, alpha) when every module of each component shares both; else None."""
    found: dict[str, set[tuple[int, float]]] = {}
    for key, module in modules.items():
        found.setdefault(families.component_of(names[key]), set()).add((module.rank, _alpha(module)))
    if any(len(pairs) != 1 for pairs in found.values()):
        return None
    return {component: pairs.pop() for component, pairs in found.items()}


def adapter_metadata(modules: dict[str, LoRAModule], names: dict[str, str],
                     uniform: dict[str, tuple[int, float]]) -> dict[str, object]:
    """diffusers' ``lora_adapter_metadata``: ``LoraConfig`` arguments per component, prefixed."""
    metadata: dict[str, object] = {}
    for component, (rank, alpha) in sorted(uniform.items()):
        targets = sorted(_peft_name(names[k]) for k in modules if families.component_of(names[k]) == component)
        config = {"r": rank, "lora_alpha": alpha, "target_modules": targets, "use_dora": False,
                  "lora_bias": False}
        metadata.update({f"{component}.{k}": v for k, v in config.items()})
    return metadata


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
    names = output_names(lora, "diffusers", base)
    modules, energy = _plain_modules(lora, base, rank)
    uniform = _uniform(modules, names)
    metadata = {"format": "pt"}
    if uniform is None:
        modules = {k: _folded(m) for k, m in modules.items()}
    else:
        meta = adapter_metadata(modules, names, uniform)
        metadata[ADAPTER_METADATA_KEY] = json.dumps(meta, indent=2, sort_keys=True)
    tensors: dict[str, Tensor] = {}
    for key, module in modules.items():
        tensors[f"{names[key]}.lora_A.weight"] = module.down
        tensors[f"{names[key]}.lora_B.weight"] = module.up
    return LoRAFile(_contiguous(tensors), metadata, {names[k]: e for k, e in energy.items()})


def _contiguous(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    return {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}


BUILDERS: dict[str, Callable[..., LoRAFile]] = {
    "kohya": lambda lora, base, rank: kohya_file(lora, base),
    "diffusers": diffusers_file,
}


def lora_file(lora: LoRA, fmt: str, base: LoRATarget | None = None, rank: int = 0) -> LoRAFile:
    """The tensors and metadata of ``lora`` as a ``kohya`` or ``diffusers`` file."""
    if fmt not in BUILDERS:
        raise LoRAError(f"unknown LoRA file format {fmt!r} (kohya or diffusers)")
    return BUILDERS[fmt](lora, base, rank)
