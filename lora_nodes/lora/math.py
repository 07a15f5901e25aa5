"""LoRA math, in float32: dW = strength * (alpha / rank) * up @ down.

Convolutions use the same formula on kernels flattened to [out, in * kh * kw], which covers
LoCon's 3x3 down with a 1x1 up.
"""

from __future__ import annotations

import torch
from torch import Tensor


def add_lora_(weight32: Tensor, up: Tensor, down: Tensor, scale: float) -> Tensor:
    """``weight32 += scale * up @ down`` in place with one fused ``addmm_``; returns ``weight32``."""
    up2 = up.to(weight32.device, torch.float32).flatten(1)
    down2 = down.to(weight32.device, torch.float32).flatten(1)
    weight32.view(up2.shape[0], -1).addmm_(up2, down2, alpha=scale)
    return weight32

