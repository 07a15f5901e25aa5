"""The quick commands (validate, nodes, convert) answer without importing the model libraries.

``import torch`` alone takes seconds; these commands need none of it: the node catalogue, validation
(preflights read file headers only) and conversion are plain Python. Each command runs in a fresh
interpreter here, and what it imported is read from its ``sys.modules``: a guard on what makes them
fast, without timing anything (benchmarks/quick_commands.py prints the times).
"""

from __future__ import annotations

import importlib
import json
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from safetensors import safe_open

from lora_nodes import tensorfiles
from lora_nodes.nodes.spec import REQUIRED

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = REPO / "workflows" / "quickstart.yaml"
LORAS = REPO / "workflows" / "loras"

# what the quick commands must not import: the model stack (seconds), and the libraries that cost a
# tenth of a second or more to import (numpy, scipy, PIL, networkx)
HEAVY = ("torch", "diffusers", "transformers", "safetensors.torch", "accelerate", "peft", "numpy", "scipy",
         "PIL", "networkx")

PROBE = f"""
import json, sys
from lora_nodes.cli import main
code = main(sys.argv[2:])
with open(sys.argv[1], "w") as f:
    json.dump({{"code": code, "imported": [m for m in {list(HEAVY)!r} if m in sys.modules]}}, f)
"""


def run_cli(tmp_path: Path, *argv: str) -> tuple[dict, subprocess.CompletedProcess]:
    """``lora-nodes ARGV`` in a new interpreter: (its exit code and the heavy modules it imported, the process)."""
    report = tmp_path / f"report_{len(list(tmp_path.glob('report_*')))}.json"
    done = subprocess.run([sys.executable, "-c", PROBE, str(report), *argv], check=False, cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert report.exists(), done.stderr
    return json.loads(report.read_text()), done


def nodes_in(workflow: Path) -> int:
    return len(yaml.safe_load(workflow.read_text())["nodes"])


def test_validate_of_the_quickstart_imports_no_model_library(tmp_path):
    result, done = run_cli(tmp_path, "validate", str(QUICKSTART))
    assert result == {"code": 0, "imported": []}
    assert f"valid ({nodes_in(QUICKSTART)} nodes)" in done.stdout


@pytest.mark.parametrize("json_flag", [[], ["--json"]])
def test_nodes_imports_no_model_library(tmp_path, json_flag):
    result, done = run_cli(tmp_path, "nodes", *json_flag)
    assert result == {"code": 0, "imported": []}
    if json_flag:  # our pack's /object_info: our nodes, by their ComfyUI ids
        assert {"LoadLoRA", "ApplyLoRA", "Sample", "TrainLoRA"} <= set(json.loads(done.stdout))
    else:  # our nodes and ComfyUI's core nodes we run, each with its inputs
        assert "LoadLoRA  (" in done.stdout and "KSampler  (" in done.stdout and "in  path: STRING" in done.stdout


@pytest.mark.parametrize("to", ["comfyui-ui", "comfyui-api", "yaml"])
def test_convert_imports_no_model_library(tmp_path, to):
    out = tmp_path / f"quickstart.{'yaml' if to == 'yaml' else 'json'}"
    result, _ = run_cli(tmp_path, "convert", str(QUICKSTART), "--to", to, "-o", str(out))
    assert result == {"code": 0, "imported": []}
    written = yaml.safe_load(out.read_text())  # JSON is YAML too
    count = {"comfyui-ui": lambda: len(written["nodes"]), "comfyui-api": lambda: len(written),
             "yaml": lambda: len(written["nodes"])}[to]()
    assert count == nodes_in(QUICKSTART)


def write_workflow(folder: Path, lora: str) -> Path:
    """A workflow that applies the LoRA file ``lora`` (in ``folder``) to the SD1-like built-in base."""
    path = folder / "workflow.yaml"
    path.write_text(yaml.safe_dump({"format": "lora-nodes/1", "nodes": {
        "base": {"type": "LoadBase", "inputs": {"source": "builtin:tiny"}},
        "style": {"type": "LoadLoRA", "inputs": {"path": lora}},
        "styled": {"type": "ApplyLoRA", "inputs": {"model": ["base", "model"], "lora": ["style", "lora"]}},
        "images": {"type": "Sample", "inputs": {"model": ["styled", "model"], "prompt": "a red circle", "steps": 1}},
        "save": {"type": "SaveImages", "inputs": {"images": ["images", "images"]}},
    }}))
    return path


def test_validate_reads_a_loras_header_for_its_family_without_model_libraries(tmp_path):
    """The preflights still look into the files: an SDXL LoRA on an SD1 base is refused before anything runs."""
    (tmp_path / "sdxl_style.safetensors").write_bytes((LORAS / "tiny_sdxl_style.safetensors").read_bytes())
    result, done = run_cli(tmp_path, "validate", "--json", str(write_workflow(tmp_path, "sdxl_style.safetensors")))
    assert result == {"code": 2, "imported": []}
    assert [(p["code"], p["node"], p["input"]) for p in json.loads(done.stdout)] == [
        ("family_mismatch", "styled", "lora")]


def test_validate_names_a_truncated_lora_without_model_libraries(tmp_path):
    whole = (LORAS / "purple_star.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(whole[: len(whole) // 2])
    result, done = run_cli(tmp_path, "validate", "--json", str(write_workflow(tmp_path, "cut.safetensors")))
    assert result == {"code": 2, "imported": []}
    [problem] = json.loads(done.stdout)
    assert (problem["code"], problem["node"], problem["input"]) == ("bad_lora", "style", "path")
    assert "cut.safetensors is not a readable .safetensors file" in problem["message"]


# --------------------------------------------------------------------------- the header reader
# tensorfiles reads headers in plain Python (the safetensors library opens a file only with a framework,
# which it imports); it must take and refuse what that library takes and refuses.

def entry(dtype: str, shape: list, begin: int, end: int) -> dict:
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}


HEADERS = {  # name: (header, bytes of data after it)
    "plain": ({"a": entry("F32", [2, 3], 0, 24), "b": entry("F16", [4], 24, 32)}, 32),
    "metadata": ({"__metadata__": {"ss_network_dim": "8"}, "a": entry("BF16", [1], 0, 2)}, 2),
    "no tensors": ({}, 0),
    "scalar": ({"alpha": entry("F32", [], 0, 4)}, 4),
    "empty tensor": ({"a": entry("F32", [0, 3], 0, 0)}, 0),
    "keys out of order": ({"b": entry("U8", [1], 1, 2), "a": entry("U8", [1], 0, 1)}, 2),
    "null metadata": ({"__metadata__": None, "a": entry("U8", [1], 0, 1)}, 1),
    "extra field": ({"a": {**entry("U8", [1], 0, 1), "note": 1}}, 1),
    "4-bit floats": ({"a": entry("F4", [4], 0, 2)}, 2),
    "odd 4-bit floats": ({"a": entry("F4", [3], 0, 2)}, 2),
    "unknown dtype": ({"a": entry("F128", [1], 0, 16)}, 16),
    "size disagrees": ({"a": entry("F32", [2], 0, 4)}, 4),
    "gap": ({"a": entry("U8", [1], 1, 2)}, 2),
    "overlap": ({"a": entry("U8", [2], 0, 2), "b": entry("U8", [1], 1, 2)}, 2),
    "trailing bytes": ({"a": entry("U8", [1], 0, 1)}, 3),
    "missing bytes": ({"a": entry("F32", [4], 0, 16)}, 8),
    "negative dimension": ({"a": entry("U8", [-1], 0, 1)}, 1),
    "float dimension": ({"a": entry("U8", [1.0], 0, 1)}, 1),
    "three offsets": ({"a": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1, 1]}}, 1),
    "no offsets": ({"a": {"dtype": "U8", "shape": [1]}}, 1),
    "metadata not strings": ({"__metadata__": {"dim": 8}, "a": entry("U8", [1], 0, 1)}, 1),
    "metadata a list": ({"__metadata__": [], "a": entry("U8", [1], 0, 1)}, 1),
    "a list, not an object": ([], 0),
}
RAW = {  # name: the whole file
    "empty": b"",
    "shorter than a length": b"\x02\x00\x00",
    "length beyond the file": struct.pack("<Q", 1000) + b"{}",
    "not JSON": struct.pack("<Q", 4) + b"{a: ",
    "not UTF-8": struct.pack("<Q", 4) + b'{"\xff"',
    "padding after the JSON": struct.pack("<Q", 4) + b"{}\x00\x00",
}


def read_with_safetensors(path: Path):
    try:
        with safe_open(str(path), framework="numpy") as f:
            return {key: list(f.get_slice(key).get_shape()) for key in f.keys()}, dict(f.metadata() or {})  # noqa: SIM118
    except Exception:  # noqa: BLE001 - whatever it raises, the file is refused
        return "refused"


def read_with_ours(path: Path):
    try:
        header = tensorfiles.read_header(path)
    except tensorfiles.UnreadableTensorFile as exc:
        assert exc.args[0].startswith(f"{path.name} is not a readable .safetensors file")
        return "refused"
    return header.shapes, header.metadata


def test_the_header_reader_agrees_with_safetensors(tmp_path):
    files = dict(RAW)
    for name, (header, data) in HEADERS.items():
        text = json.dumps(header).encode()
        files[name] = struct.pack("<Q", len(text)) + text + bytes(data)
    real = (LORAS / "purple_star.safetensors").read_bytes()
    files.update({"a real LoRA": real, "a real LoRA, cut": real[:-1], "a real LoRA, one byte more": real + b"\0"})
    verdicts = {}
    for name, content in files.items():
        path = tmp_path / f"{name}.safetensors"
        path.write_bytes(content)
        verdicts[name] = (read_with_ours(path), read_with_safetensors(path))
    assert {name: ours for name, (ours, _) in verdicts.items()} == {name: theirs for name, (_, theirs) in verdicts.items()}
    assert verdicts["plain"][0] == ({"a": [2, 3], "b": [4]}, {})  # not only refusals
    assert sum(ours != "refused" for ours, _ in verdicts.values()) >= 10


# --------------------------------------------------------------------------- declarations

TYPED_MODULE = '''
from __future__ import annotations
from typing import TYPE_CHECKING, Annotated
from lora_nodes.nodes.spec import IMAGE, INT, MODEL, Input, Output, node
if TYPE_CHECKING:
    import torch
    from lora_nodes.lora.recipe import ModelRecipe

@node("Typed", display_name="Typed", category="test", outputs=[Output("images", IMAGE)])
def typed(ctx, model: Annotated[ModelRecipe, Input(MODEL)],
          mask: Annotated[torch.Tensor | None, Input(IMAGE, optional=True)] = None,
          count: Annotated[int, Input(INT, min=1)] = 2) -> tuple[torch.Tensor]:
    return (mask,)
'''


def test_a_node_module_may_import_its_value_types_for_type_checking_only(tmp_path, monkeypatch):
    """So that declaring a node never imports torch: its annotations' types need not exist at run time."""
    (tmp_path / "typed_nodes.py").write_text(TYPED_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    spec = importlib.import_module("typed_nodes").typed
    assert [(i.name, i.type, i.optional, i.default) for i in spec.inputs] == [
        ("model", "LN_MODEL", False, REQUIRED), ("mask", "IMAGE", True, REQUIRED), ("count", "INT", False, 2)]
