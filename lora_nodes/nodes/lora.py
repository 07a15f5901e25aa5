"""LoRA nodes: load, apply, stack; and the preflights that find a LoRA for another model family
before anything runs (the nodes that save, merge and train LoRAs use them too)."""

from __future__ import annotations

import os
from functools import lru_cache
from typing import TYPE_CHECKING, Annotated, Any

from .. import families
from ..errors import LoRAError
from ..lora.files import PICKLE_SUFFIXES, read_lora, read_lora_header
from ..lora.metadata import trigger_words
from ..lora.model import LoRA
from ..lora.placement import FAMILY_ADVICE, check_placement, module_namings
from .spec import BOOLEAN, FLOAT, LORA, LORA_STACK, MODEL, STRING, Input, Output, Preflight, node

if TYPE_CHECKING:  # annotations only: declaring the nodes must not import torch
    from ..lora.recipe import AppliedLoRA, ModelRecipe


def strength(what: str) -> Input:
    """A LoRA strength input on the ``what`` it changes (the parameter gives its default, 1.0)."""
    return Input(FLOAT, min=-10.0, max=10.0, step=0.01,
                 description=f"how strongly the LoRA changes the {what}; 0 leaves it as it was, negative inverts")


# --------------------------------------------------------------------------- preflight
#
# Facts passed downstream (plain data): a model's {"family", "source"}; a LoRA's {"family", "name",
# "namings"} (family: its id, see lora_nodes.families; namings: component -> the key namings its
# modules use, see families.naming_of); a stack's
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
    try:
        lora = read_lora_header(path)
    except LoRAError as exc:
        return {}, str(exc)
    namings = {c: sorted(n) for c, n in module_namings(lora.modules).items()}
    family = lora.family
    return {"family": family.id if family else None, "name": lora.name, "namings": namings}, None


def lora_problems(lora_facts: list[dict[str, Any]], model: dict[str, Any], input_name: str) -> list[tuple[str, str, str]]:
    """A ``family_mismatch`` problem on ``input_name`` for each LoRA made for another family than ``model``'s."""
    problems = []
    for lora in lora_facts:
        mismatch = families.mismatch(families.by_id(lora.get("family")), families.by_id(model.get("family")))
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
    outputs=[
        Output("lora", LORA, "the LoRA's weights, not yet applied to anything"),
        Output("trigger_words", STRING, "the words it was trained on, most frequent first, comma-separated"),
    ],
    preflight=load_lora_preflight,
)
def load_lora(
    ctx,
    path: Annotated[str, Input(STRING, path=True, path_kind="file", folder="loras",
                               description="a LoRA file (.safetensors): kohya, diffusers/PEFT, LyCORIS, DoRA or "
                                           "full diffs")],
):
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
    outputs=[Output("model", MODEL, "the model with the LoRA; made real only when a node needs the weights")],
    preflight=apply_lora_preflight,
)
def apply_lora(
    ctx,
    model: Annotated[ModelRecipe, Input(MODEL)],
    lora: Annotated[LoRA, Input(LORA)],
    strength_model: Annotated[float, strength("UNet (the picture)")] = 1.0,
    strength_text: Annotated[float, strength("text encoder (how the prompt is read)")] = 1.0,
):
    """Add a LoRA to a model at a strength. Costs nothing until sampling; the base is never copied."""
    from ..lora.recipe import AppliedLoRA

    return (apply_to(ctx, model, [AppliedLoRA(lora, strength_model, strength_text)]),)


def slot_lora(i: int) -> Input:
    """LoRAStack's LoRA input of slot ``i``: it may be left unconnected."""
    return Input(LORA, optional=True, description=f"LoRA in slot {i} (leave unconnected to skip)")


def slot_enabled(i: int) -> Input:
    """LoRAStack's switch of slot ``i`` (the parameter gives its default, on)."""
    return Input(BOOLEAN, description=f"switch slot {i} on or off")


@node(
    "LoRAStack",
    display_name="LoRA Stack",
    category="lora",
    outputs=[Output("stack", LORA_STACK, "the LoRAs in order, with their strengths")],
    preflight=lora_stack_preflight,
)
def lora_stack(
    ctx,
    # the slots, each written out: the parameters are the node's inputs, in their order
    lora_1: Annotated[LoRA | None, slot_lora(1)] = None,
    strength_model_1: Annotated[float, strength("UNet")] = 1.0,
    strength_text_1: Annotated[float, strength("text encoder")] = 1.0,
    enabled_1: Annotated[bool, slot_enabled(1)] = True,
    lora_2: Annotated[LoRA | None, slot_lora(2)] = None,
    strength_model_2: Annotated[float, strength("UNet")] = 1.0,
    strength_text_2: Annotated[float, strength("text encoder")] = 1.0,
    enabled_2: Annotated[bool, slot_enabled(2)] = True,
    lora_3: Annotated[LoRA | None, slot_lora(3)] = None,
    strength_model_3: Annotated[float, strength("UNet")] = 1.0,
    strength_text_3: Annotated[float, strength("text encoder")] = 1.0,
    enabled_3: Annotated[bool, slot_enabled(3)] = True,
    lora_4: Annotated[LoRA | None, slot_lora(4)] = None,
    strength_model_4: Annotated[float, strength("UNet")] = 1.0,
    strength_text_4: Annotated[float, strength("text encoder")] = 1.0,
    enabled_4: Annotated[bool, slot_enabled(4)] = True,
    stack: Annotated[tuple[AppliedLoRA, ...] | None, Input(LORA_STACK, optional=True,
                                                          description="a stack to extend")] = None,
):
    """Collect up to four LoRAs with their strengths (after an optional incoming stack), in order."""
    from ..lora.recipe import AppliedLoRA

    slots = [(lora_1, strength_model_1, strength_text_1, enabled_1),
             (lora_2, strength_model_2, strength_text_2, enabled_2),
             (lora_3, strength_model_3, strength_text_3, enabled_3),
             (lora_4, strength_model_4, strength_text_4, enabled_4)]
    stack = tuple(stack or ())
    for lora, strength_model, strength_text, enabled in slots:
        if lora is not None and enabled:
            stack += (AppliedLoRA(lora, strength_model, strength_text),)
    return (stack,)


STACK_SLOTS = sum(1 for i in lora_stack.inputs if i.type == LORA)  # counted from the declaration above


@node(
    "ApplyLoRAStack",
    display_name="Apply LoRA Stack",
    category="lora",
    outputs=[Output("model", MODEL)],
    preflight=apply_lora_stack_preflight,
)
def apply_lora_stack(
    ctx,
    model: Annotated[ModelRecipe, Input(MODEL)],
    stack: Annotated[tuple[AppliedLoRA, ...], Input(LORA_STACK)],
):
    """Add every LoRA of a stack to a model, in the stack's order."""
    return (apply_to(ctx, model, list(stack)),)
