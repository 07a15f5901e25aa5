"""A loaded base model: its components, what a LoRA can target in it, and its patcher."""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import torch
from torch import nn

from .text_names import to_file_name

TEXT_COMPONENTS = ("text_encoder", "text_encoder_2")
LORA_COMPONENTS = ("unet", *TEXT_COMPONENTS)


def architecture_of(unet_config: Any) -> str:
    """``sd1``, ``sd2`` or ``sdxl``, from a UNet config."""
    if unet_config.get("addition_embed_type") == "text_time":
        return "sdxl"
    return "sd2" if unet_config.get("cross_attention_dim") == 1024 else "sd1"




@dataclass(eq=False)
class BaseModel:
    """One loaded base. Every variant made from it (LoRAs at any strength) shares these weights."""

    source: str
    components: dict[str, Any]
    dtype: torch.dtype
    device: torch.device
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def unet(self) -> nn.Module:
        return self.components["unet"]

    @property
    def architecture(self) -> str:
        return architecture_of(self.unet.config)

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.components["vae"].config.block_out_channels) - 1)

    @property
    def native_size(self) -> int:
        """The image size (pixels) the UNet was built for."""
        return int(self.unet.config.sample_size) * self.vae_scale_factor

    @cached_property
    def lora_targets(self) -> dict[str, nn.Module]:
        """Every linear and conv module a LoRA can target, as ``component.module_path``.

        Paths are spelled as LoRA files spell them (see :mod:`.text_names`).
        """
        targets = {}
        for component in LORA_COMPONENTS:
            model = self.components.get(component)
            if model is None:
                continue
            for path, module in model.named_modules():
                if isinstance(module, (nn.Linear, nn.Conv2d)):
                    targets[f"{component}.{to_file_name(path, model)}"] = module
        return targets

    @cached_property
    def lora_name_index(self) -> dict[str, str]:
        """Every name a LoRA file may use for a target -> the target.

        Built from the model's own module tree: our names (= diffusers/PEFT names), kohya's
        underscore names of those, and kohya's names of the original (LDM/SGM) UNet tree, which
        SDXL LoRAs use (``lora_unet_input_blocks_4_1_...``); text encoders as ``lora_te_``,
        ``lora_te1_`` and ``lora_te2_``.
        """
        from ..lora.formats import KOHYA_PREFIXES, KOHYA_SDXL_TE1
        from .ldm import unet_module_map

        sgm = unet_module_map(self.unet.config)
        index = {}
        for target in self.lora_targets:
            component, path = target.split(".", 1)
            index[target] = target
            index[KOHYA_PREFIXES[component] + path.replace(".", "_")] = target
            if component == "text_encoder":  # kohya names the first text encoder te1 in SDXL files
                index[KOHYA_SDXL_TE1 + path.replace(".", "_")] = target
            if component == "unet" and path in sgm:
                index["lora_unet_" + sgm[path].replace(".", "_")] = target
        return index

    def placement(self, lora):
        """Where ``lora``'s modules go in this model, worked out once per LoRA and kept while it lives."""
        from ..lora.formats import place

        cache = self.__dict__.setdefault("_placements", weakref.WeakKeyDictionary())
        if lora not in cache:
            cache[lora] = place(lora, self)
        return cache[lora]

    @cached_property
    def patcher(self):
        from ..lora.patcher import Patcher

        return Patcher(self.lora_targets)

    def describe(self) -> dict[str, Any]:
        """What ``inspect`` shows of a base: architecture and every LoRA-targetable module."""
        return {
            "source": self.source,
            "architecture": self.architecture,
            "dtype": str(self.dtype).replace("torch.", ""),
            "native_size": self.native_size,
            "modules": {
                name: {"kind": "conv" if isinstance(m, nn.Conv2d) else "linear", "shape": list(m.weight.shape)}
                for name, m in self.lora_targets.items()
            },
        }
