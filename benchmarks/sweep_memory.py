"""Peak memory of a 4-variant strength sweep against a single run, at real size (issue 17 point 4).

    python benchmarks/sweep_memory.py                                  # builds the model in a scratch folder
    python benchmarks/sweep_memory.py --model /tmp/m --lora /tmp/m/lora_0.safetensors --repeats 5
    python benchmarks/sweep_memory.py --tiny --repeats 1               # builtin:tiny's pipeline (a quick check)

The model is ``apply_whole_process.py``'s SD1.5-shaped pipeline folder (a ~860M-parameter float32 UNet)
and the LoRA one of its kohya rank-32 files (every attention and feed-forward linear of the UNet's
transformer blocks). ``--model`` and ``--lora`` reuse ones already made (made there when missing).
Each of three workflows runs as its own ``lora-nodes run`` process, alternating, ``--repeats`` times:

- base: LoadBase + a 1-step 64x64 Sample + SaveImages (what the base alone costs),
- single: the same with LoadLoRA + ApplyLoRA between LoadBase and Sample,
- sweep: the single workflow with ``--sweep a0.strength_model=0.25,0.5,0.75,1`` (4 variants and a grid).

Memory is the process's peak resident memory (its high-water mark, as the kernel reports it to the
parent that waits for it: ``wait4``'s ``ru_maxrss``), and apart the peak of its anonymous part (read from
``/proc/PID/status`` every 50 ms): the base's weights are pages of the model file mapped copy-on-write,
which count as resident once read, while memory the process made itself (patched weights, activations,
libraries) is anonymous. The table gives medians of both and of wall seconds, and the sweep's peak over
the single run's (goal: at most 1.15x: the variants share one copy of the base and one set of patched
weights).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from apply_whole_process import make_loras, make_model, make_tiny, workflow

SWEEP = "a0.strength_model=0.25,0.5,0.75,1"
KINDS = ("base", "single", "sweep")
GOAL = 1.15


def anonymous_mib(pid: int) -> float:
    """The process's anonymous resident memory now (MiB); 0 once it is gone."""
    try:
        with open(f"/proc/{pid}/status") as status:
            return next(int(line.split()[1]) / 1024 for line in status if line.startswith("RssAnon:"))
    except (OSError, StopIteration):
        return 0.0


def peak_and_wall(command: list[str]) -> tuple[float, float, float]:
    """Run ``command``: its peak resident memory and peak anonymous memory (MiB), and wall seconds.
    Fails loudly if it fails."""
    start = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    anonymous, done = [0.0], threading.Event()

    def watch() -> None:
        while not done.wait(0.05):
            anonymous[0] = max(anonymous[0], anonymous_mib(process.pid))

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    output = process.stdout.read()  # read before waiting: a full pipe would block the child
    done.set()
    watcher.join()
    _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - start
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} exited {process.returncode}:\n{output.decode(errors='replace')}")
    return usage.ru_maxrss / 1024, anonymous[0], wall  # Linux reports ru_maxrss in KiB


def prepared(model: Path | None, lora: Path | None, scratch: Path, tiny: bool = False) -> tuple[Path, Path]:
    """The model folder and the LoRA file, made where they are missing (``tiny``: builtin:tiny's pipeline
    and a rank-4 LoRA)."""
    import torch

    torch.set_grad_enabled(False)
    model = model or scratch / "model"
    if not (model / "model_index.json").exists():
        print(f"making the {'tiny' if tiny else 'SD1.5-shaped'} model in {model} ...", file=sys.stderr)
        (make_tiny if tiny else make_model)(model)
    if lora is None or not lora.exists():
        print("making the LoRAs ...", file=sys.stderr)
        made = make_loras((lora.parent if lora else scratch), model, rank=4 if tiny else 32)
        lora = lora if lora else made[0]
        if not lora.exists():
            made[0].rename(lora)
    return model, lora


def commands(model: Path, lora: Path, scratch: Path) -> dict[str, Callable[[int], list[str]]]:
    """Per kind, the command of its n-th run (fresh output and cache folders: no disk-cache help)."""
    files = {"base": scratch / "base.yaml", "single": scratch / "single.yaml"}
    files["base"].write_text(workflow(model, []))
    files["single"].write_text(workflow(model, [lora]))

    def run(kind: str, n: int) -> list[str]:
        text = files["base" if kind == "base" else "single"]
        command = [sys.executable, "-m", "lora_nodes.cli", "run", str(text), "--events", "jsonl",
                   "--output-dir", str(scratch / f"out-{kind}-{n}"), "--cache-dir", str(scratch / f"cache-{kind}-{n}")]
        return command + (["--sweep", SWEEP] if kind == "sweep" else [])

    return {kind: (lambda n, kind=kind: run(kind, n)) for kind in KINDS}


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, help="the SD1.5-shaped diffusers folder (made there if missing)")
    parser.add_argument("--lora", type=Path, help="a kohya LoRA file for it (made if missing)")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each kind (medians)")
    parser.add_argument("--tiny", action="store_true", help="builtin:tiny's pipeline and a rank-4 LoRA (seconds)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="sweep-memory-") as folder:
        scratch = Path(folder)
        model, lora = prepared(args.model, args.lora, scratch, args.tiny)
        command = commands(model, lora, scratch)
        runs: dict[str, list[tuple[float, float, float]]] = {kind: [] for kind in KINDS}
        for n in range(args.repeats):
            for kind in KINDS:  # alternating, so load on the machine falls on every kind alike
                runs[kind].append(peak_and_wall(command[kind](n)))
                peak, anonymous, wall = runs[kind][-1]
                print(f"  {kind:7} run {n + 1}: {peak:6.0f} MiB ({anonymous:5.0f} anonymous) {wall:7.2f} s",
                      file=sys.stderr)
    figures = {kind: {name: statistics.median(run[i] for run in runs[kind])
                      for i, name in enumerate(("peak_mib", "anonymous_mib", "wall_s"))} for kind in KINDS}
    single = figures["single"]["peak_mib"]
    print(f"\nPeak resident memory of whole `lora-nodes run` processes, median of {args.repeats}")
    shape = "builtin:tiny, float32; 1 rank-4 LoRA" if args.tiny else "SD1.5-shaped UNet, float32; 1 rank-32 LoRA"
    print(f"({shape}; 1-step 64x64 Sample; sweep: {SWEEP})")
    print(f"{'run':28} {'peak MiB':>9} {'anonymous':>10} {'wall s':>8} {'vs single':>10}")
    labels = {"base": "base, no LoRA", "single": "single run (1 LoRA)", "sweep": "4-variant strength sweep"}
    for kind in KINDS:
        peak, anonymous, wall = (figures[kind][name] for name in ("peak_mib", "anonymous_mib", "wall_s"))
        print(f"{labels[kind]:28} {peak:9.0f} {anonymous:10.0f} {wall:8.2f} {peak / single:9.3f}x")
    anonymous = figures["sweep"]["anonymous_mib"] / figures["single"]["anonymous_mib"]
    print(f"sweep / single: {figures['sweep']['peak_mib'] / single:.3f}x peak resident (goal: <= {GOAL}x), "
          f"{anonymous:.3f}x anonymous")
    return figures


if __name__ == "__main__":
    main()
