"""Synthetic LoRAs for a base: random but reproducible, in kohya or diffusers/PEFT naming.

Used to make the example LoRA the workflows ship and the files tests check formats with.
"""

from __future__ import annotations

import re

import torch
from torch import Tensor

from ..families import LoRATarget

ATTENTION = re.compile(r"(attn\d?\.(to_q|to_k|to_v|to_out\.0)|self_attn\.(q_proj|k_proj|v_proj|out_proj))$")


def synthetic_lora(base: LoRATarget, rank: int = 4, alpha: float | None = None, seed: int = 0, fmt: str = "kohya",
                   pattern: re.Pattern[str] = ATTENTION, up_std: float = 0.5) -> dict[str, Tensor]:
    """A random LoRA state dict for every module of ``base`` whose path matches ``pattern``.

    ``fmt`` is ``kohya`` (``lora_unet_*.lora_down.weight``, ``.alpha``; SDXL UNets by their
    original SGM names and text encoders as ``lora_te1_``/``lora_te2_``, as kohya names them) or
    ``peft`` (``unet.*.lora_A.weight``); the same seed gives the same tensors in either naming.
    """
    generator = torch.Generator().manual_seed(seed)
    tensors: dict[str, Tensor] = {}
    kohya_names = base.kohya_names
    for target, module in base.lora_targets.items():
        if not pattern.search(target):
            continue
        weight = module.weight
        fan_in = weight[0].numel()
        down = torch.randn((rank, *weight.shape[1:]), generator=generator) / fan_in**0.5
        up = torch.randn((weight.shape[0], rank, *([1] * (weight.dim() - 2))), generator=generator) * up_std
        if fmt == "kohya":
            key = kohya_names[target]
            tensors[f"{key}.lora_down.weight"], tensors[f"{key}.lora_up.weight"] = down, up
            tensors[f"{key}.alpha"] = torch.tensor(float(alpha if alpha is not None else rank))
        elif fmt == "peft":
            tensors[f"{target}.lora_A.weight"], tensors[f"{target}.lora_B.weight"] = down, up
        else:
            raise ValueError(f"unknown format {fmt!r} (kohya or peft)")
    return tensors

