"""A loaded base model: its components, its family, and the modules a LoRA can target in it."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import torch
from torch import nn

from .. import families
from ..families import Family
from .ldm import unet_module_map
from .text_names import to_file_name


@dataclass(eq=False)
class BaseModel:
    """One loaded base. Every variant made from it (LoRAs at any strength) shares these weights.

    It is a :class:`lora_nodes.families.LoRATarget`: the ``lora`` package places LoRAs on it and
    patches it through that protocol alone.
    """

    source: str
    components: dict[str, Any]
    dtype: torch.dtype
    device: torch.device
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def unet(self) -> nn.Module:
        return self.components[self.family.denoiser]

    @cached_property
    def family(self) -> Family:
        """The model family, from its denoiser's config."""
        return families.from_components(self.components)

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.components["vae"].config.block_out_channels) - 1)

    @property
    def native_size(self) -> int:
        """The image size (pixels) the base was built for."""
        return self.family.native_size(self.components)

    @cached_property
    def lora_targets(self) -> dict[str, nn.Module]:
        """Every linear and conv module a LoRA can target, as ``component.module_path``.

        Paths are spelled as LoRA files spell them (see :mod:`.text_names`).
        """
        targets = {}
        for component in self.family.lora_components:
            model = self.components.get(component)
            if model is None:
                continue
            for path, module in model.named_modules():
                if isinstance(module, (nn.Linear, nn.Conv2d)):
                    targets[f"{component}.{to_file_name(path, model)}"] = module
        return targets

    @cached_property
    def _original_unet_paths(self) -> dict[str, str]:
        """UNet module path -> its path in the original (LDM/SGM) checkpoint tree."""
        return unet_module_map(self.unet.config)

    @cached_property
    def lora_name_index(self) -> dict[str, str]:
        """Every name a LoRA file may use for a target -> the target.

        Built from the model's own module tree and the family's naming (our names = diffusers/PEFT
        names, kohya's underscore names of those and of the original UNet tree, ...).
        """
        index = {}
        for target in self.lora_targets:
            component, path = target.split(".", 1)
            original = self._original_unet_paths.get(path) if component == "unet" else None
            for name in self.family.naming.spellings(component, path, original):
                index[name] = target
        return index

    @cached_property
    def kohya_names(self) -> dict[str, str]:
        """Target -> the name kohya's sd-scripts gives it in this family's files."""
        names = {}
        for target in self.lora_targets:
            component, path = target.split(".", 1)
            original = self._original_unet_paths.get(path) if component == "unet" else None
            names[target] = self.family.kohya_name(component, path, original)
        return names

    def describe(self) -> dict[str, Any]:
        """What ``inspect`` shows of a base: family and every LoRA-targetable module."""
        return {
            "source": self.source,
            "architecture": self.family.id,
            "dtype": str(self.dtype).replace("torch.", ""),
            "native_size": self.native_size,
            "modules": {
                name: {"kind": "conv" if isinstance(m, nn.Conv2d) else "linear", "shape": list(m.weight.shape)}
                for name, m in self.lora_targets.items()
            },
        }
