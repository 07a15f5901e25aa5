"""Our example workflows offered in the editor's template browser (``/workflow_templates``).

Each example is converted to ComfyUI's editor format when asked for: files that lie in a models folder
go by their name there (the server adds the examples' own ``loras/`` folder to its LoRA folders, so the
example LoRAs are found by name), other paths are rebased onto the folder prompts are resolved against.
"""

from __future__ import annotations

import logging
from functools import cache
from pathlib import Path
from typing import Any

from ..graph import WorkflowError, load_workflow
from ..graph.comfy.ui_write import to_ui
from ..graph.validate import rebase_paths
from ..modelfolders import ModelFolders, using_folders
from ..nodes.spec import Catalogue

log = logging.getLogger("lora_nodes.server")
QUICKSTART = "quickstart"  # the graph the editor opens with
EXAMPLE_SUFFIXES = (".yaml", ".yml")


class Templates:
    """The example workflows of one folder, by name (the file name without its suffix)."""

    MODULE = "lora-nodes"  # the "custom node" the editor lists them under

    def __init__(self, folder: Path | None, catalogue: Catalogue, folders: ModelFolders, base_dir: Path | None = None):
        self.folder = Path(folder) if folder is not None else None
        self.catalogue = catalogue
        self.folders = folders
        self.base_dir = base_dir
        self.graph = cache(self._graph)  # examples do not change while the server runs

    def _files(self) -> dict[str, Path]:
        if self.folder is None or not self.folder.is_dir():
            return {}
        files = sorted(p for p in self.folder.iterdir() if p.suffix in EXAMPLE_SUFFIXES and p.is_file())
        ordered = sorted(files, key=lambda p: (p.stem != QUICKSTART, p.stem))  # the quickstart first
        return {p.stem: p for p in ordered}

    def names(self) -> list[str]:
        """The examples that convert to the editor's format (one that does not is left out, and logged)."""
        return [name for name in self._files() if self.graph(name) is not None]

    def _graph(self, name: str) -> dict[str, Any] | None:
        path = self._files().get(name)
        if path is None:
            return None
        try:
            with using_folders(self.folders):
                workflow = rebase_paths(load_workflow(path), self.catalogue, self.base_dir)
                return to_ui(workflow, self.catalogue)
        except (WorkflowError, OSError, ValueError) as exc:
            log.warning("example %s cannot be offered in the editor: %s", path, exc)
            return None
