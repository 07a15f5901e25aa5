"""The patcher: makes a recipe's weights real in the base model, cheaply and exactly.

The first time a weight is patched, its original tensor is kept as it is (no copy) and the
parameter is pointed at a second buffer that receives ``original + sum(strength * delta)``,
written by the first patch's fused ``addmm`` straight from the original and the others' in-place
``addmm_``: exactly the work of the bare merge, plus nothing. Restoring points the parameter
back at the original tensor, bitwise and at no cost. Moving to another variant re-patches only
the modules whose list of (module, strength) changed, always from the original, so weights never
drift. Math is float32; half-precision weights are merged in float32 and cast back.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .model import LoRAModule, Module

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
        self._original: dict[str, Tensor] = {}  # parameter name -> its original tensor, once patched
        self._buffer: dict[str, Tensor] = {}  # parameter name -> the tensor that holds patched values
        self._applied: dict[str, PatchList] = {}
        self.last = PatchStats()

    def original(self, target: str) -> Tensor:
        """The unpatched weight of ``target``."""
        return self._original.get(f"{target}.weight", self._targets[target].weight)

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
            self._set(f"{target}.weight", module.weight, wanted, "weight")
            bias_wanted = wanted if any(m.bias is not None for m, _ in wanted) else ()
            if module.bias is not None and (bias_wanted or f"{target}.bias" in self._original):
                self._set(f"{target}.bias", module.bias, bias_wanted, "bias")
            if wanted:
                self._applied[target] = wanted
                stats.patched += 1
            else:
                del self._applied[target]
                stats.restored += 1
        self.last = stats
        return stats

    def _set(self, name: str, param: nn.Parameter, wanted: PatchList, which: str) -> None:
        """Point ``param`` at its original tensor, or at a buffer holding original + ``wanted``."""
        if name not in self._original:
            self._original[name] = param.data
        original = self._original[name]
        if not wanted:
            param.data = original
            return
        buffer = self._buffer.get(name)
        if buffer is None:
            buffer = self._buffer[name] = torch.empty_like(original)
        if original.dtype == torch.float32:
            _merge_into(buffer, original, wanted, which)
        else:
            merged = torch.empty_like(original, dtype=torch.float32)
            _merge_into(merged, original.float(), wanted, which)
            buffer.copy_(merged)
        param.data = buffer


def merged_weight(original: Tensor, wanted: PatchList) -> Tensor:
    """A new float32 tensor: ``original`` with every patch of ``wanted`` applied, exactly as the
    patcher merges it (so a weight computed aside equals the patched one bitwise)."""
    original = original.detach().to(torch.float32)
    if not wanted:
        return original.clone()
    out = torch.empty_like(original)
    _merge_into(out, original, wanted, "weight")
    return out


def _merge_into(out: Tensor, original: Tensor, wanted: PatchList, which: str) -> None:
    """``out = original`` with every patch of ``wanted`` applied, all float32."""
    (first, strength), *rest = wanted
    if which == "weight" and rest and all(isinstance(m, LoRAModule) and m.is_plain for m, _ in wanted):
        _merge_low_rank(out, original, wanted)
    elif which == "weight":
        first.write_(out, original, strength)
        for module, s in rest:
            module.apply_(out, s)
    else:
        out.copy_(original)
        for module, s in wanted:
            module.apply_bias_(out, s)


def _merge_low_rank(out: Tensor, original: Tensor, wanted: PatchList) -> None:
    """Several plain LoRAs in one product: their ups (scaled) side by side, their downs stacked.

    ``addmm`` into a buffer apart from its input copies the input first (BLAS updates its C in
    place), so one product per LoRA passes over the weight once more than the bare in-place merge;
    one product of the stacked factors passes over it twice, however many LoRAs there are.
    """
    rows = out.shape[0]
    ups = torch.cat([m.up.to(out.device, torch.float32).flatten(1) * (s * m.scale) for m, s in wanted], dim=1)
    downs = torch.cat([m.down.to(out.device, torch.float32).flatten(1) for m, _ in wanted], dim=0)
    torch.addmm(original.view(rows, -1), ups, downs, out=out.view(rows, -1))
