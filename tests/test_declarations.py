"""A node is declared by its function's signature: each input's name, type and default written once."""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Annotated, get_type_hints

import pytest

from lora_nodes.nodes import catalogue
from lora_nodes.nodes.spec import FLOAT, INT, LORA, MODEL, REQUIRED, STRING, Catalogue, Input, node
from lora_nodes.training.config import TrainConfig


@dataclass(frozen=True)
class Knobs:
    """A group of inputs, as TrainConfig is TrainLoRA's."""

    rank: Annotated[int, Input(INT, min=1, max=64, description="the rank")] = 8
    scale: Annotated[float, Input(FLOAT, step=0.5)] = 1.0


@dataclass(frozen=True)
class Point:
    """A dataclass whose fields declare no inputs: a value, not a group."""

    x: int = 0


received: list[tuple] = []


@node("Knobbed", display_name="Knobbed", category="test", output_node=True)
def knobbed(ctx, label: Annotated[str, Input(STRING)], knobs: Knobs,
            name: Annotated[str, Input(STRING)] = "out"):
    """Records what it was given."""
    received.append((label, knobs, name))


def test_inputs_follow_the_parameters_in_order_with_their_defaults():
    @node("Declared", display_name="Declared", category="test")
    def declared(ctx, model: Annotated[object, Input(MODEL, description="a model")],
                 prompt: Annotated[str, Input(STRING, multiline=True)],
                 steps: Annotated[int, Input(INT, min=1, max=100)] = 20,
                 extra: Annotated[object | None, Input(LORA, optional=True)] = None):
        """Does nothing."""

    assert [i.name for i in declared.inputs] == ["model", "prompt", "steps", "extra"]
    model, prompt, steps, extra = declared.inputs
    assert model == Input(MODEL, description="a model", name="model") and model.required
    assert prompt.default is REQUIRED and prompt.required and prompt.multiline
    assert (steps.default, steps.min, steps.max, steps.required) == (20, 1, 100, False)
    # an optional input left out gets None, and has no default of its own (as declared before signatures)
    assert extra.optional and extra.default is REQUIRED and not extra.required
    assert declared.description == "Does nothing."


def test_a_group_expands_in_place_and_its_node_gets_the_dataclass(tmp_path):
    from lora_nodes.engine.scheduler import Runner
    from lora_nodes.graph.workflow import NodeCall, Workflow

    assert [i.name for i in knobbed.inputs] == ["label", "rank", "scale", "name"]
    assert knobbed.input("rank") == Input(INT, min=1, max=64, description="the rank", name="rank", default=8)
    assert knobbed.input("scale").default == 1.0
    received.clear()
    workflow = Workflow({"k": NodeCall("Knobbed", {"label": "a", "rank": 4})}, tmp_path)
    Runner(Catalogue([knobbed]), output_dir=tmp_path / "out", cache_dir=tmp_path / "cache").run(workflow)
    assert received == [("a", Knobs(rank=4, scale=1.0), "out")]
    knobbed.run(None, "b", 2, 0.5, "n")  # positionally, in input order, as tests call nodes
    assert received[-1] == ("b", Knobs(rank=2, scale=0.5), "n")


def test_a_parameter_without_a_declaration_is_a_type_error_naming_the_node():
    with pytest.raises(TypeError, match="node Bare: parameter 'b' declares no input"):
        @node("Bare", display_name="Bare", category="test")
        def bare(ctx, b):
            return ()

    with pytest.raises(TypeError, match="node Plain: parameter 'b' declares no input"):
        @node("Plain", display_name="Plain", category="test")
        def plain(ctx, b: int = 1):
            return ()

    with pytest.raises(TypeError, match="node Typed: parameter 'b' declares no input"):
        @node("Typed", display_name="Typed", category="test")
        def typed(ctx, b: Point):
            return ()

    with pytest.raises(TypeError, match="node Many: parameter '\\*\\*slots' declares no input"):
        @node("Many", display_name="Many", category="test")
        def many(ctx, **slots):
            return ()


def test_an_annotation_naming_something_undefined_is_a_type_error_naming_the_node():
    with pytest.raises(TypeError, match="node Unresolved: .*NotDefinedAnywhere"):
        @node("Unresolved", display_name="Unresolved", category="test")
        def unresolved(ctx, b: Annotated[NotDefinedAnywhere, Input(INT)] = 1):  # noqa: F821 - the point
            return ()


def test_a_default_is_written_once_on_the_parameter():
    with pytest.raises(TypeError, match="node Twice: parameter 'b' gives a name or default in Input"):
        @node("Twice", display_name="Twice", category="test")
        def twice(ctx, b: Annotated[int, Input(INT, 3)] = 3):
            return ()


def test_train_lora_inputs_are_train_config_fields():
    spec = catalogue()["TrainLoRA"]
    names = [i.name for i in spec.inputs]
    group = names[names.index("dataset") + 1:names.index("name")]
    assert group == [f.name for f in fields(TrainConfig)]
    defaults, hints = TrainConfig(), get_type_hints(TrainConfig, include_extras=True)
    for item in fields(TrainConfig):
        declared = spec.input(item.name)
        assert declared.default == getattr(defaults, item.name), item.name
        assert hints[item.name].__metadata__ == (replace(declared, name="", default=REQUIRED),), item.name
    assert not spec.input("gradient_checkpointing").in_key and spec.input("rank").in_key


def test_lora_stack_declares_each_of_its_slots():
    from lora_nodes.nodes.lora import STACK_SLOTS

    spec = catalogue()["LoRAStack"]
    assert [i.name for i in spec.inputs if i.type == LORA] == [f"lora_{i}" for i in range(1, STACK_SLOTS + 1)]
    assert [i.name for i in spec.inputs][-1] == "stack"


def test_the_catalogue_is_the_published_contract():
    """Node ids, input names, order, defaults, ranges and descriptions are what workflow files and
    ComfyUI graphs depend on: a change to any of them must be deliberate (update the fixture with
    ``lora-nodes nodes --json > tests/fixtures/nodes_object_info.json`` and say so in the notes)."""
    import json
    from pathlib import Path

    from lora_nodes.comfyui.object_info import catalogue_object_info
    from lora_nodes.nodes.spec import Catalogue

    published = json.loads((Path(__file__).parent / "fixtures" / "nodes_object_info.json").read_text())
    ours = Catalogue([spec for spec in catalogue().values() if not spec.comfy_core])  # what the pack registers
    assert json.loads(json.dumps(catalogue_object_info(ours))) == published
