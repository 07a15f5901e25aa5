"""The scheduler: binds a workflow, orders the nodes an output needs, runs them, caches results."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

from ..graph.embed import embeddable_workflow, png_chunks
from ..graph.links import bound_graph, link_order, needed_by
from ..graph.overrides import Override, bind_variants
from ..graph.overrides import file_suffix as variant_file_suffix
from ..graph.parameters import parameters_chunk
from ..graph.problems import WorkflowError
from ..graph.validate import BoundNode, bind
from ..graph.workflow import Workflow
from ..nodes import catalogue as default_catalogue
from ..nodes.spec import CLIP, CORE_MODEL, MODEL, Catalogue
from .context import NodeContext, NodeError
from .diskcache import DiskCache
from .events import EventSink, event, ignore
from .keys import DigestStore, Fingerprints, spec_key

# the types whose values share a base model's weights (a recipe over it): the nodes that take one use them
WEIGHT_TYPES = frozenset({MODEL, CORE_MODEL, CLIP})


DIGESTS_FILE = "file-digests.json"  # in the cache dir: hashes of big files, kept across runs


class RunFailed(Exception):
    """A node failed while running. Files written before the failure are kept."""

    def __init__(self, node: str, node_type: str, message: str):
        self.node, self.node_type, self.message = node, node_type, message
        super().__init__(f"node '{node}' ({node_type}) failed: {message}")


@dataclass
class RunResult:
    """What one run did: nodes executed and cached, files written, and every node's outputs."""

    executed: list[str] = field(default_factory=list)
    cached: list[str] = field(default_factory=list)
    files: list[str] = field(default_factory=list)
    outputs: dict[str, tuple[Any, ...]] = field(default_factory=dict)
    seconds: float = 0.0


def last_weight_user(bound: dict[str, BoundNode], order: list[str]) -> str | None:
    """The last node in ``order`` given a model (a linked input of a weight type), if any."""
    users = [node_id for node_id in order
             if any(decl.type in WEIGHT_TYPES and decl.name in bound[node_id].links for decl in bound[node_id].spec.inputs)]
    return users[-1] if users else None


def execution_order(bound: dict[str, BoundNode]) -> list[str]:
    """The nodes that output nodes need, each after its inputs, in a stable order."""
    graph = bound_graph(bound)
    needed = needed_by(graph, (node_id for node_id, node in bound.items() if node.spec.output_node))
    return link_order(graph.subgraph(needed))


class Runner:
    """Runs workflows and keeps every node's result in memory, until :meth:`forget_oldest_results`.

    Running again (another variant, or the same workflow after an edit) re-runs only the nodes
    whose cache key changed: their type, version, literal inputs, upstream keys or files read.
    """

    def __init__(self, catalogue: Catalogue | None = None, output_dir: str | Path = "outputs",
                 cache_dir: str | Path | None = None, emit: EventSink = ignore, main_process: bool = True,
                 check_memory: bool = True, one_shot: bool = False):
        self.catalogue = catalogue or default_catalogue()
        self.output_dir = Path(output_dir)
        self.cache_dir = Path(cache_dir) if cache_dir else Path.home() / ".cache" / "lora-nodes"
        self.emit = emit
        self.main_process = main_process  # in data-parallel training only the main process keeps results on disk
        self.check_memory = check_memory  # nodes refuse work estimated not to fit in memory
        # runs once and is dropped (the CLI's run): the last node of the last run that uses a model's
        # weights may patch them in place, as nothing will ask for the originals again
        self.one_shot = one_shot
        self._spent = False
        self._results: dict[str, tuple[Any, ...]] = {}
        self._files: dict[str, list[str]] = {}
        self._runs = 0  # runs started
        self._last_run: dict[str, int] = {}  # cache key -> the number of the last run that used its result
        self._fingerprint = Fingerprints(DigestStore(self.cache_dir / DIGESTS_FILE))

    @property
    def _disk(self) -> DiskCache:
        return DiskCache(self.cache_dir, self.emit)

    def run(self, workflow: Workflow, file_suffix: str = "", variant: str = "") -> RunResult:
        """Validate and run ``workflow``. Raises WorkflowError (invalid) or RunFailed (a node failed)."""
        return self._run_bound(workflow, bind(workflow, self.catalogue), file_suffix, variant, last=True)

    def run_variants(self, workflow: Workflow, variants: list[tuple[Override, ...]],
                     cwd: Path | None = None) -> list[RunResult]:
        """Run one variant of ``workflow`` per tuple of overrides, sharing every node they share.

        All variants are validated before any runs, so a bad value in the last one runs nothing.
        """
        results = []
        bound_variants = list(bind_variants(workflow, variants, self.catalogue, cwd))
        for i, (variant, bound, overrides) in enumerate(bound_variants):
            label = "_".join(o.label for o in overrides)
            results.append(self._run_bound(variant, bound, variant_file_suffix(overrides), label,
                                           last=i == len(bound_variants) - 1))
        return results

    def _run_bound(self, workflow: Workflow, bound: dict[str, BoundNode], file_suffix: str,
                   variant: str, last: bool) -> RunResult:
        if self._spent:
            raise RuntimeError("a one-shot Runner has run: its models may hold patched weights; make a new one")
        start = time.perf_counter()
        order = execution_order(bound)
        final_user = last_weight_user(bound, order) if self.one_shot and last else None
        self._spent = self.one_shot and last
        self._runs += 1
        embedded = embeddable_workflow(workflow, bound)
        # made on the first SaveImages of this run, once: most runs that write no PNG never need it
        workflow_chunks = cache(lambda: png_chunks(embedded, self.output_dir, self.catalogue))
        self.emit(event("run_start", nodes=order, variant=variant))
        result = RunResult()
        keys: dict[str, str] = {}

        def chunks(node_id: str) -> Callable[[], Mapping[str, str]]:
            """A node's PNG chunks: the run's workflow, and A1111's parameters of the images it is given
            (each file hash computed once per file version in this process)."""
            return lambda: {**workflow_chunks(),
                            **parameters_chunk(bound, node_id, result.outputs, self._fingerprint.hashed)}

        try:
            for node_id in order:
                self._run_node(bound[node_id], keys, result, file_suffix, chunks(node_id),
                               last_weight_use=node_id == final_user)
        except RunFailed:
            self.emit(event("run_end", ok=False, seconds=round(time.perf_counter() - start, 4),
                            executed=result.executed, cached=result.cached, files=result.files))
            raise
        finally:
            self._fingerprint.save()
        result.seconds = time.perf_counter() - start
        self.emit(event("run_end", ok=True, seconds=round(result.seconds, 4), executed=result.executed,
                        cached=result.cached, files=result.files))
        return result

    def _run_node(self, node: BoundNode, keys: dict[str, str], result: RunResult, file_suffix: str,
                  chunks: Callable[[], Mapping[str, str]], last_weight_use: bool = False) -> None:
        try:
            key = keys[node.id] = self._key(node, keys)
        except OSError as exc:  # a file that passed validation's stat but cannot be read (permissions, I/O)
            self._fail(node, f"cannot read its input files: {exc}", exc)
        if key in self._results:
            self.emit(event("cached", node=node.id, type=node.spec.id, cache="memory", files=self._files[key]))
            result.cached.append(node.id)
        else:
            with self._disk.one_process_at_a_time(node.id, node.spec, key):
                if self._load_from_disk(node, key):
                    self.emit(event("cached", node=node.id, type=node.spec.id, cache="disk", files=[],
                                    folder=str(self._disk.folder(node.spec, key))))
                    result.cached.append(node.id)
                else:
                    ctx = NodeContext(node.id, node.spec.id, self.output_dir, self.cache_dir, self.emit,
                                      file_suffix, png_chunks=chunks, cache_key=key, check_memory=self.check_memory,
                                      last_weight_use=last_weight_use)
                    self._execute(node, ctx, key, keys)
                    result.executed.append(node.id)
        result.outputs[node.id] = self._results[key]
        result.files += self._files[key]
        self._last_run[key] = self._runs

    def forget_oldest_results(self) -> bool:
        """Drop from memory the results that the least recent run still remembered used last; the latest
        run's are never dropped. False when there was nothing to drop.

        A long-lived process (the server) calls this while memory is short: what the user ran longest
        ago goes first, and running it again re-runs (or reloads from the disk cache) only what went.
        """
        older = [run for run in self._last_run.values() if run < self._runs]
        if not older:
            return False
        oldest = min(older)
        for key in [key for key, run in self._last_run.items() if run == oldest]:
            del self._results[key], self._files[key], self._last_run[key]
        return True

    def _key(self, node: BoundNode, keys: dict[str, str]) -> str:
        upstream = {name: (keys[up], index) for name, (up, index) in node.links.items()}
        return spec_key(node.spec, node.literals, upstream, self._fingerprint)

    def _load_from_disk(self, node: BoundNode, key: str) -> bool:
        """Take a result an earlier process kept on disk; False when there is none (or it is unreadable)."""
        outputs = self._disk.load(node.id, node.spec, key)
        if outputs is None:
            return False
        self._results[key], self._files[key] = outputs, []
        return True

    def _execute(self, node: BoundNode, ctx: NodeContext, key: str, keys: dict[str, str]) -> None:
        inputs: dict[str, Any] = {decl.name: None for decl in node.spec.inputs}
        inputs.update(node.literals)
        for name, (upstream, index) in node.links.items():
            inputs[name] = self._results[keys[upstream]][index]
        self.emit(event("executing", node=node.id, type=node.spec.id))
        started = time.perf_counter()
        try:
            outputs = node.spec.run(ctx, **inputs)
        except (NodeError, WorkflowError) as exc:
            self._fail(node, str(exc), exc)
        except Exception as exc:  # noqa: BLE001 - a bug or a library error: still name the node
            self._fail(node, f"{type(exc).__name__}: {exc}", exc)
        outputs = tuple(outputs) if outputs is not None else ()
        if len(outputs) != len(node.spec.outputs):
            raise RuntimeError(f"{node.spec.id} returned {len(outputs)} values for {len(node.spec.outputs)} outputs")
        self._results[key] = outputs
        self._files[key] = list(ctx.files)
        if self.main_process:
            self._disk.save(node.id, node.spec, key, outputs)
        self.emit(event("executed", node=node.id, type=node.spec.id, files=list(ctx.files),
                        seconds=round(time.perf_counter() - started, 4)))

    def _fail(self, node: BoundNode, message: str, cause: BaseException) -> None:
        self.emit(event("error", node=node.id, type=node.spec.id, message=message))
        raise RunFailed(node.id, node.spec.id, message) from cause
