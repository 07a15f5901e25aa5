"""Validation reports every problem at once, with node, input and code, before anything runs."""

import json

from conftest import write_workflow

from lora_nodes.cli import main
from lora_nodes.graph import load_workflow
from lora_nodes.graph.validate import check
from lora_nodes.nodes import catalogue

EVERYTHING_WRONG = """
format: lora-nodes/1
nodes:
  base:    {type: LoadBase, inputs: {source: "builtin:tiny", dtype: float8}}
  typo:    {type: LoadBsae}
  lora:    {type: LoadLoRA, inputs: {path: missing.safetensors}}
  a:       {type: ApplyLoRA, inputs: {model: [b, model], lora: [lora, lora], strength_model: 50}}
  b:       {type: ApplyLoRA, inputs: {model: [a, model], lora: [lora, lora]}}
  wrong:   {type: Sample, inputs: {model: [lora, lora], prompt: x, stepz: 3}}
  ghost:   {type: Sample, inputs: {model: [nobody, model], prompt: x, seed: "abc"}}
  noout:   {type: Sample, inputs: {model: [base, latent], prompt: x, sampler: heunn}}
  noprompt: {type: Sample, inputs: {model: [base, model]}}
  literal: {type: ApplyLoRA, inputs: {model: base, lora: [lora, 0]}}
  save:    {type: SaveImages, inputs: {images: [noprompt, images]}}
"""


def problems_of(tmp_path, text):
    problems, _ = check(load_workflow(write_workflow(tmp_path, text)), catalogue())
    return {(p.code, p.node, p.input) for p in problems}


def test_every_problem_is_reported_at_once(tmp_path):
    found = problems_of(tmp_path, EVERYTHING_WRONG)
    expected = {
        ("invalid_choice", "base", "dtype"),
        ("unknown_node_type", "typo", None),
        ("file_not_found", "lora", "path"),
        ("out_of_range", "a", "strength_model"),
        ("type_mismatch", "wrong", "model"),
        ("unknown_input", "wrong", "stepz"),
        ("missing_node", "ghost", "model"),
        ("invalid_value", "ghost", "seed"),
        ("missing_output", "noout", "model"),
        ("invalid_choice", "noout", "sampler"),
        ("missing_input", "noprompt", "prompt"),
        ("type_mismatch", "literal", "model"),
    }
    assert expected <= found, expected - found
    cycles = [p for p in found if p[0] == "cycle"]
    assert len(cycles) == 1 and cycles[0][1] in {"a", "b"}


def test_cycle_message_names_its_nodes(tmp_path):
    problems, _ = check(load_workflow(write_workflow(tmp_path, EVERYTHING_WRONG)), catalogue())
    cycle = next(p for p in problems if p.code == "cycle")
    assert "a" in cycle.message.split() or "a ->" in cycle.message
    assert "b" in cycle.message


def test_unknown_type_suggests_the_close_one(tmp_path):
    problems, _ = check(load_workflow(write_workflow(tmp_path, EVERYTHING_WRONG)), catalogue())
    typo = next(p for p in problems if p.code == "unknown_node_type")
    assert "LoadBase" in typo.message


def test_a_workflow_without_outputs_is_invalid(tmp_path):
    found = problems_of(tmp_path, "nodes:\n  base: {type: LoadBase}\n")
    assert ("no_outputs", None, None) in found


def test_validate_cli_exit_codes_and_json(tmp_path, capsys):
    bad = write_workflow(tmp_path, EVERYTHING_WRONG)
    assert main(["validate", str(bad), "--json"]) == 2
    listed = json.loads(capsys.readouterr().out)
    assert {"code", "node", "input", "message", "type"} <= set(listed[0])
    assert len(listed) >= 13
    good = write_workflow(tmp_path, "nodes:\n  b: {type: LoadBase}\n  s: {type: Sample, inputs: {model: [b, 0], "
                          "prompt: x}}\n  o: {type: SaveImages, inputs: {images: [s, images]}}\n", "good.yaml")
    assert main(["validate", str(good)]) == 0
    assert main(["validate", str(good), "--json"]) == 0
    assert json.loads(capsys.readouterr().out.split("\n", 1)[1]) == []


def test_invalid_run_exits_2_and_runs_nothing(tmp_path, capsys):
    bad = write_workflow(tmp_path, EVERYTHING_WRONG)
    out = tmp_path / "out"
    assert main(["run", str(bad), "--output-dir", str(out)]) == 2
    assert not out.exists()
    err = capsys.readouterr().err
    assert "node 'lora' (LoadLoRA), input 'path'" in err and "[file_not_found]" in err


def test_bad_set_is_reported_not_raised(tmp_path, capsys):
    good = write_workflow(tmp_path, "nodes:\n  b: {type: LoadBase}\n  s: {type: Sample, inputs: {model: [b, 0], "
                          "prompt: x}}\n  o: {type: SaveImages, inputs: {images: [s, images]}}\n")
    assert main(["validate", str(good), "--set", "nope.steps=3"]) == 2
    assert main(["validate", str(good), "--set", "s.steps=0"]) == 2
    assert main(["validate", str(good), "--set", "s.steps"]) == 2
    assert "out_of_range" in capsys.readouterr().err


def test_cli_and_readme_examples_are_valid(tmp_path, monkeypatch):
    """The example commands in `lora-nodes --help` and the README name nodes the workflows have."""
    import re
    import shlex
    import shutil

    from conftest import EXAMPLE_LORA, REPO

    from lora_nodes.cli import EXAMPLES

    (tmp_path / "workflows").symlink_to(REPO / "workflows")
    shutil.copy(EXAMPLE_LORA, tmp_path / "my_style.safetensors")
    monkeypatch.chdir(tmp_path)
    text = (EXAMPLES + (REPO / "README.md").read_text()).replace("\\\n", " ")
    found = re.findall(r"^\s*(lora-nodes run workflows/.*)$", text, flags=re.MULTILINE)
    commands = [c for c in found if "/models" not in c]
    assert len(commands) >= 3
    for command in commands:
        args = shlex.split(command.split("#")[0])[2:]
        args = [a for a in args if a != "--output-dir"]
        assert main(["validate", *args]) == 0, command
