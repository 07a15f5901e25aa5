"""Hostile or careless workflow files end in exit 2 with the problem list: no traceback, no hang, no blow-up.

Everything runs the CLI in-process (``main([...])``), as a user would meet it.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import time
import tracemalloc
from pathlib import Path

import pytest
from conftest import EXAMPLE_LORA, REPO
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from lora_nodes.cli import main
from lora_nodes.engine.context import NodeContext, NodeError
from lora_nodes.engine.keys import Fingerprints
from lora_nodes.graph.load import parse_yaml
from lora_nodes.graph.problems import MESSAGE_LIMIT

GOOD = """format: lora-nodes/1
nodes:
  base:   {type: LoadBase, inputs: {source: "builtin:tiny"}}
  lora:   {type: LoadLoRA, inputs: {path: style.safetensors}}
  styled: {type: ApplyLoRA, inputs: {model: [base, model], lora: [lora, lora], strength_model: 0.5}}
  images: {type: Sample, inputs: {model: [styled, model], prompt: "a red circle", seed: 7, steps: 2}}
  save:   {type: SaveImages, inputs: {images: [images, images], prefix: styled}}
"""
DATASET_NODE = "  data:   {type: LoadDataset, inputs: {path: PATH}}\n"
SAVE_LORA_NODE = "  keep:   {type: SaveLoRA, inputs: {lora: [lora, lora], path: PATH}}\n"
BOMB = "lol:\n  a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"  {b}: &{b} [{', '.join([f'*{a}'] * 9)}]\n" for a, b in zip("abcdefgh", "bcdefghi"))  # 9**9 strings


@pytest.fixture(scope="module", autouse=True)
def _imported():
    """Import the node catalogue once, so timings below measure the checks, not torch's import."""
    from lora_nodes.nodes import catalogue

    catalogue()


@pytest.fixture
def folder(tmp_path):
    shutil.copy(EXAMPLE_LORA, tmp_path / "style.safetensors")
    return tmp_path


def write(folder: Path, text: str | bytes, name: str = "workflow.yaml") -> Path:
    path = folder / name
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


def problems_of(path: Path, capsys, *args: str) -> list[dict]:
    """``validate --json``: exit 2 and the problems it lists."""
    assert main(["validate", str(path), "--json", *args]) == 2
    return json.loads(capsys.readouterr().out)


def the_problem(path: Path, capsys, *args: str) -> dict:
    found = problems_of(path, capsys, *args)
    assert len(found) == 1, found
    return found[0]


def replaced(old: str, new: str, extra: str = "") -> str:
    assert old in GOOD
    return GOOD.replace(old, new) + extra


# (workflow text, code, node, input, words the message has)
CASES = {
    "source is a number": (replaced('"builtin:tiny"', "5"), "invalid_value", "base", "source", "got int 5"),
    "seed past float range": (replaced("seed: 7", "seed: " + "9" * 400), "out_of_range", "images", "seed",
                              "400 digits"),
    "int of 5000 digits": (replaced("seed: 7", "seed: " + "9" * 5000), "parse_error", None, None, "4300"),
    "strength past float range": (replaced("strength_model: 0.5", "strength_model: " + "9" * 400), "invalid_value",
                                  "styled", "strength_model", "too large"),
    "prompt is a mapping": (replaced('"a red circle"', "{a: 1}"), "invalid_value", "images", "prompt", "got dict"),
    "prompt is a date": (replaced('"a red circle"', "2020-01-01"), "invalid_value", "images", "prompt", "a date"),
    "path with NUL": (replaced("path: style.safetensors", r'path: "a\0b"'), "invalid_value", "lora", "path", "NUL"),
    "path of no user": (replaced("path: style.safetensors", "path: ~nosuchuser/x"), "invalid_value", "lora", "path",
                        "no user"),
    "over-long path": (replaced("path: style.safetensors", "path: " + "x" * 5000), "invalid_value", "lora", "path",
                       "too long"),
    "LoRA is /dev/zero": (replaced("path: style.safetensors", "path: /dev/zero"), "not_a_file", "lora", "path",
                          "character device"),
    "LoRA is /": (replaced("path: style.safetensors", "path: /"), "not_a_file", "lora", "path", "is a folder"),
    "dataset is a file": (GOOD + DATASET_NODE.replace("PATH", "style.safetensors"), "not_a_folder", "data", "path",
                          "is a file"),
    "5000-deep nesting": (GOOD + "extra: " + "[" * 5000 + "]" * 5000 + "\n", "parse_error", None, None, "nested"),
    "100-deep nesting": (GOOD + "extra: " + "[" * 100 + "]" * 100 + "\n", "parse_error", None, None, "64 levels"),
    "alias nesting": ("a: &a [[[[[[[[[[x]]]]]]]]]]\n" + "".join(f"{c}: &{c} [[[[[[[[[[*{p}]]]]]]]]]]\n" for p, c in
                      zip("abcdefg", "bcdefgh")) + GOOD, "parse_error", None, None, "64 levels"),
    "self-containing alias": (GOOD + "loop: &r [*r]\n", "parse_error", None, None, "contains it"),
    "duplicate node id": (GOOD + "  save:   {type: SaveImages, inputs: {images: [images, images]}}\n", "parse_error",
                          None, None, "'save' appears twice"),
    "duplicate input": (replaced("seed: 7,", "seed: 7, seed: 8,"), "parse_error", None, None, "'seed' appears twice"),
    "ids 1 and '1'": (GOOD + "  1: {type: LoadBase}\n  '1': {type: LoadBase}\n", "parse_error", "1", None,
                      "same id"),
    "id read as a boolean": (GOOD + "  on: {type: LoadBase}\n", "parse_error", None, None, "not text"),
    "nodes: null": ("format: lora-nodes/1\nnodes: null\n", "parse_error", None, None, "'nodes' must be a mapping"),
    "a list at the top": ("- a\n- b\n", "parse_error", None, None, "not a list"),
    "an empty file": ("", "parse_error", None, None, "is empty"),
    "node body not a mapping": (GOOD + "  x: 5\n", "parse_error", "x", None, "'type'"),
    "type is a list": (GOOD + "  x: {type: [LoadBase]}\n", "parse_error", "x", None, "'type'"),
    "inputs is a list": (GOOD + "  x: {type: LoadBase, inputs: [a]}\n", "parse_error", "x", None, "'inputs'"),
    "date in an extra key": (GOOD + "when: 2020-01-01\n", "invalid_value", None, None, "a date"),
    "set in an extra key": (GOOD + "tags: !!set {a, b}\n", "invalid_value", None, None, "a set"),
    "NaN in an extra key": (GOOD + "n: .nan\n", "invalid_value", None, None, "nan"),
    "description is a list": (GOOD + "description: [a, b]\n", "parse_error", None, None, "'description'"),
    "prefix climbs out": (replaced("prefix: styled", "prefix: ../x"), "invalid_value", "save", "prefix", "'..'"),
    "prefix is absolute": (replaced("prefix: styled", "prefix: /tmp/x"), "invalid_value", "save", "prefix",
                           "absolute"),
    "prefix of no user": (replaced("prefix: styled", "prefix: ~nouser/x"), "invalid_value", "save", "prefix", "'~'"),
    "prefix with NUL": (replaced("prefix: styled", r'prefix: "a\0"'), "invalid_value", "save", "prefix", "NUL"),
    "prefix too long": (replaced("prefix: styled", "prefix: " + "p" * 300), "invalid_value", "save", "prefix",
                        "300 bytes"),
    "prefix empty": (replaced("prefix: styled", "prefix: ''"), "invalid_value", "save", "prefix", "empty"),
    "prefix names the folder": (replaced("prefix: styled", "prefix: a/.."), "invalid_value", "save", "prefix",
                                "output folder itself"),
    "SaveLoRA path climbs out": (GOOD + SAVE_LORA_NODE.replace("PATH", "../../x"), "invalid_value", "keep", "path",
                                 "'..'"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_malformed_workflow_is_a_problem(name, folder, capsys):
    text, code, node, name_of_input, words = CASES[name]
    problem = the_problem(write(folder, text), capsys)
    assert (problem["code"], problem["node"], problem["input"]) == (code, node, name_of_input)
    assert words in problem["message"]
    assert len(problem["message"]) < 600


@pytest.mark.parametrize("name", ["int of 5000 digits", "LoRA is /dev/zero", "duplicate node id", "prefix climbs out"])
def test_run_gives_one_invalid_event(name, folder, capsys):
    out = folder / "out"
    assert main(["run", str(write(folder, CASES[name][0])), "--events", "jsonl", "--output-dir", str(out)]) == 2
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1 and json.loads(lines[0])["event"] == "invalid"
    assert json.loads(lines[0])["problems"][0]["code"] == CASES[name][1]
    assert not out.exists()


@pytest.mark.parametrize("text", [GOOD + BOMB, GOOD + "when: 2020-01-01\n", "[" * 5000 + "]" * 5000])
def test_convert_reports_problems_like_validate(text, folder, capsys):
    assert main(["convert", str(write(folder, text)), "--to", "json"]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and "The workflow has 1 problem" in captured.err and "Traceback" not in captured.err


def test_alias_bomb_is_refused_fast_in_bounded_memory(folder, capsys):
    path = write(folder, GOOD + BOMB)
    assert len(path.read_bytes()) < 2000
    tracemalloc.start()
    started = time.perf_counter()
    try:
        problem = the_problem(path, capsys)
        seconds = time.perf_counter() - started
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert problem["code"] == "parse_error" and "aliases expand" in problem["message"]
    assert seconds < 2 and peak < 200 * 2**20, (seconds, peak)


def test_fifo_and_root_are_problems_for_path_inputs(folder, capsys):
    fifo = folder / "pipe.safetensors"
    os.mkfifo(fifo)
    text = replaced("path: style.safetensors", f"path: {fifo}", DATASET_NODE.replace("PATH", "/"))
    found = {(p["code"], p["node"]) for p in problems_of(write(folder, text), capsys)}
    assert found == {("not_a_file", "lora"), ("too_many_files", "data")}
    dataset = folder / "dataset"
    dataset.mkdir()
    (dataset / "a.png").write_bytes(b"")
    os.mkfifo(dataset / "b.png")
    problem = the_problem(write(folder, GOOD + DATASET_NODE.replace("PATH", "dataset")), capsys)
    assert problem["code"] == "not_a_file" and "'b.png'" in problem["message"]


def test_fingerprint_reads_no_fifo_and_stays_in_the_folder(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "a.txt").write_text("a")
    os.mkfifo(tmp_path / "data" / "pipe")
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "b.txt").write_text("b")
    (tmp_path / "data" / "link").symlink_to(tmp_path / "elsewhere")
    fingerprint = Fingerprints()(tmp_path / "data")
    assert [f["path"] for f in fingerprint["files"]] == ["a.txt"]
    assert "content" not in Fingerprints()(tmp_path / "data" / "pipe")


@pytest.mark.parametrize(("raw", "valid"), [
    (GOOD.replace("a red circle", "a red círcle").encode("latin-1"), False),
    (GOOD.replace("a red circle", "a red círcle").encode("utf-16"), True),
    (b"\xef\xbb\xbf" + GOOD.encode(), True),
    (GOOD.encode("utf-16-le"), False),
])
def test_encodings(raw, valid, folder, capsys):
    path = write(folder, raw)
    if valid:
        assert main(["validate", str(path)]) == 0
    else:
        problem = the_problem(path, capsys)
        assert problem["code"] == "parse_error" and "UTF-8" in problem["message"]


def test_file_argument_that_is_no_file(folder, capsys):
    assert the_problem(folder, capsys)["code"] == "not_a_file"
    os.mkfifo(folder / "pipe.yaml")
    assert the_problem(folder / "pipe.yaml", capsys)["code"] == "not_a_file"
    assert the_problem(folder / "missing.yaml", capsys)["code"] == "file_not_found"


def test_damaged_pngs(folder, capsys):
    good = folder / "good.png"
    Image.new("RGB", (8, 8)).save(good)
    truncated = write(folder, good.read_bytes()[:20], "truncated.png")
    not_png = write(folder, "hello", "text.png")
    info = PngInfo()
    info.add_text("lora-nodes", "a" * (2 * 2**20), zip=True)  # over PIL's limit for a decompressed chunk
    big = folder / "big.png"
    Image.new("RGB", (8, 8)).save(big, pnginfo=info)
    for path in (truncated, not_png, big):
        assert the_problem(path, capsys)["code"] == "parse_error", path
    assert the_problem(good, capsys)["code"] == "no_workflow"


def ui_file(folder: Path, reroutes: int = 0) -> dict:
    """tests/fixtures/comfyui/basic.json with absolute paths, and ``reroutes`` Reroutes before the Sample."""
    data = json.loads((REPO / "tests" / "fixtures" / "comfyui" / "basic.json").read_text())
    for node in data["nodes"]:
        if node["type"] == "LoadLoRA":
            node["widgets_values"] = [str(folder / "style.safetensors")]
    link = next(item for item in data["links"] if item[0] == 3)  # ApplyLoRA -> Sample's model
    origin, slot = link[1], link[2]
    for n in range(100, 100 + reroutes):
        data["nodes"].append({"id": n, "type": "Reroute", "mode": 0, "inputs": [{"name": "", "type": "*", "link": n}],
                              "outputs": [{"name": "", "type": "LN_MODEL", "links": [n + 1]}]})
        data["links"].append([n, origin, slot, n, 0, "LN_MODEL"])
        origin, slot = n, 0
    link[1], link[2] = origin, slot
    return data


def test_a_chain_of_600_reroutes_is_an_ordinary_graph(folder, capsys):
    assert main(["validate", str(write(folder, json.dumps(ui_file(folder, 600)), "ui.json"))]) == 0
    assert "valid (5 nodes)" in capsys.readouterr().out
    looped = ui_file(folder, 3)
    next(n for n in looped["nodes"] if n["id"] == 100)["inputs"][0]["link"] = 102
    problem = the_problem(write(folder, json.dumps(looped), "loop.json"), capsys)
    assert problem["code"] == "muted_input" and "loop" in problem["message"]


def test_malformed_comfyui_files(folder, capsys):
    api = {"1": {"class_type": ["LoadBase"], "inputs": {}}, "2": {"class_type": "LoadBase", "inputs": [1]}}
    found = problems_of(write(folder, json.dumps(api), "api.json"), capsys)
    assert {(p["code"], p["node"]) for p in found} == {("parse_error", "1"), ("parse_error", "2")}
    data = ui_file(folder)
    data["links"][0][0] = [1]  # LoadBase -> ApplyLoRA: a link id that is a list
    data["nodes"][2]["inputs"][1]["link"] = {"id": 2}  # LoadLoRA -> ApplyLoRA: a slot's link that is a mapping
    found = problems_of(write(folder, json.dumps(data), "ui.json"), capsys)
    assert {(p["code"], p["input"]) for p in found} == {("missing_input", "model"), ("missing_input", "lora")}
    data = ui_file(folder)
    data["nodes"][1]["id"] = data["nodes"][0]["id"]
    assert "have this id" in the_problem(write(folder, json.dumps(data), "dup.json"), capsys)["message"]
    data = ui_file(folder)
    data["nodes"][0]["type"] = ["LoadBase"]
    assert the_problem(write(folder, json.dumps(data), "type.json"), capsys)["code"] == "parse_error"
    duplicated = '{"1": {"class_type": "LoadBase"}, "1": {"class_type": "LoadBase"}}'
    assert "appears twice" in the_problem(write(folder, duplicated, "dup_api.json"), capsys)["message"]


def test_sweeps_are_capped_before_anything_is_built(folder, capsys):
    path = write(folder, GOOD)
    values = ",".join(str(n) for n in range(1001))
    problem = the_problem(path, capsys, "--sweep", f"images.seed={values}")
    assert problem["code"] == "bad_override" and "1,001" in problem["message"] and "1,000" in problem["message"]
    many = ",".join(str(n) for n in range(1000))
    started = time.perf_counter()
    problem = the_problem(path, capsys, "--sweep", f"images.seed={many}", "--sweep", f"images.steps={many}")
    assert "1,000,000 variants" in problem["message"] and time.perf_counter() - started < 5


def test_long_values_are_cut_in_messages(folder, capsys):
    text = replaced("seed: 7,", "seed: 7, " + "k" * 1000 + ": 1,", "  z: {type: " + "Q" * 100_000 + "}\n")
    found = problems_of(write(folder, text), capsys)
    assert {p["code"] for p in found} == {"unknown_node_type", "unknown_input"}
    assert all(len(p["message"]) < 400 for p in found)
    assert main(["validate", str(write(folder, text)), "--set", "images.prompt=" + "[" * 100]) == 2
    assert len(capsys.readouterr().err) < MESSAGE_LIMIT + 500


def test_output_path_applies_the_same_rule_at_run_time(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "escape").symlink_to(tmp_path)
    ctx = NodeContext("save", "SaveImages", out, tmp_path / "cache", lambda event: None)
    for bad in ("../x", "/abs", "~nouser/x", "a\0", "p" * 300, "", ".", "escape/x"):
        with pytest.raises(NodeError):
            ctx.output_path(bad)
    assert ctx.output_path("sub/name") == out.resolve() / "sub" / "name"


def test_aliases_of_one_long_string_are_refused_by_the_text_they_expand_to(folder, capsys):
    """10,000 aliases of one 10 KB string: a 60 KB file, far under the alias count limit, but 100 MB of
    workflow that convert would write and SaveImages embed in every PNG."""
    blob = "blob: &a " + "x" * 10_000 + "\nmany:\n" + "  - *a\n" * 10_000
    path = write(folder, GOOD + blob)
    assert len(path.read_bytes()) < 100_000
    started = time.perf_counter()
    assert main(["validate", str(path)]) == 2
    assert "aliases expand it to more than 16 MiB" in capsys.readouterr().err
    assert time.perf_counter() - started < 2
    assert the_problem(path, capsys)["code"] == "parse_error"
    assert main(["convert", str(path), "--to", "json"]) == 2 and capsys.readouterr().out == ""
    few = "blob: &a " + "x" * 10_000 + "\nmany: [" + ", ".join(["*a"] * 100) + "]\n"  # 1 MB: within the limit
    assert main(["validate", str(write(folder, GOOD + few))]) == 0


def ours_as_json(**inputs: dict) -> dict:
    """GOOD as our JSON format, with ``inputs`` (node id -> inputs) merged into its nodes."""
    data = parse_yaml(GOOD)
    for node_id, values in inputs.items():
        data["nodes"][node_id]["inputs"].update(values)
    return data


def comfy_api_of_good(folder: Path, capsys) -> dict:
    path = write(folder, GOOD)
    assert main(["convert", str(path), "--to", "comfyui-api", "-o", str(folder / "api.json")]) == 0
    capsys.readouterr()
    return json.loads((folder / "api.json").read_text())


def with_lone_surrogate(form: str, folder: Path, capsys) -> tuple[Path, str, str | None, str]:
    """A workflow file in ``form`` holding "p\\udcff" as JSON escapes it: (path, node, input, words)."""
    if form in ("prefix", "prompt", "png"):
        node, name = ("save", "prefix") if form != "prompt" else ("images", "prompt")
        text = json.dumps(ours_as_json(**{node: {name: "p\udcff"}}))  # written as the escape "p\udcff"
        if form == "png":
            info = PngInfo()
            info.add_text("lora-nodes", text)
            Image.new("RGB", (8, 8)).save(folder / "wf.png", pnginfo=info)
            return folder / "wf.png", node, name, "nodes.save.inputs.prefix"
        return write(folder, text, "wf.json"), node, name, f"nodes.{node}.inputs.{name}"
    if form == "input name":
        return write(folder, json.dumps(ours_as_json(images={"s\udcffed": 1})), "wf.json"), "images", "s\\udcffed", ""
    if form == "comfyui api":
        data = comfy_api_of_good(folder, capsys)
        node = next(i for i, body in data.items() if body["class_type"].endswith("Sample"))
        data[node]["inputs"]["prompt"] = "p\udcff"
        return write(folder, json.dumps(data), "api.json"), node, "prompt", ""
    data = ui_file(folder)
    sample = next(n for n in data["nodes"] if n["type"].endswith("Sample"))
    sample["widgets_values"][0] = "p\udcff"
    return write(folder, json.dumps(data), "ui.json"), str(sample["id"]), None, "widgets_values[0]"


@pytest.mark.parametrize("form", ["prefix", "prompt", "png", "input name", "comfyui api", "comfyui ui"])
def test_text_that_is_not_valid_unicode_is_refused_before_anything_runs(form, folder, capsys):
    """A lone surrogate passed validation, then failed after sampling (writing the PNG, or in the tokenizer)."""
    path, node, name, where = with_lone_surrogate(form, folder, capsys)
    started = time.perf_counter()
    assert main(["validate", str(path)]) == 2
    shown_to_user = capsys.readouterr().err
    shown_to_user.encode("utf-8")  # printable: the surrogate itself is written as its escape
    assert "lone surrogate" in shown_to_user and "not valid Unicode" in shown_to_user
    problem = the_problem(path, capsys)
    assert (problem["code"], problem["node"], problem["input"]) == ("invalid_value", node, name)
    assert where in problem["message"] and "'\\udcff' at character" in problem["message"]
    assert time.perf_counter() - started < 2


def png_of_chunks(path: Path, *chunks: tuple[bytes, int]) -> Path:
    """An 8x8 PNG's signature and IHDR, then each (type, length) chunk, its data zeros written as holes
    (a sparse file: a chunk of gigabytes costs no disk)."""
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, format="PNG")
    head = buffer.getvalue()[:33]  # the 8-byte signature and the 25-byte IHDR chunk
    with open(path, "wb") as f:
        f.write(head)
        for kind, length in chunks:
            f.write(length.to_bytes(4, "big") + kind)
            f.seek(length + 4, os.SEEK_CUR)  # the data and CRC: a hole, read back as zeros
        f.truncate(f.tell())
    return path


@pytest.mark.parametrize(("chunks", "words"), [
    ([(b"tEXt", 2**30)], "'tEXt' chunk is 1,073,741,824 bytes"),  # a 1 GiB workflow chunk: PIL would read it all
    ([(b"prVt", 2**30)], "'prVt' chunk is 1,073,741,824 bytes"),  # any chunk before the image data is read whole
    ([(b"tEXt", 15 * 2**20)] * 5, "64 MiB before its image data"),
    ([(b"tEXt", 0)] * 1001, "1,000 chunks"),
])
def test_png_chunks_are_bounded_before_pil_reads_them(chunks, words, folder, capsys):
    path = png_of_chunks(folder / "big.png", *chunks)
    tracemalloc.start()
    started = time.perf_counter()
    try:
        assert main(["validate", str(path)]) == 2
        seconds = time.perf_counter() - started
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert words in capsys.readouterr().err
    assert seconds < 2 and peak < 50 * 2**20, (seconds, peak)
    assert the_problem(path, capsys)["code"] == "parse_error"


@pytest.mark.parametrize("libyaml", [True, False])
def test_a_lone_surrogate_escaped_in_yaml_is_refused_by_either_loader(libyaml, folder, capsys, monkeypatch):
    """libyaml refuses the escape itself, and PyYAML's own loader (used where libyaml is missing) likewise,
    so a ``--set`` value, which no walk over a document sees, is refused too."""
    from lora_nodes.graph import load

    if not libyaml:
        monkeypatch.setattr(load, "_FastLoader", None)
    elif load._FastLoader is None:
        pytest.skip("PyYAML without libyaml")
    path = write(folder, replaced("prefix: styled", r'prefix: "p\udcff"'))
    problem = the_problem(path, capsys)
    assert problem["code"] == "parse_error" and "Unicode" in problem["message"]
    problem = the_problem(write(folder, GOOD), capsys, "--set", r'images.prompt="p\udcff"')
    assert problem["code"] == "bad_override" and "Unicode" in problem["message"]
