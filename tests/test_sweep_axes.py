"""Richer sweep axes: a folder of LoRAs, every sampler, prompt search-and-replace, every slot of a stack."""

from __future__ import annotations

import shutil

import pytest
from conftest import EXAMPLE_LORA, write_workflow

from lora_nodes.graph import WorkflowError, load_workflow
from lora_nodes.graph.overrides import apply_overrides, expand_sweeps, parse_sweep, sweep_variants
from lora_nodes.nodes import catalogue

WORKFLOW = f"""
format: lora-nodes/1
nodes:
  base:   {{type: LoadBase, inputs: {{source: "builtin:tiny"}}}}
  style:  {{type: LoadLoRA, inputs: {{path: {EXAMPLE_LORA}}}}}
  stack:  {{type: LoRAStack, inputs: {{lora_1: [style, lora], lora_2: [style, lora], strength_text_1: 0.3}}}}
  styled: {{type: ApplyLoRAStack, inputs: {{model: [base, model], stack: [stack, stack]}}}}
  images: {{type: Sample, inputs: {{model: [styled, model], prompt: "a red circle on a white background"}}}}
  save:   {{type: SaveImages, inputs: {{images: [images, images]}}}}
"""


@pytest.fixture
def workflow(tmp_path):
    return load_workflow(write_workflow(tmp_path, WORKFLOW))


def _values(workflow, sweeps, tmp_path):
    """Each variant's workflow, as the run would get it."""
    expanded = expand_sweeps(workflow, sweeps, catalogue(), tmp_path)
    return [apply_overrides(workflow, variant, catalogue(), tmp_path) for variant in sweep_variants(expanded)]


def test_a_folder_of_loras_is_one_variant_per_model_file_in_it(workflow, tmp_path):
    folder = tmp_path / "loras"
    folder.mkdir()
    for name in ("b_style.safetensors", "a_style.safetensors"):
        shutil.copyfile(EXAMPLE_LORA, folder / name)
    (folder / "notes.txt").write_text("not a LoRA")
    variants = _values(workflow, [parse_sweep("style.path=loras")], tmp_path)
    assert [v.nodes["style"].inputs["path"] for v in variants] == [str(folder / "a_style.safetensors"),
                                                                   str(folder / "b_style.safetensors")]
    (folder / "a_style.safetensors").unlink()
    (folder / "b_style.safetensors").unlink()
    with pytest.raises(WorkflowError, match="holds no model files"):
        _values(workflow, [parse_sweep("style.path=loras")], tmp_path)


def test_star_sweeps_every_choice_of_a_choice_input(workflow, tmp_path):
    variants = _values(workflow, [parse_sweep("images.sampler=*")], tmp_path)
    samplers = [v.nodes["images"].inputs["sampler"] for v in variants]
    assert samplers == list(catalogue()["Sample"].input("sampler").choices)
    assert {"euler", "dpmpp_2m", "uni_pc"} <= set(samplers)


def test_prompt_search_and_replace_keeps_the_found_text_first(workflow, tmp_path):
    variants = _values(workflow, [parse_sweep("images.prompt:replace=red,green,blue")], tmp_path)
    assert [v.nodes["images"].inputs["prompt"] for v in variants] == [
        "a red circle on a white background", "a green circle on a white background",
        "a blue circle on a white background"]
    assert [o.label for o in parse_sweep("images.prompt:replace=red,blue")] == ["images.prompt=red",
                                                                                  "images.prompt=blue"]
    with pytest.raises(WorkflowError, match="'purple', is not in"):
        _values(workflow, [parse_sweep("images.prompt:replace=purple,green")], tmp_path)


def test_a_wildcard_input_sets_every_slot_of_a_stack_and_nothing_else(workflow, tmp_path):
    variants = _values(workflow, [parse_sweep("stack.strength_model_*=0,0.5")], tmp_path)
    for variant, value in zip(variants, (0, 0.5), strict=True):
        inputs = variant.nodes["stack"].inputs
        assert [inputs[f"strength_model_{i}"] for i in range(1, 5)] == [value] * 4
        assert inputs["strength_text_1"] == 0.3 and "strength_text_2" not in inputs
    with pytest.raises(WorkflowError, match="matches no input"):
        _values(workflow, [parse_sweep("stack.nothing_*=1")], tmp_path)
