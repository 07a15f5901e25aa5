"""What a running node can see and do besides its inputs."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import NodeError
from ..fileio import work_folder
from ..paths import output_name_problem
from .events import EventSink, event

__all__ = ["NodeContext", "NodeError"]


@dataclass
class NodeContext:
    """Passed to every node function as its first argument."""

    node_id: str
    node_type: str
    output_dir: Path
    cache_dir: Path
    emit: EventSink
    file_suffix: str = ""  # keeps the outputs of sweep variants apart
    # the text chunks the PNGs a node writes embed (lora_nodes.pngchunks), made by whoever runs it: the
    # scheduler from the workflow (once per run, on the first call), the ComfyUI pack from ComfyUI's own
    png_chunks: Callable[[], Mapping[str, str]] = dict
    files: list[str] = field(default_factory=list)
    cache_key: str = ""  # this node's cache key: names its work folders under cache_dir
    check_memory: bool = True  # refuse work estimated not to fit in memory (off: --no-memory-check)
    # nothing after this node will use a model's weights in this process (the last one of a one-shot
    # run): a node that patches a model's weights for itself may patch them in place (lora.patcher)
    last_weight_use: bool = False

    def work_dir(self, kind: str) -> Path | None:
        """A folder under the cache dir that belongs to this node's exact inputs (e.g. checkpoints).

        None where the node has no cache key (inside ComfyUI, which caches by its own rules): work
        that cannot be told apart from other work is not kept.
        """
        return work_folder(self.cache_dir, kind, self.node_type, self.cache_key) if self.cache_key else None

    def output_path(self, name: str) -> Path:
        """Where a node writes ``name``: inside the output folder, never outside it.

        Workflow files are shared, so a path that leads outside it (absolute, starting with ``~``,
        climbing out with ``..``) is refused rather than written: choose the folder with
        ``--output-dir`` instead. The text is checked by the rule validation applies to every
        output input (:func:`lora_nodes.paths.output_name_problem`); here the resolved path is
        checked too, so a symlink inside the output folder cannot lead out of it either.
        """
        reason = output_name_problem(name)
        if reason is not None:
            raise NodeError(reason)
        root = self.output_dir.resolve()
        target = (root / name).resolve()
        if not target.is_relative_to(root) or target == root:
            raise NodeError(f"'{name}' is outside the output folder {root} (through a symlink): give a path "
                            "relative to it (set the folder itself with --output-dir)")
        return target

    def progress(self, value: int, maximum: int, **details: Any) -> None:
        """Report progress of long work (steps done out of ``maximum``; ``details`` such as the loss)."""
        self.emit(event("progress", node=self.node_id, value=value, max=maximum, **details))

    def warn(self, message: str, **details: Any) -> None:
        """Tell the user something went partly wrong, without stopping the run."""
        self.emit(event("warning", node=self.node_id, type=self.node_type, message=message, **details))

    def info(self, message: str, **details: Any) -> None:
        """Tell the user what a node found or decided (e.g. the energy a merge kept)."""
        self.emit(event("info", node=self.node_id, type=self.node_type, message=message, **details))

    def wrote(self, path: str | Path) -> None:
        """Record a file this node wrote (reported in its ``executed`` event)."""
        self.files.append(str(path))
