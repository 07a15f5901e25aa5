"""A loaded base model: its components, its family, and the modules a LoRA can target in it."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING, Any

from .. import families
from ..errors import ModelLoadError
from ..families import Family
from .ldm import unet_module_map
from .text_names import to_file_name

if TYPE_CHECKING:  # annotations only: validation imports this module, and must not import torch
    import torch
    from torch import nn


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
        """The denoiser (the name predates families without a UNet; see :attr:`denoiser`)."""
        return self.denoiser

    @cached_property
    def family(self) -> Family:
        """The model family: ``meta["family"]`` (a family or its id) where the loader recorded it
        (a base of some parts only, see ``parts.load_parts``), else its denoiser's config's."""
        recorded = self.meta.get("family")
        if isinstance(recorded, Family):
            return recorded
        family = families.by_id(recorded) if isinstance(recorded, str) else None
        return family if family is not None else families.from_components(self.components)

    @property
    def denoiser(self) -> nn.Module:
        """The model that denoises: a UNet (Stable Diffusion) or a transformer (Flux)."""
        if self.family.denoiser not in self.components:
            raise ModelLoadError(f"{self.source} holds no {self.family.denoiser}: it is a base of "
                                 f"{', '.join(self.parts)} only; load a model that has one")
        return self.components[self.family.denoiser]

    @property
    def parts(self) -> tuple[str, ...]:
        """The model parts it holds (a base loaded from some parts only lacks the others)."""
        return tuple(name for name in self.family.model_parts if name in self.components)

    @property
    def vae_config(self) -> dict[str, Any]:
        """The VAE's config; for a base that holds no VAE (a diffusion model loaded alone), the family's
        shipped one, which says how its latents are scaled and how many pixels a latent cell spans."""
        vae = self.components.get(self.family.vae)
        if vae is not None:
            return dict(vae.config)
        from .known_configs import default_config  # deferred: the shipped configs are read on demand

        return default_config(self.family, "vae")

    @property
    def vae_scale_factor(self) -> int:
        """How many pixels one latent cell spans per side."""
        return 2 ** (len(self.vae_config["block_out_channels"]) - 1)

    @property
    def native_size(self) -> int:
        """The image size (pixels) the base was built for."""
        return self.family.native_size(self.components)

    @cached_property
    def lora_targets(self) -> dict[str, nn.Module]:
        """Every linear and conv module a LoRA can target, as ``component.module_path``.

        Paths are spelled as LoRA files spell them (see :mod:`.text_names`).
        """
        from torch import nn

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
    def _original_modules(self) -> tuple[dict[str, str], dict[str, tuple[tuple[str, int, int], ...]]]:
        """Denoiser module path -> its path in the original checkpoint tree (LDM/SGM, BFL), and
        the original tree's fused modules (see :attr:`fused_targets`), from the family's rules."""
        if self.family.denoiser not in self.components:
            return {}, {}
        if self.family.original_modules is None:
            return unet_module_map(self.unet.config, [name for name, _ in self.unet.named_parameters()]), {}
        prefix = f"{self.family.denoiser}."
        shapes = {t[len(prefix):]: tuple(m.weight.shape) for t, m in self.lora_targets.items() if t.startswith(prefix)}
        return self.family.original_modules(shapes)

    @cached_property
    def fused_targets(self) -> dict[str, tuple[tuple[str, int, int], ...]]:
        """Fused modules of the original tree -> their pieces (targets and rows), as
        ``component.original_path`` (Flux's ``transformer.double_blocks.0.img_attn.qkv``)."""
        component = self.family.denoiser
        return {f"{component}.{fused}": tuple((f"{component}.{path}", start, end) for path, start, end in pieces)
                for fused, pieces in self._original_modules[1].items()}

    def _spellings(self, target: str) -> list[str]:
        component, path = target.split(".", 1)
        original = self._original_modules[0].get(path) if component == self.family.denoiser else None
        return self.family.naming.spellings(component, path, original)

    @cached_property
    def lora_name_index(self) -> dict[str, str]:
        """Every name a LoRA file may use for a target (or a fused module) -> the target.

        Built from the model's own module tree and the family's naming (our names = diffusers/PEFT
        names, kohya's underscore names of those and of the original tree, ...). A fused module's
        names lead to its entry in :attr:`fused_targets`.
        """
        index = {}
        for target in self.lora_targets:
            for name in self._spellings(target):
                index[name] = target
        for fused in self.fused_targets:
            component, path = fused.split(".", 1)
            for name in self.family.naming.spellings(component, path, path):
                index.setdefault(name, fused)
        return index

    @cached_property
    def kohya_names(self) -> dict[str, str]:
        """Target -> the name kohya's sd-scripts gives it in this family's files; the pieces of a
        fused module share the fused module's name (the first fused module that holds them)."""
        names = {}
        for fused, pieces in self.fused_targets.items():
            component, path = fused.split(".", 1)
            for target, _, _ in pieces:
                names.setdefault(target, self.family.kohya_name(component, path, path))
        for target in self.lora_targets:
            if target not in names:
                component, path = target.split(".", 1)
                original = self._original_modules[0].get(path) if component == self.family.denoiser else None
                names[target] = self.family.kohya_name(component, path, original)
        return names

    def describe(self) -> dict[str, Any]:
        """What ``inspect`` shows of a base: family, its denoiser (class and config: widths and block
        counts), text encoders, single-file layout, the blocks LoRAs can change, and every
        LoRA-targetable module."""
        from torch import nn

        config = self.denoiser.config
        return {
            "source": self.source,
            "architecture": self.family.id,
            "dtype": str(self.dtype).replace("torch.", ""),
            "native_size": self.native_size,
            "denoiser": {"component": self.family.denoiser, "class": type(self.denoiser).__name__,
                         "config": {k: v for k, v in dict(config).items() if not k.startswith("_")}},
            "text_encoders": {name: type(self.components[name]).__name__
                              for name in self.family.text_components if name in self.components},
            "checkpoint_layout": self.family.checkpoint_layout,
            "blocks": families.blocks_of(self.family, self.lora_targets),
            "modules": {
                name: {"kind": "conv" if isinstance(m, nn.Conv2d) else "linear", "shape": list(m.weight.shape)}
                for name, m in self.lora_targets.items()
            },
        }
