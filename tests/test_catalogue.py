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
    assert required["sampler"][0] == ["euler", "euler_ancestral", "ddim", "dpmpp_2m", "heun", "dpm_2", "dpm_2_ancestral",
                                      "lms", "dpmpp_2m_sde", "dpmpp_sde", "uni_pc", "uni_pc_bh2"]
    assert required["cfg"][1]["step"] == 0.1
    assert info["output"] == ["IMAGE"] and info["output_name"] == ["images"]
    stack = object_info(catalogue()["LoRAStack"])
    assert "stack" in stack["input"]["optional"] and "lora_1" in stack["input"]["optional"]
    assert object_info(catalogue()["SaveImages"])["output_node"] is True


def test_our_types_never_reuse_comfyui_model_types():
    comfy_types = {"MODEL", "CLIP", "VAE", "LATENT", "CONDITIONING"}
    # the bridge (issue 14) is the one place our nodes meet ComfyUI's models: MODEL and CLIP in and out
    bridge = {"ApplyLoRAToModel", "ApplyLoRAStackToModel"}
    ours = [spec for spec in catalogue().values() if not spec.comfy_core]
    for spec in ours:
        used = {i.type for i in spec.inputs} | {o.type for o in spec.outputs}
        if spec.id in bridge:
            assert comfy_types & used == {"MODEL", "CLIP"}, spec.id
            assert [o.type for o in spec.outputs] == ["MODEL", "CLIP"]
        else:
            assert not comfy_types & used, spec.id
    # ComfyUI's own nodes, run headless, are the only ones that speak ComfyUI's types
    core = [spec for spec in catalogue().values() if spec.comfy_core]
    assert {"CheckpointLoaderSimple", "LoraLoader", "KSampler"} <= {spec.id for spec in core}


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
    ours = [spec for spec in cat.values() if not spec.comfy_core]
    assert all(spec.comfy_id.startswith("lora-nodes.") and spec.comfy_id not in core for spec in ours)
    assert cat["lora-nodes.Sample"] is cat["Sample"]
    # the ComfyUI core nodes we run headless keep ComfyUI's ids, and only those
    headless_core = [spec for spec in cat.values() if spec.comfy_core]
    assert headless_core and all(spec.comfy_id == spec.id and spec.id in core for spec in headless_core)
    assert "lora-nodes.KSampler" not in cat
    workflow = parse_workflow({"1": {"class_type": "lora-nodes.LoadBase", "inputs": {}},
                               "2": {"class_type": "lora-nodes.Sample", "inputs": {"model": ["1", 0], "prompt": "x"}},
                               "3": {"class_type": "SaveImages", "inputs": {"images": ["2", 0]}}}, tmp_path)
    assert check(workflow, cat)[0] == []
