"""Hostile input, generated: every case ends in success or a problem list, never a crash or a hang.

The generators live in ``scripts/fuzz.py`` (``python scripts/fuzz.py --cases 10000`` runs them at
any size); here each kind runs a small fixed-seed sample, so a failure reproduces exactly.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "fuzz.py"
CASES = {"ours": 30, "comfy-api": 20, "comfy-ui": 12, "png": 30, "lora": 30}


def _fuzz_module():
    if "lora_nodes_fuzz" not in sys.modules:
        spec = importlib.util.spec_from_file_location("lora_nodes_fuzz", SCRIPT)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # dataclasses look their module up there
        spec.loader.exec_module(module)
    return sys.modules["lora_nodes_fuzz"]


@pytest.mark.parametrize("kind", list(CASES))
def test_generated_inputs_end_in_success_or_a_problem(kind):
    fuzz = _fuzz_module()
    failures, results = [], []

    def record(case, outcome):
        results.append(outcome.result)
        if outcome.result in ("crash", "hang"):
            failures.append(f"{outcome.result}: {outcome.detail}\n  case: {case.describe()}")
        elif case.intact and outcome.result != "ok":  # a well-formed LoRA file of any layout must load and apply
            failures.append(f"refused: {outcome.detail}\n  case: {case.describe()}")

    fuzz.run_kind(kind, CASES[kind], record, fixed_seed=2)
    assert len(results) >= CASES[kind] // 2, "the generator produced too few cases to mean anything"
    assert "problem" in results and ("ok" in results or kind == "png"), f"{kind}: {sorted(set(results))}"
    assert not failures, f"{len(failures)} of {len(results)} {kind} cases crashed, hung or were refused:\n" + "\n".join(
        failures[:5])
