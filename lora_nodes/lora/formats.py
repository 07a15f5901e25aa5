"""LoRA formats: a state dict's keys grouped into modules, and each module's structure checked.

Formats are told apart by key suffixes; a table maps each suffix to the part it holds, so a new
spelling is one line. Reading files is :mod:`.files`; placing modules on a base, :mod:`.placement`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from .. import families
from ..errors import LoRAError
from .metadata import metadata_warnings
from .model import FullModule, LoHaModule, LoKrModule, LoRA, LoRAModule, Module
from .peft import peft_alphas

if TYPE_CHECKING:  # annotations only: reading a LoRA's header (validation) must not import torch
    from torch import Tensor

# key suffix -> (part, naming); naming None: the suffix says nothing about the naming.
SUFFIXES: dict[str, tuple[str, str | None]] = {
    ".lora_down.weight": ("down", None),
    ".lora_up.weight": ("up", None),
    ".lora_mid.weight": ("mid", None),
    ".alpha": ("alpha", None),
    ".dora_scale": ("dora_scale", None),
    ".lora_A.weight": ("down", "diffusers"),
    ".lora_B.weight": ("up", "diffusers"),
    ".lora_A.default.weight": ("down", "diffusers"),
    ".lora_B.default.weight": ("up", "diffusers"),
    ".lora.down.weight": ("down", "diffusers-old"),
    ".lora.up.weight": ("up", "diffusers-old"),
    ".lora_linear_layer.down.weight": ("down", "diffusers-old"),
    ".lora_linear_layer.up.weight": ("up", "diffusers-old"),
    "_lora.down.weight": ("down", "diffusers-old"),  # attention processors: ...processor.to_q_lora.down
    "_lora.up.weight": ("up", "diffusers-old"),
    # the same LoRALinearLayer under other processor names (XLabs' ...processor.qkv_lora1.down); the
    # longer suffixes above are tried first, so this one only takes what they leave
    ".down.weight": ("down", "diffusers-old"),
    ".up.weight": ("up", "diffusers-old"),
    ".hada_w1_a": ("w1a", None),
    ".hada_w1_b": ("w1b", None),
    ".hada_w2_a": ("w2a", None),
    ".hada_w2_b": ("w2b", None),
    ".hada_t1": ("t1", None),
    ".hada_t2": ("t2", None),
    ".lokr_w1": ("w1", None),
    ".lokr_w1_a": ("w1a_kr", None),
    ".lokr_w1_b": ("w1b_kr", None),
    ".lokr_w2": ("w2", None),
    ".lokr_w2_a": ("w2a_kr", None),
    ".lokr_w2_b": ("w2b_kr", None),
    ".lokr_t2": ("t2_kr", None),
    ".diff": ("diff", None),
    ".diff_b": ("diff_b", None),
}
_SUFFIXES_LONGEST_FIRST = sorted(SUFFIXES, key=len, reverse=True)
PEFT_WRAPPER = "base_model.model."  # what PEFT's own state dicts put before every module path


def parse_lora(tensors: dict[str, Tensor], metadata: dict[str, str] | None = None,
               name: str = "lora", path: str = "") -> LoRA:
    """Group a LoRA state dict into modules; raise :class:`LoRAError` when it is not a LoRA we read.

    Values that would make black pictures (NaN, infinities, absurd magnitudes) and malformed
    modules are errors; metadata that does not parse only becomes :attr:`LoRA.warnings`.
    """
    label = Path(path).name if path else name
    parts: dict[str, dict[str, Tensor]] = {}
    namings: set[str] = set()
    layouts: set[str] = set()
    unknown = []
    read_as: dict[str, tuple[str, str]] = {}  # module path as written -> (its module key, its naming)
    for key, tensor in tensors.items():
        match = next((s for s in _SUFFIXES_LONGEST_FIRST if key.endswith(s)), None)
        if match is None:
            unknown.append(key)
            continue
        part, naming = SUFFIXES[match]
        written = key[: -len(match)].removeprefix(PEFT_WRAPPER)
        if written not in read_as:  # once per module, not per tensor (a file holds thousands)
            module_key = families.normalize_key(written)
            read_as[written] = module_key, "kohya" if families.is_kohya_key(module_key) else "diffusers"
            layouts.add(families.layout_of(written))
        module_key, key_naming = read_as[written]
        parts.setdefault(module_key, {})[part] = tensor
        namings.add(naming or key_naming)
    if not parts:
        first = ", ".join(sorted(tensors)[:5]) or "no tensors"
        raise LoRAError(f"{label}: no LoRA weights found (expected keys like '*.lora_down.weight', "
                        f"'*.lora_A.weight' or '*.hada_w1_a'; first keys: {first})")
    if unknown:
        raise LoRAError(f"{label}: {len(unknown)} keys of a format this version does not read, e.g. "
                        f"{', '.join(sorted(unknown)[:5])}")
    check_values(tensors, label)
    metadata = dict(metadata or {})
    warnings = metadata_warnings(metadata)
    alphas = peft_alphas(metadata, warnings)
    modules = {key: build_module(key, found, alphas, label) for key, found in parts.items()}
    return LoRA(name, "+".join(sorted(namings)), modules, metadata, path, warnings, "+".join(sorted(layouts)))


# Largest |value| accepted in any factor (down, up, mid, LoHa/LoKr factors, diffs, DoRA magnitudes).
# Trained factors are O(1e-3..1) (down starts near 1/sqrt(fan_in), up at 0), full diffs are
# differences of SD weights (well under 100 in magnitude), DoRA magnitudes are norms of weight rows
# or columns (single digits for SD's layers). 1e4 leaves orders of magnitude of margin over anything
# trained, yet sits below float16's 65504: larger factors overflow to inf once multiplied, or once
# a half-precision weight is patched, and the picture goes black.
MAX_WEIGHT = 1e4
SHOWN_KEYS = 5


def check_values(tensors: dict[str, Tensor], label: str) -> None:
    """Raise :class:`LoRAError` naming the keys (the first few, and a count) of non-finite or absurd tensors.

    Alphas count for finiteness only: their sane range depends on the rank (see ``MAX_SCALE``).
    ``meta`` tensors (header-only reads) have no values and are skipped.
    """
    nonfinite: list[str] = []
    huge: list[tuple[str, float]] = []
    for key, tensor in tensors.items():
        if tensor.is_meta or tensor.numel() == 0 or not (tensor.is_floating_point() or tensor.is_complex()):
            continue
        peak = _peak(tensor)
        if not math.isfinite(peak):
            nonfinite.append(key)
        elif peak > MAX_WEIGHT and not key.endswith(".alpha"):
            huge.append((key, peak))
    if nonfinite:
        raise LoRAError(f"{label}: NaN or infinite values in {_count(nonfinite, 'tensor')} ({_first(sorted(nonfinite))}). "
                        "Applied, it would make black images: the file is damaged, or its training diverged.")
    if huge:
        key, peak = max(huge, key=lambda kv: kv[1])
        raise LoRAError(f"{label}: values beyond +-{MAX_WEIGHT:g} in {_count(huge, 'tensor')} "
                        f"({_first(sorted(k for k, _ in huge))}; the largest, {peak:.3g}, in {key}). Trained LoRA "
                        "weights are far smaller: the file is damaged, and applied it would make black or noise images.")


def _peak(tensor: Tensor) -> float:
    """The largest magnitude in ``tensor`` (NaN when it holds a NaN); torch is imported only here, so
    that a header-only read (``meta`` tensors, validation) does not import it."""
    import torch

    as_is = tensor.dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64)
    values = tensor.detach() if as_is else tensor.detach().float()
    low, high = torch.aminmax(values)  # one pass, no |values| copy; NaN propagates
    return max(-float(low), float(high))


def _count(items: list, noun: str) -> str:
    return f"{len(items)} {noun}{'s' if len(items) != 1 else ''}"


def _first(keys: list[str]) -> str:
    shown = ", ".join(keys[:SHOWN_KEYS])
    return shown + (f" and {len(keys) - SHOWN_KEYS} more" if len(keys) > SHOWN_KEYS else "")


def build_module(key: str, found: dict[str, Tensor], peft_alpha: Callable[[str], float | None],
                 lora_name: str) -> Module:
    """The module a file's parts describe; which parts are present decides the format.

    Its structure is checked here, once, for every way a LoRA is read (LoadLoRA, inspect, the
    trainer's initial LoRA and disk cache): a malformed module is a :class:`LoRAError` naming
    the file and the module, never a shape error later.
    """
    alpha_tensor = found.get("alpha")
    if alpha_tensor is not None and alpha_tensor.numel() != 1:
        raise LoRAError(f"{lora_name}: module '{key}': alpha has shape {list(alpha_tensor.shape)}; expected one number")
    if alpha_tensor is None:
        alpha = peft_alpha(key)
    else:
        alpha = None if alpha_tensor.is_meta else float(alpha_tensor)  # a header-only read has no values
    module = _module_of(key, found, alpha, lora_name)
    error = module.structure_error()
    if error:
        raise LoRAError(f"{lora_name}: module '{key}': {error}")
    return module


def _module_of(key: str, found: dict[str, Tensor], alpha: float | None, lora_name: str) -> Module:
    common = {"key": key, "alpha": alpha, "dora_scale": found.get("dora_scale"), "bias": found.get("diff_b")}
    if "down" in found or "up" in found:
        _require(found, ("down", "up"), key, lora_name)
        return LoRAModule(**common, down=found["down"], up=found["up"], mid=found.get("mid"))
    if any(p in found for p in ("w1a", "w1b", "w2a", "w2b")):
        _require(found, ("w1a", "w1b", "w2a", "w2b"), key, lora_name)
        return LoHaModule(**common, w1a=found["w1a"], w1b=found["w1b"], w2a=found["w2a"], w2b=found["w2b"],
                          t1=found.get("t1"), t2=found.get("t2"))
    if any(p in found for p in ("w1", "w1a_kr", "w1b_kr", "w2", "w2a_kr", "w2b_kr", "t2_kr")):
        return LoKrModule(**common, w1=found.get("w1"), w1a=found.get("w1a_kr"), w1b=found.get("w1b_kr"),
                          w2=found.get("w2"), w2a=found.get("w2a_kr"), w2b=found.get("w2b_kr"),
                          t2=found.get("t2_kr"))
    if "diff" in found:
        return FullModule(**common, diff=found["diff"])
    raise LoRAError(f"{lora_name}: module '{key}' has only {', '.join(sorted(found))}; the file is incomplete")


def _require(found: dict[str, Tensor], needed: tuple[str, ...], key: str, lora_name: str) -> None:
    missing = [p for p in needed if p not in found]
    if missing:
        raise LoRAError(f"{lora_name}: module '{key}' has no {' or '.join(missing)} weight; the file is incomplete")
