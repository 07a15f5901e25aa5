"""Training checkpoints: everything needed to continue exactly where a stopped run was.

One file per checkpoint (``step_000120.pt``), written to a temporary name and renamed, so a
kill or a full disk at any moment leaves the previous checkpoint whole. Read back with
``weights_only=True``: a checkpoint holds tensors, numbers and dicts only, never code.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ..errors import NodeError
from ..fileio import WriteError, atomic_write, remove_stale_temporaries

KEEP = 2  # the newest checkpoints kept; older ones are deleted once a newer one is safely written
_NAME = re.compile(r"step_(\d+)\.pt$")

def checkpoint_path(folder: Path, step: int) -> Path:
    return folder / f"step_{step:06d}.pt"


def save_checkpoint(folder: Path, step: int, state: dict[str, Any],
                    on_failure: Callable[[str], None] | None = None) -> Path | None:
    """Write ``state`` as the checkpoint of ``step`` and drop all but the newest :data:`KEEP`.

    When it cannot be written (a full disk) the previous checkpoints stay as they were, and the
    failure is told in words: to ``on_failure``, and training goes on (losing a checkpoint costs
    only the steps since the previous one if the run is stopped; losing the run costs all of
    them), then None is returned; without ``on_failure``, as a NodeError.
    """
    path = checkpoint_path(folder, step)
    try:
        atomic_write(path, lambda tmp: _write(state, tmp))
    except WriteError as exc:
        previous = checkpoints(folder)
        kept = f"the checkpoint at step {previous[-1][0]}" if previous else "the start (no checkpoint yet)"
        message = f"could not write the checkpoint to {path}: {exc.reason}"
        if on_failure is None:
            raise NodeError(f"{message}; a new run resumes from {kept}") from exc
        on_failure(f"{message}; training goes on, and if stopped it resumes from {kept}")
        return None
    for _, old in checkpoints(folder)[:-KEEP]:
        old.unlink(missing_ok=True)
    return path


def _write(state: dict[str, Any], tmp: Path) -> None:
    # through a Python file object: a full disk then surfaces as an OSError with its errno (torch
    # writing to a path says only "unexpected pos 305216 vs 305104")
    with open(tmp, "wb") as file:
        torch.save(state, file)


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
    remove_stale_temporaries(folder)  # a killed writer's half checkpoint would keep the folder
    for _, path in checkpoints(folder):
        path.unlink(missing_ok=True)
    if folder.is_dir() and not any(folder.iterdir()):
        folder.rmdir()
