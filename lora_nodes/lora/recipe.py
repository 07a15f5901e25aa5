"""MODEL values: a base plus an ordered list of LoRAs at strengths. Cheap, immutable, shareable."""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Generic, TypeVar

from torch import Tensor

from .. import families
from ..families import LoRATarget
from .model import LoRA
from .patcher import Patcher, PatchList, merged_weight
from .placement import placement_of

Base = TypeVar("Base", bound=LoRATarget)  # a recipe gives back the kind of base it was made over

# base -> its patcher: one per base, shared by every recipe over it, gone with the base
_PATCHERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def patcher_of(base: LoRATarget) -> Patcher:
    """The patcher that owns ``base``'s weights (made on first use)."""
    patcher = _PATCHERS.get(base)
    if patcher is None:
        patcher = _PATCHERS[base] = Patcher(base.lora_targets)
    return patcher


@dataclass(frozen=True, eq=False)
class AppliedLoRA:
    """One LoRA in a recipe or a stack, with its strengths for the denoiser and the text encoders."""

    lora: LoRA
    strength_model: float = 1.0
    strength_text: float = 1.0

    def strength_for(self, key: str) -> float:
        """The strength for a module, by its component (a target or any file key spelling)."""
        is_text = families.component_of(key) in families.TEXT_COMPONENTS
        return self.strength_text if is_text else self.strength_model


@dataclass(frozen=True, eq=False)
class ModelRecipe(Generic[Base]):
    """What a MODEL output carries: nothing is computed until a node needs the weights."""

    base: Base
    loras: tuple[AppliedLoRA, ...] = ()

    def with_loras(self, *applied: AppliedLoRA) -> ModelRecipe[Base]:
        return ModelRecipe(self.base, self.loras + tuple(applied))

    def patch_plan(self) -> dict[str, PatchList]:
        """For every targeted module, the (LoRA module, strength) pairs to add, in order."""
        plan: dict[str, list] = {}
        for applied in self.loras:
            for target, module in placement_of(applied.lora, self.base).placed.items():
                strength = applied.strength_for(target)
                if strength != 0.0:
                    plan.setdefault(target, []).append((module, strength))
        return {target: tuple(pairs) for target, pairs in plan.items()}

    def weight(self, target: str, plan: dict[str, PatchList] | None = None) -> Tensor:
        """One module's weight under this recipe, float32, computed aside (the base is not touched)."""
        wanted = (self.patch_plan() if plan is None else plan).get(target, ())
        return merged_weight(patcher_of(self.base).original(target), wanted)

    def materialize(self, final: bool = False) -> Base:
        """Patch the shared base to this recipe's weights and return it (for sampling, saving).

        ``final``: the caller is the last user of the base's weights in this process (a node's
        ``ctx.last_weight_use``): weights are patched in place, and the originals are gone.
        """
        patcher_of(self.base).apply(self.patch_plan(), final=final)
        return self.base
