"""A sweep run serially, in worker processes and on a local Ray cluster: wall time and peak memory.

    python benchmarks/sweep_workers.py                      # 16 variants: 4 strengths x 4 seeds
    python benchmarks/sweep_workers.py --strengths 2 --seeds 1 --steps 1   # the smallest (the test's)

Each mode is a separate ``lora-nodes run`` process (``--workers 2``, ``--ray local --workers 2``) on
``builtin:shapes`` with the purple-star LoRA at 20 steps; memory is the peak of the resident memory of
that process and every process under it (worker processes, Ray's), sampled every 50 ms. Every mode's
images must equal the serial run's, pixel for pixel. Prints a table (and ``--json`` the numbers).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
LORA = REPO / "workflows" / "loras" / "purple_star.safetensors"
WORKFLOW = """
format: lora-nodes/1
nodes:
  base:   {{type: LoadBase, inputs: {{source: "builtin:shapes"}}}}
  star:   {{type: LoadLoRA, inputs: {{path: {lora}}}}}
  styled: {{type: ApplyLoRA, inputs: {{model: [base, model], lora: [star, lora], strength_model: 1.0}}}}
  images: {{type: Sample, inputs: {{model: [styled, model], prompt: "a blue square on a white background",
                                  seed: 0, steps: {steps}}}}}
  save:   {{type: SaveImages, inputs: {{images: [images, images], prefix: bench}}}}
"""
MODES = {"serial": [], "workers 2": ["--workers", "2"], "ray local": ["--ray", "local", "--workers", "2"]}


def ray_installed() -> bool:
    try:
        import ray  # noqa: F401
    except ImportError:
        return False
    return True


class PeakMemory:
    """The largest total resident memory of a process and its descendants, sampled in a thread."""

    def __init__(self, pid: int, every: float = 0.05):
        self.root, self.every, self.peak = psutil.Process(pid), every, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()

    def _total(self) -> int:
        total = 0
        try:
            processes = [self.root, *self.root.children(recursive=True)]
        except psutil.Error:
            return 0
        for process in processes:
            try:
                total += process.memory_info().rss
            except psutil.Error:  # it ended between listing and reading
                pass
        return total

    def _watch(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._total())
            time.sleep(self.every)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak


def run_mode(workflow: Path, out: Path, cache: Path, sweeps: list[str], extra: list[str]) -> dict:
    """One ``lora-nodes run`` of the sweep: seconds, peak bytes, variants done and failed."""
    command = [sys.executable, "-m", "lora_nodes.cli", "run", str(workflow), "--output-dir", str(out),
               "--cache-dir", str(cache), "--no-grid", "--events", "jsonl", *sweeps, *extra]
    started = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    memory = PeakMemory(process.pid)
    stdout, stderr = process.communicate()
    seconds, peak = time.perf_counter() - started, memory.stop()
    ends = [e for e in (json.loads(line) for line in stdout.splitlines() if line.startswith("{"))
            if e["event"] == "variant_end"]
    if process.returncode != 0:
        print(stderr[-3000:], file=sys.stderr)
    return {"seconds": round(seconds, 2), "peak_mib": round(peak / 2**20), "ok": sum(e["ok"] for e in ends),
            "failed": sum(not e["ok"] for e in ends), "exit": process.returncode}


def pixels(folder: Path) -> dict[str, np.ndarray]:
    return {p.name: np.asarray(Image.open(p)) for p in sorted(folder.glob("bench_*.png"))}


def benchmark(strengths: int, seeds: int, steps: int, modes: list[str]) -> dict[str, dict]:
    """Run the sweep in every mode of ``modes``; each result says whether its pixels equal serial's."""
    values = ",".join(str(round(v, 3)) for v in np.linspace(0, 1, strengths)) if strengths > 1 else "1"
    sweeps = ["--sweep", f"styled.strength_model={values}", "--sweep",
              f"images.seed={','.join(str(s) for s in range(seeds))}"]
    results = {}
    with tempfile.TemporaryDirectory(prefix="sweep-bench-") as scratch:
        workflow = Path(scratch) / "sweep.yaml"
        workflow.write_text(WORKFLOW.format(lora=LORA, steps=steps))
        reference = None
        for mode in modes:
            out = Path(scratch) / mode.replace(" ", "_")
            result = run_mode(workflow, out, Path(scratch) / "cache", sweeps, MODES[mode])
            images = pixels(out)
            reference = images if reference is None else reference
            result["same_pixels"] = images.keys() == reference.keys() and all(
                np.array_equal(images[name], reference[name]) for name in images)
            result["images"] = len(images)
            results[mode] = result
    return results


def table(results: dict[str, dict], variants: int) -> str:
    lines = [f"{variants} variants", (f"{'mode':<10} {'wall s':>8} {'peak MiB (all processes)':>26} "
             f"{'ok':>4} {'failed':>7} {'same pixels as serial':>22}")]
    for mode, r in results.items():
        lines.append(f"{mode:<10} {r['seconds']:>8.1f} {r['peak_mib']:>26} {r['ok']:>4} {r['failed']:>7} "
                     f"{'yes' if r['same_pixels'] else 'NO':>22}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--strengths", type=int, default=4, help="strengths from 0 to 1 (default 4)")
    parser.add_argument("--seeds", type=int, default=4, help="seeds 0.. (default 4)")
    parser.add_argument("--steps", type=int, default=20, help="sampling steps (default 20)")
    parser.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, of: {', '.join(MODES)}")
    parser.add_argument("--json", action="store_true", help="print the numbers as JSON too")
    args = parser.parse_args(argv)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if "ray local" in modes and not ray_installed():
        print("ray is not installed (pip install 'lora-nodes[ray]'): leaving out 'ray local'", file=sys.stderr)
        modes.remove("ray local")
    results = benchmark(args.strengths, args.seeds, args.steps, modes)
    print(table(results, args.strengths * args.seeds))
    if args.json:
        print(json.dumps(results))
    return results


if __name__ == "__main__":
    main()
