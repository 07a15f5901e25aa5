"""MODEL values: a base plus an ordered list of LoRAs at strengths. Cheap, immutable, shareable."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..lora.formats import Placement, component_of
from ..lora.model import LoRA
from ..lora.patcher import PatchList
from .base import TEXT_COMPONENTS, BaseModel


@dataclass(frozen=True, eq=False)
class AppliedLoRA:
    """One LoRA in a recipe or a stack, with its strengths for the UNet and the text encoders."""

    lora: LoRA
    strength_model: float = 1.0
    strength_text: float = 1.0

    def strength_for(self, key: str) -> float:
        """The strength for a module, by its component (a target or any file key spelling)."""
        return self.strength_text if component_of(key) in TEXT_COMPONENTS else self.strength_model


@dataclass(frozen=True, eq=False)
class ModelRecipe:
    """What a MODEL output carries: nothing is computed until a node needs the weights."""

    base: BaseModel
    loras: tuple[AppliedLoRA, ...] = ()

    def with_loras(self, *applied: AppliedLoRA) -> ModelRecipe:
        return ModelRecipe(self.base, self.loras + tuple(applied))

    def patch_plan(self) -> dict[str, PatchList]:
        """For every targeted module, the (LoRA module, strength) pairs to add, in order."""
        plan: dict[str, list] = {}
        for applied in self.loras:
            for target, module in self.base.placement(applied.lora).placed.items():
                strength = applied.strength_for(target)
                if strength != 0.0:
                    plan.setdefault(target, []).append((module, strength))
        return {target: tuple(pairs) for target, pairs in plan.items()}

    def weight(self, target: str, plan: dict[str, PatchList] | None = None) -> Tensor:
        """One module's weight under this recipe, float32, computed aside (the base is not touched)."""
        weight = self.base.patcher.original(target).detach().to(torch.float32, copy=True)
        for module, strength in (self.patch_plan() if plan is None else plan).get(target, ()):
            module.apply_(weight, strength)
        return weight

    def materialize(self) -> BaseModel:
        """Patch the shared base to this recipe's weights and return it (for sampling, saving)."""
        self.base.patcher.apply(self.patch_plan())
        return self.base


FAMILY_ADVICE = "Use a base of the LoRA's family, or a LoRA trained for this base."


def check_placement(lora: LoRA, base: BaseModel) -> Placement:
    """Place ``lora`` on ``base``; a LoRA for another model family, or that places nothing, is an error."""
    from ..errors import LoRAError
    from ..lora.architecture import family_mismatch, family_name, lora_architecture

    mismatch = family_mismatch(lora_architecture(lora), base.architecture)
    if mismatch:
        raise LoRAError(f"{mismatch} (LoRA '{lora.name}' on {base.source}). {FAMILY_ADVICE}")
    placement = base.placement(lora)
    if not placement.placed:
        components = sorted({component_of(k) for k in lora.modules})
        first = min(placement.unplaced)
        examples = ", ".join(sorted(placement.unplaced)[:3])
        raise LoRAError(
            f"LoRA '{lora.name}' matches nothing in the base {base.source} "
            f"({family_name(base.architecture)}): none of its {len(lora.modules)} "
            f"modules ({', '.join(components)}) has a place, e.g. {examples} "
            f"({placement.unplaced[first]}). "
            f"Is it for another model? 'lora-nodes inspect LORA --base SOURCE' lists what fits."
        )
    return placement
