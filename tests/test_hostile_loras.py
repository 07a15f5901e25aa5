"""Hostile LoRA files: refused at load (and by `inspect`) with a message naming the file, never run.

Every bad file is made here from builtin:tiny's module names; the expected weights are computed
from the raw tensors, never with the code under test.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from lora_nodes.cli import main
from lora_nodes.engine.context import NodeContext
from lora_nodes.engine.events import Collector
from lora_nodes.errors import LoRAError, NodeError
from lora_nodes.lora.placement import check_placement
from lora_nodes.lora.recipe import AppliedLoRA, ModelRecipe
from lora_nodes.lora.synthetic import synthetic_lora
from lora_nodes.nodes.lora import load_lora
from lora_nodes.nodes.merge import merge_loras

# one attention module of builtin:tiny's UNet, in both namings, with its weight's shape [32, 32]
TARGET = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
KOHYA = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"


@pytest.fixture(scope="module")
def original() -> torch.Tensor:
    """TARGET's weight in a freshly built builtin:tiny (seeded), untouched by any other test's patching."""
    from lora_nodes.models.loading import load_base

    return load_base("builtin:tiny", dtype="float32", device="cpu").lora_targets[TARGET].weight.detach().clone()


@pytest.fixture(scope="module")
def clean(tiny) -> dict[str, torch.Tensor]:
    """A good rank-4 kohya LoRA for builtin:tiny (alpha 2)."""
    return synthetic_lora(tiny, rank=4, alpha=2.0, seed=3)


def changed(tensors: dict[str, torch.Tensor], **parts: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """``tensors`` with parts of the KOHYA module replaced (``None`` removes one); ``lora_down`` -> ``.lora_down.weight``."""
    out = dict(tensors)
    for part, value in parts.items():
        key = f"{KOHYA}.{part}" + (".weight" if part.startswith("lora_") else "")
        if value is None:
            out.pop(key, None)
        else:
            out[key] = value
    return out


def with_value(tensor: torch.Tensor, value: float) -> torch.Tensor:
    out = tensor.clone()
    out.view(-1)[1] = value
    return out


def hada(out: int = 32, inputs: int = 32, r1: int = 4, r2: int = 4, out2: int | None = None) -> dict[str, torch.Tensor]:
    return {"hada_w1_a": torch.randn(out, r1), "hada_w1_b": torch.randn(r1, inputs),
            "hada_w2_a": torch.randn(out2 or out, r2), "hada_w2_b": torch.randn(r2, inputs)}


def no_lora(**extra: torch.Tensor | None) -> dict[str, torch.Tensor | None]:
    return {"lora_down": None, "lora_up": None, **extra}


def bad_cases(clean: dict[str, torch.Tensor]) -> dict[str, tuple[dict[str, torch.Tensor], list[str]]]:
    """name -> (tensors, fragments the error must contain)."""
    down, up = clean[f"{KOHYA}.lora_down.weight"], clean[f"{KOHYA}.lora_up.weight"]
    return {
        "nan_up": (changed(clean, lora_up=with_value(up, float("nan"))), ["NaN or infinite", f"{KOHYA}.lora_up"]),
        "inf_down": (changed(clean, lora_down=with_value(down, float("inf"))), ["NaN or infinite", f"{KOHYA}.lora_down"]),
        "nan_alpha": (changed(clean, alpha=torch.tensor(float("nan"))), ["NaN or infinite", f"{KOHYA}.alpha"]),
        "absurd_up": (changed(clean, lora_up=with_value(up, 1e30)), ["beyond", "1e+30", f"{KOHYA}.lora_up"]),
        "absurd_alpha": (changed(clean, alpha=torch.tensor(1e30)), [KOHYA, "alpha"]),
        "zero_rank": (changed(clean, lora_down=torch.zeros(0, 32), lora_up=torch.zeros(32, 0)), [KOHYA, "rank 0"]),
        "rank_mismatch": (changed(clean, lora_up=torch.randn(32, 3)), [KOHYA, "rank 4"]),
        "dora_wrong_shape": (changed(clean, dora_scale=torch.ones(7)), [KOHYA, "dora_scale"]),
        "dora_nan": (changed(clean, dora_scale=torch.full((32, 1), float("nan"))), ["NaN", f"{KOHYA}.dora_scale"]),
        "vector_alpha": (changed(clean, alpha=torch.tensor([1.0, 2.0])), [KOHYA, "alpha has shape [2]"]),
        "empty_alpha": (changed(clean, alpha=torch.tensor([])), [KOHYA, "alpha has shape [0]"]),
        "down_1d": (changed(clean, lora_down=torch.randn(32)), [KOHYA, "down is 1-D"]),
        "lokr_missing_w2": (changed(clean, **no_lora(lokr_w1=torch.randn(4, 4))), [KOHYA, "lokr_w2"]),
        "lokr_half_factor": (changed(clean, **no_lora(lokr_w1_a=torch.randn(4, 2), lokr_w2=torch.randn(8, 8))),
                             [KOHYA, "lokr_w1_b"]),
        "loha_rank_mismatch": (changed(clean, **no_lora(**hada(r2=4) | {"hada_w2_b": torch.randn(3, 32)})),
                               [KOHYA, "hada_w2_b"]),
        "loha_shapes_differ": (changed(clean, **no_lora(**hada(out2=16))), [KOHYA, "Hadamard factors differ"]),
        "tucker_mid_wrong": (changed(clean, lora_down=torch.randn(4, 32, 1, 1), lora_up=torch.randn(32, 4, 1, 1),
                                     lora_mid=torch.randn(3, 3, 3, 3)), [KOHYA, "Tucker mid"]),
    }


CASES = ["nan_up", "inf_down", "nan_alpha", "absurd_up", "absurd_alpha", "zero_rank", "rank_mismatch",
         "dora_wrong_shape", "dora_nan", "vector_alpha", "empty_alpha", "down_1d", "lokr_missing_w2",
         "lokr_half_factor", "loha_rank_mismatch", "loha_shapes_differ", "tucker_mid_wrong"]


def run_load(path) -> tuple[tuple, Collector]:
    events = Collector()
    return load_lora.run(NodeContext("lora", "LoadLoRA", None, None, events), str(path)), events


def inspect_fails(capsys, path, *base: str) -> str:
    """`inspect` exits 2 with one `error:` line naming the file, and no traceback; returns stderr."""
    assert main(["inspect", str(path), *base]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err
    return err


@pytest.mark.parametrize("case", CASES)
def test_bad_numbers_and_structures_are_refused_at_load(case, clean, tmp_path, capsys):
    tensors, fragments = bad_cases(clean)[case]
    path = tmp_path / f"{case}.safetensors"
    save_file(tensors, str(path))
    with pytest.raises(LoRAError) as error:
        run_load(path)
    message = str(error.value)
    assert path.name in message and all(f in message for f in fragments), message
    err = inspect_fails(capsys, path, "--base", "builtin:tiny")
    assert path.name in err and all(f in err for f in fragments), err


def test_many_bad_keys_are_counted_not_all_listed(clean, tmp_path):
    tensors = {k: torch.full_like(v, float("nan")) if k.endswith("up.weight") else v for k, v in clean.items()}
    path = tmp_path / "all_nan.safetensors"
    save_file(tensors, str(path))
    with pytest.raises(LoRAError, match=r"in 40 tensors .* and 35 more"):
        run_load(path)


def test_a_peft_file_with_mismatched_ranks_is_refused(tiny, tmp_path):
    tensors = synthetic_lora(tiny, rank=4, fmt="peft")
    tensors[f"{TARGET}.lora_B.weight"] = torch.randn(32, 2)
    path = tmp_path / "peft_bad.safetensors"
    save_file(tensors, str(path))
    with pytest.raises(LoRAError, match=rf"peft_bad.safetensors: module '{TARGET}'.*rank 4"):
        run_load(path)


def write_bytes(tmp_path, name: str, data: bytes):
    path = tmp_path / name
    path.write_bytes(data)
    return path


def file_cases(tmp_path, clean):
    good = tmp_path / "good.safetensors"
    save_file(clean, str(good))
    data = good.read_bytes()
    header = b"this is not json"
    empty_st = tmp_path / "no_tensors.safetensors"
    save_file({}, str(empty_st))
    listed = tmp_path / "a_list.pt"
    torch.save([torch.ones(2)], listed)
    folder = tmp_path / "folder.safetensors"
    folder.mkdir()
    return {
        "truncated": (write_bytes(tmp_path, "truncated.safetensors", data[: len(data) // 2]), "not a readable"),
        "header_not_json": (write_bytes(tmp_path, "header.safetensors", len(header).to_bytes(8, "little") + header),
                            "not a readable"),
        "no_tensors": (empty_st, "holds no tensors"),
        "pickle_list": (listed, "holds a list"),
        "pickle_truncated": (write_bytes(tmp_path, "cut.pt", b"PK\x03\x04" + b"\x00" * 20), "not a readable .pt"),
        "empty_pickle": (write_bytes(tmp_path, "empty.pt", b""), "is empty"),
        "empty_safetensors": (write_bytes(tmp_path, "empty.safetensors", b""), "empty"),
        "folder": (folder, "is a folder"),
    }


def test_unreadable_files_are_errors_naming_the_file(clean, tmp_path, capsys):
    for name, (path, fragment) in file_cases(tmp_path, clean).items():
        with pytest.raises(LoRAError) as error:
            run_load(path)
        assert path.name in str(error.value) and fragment in str(error.value), (name, str(error.value))
        if name != "folder":  # inspect takes a folder for a diffusers model (and says it is not one)
            assert path.name in inspect_fails(capsys, path, "--base", "builtin:tiny"), name
    assert main(["inspect", str(tmp_path / "folder.safetensors")]) == 2
    assert "model_index.json" in capsys.readouterr().err


def applied_weight(tiny, lora) -> torch.Tensor:
    """The target's weight with ``lora`` applied at strength 1 (computed aside; the base is not changed)."""
    return ModelRecipe(tiny).with_loras(AppliedLoRA(lora)).weight(TARGET)


@pytest.mark.parametrize("tags", [
    '{"1_x": {"red circle": "many", "blue": 3}}',  # a count that is a string
    '{"1_x": {"red circle": Infinity, "blue": 3}}',  # not a whole number
    '{"1_x": [["red circle", 2]], "2_y": {"blue": 3}}',  # nested wrongly
    "{not json",
])
def test_bad_tag_frequency_only_warns(original, tags, clean, tiny, tmp_path, capsys):
    path = tmp_path / "tags.safetensors"
    save_file(clean, str(path), metadata={"ss_tag_frequency": tags})
    (lora, words), events = run_load(path)
    warnings = [e for e in events.events if e["event"] == "warning"]
    assert len(warnings) == 1 and "ss_tag_frequency" in warnings[0]["message"]
    assert words in ("blue", "")
    down, up = clean[f"{KOHYA}.lora_down.weight"], clean[f"{KOHYA}.lora_up.weight"]
    expected = original + 2.0 / 4 * up @ down
    torch.testing.assert_close(applied_weight(tiny, lora), expected)
    assert main(["inspect", str(path)]) == 0
    assert "warning: ss_tag_frequency" in capsys.readouterr().out


@pytest.mark.parametrize(("adapter", "scale"), [
    ("[1, 2]", 1.0),  # a list, not an object: alpha = rank
    ("{nope", 1.0),  # not JSON: alpha = rank
    ('{"unet.lora_alpha": 8, "unet.alpha_pattern": {"attn1.to_q": "junk"}}', 2.0),  # junk pattern: lora_alpha
    ('{"unet.lora_alpha": "eight"}', 1.0),  # junk alpha: alpha = rank
])
def test_bad_adapter_metadata_only_warns(original, adapter, scale, tiny, tmp_path):
    tensors = synthetic_lora(tiny, rank=4, fmt="peft", seed=5)
    path = tmp_path / "peft.safetensors"
    save_file(tensors, str(path), metadata={"lora_adapter_metadata": adapter})
    (lora, _), events = run_load(path)
    warnings = [e["message"] for e in events.events if e["event"] == "warning"]
    assert len(warnings) == 1 and "lora_adapter_metadata" in warnings[0]
    down, up = tensors[f"{TARGET}.lora_A.weight"], tensors[f"{TARGET}.lora_B.weight"]
    expected = original + scale * up @ down
    torch.testing.assert_close(applied_weight(tiny, lora), expected)


def test_a_nan_alpha_in_adapter_metadata_is_an_error(tiny, tmp_path):
    path = tmp_path / "peft_nan.safetensors"
    save_file(synthetic_lora(tiny, rank=4, fmt="peft"), str(path), metadata={"lora_adapter_metadata": '{"unet.lora_alpha": NaN}'})
    with pytest.raises(LoRAError, match="peft_nan.safetensors: module 'unet.*alpha is nan"):
        run_load(path)


# --------------------------------------------------------------------------- merging mixed namings


def merge(stack, model=None):
    events = Collector()
    ctx = NodeContext("merge", "MergeLoRAs", None, None, events)
    return merge_loras.run(ctx, stack, "concat", 0, 0.5, 0, model)[0]


def test_merging_kohya_and_peft_without_the_model_is_refused(tiny, tmp_path):
    from lora_nodes.lora.formats import parse_lora

    kohya = parse_lora(synthetic_lora(tiny, rank=4, alpha=2.0, seed=1), name="kohya_one")
    peft = parse_lora(synthetic_lora(tiny, rank=2, fmt="peft", seed=2), name="peft_two")
    with pytest.raises(NodeError) as error:
        merge((AppliedLoRA(kohya), AppliedLoRA(peft)))
    message = str(error.value)
    assert "'model'" in message and "kohya_one" in message and "peft_two" in message


def test_merging_kohya_and_peft_with_the_model_adds_both_deltas(original, tiny):
    from lora_nodes.lora.formats import parse_lora

    k_tensors = synthetic_lora(tiny, rank=4, alpha=2.0, seed=1)
    p_tensors = synthetic_lora(tiny, rank=2, fmt="peft", seed=2)
    stack = (AppliedLoRA(parse_lora(k_tensors, name="k"), 0.5, 0.5), AppliedLoRA(parse_lora(p_tensors, name="p")))
    merged = merge(stack, ModelRecipe(tiny))
    kohya_delta = 2.0 / 4 * k_tensors[f"{KOHYA}.lora_up.weight"] @ k_tensors[f"{KOHYA}.lora_down.weight"]
    peft_delta = p_tensors[f"{TARGET}.lora_B.weight"] @ p_tensors[f"{TARGET}.lora_A.weight"]  # alpha = rank
    expected = original + 0.5 * kohya_delta + peft_delta
    torch.testing.assert_close(applied_weight(tiny, merged), expected)
    assert len(merged.modules) == len({k.rsplit(".lora_", 1)[0] for k in p_tensors})  # one module per target


def test_merging_one_naming_without_the_model_still_works(original, tiny):
    from lora_nodes.lora.formats import parse_lora

    a, b = (synthetic_lora(tiny, rank=2, seed=s) for s in (7, 8))
    merged = merge((AppliedLoRA(parse_lora(a, name="a")), AppliedLoRA(parse_lora(b, name="b"))))
    delta = sum(t[f"{KOHYA}.lora_up.weight"] @ t[f"{KOHYA}.lora_down.weight"] for t in (a, b))
    torch.testing.assert_close(applied_weight(tiny, merged), original + delta)


def test_good_file_still_loads_with_its_metadata_json(clean, tmp_path):
    path = tmp_path / "fine.safetensors"
    save_file(clean, str(path), metadata={"ss_tag_frequency": json.dumps({"1_x": {"star": 2}})})
    (lora, words), events = run_load(path)
    assert words == "star" and not [e for e in events.events if e["event"] == "warning"]
    assert len(lora.modules) == 40


def test_a_one_dimensional_diff_where_a_matrix_belongs_fits_nothing(tiny, tmp_path, capsys):
    # found by scripts/fuzz.py: the family guess read a second dimension the diff does not have
    key = KOHYA.replace("attn1_to_q", "attn2_to_k") + ".diff"
    path = tmp_path / "flat.safetensors"
    save_file({key: torch.full((1024,), 0.01)}, str(path))
    (lora, _), _ = run_load(path)  # a 1-D diff is a legal module (norm layers have them)
    with pytest.raises(LoRAError, match="matches nothing"):  # what ApplyLoRA checks before patching
        check_placement(lora, tiny)
    assert main(["inspect", str(path), "--base", "builtin:tiny"]) == 0
    assert "matches nothing" in capsys.readouterr().out
