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
    assert "no base model at 'nowhere/model'" in capsys.readouterr().err
