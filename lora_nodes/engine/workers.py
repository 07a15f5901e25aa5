"""Running the variants of a sweep: in this process, in local worker processes, or on a Ray cluster.

Every way gives the same results and leaves the same files:

- **serial** (the default): one :class:`~lora_nodes.engine.scheduler.Runner` in this process runs the
  variants one after another, sharing every node they share.
- **processes** (``--workers N``): N worker processes, each with its own Runner, so each loads the base
  once and keeps it for every variant it takes. On a machine with GPUs each worker sees one GPU.
- **Ray** (``--ray ADDRESS``, ``--ray local``): the same workers as Ray actors; Ray places them on the
  cluster's machines (one GPU each where the cluster has GPUs). Ray is an optional dependency
  (``pip install 'lora-nodes[ray]'``); nothing here schedules machines itself.

Workers never write into the output folder: each runs its variant into a scratch folder of its own
and sends back the files' bytes, which the driver (this process) writes, numbering PNGs as a serial
run would. Their events come back to the driver's event sink tagged with the variant (``variant``,
``worker``), and the driver adds ``variant_end`` {index, variant, ok, files, seconds, worker, done,
total}. A variant that fails is reported (its ``error``) and the others still run and are written.
The disk cache is shared: two workers needing the same trained LoRA train it once (the cache's lock).
"""

from __future__ import annotations

import os
import queue as queue_module
import re
import shutil
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import NodeError
from ..fileio import write_new_file
from ..graph.overrides import Override, bind_variants, file_suffix
from ..graph.workflow import Workflow
from ..nodes.images import next_free_index
from .events import EventSink, event, ignore

NUMBERED_PNG = re.compile(r"^(?P<stem>.+)_(?P<number>\d{5})\.png$")  # SaveImages' names: a stem and a counter
POLL_SECONDS = 0.2  # how often the driver looks for news from its workers
RAY_EXTRA = "pip install 'lora-nodes[ray]'"


@dataclass(frozen=True)
class RunnerOptions:
    """How each worker's Runner is made (the output folder is the driver's: workers get scratch ones)."""

    cache_dir: str | None = None
    check_memory: bool = True


@dataclass(frozen=True)
class VariantJob:
    """One variant to run: its workflow (overrides applied), the suffix of its files, its label."""

    index: int
    workflow: Workflow
    suffix: str
    label: str


@dataclass
class VariantReport:
    """What a worker sends back: the files it wrote (path relative to its output folder, bytes), or why it failed."""

    index: int
    files: list[tuple[str, bytes]] = field(default_factory=list)
    error: dict[str, str] | None = None  # {"node", "type", "message"} of the node that failed
    seconds: float = 0.0
    worker: str = ""


@dataclass
class VariantOutcome:
    """One variant of a sweep, run: its overrides, the files written for it, or its error."""

    index: int
    overrides: tuple[Override, ...]
    label: str
    files: list[str] = field(default_factory=list)
    error: dict[str, str] | None = None
    seconds: float = 0.0
    worker: str = ""

    @property
    def ok(self) -> bool:
        return self.error is None


class SweepFailed(Exception):
    """Some variants of a sweep failed; the others ran and their files were written."""

    def __init__(self, outcomes: list[VariantOutcome]):
        self.outcomes = outcomes
        failed = [o for o in outcomes if not o.ok]
        super().__init__(f"{len(failed)} of {len(outcomes)} variants failed: " + "; ".join(
            f"{o.label or o.index}: node '{o.error['node']}' ({o.error['type']}): {o.error['message']}"
            for o in failed))


# --------------------------------------------------------------------------- what a worker does


class VariantWorker:
    """A Runner of its own and a scratch output folder: runs variants, sends back their files' bytes."""

    def __init__(self, options: RunnerOptions, name: str, emit: Callable[[int, dict], None]):
        from .scheduler import Runner

        self.name = name
        self.scratch = Path(tempfile.mkdtemp(prefix="lora-nodes-worker-"))
        self._emit, self._index = emit, -1
        self.runner = Runner(output_dir=self.scratch, cache_dir=options.cache_dir, emit=self._forward,
                             check_memory=options.check_memory)

    def _forward(self, ev: dict) -> None:
        self._emit(self._index, ev)

    def run(self, job: VariantJob) -> VariantReport:
        """Run one variant into the scratch folder; its files come back as bytes and leave the folder."""
        from ..libraries import import_model_libraries
        from .scheduler import RunFailed

        # a spawned worker imports them afresh: here, once it holds a variant, not before it asks for
        # one (importing first, the worker that started last would find the queue emptied)
        import_model_libraries()
        self._index = job.index
        written: list[str] = []
        emit = self.runner.emit

        def noting_files(ev: dict) -> None:  # the files this variant wrote (a cached node wrote none now)
            if ev["event"] == "executed":
                written.extend(ev.get("files", []))
            emit(ev)

        self.runner.emit = noting_files
        started = time.perf_counter()
        report = VariantReport(job.index, worker=self.name)
        try:
            self.runner.run(job.workflow, job.suffix, job.label)
        except RunFailed as exc:
            report.error = {"node": exc.node, "type": exc.node_type, "message": exc.message}
        except Exception as exc:  # noqa: BLE001 - anything else still ends as this variant's report
            report.error = {"node": "", "type": "", "message": f"{type(exc).__name__}: {exc}"}
        finally:
            self.runner.emit = emit
        report.files = self._collect(written)
        report.seconds = time.perf_counter() - started
        return report

    def _collect(self, written: list[str]) -> list[tuple[str, bytes]]:
        files = []
        for name in written:
            path = Path(name)
            for file in sorted(path.rglob("*")) if path.is_dir() else [path]:  # a saved diffusers folder
                if file.is_file():
                    files.append((file.relative_to(self.scratch).as_posix(), file.read_bytes()))
                    file.unlink()
        return files

    def close(self) -> None:
        shutil.rmtree(self.scratch, ignore_errors=True)


# --------------------------------------------------------------------------- what the driver does


def numbered_paths(folder: Path, stem: str) -> Iterator[Path]:
    """``{stem}_NNNNN.png`` in ``folder`` from the first free number on, as SaveImages names its files."""
    number = next_free_index(folder, stem)
    while True:
        yield folder / f"{stem}_{number:05d}.png"
        number += 1


def write_back(output_dir: Path, files: list[tuple[str, bytes]]) -> list[str]:
    """Write a worker's files under ``output_dir``: numbered PNGs take the next free numbers (as a
    serial run numbers them); another file is written where it was, unless a different file is there.

    Raises NodeError naming a file that is in the way (nothing is overwritten).
    """
    written = []
    for relative, data in files:
        target = output_dir / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        match = NUMBERED_PNG.match(target.name)
        if match:
            path = write_new_file(numbered_paths(target.parent, match["stem"]),
                                  lambda tmp, data=data: tmp.write_bytes(data))
        elif target.exists():
            if target.read_bytes() != data:
                raise NodeError(f"{target} exists and holds another file; remove it or choose another --output-dir "
                                "(a worker's files are never written over an existing file)")
            path = target
        else:
            path = write_new_file([target], lambda tmp, data=data: tmp.write_bytes(data))
        written.append(str(path))
    return written


class _Tally:
    """The driver's side: variant outcomes as reports come in, and the events that tell of them."""

    def __init__(self, jobs: list[VariantJob], overrides: list[tuple[Override, ...]], output_dir: Path,
                 emit: EventSink):
        self.outcomes = [VariantOutcome(job.index, over, job.label) for job, over in zip(jobs, overrides, strict=True)]
        self.output_dir, self.emit, self.done = output_dir.absolute(), emit, 0
        self.finished: set[int] = set()

    def forward(self, index: int, ev: dict, worker: str) -> None:
        """A worker's event, tagged with its variant and worker; file paths are the worker's scratch
        ones, so they are left out here: ``variant_end`` names the files as written."""
        if "files" in ev:
            ev = {**ev, "files": []}
        self.emit({**ev, "variant": self.outcomes[index].label, "variant_index": index, "worker": worker})

    def finish(self, report: VariantReport) -> None:
        outcome = self.outcomes[report.index]
        self.finished.add(report.index)
        outcome.error, outcome.seconds, outcome.worker = report.error, report.seconds, report.worker
        try:
            outcome.files = write_back(self.output_dir, report.files)
        except (NodeError, OSError) as exc:
            outcome.error = outcome.error or {"node": "", "type": "", "message": str(exc)}
        self.done += 1
        self.emit(event("variant_end", index=report.index, variant=outcome.label, ok=outcome.ok, files=outcome.files,
                        error=outcome.error, seconds=round(outcome.seconds, 4), worker=outcome.worker,
                        done=self.done, total=len(self.outcomes)))

    def lost(self, index: int, worker: str, why: str) -> None:
        """A variant whose worker died (killed, out of memory) before reporting."""
        self.finish(VariantReport(index, error={"node": "", "type": "", "message": why}, worker=worker))


# --------------------------------------------------------------------------- serial


def _run_serial(jobs: list[VariantJob], tally: _Tally, options: RunnerOptions) -> None:
    """In this process, one Runner for all: files go straight to the output folder (this is the driver)."""
    from .scheduler import RunFailed, Runner

    runner = Runner(output_dir=tally.output_dir, cache_dir=options.cache_dir, emit=tally.emit,
                    check_memory=options.check_memory)
    for job in jobs:
        outcome = tally.outcomes[job.index]
        started = time.perf_counter()
        try:
            outcome.files = runner.run(job.workflow, job.suffix, job.label).files
        except RunFailed as exc:
            outcome.error = {"node": exc.node, "type": exc.node_type, "message": exc.message}
        outcome.seconds = time.perf_counter() - started
        tally.done += 1
        tally.emit(event("variant_end", index=job.index, variant=job.label, ok=outcome.ok, files=outcome.files,
                         error=outcome.error, seconds=round(outcome.seconds, 4), worker="", done=tally.done,
                         total=len(jobs)))


# --------------------------------------------------------------------------- local processes


def driver_threads() -> int:
    """The CPU threads torch uses here. Workers use as many: the number of threads changes how sums are
    split, and so the last bit of some pixels; with the same count a worker draws what a serial run draws."""
    import torch

    return torch.get_num_threads()


def visible_gpus() -> list[str]:
    """The GPUs this machine shows (CUDA_VISIBLE_DEVICES' entries, else every device torch counts)."""
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        return [d.strip() for d in listed.split(",") if d.strip() and d.strip() != "-1"]
    try:
        import torch

        return [str(i) for i in range(torch.cuda.device_count())]
    except Exception:  # noqa: BLE001 - no torch CUDA: no GPUs
        return []


def _process_main(name: str, options: RunnerOptions, threads: int, jobs: Any, results: Any) -> None:
    """A worker process: take jobs until a None comes, report each (events on the way)."""
    import torch

    torch.set_num_threads(threads)
    worker = VariantWorker(options, name, lambda index, ev: results.put(("event", name, index, ev)))
    try:
        while (job := jobs.get()) is not None:
            results.put(("start", name, job.index, None))
            try:
                report = worker.run(job)
            except BaseException as exc:  # noqa: BLE001 - report it rather than die silently
                report = VariantReport(job.index, error={"node": "", "type": "", "message": repr(exc)}, worker=name)
                traceback.print_exc()
            results.put(("report", name, job.index, report))
    finally:
        worker.close()


def _run_in_processes(jobs: list[VariantJob], tally: _Tally, options: RunnerOptions, workers: int) -> None:
    import multiprocessing

    context = multiprocessing.get_context("spawn")  # CUDA and torch's threads do not survive fork
    job_queue, results = context.Queue(), context.Queue()
    for job in jobs:
        job_queue.put(job)
    count = max(1, min(workers, len(jobs)))
    for _ in range(count):
        job_queue.put(None)
    gpus = visible_gpus()
    processes = {}
    for number in range(count):
        name = f"process-{number + 1}"
        env = {"CUDA_VISIBLE_DEVICES": gpus[number % len(gpus)]} if gpus else {}
        with _environment(env):  # a spawned process starts with this process's environment
            process = context.Process(target=_process_main, name=f"lora-nodes-{name}", daemon=True,
                                      args=(name, options, driver_threads(), job_queue, results))
            process.start()
        processes[name] = process
    try:
        _collect_from_processes(processes, results, tally, len(jobs))
    finally:
        for process in processes.values():
            process.join(timeout=5)
            if process.is_alive():
                process.kill()


def _collect_from_processes(processes: dict, results: Any, tally: _Tally, total: int) -> None:
    running: dict[str, int] = {}  # worker -> the variant it is on
    reported = 0
    while reported < total:
        try:
            kind, name, index, payload = results.get(timeout=POLL_SECONDS)
        except queue_module.Empty:
            for name, process in processes.items():
                if not process.is_alive() and name in running:  # died mid-variant: say so, go on with the rest
                    tally.lost(running.pop(name), name, f"worker {name} stopped (exit code {process.exitcode}) "
                               "while running this variant; out of memory?")
                    reported += 1
            if not any(p.is_alive() for p in processes.values()) and results.empty():
                for index in _unreported(tally):
                    tally.lost(index, "", "no worker was left to run this variant")
                    reported += 1
            continue
        if kind == "event":
            tally.forward(index, payload, name)
        elif kind == "start":
            running[name] = index
        else:
            running.pop(name, None)
            tally.finish(payload)
            reported += 1


def _unreported(tally: _Tally) -> list[int]:
    return [o.index for o in tally.outcomes if o.index not in tally.finished]


@contextmanager
def _environment(values: dict[str, str]) -> Iterator[None]:
    """Environment variables set for the duration of a ``with`` block."""
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


# --------------------------------------------------------------------------- Ray


def import_ray() -> Any:
    """The ``ray`` module, or a NodeError saying how to install it."""
    try:
        import ray
    except ImportError:
        raise NodeError(f"--ray needs Ray, which is not installed: {RAY_EXTRA}") from None
    return ray


def _ray_worker_class(ray: Any) -> Any:
    """The Ray actor class: a VariantWorker whose events go to a Ray queue the driver reads."""

    class RayVariantWorker:
        def __init__(self, options: RunnerOptions, name: str, events: Any, threads: int):
            import torch

            torch.set_num_threads(threads)
            self.worker = VariantWorker(options, name, lambda index, ev: events.put((name, index, ev)))

        def run(self, job: VariantJob) -> VariantReport:
            return self.worker.run(job)

    return ray.remote(RayVariantWorker)


def start_ray(address: str, ray: Any = None) -> None:
    """Connect to the Ray cluster at ``address``, or start one on this machine for ``local``."""
    ray = ray or import_ray()
    if ray.is_initialized():
        return
    if address == "local":
        ray.init(include_dashboard=False, log_to_driver=False)
    else:
        ray.init(address=address, log_to_driver=False)


def _run_on_ray(jobs: list[VariantJob], tally: _Tally, options: RunnerOptions, address: str,
                workers: int) -> None:
    ray = import_ray()
    started_here = not ray.is_initialized()
    start_ray(address, ray)
    try:
        _run_on_started_ray(ray, jobs, tally, options, workers)
    finally:
        if started_here:  # a cluster this run connected to (or started) is let go when it ends
            ray.shutdown()


def _run_on_started_ray(ray: Any, jobs: list[VariantJob], tally: _Tally, options: RunnerOptions,
                        workers: int) -> None:
    from ray.util.queue import Queue

    resources = ray.cluster_resources()
    gpus, cpus = int(resources.get("GPU", 0)), max(1, int(resources.get("CPU", 1)))
    count = max(1, min(workers or gpus or cpus, len(jobs)))
    threads = driver_threads()  # Ray would give each actor one thread (OMP_NUM_THREADS): other pixels
    events = Queue()
    # one GPU each, or a share of one when asked for more workers than GPUs (never more than the cluster has)
    actor_class = _ray_worker_class(ray).options(num_gpus=min(1.0, gpus / count), num_cpus=cpus / count)
    actors = {f"ray-{n + 1}": actor_class.remote(options, f"ray-{n + 1}", events, threads) for n in range(count)}
    waiting = list(jobs)
    pending: dict[Any, tuple[str, int]] = {}

    def give(name: str) -> None:
        if waiting:
            job = waiting.pop(0)
            pending[actors[name].run.remote(job)] = (name, job.index)

    for name in actors:
        give(name)
    try:
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1, timeout=POLL_SECONDS)
            _drain_ray_events(events, tally)
            for ref in done:
                name, index = pending.pop(ref)
                try:
                    tally.finish(ray.get(ref))
                except Exception as exc:  # noqa: BLE001 - the actor died (its machine went, out of memory)
                    tally.lost(index, name, f"Ray worker {name} failed: {type(exc).__name__}: {exc}")
                    actors[name] = actor_class.remote(options, name, events, threads)  # a fresh one takes its place
                give(name)
        _drain_ray_events(events, tally)
    finally:
        for actor in actors.values():
            ray.kill(actor)
        events.shutdown()


def _drain_ray_events(events: Any, tally: _Tally) -> None:
    while not events.empty():
        name, index, ev = events.get()
        tally.forward(index, ev, name)


# --------------------------------------------------------------------------- the entry point


def run_sweep(workflow: Workflow, variants: list[tuple[Override, ...]], output_dir: str | Path,
              options: RunnerOptions = RunnerOptions(), emit: EventSink = ignore, cwd: Path | None = None,
              workers: int = 0, ray_address: str | None = None) -> list[VariantOutcome]:
    """Run every variant of ``workflow``: serially (``workers`` 0), in ``workers`` local processes, or on
    the Ray cluster at ``ray_address`` (``"local"``: one started here; ``workers`` actors, default one
    per GPU, else one per CPU). Every variant is validated before any runs (WorkflowError).

    Returns each variant's outcome, in variant order; a failed variant has its ``error`` and the
    others their files. Raises NodeError when Ray is asked for but not installed.
    """
    from ..nodes import catalogue

    if ray_address:
        import_ray()  # before anything runs: say how to install it
    prepared = bind_variants(workflow, variants, catalogue(), cwd)
    jobs = [VariantJob(index, variant, file_suffix(overrides), "_".join(o.label for o in overrides))
            for index, (variant, _bound, overrides) in enumerate(prepared)]
    tally = _Tally(jobs, [overrides for _, _, overrides in prepared], Path(output_dir), emit)
    if ray_address:
        _run_on_ray(jobs, tally, options, ray_address, workers)
    elif workers > 0:
        _run_in_processes(jobs, tally, options, workers)
    else:
        _run_serial(jobs, tally, options)
    return tally.outcomes
