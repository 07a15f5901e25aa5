"""Training checkpoints: everything needed to continue exactly where a stopped run was.

One file per checkpoint (``step_000120.pt``), written to a temporary name and renamed, so a
kill at any moment leaves the previous checkpoint whole. Read back with ``weights_only=True``:
a checkpoint holds tensors, numbers and dicts only, never code.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from ..fileio import atomic_write

KEEP = 2  # the newest checkpoints kept; older ones are deleted once a newer one is safely written
_NAME = re.compile(r"step_(\d+)\.pt$")


def checkpoint_path(folder: Path, step: int) -> Path:
    return folder / f"step_{step:06d}.pt"


def save_checkpoint(folder: Path, step: int, state: dict[str, Any]) -> Path:
    """Write ``state`` as the checkpoint of ``step`` and drop all but the newest :data:`KEEP`."""
    path = atomic_write(checkpoint_path(folder, step), lambda tmp: torch.save(state, tmp))
    for _, old in checkpoints(folder)[:-KEEP]:
        old.unlink(missing_ok=True)
    return path


def checkpoints(folder: Path) -> list[tuple[int, Path]]:
    """``(step, path)`` of every checkpoint in ``folder``, oldest first."""
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _NAME.match(p.name))]
    return sorted(found)


def load_latest(folder: Path) -> tuple[int, dict[str, Any]] | None:
    """The newest readable checkpoint in ``folder`` as ``(step, state)``, or None."""
    for step, path in reversed(checkpoints(folder)):
        try:
            return step, torch.load(path, map_location="cpu", weights_only=True)
        except Exception:  # noqa: BLE001, S112 - damaged (e.g. a full disk): fall back to the one before
            continue
    return None


def remove_checkpoints(folder: Path) -> None:
    """Delete a finished run's checkpoints (its result is kept in the disk cache instead)."""
    for _, path in checkpoints(folder):
        path.unlink(missing_ok=True)
    if folder.is_dir() and not any(folder.iterdir()):
        folder.rmdir()
