"""Our merged weights equal diffusers' load_lora_weights + fuse_lora on the same files."""

import copy

import pytest
import torch

from lora_nodes.lora.files import read_lora
from lora_nodes.lora.recipe import AppliedLoRA, ModelRecipe, patcher_of
from lora_nodes.models.text_names import file_state_dict


def diffusers_pipeline(base):
    """A diffusers pipeline over deep copies of the base's (unpatched) components."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    ModelRecipe(base).materialize()
    parts = {k: copy.deepcopy(v) for k, v in base.components.items()}
    if base.family.id == "sdxl":
        return StableDiffusionXLPipeline(**parts)
    return StableDiffusionPipeline(**parts, safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def assert_same_weights(ours: torch.nn.Module, theirs: torch.nn.Module) -> None:
    a, b = file_state_dict(ours), file_state_dict(theirs)
    for key, value in a.items():
        other = b[key].float()
        err = ((value.float() - other).norm() / other.norm().clamp_min(1e-12)).item()
        assert err < 1e-5, (key, err)


@pytest.mark.parametrize("fmt", ["kohya", "peft"])
@pytest.mark.parametrize("base_name", ["tiny", "tiny_sdxl"])
def test_merge_equals_diffusers_fuse_lora(request, write_lora, fmt, base_name):
    base = request.getfixturevalue(base_name)
    path = write_lora(f"{base_name}_{fmt}", fmt=fmt, base=base, rank=4, alpha=2.0 if fmt == "kohya" else None, seed=21)
    strength = 0.7
    pipe = diffusers_pipeline(base)
    pipe.load_lora_weights(str(path))
    pipe.fuse_lora(lora_scale=strength)
    pipe.unload_lora_weights()  # keeps the fused weights, drops the PEFT wrappers
    lora = read_lora(path)
    ModelRecipe(base, (AppliedLoRA(lora, strength, strength),)).materialize()
    changed = {target.split(".")[0] for target in lora_targets_changed(base)}
    assert changed == {"unet", "text_encoder", "text_encoder_2"} & set(base.components)
    for name in ("unet", "text_encoder", "text_encoder_2"):
        if name in base.components:
            assert_same_weights(base.components[name], getattr(pipe, name))


def lora_targets_changed(base):
    return [t for t, m in base.lora_targets.items() if not torch.equal(m.weight, patcher_of(base).original(t))]


def test_diffusers_adapter_metadata_alpha_is_honoured(tmp_path, tiny):
    """A PEFT file saved by diffusers with lora_alpha != r loads to diffusers' own merged weights."""
    import json

    from safetensors.torch import save_file

    from lora_nodes.lora.synthetic import synthetic_lora

    tensors = synthetic_lora(tiny, fmt="peft", rank=4, seed=5)
    to_q = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    meta = {"unet.r": 4, "unet.lora_alpha": 8, "unet.alpha_pattern": {to_q: 2},
            "unet.target_modules": ["to_q", "to_k", "to_v", "to_out.0"],
            "text_encoder.r": 4, "text_encoder.lora_alpha": 1,
            "text_encoder.target_modules": ["q_proj", "k_proj", "v_proj", "out_proj"]}
    path = tmp_path / "meta.safetensors"
    save_file(tensors, str(path), metadata={"format": "pt", "lora_adapter_metadata": json.dumps(meta)})
    lora = read_lora(path)
    assert lora.modules[f"unet.{to_q}"].scale == 0.5
    assert lora.modules["unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k"].scale == 2.0
    assert lora.modules["text_encoder.text_model.encoder.layers.0.self_attn.q_proj"].scale == 0.25
    pipe = diffusers_pipeline(tiny)
    pipe.load_lora_weights(str(path))
    pipe.fuse_lora(lora_scale=1.0)
    pipe.unload_lora_weights()
    ModelRecipe(tiny, (AppliedLoRA(lora, 1.0, 1.0),)).materialize()
    assert_same_weights(tiny.components["unet"], pipe.unet)
    assert_same_weights(tiny.components["text_encoder"], pipe.text_encoder)
