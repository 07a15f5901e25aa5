"""How long the quick commands take, as a user waits for them: whole processes, wall clock.

    python benchmarks/quick_commands.py                # medians of 7 runs, both bytecode modes
    python benchmarks/quick_commands.py --repeats 15 --mode cached

Issue 17's measure of ``lora-nodes validate``, ``nodes`` and ``convert`` (goal: the quickstart's
validate under 0.5 s). No peer tool has these commands (diffusers and kohya's scripts have no
workflow to check; ComfyUI checks a prompt inside its running server), so the reference row is the
import they avoid: ``python -c "import torch"``, which every command paid before (it took 3.5 s
for validate); ``python -c pass`` is the interpreter's own start, the floor.

Each command runs as its own process, through the ``lora-nodes`` console script (as a user types
it) and, for validate, as ``python -m lora_nodes.cli`` too. Rounds alternate the commands (so a
busy machine slows all alike); the table gives the median and the best wall time of ``--repeats``
rounds, and the median CPU time (user + system, steadier than wall time on a shared machine).

Two modes, because Python compiles a module's source each time it has no bytecode cache for it:
- ``cached``: as a normal install runs (bytecode written once, here under a scratch
  ``PYTHONPYCACHEPREFIX``; one untimed round writes it).
- ``source``: with ``PYTHONDONTWRITEBYTECODE=1`` and no ``__pycache__`` beside the sources (as on
  this project's development machines), lora_nodes is compiled at every start; the libraries keep
  their installed bytecode.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = "workflows/quickstart.yaml"
GOAL_S = 0.5


def console_script() -> list[str]:
    """The ``lora-nodes`` command as installed beside this interpreter (else on PATH, else ``python -m``)."""
    beside = Path(sys.executable).with_name("lora-nodes")
    if beside.exists():
        return [str(beside)]
    found = shutil.which("lora-nodes")
    return [found] if found else [sys.executable, "-m", "lora_nodes.cli"]


def commands(scratch: Path) -> dict[str, list[str]]:
    """Row name -> the command line it times."""
    cli, python = console_script(), sys.executable
    return {
        f"lora-nodes validate {QUICKSTART}": [*cli, "validate", QUICKSTART],
        f"python -m lora_nodes.cli validate {QUICKSTART}": [python, "-m", "lora_nodes.cli", "validate", QUICKSTART],
        "lora-nodes nodes": [*cli, "nodes"],
        f"lora-nodes convert {QUICKSTART} --to comfyui-ui": [*cli, "convert", QUICKSTART, "--to", "comfyui-ui",
                                                            "-o", str(scratch / "quickstart.json")],
        'reference: python -c "import torch"': [python, "-c", "import torch"],
        "floor: python -c pass": [python, "-c", "pass"],
    }


def environment(mode: str, scratch: Path) -> dict[str, str]:
    env = dict(os.environ)
    if mode == "cached":
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        env["PYTHONPYCACHEPREFIX"] = str(scratch / "bytecode")
    else:
        env["PYTHONDONTWRITEBYTECODE"] = "1"
        env.pop("PYTHONPYCACHEPREFIX", None)
    return env


def timed(command: list[str], env: dict[str, str], log: Path) -> tuple[float, float]:
    """(wall seconds, CPU seconds) of one run of ``command``; raises when it fails."""
    with open(log, "wb") as err:
        started = time.perf_counter()
        process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=err)
        _, status, usage = os.wait4(process.pid, 0)
        wall = time.perf_counter() - started
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode:
        raise RuntimeError(f"{' '.join(command)} failed ({process.returncode}): {log.read_text()[-2000:]}")
    return wall, usage.ru_utime + usage.ru_stime


def measure(mode: str, repeats: int, scratch: Path, warm_up: bool = True) -> dict[str, dict[str, float]]:
    """Per row: median and best wall time, median CPU time, over ``repeats`` alternating rounds."""
    env, rows = environment(mode, scratch), commands(scratch)
    for command in rows.values() if warm_up or mode == "cached" else ():
        timed(command, env, scratch / "stderr.txt")  # untimed: files in the page cache (and bytecode written)
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in rows}
    for _ in range(repeats):
        for name, command in rows.items():
            times[name].append(timed(command, env, scratch / "stderr.txt"))
    return {name: {"median": statistics.median(w for w, _ in runs), "best": min(w for w, _ in runs),
                   "cpu": statistics.median(c for _, c in runs)} for name, runs in times.items()}


def print_table(mode: str, figures: dict[str, dict[str, float]], repeats: int) -> None:
    title = {"cached": "bytecode cached (a normal install)",
             "source": "lora_nodes compiled at every start (PYTHONDONTWRITEBYTECODE=1)"}[mode]
    print(f"\n{title}; {repeats} runs each, wall seconds (goal for lora-nodes commands: under {GOAL_S} s)")
    width = max(len(name) for name in figures)
    print(f"{'command':<{width}}  {'median':>7}  {'best':>7}  {'cpu':>7}")
    for name, row in figures.items():
        print(f"{name:<{width}}  {row['median']:7.3f}  {row['best']:7.3f}  {row['cpu']:7.3f}")


def main(argv: list[str] | None = None) -> dict[str, dict[str, dict[str, float]]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=7, help="timed rounds (default 7)")
    parser.add_argument("--mode", choices=["both", "cached", "source"], default="both")
    parser.add_argument("--no-warm-up", action="store_true", help="skip the untimed round (source mode; a quick check)")
    args = parser.parse_args(argv)
    if (REPO / "lora_nodes" / "__pycache__").exists() and args.mode != "cached":
        print("note: lora_nodes/__pycache__ exists, so the 'source' mode reads bytecode too")
    results = {}
    for mode in (["cached", "source"] if args.mode == "both" else [args.mode]):
        with tempfile.TemporaryDirectory(prefix="quick-commands-") as scratch:
            results[mode] = measure(mode, args.repeats, Path(scratch), warm_up=not args.no_warm_up)
        print_table(mode, results[mode], args.repeats)
    return results


if __name__ == "__main__":
    main()
