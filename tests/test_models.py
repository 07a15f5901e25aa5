"""Base models: the built-in one is made in code; folders and single files load offline or say why not."""

import json
import shutil

import pytest
import torch

from lora_nodes import families
from lora_nodes.errors import ModelLoadError
from lora_nodes.lora.recipe import ModelRecipe
from lora_nodes.models.builtin import build_tiny
from lora_nodes.models.loading import load_base
from lora_nodes.models.text_names import file_state_dict
from lora_nodes.models.tokenizer import WORDS, build_tokenizer
from lora_nodes.nodes.sample import make_pipeline


def save_tiny_folder(path):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(**build_tiny(), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(path)
    return path


def draw(base, seed=0):
    pipe = make_pipeline(ModelRecipe(base).materialize(), "euler")
    with torch.inference_mode():
        return pipe("a red circle", num_inference_steps=3, generator=torch.Generator().manual_seed(seed),
                    output_type="pt").images


def test_builtin_tiny_is_deterministic_small_and_sd15_shaped():
    a, b = build_tiny(), build_tiny()
    for name in ("unet", "vae", "text_encoder"):
        sa, sb = a[name].state_dict(), b[name].state_dict()
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    params = sum(p.numel() for n in ("unet", "vae", "text_encoder") for p in a[n].parameters())
    assert params * 4 < 8 * 2**20  # a few MB in float32
    assert families.from_unet_config(a["unet"].config).id == "sd1"
    assert a["unet"].config.cross_attention_dim == a["text_encoder"].config.hidden_size


def test_builtin_leaves_the_callers_random_state_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    build_tiny()
    assert torch.equal(torch.rand(3), expected)


def test_tokenizer_keeps_its_words_whole():
    tokenizer = build_tokenizer()
    for word in WORDS:
        assert len(tokenizer(word).input_ids) == 3, word  # start, the word, end
    assert tokenizer("zebra!").input_ids  # unknown words fall back to characters


def test_diffusers_folder_loads_to_the_same_model(tmp_path, tiny):
    folder = save_tiny_folder(tmp_path / "tiny-folder")
    loaded = load_base(str(folder), dtype="float32", device="cpu")
    assert loaded.family.id == "sd1" and set(loaded.lora_targets) == set(tiny.lora_targets)
    ModelRecipe(tiny).materialize()
    for name in ("unet", "text_encoder"):
        ours, theirs = file_state_dict(tiny.components[name]), file_state_dict(loaded.components[name])
        assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert torch.equal(draw(loaded), draw(tiny))


def test_incomplete_folder_names_what_is_missing(tmp_path):
    folder = save_tiny_folder(tmp_path / "broken")
    shutil.rmtree(folder / "tokenizer")
    with pytest.raises(ModelLoadError, match="missing tokenizer/vocab.json, tokenizer/merges.txt"):
        load_base(str(folder), device="cpu")


def test_load_base_dtype_and_device_choices(tiny):
    half = load_base("builtin:tiny", dtype="bfloat16", device="cpu")
    assert half.unet.dtype == torch.bfloat16 and half.dtype == torch.bfloat16
    assert tiny.device.type == "cpu" and tiny.unet.dtype == torch.float32


def test_folder_index_json_is_ours(tmp_path):
    folder = save_tiny_folder(tmp_path / "f")
    assert json.loads((folder / "model_index.json").read_text())["_class_name"] == "StableDiffusionPipeline"


def write_single_file(tiny, path):
    from safetensors.torch import save_file

    from lora_nodes.models.ldm import to_ldm_checkpoint

    ModelRecipe(tiny).materialize()
    c = tiny.components
    state = to_ldm_checkpoint(c["unet"].state_dict(), c["vae"].state_dict(), file_state_dict(c["text_encoder"]),
                              c["unet"].config, c["vae"].config)
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return path


def test_single_file_checkpoint_loads_offline_with_a_config_folder(tmp_path, tiny):
    checkpoint = write_single_file(tiny, tmp_path / "tiny.safetensors")
    configs = save_tiny_folder(tmp_path / "configs")
    for weights_file in configs.rglob("*.safetensors"):
        weights_file.unlink()  # the folder gives configs and tokenizer only
    loaded = load_base(str(checkpoint), dtype="float32", device="cpu", config=str(configs))
    assert loaded.family.id == "sd1"
    for name in ("unet", "vae", "text_encoder"):
        ours, theirs = file_state_dict(tiny.components[name]), file_state_dict(loaded.components[name])
        assert all(torch.equal(ours[k], theirs[k]) for k in ours), name
    assert torch.equal(draw(loaded), draw(tiny))


def test_single_file_loads_alone_and_a_config_folder_given_is_checked(tmp_path, tiny):
    # issue 13: no config folder needed (tests/test_single_files.py covers the families); one given must be whole
    checkpoint = write_single_file(tiny, tmp_path / "tiny.safetensors")
    alone = load_base(str(checkpoint), dtype="float32", device="cpu")
    assert alone.family.id == "sd1" and torch.equal(draw(alone), draw(tiny))
    configs = save_tiny_folder(tmp_path / "configs")
    shutil.rmtree(configs / "vae")
    with pytest.raises(ModelLoadError, match="lacks vae/config.json"):
        load_base(str(checkpoint), device="cpu", config=str(configs))


def test_single_file_that_does_not_fit_its_configs_names_keys(tmp_path, tiny):
    from safetensors.torch import load_file, save_file

    checkpoint = write_single_file(tiny, tmp_path / "tiny.safetensors")
    state = load_file(str(checkpoint))
    del state["model.diffusion_model.out.2.weight"]
    save_file(state, str(checkpoint))
    configs = save_tiny_folder(tmp_path / "configs")
    with pytest.raises(ModelLoadError, match=r"does not fit the configs.*out\.2\.weight"):
        load_base(str(checkpoint), device="cpu", config=str(configs))


def test_load_base_node_failure_names_the_node(tmp_path, capsys):
    from conftest import write_workflow

    from lora_nodes.cli import main

    (tmp_path / "empty_model").mkdir()
    path = write_workflow(tmp_path, "nodes:\n  base: {type: LoadBase, inputs: {source: empty_model}}\n"
                          "  s: {type: Sample, inputs: {model: [base, model], prompt: x, steps: 1}}\n"
                          "  o: {type: SaveImages, inputs: {images: [s, images]}}\n")
    assert main(["run", str(path), "--output-dir", str(tmp_path / "out")]) == 2  # found before anything runs
    err = capsys.readouterr().err
    assert "node 'base' (LoadBase), input 'source'" in err and "[bad_model]" in err
    assert "missing model_index.json" in err and not (tmp_path / "out").exists()


def test_a_damaged_single_file_is_named_even_without_validation(tmp_path):
    """Inside ComfyUI nothing validates first: the loader itself says the file is damaged."""
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file")
    with pytest.raises(ModelLoadError, match=r"junk\.safetensors is not a readable \.safetensors file"):
        load_base(str(junk))
