"""Reading LoRA files and placing their modules on a base model's modules.

Formats are told apart by key suffixes; a table maps each suffix to the part it holds, so a new
spelling is one line. Names are matched through the base's own index of module names
(:attr:`BaseModel.lora_name_index`), never by guessing where kohya's underscores were dots.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..errors import LoRAError
from .model import FullModule, LoHaModule, LoKrModule, LoRA, LoRAModule, Module

# key suffix -> (part, naming); naming None: the suffix says nothing about the naming.
SUFFIXES: dict[str, tuple[str, str | None]] = {
    ".lora_down.weight": ("down", None),
    ".lora_up.weight": ("up", None),
    ".lora_mid.weight": ("mid", None),
    ".alpha": ("alpha", None),
    ".dora_scale": ("dora_scale", None),
    ".lora_A.weight": ("down", "diffusers"),
    ".lora_B.weight": ("up", "diffusers"),
    ".lora_A.default.weight": ("down", "diffusers"),
    ".lora_B.default.weight": ("up", "diffusers"),
    ".lora.down.weight": ("down", "diffusers-old"),
    ".lora.up.weight": ("up", "diffusers-old"),
    ".lora_linear_layer.down.weight": ("down", "diffusers-old"),
    ".lora_linear_layer.up.weight": ("up", "diffusers-old"),
    "_lora.down.weight": ("down", "diffusers-old"),  # attention processors: ...processor.to_q_lora.down
    "_lora.up.weight": ("up", "diffusers-old"),
    ".hada_w1_a": ("w1a", None),
    ".hada_w1_b": ("w1b", None),
    ".hada_w2_a": ("w2a", None),
    ".hada_w2_b": ("w2b", None),
    ".hada_t1": ("t1", None),
    ".hada_t2": ("t2", None),
    ".lokr_w1": ("w1", None),
    ".lokr_w1_a": ("w1a_kr", None),
    ".lokr_w1_b": ("w1b_kr", None),
    ".lokr_w2": ("w2", None),
    ".lokr_w2_a": ("w2a_kr", None),
    ".lokr_w2_b": ("w2b_kr", None),
    ".lokr_t2": ("t2_kr", None),
    ".diff": ("diff", None),
    ".diff_b": ("diff_b", None),
}
_SUFFIXES_LONGEST_FIRST = sorted(SUFFIXES, key=len, reverse=True)
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
# kohya's name prefix per component; SDXL files call the first text encoder te1 instead of te.
KOHYA_PREFIXES = {"unet": "lora_unet_", "text_encoder": "lora_te_", "text_encoder_2": "lora_te2_"}
KOHYA_SDXL_TE1 = "lora_te1_"
COMPONENT_PREFIXES = {
    **{prefix: component for component, prefix in KOHYA_PREFIXES.items()},
    KOHYA_SDXL_TE1: "text_encoder",
    **{f"{component}.": component for component in KOHYA_PREFIXES},
}
ADAPTER_METADATA_KEY = "lora_adapter_metadata"  # where diffusers writes a PEFT file's LoraConfig


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
    namings: set[str] = set()
    unknown = []
    for key, tensor in tensors.items():
        match = next((s for s in _SUFFIXES_LONGEST_FIRST if key.endswith(s)), None)
        if match is None:
            unknown.append(key)
            continue
        part, naming = SUFFIXES[match]
        module_key = normalize_module_key(key[: -len(match)])
        parts.setdefault(module_key, {})[part] = tensor
        namings.add(naming or ("kohya" if module_key.startswith("lora_") else "diffusers"))
    if not parts:
        first = ", ".join(sorted(tensors)[:5]) or "no tensors"
        raise LoRAError(f"{name}: no LoRA weights found (expected keys like '*.lora_down.weight', "
                        f"'*.lora_A.weight' or '*.hada_w1_a'; first keys: {first})")
    if unknown:
        raise LoRAError(f"{name}: {len(unknown)} keys of a format this version does not read, e.g. "
                        f"{', '.join(sorted(unknown)[:5])}")
    metadata = dict(metadata or {})
    alphas = peft_alphas(metadata)
    modules = {key: build_module(key, found, alphas, name) for key, found in parts.items()}
    return LoRA(name, "+".join(sorted(namings)), modules, metadata, path)


def build_module(key: str, found: dict[str, Tensor], peft_alpha: Callable[[str], float | None],
                 lora_name: str) -> Module:
    """The module a file's parts describe; which parts are present decides the format."""
    alpha_tensor = found.get("alpha")
    alpha = float(alpha_tensor) if alpha_tensor is not None else peft_alpha(key)
    common = {"key": key, "alpha": alpha, "dora_scale": found.get("dora_scale"), "bias": found.get("diff_b")}
    if "down" in found or "up" in found:
        _require(found, ("down", "up"), key, lora_name)
        return LoRAModule(**common, down=found["down"], up=found["up"], mid=found.get("mid"))
    if any(p in found for p in ("w1a", "w1b", "w2a", "w2b")):
        _require(found, ("w1a", "w1b", "w2a", "w2b"), key, lora_name)
        return LoHaModule(**common, w1a=found["w1a"], w1b=found["w1b"], w2a=found["w2a"], w2b=found["w2b"],
                          t1=found.get("t1"), t2=found.get("t2"))
    if any(p in found for p in ("w1", "w1a_kr", "w2", "w2a_kr")):
        return LoKrModule(**common, w1=found.get("w1"), w1a=found.get("w1a_kr"), w1b=found.get("w1b_kr"),
                          w2=found.get("w2"), w2a=found.get("w2a_kr"), w2b=found.get("w2b_kr"),
                          t2=found.get("t2_kr"))
    if "diff" in found:
        return FullModule(**common, diff=found["diff"])
    raise LoRAError(f"{lora_name}: module '{key}' has only {', '.join(sorted(found))}; the file is incomplete")


def _require(found: dict[str, Tensor], needed: tuple[str, ...], key: str, lora_name: str) -> None:
    missing = [p for p in needed if p not in found]
    if missing:
        raise LoRAError(f"{lora_name}: module '{key}' has no {' or '.join(missing)} weight; the file is incomplete")


def normalize_module_key(key: str) -> str:
    """One spelling per module: component prefixes added, old diffusers processor names fixed."""
    for prefix in ("base_model.model.",):
        key = key.removeprefix(prefix)
    if key.startswith(("down_blocks.", "mid_block.", "up_blocks.", "conv_in", "conv_out", "time_embedding.")):
        key = "unet." + key
    elif key.startswith("text_model."):
        key = "text_encoder." + key
    for old, new in ((".processor.to_out", ".to_out.0"), (".processor.", ".")):
        key = key.replace(old, new)
    return key


def peft_alphas(metadata: dict[str, str]) -> Callable[[str], float | None]:
    """alpha of a module (``component.path``) from diffusers' ``lora_adapter_metadata``, if any.

    diffusers writes the PEFT LoraConfig of each component flattened under its prefix
    (``unet.lora_alpha``, ``unet.alpha_pattern``, ``text_encoder.lora_alpha``, ...). A pattern key
    applies to a module whose path is it or ends with ``.`` + it, as PEFT matches them.
    """
    import json

    try:
        data = json.loads(metadata.get(ADAPTER_METADATA_KEY) or "{}")
    except json.JSONDecodeError:
        data = {}

    def config_of(component: str) -> dict[str, Any]:
        nested = data.get(component)
        if isinstance(nested, dict):
            return nested
        return {k.removeprefix(f"{component}."): v for k, v in data.items() if k.startswith(f"{component}.")}

    def alpha_for(module_key: str) -> float | None:
        component, _, path = module_key.partition(".")
        config = config_of(component)
        for pattern, alpha in (config.get("alpha_pattern") or {}).items():
            if path == pattern or path.endswith("." + pattern):
                return float(alpha)
        alpha = config.get("lora_alpha")
        return float(alpha) if alpha is not None else None

    return alpha_for


@dataclass
class Placement:
    """Which LoRA modules land on which base modules, and why the rest do not."""

    placed: dict[str, Module] = field(default_factory=dict)  # target -> module
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
        if not module.fits(shape):
            placement.unplaced[key] = f"shape {list(module.delta_shape)} does not fit the module's {list(shape)}"
            continue
        if target in placement.placed:  # e.g. lora_te_ and lora_te1_ for one module: applying both is wrong
            placement.unplaced[key] = f"a second module for {target} (the first is '{placement.placed[target].key}')"
            continue
        placement.placed[target] = module
    return placement


def kohya_module_names(base) -> dict[str, str]:
    """target -> the name kohya's sd-scripts gives it (SGM UNet names and te1/te2 for SDXL)."""
    from ..models.ldm import unet_module_map

    sdxl = base.architecture == "sdxl"
    sgm = unet_module_map(base.unet.config) if sdxl else {}
    prefixes = {**KOHYA_PREFIXES, "text_encoder": KOHYA_SDXL_TE1} if sdxl else KOHYA_PREFIXES
    names = {}
    for target in base.lora_targets:
        component, path = target.split(".", 1)
        names[target] = prefixes[component] + sgm.get(path, path).replace(".", "_")
    return names
