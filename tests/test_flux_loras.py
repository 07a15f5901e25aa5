"""Flux LoRAs: every layout applied by its definition, read the way diffusers reads it, stacked, merged,
resized, extracted and saved in kohya and diffusers layouts; a LoRA for another family is refused.

The expected weights come from tests/flux_lora_files.py, which computes each file's changes from its
own tensors by the layout's rules (fused rows, swapped adaLN halves), independently of lora_nodes.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import EXAMPLE_LORA, write_workflow
from flux_lora_files import LAYOUTS, FluxLoRAFile, flux_lora, kohya
from safetensors.torch import load_file, save_file

from lora_nodes.cli import main
from lora_nodes.engine.context import NodeContext
from lora_nodes.engine.events import Collector
from lora_nodes.errors import LoRAError
from lora_nodes.lora.files import read_lora
from lora_nodes.lora.placement import place
from lora_nodes.lora.recipe import AppliedLoRA, ModelRecipe, patcher_of
from lora_nodes.lora.synthetic import synthetic_lora
from lora_nodes.nodes.lora import apply_lora, apply_lora_stack, lora_stack
from lora_nodes.nodes.merge import extract_lora, merge_loras, resize_lora
from lora_nodes.nodes.save import save_lora

TOLERANCE = 1e-5  # relative error, float32
STRENGTH = 0.7


@pytest.fixture(scope="module")
def originals(flux):
    """Every target's weight and bias before any LoRA, float32 copies."""
    out = {}
    for target, module in flux.lora_targets.items():
        out[target] = patcher_of(flux).original(target).detach().float().clone()
        if module.bias is not None:
            out[f"{target}.bias"] = module.bias.detach().float().clone()
    return out


def ctx(tmp_path=None, events=None):
    out = None if tmp_path is None else tmp_path / "out"
    return NodeContext("n", "T", out, tmp_path, events or Collector())


def applied_weights(base, *applied: AppliedLoRA) -> dict[str, torch.Tensor]:
    """Every target's weight (and bias) with ``applied`` patched in, float32 copies."""
    ModelRecipe(base, applied).materialize()
    out = {}
    for target, module in base.lora_targets.items():
        out[target] = module.weight.detach().float().clone()
        if module.bias is not None:
            out[f"{target}.bias"] = module.bias.detach().float().clone()
    ModelRecipe(base).materialize()
    return out


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def assert_weights(got: dict, expected: dict, originals: dict, tolerance: float = TOLERANCE) -> None:
    """Changed weights as expected; every other weight exactly the original (untouched rows included)."""
    for key, value in got.items():
        want = expected.get(key, originals[key])
        if key in expected:
            assert rel_err(value, want) < tolerance, (key, rel_err(value, want))
        else:
            assert torch.equal(value, want), f"{key} changed but the file does not change it"


def expected_weights(originals, strength, *files: tuple[FluxLoRAFile, float]) -> dict:
    """The weights after each file in turn at its strength (by the files' own definitions)."""
    weights = dict(originals)
    for file, scale in files:
        weights = {**weights, **file.expected(weights, scale * strength)}
    return {k: v for k, v in weights.items() if not torch.equal(v, originals[k])}


def write(tmp_path, layout, base, seed=0, **options) -> tuple[FluxLoRAFile, object]:
    file = flux_lora(layout, base, seed, **options)
    path = file.write(tmp_path / f"{layout}.safetensors")
    return file, read_lora(path)


# --------------------------------------------------------------------------- every layout, by definition


@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_layout_applies_by_its_definition(tmp_path, flux, originals, layout):
    file, lora = write(tmp_path, layout, flux, seed=LAYOUTS.index(layout))
    assert lora.family is flux.family
    placement = place(lora, flux)
    assert set(placement.unplaced) == file.unplaced
    assert file.targets == set(placement.placed)  # each file module lands on its weights, and only there
    got = applied_weights(flux, AppliedLoRA(lora, STRENGTH, STRENGTH))
    assert_weights(got, file.expected(originals, STRENGTH), originals)


def test_a_per_column_dora_on_a_fused_module_is_reported_unplaced(tmp_path, flux):
    _, lora = write(tmp_path, "dora_fused", flux)
    events = Collector()
    apply_lora.run(ctx(events=events), ModelRecipe(flux), lora, 1.0, 1.0)
    (warning,) = events.of("warning")
    reason = warning["unplaced"][kohya("double_blocks.1.txt_attn.qkv")]
    assert "per input column" in reason and "separate weights" in reason
    assert "1 of 2 modules" in warning["message"]


def test_a_split_lora_on_fused_qkv_is_the_fused_delta(tmp_path, flux):
    """diffusers' q/k/v (and a single block's q/k/v without its MLP) saved in kohya layout: one fused
    module whose delta is the split deltas stacked, the MLP rows of linear1 untouched (zero)."""
    g = torch.Generator().manual_seed(7)
    tensors, deltas = {}, {}
    for prefix, parts in (("transformer_blocks.0.attn.", ("to_q", "to_k", "to_v")),
                          ("single_transformer_blocks.1.attn.", ("to_q", "to_k", "to_v"))):
        for rank, part in zip((2, 4, 3), parts):
            name = f"transformer.{prefix}{part}"
            rows, inputs = flux.lora_targets[name].weight.shape
            a, b = torch.randn(rank, inputs, generator=g), torch.randn(rows, rank, generator=g)
            tensors[f"{name}.lora_A.weight"], tensors[f"{name}.lora_B.weight"] = a, b
            deltas[name] = b @ a  # no metadata: scale 1
    save_file(tensors, str(tmp_path / "split.safetensors"))
    save_lora.run(ctx(tmp_path), read_lora(tmp_path / "split.safetensors"), "fused", "kohya", ModelRecipe(flux), 0, False)
    saved = load_file(str(tmp_path / "out" / "fused.safetensors"))
    assert sorted({k.split(".")[0] for k in saved}) == [kohya("double_blocks.0.img_attn.qkv"),
                                                        kohya("single_blocks.1.linear1")]
    for name, prefix in ((kohya("double_blocks.0.img_attn.qkv"), "transformer_blocks.0"),
                         (kohya("single_blocks.1.linear1"), "single_transformer_blocks.1")):
        down, up = saved[f"{name}.lora_down.weight"], saved[f"{name}.lora_up.weight"]
        fused = float(saved[f"{name}.alpha"]) / down.shape[0] * up @ down
        split = torch.cat([deltas[f"transformer.{prefix}.attn.{p}"] for p in ("to_q", "to_k", "to_v")])
        assert rel_err(fused[: split.shape[0]], split) < 1e-6
        mlp_rows = fused[split.shape[0]:]  # a single block's linear1 also holds proj_mlp's rows
        assert mlp_rows.shape[0] == (0 if prefix.startswith("transformer") else
                                     flux.lora_targets[f"transformer.{prefix}.proj_mlp"].weight.shape[0])
        assert not mlp_rows.any()


# --------------------------------------------------------------------------- diffusers as the oracle


def diffusers_fused(base, path, strength):
    """A FluxPipeline over copies of the base's components with the file loaded and fused by diffusers."""
    from diffusers import FluxPipeline

    ModelRecipe(base).materialize()
    pipe = FluxPipeline(**{k: copy.deepcopy(v) for k, v in base.components.items()})
    pipe.load_lora_weights(str(path))
    pipe.fuse_lora(lora_scale=strength)
    pipe.unload_lora_weights()
    return pipe


def assert_same_transformer(base, lora, pipe, strength):
    """Our transformer weights with ``lora`` equal diffusers' fused ones (diffusers' kohya path
    does not reach the text encoders, so those are compared by definition elsewhere)."""
    before = {k: v.clone() for k, v in base.components["transformer"].state_dict().items()}
    ModelRecipe(base, (AppliedLoRA(lora, strength, strength),)).materialize()
    theirs = pipe.transformer.state_dict()
    ours = base.components["transformer"].state_dict()
    for key, value in ours.items():
        assert rel_err(value.float(), theirs[key].float()) < TOLERANCE, key
    assert any(not torch.equal(value, before[key]) for key, value in ours.items())


@pytest.mark.parametrize("layout", ["kohya_double", "peft", "peft_no_metadata", "peft_double", "xlabs",
                                    "xlabs_prefixed"])
def test_diffusers_load_lora_weights_gives_the_same_weights(tmp_path, flux, layout):
    """kohya (double blocks: diffusers' converter hard-codes FLUX.1's widths for single blocks), PEFT with
    and without alphas in lora_adapter_metadata, and XLabs files, through load_lora_weights + fuse_lora."""
    _, lora = write(tmp_path, layout, flux, seed=11)
    pipe = diffusers_fused(flux, tmp_path / f"{layout}.safetensors", STRENGTH)
    assert_same_transformer(flux, lora, pipe, STRENGTH)


# --------------------------------------------------------------------------- saving


SAVED = [layout for layout in LAYOUTS if layout != "dora_fused"]  # an unplaced module has no diffusers name


@pytest.mark.parametrize("fmt", ["kohya", "diffusers"])
@pytest.mark.parametrize("layout", SAVED)
def test_saved_in_kohya_and_diffusers_layouts_the_weights_are_the_same(tmp_path, flux, originals, layout, fmt):
    """LoadLoRA -> SaveLoRA (kohya: BFL's fused names; diffusers: split names) -> LoadLoRA changes the
    weights as the original file does (DoRA becomes plain LoRA, exact at strength 1)."""
    # a diffusers file holds no bias changes: LyCORIS full diffs are saved without them there
    file, lora = write(tmp_path, layout, flux, seed=3, biases=fmt == "kohya")
    strength = 1.0 if layout.startswith("lycoris") else STRENGTH
    save_lora.run(ctx(tmp_path), lora, "saved", fmt, ModelRecipe(flux), 0, False)
    saved = read_lora(tmp_path / "out" / "saved.safetensors")
    modules = [key for key in saved.modules if key.startswith(("transformer", "lora_unet"))]
    if fmt == "kohya":
        assert all(m.startswith("lora_unet_") for m in modules)
        assert not any("to_q" in m or "attn_to_" in m for m in modules)
    else:
        assert all(m.startswith("transformer.") for m in modules) and not any("qkv" in m for m in modules)
    assert not place(saved, flux).unplaced
    got = applied_weights(flux, AppliedLoRA(saved, strength, strength))
    assert_weights(got, file.expected(originals, strength), originals)


# a module's factors -> the key suffix kohya/LyCORIS files keep them under
KOHYA_SUFFIXES = {
    "lora": {"down": ".lora_down.weight", "up": ".lora_up.weight"},
    "lokr": {"w1": ".lokr_w1", "w2a": ".lokr_w2_a", "w2b": ".lokr_w2_b"},
    "loha": {"w1a": ".hada_w1_a", "w1b": ".hada_w1_b", "w2a": ".hada_w2_a", "w2b": ".hada_w2_b"},
    "full": {"diff": ".diff"},
}
COMMON_SUFFIXES = {"bias": ".diff_b", "dora_scale": ".dora_scale"}


@pytest.mark.parametrize("layout", ["kohya", "kohya_split_qkv", "bfl", "xlabs", "lycoris_fused"])
def test_a_fused_module_is_saved_in_kohya_layout_unchanged(tmp_path, flux, layout):
    """A file module that is one whole kohya module (kohya's own, BFL's, XLabs' double-block qkv, a
    fused LoKr or DoRA, the adaLN in BFL's order) is written as it was read, under kohya's name."""
    _, lora = write(tmp_path, layout, flux, seed=5)
    save_lora.run(ctx(tmp_path), lora, "again", "kohya", ModelRecipe(flux), 0, False)
    saved = load_file(str(tmp_path / "out" / "again.safetensors"))
    index, fused = flux.lora_name_index, flux.fused_targets
    whole = {key: index[key] for key in lora.modules if len(fused.get(index.get(key), ())) > 1}
    whole = {key: entry for key, entry in whole.items() if not entry.endswith(".qkv") or "double" in entry}
    assert whole
    for key, entry in whole.items():
        name = kohya(entry.removeprefix("transformer."))
        module = lora.modules[key]
        for attribute, suffix in {**KOHYA_SUFFIXES[module.kind], **COMMON_SUFFIXES}.items():
            tensor = getattr(module, attribute)
            if tensor is not None:
                assert torch.equal(saved[name + suffix], tensor), (key, attribute)


@pytest.mark.parametrize("layout", ["kohya_double", "peft_double"])
@pytest.mark.parametrize("fmt", ["kohya", "diffusers"])
def test_saved_files_load_in_diffusers_to_the_same_weights(tmp_path, flux, layout, fmt):
    _, lora = write(tmp_path, layout, flux, seed=13)
    save_lora.run(ctx(tmp_path), lora, "saved", fmt, ModelRecipe(flux), 0, False)
    pipe = diffusers_fused(flux, tmp_path / "out" / "saved.safetensors", 1.0)
    assert_same_transformer(flux, lora, pipe, 1.0)


def test_synthetic_kohya_lora_names_fused_modules_once(flux, tmp_path):
    """The example LoRAs workflows ship: kohya's fused q/k/v and linear1, one module each, all placed."""
    tensors = synthetic_lora(flux, rank=2, seed=1)
    qkv = kohya("double_blocks.0.img_attn.qkv")
    hidden = flux.lora_targets["transformer.transformer_blocks.0.attn.to_q"].weight.shape[0]
    assert tensors[f"{qkv}.lora_up.weight"].shape == (3 * hidden, 2)
    save_file(tensors, str(tmp_path / "synthetic.safetensors"))
    lora = read_lora(tmp_path / "synthetic.safetensors")
    assert lora.family is flux.family and not place(lora, flux).unplaced


# --------------------------------------------------------------------------- stacks, merges, resize, extract


@pytest.fixture
def three(tmp_path, flux):
    """Flux LoRAs of three layouts: kohya (fused), PEFT (split, alphas in metadata), XLabs."""
    return [write(tmp_path, layout, flux, seed=20 + i) for i, layout in enumerate(("kohya", "peft", "xlabs"))]


def test_a_stack_of_layouts_adds_up(flux, originals, three):
    (k_file, k), (p_file, p), (x_file, x) = three
    (stack,) = lora_stack.run(ctx(), k, 0.5, 0.5, True, p, -0.8, -0.8, True, x, 1.2, 1.2, True)
    (model,) = apply_lora_stack.run(ctx(), ModelRecipe(flux), stack)
    got = applied_weights(flux, *model.loras)
    expected = expected_weights(originals, 1.0, (k_file, 0.5), (p_file, -0.8), (x_file, 1.2))
    assert_weights(got, expected, originals)


@pytest.mark.parametrize("method", ["concat", "svd", "ties", "dare_linear", "dare_ties"])
def test_merge_loras_of_three_layouts(tmp_path, flux, originals, three, method):
    stack = (AppliedLoRA(three[0][1], 0.7, 0.3), AppliedLoRA(three[1][1], -0.5, 1.2), AppliedLoRA(three[2][1], 0.4, 1.0))
    exact = applied_weights(flux, *stack)
    full_rank = 64  # above the sum of the parts' ranks: svd keeps everything
    lora, _ = merge_loras.run(ctx(), stack, method, full_rank if method == "svd" else 0, 0.5, 7, ModelRecipe(flux))
    merged = applied_weights(flux, AppliedLoRA(lora, 1.0, 1.0))
    if method in ("concat", "svd"):
        assert_weights(merged, {k: v for k, v in exact.items() if not torch.equal(v, originals[k])}, originals,
                       1e-5 if method == "concat" else 1e-4)
    else:  # pruned merges: deterministic for a seed, and they change what the LoRAs change
        again, _ = merge_loras.run(ctx(), stack, method, 0, 0.5, 7, ModelRecipe(flux))
        assert all(torch.equal(m.diff, again.modules[k].diff) for k, m in lora.modules.items())
        assert {k for k, v in merged.items() if not torch.equal(v, originals[k])} == \
               {k for k, v in exact.items() if not torch.equal(v, originals[k])}
    # the merge saves in kohya layout (fused again) and loads back to the same weights
    save_lora.run(ctx(tmp_path), lora, "merged", "kohya", ModelRecipe(flux), 0, False)
    saved = read_lora(tmp_path / "out" / "merged.safetensors")
    assert any(k.endswith("img_attn_qkv") for k in saved.modules)
    again = applied_weights(flux, AppliedLoRA(saved, 1.0, 1.0))
    assert_weights(again, {k: v for k, v in merged.items() if not torch.equal(v, originals[k])}, originals, 1e-4)


def test_merge_without_model_of_two_kohya_flux_loras(tmp_path, flux, originals):
    (a_file, a), (b_file, b) = write(tmp_path, "kohya", flux, 1), write(tmp_path, "kohya_split_qkv", flux, 2)
    lora, _ = merge_loras.run(ctx(), (AppliedLoRA(a, 0.6, 0.6), AppliedLoRA(b, 1.5, 1.5)), "concat", 0, 0.5, 0, None)
    got = applied_weights(flux, AppliedLoRA(lora, 1.0, 1.0))
    assert_weights(got, expected_weights(originals, 1.0, (a_file, 0.6), (b_file, 1.5)), originals)


def test_resize_a_fused_flux_lora(tmp_path, flux, originals):
    file, lora = write(tmp_path, "kohya", flux, 4)
    same, _ = resize_lora.run(ctx(), lora, 8, "fixed", 0.9)
    assert_weights(applied_weights(flux, AppliedLoRA(same, STRENGTH, STRENGTH)), file.expected(originals, STRENGTH),
                   originals, 1e-4)
    smaller, report = resize_lora.run(ctx(), lora, 1, "fixed", 0.9)
    assert {m.rank for m in smaller.modules.values()} == {1}
    assert f"{kohya('double_blocks.0.img_attn.qkv')}: rank 4 -> 1" in report


def test_extract_a_flux_lora_and_save_it_in_kohya_layout(tmp_path, flux, originals):
    file, lora = write(tmp_path, "kohya", flux, 6)
    with_lora = ModelRecipe(flux, (AppliedLoRA(lora, 1.0, 1.0),))
    extracted, report = extract_lora.run(ctx(), ModelRecipe(flux), with_lora, 8, 0, 1e-6)
    assert "energy kept min 1.0000" in report
    expected = file.expected(originals, 1.0)
    assert_weights(applied_weights(flux, AppliedLoRA(extracted, 1.0, 1.0)), expected, originals, 1e-4)
    save_lora.run(ctx(tmp_path), extracted, "extracted", "kohya", ModelRecipe(flux), 0, False)
    saved = read_lora(tmp_path / "out" / "extracted.safetensors")
    assert kohya("single_blocks.0.linear1") in saved.modules
    assert_weights(applied_weights(flux, AppliedLoRA(saved, 1.0, 1.0)), expected, originals, 1e-4)


# --------------------------------------------------------------------------- families, inspect


def test_flux_lora_on_an_sdxl_base_and_sd_lora_on_flux_are_refused(tmp_path, flux, tiny_sdxl, capsys):
    _, lora = write(tmp_path, "kohya", flux)
    with pytest.raises(LoRAError, match="this LoRA is for Flux, the base is SDXL"):
        apply_lora.run(ctx(), ModelRecipe(tiny_sdxl), lora, 1.0, 1.0)
    with pytest.raises(LoRAError, match="this LoRA is for SD1.5, the base is Flux"):
        apply_lora.run(ctx(), ModelRecipe(flux), read_lora(EXAMPLE_LORA), 1.0, 1.0)
    for lora_path, base, message in (
            (tmp_path / "kohya.safetensors", "builtin:tiny-sdxl", "this LoRA is for Flux, the base is SDXL"),
            (tmp_path / "kohya.safetensors", "builtin:tiny", "this LoRA is for Flux, the base is SD1.5"),
            (EXAMPLE_LORA, "builtin:tiny-flux", "this LoRA is for SD1.5, the base is Flux")):
        workflow = write_workflow(tmp_path, f"""
nodes:
  base:   {{type: LoadBase, inputs: {{source: "{base}"}}}}
  style:  {{type: LoadLoRA, inputs: {{path: "{lora_path}"}}}}
  styled: {{type: ApplyLoRA, inputs: {{model: [base, model], lora: [style, lora]}}}}
  save:   {{type: SaveModel, inputs: {{model: [styled, model], path: out}}}}
""")
        assert main(["validate", str(workflow), "--json"]) == 2
        out = capsys.readouterr().out
        (problem,) = json.loads(out[out.index("["):])
        assert problem["code"] == "family_mismatch" and message in problem["message"]


def test_inspect_shows_family_layout_and_blocks(tmp_path, flux, capsys):
    write(tmp_path, "xlabs", flux)
    write(tmp_path, "kohya", flux)
    assert main(["inspect", str(tmp_path / "xlabs.safetensors"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["architecture"] == "flux" and info["layout"] == "xlabs"
    assert info["blocks"] == {"double blocks": [0, 1], "single blocks": [0, 1]}
    assert main(["inspect", str(tmp_path / "kohya.safetensors"), "--base", "builtin:tiny-flux"]) == 0
    out = capsys.readouterr().out
    assert "made for: Flux" in out and "layout: kohya" in out
    assert "blocks: input embedders; double blocks 0-1; single blocks 0-1; final layer; CLIP layers 0-1; " \
           "T5 blocks 0-1" in out
    assert "41 of 41 modules placed" in out


@pytest.mark.parametrize(("layout", "label"), [("kohya", "kohya"), ("bfl", "bfl"), ("bfl_lora_ab", "bfl"),
                                               ("peft", "diffusers"), ("xlabs_prefixed", "xlabs"),
                                               ("onetrainer", "kohya diffusers")])
def test_each_layout_is_named(tmp_path, flux, layout, label):
    _, lora = write(tmp_path, layout, flux)
    assert label in lora.layout.split("+")
