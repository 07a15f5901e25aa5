"""Flux bases as users have them: a diffusers folder; a BFL transformer file (bare or under ComfyUI's
prefixes, in float32, bfloat16, float16 or float8) with the text encoders and VAE from a config folder
or from files of their own (ComfyUI's CLIP and VAE loaders' files); SaveModel in both layouts.

The BFL layout is written here from its definition (docs/flux-notes.md section 1), not by the code
under test: fused q/k/v (and the single blocks' MLP rows) by concatenation, the final adaLN's halves
swapped, the RMSNorm scales renamed.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import write_workflow
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from lora_nodes import families
from lora_nodes.cli import main
from lora_nodes.engine.context import NodeContext
from lora_nodes.errors import ModelLoadError, NodeError
from lora_nodes.lora.files import read_lora
from lora_nodes.lora.recipe import AppliedLoRA, ModelRecipe
from lora_nodes.lora.synthetic import synthetic_lora
from lora_nodes.models import bfl
from lora_nodes.models.builtin import TINY_FLUX_TRANSFORMER
from lora_nodes.models.ldm import vae_key_map
from lora_nodes.models.loading import EMBEDDED_CONFIG_KEY, base_family, load_base, missing_pipeline_files
from lora_nodes.models.memory import (
    check_sample,
    check_training,
    sample_estimate,
    train_estimate,
    transformer_shape,
    transformer_tokens,
)
from lora_nodes.models.pipeline import pipeline_for
from lora_nodes.models.save import save_diffusers_folder
from lora_nodes.models.text_names import file_state_dict
from lora_nodes.nodes.save import save_model

PARTS = ("transformer", "vae", "text_encoder", "text_encoder_2")


# --------------------------------------------------------------------------- the layout, by its definition


def bfl_from_diffusers(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A BFL transformer state dict built from a diffusers one by flux-notes section 1's tables."""
    hidden = sd["x_embedder.weight"].shape[0]
    out: dict[str, torch.Tensor] = {}

    def same(bfl_name: str, diffusers_name: str) -> None:
        for kind in ("weight", "bias"):
            out[f"{bfl_name}.{kind}"] = sd[f"{diffusers_name}.{kind}"]

    def fused(bfl_name: str, parts: list[str]) -> None:
        for kind in ("weight", "bias"):
            out[f"{bfl_name}.{kind}"] = torch.cat([sd[f"{p}.{kind}"] for p in parts])

    for bfl_name, diffusers_name in {
        "img_in": "x_embedder", "txt_in": "context_embedder", "final_layer.linear": "proj_out",
        "time_in.in_layer": "time_text_embed.timestep_embedder.linear_1",
        "time_in.out_layer": "time_text_embed.timestep_embedder.linear_2",
        "vector_in.in_layer": "time_text_embed.text_embedder.linear_1",
        "vector_in.out_layer": "time_text_embed.text_embedder.linear_2",
    }.items():
        same(bfl_name, diffusers_name)
    if "time_text_embed.guidance_embedder.linear_1.weight" in sd:
        same("guidance_in.in_layer", "time_text_embed.guidance_embedder.linear_1")
        same("guidance_in.out_layer", "time_text_embed.guidance_embedder.linear_2")
    for kind in ("weight", "bias"):  # BFL keeps (shift, scale), diffusers (scale, shift)
        adaln = sd[f"norm_out.linear.{kind}"]
        out[f"final_layer.adaLN_modulation.1.{kind}"] = torch.cat([adaln[hidden:], adaln[:hidden]])
    for n in range(count(sd, "transformer_blocks")):
        d, b = f"transformer_blocks.{n}.", f"double_blocks.{n}."
        same(b + "img_mod.lin", d + "norm1.linear")
        same(b + "txt_mod.lin", d + "norm1_context.linear")
        fused(b + "img_attn.qkv", [d + "attn.to_q", d + "attn.to_k", d + "attn.to_v"])
        fused(b + "txt_attn.qkv", [d + "attn.add_q_proj", d + "attn.add_k_proj", d + "attn.add_v_proj"])
        same(b + "img_attn.proj", d + "attn.to_out.0")
        same(b + "txt_attn.proj", d + "attn.to_add_out")
        same(b + "img_mlp.0", d + "ff.net.0.proj")
        same(b + "img_mlp.2", d + "ff.net.2")
        same(b + "txt_mlp.0", d + "ff_context.net.0.proj")
        same(b + "txt_mlp.2", d + "ff_context.net.2")
        out[b + "img_attn.norm.query_norm.scale"] = sd[d + "attn.norm_q.weight"]
        out[b + "img_attn.norm.key_norm.scale"] = sd[d + "attn.norm_k.weight"]
        out[b + "txt_attn.norm.query_norm.scale"] = sd[d + "attn.norm_added_q.weight"]
        out[b + "txt_attn.norm.key_norm.scale"] = sd[d + "attn.norm_added_k.weight"]
    for n in range(count(sd, "single_transformer_blocks")):
        d, b = f"single_transformer_blocks.{n}.", f"single_blocks.{n}."
        fused(b + "linear1", [d + "attn.to_q", d + "attn.to_k", d + "attn.to_v", d + "proj_mlp"])
        same(b + "linear2", d + "proj_out")
        same(b + "modulation.lin", d + "norm.linear")
        out[b + "norm.query_norm.scale"] = sd[d + "attn.norm_q.weight"]
        out[b + "norm.key_norm.scale"] = sd[d + "attn.norm_k.weight"]
    return out


def count(sd: dict, blocks: str) -> int:
    return len({int(m.group(1)) for k in sd if (m := re.match(rf"{blocks}\.(\d+)\.", k))})


def ldm_vae(vae) -> dict[str, torch.Tensor]:
    """A diffusers VAE in LDM names, as BFL's ``ae.safetensors`` keeps it (attention as 1x1 convs)."""
    names = vae_key_map(vae.config)
    return {names[k]: (v.reshape(*v.shape, 1, 1) if ".attentions." in k and v.ndim == 2 else v).contiguous()
            for k, v in vae.state_dict().items()}


def stored(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """What a file in ``dtype`` keeps of a weight: float8 for matrices only (ComfyUI's fp8 files keep
    vectors in 16 bits)."""
    if dtype == torch.float8_e4m3fn and tensor.dim() < 2:
        return tensor.to(torch.bfloat16)
    return tensor.to(dtype)


def write(path: Path, tensors: dict[str, torch.Tensor], metadata: dict | None = None) -> Path:
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)
    return path


def draw(model) -> torch.Tensor:
    """An image from a base (as loaded) or a recipe (its LoRAs merged)."""
    pipe = pipeline_for((model if isinstance(model, ModelRecipe) else ModelRecipe(model)).materialize())
    with torch.inference_mode():
        return pipe("a red circle", height=32, width=32, num_inference_steps=2, guidance_scale=3.5,
                    max_sequence_length=32, generator=torch.Generator().manual_seed(1), output_type="pt").images


def assert_same_image(a: torch.Tensor, b: torch.Tensor) -> None:
    # bit for bit but for the last float32 ulps (diffusers' from_pretrained lays weights out in memory
    # differently, which changes the order of a few sums): the same 8-bit pixels
    assert a.shape == b.shape and (a - b).abs().max() < 1e-5


def states(base) -> dict[str, dict[str, torch.Tensor]]:
    return {n: {k: v.detach().clone() for k, v in file_state_dict(base.components[n]).items()} for n in PARTS}


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def original(flux):
    return states(flux), draw(flux)


@pytest.fixture(scope="module")
def folder(flux, tmp_path_factory):
    """builtin:tiny-flux as a diffusers folder (weights included)."""
    return save_diffusers_folder(flux, tmp_path_factory.mktemp("flux") / "tiny-flux")


@pytest.fixture(scope="module")
def configs_only(folder, tmp_path_factory):
    """The folder's configs, tokenizers and scheduler, no weights."""
    target = tmp_path_factory.mktemp("configs") / "tiny-flux-configs"
    shutil.copytree(folder, target)
    for weights in target.rglob("*.safetensors"):
        weights.unlink()
    return target


@pytest.fixture(scope="module")
def component_files(flux, tmp_path_factory):
    """The text encoders and VAE as ComfyUI keeps them: clip_l (HF CLIP names), a T5 file with HF names
    in float16 (the tied embedding once, as ``shared.weight``) and ae (LDM VAE names, no prefix)."""
    folder = tmp_path_factory.mktemp("components")
    c = flux.components
    t5 = {k: v.half() for k, v in c["text_encoder_2"].state_dict().items() if k != "encoder.embed_tokens.weight"}
    return {"text_encoder": str(write(folder / "clip_l.safetensors", file_state_dict(c["text_encoder"]))),
            "text_encoder_2": str(write(folder / "t5xxl_fp16.safetensors", t5)),
            "vae": str(write(folder / "ae.safetensors", ldm_vae(c["vae"])))}


@pytest.fixture
def ctx(tmp_path):
    events: list = []
    context = NodeContext("save", "SaveModel", tmp_path / "out", tmp_path / "cache", events.append)
    context.events = events
    return context


# --------------------------------------------------------------------------- the converter


def variant(**changes):
    """A Flux-shaped transformer of other sizes (random weights, seeded)."""
    from diffusers import FluxTransformer2DModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(5)
        return FluxTransformer2DModel(**{**TINY_FLUX_TRANSFORMER, **changes}).eval()


SIZES = {  # 3 double and 1 single block, 3 heads of 8, other widths, no guidance input (like schnell)
    "num_layers": 3, "num_single_layers": 1, "num_attention_heads": 3, "attention_head_dim": 8,
    "joint_attention_dim": 40, "pooled_projection_dim": 24, "in_channels": 32, "out_channels": 48,
    "guidance_embeds": False, "axes_dims_rope": (2, 2, 4)}


@pytest.mark.parametrize("changes", [{}, SIZES], ids=["tiny-flux", "3-double-1-single"])
def test_the_converter_follows_the_layout_definition(changes):
    model = variant(**changes)
    sd = model.state_dict()
    family = families.from_components({"transformer": model})
    expected = bfl_from_diffusers(sd)
    written = bfl.to_bfl(sd, family, model.config)
    assert written.keys() == expected.keys()
    assert all(torch.equal(written[k], expected[k]) for k in expected)
    # every size is read from the tensors; the RoPE axes (not stored) by the rule for head dim 8
    config = bfl.transformer_config({k: v.shape for k, v in expected.items()})
    wanted = {**TINY_FLUX_TRANSFORMER, "out_channels": None, **changes}
    assert config == {**wanted, "axes_dims_rope": bfl.rope_axes(wanted["attention_head_dim"])}
    back = bfl.from_bfl(expected, family, config)
    assert back.keys() == sd.keys() and all(torch.equal(back[k], sd[k]) for k in sd)
    if changes:  # the rule's axes are the variant's own: the converted model computes the same
        from diffusers import FluxTransformer2DModel

        loaded = FluxTransformer2DModel.from_config(config).eval()
        loaded.load_state_dict(back)
        g = torch.Generator().manual_seed(0)
        inputs = {"hidden_states": torch.randn(1, 16, 32, generator=g),
                  "encoder_hidden_states": torch.randn(1, 8, 40, generator=g),
                  "pooled_projections": torch.randn(1, 24, generator=g), "timestep": torch.tensor([0.4]),
                  "img_ids": torch.zeros(16, 3), "txt_ids": torch.zeros(8, 3)}
        with torch.no_grad():
            assert torch.equal(loaded(**inputs).sample, model(**inputs).sample)


def test_rope_axes_fit_the_head_dim():
    assert bfl.rope_axes(128) == (16, 56, 56)  # FLUX.1's
    assert bfl.rope_axes(16, (4, 4, 8)) == (4, 4, 8)  # a config's own, when it fits
    for head_dim in (8, 16, 64, 96, 256):
        axes = bfl.rope_axes(head_dim, (16, 56, 56))  # a config that does not fit is not taken
        assert sum(axes) == head_dim and all(a % 2 == 0 and a > 0 for a in axes)


def test_a_transformer_diffusers_cannot_hold_is_refused_clearly(flux):
    state = bfl_from_diffusers(flux.denoiser.state_dict())
    shapes = {k: list(v.shape) for k, v in state.items()}
    with pytest.raises(ValueError, match="MLP width 96 is not 4x its hidden width 32"):
        bfl.transformer_config({**shapes, "double_blocks.0.img_mlp.0.weight": [96, 32]})  # MLP ratio 3
    with pytest.raises(ValueError, match="no 'txt_in.weight'"):
        bfl.transformer_config({k: v for k, v in shapes.items() if not k.startswith("txt_in")})


# --------------------------------------------------------------------------- loading


def test_a_diffusers_folder_loads_to_the_same_model(folder, original):
    expected, image = original
    assert base_family(str(folder)) == (families.by_id("flux"), [])
    loaded = load_base(str(folder), dtype="float32", device="cpu")
    assert loaded.family.id == "flux"
    got = states(loaded)
    assert all(torch.equal(got[n][k], expected[n][k]) for n in PARTS for k in expected[n])
    assert_same_image(draw(loaded), image)


def test_an_incomplete_flux_folder_names_its_files(folder, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(folder, broken)
    for part in ("transformer", "text_encoder_2", "tokenizer_2"):
        shutil.rmtree(broken / part)
    missing = missing_pipeline_files(broken)
    assert {"transformer/config.json", "text_encoder_2/config.json"} <= set(missing)
    assert any(name.startswith("tokenizer_2/") for name in missing)
    family, problems = base_family(str(broken))
    assert family is None and "transformer/config.json" in problems[0][2]


PREFIXES = ["", "model.diffusion_model.", "diffusion_model."]
PRECISIONS = [(torch.float32, ""), (torch.float32, "model.diffusion_model."), (torch.bfloat16, "diffusion_model."),
              (torch.float16, ""), (torch.float8_e4m3fn, "model.diffusion_model."), (torch.float8_e4m3fn, "")]


@pytest.mark.parametrize(("dtype", "prefix"), PRECISIONS, ids=lambda v: str(v).replace("torch.", "") or "bare")
def test_a_bfl_transformer_file_loads_with_a_config_folder(flux, folder, original, tmp_path, dtype, prefix):
    expected, image = original
    file_state = {prefix + k: stored(v, dtype) for k, v in bfl_from_diffusers(flux.denoiser.state_dict()).items()}
    path = write(tmp_path / "flux1-tiny.safetensors", file_state)
    assert base_family(str(path), str(folder)) == (families.by_id("flux"), [])
    loaded = load_base(str(path), dtype="float32", device="cpu", config=str(folder))
    # the transformer holds exactly what the file stores (upcast); the rest comes from the folder
    again = bfl_from_diffusers(loaded.denoiser.state_dict())
    assert all(torch.equal(again[k], file_state[prefix + k].float()) for k in again)
    got = states(loaded)
    assert all(torch.equal(got[n][k], expected[n][k]) for n in PARTS[1:] for k in expected[n])
    if dtype == torch.float32:
        assert all(torch.equal(got["transformer"][k], expected["transformer"][k]) for k in expected["transformer"])
        assert_same_image(draw(loaded), image)
    else:  # within the precision of the file's numbers
        tolerance = {torch.bfloat16: 2**-8, torch.float16: 2**-10, torch.float8_e4m3fn: 2**-3}[dtype]
        for k, v in expected["transformer"].items():
            assert torch.allclose(got["transformer"][k], v, rtol=tolerance, atol=tolerance * v.abs().max()), k


def test_text_encoders_and_vae_from_files_of_their_own(flux, configs_only, component_files, original, tmp_path):
    expected, _ = original
    path = write(tmp_path / "flux1-tiny.safetensors", bfl_from_diffusers(flux.denoiser.state_dict()))
    # validation names each part the file lacks, on the input that would give it
    family, problems = base_family(str(path), str(configs_only))
    assert family.id == "flux" and {(name, kind) for name, kind, _ in problems} == {
        ("text_encoder", "missing"), ("text_encoder_2", "missing"), ("vae", "missing")}
    assert "set vae to a file that holds it (AutoencoderKL weights)" in {p[0]: p[2] for p in problems}["vae"]
    assert base_family(str(path), str(configs_only), component_files) == (family, [])
    with pytest.raises(ModelLoadError, match="holds no vae and the config folder .* has no vae weights"):
        load_base(str(path), dtype="float32", device="cpu", config=str(configs_only))
    loaded = load_base(str(path), dtype="float32", device="cpu", config=str(configs_only),
                       component_files=component_files)
    got = states(loaded)
    t5 = loaded.components["text_encoder_2"]
    assert t5.shared.weight is t5.encoder.embed_tokens.weight  # the tie the file stores once
    for name in ("transformer", "vae", "text_encoder"):
        assert all(torch.equal(got[name][k], expected[name][k]) for k in expected[name]), name
    assert all(torch.equal(got["text_encoder_2"][k], expected["text_encoder_2"][k].half().float())
               for k in expected["text_encoder_2"])


def test_a_comfyui_full_checkpoint_holds_every_part(flux, configs_only, original, tmp_path):
    expected, image = original
    c = flux.components
    state = {"model.diffusion_model." + k: v for k, v in bfl_from_diffusers(c["transformer"].state_dict()).items()}
    state |= {"vae." + k: v for k, v in ldm_vae(c["vae"]).items()}
    state |= {"text_encoders.clip_l.transformer." + k: v for k, v in file_state_dict(c["text_encoder"]).items()}
    state |= {"text_encoders.t5xxl.transformer." + k: v for k, v in c["text_encoder_2"].state_dict().items()
              if k != "encoder.embed_tokens.weight"}  # tied to shared.weight: stored once
    path = write(tmp_path / "flux1-tiny-full.safetensors", state)
    assert base_family(str(path), str(configs_only)) == (families.by_id("flux"), [])
    loaded = load_base(str(path), dtype="float32", device="cpu", config=str(configs_only))
    got = states(loaded)
    assert all(torch.equal(got[n][k], expected[n][k]) for n in PARTS for k in expected[n])
    assert_same_image(draw(loaded), image)


def test_comfyui_scaled_fp8_weights_are_multiplied_out(flux, folder, tmp_path):
    """ComfyUI's "scaled" fp8 files keep each matrix as float8 times a float32 scale."""
    state = bfl_from_diffusers(flux.denoiser.state_dict())
    scaled: dict[str, torch.Tensor] = {"scaled_fp8": torch.zeros(0, dtype=torch.float8_e4m3fn)}
    for key, value in state.items():
        if value.dim() == 2:
            scale = value.abs().max() / 448
            scaled[key] = (value / scale).to(torch.float8_e4m3fn)
            scaled[key.replace(".weight", ".scale_weight")] = scale.reshape(1)
        else:
            scaled[key] = value
    path = write(tmp_path / "scaled.safetensors", scaled)
    loaded = load_base(str(path), dtype="float32", device="cpu", config=str(folder))
    again = bfl_from_diffusers(loaded.denoiser.state_dict())
    for key, value in state.items():
        if value.dim() == 2:
            want = scaled[key].float() * scaled[key.replace(".weight", ".scale_weight")].float()
            assert torch.equal(again[key], want), key


def test_damaged_and_unknown_files_are_named(flux, folder, component_files, tmp_path):
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file")
    unknown = write(tmp_path / "unknown.safetensors", {"foo.weight": torch.zeros(2, 2)})
    state = bfl_from_diffusers(flux.denoiser.state_dict())
    del state["double_blocks.1.img_attn.qkv.weight"]
    damaged = write(tmp_path / "damaged.safetensors", state)
    good = write(tmp_path / "good.safetensors", bfl_from_diffusers(flux.denoiser.state_dict()))
    assert "not a readable .safetensors file" in base_family(str(junk))[1][0][2]
    assert "unknown.safetensors is not a model checkpoint we can read" in base_family(str(unknown))[1][0][2]
    with pytest.raises(ModelLoadError, match=r"does not fit the configs.*double_blocks\.1\.img_attn\.qkv\.weight"):
        load_base(str(damaged), dtype="float32", device="cpu", config=str(folder))
    # a component file that is not one: named on its input before anything runs (exit 2)
    workflow = write_workflow(tmp_path, f"""
nodes:
  base: {{type: LoadBase, inputs: {{source: {good}, config: {folder}, text_encoder: {junk},
                                   vae: {component_files['text_encoder']}}}}}
  save: {{type: SaveModel, inputs: {{model: [base, model], path: never}}}}
""")
    assert main(["validate", str(workflow), "--json"]) == 2
    with pytest.raises(ModelLoadError, match="not a readable .safetensors file"):
        load_base(str(good), device="cpu", config=str(folder), component_files={"text_encoder": str(junk)})
    with pytest.raises(ModelLoadError, match="files of their own go with a single-file checkpoint"):
        load_base("builtin:tiny-flux", device="cpu", component_files={"vae": component_files["vae"]})


def test_validation_reports_component_file_problems_on_their_inputs(flux, folder, component_files, tmp_path, capsys):
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file")
    good = write(tmp_path / "good.safetensors", bfl_from_diffusers(flux.denoiser.state_dict()))
    workflow = write_workflow(tmp_path, f"""
nodes:
  base: {{type: LoadBase, inputs: {{source: {good}, text_encoder: {junk}, vae: {component_files['text_encoder']}}}}}
  save: {{type: SaveModel, inputs: {{model: [base, model], path: never}}}}
""")
    assert main(["validate", str(workflow), "--json"]) == 2
    problems = {(p["input"], p["code"]) for p in json.loads(capsys.readouterr().out)}
    assert {("text_encoder", "bad_model"), ("vae", "bad_model"), ("config", "missing_input"),
            ("text_encoder_2", "missing_input")} <= problems


def test_load_base_node_takes_component_files(flux, configs_only, component_files, original, tmp_path):
    """The workflow as a ComfyUI user wires it (UNETLoader + DualCLIPLoader + VAELoader), saved as a folder."""
    expected, _ = original
    path = write(tmp_path / "flux1-tiny.safetensors", bfl_from_diffusers(flux.denoiser.state_dict()))
    workflow = write_workflow(tmp_path, f"""
nodes:
  base: {{type: LoadBase, inputs: {{source: {path}, config: {configs_only}, dtype: float32, device: cpu,
                                   text_encoder: {component_files['text_encoder']},
                                   text_encoder_2: {component_files['text_encoder_2']},
                                   vae: {component_files['vae']}}}}}
  save: {{type: SaveModel, inputs: {{model: [base, model], path: copied}}}}
""")
    assert main(["run", str(workflow), "--output-dir", str(tmp_path / "out")]) == 0
    loaded = load_base(str(tmp_path / "out" / "copied"), dtype="float32", device="cpu")
    got = states(loaded)
    for name in ("transformer", "vae", "text_encoder"):
        assert all(torch.equal(got[name][k], expected[name][k]) for k in expected[name]), name


# --------------------------------------------------------------------------- SaveModel


@pytest.fixture(scope="module")
def lora_path(flux, tmp_path_factory):
    """A PEFT LoRA on every transformer and CLIP linear of tiny-flux."""
    tensors = synthetic_lora(flux, rank=2, seed=7, fmt="peft", pattern=re.compile(r"^(transformer|text_encoder)\."))
    path = tmp_path_factory.mktemp("lora") / "style.safetensors"
    save_file(tensors, str(path))
    return path


def test_save_model_writes_both_layouts_that_load_back(flux, ctx, lora_path, configs_only, component_files):
    recipe = ModelRecipe(flux, (AppliedLoRA(read_lora(lora_path), 0.7, 0.7),))
    merged, image = states(recipe.materialize()), draw(recipe)
    save_model.run(ctx, recipe, "merged", "diffusers", "same", False)
    save_model.run(ctx, recipe, "merged", "single_file", "same", False)
    folder, single = ctx.output_dir / "merged", ctx.output_dir / "merged.safetensors"
    assert ctx.files == [str(folder), str(single)]
    # the single file is the transformer alone in BFL names (no prefix), as BFL releases it; the LoRA's
    # text-encoder changes are not in it, and a warning says so
    written = load_file(str(single))
    expected_file = bfl_from_diffusers(merged["transformer"])
    assert written.keys() == expected_file.keys()
    assert all(torch.equal(written[k], expected_file[k]) for k in written)
    warnings = [e for e in ctx.events if e["event"] == "warning"]
    assert len(warnings) == 1 and "text_encoder" in warnings[0]["message"] and "diffusers" in warnings[0]["message"]
    with safe_open(str(single), "pt") as f:
        assert json.loads(f.metadata()[EMBEDDED_CONFIG_KEY])["transformer"]["axes_dims_rope"] == [4, 4, 8]
    # the folder: every part as merged, the same image
    from_folder = load_base(str(folder), dtype="float32", device="cpu")
    got = states(from_folder)
    assert all(torch.equal(got[n][k], merged[n][k]) for n in PARTS for k in merged[n])
    assert_same_image(draw(from_folder), image)
    # the single file with the folder's text encoders and VAE: the same model, the same image
    from_single = load_base(str(single), dtype="float32", device="cpu", config=str(folder))
    got = states(from_single)
    assert all(torch.equal(got[n][k], merged[n][k]) for n in PARTS for k in merged[n])
    assert_same_image(draw(from_single), image)
    # and with files of their own, configs and tokenizers from its metadata: no config folder at all
    assert base_family(str(single), "", component_files) == (families.by_id("flux"), [])
    own = load_base(str(single), dtype="float32", device="cpu", component_files=component_files)
    assert all(torch.equal(file_state_dict(own.denoiser)[k], merged["transformer"][k]) for k in merged["transformer"])


def test_save_model_single_file_in_bfloat16(flux, ctx, folder):
    save_model.run(ctx, ModelRecipe(flux), "half", "single_file", "bfloat16", False)
    written = load_file(str(ctx.output_dir / "half.safetensors"))
    assert {v.dtype for v in written.values()} == {torch.bfloat16}
    assert not [e for e in ctx.events if e["event"] == "warning"]  # no LoRA: nothing left out
    loaded = load_base(str(ctx.output_dir / "half.safetensors"), dtype="bfloat16", device="cpu", config=str(folder))
    assert loaded.denoiser.dtype == torch.bfloat16
    want = bfl_from_diffusers(flux.denoiser.state_dict())
    again = bfl_from_diffusers(loaded.denoiser.state_dict())
    assert all(torch.equal(again[k], want[k].bfloat16()) for k in want)


# --------------------------------------------------------------------------- memory and inspect


def test_memory_estimates_for_a_transformer(flux):
    shape = transformer_shape(flux)
    assert (shape.hidden, shape.heads, shape.blocks, shape.patch) == (32, 2, 4, 2)
    assert transformer_tokens(shape, 1024 // 8, 1024 // 8) == shape.text_tokens + (1024 // 16) ** 2
    small = sample_estimate(flux, 64, 64, 1, 1.0)
    assert "transformer" in small.phases
    big = sample_estimate(flux, 128, 128, 1, 1.0)
    assert big.phases["transformer"] > small.phases["transformer"]
    # a guidance-distilled pipeline runs a negative prompt's pass after the first: the batch is not doubled
    assert sample_estimate(flux, 64, 64, 1, 4.0).phases == small.phases
    check_sample(flux, 32, 32, 1, 1.0)
    with pytest.raises(NodeError, match="Sample at 8192x8192"):
        check_sample(flux, 8192, 8192, 8, 1.0)
    training = train_estimate(flux, {(64, 64): 4}, 2, 4, 1000, False, True, None)
    checkpointed = train_estimate(flux, {(64, 64): 4}, 2, 4, 1000, True, True, None)
    assert 0 < checkpointed.phases["transformer step"] < training.phases["transformer step"]

    class Images:  # a dataset's bucket sizes, all TrainLoRA's check reads of it
        def __init__(self, size: int, count: int):
            self.size, self.count = size, count

        def buckets(self, native_size):
            return {f"{self.size}x{self.size}": self.count}

        def __len__(self):
            return self.count

    config = SimpleNamespace(batch_size=64, rank=4, gradient_checkpointing=False, train_text_encoder=True,
                             sample_every_n_steps=0)
    targets = {k: m for k, m in flux.lora_targets.items() if k.startswith("transformer.")}
    check_training(flux, Images(64, 4), config, targets, None)
    with pytest.raises(NodeError, match="TrainLoRA at 4096x4096"):
        check_training(flux, Images(4096, 64), config, targets, None)


def test_inspect_shows_a_flux_base(capsys):
    assert main(["inspect", "builtin:tiny-flux"]) == 0
    out = capsys.readouterr().out
    assert "denoiser: transformer (FluxTransformer2DModel): num_layers=2, num_single_layers=2" in out
    assert "text_encoder_2 (T5EncoderModel)" in out and "single-file layout: bfl" in out
    assert "double blocks 0-1; single blocks 0-1" in out
    assert main(["inspect", "builtin:tiny-flux", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["denoiser"]["config"]["num_single_layers"] == 2 and info["blocks"]["double blocks"] == [0, 1]
