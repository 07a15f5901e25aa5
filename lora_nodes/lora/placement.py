"""Where a LoRA's modules go in a base: matched through the base's own index of module names
(never by guessing where kohya's underscores were dots), checked for fit, and kept per LoRA."""

from __future__ import annotations

import weakref
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from .. import families
from ..errors import LoRAError
from ..families import LoRATarget
from .model import LoRA, Module, rows_of

FAMILY_ADVICE = "Use a base of the LoRA's family, or a LoRA trained for this base."


@dataclass
class Placement:
    """Which LoRA modules land on which base modules, and why the rest do not."""

    placed: dict[str, Module] = field(default_factory=dict)  # target -> module
    unplaced: dict[str, str] = field(default_factory=dict)  # file key -> reason

    def summary(self, lora: LoRA) -> str:
        placed = len({module.key for module in self.placed.values()})
        return f"{placed} of {len(lora.modules)} modules of LoRA '{lora.name}' placed"

    @property
    def sources(self) -> dict[str, list[str]]:
        """File key -> the targets it was placed on (several for a fused module)."""
        sources: dict[str, list[str]] = {}
        for target, module in self.placed.items():
            sources.setdefault(module.key, []).append(target)
        return sources


def place(lora: LoRA, base: LoRATarget) -> Placement:
    """Match every module of ``lora`` to a module of ``base`` (see :func:`placement_of`, which keeps it)."""
    placement = Placement()
    index, targets, fused = base.lora_name_index, base.lora_targets, base.fused_targets
    # a base of some parts only (ComfyUI's MODEL or CLIP) leaves the other parts' keys to the base that has them
    absent = {c for c in base.family.lora_components if c not in base.components}
    for key, module in lora.modules.items():
        target = index.get(key)
        if target is None and absent and families.component_of(key) in absent:
            continue
        if target is None:
            placement.unplaced[key] = "no module of that name in the base"
            continue
        if target in fused:
            parts = _split(module, fused[target], targets)
        else:
            parts = module.fit_error(tuple(targets[target].weight.shape)) or {target: module}
        if isinstance(parts, str):
            placement.unplaced[key] = parts
            continue
        taken = next((t for t in parts if t in placement.placed), None)
        if taken is not None:  # e.g. lora_te_ and lora_te1_ for one module: applying both is wrong
            placement.unplaced[key] = f"a second module for {taken} (the first is '{placement.placed[taken].key}')"
            continue
        placement.placed.update(parts)
    return placement


def fused_rows_of(pieces: tuple[tuple[str, int, int], ...]) -> tuple[dict[str, list[range]], int]:
    """A fused module's pieces (see ``LoRATarget.fused_targets``) as target -> the fused rows it
    holds (ranges, in the target's row order), and the fused module's row count."""
    rows: dict[str, list[range]] = {}
    for target, start, end in pieces:
        rows.setdefault(target, []).append(range(start, end))
    return rows, max(end for _, _, end in pieces)


def _split(module: Module, pieces: tuple[tuple[str, int, int], ...], targets) -> dict[str, Module] | str:
    """A fused module's change as one module per target it covers (see :func:`.model.rows_of`),
    or why it does not fit."""
    rows, fused_rows = fused_rows_of(pieces)
    first = targets[pieces[0][0]].weight.shape
    misfit = module.fit_error((fused_rows, *first[1:]))
    if misfit:
        return misfit
    parts = {}
    for target, ranges in rows.items():  # one range (q, k, v) passes as it is: a slice, no gather
        picked = ranges[0] if len(ranges) == 1 else [row for piece in ranges for row in piece]
        part = rows_of(module, picked, fused_rows)
        if isinstance(part, str):
            return part
        parts[target] = part
    return parts


# base -> (LoRA -> its placement): kept while both live, so a LoRA is placed once per base
_PLACEMENTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def placement_of(lora: LoRA, base: LoRATarget) -> Placement:
    """Where ``lora``'s modules go in ``base``, worked out once per LoRA and base while they live."""
    cache = _PLACEMENTS.get(base)
    if cache is None:
        cache = _PLACEMENTS[base] = weakref.WeakKeyDictionary()
    if lora not in cache:
        cache[lora] = place(lora, base)
    return cache[lora]


def describe_unplaced(unplaced: Mapping[str, str], examples: int = 3) -> str:
    """The keys that found no place, in one sentence grouped by reason (a few example keys each),
    instead of a line per key: ``7 keys: no module of that name in the base (e.g. a, b, c); ...``."""
    by_reason: dict[str, list[str]] = {}
    for key in sorted(unplaced):
        by_reason.setdefault(unplaced[key], []).append(key)
    groups = sorted(by_reason.items(), key=lambda item: -len(item[1]))
    return "; ".join(f"{len(keys)} key{'s' if len(keys) > 1 else ''}: {reason} "
                     f"(e.g. {', '.join(keys[:examples])}{', ...' if len(keys) > examples else ''})"
                     for reason, keys in groups)


def check_placement(lora: LoRA, base: LoRATarget) -> Placement:
    """Place ``lora`` on ``base``; a LoRA for another model family, or that places nothing, is an error."""
    mismatch = families.mismatch(lora.family, base.family)
    if mismatch:
        raise LoRAError(f"{mismatch} (LoRA '{lora.name}' on {base.source}). {FAMILY_ADVICE}")
    placement = placement_of(lora, base)
    if not placement.placed and placement.unplaced:
        components = sorted({families.component_of(k) for k in lora.modules})
        first = min(placement.unplaced)
        examples = ", ".join(sorted(placement.unplaced)[:3])
        raise LoRAError(
            f"LoRA '{lora.name}' matches nothing in the base {base.source} "
            f"({families.describe(base.family)}): none of its {len(lora.modules)} "
            f"modules ({', '.join(components)}) has a place, e.g. {examples} "
            f"({placement.unplaced[first]}). "
            f"Is it for another model? 'lora-nodes inspect LORA --base SOURCE' lists what fits."
        )
    return placement


def module_namings(keys: Iterable[str]) -> dict[str, set[str]]:
    """component -> the namings its module keys use (see :func:`lora_nodes.families.naming_of`)."""
    namings: dict[str, set[str]] = {}
    for key in keys:
        namings.setdefault(families.component_of(key), set()).add(families.naming_of(key))
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
