"""The patcher: makes a recipe's weights real in the base model, cheaply and exactly.

Each original weight is backed up once, the first time it is patched. Moving to another
variant re-patches only the modules whose list of (LoRA module, strength) changed, each from
its backup in float32, so weights never drift and untouched modules are restored bitwise.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .model import Module

PatchList = tuple[tuple[Module, float], ...]  # (module, strength) in application order


@dataclass
class PatchStats:
    patched: int = 0  # modules re-patched by the last apply
    restored: int = 0  # modules returned to their original weight
    unchanged: int = 0  # patched modules left as they were


def _same(a: PatchList, b: PatchList) -> bool:
    return len(a) == len(b) and all(ma is mb and sa == sb for (ma, sa), (mb, sb) in zip(a, b))


class Patcher:
    """Owns the patch state of one base model's modules."""

    def __init__(self, targets: dict[str, nn.Module]):
        self._targets = targets
        self._backup: dict[str, Tensor] = {}
        self._applied: dict[str, PatchList] = {}
        self.last = PatchStats()

    @property
    def backed_up(self) -> int:
        """How many weights have a backup (each is kept once, for exact restores)."""
        return len(self._backup)

    def original(self, target: str) -> Tensor:
        """The unpatched weight of ``target`` (only modules ever patched keep a copy)."""
        return self._backup.get(f"{target}.weight", self._targets[target].weight)

    @torch.no_grad()
    def apply(self, plan: dict[str, PatchList]) -> PatchStats:
        """Bring every module to ``original + sum(strength * scale * up @ down)`` for its plan."""
        stats = PatchStats()
        for target in sorted(set(self._applied) | set(plan)):
            wanted = plan.get(target, ())
            if _same(self._applied.get(target, ()), wanted):
                stats.unchanged += bool(wanted)
                continue
            module = self._targets[target]
            self._set(f"{target}.weight", module.weight, wanted, lambda m, w, s: m.apply_(w, s))
            touches_bias = any(m.bias is not None for m, _ in wanted) or f"{target}.bias" in self._backup
            if module.bias is not None and touches_bias:
                self._set(f"{target}.bias", module.bias, wanted, lambda m, b, s: m.apply_bias_(b, s))
            if wanted:
                self._applied[target] = wanted
                stats.patched += 1
            else:
                del self._applied[target]
                stats.restored += 1
        self.last = stats
        return stats

    def _set(self, name: str, param: Tensor, wanted: PatchList, apply) -> None:
        """Set ``param`` to its original value plus every patch of ``wanted``, computed in float32."""
        if name not in self._backup:
            self._backup[name] = param.detach().clone()
        original = self._backup[name]
        if not wanted:
            param.copy_(original)
            return
        merged = original.to(torch.float32, copy=True)
        for module, strength in wanted:
            apply(module, merged, strength)
        param.copy_(merged)
