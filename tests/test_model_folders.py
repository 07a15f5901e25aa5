"""Model folders (issue 13 point 1): names found as ComfyUI finds them, and workflows that carry names.

A models folder laid out as ComfyUI's ``models/`` (``--models-dir``, ``$LORA_NODES_MODELS_DIR``,
``./models``) and ComfyUI's ``extra_model_paths.yaml`` resolve names such as ``style/foo.safetensors``;
paths relative to the workflow and absolute paths keep working; a missing name gets near names; and
``convert`` and the PNGs write a model folder file's name, never its absolute path.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lora_nodes import pngchunks
from lora_nodes.cli import main
from lora_nodes.graph.load import parse_workflow
from lora_nodes.graph.validate import bind, check
from lora_nodes.modelfolders import (
    MODELS_DIR_VARIABLE,
    FolderSetupError,
    configured,
    find_model,
    models_dir_folders,
    names_in,
    near_names,
    portable_name,
    using_folders,
)
from lora_nodes.nodes import catalogue

WORKFLOWS = Path(__file__).resolve().parent.parent / "workflows"
TINY_LORA = WORKFLOWS / "loras" / "tiny_style.safetensors"  # a real LoRA: LoadLoRA's preflight reads its header


def put(path: Path, source: Path | None = None) -> Path:
    """A file at ``path`` (a copy of ``source``, or a few bytes), its folders made."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if source is not None:
        shutil.copyfile(source, path)
    else:
        path.write_bytes(b"not read by a lookup")
    return path


@pytest.fixture
def models(tmp_path) -> Path:
    """A models folder in ComfyUI's layout, both spellings of the renamed kinds in use."""
    root = tmp_path / "models"
    put(root / "loras" / "tiny_style.safetensors", TINY_LORA)
    put(root / "loras" / "style" / "deep.safetensors", TINY_LORA)
    put(root / "loras" / "notes.txt")  # not a model file: never offered as a near name
    put(root / "checkpoints" / "base.safetensors")
    put(root / "unet" / "old_unet.safetensors")
    put(root / "diffusion_models" / "new_unet.safetensors")
    put(root / "clip" / "old_clip.safetensors")
    put(root / "text_encoders" / "new_te.safetensors")
    (root / "diffusers" / "pipe").mkdir(parents=True)
    (root / "diffusers" / "pipe" / "model_index.json").write_text("{}")
    return root


def lora_workflow(lora_path: str, base_dir: Path) -> dict:
    """A small valid workflow whose LoadLoRA (node ``lora``) reads ``lora_path``."""
    return {"format": "lora-nodes/1", "nodes": {
        "base": {"type": "LoadBase", "inputs": {"source": "builtin:tiny"}},
        "lora": {"type": "LoadLoRA", "inputs": {"path": lora_path}},
        "styled": {"type": "ApplyLoRA", "inputs": {"model": ["base", "model"], "lora": ["lora", "lora"]}},
        "images": {"type": "Sample", "inputs": {"model": ["styled", "model"], "prompt": "x", "steps": 1,
                                                "width": 32, "height": 32}},
        "save": {"type": "SaveImages", "inputs": {"images": ["images", "images"]}},
    }}


def lora_problems(lora_path: str, base_dir: Path) -> list:
    problems, _ = check(parse_workflow(lora_workflow(lora_path, base_dir), base_dir), catalogue())
    return [p for p in problems if p.node == "lora"]


def bound_lora_path(lora_path: str, base_dir: Path) -> str:
    return bind(parse_workflow(lora_workflow(lora_path, base_dir), base_dir), catalogue())["lora"].literals["path"]


def write_workflow(path: Path, lora_path: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(lora_workflow(lora_path, path.parent)))
    return path


# ----------------------------------------------------------------------------- lookup by name


def test_a_name_is_found_in_its_kinds_folder_and_subfolders_and_nowhere_else(models):
    with using_folders(models_dir_folders(models)):
        assert find_model("tiny_style.safetensors", "loras") == models / "loras" / "tiny_style.safetensors"
        deep = models / "loras" / "style" / "deep.safetensors"
        assert find_model("style/deep.safetensors", "loras") == deep
        assert find_model("style\\deep.safetensors", "loras") == deep  # as ComfyUI on Windows lists it
        assert find_model("deep.safetensors", "loras") is None  # the subfolder is part of the name
        assert find_model("base.safetensors", "loras") is None  # another kind's file
        assert find_model("base.safetensors", "checkpoints") == models / "checkpoints" / "base.safetensors"
        assert find_model("pipe", "checkpoints") == models / "diffusers" / "pipe"  # a base may be a diffusers folder
        assert find_model("style", "loras") is None  # a folder is not a LoRA file
        # a shared workflow cannot reach outside the folders, nor name a path as a name
        for not_a_name in ("../checkpoints/base.safetensors", "style/../../checkpoints/base.safetensors",
                           str(models / "loras" / "tiny_style.safetensors"), "~/tiny_style.safetensors", ""):
            assert find_model(not_a_name, "loras") is None, not_a_name
        assert names_in("loras") == ["style/deep.safetensors", "tiny_style.safetensors"]  # model files only
    assert find_model("tiny_style.safetensors", "loras") is None  # outside the block: no folders


def test_comfyuis_old_folder_names_unet_and_clip_are_the_same_kinds(models):
    with using_folders(models_dir_folders(models)):
        for kind in ("diffusion_models", "unet"):
            assert find_model("old_unet.safetensors", kind) == models / "unet" / "old_unet.safetensors"
            assert find_model("new_unet.safetensors", kind) == models / "diffusion_models" / "new_unet.safetensors"
            assert names_in(kind) == ["new_unet.safetensors", "old_unet.safetensors"]
        for kind in ("text_encoders", "clip"):
            assert find_model("old_clip.safetensors", kind) == models / "clip" / "old_clip.safetensors"
            assert find_model("new_te.safetensors", kind) == models / "text_encoders" / "new_te.safetensors"


def test_input_images_are_found_in_the_input_folder(tmp_path, monkeypatch):
    image = put(tmp_path / "input" / "photos" / "cat.png")
    with using_folders(configured(cwd=tmp_path, environ={})):  # ./input, when it exists
        assert find_model("photos/cat.png", "input") == image
        assert find_model("photos/cat.png [input]", "input") == image  # ComfyUI's annotated name
        assert find_model("photos/cat.png", "checkpoints") is None
    other = put(tmp_path / "elsewhere" / "dog.png")
    with using_folders(configured(input_dir=other.parent, cwd=tmp_path, environ={})):
        assert find_model("dog.png", "input") == other
        assert find_model("photos/cat.png", "input") is None  # --input-dir replaces ./input


# ----------------------------------------------------------------------------- where the folders come from


def test_extra_model_paths_yaml_as_comfyui_writes_it(tmp_path, models, monkeypatch):
    monkeypatch.setenv("WEBUI_HOME", str(tmp_path / "webui"))
    lora_a = put(tmp_path / "webui" / "models" / "Lora" / "a.safetensors")
    lora_b = put(tmp_path / "webui" / "models" / "LyCORIS" / "b.safetensors")
    checkpoint = put(tmp_path / "webui" / "models" / "Stable-diffusion" / "c.safetensors")
    default_a = put(tmp_path / "comfy" / "models" / "loras" / "a.safetensors")
    unet = put(tmp_path / "comfy" / "models" / "unet" / "u.safetensors")
    vae = put(tmp_path / "config" / "vae_files" / "v.safetensors")
    config = tmp_path / "config" / "extra_model_paths.yaml"
    config.write_text(
        "a111:\n"
        "    base_path: $WEBUI_HOME\n"  # environment variables expanded, as ComfyUI does
        "    checkpoints: models/Stable-diffusion\n"
        "    loras: |\n"  # several folders, one per line
        "         models/Lora\n"
        "         models/LyCORIS\n"
        "comfyui:\n"
        "    base_path: ../comfy\n"  # relative to the yaml file's folder
        "    is_default: true\n"  # searched before every other folder
        "    loras: models/loras/\n"
        "    unet: models/unet\n"  # the old name of diffusion_models
        "plain:\n"
        "    vae: vae_files\n"  # no base_path: relative to the yaml file's folder
        "empty:\n"
    )
    folders = configured([models], [config], cwd=tmp_path, environ={})
    assert folders.of("loras") == (default_a.parent, models / "loras", lora_a.parent, lora_b.parent)
    with using_folders(folders):
        assert find_model("a.safetensors", "loras") == default_a  # is_default wins over a111's a.safetensors
        assert find_model("b.safetensors", "loras") == lora_b
        assert find_model("tiny_style.safetensors", "loras") == models / "loras" / "tiny_style.safetensors"
        assert find_model("c.safetensors", "checkpoints") == checkpoint
        assert find_model("u.safetensors", "diffusion_models") == unet
        assert find_model("v.safetensors", "vae") == vae


@pytest.mark.parametrize("text", ["- just a list\n", "a111:\n    loras: 5\n", "a111: [models]\n", "a: [\n"])
def test_a_broken_extra_model_paths_yaml_is_refused_with_its_name(tmp_path, text):
    config = tmp_path / "extra_model_paths.yaml"
    config.write_text(text)
    with pytest.raises(FolderSetupError, match="extra_model_paths.yaml"):
        configured(extra_model_paths=[config], cwd=tmp_path, environ={})


def test_models_dir_comes_from_the_option_the_environment_or_dot_models(tmp_path, models, monkeypatch, capsys):
    workflow = write_workflow(tmp_path / "project" / "wf.json", "style/deep.safetensors")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    monkeypatch.delenv(MODELS_DIR_VARIABLE, raising=False)
    assert main(["validate", str(workflow)]) == 2  # no folder: the problem says how to give one
    assert "--models-dir" in capsys.readouterr().err
    assert main(["validate", str(workflow), "--models-dir", str(models)]) == 0
    monkeypatch.setenv(MODELS_DIR_VARIABLE, str(models))
    assert main(["validate", str(workflow)]) == 0
    monkeypatch.setenv(MODELS_DIR_VARIABLE, str(elsewhere))  # --models-dir takes precedence over the variable
    assert main(["validate", str(workflow), "--models-dir", str(models)]) == 0
    assert main(["validate", str(workflow)]) == 2
    monkeypatch.delenv(MODELS_DIR_VARIABLE)
    monkeypatch.chdir(tmp_path)  # tmp_path/models exists: the default
    assert main(["validate", str(workflow)]) == 0
    capsys.readouterr()
    assert main(["validate", str(workflow), "--models-dir", str(tmp_path / "nope")]) == 2
    assert "no such folder" in capsys.readouterr().err


def test_the_help_says_what_each_folder_option_does_and_its_default(capsys):
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for piece in ("--models-dir DIR", "ComfyUI's models/", "loras/", "unet/", MODELS_DIR_VARIABLE, "./models",
                  "--extra-model-paths FILE", "extra_model_paths.yaml", "is_default", "--input-dir DIR", "./input"):
        assert piece in text, piece


# ----------------------------------------------------------------------------- validation


def test_a_missing_name_lists_near_names_and_the_folders_searched(tmp_path, models):
    with using_folders(models_dir_folders(models)):
        [typo] = lora_problems("tiny_styel.safetensors", tmp_path)
        assert typo.code == "file_not_found"
        assert "tiny_style.safetensors" in typo.message and str(models / "loras") in typo.message
        [moved] = lora_problems("deep.safetensors", tmp_path)  # in a subfolder: the whole name is offered
        assert "style/deep.safetensors" in moved.message
        assert "notes.txt" not in moved.message
        assert near_names("TINY_STYLE.safetensors", "loras")[0] == "tiny_style.safetensors"  # case aside
    [unset] = lora_problems("tiny_styel.safetensors", tmp_path)
    assert unset.code == "file_not_found" and "--models-dir" in unset.message


def test_paths_relative_to_the_workflow_and_absolute_paths_still_work_and_come_first(tmp_path, models):
    project = tmp_path / "project"
    beside = put(project / "tiny_style.safetensors", TINY_LORA)
    outside = put(tmp_path / "outside" / "mine.safetensors", TINY_LORA)
    with using_folders(models_dir_folders(models)):
        assert bound_lora_path("tiny_style.safetensors", project) == str(beside)  # the workflow's own file wins
        assert bound_lora_path(str(outside), project) == str(outside)
        assert bound_lora_path("style/deep.safetensors", project) == str(models / "loras" / "style" / "deep.safetensors")
    assert bound_lora_path("tiny_style.safetensors", project) == str(beside)  # with no folders, as before


def test_set_and_inspect_take_names_too(tmp_path, models, monkeypatch, capsys):
    workflow = write_workflow(tmp_path / "project" / "wf.json", "nowhere.safetensors")
    monkeypatch.chdir(tmp_path / "project")
    assert main(["validate", str(workflow), "--models-dir", str(models),
                 "--set", "lora.path=style/deep.safetensors"]) == 0
    capsys.readouterr()
    assert main(["inspect", "style/deep.safetensors", "--models-dir", str(models), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["kind"] == "lora"


# ----------------------------------------------------------------------------- portable names


def test_a_files_portable_name_is_the_one_that_finds_it(tmp_path, models):
    second = tmp_path / "second"
    shadowed = put(second / "loras" / "tiny_style.safetensors", TINY_LORA)
    own = put(second / "loras" / "only_here.safetensors", TINY_LORA)
    link = tmp_path / "linked_models"
    link.symlink_to(models)
    with using_folders(configured([link, second], cwd=tmp_path, environ={})):
        assert portable_name(models / "loras" / "style" / "deep.safetensors", "loras") == "style/deep.safetensors"
        assert portable_name(link / "loras" / "tiny_style.safetensors", "loras") == "tiny_style.safetensors"
        assert portable_name(shadowed, "loras") is None  # its name would find the first folder's file
        assert portable_name(own, "loras") == "only_here.safetensors"
        assert portable_name(models / "checkpoints" / "base.safetensors", "loras") is None  # another kind
        assert portable_name(TINY_LORA, "loras") is None  # in no models folder


@pytest.mark.parametrize("to", ["yaml", "json", "comfyui-api", "comfyui-ui"])
def test_convert_writes_model_folder_files_by_name_in_every_format(tmp_path, models, to, capsys):
    absolute = models / "loras" / "style" / "deep.safetensors"
    workflow = write_workflow(tmp_path / "project" / "wf.json", str(absolute))
    assert main(["convert", str(workflow), "--to", to, "--models-dir", str(models)]) == 0
    text = capsys.readouterr().out
    assert "style/deep.safetensors" in text and str(models) not in text
    target = tmp_path / "shared" / f"converted.{to}"
    assert main(["convert", str(workflow), "--to", to, "--models-dir", str(models), "-o", str(target)]) == 0
    text = target.read_text()
    assert "style/deep.safetensors" in text and str(models) not in text


def _pixels(files: list[str]) -> dict[str, np.ndarray]:
    return {Path(f).name: np.asarray(Image.open(f)) for f in files if f.endswith(".png")}


def _chunk_texts(folder: Path) -> list[str]:
    texts = [text for png in sorted(folder.rglob("*.png"))
             for text in pngchunks.read_chunks(png, pngchunks.TEXT_KEYS).values()]
    assert texts
    return texts


def test_quickstart_converted_for_comfyui_runs_from_a_models_folder_with_the_same_pixels(tmp_path, monkeypatch,
                                                                                           quickstart_run):
    """The issue's portability check: quickstart -> convert --to comfyui-api -> run with --models-dir."""
    reference = _pixels(quickstart_run[1])
    models = tmp_path / "models"
    lora = put(models / "loras" / "purple_star.safetensors", WORKFLOWS / "loras" / "purple_star.safetensors")
    # the quickstart as its user has it: the LoRA named by its absolute path in the models folder
    quickstart = tmp_path / "project" / "quickstart.yaml"
    quickstart.parent.mkdir()
    quickstart.write_text((WORKFLOWS / "quickstart.yaml").read_text().replace("loras/purple_star.safetensors",
                                                                                 str(lora)))
    folders = ["--models-dir", str(models)]
    converted = tmp_path / "shared" / "quickstart_api.json"
    assert main(["convert", str(quickstart), "--to", "comfyui-api", "-o", str(converted), *folders]) == 0
    prompt = json.loads(converted.read_text())
    assert [n["inputs"]["path"] for n in prompt.values() if n["class_type"].endswith("LoadLoRA")] == [
        "purple_star.safetensors"]  # as ComfyUI lists it in its loras choices
    elsewhere = tmp_path / "another_machine"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert main(["run", str(converted), *folders, "--output-dir", str(tmp_path / "converted")]) == 0
    for name, pixels in _pixels([str(p) for p in (tmp_path / "converted").rglob("*.png")]).items():
        assert np.array_equal(pixels, reference[name]), name
    assert len(reference) == 4  # the grid and the blue square's three pictures
    # our chunk, ComfyUI's prompt and graph, A1111's parameters: the run resolved the name to the file's
    # absolute path, and wrote the name back
    texts = _chunk_texts(tmp_path / "converted")
    assert not [text for text in texts if str(models) in text or str(models.resolve()) in text]
    assert sum('"purple_star.safetensors"' in text for text in texts) == 4 * 3  # 4 PNGs, 3 workflow chunks
