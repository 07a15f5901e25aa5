"""Synthetic LoRAs for a base: random but reproducible, in kohya or diffusers/PEFT naming.

Used to make the example LoRA the workflows ship and the files tests check formats with.
"""

from __future__ import annotations

import math
import re

import torch
from torch import Tensor

from ..families import LoRATarget

ATTENTION = re.compile(r"(attn\d?\.(to_q|to_k|to_v|to_out\.0)|self_attn\.(q_proj|k_proj|v_proj|out_proj))$")


def synthetic_lora(base: LoRATarget, rank: int = 4, alpha: float | None = None, seed: int = 0, fmt: str = "kohya",
                   pattern: re.Pattern[str] = ATTENTION, up_std: float = 0.5) -> dict[str, Tensor]:
    """A random LoRA state dict for every module of ``base`` whose path matches ``pattern``.

    ``fmt`` is ``kohya`` (``lora_unet_*.lora_down.weight``, ``.alpha``; SDXL UNets by their
    original SGM names, Flux by BFL's, text encoders as kohya names them) or ``peft``
    (``unet.*.lora_A.weight``). Where kohya names one fused module for several of the base's
    weights (Flux's q/k/v), the kohya file has that one module, over all its rows, as kohya trains
    it; otherwise the same seed gives the same tensors in either naming.
    """
    if fmt not in ("kohya", "peft"):
        raise ValueError(f"unknown format {fmt!r} (kohya or peft)")
    generator = torch.Generator().manual_seed(seed)
    tensors: dict[str, Tensor] = {}
    kohya_names = base.kohya_names
    for target, module in base.lora_targets.items():
        if not pattern.search(target):
            continue
        shape = tuple(module.weight.shape)
        key = target
        if fmt == "kohya":
            key = kohya_names[target]
            if f"{key}.alpha" in tensors:  # a fused module, made with its first piece
                continue
            shape = _fused_shape(base, key) or shape
        fan_in = math.prod(shape[1:])
        down = torch.randn((rank, *shape[1:]), generator=generator) / fan_in**0.5
        up = torch.randn((shape[0], rank, *([1] * (len(shape) - 2))), generator=generator) * up_std
        if fmt == "kohya":
            tensors[f"{key}.lora_down.weight"], tensors[f"{key}.lora_up.weight"] = down, up
            tensors[f"{key}.alpha"] = torch.tensor(float(alpha if alpha is not None else rank))
        else:
            tensors[f"{key}.lora_A.weight"], tensors[f"{key}.lora_B.weight"] = down, up
    return tensors


def _fused_shape(base: LoRATarget, name: str) -> tuple[int, ...] | None:
    """The weight shape of the fused module kohya calls ``name``, or None when it names one weight."""
    pieces = base.fused_targets.get(base.lora_name_index.get(name, ""))
    if not pieces:
        return None
    rows = max(end for _, _, end in pieces)
    return (rows, *base.lora_targets[pieces[0][0]].weight.shape[1:])
