"""ComfyUI's UI and API formats: hand-written editor files run like their YAML twins, round trips keep the graph."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
from conftest import EXAMPLE_LORA, REPO, WORKFLOWS
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from lora_nodes import cli
from lora_nodes.engine.scheduler import Runner
from lora_nodes.graph import Link, WorkflowError, load_workflow, parse_workflow
from lora_nodes.graph.comfy.api import to_api
from lora_nodes.graph.comfy.ui import bypass_input_index, from_ui, is_ui_format
from lora_nodes.graph.comfy.ui_write import to_ui
from lora_nodes.graph.comfy.widgets import widget_inputs
from lora_nodes.graph.convert import convert
from lora_nodes.nodes import catalogue
from lora_nodes.nodes.spec import REQUIRED

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "comfyui"
TWINS = ["basic", "reroute_primitive", "muted_bypassed", "lora_stack"]
EXAMPLES = sorted(WORKFLOWS.glob("*.yaml"))


def ui_data(name: str) -> dict:
    return json.loads((FIXTURES / f"{name}.json").read_text())


def ui_workflow(data: dict):
    return from_ui(data, FIXTURES, catalogue())


def node_of(data: dict, node_id: int) -> dict:
    return next(n for n in data["nodes"] if n["id"] == node_id)


def run_pixels(workflow, out: Path, cache: Path) -> dict[str, np.ndarray]:
    """Run a workflow with a fresh runner; every PNG it wrote, by its path under ``out``."""
    result = Runner(output_dir=out, cache_dir=cache).run(workflow)
    return {Path(f).relative_to(out).as_posix(): np.asarray(Image.open(f)) for f in result.files}


def normalised(workflow, rename: dict[str, str] | None = None) -> dict[str, tuple[str, dict]]:
    """The graph with short types, defaults filled in, links as (node, output index), ids renamed."""
    cat, rename = catalogue(), rename or {}
    graph = {}
    for node_id, call in workflow.nodes.items():
        spec = cat[call.type]
        inputs = {d.name: d.default for d in spec.inputs if d.default is not REQUIRED}
        for name, value in call.inputs.items():
            if isinstance(value, Link):
                index = cat[workflow.nodes[value.node].type].output_index(value.output)
                value = ("link", rename.get(value.node, value.node), index)
            inputs[name] = value
        graph[rename.get(node_id, node_id)] = (spec.id, inputs)
    return graph


# --- UI-format files run like the YAML beside them -------------------------------------------


@pytest.mark.parametrize("name", TWINS)
def test_ui_file_runs_to_the_same_images_as_its_yaml(name, tmp_path):
    from_comfy = run_pixels(load_workflow(FIXTURES / f"{name}.json"), tmp_path / "ui", tmp_path / "cache_ui")
    from_yaml = run_pixels(load_workflow(FIXTURES / f"{name}.yaml"), tmp_path / "yaml", tmp_path / "cache_yaml")
    assert from_comfy and from_comfy.keys() == from_yaml.keys()
    for path, pixels in from_comfy.items():
        assert np.array_equal(pixels, from_yaml[path]), path


def test_widgets_values_in_input_order_with_the_seed_control_skipped():
    workflow = ui_workflow(ui_data("basic"))
    sample = workflow.nodes["4"]
    assert sample.type == "Sample"
    assert sample.inputs == {
        "model": Link("3", 0), "prompt": "a red circle", "negative_prompt": "blurry", "seed": 7, "steps": 2,
        "cfg": 6.5, "sampler": "euler_ancestral", "width": 64, "height": 64, "batch_size": 1,
    }
    assert "6" not in workflow.nodes  # the note


def test_widgets_values_without_control_values_still_map():
    data = ui_data("basic")
    node_of(data, 4)["widgets_values"].remove("randomize")
    assert ui_workflow(data).nodes["4"].inputs["steps"] == 2


def test_widgets_values_null_and_dict():
    workflow = ui_workflow(ui_data("reroute_primitive"))
    assert workflow.nodes["1"].inputs == {}  # null: every default
    assert workflow.nodes["6"].inputs["prefix"] == "primitive/blue_square"  # a dict by name
    stack = ui_workflow(ui_data("lora_stack"))
    assert stack.nodes["5"].inputs["sampler"] == "ddim" and "control_after_generate" not in stack.nodes["5"].inputs


def test_primitives_win_over_the_widget_values_and_reroutes_pass_through():
    sample = ui_workflow(ui_data("reroute_primitive")).nodes["5"].inputs
    assert sample["prompt"] == "a blue square" and sample["seed"] == 42
    assert sample["model"] == Link("1", 0)


def test_bypassed_apply_lora_hands_the_base_straight_to_sample():
    data = ui_data("muted_bypassed")
    assert ui_workflow(data).nodes["4"].inputs["model"] == Link("1", 0)
    node_of(data, 3)["mode"] = 0
    assert ui_workflow(data).nodes["4"].inputs["model"] == Link("3", 0)


def test_muted_nodes_and_the_nodes_that_need_them_are_left_out():
    workflow = ui_workflow(ui_data("muted_bypassed"))
    assert sorted(workflow.nodes) == ["1", "2", "4", "5"]  # 11 needs the muted loader 10


def test_an_output_that_needs_a_muted_node_is_reported():
    data = ui_data("muted_bypassed")
    node_of(data, 3)["mode"] = 2
    with pytest.raises(WorkflowError) as caught:
        ui_workflow(data)
    [problem] = caught.value.problems
    assert (problem.code, problem.node, problem.input) == ("muted_input", "5", "images")
    assert "node 4 (lora-nodes.Sample)" in problem.message and "node 3 (lora-nodes.ApplyLoRA)" in problem.message
    assert "muted" in problem.message


def test_a_bypass_with_no_input_of_the_type_drops_the_link():
    data = ui_data("basic")
    node_of(data, 2)["mode"] = 4  # LoadLoRA has no LN_LORA input to pass on
    with pytest.raises(WorkflowError) as caught:
        ui_workflow(data)
    assert caught.value.problems[0].code == "muted_input" and "bypassed" in caught.value.problems[0].message


def test_a_linked_widget_takes_the_link_and_falls_back_to_its_value_when_the_source_is_muted():
    data = ui_data("basic")
    node_of(data, 2)["outputs"][1]["links"] = [5]
    node_of(data, 4)["inputs"][1]["link"] = 5
    data["links"].append([5, 2, 1, 4, 1, "STRING"])
    assert ui_workflow(data).nodes["4"].inputs["prompt"] == Link("2", 1)
    node_of(data, 2)["mode"] = 2
    data["links"] = [link for link in data["links"] if link[0] != 2]
    node_of(data, 3)["mode"] = 2
    node_of(data, 4)["inputs"][0]["link"] = None  # keep the output runnable: only prompt is looked at
    assert ui_workflow(data).nodes["4"].inputs["prompt"] == "a red circle"


def test_links_written_as_objects_are_read_too():
    data = ui_data("basic")
    keys = ("id", "origin_id", "origin_slot", "target_id", "target_slot", "type")
    data["links"] = [dict(zip(keys, link)) for link in data["links"]]
    assert ui_workflow(data).nodes["3"].inputs["lora"] == Link("2", 0)


def test_bypass_slot_choice_follows_comfyui():
    inputs = [{"type": "LN_MODEL"}, {"type": "LN_LORA"}, {"type": "IMAGE"}]
    assert bypass_input_index(inputs, 0, "LN_MODEL", "LN_MODEL") == 0
    assert bypass_input_index(inputs, 0, "LN_MODEL", "IMAGE") == 2
    assert bypass_input_index(inputs, 1, "IMAGE", "*") == 1
    assert bypass_input_index(inputs, 0, "LN_MODEL", "LATENT") is None
    assert bypass_input_index([], 0, "LN_MODEL", "LN_MODEL") is None


def test_unsupported_nodes_are_listed_in_one_problem(capsys):
    with pytest.raises(WorkflowError) as caught:
        load_workflow(FIXTURES / "unsupported.json")
    [problem] = caught.value.problems
    assert problem.code == "unsupported_nodes"
    # custom nodes' types (ComfyUI's core nodes run here: see test_core_workflows.py)
    for part in ("CheckpointLoaderNF4 (node 4)", "KSampler (Efficient) (nodes 3, 7)", "LoraLoader|pysssss (node 10)",
                 "ComfyUI"):
        assert part in problem.message
    assert "LoadBase" not in problem.message
    assert cli.main(["validate", str(FIXTURES / "unsupported.json")]) == 2
    assert "unsupported_nodes" in capsys.readouterr().err


def test_comfyuis_save_image_and_preview_image_are_core_nodes_that_write_what_save_images_writes(tmp_path):
    """SaveImage keeps its id and widget, and writes the picture SaveImages writes, its levels cut down as
    ComfyUI's SaveImage cuts them (SaveImages rounds: one level apart at most); PreviewImage writes under
    previews/."""
    data = ui_data("basic")
    save = copy.deepcopy(node_of(data, 5))
    save.update(id=8, type="SaveImage", widgets_values=["comfy/red_circle"])
    preview = {**copy.deepcopy(save), "id": 7, "type": "PreviewImage", "widgets_values": []}
    save["inputs"][0]["link"], preview["inputs"][0]["link"] = 5, 6
    node_of(data, 4)["outputs"][0]["links"] += [5, 6]
    data["nodes"] += [save, preview]
    data["links"] += [[5, 4, 0, 8, 0, "IMAGE"], [6, 4, 0, 7, 0, "IMAGE"]]
    workflow = ui_workflow(data)
    assert workflow.nodes["8"].type == "SaveImage" and workflow.nodes["8"].inputs == {
        "images": Link("4", 0), "filename_prefix": "comfy/red_circle"}
    assert workflow.nodes["7"].type == "PreviewImage"
    assert to_api(workflow, catalogue())["8"]["class_type"] == "SaveImage"  # not namespaced: ComfyUI's own
    written = run_pixels(workflow, tmp_path / "out", tmp_path / "cache")
    assert set(written) == {"basic/red_circle_00001.png", "comfy/red_circle_00001.png", "previews/ComfyUI_00001.png"}
    rounded = written["basic/red_circle_00001.png"].astype(int)
    for name in ("comfy/red_circle_00001.png", "previews/ComfyUI_00001.png"):
        cut_down = rounded - written[name].astype(int)
        assert cut_down.min() >= 0 and cut_down.max() == 1, name
    texts = {}
    for name in written:
        with Image.open(tmp_path / "out" / name) as png:
            texts[name] = dict(png.text)
    assert list(texts["comfy/red_circle_00001.png"]) == ["lora-nodes", "prompt", "workflow", "parameters"]
    assert texts["comfy/red_circle_00001.png"] == texts["basic/red_circle_00001.png"]
    assert json.loads(texts["previews/ComfyUI_00001.png"]["prompt"])["8"]["class_type"] == "SaveImage"


def test_is_ui_format():
    assert is_ui_format(ui_data("basic"))
    assert not is_ui_format({"format": "lora-nodes/1", "nodes": {}})
    assert not is_ui_format({"3": {"class_type": "LoadBase", "inputs": {}}})


# --- writing ComfyUI files, and round trips ---------------------------------------------------


def ids_by_title(ui: dict) -> dict[str, str]:
    return {str(n["id"]): n.get("title", str(n["id"])) for n in ui["nodes"]}


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_yaml_to_comfyui_ui_and_back_gives_the_same_graph(path):
    workflow = load_workflow(path)
    ui = json.loads(convert(workflow, "comfyui-ui", catalogue()))
    back = from_ui(ui, workflow.base_dir, catalogue())
    assert normalised(back, ids_by_title(ui)) == normalised(workflow)


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_yaml_to_comfyui_api_and_back_gives_the_same_graph(path):
    workflow = load_workflow(path)
    api = json.loads(convert(workflow, "comfyui-api", catalogue()))
    assert all(body["class_type"].startswith("lora-nodes.") for body in api.values())
    back = parse_workflow(api, workflow.base_dir)
    assert normalised(back, {i: body["_meta"]["title"] for i, body in api.items()}) == normalised(workflow)


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_written_ui_files_are_complete_and_consistent(path):
    workflow = load_workflow(path)
    ui = to_ui(workflow, catalogue())
    assert ui["version"] == 0.4 and ui["last_link_id"] == len(ui["links"])
    nodes = {n["id"]: n for n in ui["nodes"]}
    for node in ui["nodes"]:
        spec = catalogue()[node["type"]]
        assert node["type"] == spec.comfy_id
        # a control value after each seed, but TrainLoRA's and MergeLoRAs' (a new seed each queue would
        # train or merge again)
        controls = sum(d.name == "seed" for d in widget_inputs(spec)) if spec.id not in ("TrainLoRA", "MergeLoRAs") \
            else 0
        assert len(node["widgets_values"]) == len(widget_inputs(spec)) + controls
    for link_id, origin, origin_slot, target, target_slot, link_type in ui["links"]:
        assert nodes[target]["inputs"][target_slot]["link"] == link_id
        assert link_id in nodes[origin]["outputs"][origin_slot]["links"]
        assert nodes[origin]["outputs"][origin_slot]["type"] == link_type


def test_layout_is_left_to_right_by_depth_without_positions():
    ui = to_ui(load_workflow(WORKFLOWS / "strength_sweep.yaml"), catalogue())
    x = {n["title"]: n["pos"][0] for n in ui["nodes"]}
    assert x["base"] == x["lora"] < x["styled"] < x["images"] < x["save"]
    y = {n["title"]: n["pos"][1] for n in ui["nodes"]}
    assert y["base"] < y["lora"]


def test_a_round_trip_keeps_the_layout_and_titles(tmp_path):
    workflow = ui_workflow(ui_data("basic"))
    text = convert(workflow, "yaml", catalogue())
    (tmp_path / "basic.yaml").write_text(text)
    again = to_ui(load_workflow(tmp_path / "basic.yaml"), catalogue())
    original = {n["id"]: n for n in ui_data("basic")["nodes"] if n["type"] != "Note"}
    for node in again["nodes"]:
        assert node["pos"] == original[node["id"]]["pos"] and node["size"] == original[node["id"]]["size"]
    assert node_of(again, 4)["title"] == "styled images"
    assert normalised(ui_workflow(again)) == normalised(workflow)


def test_convert_to_our_formats_keeps_ids_and_json_equals_yaml():
    workflow = load_workflow(FIXTURES / "basic.yaml")
    as_json = json.loads(convert(workflow, "json", catalogue()))
    assert list(as_json["nodes"]) == ["base", "style", "styled", "images", "save"]
    with pytest.raises(ValueError):
        convert(workflow, "xml", catalogue())


def test_converting_a_graph_with_a_bad_link_is_refused():
    workflow = load_workflow(FIXTURES / "basic.yaml")
    workflow.nodes["save"].inputs["images"] = Link("nowhere", 0)
    with pytest.raises(WorkflowError) as caught:
        to_ui(workflow, catalogue())
    assert caught.value.problems[0].code == "missing_node"


# --- PNGs with ComfyUI's text chunks ----------------------------------------------------------


def png_with(path: Path, chunks: dict[str, str]) -> Path:
    info = PngInfo()
    for key, text in chunks.items():
        info.add_text(key, text)
    Image.new("RGB", (8, 8)).save(path, pnginfo=info)
    return path


def absolute_basic():
    workflow = load_workflow(FIXTURES / "basic.yaml")
    workflow.nodes["style"].inputs["path"] = str(EXAMPLE_LORA)
    return workflow


@pytest.mark.parametrize("chunk", ["prompt", "workflow"])
def test_a_png_with_only_comfyuis_chunk_runs(chunk, tmp_path):
    data = to_api(absolute_basic(), catalogue()) if chunk == "prompt" else to_ui(absolute_basic(), catalogue())
    png = png_with(tmp_path / "ComfyUI_00001_.png", {chunk: json.dumps(data)})
    out = tmp_path / "out"
    assert cli.main(["run", str(png), "--output-dir", str(out), "--cache-dir", str(tmp_path / "cache")]) == 0
    assert [p.name for p in (out / "basic").glob("*.png")] == ["red_circle_00001.png"]


def test_our_png_chunk_is_preferred_over_comfyuis(tmp_path):
    ours = convert(absolute_basic(), "json", catalogue())
    png = png_with(tmp_path / "x.png", {"lora-nodes": ours, "prompt": json.dumps({"1": {"class_type": "KSampler"}})})
    assert list(load_workflow(png).nodes) == ["base", "style", "styled", "images", "save"]


def test_a_png_without_any_workflow_chunk_says_so(tmp_path):
    with pytest.raises(WorkflowError) as caught:
        load_workflow(png_with(tmp_path / "plain.png", {"parameters": "a photo"}))
    assert caught.value.problems[0].code == "no_workflow"


def test_fixtures_are_not_changed_by_reading():
    data = ui_data("muted_bypassed")
    before = copy.deepcopy(data)
    ui_workflow(data)
    assert data == before


def test_convert_cli_and_png_chunks_for_comfyui(tmp_path, capsys):
    """`convert` writes files that run from anywhere; our PNGs carry ComfyUI's prompt and workflow."""
    from lora_nodes.cli import main

    quickstart = REPO / "workflows" / "quickstart.yaml"
    ui_file = tmp_path / "elsewhere" / "quick_ui.json"
    assert main(["convert", str(quickstart), "--to", "comfyui-ui", "-o", str(ui_file)]) == 0
    assert json.loads(ui_file.read_text())["version"] == 0.4
    assert main(["convert", str(ui_file), "--to", "comfyui-api", "-o", str(tmp_path / "api.json")]) == 0
    assert main(["validate", str(tmp_path / "api.json")]) == 0
    assert main(["convert", str(quickstart), "--to", "yaml"]) == 0
    assert "format: lora-nodes/1" in capsys.readouterr().out
    assert main(["run", str(ui_file), "--output-dir", str(tmp_path / "out"), "--set", "5.steps=2",
                 "--set", "6.steps=2", "--set", "7.steps=2"]) == 0
    png = next((tmp_path / "out").rglob("*.png"))
    info = Image.open(png).info
    assert {"lora-nodes", "prompt", "workflow"} <= set(info)
    prompt = json.loads(info["prompt"])
    assert {body["class_type"] for body in prompt.values()} >= {"lora-nodes.LoadBase", "lora-nodes.Sample"}
    assert json.loads(info["workflow"])["nodes"]


def test_png_chunks_are_made_once_per_run_and_carried_by_every_save(tmp_path, monkeypatch):
    """The scheduler makes the chunks once, on the first SaveImages; the second save writes the same text."""
    from lora_nodes.engine import scheduler

    made = []
    real = scheduler.png_chunks
    monkeypatch.setattr(scheduler, "png_chunks", lambda *args: made.append(args) or real(*args))
    workflow = parse_workflow({"format": "lora-nodes/1", "nodes": {
        "base": {"type": "LoadBase", "inputs": {"source": "builtin:tiny"}},
        "images": {"type": "Sample", "inputs": {"model": ["base", "model"], "prompt": "a red circle", "steps": 1}},
        "a": {"type": "SaveImages", "inputs": {"images": ["images", "images"], "prefix": "a"}},
        "b": {"type": "SaveImages", "inputs": {"images": ["images", "images"], "prefix": "b"}},
    }}, tmp_path)
    result = Runner(output_dir=tmp_path / "out", cache_dir=tmp_path / "cache").run(workflow)
    assert len(made) == 1
    texts = []
    for path in result.files:
        with Image.open(path) as image:
            texts.append(dict(image.text))
    assert len(texts) == 2 and texts[0] == texts[1] and list(texts[0]) == ["lora-nodes", "prompt", "workflow", "parameters"]
    assert json.loads(texts[0]["prompt"]) == to_api(parse_workflow(json.loads(texts[0]["lora-nodes"]), tmp_path),
                                                    catalogue())
