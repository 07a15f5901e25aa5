"""Inside ComfyUI (stand-ins of its modules), training is what it is headless: keyed by our declared
inputs from ComfyUI's prompt, taken from the disk cache when queued again, resumed after a stop;
SaveLoRA writes where LoadLoRA lists; path inputs take any existing path; TrainLoRA's seed has no control."""

import inspect
import logging
import sys
import types

import pytest
import torch
from conftest import EXAMPLE_LORA, WORKFLOWS

from lora_nodes.comfyui.pack import NODE_CLASS_MAPPINGS as MAPPINGS
from lora_nodes.engine.scheduler import Runner, execution_order
from lora_nodes.graph import load_workflow
from lora_nodes.graph.comfy.ui import from_ui
from lora_nodes.graph.comfy.ui_write import to_ui
from lora_nodes.graph.validate import bind
from lora_nodes.nodes import catalogue

DATASET = WORKFLOWS / "datasets" / "purple_star"


class Interrupted(Exception):
    """ComfyUI's InterruptProcessingException, as its stand-in raises it."""


class ComfyHost:
    """Stand-ins of ComfyUI's folder_paths, comfy.utils and comfy.model_management over a ComfyUI folder."""

    def __init__(self, root):
        self.root = root
        self.interrupt_at: int | None = None  # the progress value at which the user presses Cancel
        self.progress: list[tuple[int, int]] = []
        for folder in ("output", "input", "models/loras", "models/checkpoints"):
            (root / folder).mkdir(parents=True, exist_ok=True)

    def modules(self) -> dict[str, types.ModuleType]:
        root, host = self.root, self
        folder_paths = types.ModuleType("folder_paths")
        folder_paths.get_output_directory = lambda: str(root / "output")
        folder_paths.get_input_directory = lambda: str(root / "input")
        folder_paths.get_folder_paths = lambda kind: [str(root / "models" / kind)]
        folder_paths.get_filename_list = lambda kind: sorted(
            str(p.relative_to(root / "models" / kind)) for p in (root / "models" / kind).rglob("*") if p.is_file())
        folder_paths.get_full_path = lambda kind, name: (
            str(root / "models" / kind / name) if (root / "models" / kind / name).is_file() else None)

        class Bar:
            def __init__(self, total):
                pass

            def update_absolute(self, value, total):
                host.progress.append((value, total))

        def throw_exception_if_processing_interrupted():
            # Cancel pressed once the bar showed interrupt_at: the next check raises
            if host.interrupt_at is not None and host.progress and host.progress[-1][0] >= host.interrupt_at:
                host.interrupt_at = None
                raise Interrupted("Processing interrupted")

        comfy = types.ModuleType("comfy")
        comfy.utils = types.SimpleNamespace(ProgressBar=Bar)
        comfy.model_management = types.SimpleNamespace(
            throw_exception_if_processing_interrupted=throw_exception_if_processing_interrupted)
        return {"folder_paths": folder_paths, "comfy": comfy, "comfy.utils": comfy.utils,
                "comfy.model_management": comfy.model_management}


@pytest.fixture
def comfy(monkeypatch, tmp_path):
    host = ComfyHost(tmp_path / "ComfyUI")
    for name, module in host.modules().items():
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.delenv("LORA_NODES_CACHE_DIR", raising=False)
    return host


def queue(prompt: dict) -> dict[str, tuple]:
    """Run an API prompt through the pack's classes as ComfyUI's executor calls them: inputs from the
    prompt (links replaced by upstream results), hidden inputs filled in, output nodes and what they need.
    Nothing is kept between calls, like a ComfyUI restarted (its own cache empty)."""
    results: dict[str, tuple] = {}

    def run(node_id: str) -> tuple:
        if node_id not in results:
            entry = prompt[node_id]
            inputs = {name: run(value[0])[value[1]] if isinstance(value, list) else value
                      for name, value in entry["inputs"].items()}
            cls = MAPPINGS[entry["class_type"]]
            out = getattr(cls(), cls.FUNCTION)(**inputs, comfy_prompt=prompt, comfy_node_id=node_id,
                                               comfy_extra_pnginfo={"workflow": {}})
            results[node_id] = out["result"] if isinstance(out, dict) else out
        return results[node_id]

    for node_id, entry in prompt.items():
        if MAPPINGS[entry["class_type"]].OUTPUT_NODE:
            run(node_id)
    return results


def with_every_widget(prompt: dict) -> dict:
    """``prompt`` as ComfyUI's editor sends it: every required widget set (to its default where not given)."""
    for entry in prompt.values():
        for name, (_, options) in MAPPINGS[entry["class_type"]].INPUT_TYPES()["required"].items():
            if "default" in options:
                entry["inputs"].setdefault(name, options["default"])
    return prompt


def training_prompt(steps: int = 2, save_every: int = 0, lora_path: str = "trained") -> dict:
    """Load a base and a dataset, train, save: an API prompt as ComfyUI's editor sends it (every widget set)."""
    return with_every_widget({
        "1": {"class_type": "lora-nodes.LoadBase", "inputs": {"source": "builtin:tiny", "dtype": "auto",
                                                              "device": "cpu", "config": ""}},
        "2": {"class_type": "lora-nodes.LoadDataset", "inputs": {"path": str(DATASET), "resolution": 32}},
        "3": {"class_type": "lora-nodes.TrainLoRA", "inputs": {
            "model": ["1", 0], "dataset": ["2", 0], "steps": steps, "rank": 2, "learning_rate": 1e-3, "seed": 5,
            "save_every_n_steps": save_every, "name": "star"}},
        "4": {"class_type": "lora-nodes.SaveLoRA", "inputs": {"lora": ["3", 0], "path": lora_path,
                                                              "model": ["1", 0]}},
    })


def lora_tensors(lora) -> dict[str, torch.Tensor]:
    return {f"{name}.{part}": getattr(module, part) for name, module in lora.modules.items() for part in ("up", "down")}


def test_a_training_queued_again_comes_from_the_disk_cache_and_its_lora_is_listed(comfy, caplog):
    prompt = training_prompt()
    first = queue(prompt)
    assert comfy.progress[-1] == (2, 2)  # it trained: both steps on ComfyUI's bar
    cache = comfy.root / "cache" / "lora-nodes"  # beside ComfyUI's output folder
    assert list((cache / "results" / "TrainLoRA").iterdir())
    saved = comfy.root / "models" / "loras" / "trained.safetensors"
    assert saved.is_file() and not list((comfy.root / "output").rglob("*.safetensors"))
    assert "trained.safetensors" in MAPPINGS["lora-nodes.LoadLoRA"].INPUT_TYPES()["required"]["path"][0]

    comfy.progress.clear()
    with caplog.at_level(logging.INFO, logger="lora_nodes"):
        second = queue(prompt)  # a new ComfyUI process: only our disk cache knows the LoRA
    assert comfy.progress == []  # no training step ran
    assert any("node 3 (TrainLoRA): cached on disk" in r.getMessage() for r in caplog.records), caplog.text
    expected, got = lora_tensors(first["3"][0]), lora_tensors(second["3"][0])
    assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected)
    assert saved.is_file()  # SaveLoRA found its own file again: no "already exists"

    (lora, _) = queue(with_every_widget({
        "9": {"class_type": "lora-nodes.LoadLoRA", "inputs": {"path": "trained.safetensors"}},
        "10": {"class_type": "lora-nodes.SaveLoRA", "inputs": {"lora": ["9", 0], "path": "copy"}}}))["9"]
    loaded = lora_tensors(lora)
    assert loaded.keys() == expected.keys() and all(torch.allclose(loaded[k], expected[k]) for k in expected)


def test_a_stopped_training_resumes_from_its_checkpoint(comfy, caplog):
    prompt = training_prompt(steps=3, save_every=1)
    comfy.interrupt_at = 1  # Cancel pressed once step 1 shows: seen at the next check, in step 2's report
    with pytest.raises(Interrupted):
        queue(prompt)
    checkpoints = comfy.root / "cache" / "lora-nodes" / "checkpoints" / "TrainLoRA"
    assert list(checkpoints.rglob("*")), "the stopped run left no checkpoint"
    comfy.progress.clear()
    with caplog.at_level(logging.INFO, logger="lora_nodes"):
        queue(prompt)
    # step 2's checkpoint was written before its report, where Cancel was seen: only step 3 is left
    assert [value for value, _ in comfy.progress] == [3]
    assert any("resumed from the checkpoint at step 2 of 3" in r.getMessage() for r in caplog.records), caplog.text


def test_the_pack_keys_a_prompt_as_a_headless_run_of_the_same_prompt(comfy, tmp_path):
    """One rule, two hosts: the same API prompt keys every node the same (so either host's cache serves both)."""
    import json

    from lora_nodes.comfyui.pack import cache_key

    prompt = training_prompt()
    path = tmp_path / "prompt.json"
    path.write_text(json.dumps(prompt))
    runner = Runner(output_dir=tmp_path / "out", cache_dir=tmp_path / "cache")
    bound = bind(load_workflow(path), runner.catalogue)
    headless: dict[str, str] = {}
    for node_id in execution_order(bound):
        headless[node_id] = runner._key(bound[node_id], headless)
    specs = catalogue()
    assert {n: cache_key(specs[e["class_type"]], prompt, n) for n, e in prompt.items()} == headless
    assert len(set(headless.values())) == 4


def test_a_node_after_one_we_do_not_know_runs_without_the_cache_said_once(comfy, caplog):
    from lora_nodes.comfyui.pack import cache_key

    prompt = training_prompt()
    prompt["2"]["class_type"] = "SomePack.DatasetLoader"
    spec = catalogue()["TrainLoRA"]
    with caplog.at_level(logging.INFO, logger="lora_nodes"):
        assert cache_key(spec, prompt, "3") == "" and cache_key(spec, prompt, "3") == ""
    told = [r.getMessage() for r in caplog.records if "SomePack.DatasetLoader" in r.getMessage()]
    assert len(told) == 1 and "without the disk cache and checkpoints" in told[0]
    # ComfyUI's own SaveLoRA is not ours: an id without our prefix is only one of the core nodes we declare
    prompt["2"]["class_type"] = "LoadDataset"
    assert cache_key(spec, prompt, "3") == ""
    assert cache_key(spec, training_prompt(), "3") != ""


def test_a_changed_input_or_dataset_file_changes_the_key(comfy, tmp_path):
    import shutil

    from lora_nodes.comfyui.pack import cache_key

    spec = catalogue()["TrainLoRA"]
    prompt = training_prompt()
    key = cache_key(spec, prompt, "3")
    prompt["3"]["inputs"]["save_every_n_steps"] = 50  # how the work is done, not what it makes
    assert cache_key(spec, prompt, "3") == key
    prompt["3"]["inputs"]["seed"] = 6
    assert cache_key(spec, prompt, "3") != key
    moved = training_prompt()
    moved["2"]["inputs"]["path"] = "stars"  # a relative dataset is ComfyUI's input folder's
    shutil.copytree(DATASET, comfy.root / "input" / "stars")
    assert cache_key(spec, moved, "3") == key  # the same files elsewhere: the dataset is keyed by content
    (comfy.root / "input" / "stars" / "star_01.txt").write_text("a green star")
    assert cache_key(spec, moved, "3") != key


def test_trainloras_seed_has_no_control_and_samples_keeps_its_own():
    train_seed = MAPPINGS["lora-nodes.TrainLoRA"].INPUT_TYPES()["required"]["seed"][1]
    sample_seed = MAPPINGS["lora-nodes.Sample"].INPUT_TYPES()["required"]["seed"][1]
    # the editor adds a control to an INT named seed unless the options say false explicitly
    assert train_seed["control_after_generate"] is False and sample_seed["control_after_generate"] is True
    assert "control_after_generate" not in MAPPINGS["lora-nodes.TrainLoRA"].INPUT_TYPES()["required"]["steps"][1]


def test_ui_files_write_no_control_after_trainloras_seed_and_old_files_with_one_still_read(tmp_path):
    import json

    specs = catalogue()
    widgets = [w.name for w in specs["TrainLoRA"].inputs if not w.is_link]
    prompt = {"1": {"class_type": "lora-nodes.LoadBase", "inputs": {"source": "builtin:tiny"}},
              "2": {"class_type": "lora-nodes.LoadDataset", "inputs": {"path": str(DATASET)}},
              "3": {"class_type": "lora-nodes.TrainLoRA", "inputs": {"model": ["1", 0], "dataset": ["2", 0],
                                                                     "seed": 7, "min_snr_gamma": 5.0}},
              "4": {"class_type": "lora-nodes.SaveLoRA", "inputs": {"lora": ["3", 0]}}}
    path = tmp_path / "prompt.json"
    path.write_text(json.dumps(prompt))
    ui = to_ui(load_workflow(path), specs)
    train = next(n for n in ui["nodes"] if n["type"] == "lora-nodes.TrainLoRA")
    values, seed_at = train["widgets_values"], widgets.index("seed")
    assert len(values) == len(widgets)  # one value per widget: no control value anywhere
    assert values[seed_at] == 7 and widgets[seed_at + 1] == "min_snr_gamma" and values[seed_at + 1] == 5.0
    # a file saved while the seed still had its control: the control value after it is skipped
    train["widgets_values"] = [*values[:seed_at + 1], "randomize", *values[seed_at + 1:]]
    read = from_ui(ui, tmp_path, specs).nodes[str(train["id"])].inputs
    assert read["seed"] == 7 and read["min_snr_gamma"] == 5.0 and read[widgets[-1]] == values[-1]


def test_path_inputs_take_a_listed_name_a_builtin_or_any_existing_path(comfy, tmp_path):
    """ComfyUI checks a choice against its list unless VALIDATE_INPUTS takes the input by name: ours does,
    for the path inputs offered as choices only (every other input keeps ComfyUI's checks)."""
    load_base = MAPPINGS["lora-nodes.LoadBase"]
    spec = inspect.getfullargspec(load_base.VALIDATE_INPUTS)
    assert spec.args[1:] == ["source"] and spec.varkw is None  # ComfyUI's rule: only inputs named here
    (comfy.root / "models" / "checkpoints" / "sd15.safetensors").write_bytes(b"x")
    pipeline = tmp_path / "my-pipeline"
    pipeline.mkdir()
    validate = load_base.VALIDATE_INPUTS
    assert validate(source="sd15.safetensors") is True
    assert validate(source="builtin:tiny") is True
    assert validate(source=str(pipeline)) is True  # typed into an API prompt: not in the list, but there
    message = validate(source="missing.safetensors")
    assert isinstance(message, str) and "missing.safetensors" in message and "full path" in message
    assert validate(source=None) is True  # a linked value is not known at validation: the node tells
    assert MAPPINGS["lora-nodes.LoadLoRA"].VALIDATE_INPUTS(path=str(pipeline)) is True
    assert not hasattr(MAPPINGS["lora-nodes.Sample"], "VALIDATE_INPUTS")


def test_saveloras_default_file_is_in_the_output_folder_headless(tmp_path):
    workflow = tmp_path / "w.yaml"
    workflow.write_text(f"""
nodes:
  lora: {{type: LoadLoRA, inputs: {{path: "{EXAMPLE_LORA}"}}}}
  save: {{type: SaveLoRA, inputs: {{lora: [lora, lora]}}}}
""")
    result = Runner(output_dir=tmp_path / "out", cache_dir=tmp_path / "cache").run(load_workflow(workflow))
    assert result.files == [str((tmp_path / "out" / "lora.safetensors").resolve())]
