"""The repository loads as a ComfyUI custom-node pack, the way ComfyUI loads custom_nodes/ folders."""

import importlib.util
import subprocess
import sys
import types

import pytest
import torch
from conftest import EXAMPLE_LORA, REPO

from lora_nodes.nodes import catalogue


def load_pack(folder, name):
    """Import a folder as a package from its path, as ComfyUI's custom-node loader does."""
    spec = importlib.util.spec_from_file_location(name, folder / "__init__.py",
                                                  submodule_search_locations=[str(folder)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def call(mappings, node_id, **inputs):
    cls = mappings[node_id]
    types_ = cls.INPUT_TYPES()
    assert set(inputs) <= set(types_["required"]) | set(types_.get("optional", {})) | set(types_.get("hidden", {}))
    for name, (kind, options) in types_["required"].items():  # fill widget defaults, as the editor does
        if name not in inputs and "default" in options:
            inputs[name] = options["default"]
    return getattr(cls(), cls.FUNCTION)(**inputs)


@pytest.fixture(scope="module")
def pack():
    return load_pack(REPO, "lora-nodes-pack")


def test_pack_registers_every_node_with_namespaced_ids_and_classic_attributes(pack):
    mappings = pack.NODE_CLASS_MAPPINGS
    # ours only: ComfyUI's own core nodes (which we also run headless) are ComfyUI's to register
    assert set(mappings) == {spec.comfy_id for spec in catalogue().values() if not spec.comfy_core}
    assert set(pack.NODE_DISPLAY_NAME_MAPPINGS) == set(mappings)
    sample = mappings["lora-nodes.Sample"]
    assert sample.RETURN_TYPES == ("IMAGE",) and sample.RETURN_NAMES == ("images",)
    assert sample.FUNCTION == "run" and sample.CATEGORY == "lora-nodes/sampling" and sample.DESCRIPTION
    assert sample.OUTPUT_TOOLTIPS and sample.OUTPUT_NODE is False
    assert mappings["lora-nodes.SaveImages"].OUTPUT_NODE is True
    seed = sample.INPUT_TYPES()["required"]["seed"]
    assert seed[0] == "INT" and seed[1]["control_after_generate"] is True
    # only the bridge nodes (lora_nodes.nodes.bridge) take or give ComfyUI's own model types
    comfy_types = {"MODEL", "CLIP", "VAE", "LATENT", "CONDITIONING"}
    bridges = {spec.comfy_id for spec in catalogue().values() if spec.run.__module__.endswith(".bridge")}
    for node_id, cls in mappings.items():
        declared = {v[0] for group in ("required", "optional") for v in cls.INPUT_TYPES()[group].values()
                    if isinstance(v[0], str)}
        assert node_id in bridges or not comfy_types & (declared | set(cls.RETURN_TYPES)), node_id


def test_graph_runs_through_the_pack(pack):
    mappings = pack.NODE_CLASS_MAPPINGS
    (model,) = call(mappings, "lora-nodes.LoadBase", source="builtin:tiny", device="cpu")
    lora, _ = call(mappings, "lora-nodes.LoadLoRA", path=str(EXAMPLE_LORA))
    (styled,) = call(mappings, "lora-nodes.ApplyLoRA", model=model, lora=lora, strength_model=0.8)
    (images,) = call(mappings, "lora-nodes.Sample", model=styled, prompt="a red circle", steps=3, batch_size=2)
    assert images.shape == (2, 32, 32, 3) and images.dtype == torch.float32
    assert 0.0 <= images.min() and images.max() <= 1.0


def test_importing_the_pack_is_cheap_and_needs_no_comfyui():
    code = ("import sys, importlib.util; "
            f"spec = importlib.util.spec_from_file_location('pack', r'{REPO / '__init__.py'}', "
            f"submodule_search_locations=[r'{REPO}']); m = importlib.util.module_from_spec(spec); "
            "sys.modules['pack'] = m; spec.loader.exec_module(m); "
            "print(len(m.NODE_CLASS_MAPPINGS), [x for x in ('comfy', 'folder_paths', 'diffusers', 'transformers') "
            "if x in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert int(out[0]) == sum(not spec.comfy_core for spec in catalogue().values()) and out[1] == "[]"


def test_linking_the_installed_package_works_too(tmp_path):
    import lora_nodes

    custom_nodes = tmp_path / "custom_nodes"
    custom_nodes.mkdir()
    (custom_nodes / "lora_nodes").symlink_to(REPO / "lora_nodes" if (REPO / "lora_nodes").exists()
                                              else lora_nodes.__path__[0])
    module = load_pack(custom_nodes / "lora_nodes", "linked_lora_nodes")
    assert "lora-nodes.ApplyLoRA" in module.NODE_CLASS_MAPPINGS


def test_comfyui_hooks_are_used_when_present(monkeypatch, tmp_path, pack):
    """folder_paths offers files as choices and resolves them; the progress bar and interrupt are called."""
    lora_dir = tmp_path / "loras"
    lora_dir.mkdir()
    (lora_dir / "style.safetensors").write_bytes(EXAMPLE_LORA.read_bytes())
    folder_paths = types.SimpleNamespace(
        get_filename_list=lambda folder: ["style.safetensors"] if folder == "loras" else ["sd15.safetensors"],
        get_full_path=lambda folder, name: str(lora_dir / name) if folder == "loras" else None,
        get_output_directory=lambda: str(tmp_path / "output"),
    )
    calls = []

    class Bar:
        def __init__(self, total):
            calls.append(("bar", total))

        def update_absolute(self, value, total):
            calls.append(("update", value, total))

    comfy = types.ModuleType("comfy")
    comfy.utils = types.SimpleNamespace(ProgressBar=Bar)
    comfy.model_management = types.SimpleNamespace(
        throw_exception_if_processing_interrupted=lambda: calls.append(("interrupt?",)))
    for name, module in {"folder_paths": folder_paths, "comfy": comfy, "comfy.utils": comfy.utils,
                         "comfy.model_management": comfy.model_management}.items():
        monkeypatch.setitem(sys.modules, name, module)
    mappings = pack.NODE_CLASS_MAPPINGS
    assert mappings["lora-nodes.LoadLoRA"].INPUT_TYPES()["required"]["path"][0] == ["style.safetensors"]
    assert mappings["lora-nodes.LoadBase"].INPUT_TYPES()["required"]["source"][0][-1] == "sd15.safetensors"
    (model,) = call(mappings, "lora-nodes.LoadBase", source="builtin:tiny", device="cpu")
    lora, _ = call(mappings, "lora-nodes.LoadLoRA", path="style.safetensors")
    (styled,) = call(mappings, "lora-nodes.ApplyLoRA", model=model, lora=lora)
    (images,) = call(mappings, "lora-nodes.Sample", model=styled, prompt="x", steps=2)
    assert ("bar", 2) in calls and ("update", 2, 2) in calls and ("interrupt?",) in calls
    saved = call(mappings, "lora-nodes.SaveImages", images=images, prefix="pack/test",
                 comfy_prompt={"1": {}}, comfy_extra_pnginfo={"workflow": {"nodes": []}})
    assert saved["ui"]["images"] == [{"filename": "test_00001.png", "subfolder": "pack", "type": "output"}]
    assert (tmp_path / "output" / "pack" / "test_00001.png").exists()


def test_a_lora_trains_through_the_pack_inside_comfyuis_inference_mode(pack):
    """ComfyUI executes nodes under torch.inference_mode(); a base loaded there must still train."""
    from conftest import WORKFLOWS

    mappings = pack.NODE_CLASS_MAPPINGS
    with torch.inference_mode():
        (model,) = call(mappings, "lora-nodes.LoadBase", source="builtin:tiny", device="cpu")
        (dataset,) = call(mappings, "lora-nodes.LoadDataset", path=str(WORKFLOWS / "datasets" / "purple_star"))
        lora, loss = call(mappings, "lora-nodes.TrainLoRA", model=model, dataset=dataset, steps=2, rank=2)
    assert loss.shape[0] == 1 and loss.shape[-1] == 3
    assert any(m.up.abs().sum() > 0 for m in lora.modules.values())


def test_requirements_txt_is_pyprojects_dependencies_without_torch():
    """ComfyUI users install requirements.txt into ComfyUI's environment: ours, never another torch."""
    import tomllib

    declared = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    lines = [line.strip() for line in (REPO / "requirements.txt").read_text().splitlines()]
    assert [line for line in lines if line and not line.startswith("#")] == \
        [d for d in declared if not d.startswith("torch>")]


def test_a_missing_dependency_is_one_log_line_naming_the_pip_command(tmp_path, caplog):
    from lora_nodes.comfyui import missing_requirements, report_missing_requirements

    requirements = tmp_path / "requirements.txt"
    requirements.write_text("# comment\nsafetensors>=0.4\nno-such-package-lora-nodes>=1\n\npillow\n")
    assert missing_requirements(requirements) == ["no-such-package-lora-nodes"]
    with caplog.at_level("WARNING", logger="lora_nodes"):
        report_missing_requirements(requirements)
    (record,) = caplog.records
    assert "no-such-package-lora-nodes" in record.getMessage()
    assert f"{sys.executable} -m pip install -r {requirements}" in record.getMessage()
    assert missing_requirements(tmp_path / "absent.txt") == []  # installed as a package: nothing to check


def test_log_lines_name_the_prompts_node_id(pack, caplog):
    mappings = pack.NODE_CLASS_MAPPINGS
    assert mappings["lora-nodes.Sample"].INPUT_TYPES()["hidden"]["comfy_node_id"] == "UNIQUE_ID"
    (model,) = call(mappings, "lora-nodes.LoadBase", source="builtin:tiny", device="cpu")
    with caplog.at_level("WARNING", logger="lora_nodes"):  # an init image at denoise 1 only sets the size: a warning
        call(mappings, "lora-nodes.Sample", model=model, prompt="x", steps=1, image=torch.zeros(1, 32, 32, 3),
             comfy_node_id="17")
    assert any(r.getMessage().startswith("lora-nodes: node 17 (Sample): ") for r in caplog.records), caplog.text


def test_a_relative_dataset_path_is_comfyuis_input_folders(monkeypatch, tmp_path):
    from lora_nodes.comfyui.pack import _resolve_file

    folder_paths = types.SimpleNamespace(get_input_directory=lambda: str(tmp_path / "input"),
                                         get_full_path=lambda kind, name: None)
    monkeypatch.setitem(sys.modules, "folder_paths", folder_paths)
    spec = catalogue()["LoadDataset"]
    assert _resolve_file(spec, "path", "stars") == str(tmp_path / "input" / "stars")
    assert _resolve_file(spec, "path", str(tmp_path / "elsewhere")) == str(tmp_path / "elsewhere")
    # a component file is no folder the user brings: it stays where it was (not moved into input/)
    assert _resolve_file(catalogue()["LoadBase"], "vae", "vae.safetensors") != str(tmp_path / "input" / "vae.safetensors")


def test_load_base_offers_and_loads_comfyuis_diffusers_folders(monkeypatch, tmp_path, pack, tiny):
    from lora_nodes.models.save import save_diffusers_folder

    save_diffusers_folder(tiny, tmp_path / "diffusers" / "tiny-pipeline")
    (tmp_path / "diffusers" / "not-a-pipeline").mkdir()
    folder_paths = types.SimpleNamespace(
        get_filename_list=lambda folder: ["sd15.safetensors"] if folder == "checkpoints" else [],
        get_full_path=lambda folder, name: None,
        get_folder_paths=lambda kind: [str(tmp_path / kind)],
        get_output_directory=lambda: str(tmp_path / "output"),
    )
    monkeypatch.setitem(sys.modules, "folder_paths", folder_paths)
    mappings = pack.NODE_CLASS_MAPPINGS
    choices = mappings["lora-nodes.LoadBase"].INPUT_TYPES()["required"]["source"][0]
    assert choices[-2:] == ["sd15.safetensors", "tiny-pipeline"]
    (model,) = call(mappings, "lora-nodes.LoadBase", source="tiny-pipeline", device="cpu")
    assert model.base.source == str(tmp_path / "diffusers" / "tiny-pipeline")
    assert model.base.family.id == tiny.family.id  # (the pack imports its own copy of the package)
