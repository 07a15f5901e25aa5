"""LoRA nodes: load, apply, stack; and the preflights that find a LoRA for another model family
before anything runs (the nodes that save, merge and train LoRAs use them too)."""

from __future__ import annotations

import os
from functools import lru_cache
from typing import Any

from ..lora.formats import PICKLE_SUFFIXES, read_lora
from ..lora.metadata import trigger_words
from ..lora.model import LoRA
from ..models.recipe import FAMILY_ADVICE, AppliedLoRA, ModelRecipe, check_placement
from .spec import BOOLEAN, FLOAT, LORA, LORA_STACK, MODEL, STRING, Input, Output, Preflight, node

STACK_SLOTS = 4


def strength(name: str, what: str) -> Input:
    return Input(name, FLOAT, 1.0, min=-10.0, max=10.0, step=0.01,
                 description=f"how strongly the LoRA changes the {what}; 0 leaves it as it was, negative inverts")


# --------------------------------------------------------------------------- preflight
#
# Facts passed downstream: a model's {"family", "source"}; a LoRA's {"family", "name", "namings"}
# (namings: component -> the key namings its modules use, see lora.formats.naming_of); a stack's
# {"loras": [LoRA facts + "input": the slot it came in by]}. Any fact may be missing (unknown).

BAD_LORA = "bad_lora"  # a LoRA file that cannot be read as a LoRA (damaged, malformed, not a LoRA)
FAMILY_MISMATCH = "family_mismatch"  # a LoRA (or model) for another model family than the base's


def load_lora_preflight(literals: dict[str, Any], upstream: dict[str, dict[str, Any]]) -> Preflight:
    """LoadLoRA before running: the LoRA's family and namings from the file's header, or why it is no LoRA."""
    path = literals.get("path")
    if not isinstance(path, str) or not os.path.isfile(path) or path.lower().endswith(PICKLE_SUFFIXES):
        return Preflight()  # missing paths are the path check's; pickles have no header to read cheaply
    stat = os.stat(path)
    facts, problem = _lora_header_facts(path, stat.st_size, stat.st_mtime_ns)
    return Preflight(facts=dict(facts), problems=[(BAD_LORA, "path", problem)] if problem else [])


@lru_cache(maxsize=256)
def _lora_header_facts(path: str, size: int, mtime_ns: int) -> tuple[dict[str, Any], str | None]:
    """(facts, problem) of a LoRA file from its header only; cached while the file is unchanged."""
    from ..errors import LoRAError
    from ..lora.architecture import lora_architecture
    from ..lora.formats import module_namings, read_lora_header

    try:
        lora = read_lora_header(path)
    except LoRAError as exc:
        return {}, str(exc)
    namings = {c: sorted(n) for c, n in module_namings(lora.modules).items()}
    return {"family": lora_architecture(lora), "name": lora.name, "namings": namings}, None


def lora_problems(lora_facts: list[dict[str, Any]], model: dict[str, Any], input_name: str) -> list[tuple[str, str, str]]:
    """A ``family_mismatch`` problem on ``input_name`` for each LoRA made for another family than ``model``'s."""
    from ..lora.architecture import family_mismatch

    problems = []
    for lora in lora_facts:
        mismatch = family_mismatch(lora.get("family"), model.get("family"))
        if mismatch:
            where = f"LoRA '{lora.get('name', '?')}'" + (f" in {lora['input']}" if lora.get("input") else "")
            on = f" on {model['source']}" if model.get("source") else ""
            problems.append((FAMILY_MISMATCH, input_name, f"{mismatch} ({where}{on}). {FAMILY_ADVICE}"))
    return problems


def apply_lora_preflight(literals: dict[str, Any], upstream: dict[str, dict[str, Any]]) -> Preflight:
    """ApplyLoRA: the LoRA must be for the model's family; the output model keeps the base's facts."""
    model = upstream.get("model", {})
    problems = lora_problems([upstream["lora"]], model, "lora") if "lora" in upstream else []
    return Preflight(facts=dict(model), problems=problems)


def lora_stack_preflight(literals: dict[str, Any], upstream: dict[str, dict[str, Any]]) -> Preflight:
    """LoRAStack: the stack carries the facts of its enabled LoRAs, after those of an incoming stack."""
    loras = list(upstream.get("stack", {}).get("loras", []))
    for i in range(1, STACK_SLOTS + 1):
        if f"lora_{i}" in upstream and literals.get(f"enabled_{i}", True) is not False:
            loras.append({**upstream[f"lora_{i}"], "input": f"lora_{i}"})
    return Preflight(facts={"loras": loras})


def apply_lora_stack_preflight(literals: dict[str, Any], upstream: dict[str, dict[str, Any]]) -> Preflight:
    """ApplyLoRAStack: every LoRA of the stack must be for the model's family."""
    model = upstream.get("model", {})
    return Preflight(facts=dict(model), problems=lora_problems(upstream.get("stack", {}).get("loras", []), model, "stack"))


def save_lora_preflight(literals: dict[str, Any], upstream: dict[str, dict[str, Any]]) -> Preflight:
    """SaveLoRA with a model connected: the LoRA must be for the model's family (as it checks at run time)."""
    if "model" not in upstream or "lora" not in upstream:
        return Preflight()
    return Preflight(problems=lora_problems([upstream["lora"]], upstream["model"], "lora"))


def train_lora_preflight(literals: dict[str, Any], upstream: dict[str, dict[str, Any]]) -> Preflight:
    """TrainLoRA: an initial LoRA must be for the model's family; the trained LoRA is for that family."""
    model = upstream.get("model", {})
    problems = lora_problems([upstream["initial_lora"]], model, "initial_lora") if "initial_lora" in upstream else []
    return Preflight(facts={"family": model.get("family"), "name": literals.get("name") or "trained"},
                     problems=problems)


# --------------------------------------------------------------------------- nodes


@node(
    "LoadLoRA",
    display_name="Load LoRA",
    category="lora",
    inputs=[Input("path", STRING, path=True, path_kind="file", folder="loras",
                  description="a LoRA file (.safetensors): kohya, diffusers/PEFT, LyCORIS, DoRA or full diffs")],
    outputs=[
        Output("lora", LORA, "the LoRA's weights, not yet applied to anything"),
        Output("trigger_words", STRING, "the words it was trained on, most frequent first, comma-separated"),
    ],
    preflight=load_lora_preflight,
)
def load_lora(ctx, path: str):
    """Read a LoRA file: kohya/A1111, diffusers/PEFT, LyCORIS (LoCon, LoHa, LoKr), DoRA, full diffs.

    Pickle files (.ckpt, .pt, .bin) load only as plain tensors, never running code. A file with
    NaN, infinite or absurd weights, or a malformed module, is refused; metadata that does not
    parse is a warning (the weights still load).
    """
    lora = read_lora(path)
    for warning in lora.warnings:
        ctx.warn(f"LoRA '{lora.name}': {warning}", lora=lora.name)
    return lora, ", ".join(trigger_words(lora.metadata))


def apply_to(ctx, model: ModelRecipe, applied: list[AppliedLoRA]) -> ModelRecipe:
    """``model`` with ``applied`` added, after checking that each LoRA fits it."""
    for item in applied:
        placement = check_placement(item.lora, model.base)
        if placement.unplaced:
            ctx.warn(f"{placement.summary(item.lora)}; {len(placement.unplaced)} could not be placed",
                     lora=item.lora.name, unplaced=placement.unplaced)
    return model.with_loras(*applied)


@node(
    "ApplyLoRA",
    display_name="Apply LoRA",
    category="lora",
    inputs=[
        Input("model", MODEL),
        Input("lora", LORA),
        strength("strength_model", "UNet (the picture)"),
        strength("strength_text", "text encoder (how the prompt is read)"),
    ],
    outputs=[Output("model", MODEL, "the model with the LoRA; made real only when a node needs the weights")],
    preflight=apply_lora_preflight,
)
def apply_lora(ctx, model: ModelRecipe, lora: LoRA, strength_model: float, strength_text: float):
    """Add a LoRA to a model at a strength. Costs nothing until sampling; the base is never copied."""
    return (apply_to(ctx, model, [AppliedLoRA(lora, strength_model, strength_text)]),)


def _slot_inputs() -> list[Input]:
    inputs = []
    for i in range(1, STACK_SLOTS + 1):
        inputs += [
            Input(f"lora_{i}", LORA, optional=True, description=f"LoRA in slot {i} (leave unconnected to skip)"),
            strength(f"strength_model_{i}", "UNet"),
            strength(f"strength_text_{i}", "text encoder"),
            Input(f"enabled_{i}", BOOLEAN, True, description=f"switch slot {i} on or off"),
        ]
    return inputs


@node(
    "LoRAStack",
    display_name="LoRA Stack",
    category="lora",
    inputs=[*_slot_inputs(), Input("stack", LORA_STACK, optional=True, description="a stack to extend")],
    outputs=[Output("stack", LORA_STACK, "the LoRAs in order, with their strengths")],
    preflight=lora_stack_preflight,
)
def lora_stack(ctx, **slots):
    """Collect up to four LoRAs with their strengths (after an optional incoming stack), in order."""
    stack = tuple(slots.pop("stack") or ())
    for i in range(1, STACK_SLOTS + 1):
        lora = slots[f"lora_{i}"]
        if lora is not None and slots[f"enabled_{i}"]:
            stack += (AppliedLoRA(lora, slots[f"strength_model_{i}"], slots[f"strength_text_{i}"]),)
    return (stack,)


@node(
    "ApplyLoRAStack",
    display_name="Apply LoRA Stack",
    category="lora",
    inputs=[Input("model", MODEL), Input("stack", LORA_STACK)],
    outputs=[Output("model", MODEL)],
    preflight=apply_lora_stack_preflight,
)
def apply_lora_stack(ctx, model: ModelRecipe, stack: tuple[AppliedLoRA, ...]):
    """Add every LoRA of a stack to a model, in the stack's order."""
    return (apply_to(ctx, model, list(stack)),)
