"""The node catalogue: one declaration per node, described in ComfyUI's /object_info shape."""

import json

import pytest

from lora_nodes.cli import main
from lora_nodes.comfyui.object_info import object_info
from lora_nodes.nodes import catalogue
from lora_nodes.nodes.spec import REQUIRED, node

CORE_NODES = {"LoadBase", "LoadLoRA", "ApplyLoRA", "LoRAStack", "ApplyLoRAStack", "Sample", "SaveImages"}


def test_nodes_json_is_object_info_shaped(capsys):
    assert main(["nodes", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert CORE_NODES <= set(info)
    for node_id, entry in info.items():
        assert entry["name"] == node_id
        for key in ("input", "input_order", "output", "output_name", "display_name", "description",
                    "category", "output_node"):
            assert key in entry, (node_id, key)
        assert set(entry["input_order"]["required"]) == set(entry["input"]["required"])
        assert len(entry["output"]) == len(entry["output_name"])


def test_object_info_carries_types_defaults_ranges_and_choices():
    info = object_info(catalogue()["Sample"])
    required = info["input"]["required"]
    assert required["model"] == ["LN_MODEL", {}]
    assert required["steps"][0] == "INT" and required["steps"][1]["default"] == 20
    assert required["steps"][1]["min"] == 1
    assert required["sampler"][0] == ["euler", "euler_ancestral", "ddim", "dpmpp_2m", "uni_pc_bh2"]
    assert required["cfg"][1]["step"] == 0.1
    assert info["output"] == ["IMAGE"] and info["output_name"] == ["images"]
    stack = object_info(catalogue()["LoRAStack"])
    assert "stack" in stack["input"]["optional"] and "lora_1" in stack["input"]["optional"]
    assert object_info(catalogue()["SaveImages"])["output_node"] is True


def test_our_types_never_reuse_comfyui_model_types():
    comfy_types = {"MODEL", "CLIP", "VAE", "LATENT", "CONDITIONING"}
    for spec in catalogue().values():
        assert not comfy_types & ({i.type for i in spec.inputs} | {o.type for o in spec.outputs}), spec.id


def test_every_parameter_must_declare_an_input():
    with pytest.raises(TypeError, match="node Broken: parameter 'b' declares no input"):
        @node("Broken", display_name="Broken", category="test")
        def broken(ctx, b):
            return ()


def test_required_means_no_default():
    spec = catalogue()["Sample"]
    assert spec.input("prompt").default is REQUIRED and spec.input("prompt").required
    assert not spec.input("seed").required


def test_namespaced_ids_are_accepted_and_never_collide_with_comfyui_core(tmp_path):
    from conftest import REPO

    from lora_nodes.graph import parse_workflow
    from lora_nodes.graph.validate import check

    lines = (REPO / "tests" / "fixtures" / "comfyui" / "core_node_ids.txt").read_text().splitlines()
    core = {line.strip() for line in lines if line.strip() and not line.startswith("#")}
    assert len(core) > 300 and {"CheckpointLoaderSimple", "KSampler", "LoraLoader", "SaveImage"} <= core
    cat = catalogue()
    assert all(spec.comfy_id.startswith("lora-nodes.") and spec.comfy_id not in core for spec in cat.values())
    assert cat["lora-nodes.Sample"] is cat["Sample"]
    workflow = parse_workflow({"1": {"class_type": "lora-nodes.LoadBase", "inputs": {}},
                               "2": {"class_type": "lora-nodes.Sample", "inputs": {"model": ["1", 0], "prompt": "x"}},
                               "3": {"class_type": "SaveImages", "inputs": {"images": ["2", 0]}}}, tmp_path)
    assert check(workflow, cat)[0] == []
