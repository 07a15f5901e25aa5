"""--workers N and --ray local: the same pixels as a serial run, files written by the driver, progress
aggregated, and a variant that fails reported while the others are written."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from conftest import write_workflow
from PIL import Image

from lora_nodes.cli import main

# clip_skip 8 passes validation (ComfyUI's range) but builtin:tiny's text encoder has fewer layers: the
# variant that asks for it fails while running, the others do not
WORKFLOW = """
format: lora-nodes/1
nodes:
  base:   {type: LoadBase, inputs: {source: "builtin:tiny"}}
  images: {type: Sample, inputs: {model: [base, model], prompt: "a red circle", seed: 1, steps: 1,
                                  width: 32, height: 32}}
  save:   {type: SaveImages, inputs: {images: [images, images], prefix: sweep/img}}
"""
SWEEPS = ["--sweep", "images.seed=1,2", "--sweep", "images.clip_skip=1,8"]
GOOD = ["img_images.seed=1_images.clip_skip=1_00001.png", "img_images.seed=2_images.clip_skip=1_00001.png"]


def _run(folder: Path, capsys, *extra: str) -> tuple[int, Path, list[dict]]:
    folder.mkdir(exist_ok=True)
    workflow = write_workflow(folder, WORKFLOW)
    out = folder / "out"
    capsys.readouterr()
    code = main(["run", str(workflow), "--output-dir", str(out), "--events", "jsonl", *SWEEPS, *extra])
    events = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    return code, out, events


def _pixels(out: Path) -> dict[str, np.ndarray]:
    return {p.name: np.asarray(Image.open(p)) for p in sorted((out / "sweep").glob("img_*.png"))}


def _check_like_serial(code: int, out: Path, events: list[dict], reference: dict[str, np.ndarray]) -> None:
    assert code == 1  # some variants failed ...
    assert sorted(_pixels(out)) == GOOD  # ... the others were written, with serial's names
    for name, pixels in _pixels(out).items():
        assert np.array_equal(pixels, reference[name]), name  # and serial's pixels
    ends = [e for e in events if e["event"] == "variant_end"]
    assert sorted(e["done"] for e in ends) == [1, 2, 3, 4] and {e["total"] for e in ends} == {4}
    failed = [e for e in ends if not e["ok"]]
    assert len(failed) == 2 and all(e["error"]["node"] == "images" for e in failed)
    assert all(Path(f).is_relative_to(out) for e in ends for f in e["files"])  # the driver wrote them, here
    node_events = [e for e in events if e["event"] == "executed"]
    assert node_events and all(e["variant"] and e["worker"] for e in node_events)  # each tagged
    assert [e for e in events if e["event"] == "grid"]  # the grid is drawn with the failed cells grey


def test_worker_processes_give_serial_pixels_and_report_the_failed_variants(tmp_path, capsys):
    workflow = write_workflow(tmp_path, WORKFLOW)
    serial_out = tmp_path / "serial"
    code = main(["run", str(workflow), "--output-dir", str(serial_out), "--no-grid", *SWEEPS])
    assert code == 1 and "2 of 4 variants failed" in capsys.readouterr().err
    reference = _pixels(serial_out)
    assert sorted(reference) == GOOD

    code, out, events = _run(tmp_path / "processes", capsys, "--workers", "2")
    _check_like_serial(code, out, events, reference)
    assert {e["worker"] for e in events if e["event"] == "variant_end"} == {"process-1", "process-2"}
    # Ray's workers are the same VariantWorker behind the same driver code (_Tally); Ray's pixels are
    # compared with serial's by the benchmark's test below (a Ray cluster takes ~15 s to start)


def test_the_sweep_benchmark_runs_every_mode_at_its_smallest_and_prints_its_table(capsys, monkeypatch):
    import importlib.util

    from conftest import REPO

    spec = importlib.util.spec_from_file_location("sweep_workers", REPO / "benchmarks" / "sweep_workers.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    results = module.main(["--strengths", "2", "--seeds", "1", "--steps", "1"])
    out = capsys.readouterr().out
    assert "peak MiB (all processes)" in out and "workers 2" in out
    if module.ray_installed():  # `--ray local` draws serial's pixels (the test's Ray check)
        assert "ray local" in results
    for mode, result in results.items():
        assert result["ok"] == 2 and result["images"] == 2 and result["same_pixels"], mode
        assert result["seconds"] > 0 and result["peak_mib"] > 100, mode  # a process with torch loaded


def test_ray_without_ray_installed_says_how_to_install_it_before_anything_runs(tmp_path, capsys, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "ray", None)  # import ray fails, as where it is not installed
    workflow = write_workflow(tmp_path, WORKFLOW)
    assert main(["run", str(workflow), "--output-dir", str(tmp_path / "out"), "--ray", "local", *SWEEPS]) == 2
    assert "pip install 'lora-nodes[ray]'" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
