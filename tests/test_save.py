"""SaveModel and SaveLoRA: files that our loaders and diffusers' load to the same weights."""

from __future__ import annotations

import copy
import hashlib
import json
import re
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from lora_nodes.engine.context import NodeContext
from lora_nodes.errors import LoRAError, NodeError
from lora_nodes.lora.files import read_lora
from lora_nodes.lora.formats import SUFFIXES
from lora_nodes.lora.recipe import AppliedLoRA, ModelRecipe
from lora_nodes.lora.save import COMMON_PARTS, KOHYA_PARTS, addnet_hashes, to_plain
from lora_nodes.lora.synthetic import synthetic_lora
from lora_nodes.models.loading import EMBEDDED_CONFIG_KEY, load_base
from lora_nodes.models.text_names import file_state_dict
from lora_nodes.nodes.save import save_lora, save_model

STRENGTH = 0.7
PARTS = ("unet", "vae", "text_encoder", "text_encoder_2")


@pytest.fixture(scope="module")
def sdxl():
    """builtin:tiny-sdxl of this module's own (the shared fixtures may not have it)."""
    return load_base("builtin:tiny-sdxl", dtype="float32", device="cpu")


@pytest.fixture
def ctx(tmp_path):
    events: list = []
    context = NodeContext("save", "Save", tmp_path / "out", tmp_path / "cache", events.append)
    context.events = events
    return context


def write(tmp_path: Path, name: str, tensors: dict, metadata: dict | None = None) -> Path:
    path = tmp_path / f"{name}.safetensors"
    save_file(tensors, str(path), metadata=metadata)
    return path


def snapshot(base) -> dict[str, dict[str, torch.Tensor]]:
    return {n: {k: v.clone() for k, v in file_state_dict(base.components[n]).items()}
            for n in PARTS if n in base.components}


def assert_bitwise(expected: dict, components) -> None:
    """``components``: a dict of modules or of state dicts (a :func:`snapshot`), or a pipeline."""
    for name, state in expected.items():
        got = components[name] if isinstance(components, dict) else getattr(components, name)
        got = got if isinstance(got, dict) else file_state_dict(got)
        assert set(got) >= set(state), name
        for key, value in state.items():
            assert torch.equal(got[key], value), (name, key)


def rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)).item()


def merged(base, lora, strength: float = 1.0) -> dict[str, dict[str, torch.Tensor]]:
    ModelRecipe(base, (AppliedLoRA(lora, strength, strength),)).materialize()
    return snapshot(base)


def assert_close(ours: dict, theirs: dict, tol: float = 1e-5) -> None:
    for name, state in ours.items():
        for key, value in state.items():
            assert rel_error(theirs[name][key], value) < tol, (name, key)


def merged_recipe(base, path: Path):
    return ModelRecipe(base, (AppliedLoRA(read_lora(path), STRENGTH, STRENGTH),))


def pipeline_over_copies(base):
    """A diffusers pipeline over deep copies of the base's unpatched components."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    ModelRecipe(base).materialize()
    parts = {k: copy.deepcopy(v) for k, v in base.components.items()}
    if base.family.id == "sdxl":
        return StableDiffusionXLPipeline(**parts)
    return StableDiffusionPipeline(**parts, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


def diffusers_merged(base, path: Path, strength: float) -> dict[str, dict[str, torch.Tensor]]:
    pipe = pipeline_over_copies(base)
    pipe.load_lora_weights(str(path))
    pipe.fuse_lora(lora_scale=strength)
    pipe.unload_lora_weights()
    return {n: file_state_dict(getattr(pipe, n)) for n in ("unet", "text_encoder", "text_encoder_2")
            if n in base.components}


# --------------------------------------------------------------------------- SaveModel


def test_save_model_sd1_folder_and_single_file(ctx, tiny, write_lora, monkeypatch):
    from diffusers import StableDiffusionPipeline

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    recipe = merged_recipe(tiny, write_lora("style", rank=4, alpha=2.0, seed=3))
    save_model.run(ctx, recipe, "merged", "diffusers", "same", False)
    folder = ctx.output_dir / "merged"
    assert ctx.files == [str(folder)]
    expected = snapshot(tiny)
    assert_bitwise(expected, StableDiffusionPipeline.from_pretrained(folder, local_files_only=True))
    from_folder = load_base(str(folder), dtype="float32", device="cpu")
    assert_bitwise(expected, from_folder.components)
    # (b) single file from the folder-loaded base: its tokenizer is embedded, no config folder needed
    save_model.run(ctx, ModelRecipe(from_folder), "merged", "single_file", "same", False)
    single = ctx.output_dir / "merged.safetensors"
    with safe_open(str(single), "pt") as f:
        configs = json.loads(f.metadata()[EMBEDDED_CONFIG_KEY])
    assert isinstance(configs["tokenizer"], dict)
    loaded = load_base(str(single), dtype="float32", device="cpu")
    assert_bitwise(expected, loaded.components)
    assert loaded.components["tokenizer"].get_vocab() == tiny.components["tokenizer"].get_vocab()
    pipe = StableDiffusionPipeline.from_single_file(str(single), config=str(folder), local_files_only=True,
                                                    safety_checker=None)
    assert_bitwise(expected, pipe)


def test_save_model_sdxl_folder_and_single_file(ctx, sdxl, tmp_path, monkeypatch):
    from diffusers import StableDiffusionXLPipeline

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    path = write(tmp_path, "xl", synthetic_lora(sdxl, rank=4, alpha=8.0, seed=4))
    recipe = merged_recipe(sdxl, path)
    save_model.run(ctx, recipe, "xl", "diffusers", "same", False)
    save_model.run(ctx, recipe, "xl.safetensors", "single_file", "same", False)
    expected = snapshot(sdxl)
    folder, single = ctx.output_dir / "xl", ctx.output_dir / "xl.safetensors"
    assert_bitwise(expected, StableDiffusionXLPipeline.from_pretrained(folder, local_files_only=True))
    assert_bitwise(expected, load_base(str(folder), dtype="float32", device="cpu").components)
    # the single file's tokenizer is "builtin": no config folder needed either
    assert_bitwise(expected, load_base(str(single), dtype="float32", device="cpu").components)
    pipe = StableDiffusionXLPipeline.from_single_file(str(single), config=str(folder), local_files_only=True)
    assert_bitwise(expected, pipe)


def test_save_model_dtype_leaves_base_alone_and_refuses_overwrite(ctx, tiny):
    before = snapshot(tiny)
    save_model.run(ctx, ModelRecipe(tiny), "half", "single_file", "float16", False)
    state = load_file(str(ctx.output_dir / "half.safetensors"))
    assert {v.dtype for v in state.values() if v.is_floating_point()} == {torch.float16}
    save_model.run(ctx, ModelRecipe(tiny), "half", "diffusers", "bfloat16", False)
    half = load_base(str(ctx.output_dir / "half"), dtype="bfloat16", device="cpu")
    assert half.components["unet"].dtype == torch.bfloat16
    assert_bitwise(before, tiny.components)
    with pytest.raises(NodeError, match="overwrite"):
        save_model.run(ctx, ModelRecipe(tiny), "half", "diffusers", "same", False)
    save_model.run(ctx, ModelRecipe(tiny), "half", "diffusers", "same", True)
    assert [p.name for p in ctx.output_dir.iterdir() if p.name.startswith(".")] == []


# --------------------------------------------------------------------------- SaveLoRA, kohya


def test_kohya_parts_are_read_back():
    for suffix in [*COMMON_PARTS.values(), *(s for parts in KOHYA_PARTS.values() for s in parts.values())]:
        assert suffix in SUFFIXES


def data_section_sha256(path: Path) -> str:
    data = path.read_bytes()
    return hashlib.sha256(data[8 + int.from_bytes(data[:8], "little"):]).hexdigest()


def test_save_lora_kohya_round_trip_metadata_and_hash(ctx, tiny, write_lora):
    metadata = {"ss_tag_frequency": '{"a": {"red": 3}}', "ss_output_name": "src", "other": "x"}
    source = write_lora("src", rank=4, alpha=2.0, seed=5, metadata=metadata)
    lora = read_lora(source)
    save_lora.run(ctx, lora, "copy", "kohya", None, 0, False)
    path = ctx.output_dir / "copy.safetensors"
    assert ctx.files == [str(path)]
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    assert meta["ss_network_module"] == "networks.lora"
    assert (meta["ss_network_dim"], meta["ss_network_alpha"]) == ("4", "2.0")
    assert meta["ss_base_model_version"] == "sd_v1"
    assert meta["ss_tag_frequency"] == '{"a": {"red": 3}}' and "other" not in meta
    assert meta["sshs_model_hash"] == data_section_sha256(path)
    assert load_file(str(path)).keys() == load_file(str(source)).keys()
    assert_bitwise(merged(tiny, lora, STRENGTH), merged(tiny, read_lora(path), STRENGTH))
    # the same LoRA saved again (a graph queued twice) leaves the file as it is; another LoRA is refused
    written = path.read_bytes(), path.stat().st_mtime_ns
    save_lora.run(ctx, lora, "copy.safetensors", "kohya", None, 0, False)
    assert (path.read_bytes(), path.stat().st_mtime_ns) == written
    other = read_lora(write_lora("other", rank=4, alpha=2.0, seed=6, metadata=metadata))
    with pytest.raises(NodeError, match="already exists"):
        save_lora.run(ctx, other, "copy.safetensors", "kohya", None, 0, False)
    assert path.read_bytes() == written[0]
    save_lora.run(ctx, other, "copy", "kohya", ModelRecipe(tiny), 0, True)
    assert path.read_bytes() != written[0]
    with pytest.raises(NodeError, match="outside the output folder"):  # output names are relative to it
        save_lora.run(ctx, lora, str(path), "kohya", ModelRecipe(tiny), 0, True)


def test_addnet_hashes_match_an_independent_computation():
    from safetensors.torch import save

    tensors = {"b": torch.arange(400_000, dtype=torch.float32), "a.alpha": torch.tensor(4.0)}
    metadata = {"ss_network_dim": "4", "modelspec.title": "left out of the hash"}
    data = save(tensors, {"ss_network_dim": "4"})
    n = int.from_bytes(data[:8], "little")
    assert addnet_hashes(tensors, metadata) == (hashlib.sha256(data[8 + n:]).hexdigest(),
                                                hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8])


def test_peft_to_kohya_needs_the_model(ctx, tiny, write_lora):
    lora = read_lora(write_lora("peft", fmt="peft", seed=6))
    with pytest.raises(LoRAError, match="connect the model"):
        save_lora.run(ctx, lora, "k", "kohya", None, 0, False)
    save_lora.run(ctx, lora, "k", "kohya", ModelRecipe(tiny), 0, False)
    written = read_lora(ctx.output_dir / "k.safetensors")
    assert all(key.startswith("lora_") for key in written.modules)
    assert_close(merged(tiny, lora, STRENGTH), merged(tiny, written, STRENGTH), 1e-6)


# --------------------------------------------------------------------------- SaveLoRA, diffusers


def mixed_lora(base) -> dict[str, torch.Tensor]:
    """attn1 at rank 4 / alpha 2, attn2 at rank 2 / alpha 8: not uniform, so scales are folded."""
    first = synthetic_lora(base, rank=4, alpha=2.0, seed=7, pattern=re.compile(r"(attn1\.to_[qkv]|q_proj)$"))
    second = synthetic_lora(base, rank=2, alpha=8.0, seed=8, pattern=re.compile(r"attn2\.to_(q|out\.0)$"))
    return {**first, **second}


@pytest.mark.parametrize("uniform", [True, False])
def test_kohya_to_diffusers_matches_diffusers_fuse_lora(ctx, tiny, tmp_path, uniform):
    tensors = synthetic_lora(tiny, rank=4, alpha=2.0, seed=9) if uniform else mixed_lora(tiny)
    lora = read_lora(write(tmp_path, "k", tensors))
    with pytest.raises(LoRAError, match="connect the model"):
        save_lora.run(ctx, lora, "d", "diffusers", None, 0, False)
    save_lora.run(ctx, lora, "d", "diffusers", ModelRecipe(tiny), 0, False)
    path = ctx.output_dir / "d.safetensors"
    with safe_open(str(path), "pt") as f:
        assert ("lora_adapter_metadata" in f.metadata()) == uniform
    ours = merged(tiny, lora, STRENGTH)
    assert_close(ours, merged(tiny, read_lora(path), STRENGTH), 1e-6)
    assert_close({k: v for k, v in ours.items() if k != "vae"}, diffusers_merged(tiny, path, STRENGTH))


def test_sdxl_kohya_to_diffusers_matches_diffusers_fuse_lora(ctx, sdxl, tmp_path):
    lora = read_lora(write(tmp_path, "xl", synthetic_lora(sdxl, rank=4, alpha=2.0, seed=10)))
    assert any(key.startswith("lora_unet_input_blocks") for key in lora.modules)  # kohya's SGM names
    save_lora.run(ctx, lora, "xl", "diffusers", ModelRecipe(sdxl), 0, False)
    path = ctx.output_dir / "xl.safetensors"
    ours = merged(sdxl, lora, STRENGTH)
    assert_close(ours, merged(sdxl, read_lora(path), STRENGTH), 1e-6)
    theirs = diffusers_merged(sdxl, path, STRENGTH)
    assert_close({k: v for k, v in ours.items() if k != "vae"}, theirs)
    ModelRecipe(sdxl).materialize()


# --------------------------------------------------------------------------- conversions to plain LoRA


def loha_and_dora(base, targets: list[str]) -> dict[str, torch.Tensor]:
    """LoHa on the first target, a DoRA LoRA on the second (kohya names)."""

    names = base.kohya_names
    g = torch.Generator().manual_seed(11)
    out, inp = base.lora_targets[targets[0]].weight.shape
    loha = names[targets[0]]
    tensors = {f"{loha}.alpha": torch.tensor(1.0)}
    for part in ("w1", "w2"):
        tensors[f"{loha}.hada_{part}_a"] = torch.randn(out, 2, generator=g)
        tensors[f"{loha}.hada_{part}_b"] = torch.randn(2, inp, generator=g)
    out, inp = base.lora_targets[targets[1]].weight.shape
    dora = names[targets[1]]
    tensors.update({f"{dora}.lora_down.weight": torch.randn(3, inp, generator=g) * 0.2,
                    f"{dora}.lora_up.weight": torch.randn(out, 3, generator=g) * 0.2,
                    f"{dora}.alpha": torch.tensor(3.0),
                    f"{dora}.dora_scale": torch.rand(1, inp, generator=g) + 0.5})
    return tensors


def test_loha_and_dora_become_plain_lora(ctx, tiny, tmp_path):
    targets = [t for t in tiny.lora_targets if t.endswith(("attn1.to_q", "attn2.to_v"))][:2]
    lora = read_lora(write(tmp_path, "lyco", loha_and_dora(tiny, targets)))
    dora = next(m for m in lora.modules.values() if m.dora_scale is not None)
    with pytest.raises(LoRAError, match="DoRA.*connect the model"):
        to_plain(dora, None, None, 0)
    save_lora.run(ctx, lora, "kept", "kohya", None, 0, False)  # kohya keeps LyCORIS modules as they are
    with safe_open(str(ctx.output_dir / "kept.safetensors"), "pt") as f:
        assert f.metadata()["ss_network_module"] == "lycoris.kohya"
    save_lora.run(ctx, lora, "plain", "diffusers", ModelRecipe(tiny), 0, False)
    plain = read_lora(ctx.output_dir / "plain.safetensors")
    assert {m.kind for m in plain.modules.values()} == {"lora"}
    assert all(m.dora_scale is None for m in plain.modules.values())
    assert_close(merged(tiny, lora), merged(tiny, plain), 1e-5)  # DoRA: equal at strength 1
    save_lora.run(ctx, lora, "rank1", "diffusers", ModelRecipe(tiny), 1, False)
    assert [e["module"] for e in ctx.events if e.get("event") == "warning"] != []


def test_save_nodes_run_in_a_workflow(tmp_path, write_lora):
    from lora_nodes.engine.events import Collector
    from lora_nodes.engine.scheduler import Runner
    from lora_nodes.graph import load_workflow
    from lora_nodes.nodes import catalogue
    from lora_nodes.nodes.spec import Catalogue

    write_lora("style", rank=4, seed=12)
    workflow = tmp_path / "save.yaml"
    workflow.write_text("""
format: lora-nodes/1
nodes:
  base:  {type: LoadBase}
  lora:  {type: LoadLoRA, inputs: {path: style.safetensors}}
  out:   {type: SaveLoRA, inputs: {lora: [lora, lora], path: converted, format: diffusers, model: [base, model]}}
  mixed: {type: ApplyLoRA, inputs: {model: [base, model], lora: [lora, lora], strength_model: 0.5}}
  model: {type: SaveModel, inputs: {model: [mixed, model], path: merged, format: single_file}}
""")
    events = Collector()
    nodes = Catalogue([*(spec for spec in catalogue().values() if spec.id not in ("SaveLoRA", "SaveModel")),
                       save_lora, save_model])
    Runner(nodes, output_dir=tmp_path / "out", emit=events).run(load_workflow(workflow))
    files = sorted(f for e in events.of("executed") for f in e.get("files", []))
    assert files == [str(tmp_path / "out" / "converted.safetensors"), str(tmp_path / "out" / "merged.safetensors")]
    # as `lora-nodes run` runs it: SaveModel is the last to use the weights and patches them in place
    alone = tmp_path / "alone.yaml"
    alone.write_text("\n".join(line for line in workflow.read_text().splitlines() if "SaveLoRA" not in line))
    Runner(nodes, output_dir=tmp_path / "once", one_shot=True).run(load_workflow(alone))
    kept, once = (load_file(str(tmp_path / folder / "merged.safetensors")) for folder in ("out", "once"))
    assert kept.keys() == once.keys() and all(torch.equal(kept[k], once[k]) for k in kept)
