"""The LoRA being trained: low-rank factors beside frozen modules, joined to them by forward hooks.

The base's modules are never replaced or changed: each target gets a hook that adds
``scale * up(down(x))`` to its output while training runs, and the hooks are removed after.
So the same loaded base keeps serving every other node, bitwise as it was.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import NodeError
from ..lora.formats import parse_lora
from ..lora.model import LoRA, LoRAModule
from ..lora.placement import placement_of
from ..models.base import BaseModel
from .config import TARGETS


def select_targets(base: BaseModel, target: str, train_text_encoder: bool) -> dict[str, nn.Module]:
    """The base's modules a new LoRA trains for ``target``, by their file-spelled names.

    ``attention``: the attention projections (as diffusers' training scripts do); ``attention_mlp``:
    also the feed-forward and projection layers of the transformer blocks (kohya's default LoRA on
    a UNet; on a joint-attention transformer, diffusers' default targets plus the single-stream
    blocks' MLP); ``all``: every linear and conv layer of the denoiser (LoCon).
    """
    denoiser_pattern, text_pattern = (re.compile(f"(^|\\.)({p})$") for p in TARGETS[target])
    chosen = {}
    for name, module in base.lora_targets.items():
        component, path = name.split(".", 1)
        pattern = denoiser_pattern if component == base.family.denoiser else \
            text_pattern if train_text_encoder else None
        if pattern is not None and pattern.search(path):
            chosen[name] = module
    return chosen


class LoRALayer(nn.Module):
    """``down`` and ``up`` for one frozen linear or conv layer; adds ``scale * up(down(x))`` to it."""

    def __init__(self, target: nn.Module, rank: int, alpha: float):
        super().__init__()
        weight = target.weight
        self.conv = isinstance(target, nn.Conv2d)
        self.stride, self.padding, self.dilation = (
            (target.stride, target.padding, target.dilation) if self.conv else (1, 0, 1))
        rank = min(rank, weight.shape[0], weight[0].numel())
        kernel = tuple(weight.shape[2:])
        # made on the CPU from the global RNG, which the trainer seeds: the same start on any device
        self.down = nn.Parameter(torch.empty(rank, weight.shape[1], *kernel))
        self.up = nn.Parameter(torch.zeros(weight.shape[0], rank, *([1] * len(kernel))))
        nn.init.kaiming_uniform_(self.down, a=math.sqrt(5))  # as nn.Linear; up = 0 so training starts at the base
        self.alpha = float(alpha)

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def forward(self, x: Tensor) -> Tensor:
        """``scale * up(down(x))``: the LoRA's share of the layer's output."""
        x = x.to(self.down.dtype) if not torch.is_autocast_enabled(x.device.type) else x
        if self.conv:
            hidden = F.conv2d(x, self.down, None, self.stride, self.padding, self.dilation)
            return F.conv2d(hidden, self.up) * self.scale
        return F.linear(F.linear(x, self.down), self.up) * self.scale

    def add_to(self, output: Tensor, x: Tensor) -> Tensor:
        """``output + forward(x)``; for a linear layer in one fused ``addmm`` when dtypes allow.

        The common case is worth one op less per layer: on small models training is bound by the
        number of ops, not by their arithmetic.
        """
        fusable = (not self.conv and output.dtype == x.dtype == self.down.dtype
                   and not torch.is_autocast_enabled(x.device.type))
        if not fusable:
            return output + self(x).to(output.dtype)
        hidden = F.linear(x, self.down).reshape(-1, self.rank)
        flat = torch.addmm(output.reshape(-1, output.shape[-1]), hidden, self.up.t(), alpha=self.scale)
        return flat.view(output.shape)

    def load(self, module: LoRAModule) -> None:
        """Start from an existing LoRA's factors (continue training it)."""
        if not module.is_plain or not module.fits(tuple(self.delta_shape)):
            raise NodeError(f"initial_lora module '{module.key}' is not a plain LoRA of this layer's shape")
        down = module.down.detach().reshape(module.down.shape[0], *self.down.shape[1:])
        up = module.up.detach().reshape(self.up.shape[0], module.down.shape[0], *self.up.shape[2:])
        self.down = nn.Parameter(down.to(self.down.device, torch.float32).clone())
        self.up = nn.Parameter(up.to(self.up.device, torch.float32).clone())
        self.alpha = float(module.alpha if module.alpha is not None else module.rank)

    @property
    def delta_shape(self) -> tuple[int, ...]:
        return (self.up.shape[0], self.down.shape[1], *self.down.shape[2:])


class LoRANetwork(nn.Module):
    """Every layer of the LoRA being trained, by the target's file-spelled name."""

    def __init__(self, targets: dict[str, nn.Module], rank: int, alpha: float):
        super().__init__()
        self.targets = dict(targets)  # plain dict: the frozen base modules are not this module's children
        self.layers = nn.ModuleDict({_param_name(n): LoRALayer(m, rank, alpha) for n, m in targets.items()})

    def layer(self, target: str) -> LoRALayer:
        return self.layers[_param_name(target)]

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        """Trainable parameters by component (``unet``, ``text_encoder``, ``text_encoder_2``)."""
        groups: dict[str, list[nn.Parameter]] = {}
        for name in self.targets:
            groups.setdefault(name.split(".", 1)[0], []).extend(self.layer(name).parameters())
        return groups

    @contextmanager
    def attached(self) -> Iterator[None]:
        """Hook every layer onto its target for the duration of the block; always removed after."""
        handles = [module.register_forward_hook(_adder(self.layer(name))) for name, module in self.targets.items()]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def load_lora(self, lora: LoRA, base: BaseModel) -> None:
        """Start from ``lora``'s factors wherever it has a plain LoRA module on one of our targets."""
        placement = placement_of(lora, base)
        for target, module in placement.placed.items():
            if target in self.targets:
                if not isinstance(module, LoRAModule):
                    raise NodeError(f"initial_lora '{lora.name}': module '{module.key}' is {module.kind}, "
                                    "not a plain LoRA; only LoRA/LoCon factors can be trained further")
                self.layer(target).load(module)

    def to_lora(self, base: BaseModel, name: str, metadata: dict[str, str]) -> LoRA:
        """The trained factors as a :class:`LoRA` (what SaveLoRA and ApplyLoRA take), in kohya naming.

        Where kohya's names are not one per trained module (the separate q/k/v of a base whose
        original tree fuses them share one name), every module is named by its target instead
        (diffusers' names): one naming per LoRA, and SaveLoRA writes either layout from it.
        """
        names = base.kohya_names
        if len({names[target] for target in self.targets}) < len(self.targets):
            names = {target: target for target in self.targets}
        tensors: dict[str, Tensor] = {}
        for target in self.targets:
            layer, key = self.layer(target), names[target]
            tensors[f"{key}.lora_down.weight"] = layer.down.detach().float().cpu().clone()
            tensors[f"{key}.lora_up.weight"] = layer.up.detach().float().cpu().clone()
            tensors[f"{key}.alpha"] = torch.tensor(layer.alpha)
        return parse_lora(tensors, metadata, name=name)


def _param_name(target: str) -> str:
    return target.replace(".", "__")  # ModuleDict keys may not hold dots


def _adder(layer: LoRALayer):
    def hook(_module: nn.Module, args: tuple, output: Tensor) -> Tensor:
        return layer.add_to(output, args[0])

    return hook
