"""The patcher: makes a recipe's weights real in the base model, cheaply and exactly.

Each original weight is backed up once, the first time it is patched. Moving to another
variant re-patches only the modules whose list of (LoRA module, strength) changed, each from
its backup in float32, so weights never drift and untouched modules are restored bitwise.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .math import add_lora_
from .model import LoRAModule

PatchList = tuple[tuple[LoRAModule, float], ...]  # (module, strength) in application order


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

    @torch.no_grad()
    def apply(self, plan: dict[str, PatchList]) -> PatchStats:
        """Bring every module to ``original + sum(strength * scale * up @ down)`` for its plan."""
        stats = PatchStats()
        for target in sorted(set(self._applied) | set(plan)):
            wanted = plan.get(target, ())
            if _same(self._applied.get(target, ()), wanted):
                stats.unchanged += bool(wanted)
                continue
            weight = self._targets[target].weight
            original = self._backup.setdefault(target, weight.detach().clone())
            if wanted:
                merged = original.to(torch.float32, copy=True)
                for module, strength in wanted:
                    add_lora_(merged, module.up, module.down, strength * module.scale)
                weight.copy_(merged)
                self._applied[target] = wanted
                stats.patched += 1
            else:
                weight.copy_(original)
                del self._applied[target]
                stats.restored += 1
        self.last = stats
        return stats
