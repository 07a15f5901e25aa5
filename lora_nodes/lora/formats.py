"""Reading LoRA files and placing their modules on a base model's modules.

Formats are told apart by key suffixes; a table maps each suffix to the part it holds, so a new
spelling is one line. Names are matched through the base's own index of module names
(:attr:`BaseModel.lora_name_index`), never by guessing where kohya's underscores were dots.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from ..errors import LoRAError
from .model import LoRA, LoRAModule

# key suffix -> (part, format)
SUFFIXES: dict[str, tuple[str, str]] = {
    ".lora_down.weight": ("down", "kohya"),
    ".lora_up.weight": ("up", "kohya"),
    ".alpha": ("alpha", "kohya"),
    ".lora_A.weight": ("down", "peft"),
    ".lora_B.weight": ("up", "peft"),
    ".lora_A.default.weight": ("down", "peft"),
    ".lora_B.default.weight": ("up", "peft"),
}
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
COMPONENT_PREFIXES = {
    "lora_unet_": "unet",
    "unet.": "unet",
    "lora_te_": "text_encoder",
    "lora_te1_": "text_encoder",
    "text_encoder.": "text_encoder",
    "lora_te2_": "text_encoder_2",
    "text_encoder_2.": "text_encoder_2",
}


def component_of(key: str) -> str:
    """The model component a LoRA module key belongs to (``unet``, ``text_encoder``, ...)."""
    for prefix, component in sorted(COMPONENT_PREFIXES.items(), key=lambda kv: -len(kv[0])):
        if key.startswith(prefix):
            return component
    return "unknown"


def read_state_dict(path: str | Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Tensors and metadata of a ``.safetensors`` file, or of a pickle file loaded without code."""
    path = Path(path)
    if path.suffix.lower() == ".safetensors":
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})  # noqa: SIM118 - not a dict
        except (SafetensorError, OSError, ValueError) as exc:
            raise LoRAError(f"{path.name} is not a readable .safetensors file: {exc}") from exc
    if path.suffix.lower() in PICKLE_SUFFIXES:
        return _read_pickle_weights_only(path), {}
    raise LoRAError(f"{path.name}: unknown file type '{path.suffix}' (expected .safetensors, or {', '.join(PICKLE_SUFFIXES)})")


def _read_pickle_weights_only(path: Path) -> dict[str, Tensor]:
    # weights_only=True refuses any pickle that would run code: tensors and plain containers only.
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise LoRAError(
            f"{path.name} was refused: it is a pickle file that does not hold plain tensors, and loading it "
            f"could run code ({type(exc).__name__}). Convert it to .safetensors with a tool you trust."
        ) from exc
    if isinstance(data, dict) and isinstance(data.get("state_dict"), dict):
        data = data["state_dict"]
    if not isinstance(data, dict):
        raise LoRAError(f"{path.name} holds a {type(data).__name__}, not a dict of tensors")
    return {k: v for k, v in data.items() if isinstance(v, Tensor)}


def read_lora(path: str | Path) -> LoRA:
    """Read a LoRA file (kohya or diffusers/PEFT naming) into a :class:`LoRA`."""
    path = Path(path)
    tensors, metadata = read_state_dict(path)
    return parse_lora(tensors, metadata, name=path.stem, path=str(path))


def parse_lora(tensors: dict[str, Tensor], metadata: dict[str, str] | None = None,
               name: str = "lora", path: str = "") -> LoRA:
    """Group a LoRA state dict into modules; raise :class:`LoRAError` when it is not a LoRA we read."""
    parts: dict[str, dict[str, Tensor]] = {}
    formats: set[str] = set()
    unknown = []
    for key, tensor in tensors.items():
        match = next((s for s in sorted(SUFFIXES, key=len, reverse=True) if key.endswith(s)), None)
        if match is None:
            unknown.append(key)
            continue
        part, fmt = SUFFIXES[match]
        parts.setdefault(key[: -len(match)], {})[part] = tensor
        if part != "alpha":
            formats.add(fmt)
    modules = {}
    for key, found in parts.items():
        if "down" not in found or "up" not in found:
            missing = "up" if "down" in found else "down"
            raise LoRAError(f"{name}: module '{key}' has no {missing} weight; the file is incomplete")
        alpha = found.get("alpha")
        modules[key] = LoRAModule(key, found["down"], found["up"], float(alpha) if alpha is not None else None)
    if not modules:
        first = ", ".join(sorted(tensors)[:5]) or "no tensors"
        raise LoRAError(f"{name}: no LoRA weights found (expected keys like '*.lora_down.weight' or "
                        f"'*.lora_A.weight'; first keys: {first})")
    if unknown:
        raise LoRAError(f"{name}: {len(unknown)} keys of a format this version does not read, e.g. "
                        f"{', '.join(sorted(unknown)[:5])}")
    return LoRA(name, "+".join(sorted(formats)), modules, dict(metadata or {}), path)


@dataclass
class Placement:
    """Which LoRA modules land on which base modules, and why the rest do not."""

    placed: dict[str, LoRAModule] = field(default_factory=dict)  # target -> module
    unplaced: dict[str, str] = field(default_factory=dict)  # file key -> reason

    def summary(self, lora: LoRA) -> str:
        return f"{len(self.placed)} of {len(lora.modules)} modules of LoRA '{lora.name}' placed"


def place(lora: LoRA, base) -> Placement:
    """Match every module of ``lora`` to a module of ``base`` (a :class:`BaseModel`)."""
    placement = Placement()
    index, targets = base.lora_name_index, base.lora_targets
    for key, module in lora.modules.items():
        target = index.get(key)
        if target is None:
            placement.unplaced[key] = "no module of that name in the base"
            continue
        shape = tuple(targets[target].weight.shape)
        if module.delta_shape != shape:
            placement.unplaced[key] = f"shape {list(module.delta_shape)} does not fit the module's {list(shape)}"
            continue
        placement.placed[target] = module
    return placement
