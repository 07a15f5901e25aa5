"""LoRA files load, and applying them patches exactly the formula, restores exactly, copies nothing."""

import pytest
import torch
from safetensors.torch import save_file

from lora_nodes.errors import LoRAError
from lora_nodes.lora.files import read_lora
from lora_nodes.lora.patcher import _merge_low_rank
from lora_nodes.lora.placement import check_placement
from lora_nodes.lora.recipe import AppliedLoRA, ModelRecipe, patcher_of

Q = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
TE_Q = "text_encoder.text_model.encoder.layers.0.self_attn.q_proj"


def original(tiny, target):
    return patcher_of(tiny).original(target).detach().clone()


def test_kohya_and_peft_files_read_to_the_same_modules(write_lora, tiny):
    kohya = read_lora(write_lora("k", fmt="kohya", rank=4, alpha=2.0, seed=3))
    peft = read_lora(write_lora("p", fmt="peft", rank=4, seed=3))
    assert kohya.format == "kohya" and peft.format == "diffusers"
    assert len(kohya.modules) == len(peft.modules) > 0
    assert all(m.scale == 0.5 for m in kohya.modules.values())  # alpha 2 / rank 4
    assert all(m.scale == 1.0 for m in peft.modules.values())  # no alpha: alpha = rank
    k_module = kohya.modules["lora_unet_" + Q.split(".", 1)[1].replace(".", "_")]
    assert torch.equal(k_module.down, peft.modules[Q].down)


@pytest.mark.parametrize("fmt", ["kohya", "peft"])
def test_merged_weight_equals_the_formula(write_lora, tiny, fmt):
    lora = read_lora(write_lora(fmt=fmt, rank=4, alpha=3.0, seed=5))
    before_q, before_te = original(tiny, Q), original(tiny, TE_Q)
    ModelRecipe(tiny, (AppliedLoRA(lora, 0.7, -0.4),)).materialize()
    alpha = 3.0 if fmt == "kohya" else 4.0
    for target, strength, before in ((Q, 0.7, before_q), (TE_Q, -0.4, before_te)):
        module = check_placement(lora, tiny).placed[target]
        expected = before.double() + strength * (alpha / 4) * (module.up.double() @ module.down.double())
        got = tiny.lora_targets[target].weight.double()
        assert ((got - expected).norm() / expected.norm()).item() < 1e-5


def test_strength_zero_is_the_base_bitwise_and_restore_is_exact(write_lora, tiny):
    lora = read_lora(write_lora(seed=1))
    ModelRecipe(tiny).materialize()
    pristine = {k: v.clone() for k, v in tiny.unet.state_dict().items()}
    ModelRecipe(tiny, (AppliedLoRA(lora, 1.0, 1.0),)).materialize()
    assert not torch.equal(tiny.unet.state_dict()[Q[5:] + ".weight"], pristine[Q[5:] + ".weight"])
    ModelRecipe(tiny, (AppliedLoRA(lora, 0.0, 0.0),)).materialize()
    assert all(torch.equal(v, pristine[k]) for k, v in tiny.unet.state_dict().items())
    for strength in (0.3, -2.0, 1.0):  # many switches: no drift
        ModelRecipe(tiny, (AppliedLoRA(lora, strength, strength),)).materialize()
    ModelRecipe(tiny).materialize()
    assert all(torch.equal(v, pristine[k]) for k, v in tiny.unet.state_dict().items())


def test_only_changed_modules_are_repatched_and_nothing_is_copied(write_lora, tiny):
    lora = read_lora(write_lora(seed=2))
    ModelRecipe(tiny).materialize()
    models = [tiny.components[c] for c in ("unet", "text_encoder")]
    params = [dict(m.named_parameters()) for m in models]
    storage = [{k: v.data_ptr() for k, v in p.items()} for p in params]
    ModelRecipe(tiny, (AppliedLoRA(lora, 1.0, 1.0),)).materialize()
    placed = check_placement(lora, tiny).placed
    n_unet = sum(t.startswith("unet.") for t in placed)
    n_text = len(placed) - n_unet
    # untouched parameters keep their storage; patched ones point at one buffer each
    moved = sum(v.data_ptr() != storage[i][k] for i, p in enumerate(params) for k, v in p.items())
    assert moved == len(placed)
    stats = patcher_of(ModelRecipe(tiny, (AppliedLoRA(lora, 0.5, 1.0),)).materialize()).last
    assert stats.patched == n_unet and stats.unchanged == n_text and stats.restored == 0
    stats = patcher_of(ModelRecipe(tiny, (AppliedLoRA(lora, 0.5, 0.0),)).materialize()).last
    assert stats.patched == 0 and stats.restored == n_text
    ModelRecipe(tiny).materialize()
    # back on the base: the same Parameter objects on the very same (never copied) storage
    assert [dict(m.named_parameters()) for m in models] == params
    assert [{k: v.data_ptr() for k, v in p.items()} for p in params] == storage


def test_stacked_loras_add_up(tmp_path, tiny):
    """Two LoRAs on one module add ``strength * alpha / rank * up @ down`` each, from the files' own tensors."""
    weight = tiny.lora_targets[Q].weight
    before = weight.detach().double().clone()  # the shared base is unpatched when a test starts
    g = torch.Generator().manual_seed(7)
    down_a, up_a = torch.randn(4, weight.shape[1], generator=g), torch.randn(weight.shape[0], 4, generator=g)
    down_b, up_b = torch.randn(2, weight.shape[1], generator=g), torch.randn(weight.shape[0], 2, generator=g)
    kohya = "lora_unet_" + Q[len("unet."):].replace(".", "_")
    save_file({f"{kohya}.lora_down.weight": down_a, f"{kohya}.lora_up.weight": up_a,
               f"{kohya}.alpha": torch.tensor(2.0)}, str(tmp_path / "a.safetensors"))  # kohya: rank 4, alpha 2
    save_file({f"{Q}.lora_A.weight": down_b, f"{Q}.lora_B.weight": up_b},
              str(tmp_path / "b.safetensors"))  # PEFT: rank 2, no alpha
    a, b = read_lora(tmp_path / "a.safetensors"), read_lora(tmp_path / "b.safetensors")
    recipe = ModelRecipe(tiny, (AppliedLoRA(a, 0.5, 1.0), AppliedLoRA(b, 2.0, 1.0)))
    recipe.materialize()
    expected = (before + 0.5 * (2.0 / 4) * (up_a.double() @ down_a.double())
                + 2.0 * (2 / 2) * (up_b.double() @ down_b.double()))  # no alpha: alpha = rank
    torch.testing.assert_close(tiny.lora_targets[Q].weight.double(), expected, rtol=1e-5, atol=1e-5)
    # a GPU merges the two in one product of their factors side by side: the same sum, here on the CPU
    out = torch.empty_like(weight)
    _merge_low_rank(out, before.float(), recipe.patch_plan()[Q])
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)


def test_conv_lora_applies_on_flattened_kernels(tmp_path, tiny):
    target = "unet.down_blocks.0.resnets.0.conv1"
    weight = tiny.lora_targets[target].weight
    down = torch.randn(2, weight.shape[1], 3, 3)
    up = torch.randn(weight.shape[0], 2, 1, 1)
    key = "lora_unet_down_blocks_0_resnets_0_conv1"
    path = tmp_path / "locon.safetensors"
    save_file({f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up, f"{key}.alpha": torch.tensor(1.0)},
              str(path))
    before = original(tiny, target)
    ModelRecipe(tiny, (AppliedLoRA(read_lora(path), 1.0, 1.0),)).materialize()
    expected = before + 0.5 * (up.flatten(1) @ down.flatten(1)).reshape(weight.shape)
    torch.testing.assert_close(tiny.lora_targets[target].weight, expected, rtol=1e-5, atol=1e-6)


def test_lora_matching_nothing_is_an_error_that_says_so(tmp_path, tiny):
    path = tmp_path / "sdxl.safetensors"
    key = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"
    save_file({f"{key}.lora_down.weight": torch.zeros(4, 640), f"{key}.lora_up.weight": torch.zeros(640, 4)},
              str(path))
    with pytest.raises(LoRAError, match="matches nothing"):
        check_placement(read_lora(path), tiny)


def test_partial_lora_lists_what_it_could_not_place(write_lora, tiny, tmp_path):
    from safetensors.torch import load_file

    tensors = load_file(str(write_lora(seed=4)))
    tensors["lora_unet_not_a_module.lora_down.weight"] = torch.zeros(4, 8)
    tensors["lora_unet_not_a_module.lora_up.weight"] = torch.zeros(8, 4)
    path = tmp_path / "partial.safetensors"
    save_file(tensors, str(path))
    placement = check_placement(read_lora(path), tiny)
    assert list(placement.unplaced) == ["lora_unet_not_a_module"]


def test_not_a_lora_and_incomplete_files_are_clear_errors(tmp_path):
    path = tmp_path / "weird.safetensors"
    save_file({"model.weight": torch.zeros(2)}, str(path))
    with pytest.raises(LoRAError, match="no LoRA weights found"):
        read_lora(path)
    save_file({"lora_unet_x.lora_down.weight": torch.zeros(2, 2)}, str(path))
    with pytest.raises(LoRAError, match="no up weight"):
        read_lora(path)
    (tmp_path / "garbage.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(LoRAError, match="not a readable"):
        read_lora(tmp_path / "garbage.safetensors")


def test_pickle_files_never_run_code(tmp_path):
    import pickle

    class Evil:
        def __reduce__(self):
            return (open, (str(tmp_path / "pwned"), "w"))

    path = tmp_path / "evil.ckpt"
    path.write_bytes(pickle.dumps({"lora_unet_x.lora_down.weight": Evil()}))
    with pytest.raises(LoRAError, match="refused"):
        read_lora(path)
    assert not (tmp_path / "pwned").exists()
    tensors = {"lora_unet_x.lora_down.weight": torch.ones(1, 2), "lora_unet_x.lora_up.weight": torch.ones(2, 1)}
    torch.save(tensors, tmp_path / "plain.pt")
    assert read_lora(tmp_path / "plain.pt").modules["lora_unet_x"].rank == 1


def test_a_final_patch_is_in_place_and_equals_the_kept_one(write_lora, tiny):
    """The last use of a one-shot run patches in place: no new memory, the very same weights as the
    patch that keeps the original, and the original is then refused, never silently wrong."""
    from lora_nodes.lora.patcher import OriginalGone
    from lora_nodes.models.loading import load_base

    first, second = read_lora(write_lora("a", seed=11)), read_lora(write_lora("b", seed=12, rank=2))
    stacked = (AppliedLoRA(first, 0.8, 0.5), AppliedLoRA(second, -0.3, 1.0))
    single = (AppliedLoRA(first, 0.6, 0.4),)
    for applied in (stacked, single):
        kept_base, final_base = (load_base("builtin:tiny", dtype="float32", device="cpu") for _ in range(2))
        before = {name: p.detach().clone() for name, p in final_base.unet.named_parameters()}
        storage = {name: p.data_ptr() for name, p in final_base.unet.named_parameters()}
        ModelRecipe(kept_base, applied).materialize()
        ModelRecipe(final_base, applied).materialize(final=True)
        kept, final = dict(kept_base.unet.named_parameters()), dict(final_base.unet.named_parameters())
        assert all(torch.equal(final[name], kept[name]) for name in kept)
        assert {name: p.data_ptr() for name, p in final.items()} == storage  # nothing allocated
        changed = [name for name in before if not torch.equal(before[name], final[name])]
        assert Q[5:] + ".weight" in changed
        expected = before[Q[5:] + ".weight"].double()
        for one in applied:
            module = check_placement(one.lora, final_base).placed[Q]
            expected = expected + one.strength_model * module.scale * (module.up.double() @ module.down.double())
        got = final[Q[5:] + ".weight"].double()
        assert ((got - expected).norm() / expected.norm()).item() < 1e-5
        with pytest.raises(OriginalGone):
            ModelRecipe(final_base).materialize()
        with pytest.raises(OriginalGone):
            patcher_of(final_base).original(Q)
