"""Running workflows: only what outputs need, cached by key, sweeps share nodes, errors name the node."""

import gc
import json
import shutil
import weakref

import numpy as np
import pytest
from conftest import EXAMPLE_LORA, write_workflow
from PIL import Image

from lora_nodes.cli import main
from lora_nodes.engine.events import Collector
from lora_nodes.engine.scheduler import Runner
from lora_nodes.graph import load_workflow
from lora_nodes.graph.overrides import parse_set, parse_sweep, sweep_variants

WORKFLOW = """
format: lora-nodes/1
nodes:
  base:   {type: LoadBase}
  lora:   {type: LoadLoRA, inputs: {path: style.safetensors}}
  styled: {type: ApplyLoRA, inputs: {model: [base, model], lora: [lora, lora], strength_model: 0.8}}
  images: {type: Sample, inputs: {model: [styled, model], prompt: "a red circle", seed: 1, steps: 3}}
  unused: {type: Sample, inputs: {model: [base, model], prompt: "never drawn", steps: 3}}
  save:   {type: SaveImages, inputs: {images: [images, images], prefix: run}}
"""


def setup_folder(tmp_path):
    shutil.copy(EXAMPLE_LORA, tmp_path / "style.safetensors")
    return write_workflow(tmp_path, WORKFLOW)


def executed(events):
    return [e["node"] for e in events.of("executing")]


def test_only_needed_nodes_run_and_reruns_are_cached(tmp_path):
    events = Collector()
    runner = Runner(output_dir=tmp_path / "out", emit=events)
    workflow = load_workflow(setup_folder(tmp_path))
    first = runner.run(workflow)
    assert "unused" not in first.executed and set(first.executed) == {"base", "lora", "styled", "images", "save"}
    assert runner.run(workflow).executed == []
    changed = workflow.copy()
    changed.nodes["images"].inputs["seed"] = 2
    assert runner.run(changed).executed == ["images", "save"]


def test_a_changed_file_is_read_again(tmp_path):
    runner = Runner(output_dir=tmp_path / "out")
    path = setup_folder(tmp_path)
    runner.run(load_workflow(path))
    lora_file = tmp_path / "style.safetensors"
    data = bytearray(lora_file.read_bytes())
    lora_file.write_bytes(bytes(data))  # same content, new mtime
    assert "lora" in runner.run(load_workflow(path)).executed


def test_sweep_loads_the_base_once_and_keeps_outputs_apart(tmp_path):
    events = Collector()
    runner = Runner(output_dir=tmp_path / "out", emit=events)
    variants = sweep_variants([parse_sweep("styled.strength_model=0,0.5,1"), parse_sweep("images.seed=1,2")])
    results = runner.run_variants(load_workflow(setup_folder(tmp_path)), variants)
    assert len(results) == 6
    assert executed(events).count("base") == 1 and executed(events).count("lora") == 1
    files = [f for r in results for f in r.files]
    assert len(set(files)) == 6
    assert any("styled.strength_model=0.5_images.seed=2" in f for f in files)


def test_relative_paths_follow_the_workflow_file_and_set_paths_follow_cwd(tmp_path, monkeypatch, capsys):
    path = setup_folder(tmp_path / "project") if (tmp_path / "project").mkdir() is None else None
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert main(["run", str(path), "--output-dir", "out"]) == 0
    assert len(list((elsewhere / "out").glob("run_*.png"))) == 1
    shutil.copy(EXAMPLE_LORA, elsewhere / "mine.safetensors")
    assert main(["validate", str(path), "--set", "lora.path=mine.safetensors"]) == 0
    assert main(["validate", str(path), "--set", "lora.path=nope.safetensors"]) == 2


def test_events_jsonl(tmp_path, capsys):
    path = setup_folder(tmp_path)
    assert main(["run", str(path), "--output-dir", str(tmp_path / "out"), "--events", "jsonl"]) == 0
    events = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    kinds = [e["event"] for e in events]
    assert kinds[0] == "run_start" and kinds[-1] == "run_end"
    assert {"executing", "progress", "executed"} <= set(kinds)
    progress = [e for e in events if e["event"] == "progress"]
    assert progress[-1] == {"event": "progress", "node": "images", "value": 3, "max": 3}
    saved = next(e for e in events if e["event"] == "executed" and e["node"] == "save")
    assert saved["files"] and saved["files"][0].endswith("run_00001.png")


def test_cached_event_in_one_process(tmp_path):
    events = Collector()
    runner = Runner(output_dir=tmp_path / "out", emit=events)
    workflow = load_workflow(setup_folder(tmp_path))
    runner.run(workflow)
    runner.run(workflow)
    assert {e["node"] for e in events.of("cached")} == {"base", "lora", "styled", "images", "save"}


FAILING = """
nodes:
  base:   {type: LoadBase}
  images: {type: Sample, inputs: {model: [base, model], prompt: "x", steps: 2}}
  a_save: {type: SaveImages, inputs: {images: [images, images], prefix: kept}}
  z_lora: {type: LoadLoRA, inputs: {path: broken.safetensors}}
  z_apply: {type: ApplyLoRA, inputs: {model: [base, model], lora: [z_lora, lora]}}
  z_images: {type: Sample, inputs: {model: [z_apply, model], prompt: "x", steps: 2}}
  z_save: {type: SaveImages, inputs: {images: [z_images, images], prefix: never}}
"""


def write_nan_lora(folder):
    """A LoRA whose header is sound (so validation passes) and whose weights are NaN: it fails at load."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(EXAMPLE_LORA))
    tensors = {k: v.fill_(float("nan")) if k.endswith("lora_up.weight") else v for k, v in tensors.items()}
    save_file(tensors, str(folder / "broken.safetensors"))


def test_a_failing_node_exits_1_names_itself_and_keeps_written_files(tmp_path, capsys):
    write_nan_lora(tmp_path)
    path = write_workflow(tmp_path, FAILING)
    out = tmp_path / "out"
    assert main(["run", str(path), "--output-dir", str(out), "--events", "jsonl"]) == 1
    events = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    error = next(e for e in events if e["event"] == "error")
    assert error["node"] == "z_lora" and error["type"] == "LoadLoRA" and "broken.safetensors" in error["message"]
    assert [p.name for p in out.iterdir()] == ["kept_00001.png"]  # no temporary or partial files
    assert main(["run", str(path), "--output-dir", str(out)]) == 1
    assert "node 'z_lora' (LoadLoRA) failed" in capsys.readouterr().err


def test_same_graph_in_yaml_json_and_comfyui_api_format_gives_the_same_image(tmp_path):
    yaml_path = setup_folder(tmp_path)
    workflow = load_workflow(yaml_path)
    (tmp_path / "w.json").write_text(json.dumps(workflow.to_dict()))
    ids = {name: str(i) for i, name in enumerate(workflow.nodes, start=3)}
    api = {ids[n]: {"class_type": c.type, "inputs": {k: [ids[v.node], v.output] if hasattr(v, "node") else v
                                                       for k, v in c.inputs.items()}}
           for n, c in workflow.nodes.items()}
    (tmp_path / "api.json").write_text(json.dumps(api))
    pixels = []
    for name in ("workflow.yaml", "w.json", "api.json"):
        result = Runner(output_dir=tmp_path / f"out_{name}").run(load_workflow(tmp_path / name))
        pixels.append(np.asarray(Image.open(result.files[0])))
    assert np.array_equal(pixels[0], pixels[1]) and np.array_equal(pixels[0], pixels[2])


def test_a_png_reruns_its_embedded_workflow(tmp_path, monkeypatch):
    path = setup_folder(tmp_path)
    first = Runner(output_dir=tmp_path / "a").run(load_workflow(path), ).files[0]
    embedded = json.loads(Image.open(first).info["lora-nodes"])
    assert embedded["nodes"]["styled"]["inputs"]["strength_model"] == 0.8
    monkeypatch.chdir(tmp_path / "a")
    assert main(["run", first, "--output-dir", str(tmp_path / "b")]) == 0
    again = next((tmp_path / "b").glob("*.png"))
    assert np.array_equal(np.asarray(Image.open(first)), np.asarray(Image.open(again)))


def test_outputs_are_never_overwritten(tmp_path):
    path = setup_folder(tmp_path)
    for _ in range(2):
        Runner(output_dir=tmp_path / "out").run(load_workflow(path))
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["run_00001.png", "run_00002.png"]


def test_override_parsing():
    assert parse_set("images.prompt=a blue star").value == "a blue star"
    assert parse_set("styled.strength_model=0.25").value == 0.25
    assert [o.value for o in parse_sweep("images.prompt=[a, b c]")] == ["a", "b c"]
    assert [o.value for o in parse_sweep("images.seed=1,2,3")] == [1, 2, 3]


def test_run_end_follows_a_failure(tmp_path, capsys):
    write_nan_lora(tmp_path)
    path = write_workflow(tmp_path, FAILING)
    assert main(["run", str(path), "--output-dir", str(tmp_path / "out"), "--events", "jsonl"]) == 1
    last = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert last["event"] == "run_end" and last["ok"] is False and last["files"]


def test_nodes_never_write_outside_the_output_folder(tmp_path, capsys):
    precious = tmp_path / "out" / "precious.txt"
    precious.parent.mkdir()
    precious.write_text("keep me")
    for bad in ("../escape", str(tmp_path / "abs"), str(tmp_path / "out" / "abs"), "."):
        text = WORKFLOW.replace("prefix: run", f"prefix: '{bad}'")
        path = write_workflow(tmp_path, text)
        shutil.copy(EXAMPLE_LORA, tmp_path / "style.safetensors")
        assert main(["run", str(path), "--output-dir", str(tmp_path / "out")]) == 2  # found before anything runs
        err = capsys.readouterr().err
        assert "is outside the output folder" in err or "names the output folder itself" in err
    model = write_workflow(tmp_path, "nodes:\n  b: {type: LoadBase}\n  s: {type: SaveModel, inputs: {model: [b, model], "
                           "path: '.', overwrite: true}}\n", "model.yaml")
    assert main(["run", str(model), "--output-dir", str(tmp_path / "out")]) == 2
    assert precious.read_text() == "keep me" and sorted(p.name for p in precious.parent.iterdir()) == ["precious.txt"]


def test_a_symlink_inside_the_output_folder_cannot_lead_out(tmp_path, capsys):
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "link").symlink_to(outside, target_is_directory=True)
    path = write_workflow(tmp_path, WORKFLOW.replace("prefix: run", "prefix: link/x"))
    shutil.copy(EXAMPLE_LORA, tmp_path / "style.safetensors")
    assert main(["run", str(path), "--output-dir", str(tmp_path / "out")]) == 1  # only the resolved path tells
    assert "outside the output folder" in capsys.readouterr().err and not any(outside.iterdir())


def test_bad_override_yaml_is_invalid_input_not_a_crash(tmp_path, capsys):
    path = setup_folder(tmp_path)
    assert main(["validate", str(path), "--set", "styled.strength_model=["]) == 2
    assert main(["run", str(path), "--sweep", "styled.strength_model=0,[1"]) == 2
    assert "bad_override" in capsys.readouterr().err
    assert main(["validate", str(path), "--set", "images.width=30"]) == 2
    assert "not a multiple of 8" in capsys.readouterr().err


TWO_DRAWINGS = """
format: lora-nodes/1
nodes:
  base:   {type: LoadBase}
  lora:   {type: LoadLoRA, inputs: {path: style.safetensors}}
  styled: {type: ApplyLoRA, inputs: {model: [base, model], lora: [lora, lora], strength_model: 0.8}}
  FIRST:  {type: Sample, inputs: {model: [styled, model], prompt: "a red circle", seed: 1, steps: 2}}
  SECOND: {type: Sample, inputs: {model: [base, model], prompt: "a red circle", seed: 1, steps: 2}}
  save_a: {type: SaveImages, inputs: {images: [FIRST, images], prefix: styled}}
  save_b: {type: SaveImages, inputs: {images: [SECOND, images], prefix: plain}}
"""


def test_a_run_from_the_command_line_draws_what_a_kept_runner_draws(tmp_path):
    """`lora-nodes run` patches weights in place for their last use (nothing is kept after it): with
    the styled model drawn first or last, its pictures equal those of a runner that keeps its models."""
    shutil.copy(EXAMPLE_LORA, tmp_path / "style.safetensors")
    for first, second in (("a_styled", "b_plain"), ("b_styled", "a_plain")):
        path = write_workflow(tmp_path, TWO_DRAWINGS.replace("FIRST", first).replace("SECOND", second))
        cli_out, kept_out = tmp_path / f"cli_{first}", tmp_path / f"kept_{first}"
        assert main(["run", str(path), "--output-dir", str(cli_out)]) == 0
        Runner(output_dir=kept_out).run(load_workflow(path))
        for name in ("styled_00001.png", "plain_00001.png"):
            assert np.array_equal(np.asarray(Image.open(cli_out / name)), np.asarray(Image.open(kept_out / name)))
        styled, plain = (np.asarray(Image.open(cli_out / n)).astype(int) for n in ("styled_00001.png", "plain_00001.png"))
        assert np.abs(styled - plain).mean() > 1  # the LoRA shows


def test_a_one_shot_runner_runs_once(tmp_path):
    runner = Runner(output_dir=tmp_path / "out", one_shot=True)
    workflow = load_workflow(setup_folder(tmp_path))
    runner.run(workflow)
    with pytest.raises(RuntimeError, match="one-shot"):
        runner.run(workflow)


def test_a_runner_forgets_the_least_recent_runs_results_first_and_never_the_last_runs(tmp_path):
    """What a long-lived process (the server) drops while memory is short: run longest ago first."""
    def copying(lora: str) -> object:
        return load_workflow(write_workflow(tmp_path, (
            "format: lora-nodes/1\nnodes:\n"
            f"  lora: {{type: LoadLoRA, inputs: {{path: '{EXAMPLE_LORA.with_name(lora)}'}}}}\n"
            f"  save: {{type: SaveLoRA, inputs: {{lora: [lora, lora], path: '{lora}'}}}}\n"), f"{lora}.yaml"))

    first, second, third = (copying(name) for name in
                            ("tiny_style.safetensors", "shapes_style.safetensors", "purple_star.safetensors"))
    runner = Runner(output_dir=tmp_path / "out", cache_dir=tmp_path / "cache")
    loaded = {}
    for workflow in (first, second, third, first):  # the first again: now the most recent
        loaded[id(workflow)] = weakref.ref(runner.run(workflow).outputs["lora"][0])
    assert runner.forget_oldest_results()  # the second's: run longest ago
    gc.collect()
    assert loaded[id(second)]() is None and loaded[id(third)]() is not None  # its memory is free again
    assert runner.run(third).executed == []
    assert runner.run(second).executed == ["lora", "save"]
    while runner.forget_oldest_results():
        pass
    assert runner.run(second).executed == []  # the last run's results stay
    assert runner.run(first).executed == ["lora", "save"]
