"""LoRA nodes: load, apply, stack."""

from __future__ import annotations

from ..lora.formats import read_lora
from ..lora.metadata import trigger_words
from ..lora.model import LoRA
from ..models.recipe import AppliedLoRA, ModelRecipe, check_placement
from .spec import BOOLEAN, FLOAT, LORA, LORA_STACK, MODEL, STRING, Input, Output, node

STACK_SLOTS = 4


def strength(name: str, what: str) -> Input:
    return Input(name, FLOAT, 1.0, min=-10.0, max=10.0, step=0.01,
                 description=f"how strongly the LoRA changes the {what}; 0 leaves it as it was, negative inverts")


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
)
def load_lora(ctx, path: str):
    """Read a LoRA file: kohya/A1111, diffusers/PEFT, LyCORIS (LoCon, LoHa, LoKr), DoRA, full diffs.

    Pickle files (.ckpt, .pt, .bin) load only as plain tensors, never running code.
    """
    lora = read_lora(path)
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
)
def apply_lora_stack(ctx, model: ModelRecipe, stack: tuple[AppliedLoRA, ...]):
    """Add every LoRA of a stack to a model, in the stack's order."""
    return (apply_to(ctx, model, list(stack)),)
