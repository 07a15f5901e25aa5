"""Alphas of PEFT/diffusers LoRA files: the ``LoraConfig`` diffusers writes into the metadata."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from typing import Any

from .. import families

ADAPTER_METADATA_KEY = "lora_adapter_metadata"  # where diffusers writes a PEFT file's LoraConfig


def peft_alphas(metadata: dict[str, str], warnings: list[str] | None = None) -> Callable[[str], float | None]:
    """alpha of a module (``component.path``) from diffusers' ``lora_adapter_metadata``, if any.

    diffusers writes the PEFT LoraConfig of each component flattened under its prefix
    (``unet.lora_alpha``, ``unet.alpha_pattern``, ``text_encoder.lora_alpha``, ...). A pattern key
    applies to a module whose path is it or ends with ``.`` + it, as PEFT matches them. Parts that
    do not parse are left out with a line in ``warnings`` (the module's alpha is then its rank);
    numbers are kept as they are, so a NaN or absurd alpha is refused where modules are built.
    """
    notes: list[str] = [] if warnings is None else warnings
    data = _adapter_metadata(metadata, notes)
    configs = {component: _alpha_config(component, data, notes) for component in families.LORA_COMPONENTS}

    def alpha_for(module_key: str) -> float | None:
        component, _, path = module_key.partition(".")
        default, patterns = configs.get(component, (None, {}))
        for pattern, alpha in patterns.items():
            if path == pattern or path.endswith("." + pattern):
                return alpha
        return default

    return alpha_for


def _adapter_metadata(metadata: dict[str, str], warnings: list[str]) -> dict[str, Any]:
    raw = metadata.get(ADAPTER_METADATA_KEY)
    if not raw:
        return {}
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        warnings.append(f"{ADAPTER_METADATA_KEY} is not JSON ({str(exc)[:80]}); alphas default to each module's rank")
        return {}
    if not isinstance(data, dict):
        warnings.append(f"{ADAPTER_METADATA_KEY} is a JSON {type(data).__name__}, not an object; alphas default "
                        "to each module's rank")
        return {}
    return data


def _alpha_config(component: str, data: dict[str, Any], warnings: list[str]) -> tuple[float | None, dict[str, float]]:
    """(lora_alpha, alpha_pattern) of one component's LoraConfig, junk left out with a warning."""
    nested = data.get(component)
    if isinstance(nested, dict):
        config = nested
    else:
        config = {k.removeprefix(f"{component}."): v for k, v in data.items() if k.startswith(f"{component}.")}
    where = f"{ADAPTER_METADATA_KEY} {component}"
    default = config.get("lora_alpha")
    if default is not None:
        default = _number(default)
        if default is None:
            warnings.append(f"{where}.lora_alpha is {config['lora_alpha']!r}, not a number; its modules' alpha "
                            "is their rank")
    raw_patterns = config.get("alpha_pattern") or {}
    if not isinstance(raw_patterns, dict):
        warnings.append(f"{where}.alpha_pattern is a {type(raw_patterns).__name__}, not an object; it is ignored")
        raw_patterns = {}
    patterns, junk = {}, []
    for pattern, value in raw_patterns.items():
        number = _number(value)
        if number is None:
            junk.append(f"{pattern!r}: {value!r}")
        else:
            patterns[pattern] = number
    if junk:
        entries = "1 entry" if len(junk) == 1 else f"{len(junk)} entries"
        warnings.append(f"{where}.alpha_pattern: {entries} not a number ({', '.join(junk[:3])}); "
                        "those modules use lora_alpha")
    return default, patterns


def _number(value: Any) -> float | None:
    """``value`` as a float when JSON gave a number (NaN and infinities included), else None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        return float(value)
    except OverflowError:  # an integer too large for a float: as absurd as infinity
        return math.inf
