"""`lora-nodes inspect`: what a base offers LoRAs, what a LoRA file holds, and how it fits a base."""

import json

from conftest import EXAMPLE_LORA

from lora_nodes.cli import main


def run_json(capsys, *args):
    assert main(["inspect", *args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_base_lists_every_targetable_module(capsys, tiny):
    info = run_json(capsys, "builtin:tiny")
    assert info["architecture"] == "sd1"
    modules = info["modules"]
    q = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    assert modules[q]["kind"] == "linear" and modules[q]["shape"] == list(tiny.lora_targets[q].weight.shape)
    assert modules["unet.down_blocks.0.resnets.0.conv1"]["kind"] == "conv"
    assert len(modules["unet.down_blocks.0.resnets.0.conv1"]["shape"]) == 4
    assert modules["text_encoder.text_model.encoder.layers.0.self_attn.q_proj"]["kind"] == "linear"
    assert len(modules) == len(tiny.lora_targets)


def test_lora_file_with_base(capsys, write_lora):
    info = run_json(capsys, str(EXAMPLE_LORA), "--base", "builtin:tiny")
    assert info["kind"] == "lora" and info["format"] == "kohya"
    assert info["ranks"] == [4] and info["alphas"] == [2.0]
    assert info["components"] == ["text_encoder", "unet"]
    assert info["metadata"]["ss_network_dim"] == "4"
    assert info["placement"]["placed"] == info["placement"]["total"] == info["modules"]
    assert main(["inspect", str(EXAMPLE_LORA), "--base", "builtin:tiny"]) == 0
    assert "modules placed" in capsys.readouterr().out


def test_missing_source_is_a_clear_error(capsys):
    assert main(["inspect", "nowhere/model"]) == 2
    assert "file not found: nowhere/model" in capsys.readouterr().err


def test_lora_metadata_for_people(capsys, write_lora, tiny_sdxl):
    tags = '{"10_purple star": {"purple star": 16, "white background": 12}, "5_extra": {"white background": 5, "shape": 1}}'
    path = write_lora("tagged", metadata={"ss_tag_frequency": tags, "ss_base_model_version": "sd_v1",
                                          "ss_resolution": "(512, 512)", "ss_network_dim": "4"})
    info = run_json(capsys, str(path))
    assert info["trigger_words"] == ["white background", "purple star", "shape"]
    assert info["architecture"] == "sd1"
    assert info["training"]["resolution"] == "(512, 512)" and info["training"]["rank"] == "4"
    assert main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert "trigger words: white background, purple star, shape" in out and "made for: SD1.5" in out
    info = run_json(capsys, str(path), "--base", "builtin:tiny-sdxl")
    assert "this LoRA is for SD1.5, the base is SDXL" in info["placement"]["error"]


def test_load_lora_outputs_trigger_words(write_lora):
    from lora_nodes.engine.context import NodeContext
    from lora_nodes.engine.events import Collector
    from lora_nodes.nodes.lora import load_lora

    path = write_lora("tw", metadata={"ss_tag_frequency": '{"1_x": {"red circle": 2, "blue": 3}}'})
    _, words = load_lora.run(NodeContext("l", "LoadLoRA", None, None, Collector()), str(path))
    assert words == "blue, red circle"


def test_a_corrupt_file_is_a_clear_error(tmp_path, capsys):
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"\x00" * 64)
    assert main(["inspect", str(broken)]) == 2
    assert "is not a readable .safetensors file" in capsys.readouterr().err
