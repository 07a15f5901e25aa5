"""Feed lora-nodes what a hostile or careless user would, and count how each case ends.

Five kinds of input, each from a hypothesis generator: our workflow files (YAML and JSON),
ComfyUI API-format prompts, ComfyUI editor (UI) files, PNGs (with and without embedded
workflows), and LoRA files. Each case is written to a file and given to the command line the
way a user would (``validate``, ``convert``, then ``run``; LoRAs through ``inspect`` and applied
to ``builtin:tiny``). A case ends in one of:

- ``ok``: accepted (exit 0; a valid workflow ran and drew),
- ``problem``: refused with a problem list or a clear error (exit 2; for a LoRA, a LoRAError),
- ``failed``: a valid workflow failed at run time with an error naming its node (exit 1),
- ``slow``: a valid workflow still running after a minute (it asked for real work, e.g. 2,000 steps),
- ``crash``: an uncaught exception, a traceback, an exit code that does not fit, or non-finite
  weights applied silently,
- ``hang``: reading, validating or converting one case took over 10 s.

    python scripts/fuzz.py --cases 10000              # every kind, 10,000 cases each
    python scripts/fuzz.py --cases 500 --kind lora    # one kind
    python scripts/fuzz.py --cases 200 --show 3       # also print up to 3 crashing cases per kind

The test suite runs the same generators at a small size (tests/test_fuzz.py).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import random
import shutil
import signal
import struct
import sys
import tempfile
import time
import traceback
import zlib
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis import strategies as st

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # the checkout this script is in, whatever lora-nodes pip installed elsewhere

KINDS = ("ours", "comfy-api", "comfy-ui", "png", "lora")
EXAMPLE_LORA = REPO / "workflows" / "loras" / "tiny_style.safetensors"
CASE_SECONDS = 10.0  # one case taking longer than this is a hang
OUR_TYPES = ("LoadBase", "LoadLoRA", "ApplyLoRA", "LoRAStack", "ApplyLoRAStack", "Sample", "SaveImages",
             "SaveModel", "SaveLoRA", "MergeLoRAs", "ResizeLoRA", "ExtractLoRA", "LoadDataset", "TrainLoRA")
OTHER_TYPES = ("KSampler", "Reroute", "PrimitiveNode", "Note", "SaveImage", "", "lora-nodes.", "lora-nodes.Sample")
INPUT_NAMES = ("source", "path", "model", "lora", "strength_model", "strength_text", "prompt", "seed", "steps",
               "cfg", "sampler", "width", "height", "batch_size", "images", "prefix", "stack", "lora_1",
               "enabled_1", "method", "rank", "format", "overwrite", "dataset", "dtype", "device", "config")
NASTY_STRINGS = (
    "", " ", "\x00", "a\x00b", "~nosuchuser/x", "~", "../x", "../../etc/x", "/", "/dev/zero", "/dev/null",
    "/etc/passwd", "/proc/self/mem", "x" * 300, "a/" * 200, "builtin:", "builtin:nope", "builtin:tiny",
    "builtin:shapes", "[", "{", "a: b", "*a", "&a", "%", "@", "\ufeff", "é", "日本", "\u202e", "\r\n", "\t",
    "euler", "kohya", "diffusers", "single_file", "model", "lora", "images", "0", "-1", "1e309", "nan",
)
HUGE_INTS = (2**63, 2**64, -(2**63) - 1, 10**308, 10**309, 10**400, -(10**400))


@dataclass
class Case:
    """One generated input: its file's name (suffix) and bytes, or a LoRA state dict to save."""

    name: str
    data: bytes = b""
    lora: dict[str, Any] | None = None  # tensors by key (saved with safetensors) and "__metadata__"
    note: str = ""  # what the generator did, for reports
    intact: bool = False  # a LoRA generated well-formed: saved without byte-level damage

    def describe(self) -> str:
        shown = self.data[:300] if self.data else repr(sorted(self.lora or {}))[:300]
        return f"{self.name} ({self.note}): {shown!r}"


# ---------------------------------------------------------------------------------------------
# values


def scalars() -> st.SearchStrategy[Any]:
    return st.one_of(
        st.none(), st.booleans(), st.integers(-10, 2000), st.integers(), st.sampled_from(HUGE_INTS),
        st.floats(allow_nan=True, allow_infinity=True), st.sampled_from(NASTY_STRINGS),
        st.text(max_size=20),
    )


def values() -> st.SearchStrategy[Any]:
    return st.recursive(
        scalars(),
        lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
        max_leaves=8,
    )


def node_ids() -> st.SearchStrategy[Any]:
    return st.one_of(st.sampled_from(["base", "lora", "apply", "sample", "save", "1", "2", "3"]),
                     st.integers(-1, 5), st.text(max_size=6))


def links(ids: list[Any]) -> st.SearchStrategy[Any]:
    target = st.sampled_from(ids) if ids else node_ids()
    return st.one_of(
        st.tuples(target, st.one_of(st.integers(-2, 4), st.sampled_from(["model", "lora", "images", "stack", "x"])))
        .map(list),
        st.tuples(st.one_of(st.lists(st.integers(), max_size=2), st.dictionaries(st.text(max_size=2), st.integers(),
                                                                                  max_size=1)),
                  st.integers(0, 2)).map(list),
    )


def input_values(ids: list[Any]) -> st.SearchStrategy[Any]:
    return st.one_of(values(), links(ids), links(ids))


def node_types() -> st.SearchStrategy[Any]:
    return st.one_of(st.sampled_from(OUR_TYPES), st.sampled_from(OUR_TYPES), st.sampled_from(OTHER_TYPES),
                     st.sampled_from(["lora-nodes." + t for t in OUR_TYPES]), values())


@st.composite
def input_maps(draw, ids: list[Any]) -> dict[str, Any]:
    names = draw(st.lists(st.one_of(st.sampled_from(INPUT_NAMES), st.text(max_size=6)), max_size=6))
    return {name: draw(input_values(ids)) for name in names}


# ---------------------------------------------------------------------------------------------
# text-level attacks shared by every text format


def alias_bomb(depth: int, width: int = 9) -> str:
    """A YAML document whose aliases expand to ``width ** depth`` strings (a "billion laughs")."""
    lines = ['l0: &l0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for level in range(1, depth):
        refs = ", ".join([f"*l{level - 1}"] * width)
        lines.append(f"l{level}: &l{level} [{refs}]")
    return "\n".join(lines) + "\n"


def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


@st.composite
def text_attacks(draw, text: str, yaml_ok: bool) -> tuple[bytes, str]:
    """``text`` as bytes, sometimes damaged or re-encoded the way real files get damaged."""
    attack = draw(st.sampled_from(["none", "none", "none", "truncate", "bytes", "latin1", "utf16", "utf16le",
                                   "bom", "bomb", "deep", "bigint", "dupe", "date", "empty"]))
    if attack == "truncate" and text:
        return text[: draw(st.integers(0, len(text) - 1))].encode(), attack
    if attack == "bytes" and text:
        data = bytearray(text.encode())
        for _ in range(draw(st.integers(1, 4))):
            data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
        return bytes(data), attack
    if attack == "latin1":
        return (text + "\n# caf\xe9\n" if yaml_ok else text.replace('"', '"\xe9', 1)).encode("latin-1",
                                                                                            "replace"), attack
    if attack == "utf16":
        return text.encode("utf-16"), attack
    if attack == "utf16le":
        return text.encode("utf-16-le"), attack
    if attack == "bom":
        return b"\xef\xbb\xbf" + text.encode(), attack
    if attack == "empty":
        return b"", attack
    if not yaml_ok:  # JSON: the same attacks, in JSON spelling
        if attack == "deep":
            return f'{{"x": {nested(draw(st.sampled_from([100, 1000, 5000, 20000])))}}}'.encode(), attack
        if attack == "bigint":
            return text.replace("{", '{"big": ' + "9" * draw(st.sampled_from([400, 5000, 50000])) + ", ", 1).encode(), attack
        if attack == "dupe" and text.startswith("{"):
            return text.replace("{", '{"nodes": {"a": {"type": "Sample"}}, ', 1).encode(), attack
        return text.encode(), "none"
    if attack == "bomb":
        return (alias_bomb(draw(st.integers(2, 10))) + text).encode(), attack
    if attack == "deep":
        return (text + f"deep: {nested(draw(st.sampled_from([100, 1000, 5000, 20000])))}\n").encode(), attack
    if attack == "bigint":
        return (text + f"big: {'9' * draw(st.sampled_from([400, 5000, 50000]))}\n").encode(), attack
    if attack == "dupe":
        return (text + "nodes:\n  x: {type: Sample}\n").encode(), attack
    if attack == "date":
        return (text + "when: 2026-12-01\nstamp: 2026-12-01 10:00:00\nset: !!set {a: null}\n").encode(), attack
    return text.encode(), "none"


def dump_json(data: Any) -> str:
    try:
        return json.dumps(data)
    except (ValueError, TypeError, RecursionError):
        return json.dumps(str(data)[:1000])


def dump_yaml(data: Any) -> str:
    try:
        return yaml.safe_dump(data, allow_unicode=True, sort_keys=False)
    except (yaml.YAMLError, ValueError, TypeError, RecursionError):
        return dump_json(data)


# ---------------------------------------------------------------------------------------------
# workflows: ours, ComfyUI API, ComfyUI UI


VALID_OURS = {
    "format": "lora-nodes/1",
    "nodes": {
        "base": {"type": "LoadBase", "inputs": {"source": "builtin:tiny"}},
        "apply": {"type": "ApplyLoRA", "inputs": {"model": ["base", "model"], "lora": ["lora", "lora"]}},
        "lora": {"type": "LoadLoRA", "inputs": {"path": "x.safetensors"}},
        "sample": {"type": "Sample", "inputs": {"model": ["apply", 0], "prompt": "a red circle", "steps": 2}},
        "save": {"type": "SaveImages", "inputs": {"images": ["sample", "images"], "prefix": "x"}},
    },
}


@st.composite
def our_workflows(draw) -> Case:
    if draw(st.booleans()):  # start from a valid file and change a few things
        data = json.loads(json.dumps(VALID_OURS))
        for _ in range(draw(st.integers(0, 4))):
            if not isinstance(data.get("nodes"), dict) or not data["nodes"]:
                break  # a change at the top replaced the nodes: nothing more to change in them
            node = draw(st.sampled_from(sorted(data["nodes"], key=str)))
            body = data["nodes"][node]
            what = draw(st.sampled_from(["input", "input", "type", "body", "inputs", "drop", "top"]))
            intact = isinstance(body, dict) and isinstance(body.get("inputs"), dict)
            if what == "input" and intact:
                body["inputs"][draw(st.sampled_from(INPUT_NAMES))] = draw(input_values(list(data["nodes"])))
            elif what == "type" and intact:
                body["type"] = draw(node_types())
            elif what == "body":
                data["nodes"][node] = draw(values())
            elif what == "inputs" and intact:
                body["inputs"] = draw(values())
            elif what == "drop":
                del data["nodes"][node]
            else:
                data[draw(st.sampled_from(["format", "description", "nodes", "extra", "ui"]))] = draw(values())
    else:
        ids = draw(st.lists(node_ids(), max_size=6))
        nodes = {node_id: {"type": draw(node_types()), "inputs": draw(input_maps(ids))} for node_id in ids}
        data = {"format": draw(st.sampled_from(["lora-nodes/1", "lora-nodes/1", "lora-nodes/2", 1])), "nodes": nodes}
    as_yaml = draw(st.booleans())
    text = dump_yaml(data) if as_yaml else dump_json(data)
    payload, attack = draw(text_attacks(text, as_yaml))
    return Case("workflow.yaml" if as_yaml else "workflow.json", payload, note=attack)


VALID_API = {
    "1": {"class_type": "LoadBase", "inputs": {"source": "builtin:tiny"}},
    "2": {"class_type": "lora-nodes.LoadLoRA", "inputs": {"path": "x.safetensors"}},
    "3": {"class_type": "ApplyLoRA", "inputs": {"model": ["1", 0], "lora": ["2", 0], "strength_model": 0.5}},
    "4": {"class_type": "Sample", "inputs": {"model": ["3", 0], "prompt": "a red circle", "steps": 2}},
    "5": {"class_type": "lora-nodes.SaveImages", "inputs": {"images": ["4", 0], "prefix": "api"}},
}


@st.composite
def comfy_api_workflows(draw) -> Case:
    if draw(st.integers(0, 2)) == 0:  # a valid prompt with a few inputs changed
        prompt = json.loads(json.dumps(VALID_API))
        for _ in range(draw(st.integers(0, 3))):
            node = prompt[draw(st.sampled_from(sorted(prompt)))]
            node["inputs"][draw(st.sampled_from(INPUT_NAMES))] = draw(input_values(list(prompt)))
        payload, attack = draw(text_attacks(dump_json(prompt), yaml_ok=False))
        return Case("prompt.json", payload, note=f"valid-based, {attack}")
    ids = draw(st.lists(st.one_of(st.integers(1, 9).map(str), node_ids()), min_size=1, max_size=6))
    prompt: dict[str, Any] = {}
    for node_id in ids:
        body: Any = {"class_type": draw(node_types()), "inputs": draw(input_maps(ids))}
        if draw(st.integers(0, 9)) == 0:
            body = draw(st.sampled_from([{"class_type": ["Sample"], "inputs": {}}, {"class_type": "Sample",
                                         "inputs": [1, 2]}, {"class_type": None}, []]))
        prompt[str(node_id)] = body
    payload, attack = draw(text_attacks(dump_json(prompt), yaml_ok=False))
    return Case("prompt.json", payload, note=attack)


@st.composite
def comfy_ui_workflows(draw) -> Case:
    reroutes = draw(st.sampled_from([0, 0, 0, 1, 3, 50, 600, 2000]))
    count = 0 if reroutes and draw(st.booleans()) else draw(st.integers(0, 6))  # the chain alone is valid
    nodes, links_out = [], []
    for number in range(1, count + 1):
        node_type = draw(node_types())
        inputs = [{"name": draw(st.sampled_from(INPUT_NAMES)), "type": draw(st.sampled_from(["LN_MODEL", "*", "INT"])),
                   "link": draw(st.one_of(st.none(), st.integers(0, 12), values()))}
                  for _ in range(draw(st.integers(0, 3)))]
        nodes.append({"id": draw(st.one_of(st.just(number), st.just(number), values())), "type": node_type,
                      "mode": draw(st.sampled_from([0, 0, 2, 4, 1, None, "x"])), "inputs": inputs,
                      "outputs": [{"name": "o", "type": "*", "links": [1]}],
                      "widgets_values": draw(st.one_of(st.lists(values(), max_size=6), values()))})
    for link_id in range(draw(st.integers(0, 8))):
        links_out.append(draw(st.one_of(
            st.tuples(st.just(link_id), st.integers(0, count + 1), st.integers(-1, 3), st.integers(0, count + 1),
                      st.integers(-1, 3), st.sampled_from(["LN_MODEL", "IMAGE", "*"])).map(list),
            values())))
    if reroutes:
        _add_reroute_chain(nodes, links_out, reroutes, draw(st.booleans()))
    data = {"last_node_id": len(nodes), "last_link_id": len(links_out), "nodes": nodes, "links": links_out,
            "version": 0.4}
    payload, attack = draw(text_attacks(dump_json(data), yaml_ok=False))
    return Case("graph.json", payload, note=f"{attack}, {reroutes} reroutes")


def _add_reroute_chain(nodes: list[dict], links_out: list, length: int, loop: bool) -> None:
    """LoadBase -> ``length`` Reroutes -> ApplyLoRA's model (a cycle back into the chain with ``loop``)."""
    first_id, first_link = 1000, 1000
    nodes.append({"id": first_id, "type": "LoadBase", "mode": 0, "inputs": [],
                  "outputs": [{"name": "model", "type": "LN_MODEL", "links": [first_link]}],
                  "widgets_values": ["builtin:tiny", "auto", "auto"]})
    for step in range(length):
        node_id, link_in = first_id + 1 + step, first_link + step
        upstream = node_id - 1
        if loop and step == 0:
            link_in, upstream = first_link + length - 1, first_id + length  # the last reroute feeds the first
        nodes.append({"id": node_id, "type": "Reroute", "mode": 0, "inputs": [{"name": "", "type": "*", "link": link_in}],
                      "outputs": [{"name": "", "type": "*", "links": [first_link + step + 1]}]})
        links_out.append([link_in, upstream, 0, node_id, 0, "*"])
    sink = first_id + length + 1
    nodes.append({"id": sink, "type": "lora-nodes.Sample", "mode": 0,
                  "inputs": [{"name": "model", "type": "LN_MODEL", "link": first_link + length}],
                  "outputs": [{"name": "images", "type": "IMAGE", "links": [first_link + length + 1]}],
                  "widgets_values": ["a red circle", "", 1, "fixed", 2, 7.0, "euler", 0, 0, 1]})
    links_out.append([first_link + length, sink - 1, 0, sink, 0, "LN_MODEL"])
    nodes.append({"id": sink + 1, "type": "lora-nodes.SaveImages", "mode": 0,
                  "inputs": [{"name": "images", "type": "IMAGE", "link": first_link + length + 1}],
                  "outputs": [], "widgets_values": ["ui"]})
    links_out.append([first_link + length + 1, sink, 0, sink + 1, 0, "IMAGE"])


# ---------------------------------------------------------------------------------------------
# PNGs


def png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)


def png_bytes(chunks: list[tuple[bytes, bytes]]) -> bytes:
    """A valid 1x1 RGB PNG with extra chunks (text chunks go before the image data)."""
    header = png_chunk(b"IHDR", struct.pack(">IIBBBBB", 1, 1, 8, 2, 0, 0, 0))
    pixels = png_chunk(b"IDAT", zlib.compress(b"\x00\xff\x00\x00"))
    extra = b"".join(png_chunk(kind, body) for kind, body in chunks)
    return b"\x89PNG\r\n\x1a\n" + header + extra + pixels + png_chunk(b"IEND", b"")


def text_chunk(key: str, text: bytes, compressed: bool, international: bool) -> tuple[bytes, bytes]:
    key_bytes = key.encode("latin-1", "replace")[:79] or b"k"
    if international:
        body = text if not compressed else zlib.compress(text)
        return b"iTXt", key_bytes + b"\x00" + bytes([int(compressed), 0]) + b"\x00\x00" + body
    if compressed:
        return b"zTXt", key_bytes + b"\x00\x00" + zlib.compress(text)
    return b"tEXt", key_bytes + b"\x00" + text


@st.composite
def pngs(draw) -> Case:
    chunks = []
    for _ in range(draw(st.integers(0, 3))):
        key = draw(st.sampled_from(["lora-nodes", "prompt", "workflow", "parameters", "x"]))
        source = draw(st.sampled_from(["ours", "api", "ui", "junk", "huge"]))
        if source == "ours":
            text = draw(our_workflows()).data
        elif source == "api":
            text = draw(comfy_api_workflows()).data
        elif source == "ui":
            text = draw(comfy_ui_workflows()).data
        elif source == "junk":
            text = draw(st.binary(max_size=40))
        else:  # over PIL's text-chunk limits once decompressed
            text = b"[" + b"1," * draw(st.sampled_from([300_000, 2_000_000, 10_000_000])) + b"1]"
        chunks.append(text_chunk(key, text, compressed=source == "huge" or draw(st.booleans()),
                                 international=draw(st.booleans())))
    data = png_bytes(chunks)
    damage = draw(st.sampled_from(["none", "none", "truncate", "bytes", "not-png", "empty", "crc"]))
    if damage == "truncate":
        data = data[: draw(st.integers(0, len(data) - 1))]
    elif damage == "bytes":
        data = bytearray(data)
        for _ in range(draw(st.integers(1, 6))):
            data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
        data = bytes(data)
    elif damage == "not-png":
        data = draw(st.sampled_from([b"GIF89a" + data[8:], b"%PDF-1.4", b"<html>", draw(st.binary(max_size=64))]))
    elif damage == "empty":
        data = b""
    elif damage == "crc":
        data = data[:-5] + b"\x00\x00\x00\x00\x00"
    return Case("image.png", data, note=damage)


# ---------------------------------------------------------------------------------------------
# LoRA files


@dataclass
class LoRAShapes:
    """Module names and weight shapes of builtin:tiny, to build LoRA files that mostly fit."""

    modules: list[tuple[str, str, tuple[int, ...]]] = field(default_factory=list)  # kohya, dotted, shape


_SHAPES = LoRAShapes()


def tiny_shapes() -> LoRAShapes:
    if not _SHAPES.modules:

        base = tiny_base()
        names = base.kohya_names
        for dotted, module in sorted(base.lora_targets.items()):
            if dotted in names:
                _SHAPES.modules.append((names[dotted], dotted, tuple(module.weight.shape)))
    return _SHAPES


_BASE: list[Any] = []


def tiny_base():
    """builtin:tiny on the CPU, loaded once per process."""
    if not _BASE:
        from lora_nodes.models.loading import load_base

        _BASE.append(load_base("builtin:tiny", dtype="float32", device="cpu"))
    return _BASE[0]


@st.composite
def lora_files(draw) -> Case:
    """A LoRA file over builtin:tiny's modules: half of them well-formed (so that loading, placing and
    applying are exercised, with metadata still drawn at random), half damaged in their tensors, keys
    or bytes."""
    import torch

    intact = draw(st.booleans())
    shapes = tiny_shapes().modules
    picked = draw(st.lists(st.sampled_from(shapes), min_size=int(intact), max_size=4, unique_by=lambda m: m[0]))
    layout = draw(st.sampled_from(["kohya", "kohya", "peft", "loha", "lokr", "full"]))
    tensors: dict[str, Any] = {}
    for kohya, dotted, shape in picked:
        tensors.update(_module_tensors(draw, layout, kohya, dotted, shape, intact))
    for _ in range(0 if intact else draw(st.integers(0, 3))):  # damage a few tensors
        if not tensors:
            break
        key = draw(st.sampled_from(sorted(tensors)))
        tensors[key] = _damaged(draw, tensors[key])
    if not intact and draw(st.integers(0, 5)) == 0:
        tensors[draw(st.sampled_from(["x", "lora_unet_x.alpha", "unet.x.lora_A.weight"]))] = torch.ones(
            draw(st.lists(st.integers(0, 3), max_size=3)))
    metadata = draw(st.one_of(st.none(), st.dictionaries(
        st.sampled_from(["ss_tag_frequency", "lora_adapter_metadata", "ss_base_model_version", "ss_network_dim",
                         "ss_network_alpha", "modelspec.architecture", "x"]),
        st.one_of(st.sampled_from(['{"a": {"b": "x"}}', '{"a": {"b": Infinity}}', "[1, 2]", "{", "sdxl_base_v1-0",
                                   '{"lora_alpha": "x", "alpha_pattern": [1]}', '{"r": 0}', "sd_v1", ""]),
                  st.text(max_size=10)))))
    return Case("lora.safetensors", lora={**tensors, "__metadata__": metadata},
                note=f"{layout}, {'intact' if intact else 'damaged'}", intact=intact)


def _rand(shape: tuple[int, ...]):
    import torch

    return torch.randn(shape) * 0.01


def _module_tensors(draw, layout: str, kohya: str, dotted: str, shape: tuple[int, ...],
                    intact: bool = False) -> dict[str, Any]:
    """One module's tensors in ``layout`` for a weight of ``shape``. ``intact``: well-formed (a rank of 1
    to 4, a positive alpha, LoKr factors whose Kronecker product has the weight's shape, no DoRA);
    otherwise a rank of 0, alphas of 0 or -1, LoKr factors of any shape and odd DoRA scales are drawn too."""
    import torch

    rank = draw(st.integers(1 if intact else 0, 4))
    out_dim, in_dim = shape[0], math.prod(shape[1:])
    tail = shape[2:]
    if layout == "peft":
        return {f"{dotted}.lora_A.weight": _rand((rank, shape[1], *tail)),
                f"{dotted}.lora_B.weight": _rand((out_dim, rank, *([1] * len(tail))))}
    if layout == "loha":
        return {f"{kohya}.hada_w1_a": _rand((out_dim, rank)), f"{kohya}.hada_w1_b": _rand((rank, in_dim)),
                f"{kohya}.hada_w2_a": _rand((out_dim, rank)), f"{kohya}.hada_w2_b": _rand((rank, in_dim)),
                f"{kohya}.alpha": torch.tensor(float(max(rank, 1)))}
    if layout == "lokr":
        if intact:  # a 1x1 first factor: the second has the weight's shape
            return {f"{kohya}.lokr_w1": _rand((1, 1)), f"{kohya}.lokr_w2": _rand((out_dim, in_dim))}
        return {f"{kohya}.lokr_w1": _rand((draw(st.integers(1, 4)), draw(st.integers(1, 4)))),
                f"{kohya}.lokr_w2": _rand((max(out_dim // 2, 1), max(in_dim // 2, 1)))}
    if layout == "full":
        return {f"{kohya}.diff": _rand(shape)}
    found = {f"{kohya}.lora_down.weight": _rand((rank, shape[1], *tail)),
             f"{kohya}.lora_up.weight": _rand((out_dim, rank, *([1] * len(tail)))),
             f"{kohya}.alpha": torch.tensor(float(draw(st.sampled_from([1, rank] if intact else [1, 4, 0, -1]))))}
    if not intact and draw(st.integers(0, 6)) == 0:
        found[f"{kohya}.dora_scale"] = _rand(draw(st.sampled_from([(out_dim, 1), (1, in_dim), (3,), ()])))
    return found


def _damaged(draw, tensor):
    import torch

    how = draw(st.sampled_from(["nan", "inf", "huge", "vector", "empty", "1d", "fp16", "bf16", "int", "bool",
                                "scalar", "transpose"]))
    if how == "nan":
        tensor = tensor.clone().float().reshape(-1)
        if tensor.numel():
            tensor[0] = float("nan")
        return tensor.reshape(tensor.shape)
    if how == "inf":
        return torch.full_like(tensor.float(), float("inf"))
    if how == "huge":
        return torch.full_like(tensor.float(), 1e30)
    if how == "vector":
        return torch.ones(3)
    if how == "empty":
        return torch.ones(0)
    if how == "1d":
        return tensor.reshape(-1)
    if how == "fp16":
        return tensor.half()
    if how == "bf16":
        return tensor.bfloat16()
    if how == "int":
        return (tensor * 100).to(torch.int8)
    if how == "bool":
        return tensor > 0
    if how == "scalar":
        return torch.tensor(float("nan"))
    return tensor.T.contiguous() if tensor.dim() == 2 else tensor


def lora_payload(case: Case, draw_damage: int) -> bytes:
    """The case's tensors as a .safetensors file, with some byte-level damage (0: none)."""
    import torch
    from safetensors.torch import save

    tensors = {k: v for k, v in (case.lora or {}).items() if k != "__metadata__" and isinstance(v, torch.Tensor)}
    metadata = (case.lora or {}).get("__metadata__")
    data = save({k: v.contiguous() for k, v in tensors.items()}, metadata=metadata)
    rng = random.Random(draw_damage)
    if draw_damage % 7 == 1:
        return data[: rng.randrange(len(data))] if data else data
    if draw_damage % 7 == 2 and len(data) > 16:
        data = bytearray(data)
        data[rng.randrange(8, min(len(data), 200))] = rng.randrange(256)
        return bytes(data)
    if draw_damage % 7 == 3:
        return struct.pack("<Q", 2**40) + data[8:]
    return data


# ---------------------------------------------------------------------------------------------
# running one case


class Hang(Exception):
    """A case ran past :data:`CASE_SECONDS`."""


@contextlib.contextmanager
def time_bound(seconds: float) -> Iterator[None]:
    def expire(_signum, _frame):
        raise Hang(f"over {seconds:.0f} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@dataclass
class Outcome:
    """How one case ended, and what happened when it went wrong."""

    result: str  # ok, problem, crash, hang
    detail: str = ""


def cli(argv: list[str]) -> tuple[int, str, str]:
    """Run ``lora-nodes ARGV`` in this process; (exit code, stdout, stderr)."""
    from lora_nodes.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue(), err.getvalue()


CONVERT_TARGETS = ("yaml", "json", "comfyui-api", "comfyui-ui")


def check_workflow_file(path: Path, folder: Path, target: str) -> Outcome:
    """validate, convert to ``target``, and (when invalid) run: exit 0 or 2 only, one invalid event."""
    code, _, err = cli(["validate", str(path)])
    if code not in (0, 2) or "Traceback" in err:
        return Outcome("crash", f"validate exit {code}: {err[-400:]}")
    converted, _, err = cli(["convert", str(path), "--to", target, "-o", str(folder / f"out.{target}")])
    if converted not in (0, 2) or "Traceback" in err:
        return Outcome("crash", f"convert --to {target} exit {converted}: {err[-400:]}")
    if code == 0:
        return run_valid(path, folder)
    ran, out, err = cli(["run", str(path), "--events", "jsonl", "--output-dir", str(folder / "out"),
                         "--cache-dir", str(folder / "cache")])
    events = [json.loads(line)["event"] for line in out.splitlines() if line.startswith("{")]
    if ran != 2 or events != ["invalid"]:
        return Outcome("crash", f"run of an invalid workflow: exit {ran}, events {events}: {err[-300:]}")
    return Outcome("problem")


RUN_SECONDS = 60.0  # a valid workflow may ask for real work (2,000 steps): past this it counts as slow


def run_valid(path: Path, folder: Path) -> Outcome:
    """Run a workflow that validated: it draws (exit 0) or fails naming the node (exit 1, an error event)."""
    signal.setitimer(signal.ITIMER_REAL, 0)  # the case's bound covered reading it; running has its own
    try:
        with time_bound(RUN_SECONDS):
            ran, out, err = cli(["run", str(path), "--events", "jsonl", "--output-dir", str(folder / "out"),
                                 "--cache-dir", str(folder / "cache")])
    except Hang:
        return Outcome("slow", f"a valid workflow ran past {RUN_SECONDS:.0f} s")
    events = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    errors = [e for e in events if e["event"] == "error"]
    if ran == 0 and not errors:
        return Outcome("ok")
    if ran == 1 and len(errors) == 1 and errors[0].get("node") and "Traceback" not in err:
        return Outcome("failed", errors[0]["message"][:200])  # a clear error naming the node
    return Outcome("crash", f"run of a valid workflow: exit {ran}, errors {errors[:1]}: {err[-300:]}")


def check_lora_file(path: Path) -> Outcome:
    """``inspect`` (exit 0 or 2), then apply at strength 1: a LoRAError, or finite weights."""
    import torch

    from lora_nodes.errors import NodeError
    from lora_nodes.lora.files import read_lora
    from lora_nodes.lora.placement import check_placement
    from lora_nodes.lora.recipe import AppliedLoRA, ModelRecipe

    code, _, err = cli(["inspect", str(path)])
    if code not in (0, 2) or "Traceback" in err:
        return Outcome("crash", f"inspect exit {code}: {err[-400:]}")
    base = tiny_base()
    try:
        lora = read_lora(path)
        check_placement(lora, base)
        patched = ModelRecipe(base).with_loras(AppliedLoRA(lora, 1.0, 1.0)).materialize()
        bad = [name for name, module in patched.lora_targets.items() if not torch.isfinite(module.weight).all()]
    except NodeError as exc:
        return Outcome("problem", str(exc)[:200])
    finally:
        ModelRecipe(base).materialize()  # back to the plain base for the next case
    if bad:
        return Outcome("crash", f"applied non-finite weights to {bad[:3]} without an error")
    return Outcome("ok")


def run_case(case: Case, folder: Path, damage: int = 0) -> Outcome:
    """Write ``case`` into ``folder`` and give it to lora-nodes; never raises.

    ``damage`` picks the byte-level damage of a LoRA file and the format a workflow is converted to.
    """
    path = folder / case.name
    try:
        with time_bound(CASE_SECONDS):
            if case.lora is not None:
                path.write_bytes(lora_payload(case, 0 if case.intact else damage))
                return check_lora_file(path)
            path.write_bytes(case.data)
            return check_workflow_file(path, folder, CONVERT_TARGETS[damage % len(CONVERT_TARGETS)])
    except Hang as exc:
        return Outcome("hang", str(exc))
    except Exception as exc:  # noqa: BLE001 - that is exactly what is counted
        return Outcome("crash", "".join(traceback.format_exception_only(exc)).strip()[-400:])


STRATEGIES: dict[str, Callable[[], st.SearchStrategy[Case]]] = {
    "ours": our_workflows, "comfy-api": comfy_api_workflows, "comfy-ui": comfy_ui_workflows, "png": pngs,
    "lora": lora_files,
}


def run_kind(kind: str, cases: int, on_outcome: Callable[[Case, Outcome], None], fixed_seed: int = 0) -> None:
    """Generate ``cases`` cases of ``kind`` (the same ones for the same seed) and hand each outcome on."""
    with tempfile.TemporaryDirectory(prefix=f"lora-nodes-fuzz-{kind}-") as name:
        folder = Path(name)
        shutil.copy(EXAMPLE_LORA, folder / "x.safetensors")  # the LoRA the generated workflows load

        @seed(fixed_seed)
        @settings(max_examples=cases, deadline=None, database=None, phases=[Phase.generate],
                  suppress_health_check=list(HealthCheck))
        @given(STRATEGIES[kind](), st.integers(0, 2**16))
        def one(case: Case, damage: int) -> None:
            on_outcome(case, run_case(case, folder, damage))

        import torch

        # the generated tensors' values come from torch's global generator: seeded here, so that the
        # same seed gives the same cases whatever ran before in the process (a test suite, a model load)
        torch.manual_seed(fixed_seed)
        one()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", type=int, default=1000, help="cases per kind (default 1000)")
    parser.add_argument("--kind", choices=KINDS, action="append", help="only this kind (repeatable)")
    parser.add_argument("--seed", type=int, default=0, help="generator seed (same seed, same cases)")
    parser.add_argument("--show", type=int, default=0, help="print up to N crashing/hanging cases per kind")
    args = parser.parse_args(argv)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    rows, failed = [], False
    for kind in args.kind or KINDS:
        counts: Counter[str] = Counter()
        shown: list[str] = []
        started = time.perf_counter()

        def record(case: Case, outcome: Outcome, counts=counts, shown=shown) -> None:
            counts[outcome.result] += 1
            if outcome.result in ("crash", "hang") and len(shown) < args.show:
                shown.append(f"  {outcome.result}: {outcome.detail}\n    case: {case.describe()}")

        run_kind(kind, args.cases, record, args.seed)
        seconds = time.perf_counter() - started
        rows.append((kind, sum(counts.values()), counts["ok"], counts["problem"], counts["failed"], counts["slow"],
                     counts["crash"], counts["hang"], seconds))
        failed |= bool(counts["crash"] or counts["hang"])
        print(f"{kind}: {dict(counts)} in {seconds:.0f} s", file=sys.stderr, flush=True)
        for line in shown:
            print(line, file=sys.stderr)
    print("| kind | cases | ok | problem | failed | slow | crash | hang | seconds |")
    print("|---|---|---|---|---|---|---|---|---|")
    for kind, total, ok, problem, failed, slow, crash, hang, seconds in rows:
        print(f"| {kind} | {total} | {ok} | {problem} | {failed} | {slow} | {crash} | {hang} | {seconds:.0f} |")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
