"""A LoRA's placed modules as patches for a model another program holds (ComfyUI's MODEL, CLIP).

Placement is ours (:mod:`.placement`, on the base that model is for us, see
``models.hosted``); so is the math: each patch computes its module's change by our formulas
(every format we read: LoRA, LoCon, LoHa, LoKr, DoRA, full diffs), from the weight the host
holds when the host asks. ComfyUI's ModelPatcher calls :meth:`HostPatch.calculate_weight` when
it patches a weight (its float32 copy, cut to the rows when the patch has an offset), so its
weight backup, offloading and caching work as with its own LoRAs, and nothing is computed or held
in memory until then.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ..families import HostPiece, LoRATarget
from .model import Module, rows_of
from .placement import Placement

# a host patch's key: the host's parameter name, or (name, (dim, first row, rows)) for some rows of it
PatchKey = str | tuple[str, tuple[int, int, int]]


class HostPatch:
    """One module's change on one host tensor (or some rows of it), computed when the host asks.

    ``which``: "weight" or "bias" (a module's ``diff_b``). ComfyUI recognises it as one of its
    weight adapters (the bridge node makes a subclass that is one).
    """

    name = "lora-nodes"

    def __init__(self, module: Module, which: str = "weight"):
        self.module, self.which = module, which
        self.loaded_keys: set[str] = set()  # what ComfyUI's adapters carry; nothing is read from a file here
        self.weights: list[Tensor] = []

    def calculate_weight(self, weight: Tensor, key: str, strength: float, strength_model: float = 1.0,
                         offset: Any = None, function: Callable[[Tensor], Tensor] | None = None,
                         intermediate_dtype: torch.dtype = torch.float32, original_weight: Any = None) -> Tensor:
        """``weight`` with this module's change at ``strength``, written in place and returned.

        In place because ComfyUI hands a view of some rows (a fused q/k/v's) and keeps the whole.
        ``function`` is ComfyUI's hook on the change (identity unless a node sets one).
        """
        original = weight.to(torch.float32)
        changed = torch.empty_like(original)
        if self.which == "bias":
            changed.copy_(original)
            self.module.apply_bias_(changed, strength)
        else:
            self.module.write_(changed, original, strength)
        change = changed - original
        if function is not None:
            change = function(change)
        weight += change.to(weight.dtype)
        return weight


@dataclass
class HostPatches:
    """What :func:`host_patches` made: the patches by host key, and the placed modules the host
    holds no tensor for (target -> why)."""

    patches: dict[PatchKey, HostPatch] = field(default_factory=dict)
    unheld: dict[str, str] = field(default_factory=dict)


def host_patches(placement: Placement, base: LoRATarget, pieces: Mapping[str, tuple[HostPiece, ...]],
                 patch_class: type[HostPatch] = HostPatch) -> HostPatches:
    """Patches putting every placed module of ``placement`` (on ``base``, the host model as we see it)
    on the host's tensors that ``pieces`` names (our parameter -> host pieces)."""
    made = HostPatches()
    for target, module in placement.placed.items():
        rows = int(base.lora_targets[target].weight.shape[0])
        for which in ("weight", "bias") if module.bias is not None else ("weight",):
            found = pieces.get(f"{target}.{which}")
            if not found:
                made.unheld[target] = f"the model holds no {which} for it"
                continue
            for piece in found:
                part = module if piece.own_rows is None or piece.own_rows == range(rows) else \
                    rows_of(module, piece.own_rows, rows)
                if isinstance(part, str):
                    made.unheld[target] = part
                    continue
                key: PatchKey = piece.key if piece.rows is None else \
                    (piece.key, (0, piece.rows.start, len(piece.rows)))
                made.patches[key] = patch_class(part, which)
    return made
