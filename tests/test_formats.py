"""Every LoRA spelling and format is read and applied by its definition, on SD1 and SDXL bases."""

import pytest
import torch
from safetensors.torch import load_file, save_file

from lora_nodes.errors import LoRAError
from lora_nodes.lora.files import read_lora
from lora_nodes.lora.placement import check_placement
from lora_nodes.lora.recipe import AppliedLoRA, ModelRecipe

Q = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
OUT = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0"
TE_Q = "text_encoder.text_model.encoder.layers.0.self_attn.q_proj"


def merged(base, lora, strength=1.0):
    ModelRecipe(base, (AppliedLoRA(lora, strength, strength),)).materialize()
    return {t: m.weight.detach().clone() for t, m in base.lora_targets.items()}


def originals(base):
    ModelRecipe(base).materialize()
    return {t: m.weight.detach().clone() for t, m in base.lora_targets.items()}


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("spelling", [
    "{path}.processor.{proj}_lora.{part}.weight",
    "{path}.{proj_full}.lora.{part}.weight",
    "{path}.{proj_full}.lora_linear_layer.{part}.weight",
])
def test_older_diffusers_spellings(tmp_path, tiny, spelling):
    path, proj = Q.rsplit(".", 1)
    out_path = OUT.rsplit(".", 2)[0]
    down, up = torch.randn(2, 32), torch.randn(32, 2)
    tensors = {}
    for module_path, name, full in ((path, proj, proj), (out_path, "to_out", "to_out.0")):
        for part, tensor in (("down", down), ("up", up)):
            tensors[spelling.format(path=module_path, proj=name, proj_full=full, part=part)] = tensor.clone()
    file = tmp_path / "old.safetensors"
    save_file(tensors, str(file))
    lora = read_lora(file)
    assert lora.format == "diffusers-old"
    assert set(check_placement(lora, tiny).placed) == {Q, OUT}
    before = originals(tiny)
    after = merged(tiny, lora, 0.5)
    for target in (Q, OUT):
        assert rel_err(after[target], before[target] + 0.5 * up @ down) < 1e-6


def test_peft_keys_without_component_prefix_are_unet_or_text(tmp_path, tiny):
    down, up = torch.randn(2, 32), torch.randn(32, 2)
    tensors = {f"{Q[5:]}.lora_A.weight": down, f"{Q[5:]}.lora_B.weight": up,
               f"base_model.model.{TE_Q[13:]}.lora_A.weight": down.clone(),
               f"base_model.model.{TE_Q[13:]}.lora_B.weight": up.clone()}
    file = tmp_path / "raw_peft.safetensors"
    save_file(tensors, str(file))
    assert set(check_placement(read_lora(file), tiny).placed) == {Q, TE_Q}


def test_missing_alpha_means_alpha_equals_rank(tmp_path, tiny, write_lora):
    tensors = {k: v for k, v in load_file(str(write_lora(rank=4, alpha=1.0))).items() if not k.endswith(".alpha")}
    save_file(tensors, str(tmp_path / "noalpha.safetensors"))
    assert {m.scale for m in read_lora(tmp_path / "noalpha.safetensors").modules.values()} == {1.0}


def test_full_diff_with_bias(tmp_path, tiny):
    weight = tiny.lora_targets[OUT]
    diff, diff_b = torch.randn_like(weight.weight), torch.randn_like(weight.bias)
    key = "lora_unet_" + OUT[5:].replace(".", "_")
    save_file({f"{key}.diff": diff, f"{key}.diff_b": diff_b}, str(tmp_path / "full.safetensors"))
    lora = read_lora(tmp_path / "full.safetensors")
    ModelRecipe(tiny).materialize()
    w0, b0 = weight.weight.clone(), weight.bias.clone()
    ModelRecipe(tiny, (AppliedLoRA(lora, 0.25, 1.0),)).materialize()
    torch.testing.assert_close(weight.weight, w0 + 0.25 * diff)
    torch.testing.assert_close(weight.bias, b0 + 0.25 * diff_b)
    ModelRecipe(tiny).materialize()
    assert torch.equal(weight.weight, w0) and torch.equal(weight.bias, b0)


def test_sdxl_kohya_sgm_names_and_both_text_encoders_apply(tiny_sdxl, write_lora):
    lora = read_lora(write_lora("xl", base=tiny_sdxl, rank=4, alpha=4.0, seed=31))
    assert any(k.startswith("lora_unet_input_blocks_") for k in lora.modules)
    assert {"lora_te1_", "lora_te2_"} <= {k[:9] for k in lora.modules}
    placement = check_placement(lora, tiny_sdxl)
    assert not placement.unplaced and len(placement.placed) == len(lora.modules)
    before = originals(tiny_sdxl)
    after = merged(tiny_sdxl, lora, 0.5)
    for target, module in placement.placed.items():
        expected = before[target] + 0.5 * (module.up.flatten(1) @ module.down.flatten(1)).reshape(before[target].shape)
        assert rel_err(after[target], expected) < 1e-5, target


def test_a_lora_for_another_family_says_so(tiny, tiny_sdxl, write_lora):
    xl = read_lora(write_lora("xl", base=tiny_sdxl, seed=1))
    with pytest.raises(LoRAError, match="this LoRA is for SDXL, the base is SD1.5"):
        check_placement(xl, tiny)
    sd1 = read_lora(write_lora("sd1", seed=2))
    with pytest.raises(LoRAError, match="this LoRA is for SD1.5, the base is SDXL"):
        check_placement(sd1, tiny_sdxl)


def test_kohya_metadata_names_the_family(tmp_path, tiny, write_lora):
    path = write_lora("meta", metadata={"ss_base_model_version": "sdxl_base_v1-0"})
    with pytest.raises(LoRAError, match="this LoRA is for SDXL"):
        check_placement(read_lora(path), tiny)


CONV = "unet.down_blocks.0.resnets.0.conv1"


def kohya(target):
    return "lora_unet_" + target[5:].replace(".", "_")


def apply_file(tmp_path, base, tensors, strength):
    path = tmp_path / "lyco.safetensors"
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    lora = read_lora(path)
    assert not check_placement(lora, base).unplaced
    before = originals(base)
    return before, merged(base, lora, strength)


def test_loha_linear_and_conv_with_tucker(tmp_path, tiny):
    r, g = 4, torch.Generator().manual_seed(0)
    w = {n: torch.randn(s, generator=g) for n, s in {
        "q1a": (32, r), "q1b": (r, 32), "q2a": (32, r), "q2b": (r, 32),
        "c1a": (r, 32), "c1b": (r, 32), "c2a": (r, 32), "c2b": (r, 32), "t1": (r, r, 3, 3), "t2": (r, r, 3, 3)}.items()}
    tensors = {f"{kohya(Q)}.hada_w1_a": w["q1a"], f"{kohya(Q)}.hada_w1_b": w["q1b"], f"{kohya(Q)}.hada_w2_a": w["q2a"],
               f"{kohya(Q)}.hada_w2_b": w["q2b"], f"{kohya(Q)}.alpha": torch.tensor(2.0),
               f"{kohya(CONV)}.hada_w1_a": w["c1a"], f"{kohya(CONV)}.hada_w1_b": w["c1b"],
               f"{kohya(CONV)}.hada_w2_a": w["c2a"], f"{kohya(CONV)}.hada_w2_b": w["c2b"],
               f"{kohya(CONV)}.hada_t1": w["t1"], f"{kohya(CONV)}.hada_t2": w["t2"], f"{kohya(CONV)}.alpha": torch.tensor(1.0)}
    before, after = apply_file(tmp_path, tiny, tensors, 0.8)
    expected_q = before[Q] + 0.8 * 0.5 * (w["q1a"] @ w["q1b"]) * (w["q2a"] @ w["q2b"])

    def tucker(t, a, b):  # W[o, i, h, w] = sum_{p,q} t[p, q, h, w] a[p, o] b[q, i]
        return torch.einsum("pqhw,po,qi->oihw", t, a, b)

    expected_c = before[CONV] + 0.8 * 0.25 * tucker(w["t1"], w["c1a"], w["c1b"]) * tucker(w["t2"], w["c2a"], w["c2b"])
    assert rel_err(after[Q], expected_q) < 1e-5 and rel_err(after[CONV], expected_c) < 1e-5


def test_lokr_factored_and_whole_sides(tmp_path, tiny):
    g = torch.Generator().manual_seed(1)
    w1, w2a, w2b = torch.randn(4, 4, generator=g), torch.randn(8, 2, generator=g), torch.randn(2, 8, generator=g)
    cw1, cw2 = torch.randn(4, 4, generator=g), torch.randn(8, 8, 3, 3, generator=g)
    tensors = {f"{kohya(Q)}.lokr_w1": w1, f"{kohya(Q)}.lokr_w2_a": w2a, f"{kohya(Q)}.lokr_w2_b": w2b,
               f"{kohya(Q)}.alpha": torch.tensor(1.0),
               f"{kohya(CONV)}.lokr_w1": cw1, f"{kohya(CONV)}.lokr_w2": cw2, f"{kohya(CONV)}.alpha": torch.tensor(7.0)}
    before, after = apply_file(tmp_path, tiny, tensors, 1.0)
    assert rel_err(after[Q], before[Q] + 0.5 * torch.kron(w1, w2a @ w2b)) < 1e-5
    # neither side factored: scale 1 whatever alpha says
    assert rel_err(after[CONV], before[CONV] + torch.kron(cw1[:, :, None, None], cw2)) < 1e-5


def test_locon_with_tucker_mid(tmp_path, tiny):
    g = torch.Generator().manual_seed(2)
    down, mid, up = torch.randn(4, 32, 1, 1, generator=g), torch.randn(4, 4, 3, 3, generator=g), torch.randn(32, 4, 1, 1, generator=g)
    tensors = {f"{kohya(CONV)}.lora_down.weight": down, f"{kohya(CONV)}.lora_mid.weight": mid,
               f"{kohya(CONV)}.lora_up.weight": up, f"{kohya(CONV)}.alpha": torch.tensor(2.0)}
    before, after = apply_file(tmp_path, tiny, tensors, 1.0)
    composite = torch.einsum("oa,abhw,bi->oihw", up[:, :, 0, 0], mid, down[:, :, 0, 0])
    assert rel_err(after[CONV], before[CONV] + 0.5 * composite) < 1e-5


@pytest.mark.parametrize("strength", [1.0, 0.5])
def test_dora_as_comfyui_applies_it(tmp_path, tiny, strength):
    g = torch.Generator().manual_seed(3)
    down, up = torch.randn(4, 32, generator=g), torch.randn(32, 4, generator=g) * 0.1
    magnitude = torch.rand(1, 32, generator=g) + 0.5  # kohya/LyCORIS DoRA: norm over the input axis
    tensors = {f"{kohya(Q)}.lora_down.weight": down, f"{kohya(Q)}.lora_up.weight": up,
               f"{kohya(Q)}.alpha": torch.tensor(4.0), f"{kohya(Q)}.dora_scale": magnitude}
    before, after = apply_file(tmp_path, tiny, tensors, strength)
    w = before[Q].double()
    updated = w + (up @ down).double()
    decomposed = updated * magnitude.double() / (updated.norm(dim=0, keepdim=True) + torch.finfo(torch.float32).eps)
    assert rel_err(after[Q], w + strength * (decomposed - w)) < 1e-5


def test_two_keys_for_one_module_keep_the_first_and_say_so(tmp_path, tiny, write_lora):
    tensors = load_file(str(write_lora(seed=6)))
    te = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
    for suffix in (".lora_down.weight", ".lora_up.weight", ".alpha"):
        tensors[te.replace("lora_te_", "lora_te1_") + suffix] = tensors[te + suffix].clone()
    save_file(tensors, str(tmp_path / "dup.safetensors"))
    placement = check_placement(read_lora(tmp_path / "dup.safetensors"), tiny)
    assert len(placement.unplaced) == 1
    (second, reason), = placement.unplaced.items()
    assert second in (te, te.replace("lora_te_", "lora_te1_")) and "a second module for" in reason
