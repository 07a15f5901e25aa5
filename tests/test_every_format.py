"""Every format, on the SD1 and SDXL tiny bases: applied by its definition, and saved to both
kohya and diffusers files that apply the same again (LoadLoRA -> SaveLoRA -> LoadLoRA)."""

import pytest
import torch
from safetensors.torch import save_file

from lora_nodes.engine.context import NodeContext
from lora_nodes.engine.events import Collector
from lora_nodes.lora.files import read_lora
from lora_nodes.lora.recipe import AppliedLoRA, ModelRecipe, patcher_of
from lora_nodes.nodes.save import save_lora

KINDS = ["lora", "locon_mid", "loha", "loha_tucker", "lokr", "lokr_whole", "dora", "full"]


def targets(base):
    linear = next(t for t in base.lora_targets if t.endswith("attn1.to_q"))
    return linear, "unet.down_blocks.0.resnets.0.conv1"


def make(kind, base, g):
    """(tensors in kohya naming, {target: function(original weight, strength) -> expected weight})."""
    linear, conv = targets(base)
    names = base.kohya_names
    out, inp = base.lora_targets[linear].weight.shape
    cout, cin = base.lora_targets[conv].weight.shape[:2]
    r = 4

    def rnd(*shape):
        return torch.randn(*shape, generator=g)

    def plain(w_delta):
        return lambda w, s: w + s * w_delta

    t, expect = {}, {}
    if kind in ("lora", "dora"):
        down, up = rnd(r, inp), rnd(out, r) * 0.2
        t = {".lora_down.weight": down, ".lora_up.weight": up, ".alpha": torch.tensor(2.0)}
        if kind == "lora":
            expect[linear] = plain(0.5 * up @ down)
        else:
            m = torch.rand(1, inp, generator=g) + 0.5
            t[".dora_scale"] = m

            def dora(w, s, up=up, down=down, m=m):
                updated = w + 0.5 * up @ down
                decomposed = updated * m / (updated.norm(dim=0, keepdim=True) + torch.finfo(torch.float32).eps)
                return w + s * (decomposed - w)

            expect[linear] = dora
        return {f"{names[linear]}{k}": v for k, v in t.items()}, expect
    if kind == "locon_mid":
        down, mid, up = rnd(r, cin, 1, 1), rnd(r, r, 3, 3), rnd(cout, r, 1, 1)
        t = {".lora_down.weight": down, ".lora_mid.weight": mid, ".lora_up.weight": up, ".alpha": torch.tensor(1.0)}
        expect[conv] = plain(0.25 * torch.einsum("oa,abhw,bi->oihw", up[:, :, 0, 0], mid, down[:, :, 0, 0]))
        return {f"{names[conv]}{k}": v for k, v in t.items()}, expect
    if kind == "loha":
        a1, b1, a2, b2 = rnd(out, r), rnd(r, inp), rnd(out, r), rnd(r, inp)
        t = {".hada_w1_a": a1, ".hada_w1_b": b1, ".hada_w2_a": a2, ".hada_w2_b": b2, ".alpha": torch.tensor(4.0)}
        expect[linear] = plain((a1 @ b1) * (a2 @ b2))
        return {f"{names[linear]}{k}": v for k, v in t.items()}, expect
    if kind == "loha_tucker":
        a1, b1, a2, b2, t1, t2 = rnd(r, cout), rnd(r, cin), rnd(r, cout), rnd(r, cin), rnd(r, r, 3, 3), rnd(r, r, 3, 3)
        t = {".hada_w1_a": a1, ".hada_w1_b": b1, ".hada_w2_a": a2, ".hada_w2_b": b2, ".hada_t1": t1, ".hada_t2": t2,
             ".alpha": torch.tensor(2.0)}

        def tucker(core, a, b):
            return torch.einsum("pqhw,po,qi->oihw", core, a, b)

        expect[conv] = plain(0.5 * tucker(t1, a1, b1) * tucker(t2, a2, b2))
        return {f"{names[conv]}{k}": v for k, v in t.items()}, expect
    if kind == "lokr":
        w1, w2a, w2b = rnd(4, 4), rnd(out // 4, 2), rnd(2, inp // 4)
        t = {".lokr_w1": w1, ".lokr_w2_a": w2a, ".lokr_w2_b": w2b, ".alpha": torch.tensor(1.0)}
        expect[linear] = plain(0.5 * torch.kron(w1, w2a @ w2b))
        return {f"{names[linear]}{k}": v for k, v in t.items()}, expect
    if kind == "lokr_whole":
        w1, w2 = rnd(4, 2), rnd(cout // 4, cin // 2, 3, 3)
        t = {".lokr_w1": w1, ".lokr_w2": w2, ".alpha": torch.tensor(9.0)}
        expect[conv] = plain(torch.kron(w1[:, :, None, None], w2))
        return {f"{names[conv]}{k}": v for k, v in t.items()}, expect
    diff = rnd(out, inp) * 0.05
    expect[linear] = plain(diff)
    return {f"{names[linear]}.diff": diff}, expect


def weights_after(base, lora, strength):
    recipe = ModelRecipe(base, (AppliedLoRA(lora, strength, strength),))
    plan = recipe.patch_plan()
    return {t: recipe.weight(t, plan) for t in base.lora_targets}


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("base_name", ["tiny", "tiny_sdxl"])
def test_format_applies_by_definition_and_survives_saving(request, tmp_path, kind, base_name):
    base = request.getfixturevalue(base_name)
    tensors, expect = make(kind, base, torch.Generator().manual_seed(KINDS.index(kind)))
    path = tmp_path / f"{kind}.safetensors"
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    lora = read_lora(path)
    originals = {t: patcher_of(base).original(t).float() for t in expect}
    strength = 1.0 if kind == "dora" else 0.6  # a DoRA saved as plain LoRA is exact at strength 1 only
    applied = weights_after(base, lora, strength)
    for target, fn in expect.items():
        assert rel_err(applied[target], fn(originals[target], strength)) < 1e-5, target

    ctx = NodeContext("save", "SaveLoRA", tmp_path / "out", tmp_path, Collector())
    for fmt in ("kohya", "diffusers"):
        save_lora.run(ctx, lora, f"{kind}_{fmt}", fmt, ModelRecipe(base), 0, False)
        again = read_lora(ctx.files[-1])
        resaved = weights_after(base, again, strength)
        for target, fn in expect.items():
            assert rel_err(resaved[target], fn(originals[target], strength)) < 1e-4, (fmt, target)
