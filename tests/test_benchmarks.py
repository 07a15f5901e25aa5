"""The benchmark scripts run (at a tiny size) and print their tables; targets are not asserted here."""

import importlib.util

import pytest
from conftest import REPO


def load(name):
    spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_sample_overhead_benchmark_prints_its_table(capsys):
    figures = load("sample_overhead").main(["--steps", "2", "--repeats", "1"])
    out = capsys.readouterr().out
    assert "overhead" in out and "4-variant sweep" in out
    assert figures["node_s"] > 0 and figures["direct_s"] > 0 and figures["sweep_mb"] > 0


def test_apply_speed_benchmark_prints_its_table(capsys):
    results = load("apply_speed").main(["--repeats", "1", "--source", "builtin:tiny"])
    assert "strength switch" in capsys.readouterr().out
    assert results["builtin:tiny"]["ours_first"] > 0 and results["builtin:tiny"]["diffusers_switch"] > 0


def test_apply_lora_benchmark_prints_its_table(capsys):
    figures = load("apply_lora").main(["--tiny", "--repeats", "1"])
    out = capsys.readouterr().out
    assert "one strength changed" in out and "vs floor" in out
    assert all(value > 0 for value in figures.values())


def test_apply_lora_benchmark_on_flux_times_both_layouts(capsys):
    figures = load("apply_lora").main(["--family", "flux", "--tiny", "--repeats", "1"])
    out = capsys.readouterr().out
    for row in ("PEFT: full apply (files read)", "PEFT: one strength changed", "kohya: full apply (files read)",
                "kohya: one strength changed"):
        assert row in out
    assert "Flux transformer" in out and "vs floor" in out
    assert figures["diffusers_full"] > 0 and figures["kohya_ours_full"] > 0  # diffusers reads the PEFT files
    assert all(value > 0 for value in figures.values())


def test_shapes_quality_benchmark_prints_its_tables(capsys):
    figures = load("shapes_quality").main(["--seeds", "1", "--steps", "4", "--threads", "1"])
    out = capsys.readouterr().out
    assert "colour" in out and "shape" in out
    assert figures


def test_train_speed_benchmark_prints_its_table(capsys):
    figures = load("train_speed").main(["--tiny"])
    out = capsys.readouterr().out
    for row in ("PEFT + diffusers loop", "TrainLoRA, no caches", "TrainLoRA, cached"):
        assert row in out
    assert "steps/s" in out and "peak MB" in out
    assert all(f["steps_per_s"] > 0 and f["peak_mb"] > 0 for f in figures.values())


def test_quick_commands_benchmark_prints_its_table(capsys):
    figures = load("quick_commands").main(["--repeats", "1", "--mode", "source", "--no-warm-up"])
    out = capsys.readouterr().out
    assert "lora-nodes validate workflows/quickstart.yaml" in out and 'python -c "import torch"' in out
    assert all(row["median"] > 0 and row["cpu"] > 0 for row in figures["source"].values())


def test_the_whole_process_cost_is_the_median_of_each_rounds_difference():
    """A slow round slows both of its runs: the difference within a round cancels it, the difference
    of the two medians would not."""
    whole = load("apply_whole_process")
    runs = {("ours", "with"): [10.5, 14.5, 11.5], ("ours", "without"): [10.0, 14.0, 9.0],
            ("ours, first run", "with"): [10.8, 14.9, 9.9], ("diffusers", "with"): [15.0, 19.0, 14.0],
            ("diffusers", "without"): [11.0, 15.0, 10.0]}
    costs = whole.lora_costs(runs)
    # rounds' differences: ours 0.5, 0.5, 2.5; first run 0.8, 0.9, 0.9; diffusers 4, 4, 4
    assert costs == pytest.approx({"ours": 0.5, "ours, first run": 0.9, "diffusers": 4.0})


def test_the_whole_process_table_compares_whole_runs_as_well(capsys):
    """Beside the LoRAs' cost, the table says how long a whole run with them took on each side."""
    import argparse

    whole = load("apply_whole_process")
    medians = {("ours", "with"): 8.0, ("ours", "without"): 7.0, ("ours, first run", "with"): 8.5,
               ("diffusers", "with"): 12.0, ("diffusers", "without"): 9.0}
    figures = {"floor": 0.3, "bound_reads": 0.02, "bound_copies": 0.05, "ours_full": 0.4, "ours_switch": 0.36,
               "ours_last_use": 0.33, "diffusers_full": 2.0, "diffusers_switch": 2.2, "bound_full": 0.37,
               "bound_switch": 0.35, "bound_last_use": 0.32}
    whole.print_table(argparse.Namespace(tiny=False, repeats=3), medians,
                      {"ours": 1.0, "ours, first run": 1.5, "diffusers": 3.0}, figures)
    out = capsys.readouterr().out
    assert "8.00 s ours, 12.00 s diffusers', 1.5x" in out  # 12 / 8
    assert "3.0x" in out and "2.0x" in out  # the costs: 3 / 1 and 3 / 1.5


def test_sweep_memory_benchmark_prints_its_table(capsys):
    figures = load("sweep_memory").main(["--tiny", "--repeats", "1"])
    out = capsys.readouterr().out
    assert "4-variant strength sweep" in out and "vs single" in out
    assert all(f["peak_mib"] > 0 and f["anonymous_mib"] > 0 and f["wall_s"] > 0 for f in figures.values())
