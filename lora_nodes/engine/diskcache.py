"""Results kept on disk across processes, by node cache key: the one home of the rules both hosts use.

The scheduler (headless) and the ComfyUI pack both look a node up here before running it and store
its result after, under ``<cache dir>/results/<node type>/<key>``, holding the key's lock meanwhile
so that two processes with the same work do it once. Only nodes declared with a ``disk_cache``
(:attr:`lora_nodes.nodes.spec.NodeSpec.disk_cache`) are kept.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ..fileio import describe_any_failure, exclusive_lock, work_folder
from ..nodes.spec import NodeSpec
from .events import EventSink, event


class DiskCache:
    """The disk cache under ``cache_dir``; what it finds wrong (an unreadable entry, a failed write,
    a wait for another process) is told to ``emit`` as the node's warning or info event."""

    def __init__(self, cache_dir: str | Path, emit: EventSink):
        self.cache_dir = Path(cache_dir)
        self.emit = emit

    def folder(self, spec: NodeSpec, key: str) -> Path:
        """Where the result of a ``spec`` node with cache key ``key`` is kept."""
        return work_folder(self.cache_dir, "results", spec.id, key)

    @contextmanager
    def one_process_at_a_time(self, node_id: str, spec: NodeSpec, key: str) -> Iterator[None]:
        """For a node kept on disk: hold its key's lock while looking in the disk cache, running and
        storing, so a second process with the same work waits and then takes the first one's result
        instead of doing it again.

        Not under a multi-process launch (WORLD_SIZE > 1): there every process runs the node
        together, and one waiting for another would leave the rest waiting for it.
        """
        if spec.disk_cache is None or int(os.environ.get("WORLD_SIZE", "1")) > 1:
            yield
            return
        lock = work_folder(self.cache_dir, "locks", spec.id, f"{key}.lock")

        def waiting() -> None:
            self.emit(event("info", node=node_id, type=spec.id, lock=str(lock),
                            message=f"another process is running {spec.id} with these same inputs; waiting "
                                    f"for it to finish, to take its result from the disk cache ({lock})"))

        with exclusive_lock(lock, on_wait=waiting) as previous:
            if previous:
                self.emit(event("info", node=node_id, type=spec.id, lock=str(lock),
                                message=f"taking over from {previous}, which stopped while running "
                                        f"{spec.id} with these same inputs (its lock was freed when it ended)"))
            yield

    def load(self, node_id: str, spec: NodeSpec, key: str) -> tuple[Any, ...] | None:
        """The result an earlier process kept on disk; None when there is none (or it is unreadable)."""
        folder = self.folder(spec, key)
        if spec.disk_cache is None or not folder.is_dir():
            return None
        try:
            return tuple(spec.disk_cache.load(folder))
        except Exception as exc:  # noqa: BLE001 - a damaged entry is redone, not fatal
            self.emit(event("warning", node=node_id, type=spec.id,
                            message=f"ignoring the unreadable disk cache entry {folder}: {exc}"))
            return None

    def save(self, node_id: str, spec: NodeSpec, key: str, outputs: tuple[Any, ...]) -> None:
        """Keep ``outputs`` on disk (nodes without a ``disk_cache``: nothing). A failure to write is a
        warning: the result is still good for this run."""
        if spec.disk_cache is None:
            return
        folder = self.folder(spec, key)
        try:
            spec.disk_cache.save(outputs, folder)
        except Exception as exc:  # noqa: BLE001 - any writer's failure: the result is still good for this run
            self.emit(event("warning", node=node_id, type=spec.id, folder=str(folder),
                            message=f"could not write the disk cache in {folder}: {describe_any_failure(exc, folder)}; "
                                    "the result is used from memory in this run, but a new process will "
                                    "run the node again (a training resumes from its last checkpoint)"))
