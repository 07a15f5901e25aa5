"""Reading LoRA files and placing their modules on a base model's modules.

Formats are told apart by key suffixes; a table maps each suffix to the part it holds, so a new
spelling is one line. Names are matched through the base's own index of module names
(:attr:`BaseModel.lora_name_index`), never by guessing where kohya's underscores were dots.
"""

from __future__ import annotations

import json
import math
import pickle
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..errors import LoRAError
from .metadata import metadata_warnings
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
    """Tensors and metadata of a ``.safetensors`` file, or of a pickle file loaded without code.

    Anything that is not such a file (missing, a folder, empty, damaged, truncated, no tensors)
    raises :class:`LoRAError` naming it.
    """
    path = Path(path)
    _check_is_file(path)
    if path.suffix.lower() == ".safetensors":
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - not a dict
                metadata = dict(f.metadata() or {})
        except (SafetensorError, OSError, ValueError, RuntimeError, TypeError) as exc:
            raise LoRAError(f"{path.name} is not a readable .safetensors file (damaged or truncated?): {exc}") from exc
    elif path.suffix.lower() in PICKLE_SUFFIXES:
        tensors, metadata = _read_pickle_weights_only(path), {}
    else:
        raise LoRAError(f"{path.name}: unknown file type '{path.suffix}' (expected .safetensors, or "
                        f"{', '.join(PICKLE_SUFFIXES)})")
    if not tensors:
        raise LoRAError(f"{path.name} holds no tensors: it is not a LoRA (or anything else with weights)")
    return tensors, metadata


def read_header(path: str | Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    """A ``.safetensors`` file's keys as empty ``meta`` tensors of their shapes, and its metadata.

    Reads only the header (no weights), for checks that must be cheap; raises :class:`LoRAError`
    as :func:`read_state_dict` does for a file that is not readable.
    """
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    _check_is_file(path)
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            shapes = {k: f.get_slice(k).get_shape() for k in f.keys()}  # noqa: SIM118 - not a dict
            metadata = dict(f.metadata() or {})
    except (SafetensorError, OSError, ValueError, RuntimeError, TypeError) as exc:
        raise LoRAError(f"{path.name} is not a readable .safetensors file (damaged or truncated?): {exc}") from exc
    return {k: torch.empty(shape, device="meta") for k, shape in shapes.items()}, metadata


def _check_is_file(path: Path) -> None:
    if path.is_dir():
        raise LoRAError(f"{path} is a folder; a LoRA is one file (.safetensors)")
    if not path.is_file():
        raise LoRAError(f"file not found: {path}")
    if path.stat().st_size == 0:
        raise LoRAError(f"{path.name} is empty (0 bytes): an interrupted download or copy?")


def _read_pickle_weights_only(path: Path) -> dict[str, Tensor]:
    # weights_only=True refuses any pickle that would run code: tensors and plain containers only.
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise LoRAError(
            f"{path.name} was refused: it is not a pickle of plain tensors (loading it could run code, or it is "
            f"not a pickle at all). Convert it to .safetensors with a tool you trust."
        ) from exc
    except Exception as exc:  # torch.load raises EOFError, RuntimeError (zip), ... for damaged files
        raise LoRAError(f"{path.name} is not a readable {path.suffix} file (damaged or truncated?): "
                        f"{type(exc).__name__}: {str(exc)[:200]}") from exc
    if isinstance(data, dict) and isinstance(data.get("state_dict"), dict):
        data = data["state_dict"]
    if not isinstance(data, dict):
        raise LoRAError(f"{path.name} holds a {type(data).__name__}, not a dict of tensors")
    return {k: v for k, v in data.items() if isinstance(k, str) and isinstance(v, Tensor)}


def read_lora(path: str | Path) -> LoRA:
    """Read a LoRA file (kohya or diffusers/PEFT naming) into a :class:`LoRA`."""
    path = Path(path)
    tensors, metadata = read_state_dict(path)
    return parse_lora(tensors, metadata, name=path.stem, path=str(path))


def read_lora_header(path: str | Path) -> LoRA:
    """A LoRA of ``meta`` tensors from a ``.safetensors`` header: its modules, shapes and metadata.

    Every structural check of :func:`parse_lora` runs (so a malformed file is found without
    reading its weights); values (alphas, NaNs) are not known, so those checks wait for the load.
    """
    path = Path(path)
    tensors, metadata = read_header(path)
    if not tensors:
        raise LoRAError(f"{path.name} holds no tensors: it is not a LoRA (or anything else with weights)")
    return parse_lora(tensors, metadata, name=path.stem, path=str(path))


def parse_lora(tensors: dict[str, Tensor], metadata: dict[str, str] | None = None,
               name: str = "lora", path: str = "") -> LoRA:
    """Group a LoRA state dict into modules; raise :class:`LoRAError` when it is not a LoRA we read.

    Values that would make black pictures (NaN, infinities, absurd magnitudes) and malformed
    modules are errors; metadata that does not parse only becomes :attr:`LoRA.warnings`.
    """
    label = Path(path).name if path else name
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
        raise LoRAError(f"{label}: no LoRA weights found (expected keys like '*.lora_down.weight', "
                        f"'*.lora_A.weight' or '*.hada_w1_a'; first keys: {first})")
    if unknown:
        raise LoRAError(f"{label}: {len(unknown)} keys of a format this version does not read, e.g. "
                        f"{', '.join(sorted(unknown)[:5])}")
    check_values(tensors, label)
    metadata = dict(metadata or {})
    warnings = metadata_warnings(metadata)
    alphas = peft_alphas(metadata, warnings)
    modules = {key: build_module(key, found, alphas, label) for key, found in parts.items()}
    return LoRA(name, "+".join(sorted(namings)), modules, metadata, path, warnings)


# Largest |value| accepted in any factor (down, up, mid, LoHa/LoKr factors, diffs, DoRA magnitudes).
# Trained factors are O(1e-3..1) (down starts near 1/sqrt(fan_in), up at 0), full diffs are
# differences of SD weights (well under 100 in magnitude), DoRA magnitudes are norms of weight rows
# or columns (single digits for SD's layers). 1e4 leaves orders of magnitude of margin over anything
# trained, yet sits below float16's 65504: larger factors overflow to inf once multiplied, or once
# a half-precision weight is patched, and the picture goes black.
MAX_WEIGHT = 1e4
SHOWN_KEYS = 5


def check_values(tensors: dict[str, Tensor], label: str) -> None:
    """Raise :class:`LoRAError` naming the keys (the first few, and a count) of non-finite or absurd tensors.

    Alphas count for finiteness only: their sane range depends on the rank (see ``MAX_SCALE``).
    ``meta`` tensors (header-only reads) have no values and are skipped.
    """
    nonfinite: list[str] = []
    huge: list[tuple[str, float]] = []
    for key, tensor in tensors.items():
        if tensor.is_meta or tensor.numel() == 0 or not (tensor.is_floating_point() or tensor.is_complex()):
            continue
        values = tensor.detach() if tensor.dtype in _ABS_DTYPES else tensor.detach().float()
        peak = float(values.abs().amax())  # NaN propagates through amax
        if not math.isfinite(peak):
            nonfinite.append(key)
        elif peak > MAX_WEIGHT and not key.endswith(".alpha"):
            huge.append((key, peak))
    if nonfinite:
        raise LoRAError(f"{label}: NaN or infinite values in {_count(nonfinite, 'tensor')} ({_first(sorted(nonfinite))}). "
                        "Applied, it would make black images: the file is damaged, or its training diverged.")
    if huge:
        key, peak = max(huge, key=lambda kv: kv[1])
        raise LoRAError(f"{label}: values beyond +-{MAX_WEIGHT:g} in {_count(huge, 'tensor')} "
                        f"({_first(sorted(k for k, _ in huge))}; the largest, {peak:.3g}, in {key}). Trained LoRA "
                        "weights are far smaller: the file is damaged, and applied it would make black or noise images.")


_ABS_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _count(items: list, noun: str) -> str:
    return f"{len(items)} {noun}{'s' if len(items) != 1 else ''}"


def _first(keys: list[str]) -> str:
    shown = ", ".join(keys[:SHOWN_KEYS])
    return shown + (f" and {len(keys) - SHOWN_KEYS} more" if len(keys) > SHOWN_KEYS else "")


def build_module(key: str, found: dict[str, Tensor], peft_alpha: Callable[[str], float | None],
                 lora_name: str) -> Module:
    """The module a file's parts describe; which parts are present decides the format.

    Its structure is checked here, once, for every way a LoRA is read (LoadLoRA, inspect, the
    trainer's initial LoRA and disk cache): a malformed module is a :class:`LoRAError` naming
    the file and the module, never a shape error later.
    """
    alpha_tensor = found.get("alpha")
    if alpha_tensor is not None and alpha_tensor.numel() != 1:
        raise LoRAError(f"{lora_name}: module '{key}': alpha has shape {list(alpha_tensor.shape)}; expected one number")
    if alpha_tensor is None:
        alpha = peft_alpha(key)
    else:
        alpha = None if alpha_tensor.is_meta else float(alpha_tensor)  # a header-only read has no values
    module = _module_of(key, found, alpha, lora_name)
    error = module.structure_error()
    if error:
        raise LoRAError(f"{lora_name}: module '{key}': {error}")
    return module


def _module_of(key: str, found: dict[str, Tensor], alpha: float | None, lora_name: str) -> Module:
    common = {"key": key, "alpha": alpha, "dora_scale": found.get("dora_scale"), "bias": found.get("diff_b")}
    if "down" in found or "up" in found:
        _require(found, ("down", "up"), key, lora_name)
        return LoRAModule(**common, down=found["down"], up=found["up"], mid=found.get("mid"))
    if any(p in found for p in ("w1a", "w1b", "w2a", "w2b")):
        _require(found, ("w1a", "w1b", "w2a", "w2b"), key, lora_name)
        return LoHaModule(**common, w1a=found["w1a"], w1b=found["w1b"], w2a=found["w2a"], w2b=found["w2b"],
                          t1=found.get("t1"), t2=found.get("t2"))
    if any(p in found for p in ("w1", "w1a_kr", "w1b_kr", "w2", "w2a_kr", "w2b_kr", "t2_kr")):
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


def peft_alphas(metadata: dict[str, str], warnings: list[str] | None = None) -> Callable[[str], float | None]:
    """alpha of a module (``component.path``) from diffusers' ``lora_adapter_metadata``, if any.

    diffusers writes the PEFT LoraConfig of each component flattened under its prefix
    (``unet.lora_alpha``, ``unet.alpha_pattern``, ``text_encoder.lora_alpha``, ...). A pattern key
    applies to a module whose path is it or ends with ``.`` + it, as PEFT matches them. Parts that
    do not parse are left out with a line in ``warnings`` (the module's alpha is then its rank);
    numbers are kept as they are, so a NaN or absurd alpha is refused where modules are built.
    """
    notes: list[str] = [] if warnings is None else warnings
    data = _adapter_metadata(metadata, notes)
    configs = {component: _alpha_config(component, data, notes) for component in KOHYA_PREFIXES}

    def alpha_for(module_key: str) -> float | None:
        component, _, path = module_key.partition(".")
        default, patterns = configs.get(component, (None, {}))
        for pattern, alpha in patterns.items():
            if path == pattern or path.endswith("." + pattern):
                return alpha
        return default

    return alpha_for


def _adapter_metadata(metadata: dict[str, str], warnings: list[str]) -> dict[str, Any]:
    raw = metadata.get(ADAPTER_METADATA_KEY)
    if not raw:
        return {}
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        warnings.append(f"{ADAPTER_METADATA_KEY} is not JSON ({str(exc)[:80]}); alphas default to each module's rank")
        return {}
    if not isinstance(data, dict):
        warnings.append(f"{ADAPTER_METADATA_KEY} is a JSON {type(data).__name__}, not an object; alphas default "
                        "to each module's rank")
        return {}
    return data


def _alpha_config(component: str, data: dict[str, Any], warnings: list[str]) -> tuple[float | None, dict[str, float]]:
    """(lora_alpha, alpha_pattern) of one component's LoraConfig, junk left out with a warning."""
    nested = data.get(component)
    if isinstance(nested, dict):
        config = nested
    else:
        config = {k.removeprefix(f"{component}."): v for k, v in data.items() if k.startswith(f"{component}.")}
    where = f"{ADAPTER_METADATA_KEY} {component}"
    default = config.get("lora_alpha")
    if default is not None:
        default = _number(default)
        if default is None:
            warnings.append(f"{where}.lora_alpha is {config['lora_alpha']!r}, not a number; its modules' alpha "
                            "is their rank")
    raw_patterns = config.get("alpha_pattern") or {}
    if not isinstance(raw_patterns, dict):
        warnings.append(f"{where}.alpha_pattern is a {type(raw_patterns).__name__}, not an object; it is ignored")
        raw_patterns = {}
    patterns, junk = {}, []
    for pattern, value in raw_patterns.items():
        number = _number(value)
        if number is None:
            junk.append(f"{pattern!r}: {value!r}")
        else:
            patterns[pattern] = number
    if junk:
        entries = "1 entry" if len(junk) == 1 else f"{len(junk)} entries"
        warnings.append(f"{where}.alpha_pattern: {entries} not a number ({', '.join(junk[:3])}); "
                        "those modules use lora_alpha")
    return default, patterns


def _number(value: Any) -> float | None:
    """``value`` as a float when JSON gave a number (NaN and infinities included), else None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        return float(value)
    except OverflowError:  # an integer too large for a float: as absurd as infinity
        return math.inf


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
        misfit = module.fit_error(tuple(targets[target].weight.shape))
        if misfit:
            placement.unplaced[key] = misfit
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


# kohya names of the original (SGM/LDM) UNet tree, as SDXL files use; others follow the diffusers tree.
SGM_UNET_PREFIXES = tuple(f"lora_unet_{p}" for p in ("input_blocks_", "middle_block_", "output_blocks_",
                                                     "time_embed_", "label_emb_", "out_"))


def naming_of(key: str) -> str:
    """How a module key spells its module's name (two keys of one naming spell a module alike).

    ``diffusers`` (dotted, PEFT and older diffusers alike once normalized), ``kohya`` (underscores
    of the diffusers tree), ``kohya SGM`` (underscores of the original UNet tree, as SDXL files
    name it) or ``kohya te1`` (SDXL's name for the first text encoder).
    """
    if key.startswith(SGM_UNET_PREFIXES):
        return "kohya SGM"
    if key.startswith(KOHYA_SDXL_TE1):
        return "kohya te1"
    if key.startswith("lora_"):
        return "kohya"
    return "diffusers"


def module_namings(keys: Iterable[str]) -> dict[str, set[str]]:
    """component -> the namings its module keys use (see :func:`naming_of`)."""
    namings: dict[str, set[str]] = {}
    for key in keys:
        namings.setdefault(component_of(key), set()).add(naming_of(key))
    return namings


def naming_conflict(namings: list[tuple[str, dict[str, set[str]]]]) -> str | None:
    """Whether LoRAs (name, :func:`module_namings`) spell the same component's modules differently.

    Merged by key, such LoRAs would keep one module per spelling, and only one of them would be
    applied: the names must be matched through the base. Returns a sentence saying which, or None.
    """
    for i, (name_a, a) in enumerate(namings):
        for name_b, b in namings[i + 1:]:
            for component in sorted(set(a) & set(b)):
                if a[component] != b[component]:
                    return (f"'{name_a}' names its {component} modules with {' and '.join(sorted(a[component]))} "
                            f"names, '{name_b}' with {' and '.join(sorted(b[component]))} names")
    return None
