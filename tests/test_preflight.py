"""`validate` finds a LoRA for another model family (and files that are no LoRA) before anything runs."""

from __future__ import annotations

import json

from conftest import EXAMPLE_LORA, WORKFLOWS, write_workflow
from safetensors.torch import save_file

from lora_nodes.cli import main
from lora_nodes.nodes import catalogue

SDXL_LORA = WORKFLOWS / "loras" / "tiny_sdxl_style.safetensors"  # says ss_base_model_version: sdxl_base_v1-0
SAMPLE_AND_SAVE = """
  images: {type: Sample, inputs: {model: [styled, model], prompt: x, steps: 2}}
  save:   {type: SaveImages, inputs: {images: [images, images]}}
"""


def apply_workflow(tmp_path, lora, base: str = "builtin:tiny", name: str = "apply.yaml"):
    return write_workflow(tmp_path, f"""
nodes:
  base:   {{type: LoadBase, inputs: {{source: "{base}"}}}}
  style:  {{type: LoadLoRA, inputs: {{path: "{lora}"}}}}
  styled: {{type: ApplyLoRA, inputs: {{model: [base, model], lora: [style, lora]}}}}
{SAMPLE_AND_SAVE}""", name)


def validate(capsys, path) -> tuple[int, list[dict]]:
    code = main(["validate", str(path), "--json"])
    out = capsys.readouterr().out
    return code, json.loads(out[out.index("["):])


def test_an_sdxl_lora_on_an_sd15_base_is_found_by_validate(tmp_path, capsys):
    code, problems = validate(capsys, apply_workflow(tmp_path, SDXL_LORA))
    assert code == 2
    (problem,) = problems
    assert problem["code"] == "family_mismatch" and (problem["node"], problem["input"]) == ("styled", "lora")
    assert "this LoRA is for SDXL, the base is SD1.5" in problem["message"]
    assert main(["validate", str(apply_workflow(tmp_path, SDXL_LORA))]) == 2  # the plain form says it too
    assert "this LoRA is for SDXL, the base is SD1.5" in capsys.readouterr().err


def test_the_family_is_read_from_keys_and_shapes_without_metadata(tmp_path, capsys, tiny_sdxl, tiny):
    from lora_nodes.lora.synthetic import synthetic_lora

    bare = tmp_path / "bare_sdxl.safetensors"
    save_file(synthetic_lora(tiny_sdxl, rank=2), str(bare))  # no metadata: te2 keys and the 80-wide context tell
    code, problems = validate(capsys, apply_workflow(tmp_path, bare))
    assert code == 2 and "this LoRA is for SDXL, the base is SD1.5" in problems[0]["message"]
    sd15 = tmp_path / "bare_sd15.safetensors"
    save_file(synthetic_lora(tiny, rank=2, fmt="peft"), str(sd15))
    code, problems = validate(capsys, apply_workflow(tmp_path, sd15, base="builtin:tiny-sdxl", name="other.yaml"))
    assert code == 2 and "this LoRA is for SD1.5, the base is SDXL" in problems[0]["message"]


def test_a_matching_lora_validates(tmp_path, capsys):
    assert validate(capsys, apply_workflow(tmp_path, EXAMPLE_LORA)) == (0, [])
    assert validate(capsys, apply_workflow(tmp_path, SDXL_LORA, base="builtin:tiny-sdxl", name="xl.yaml")) == (0, [])


def test_a_stack_with_a_lora_for_another_family_is_found(tmp_path, capsys):
    path = write_workflow(tmp_path, f"""
nodes:
  base:  {{type: LoadBase, inputs: {{source: "builtin:tiny"}}}}
  good:  {{type: LoadLoRA, inputs: {{path: "{EXAMPLE_LORA}"}}}}
  xl:    {{type: LoadLoRA, inputs: {{path: "{SDXL_LORA}"}}}}
  first: {{type: LoRAStack, inputs: {{lora_1: [good, lora], lora_2: [xl, lora], enabled_2: false}}}}
  stack: {{type: LoRAStack, inputs: {{stack: [first, stack], lora_3: [xl, lora]}}}}
  styled: {{type: ApplyLoRAStack, inputs: {{model: [base, model], stack: [stack, stack]}}}}
{SAMPLE_AND_SAVE}""")
    code, problems = validate(capsys, path)
    assert code == 2
    (problem,) = problems  # the switched-off slot is not reported
    assert problem["code"] == "family_mismatch" and (problem["node"], problem["input"]) == ("styled", "stack")
    assert "this LoRA is for SDXL, the base is SD1.5" in problem["message"] and "lora_3" in problem["message"]


def test_merge_without_model_of_two_namings_asks_for_the_model(tmp_path, capsys, tiny):
    from lora_nodes.lora.synthetic import synthetic_lora

    kohya, peft = tmp_path / "k.safetensors", tmp_path / "p.safetensors"
    save_file(synthetic_lora(tiny, rank=2), str(kohya))
    save_file(synthetic_lora(tiny, rank=2, fmt="peft"), str(peft))
    path = write_workflow(tmp_path, f"""
nodes:
  base:  {{type: LoadBase, inputs: {{source: "builtin:tiny"}}}}
  k:     {{type: LoadLoRA, inputs: {{path: "{kohya}"}}}}
  p:     {{type: LoadLoRA, inputs: {{path: "{peft}"}}}}
  stack: {{type: LoRAStack, inputs: {{lora_1: [k, lora], lora_2: [p, lora]}}}}
  merged: {{type: MergeLoRAs, inputs: {{stack: [stack, stack]}}}}
  styled: {{type: ApplyLoRA, inputs: {{model: [base, model], lora: [merged, lora]}}}}
{SAMPLE_AND_SAVE}""")
    code, problems = validate(capsys, path)
    assert code == 2 and [(p["node"], p["input"]) for p in problems] == [("merged", "model")]
    assert "connect the 'model' input" in problems[0]["message"]
    connected = path.read_text().replace("{stack: [stack, stack]}", "{stack: [stack, stack], model: [base, model]}")
    assert validate(capsys, write_workflow(tmp_path, connected, "connected.yaml")) == (0, [])


def test_a_single_file_base_is_read_from_its_header(tmp_path, capsys, tiny_sdxl):
    from lora_nodes.models.save import save_single_file

    checkpoint = tmp_path / "tiny_xl.safetensors"
    save_single_file(tiny_sdxl, checkpoint, "same")
    assert validate(capsys, apply_workflow(tmp_path, SDXL_LORA, base=str(checkpoint))) == (0, [])
    code, problems = validate(capsys, apply_workflow(tmp_path, EXAMPLE_LORA, base=str(checkpoint), name="sd15.yaml"))
    assert code == 2 and "this LoRA is for SD1.5, the base is SDXL" in problems[0]["message"]


def test_a_folder_that_is_no_pipeline_is_a_problem(tmp_path, capsys):
    folder = tmp_path / "not_a_model"
    (folder / "unet").mkdir(parents=True)
    code, problems = validate(capsys, apply_workflow(tmp_path, EXAMPLE_LORA, base=str(folder)))
    assert code == 2
    assert [(p["code"], p["node"], p["input"]) for p in problems] == [("bad_model", "base", "source")]
    assert "model_index.json" in problems[0]["message"]


def test_junk_lora_files_are_problems_not_crashes(tmp_path, capsys, tiny):
    import torch

    from lora_nodes.lora.synthetic import synthetic_lora

    broken = synthetic_lora(tiny, rank=2)
    broken[next(k for k in broken if k.endswith("lora_up.weight"))] = torch.randn(32, 3)
    junk = {"random.safetensors": bytes(range(256)) * 4, "empty.safetensors": b"", "garbage.pt": b"garbage" * 9}
    for name, data in junk.items():
        (tmp_path / name).write_bytes(data)
    save_file(broken, str(tmp_path / "mismatched.safetensors"))
    save_file({"some.weight": torch.ones(2)}, str(tmp_path / "not_a_lora.safetensors"))
    for name, expected in [("random.safetensors", "bad_lora"), ("empty.safetensors", "bad_lora"),
                           ("mismatched.safetensors", "bad_lora"), ("not_a_lora.safetensors", "bad_lora"),
                           ("garbage.pt", None)]:  # a pickle has no header to read: found when it loads
        code, problems = validate(capsys, apply_workflow(tmp_path, tmp_path / name, name=f"{name}.yaml"))
        assert code == (2 if expected else 0)
        assert [p["code"] for p in problems] == ([expected] if expected else []), (name, problems)
        assert all(name in p["message"] for p in problems)


JUNK_LITERALS = [{}, {"path": None}, {"path": 5}, {"path": ""}, {"source": None}, {"source": "/nowhere"},
                 {"source": "builtin:nope"}, {"enabled_1": "x"}, {"name": 3}]
JUNK_UPSTREAM = [{}, {"model": {}, "lora": {}}, {"model": {"family": 5}, "lora": {"family": None}},
                 {"stack": {"loras": [{}]}, "model": {"family": "sd1"}},
                 {"stack": {"loras": [{"namings": {"unet": ["kohya"]}}, {"namings": {"unet": ["diffusers"]}}]}},
                 {"lora_1": {}, "initial_lora": {"family": "sdxl"}, "model": {"family": "sd1", "source": "x"}}]


def test_preflights_never_raise_on_junk():
    from lora_nodes.nodes.lora import save_lora_preflight, train_lora_preflight

    checks = [spec.preflight for spec in catalogue().values() if spec.preflight] + [save_lora_preflight,
                                                                                    train_lora_preflight]
    for check in checks:
        for literals in JUNK_LITERALS:
            for upstream in JUNK_UPSTREAM:
                result = check(literals, upstream)
                assert isinstance(result.facts, dict) and isinstance(result.problems, list)


def test_save_and_train_preflights_speak_the_runtime_words():
    from lora_nodes.nodes.lora import save_lora_preflight, train_lora_preflight

    model = {"family": "sd1", "source": "builtin:tiny"}
    lora = {"family": "sdxl", "name": "xl"}
    saved = save_lora_preflight({}, {"lora": lora, "model": model})
    assert [(c, i) for c, i, _ in saved.problems] == [("family_mismatch", "lora")]
    assert "this LoRA is for SDXL, the base is SD1.5" in saved.problems[0][2]
    assert save_lora_preflight({}, {"lora": lora}).problems == []  # no model: nothing to compare with
    trained = train_lora_preflight({"name": "mine"}, {"model": model, "initial_lora": lora})
    assert [(c, i) for c, i, _ in trained.problems] == [("family_mismatch", "initial_lora")]
    assert trained.facts["family"] == "sd1"
    for node, preflight in (("SaveLoRA", save_lora_preflight), ("TrainLoRA", train_lora_preflight)):
        assert catalogue()[node].preflight is preflight
