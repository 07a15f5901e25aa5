"""What the server keeps on disk: each user's settings and saved files, and the history of prompts.

Everything is written atomically (:mod:`lora_nodes.fileio`): a server killed mid-write leaves the
previous file or the new one, never half of one. A path a client names is confined to its folder:
no absolute paths, no ``..``, and no symlink that leads out.
"""

from __future__ import annotations

import json
import os
import re
import threading
from pathlib import Path
from typing import Any

from ..fileio import atomic_write, atomic_write_text, is_our_temporary, tidy_folder
from ..modelfolders import name_parts

DEFAULT_USER = "default"
SETTINGS_FILE = "comfy.settings.json"  # the name the editor's backend keeps settings under
# what a new user starts with: the welcome dialog (ComfyUI's template browser) is not opened, so the
# editor opens its default graph, which our extension makes the quickstart graph
# and does not ask ComfyUI's release server about ComfyUI versions (not ours, and no traffic leaves unasked)
# ComfyUI's classic canvas navigation, stated in full (the 1.27 editor fails at start, setting one of
# these while the other is not registered yet, when only the mode is known)
DEFAULT_SETTINGS = {"Comfy.TutorialCompleted": True, "Comfy.Notification.ShowVersionUpdates": False,
                    "Comfy.Canvas.NavigationMode": "legacy", "Comfy.Canvas.LeftMouseClickBehavior": "panning",
                    "Comfy.Canvas.MouseWheelScroll": "zoom"}
# files the editor reads at start when the user has them; absent, these stand in (a user's own replaces them)
DEFAULT_USER_FILES = {"user.css": b"", "comfy.templates.json": b"[]"}
USER_FOLDERS = ("workflows", "subgraphs")  # made at start: the editor lists them
HISTORY_LIMIT = 10_000  # prompts kept in the history; the oldest go first
PROMPT_ID = re.compile(r"^[A-Za-z0-9_.-]{1,100}$")  # a prompt id a client may choose (it names a file here)
# the prompt being run: found at start-up after a crash, it ends as an error (not *.json: no prompt's file)
RUNNING_FILE = "running-prompt.state"
SENSITIVE_EXTRA_DATA = ("auth_token_comfy_org", "api_key_comfy_org")  # never written to the history


class OutsideFolder(ValueError):
    """A path a client gave that leads outside the folder it must stay in."""


class AlreadyExists(Exception):
    """A save or move that would replace an existing file, and was asked not to."""


def confined(root: Path, relative: str) -> Path:
    """``relative`` (already URL-decoded, as aiohttp hands it over) as a path inside ``root``; raises
    :class:`OutsideFolder` otherwise.

    Refused: empty, NUL, absolute or drive paths, ``~``, any ``..`` part, and a path that resolves
    (through a symlink) outside ``root``. A ``%`` is part of the name: decoding again would turn a
    file called ``100%25.json`` into another one.
    """
    parts = name_parts(relative)  # the model folders' rule for a name inside a folder
    if parts is None:
        raise OutsideFolder(f"{relative!r} is not a path inside the folder")
    root = root.resolve()
    path = root.joinpath(*parts)
    if not path.resolve().is_relative_to(root):
        raise OutsideFolder(f"{relative!r} leads outside the folder")
    return path


class UserFiles:
    """One user's folder (single-user server: ``default``): settings and the files the editor saves."""

    def __init__(self, root: Path, user: str = DEFAULT_USER):
        self.root = Path(root) / user
        self._lock = threading.Lock()
        for folder in USER_FOLDERS:
            (self.root / folder).mkdir(parents=True, exist_ok=True)

    def settings(self) -> dict[str, Any]:
        """The user's settings: the defaults, overlaid by what the user set."""
        try:
            stored = json.loads((self.root / SETTINGS_FILE).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            stored = {}
        return {**DEFAULT_SETTINGS, **(stored if isinstance(stored, dict) else {})}

    def update_settings(self, changes: dict[str, Any]) -> None:
        """Set the given settings, keeping the others."""
        with self._lock:
            self.root.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.root / SETTINGS_FILE, json.dumps({**self.settings(), **changes}, indent=2))

    def path(self, relative: str) -> Path:
        """A file of the user's, by its path relative to the user's folder (confined to it)."""
        return confined(self.root, relative)

    def listing(self, folder: str, recurse: bool, full_info: bool, split: bool) -> list[Any] | None:
        """The files under ``folder`` as the editor asks for them; None when the folder does not exist."""
        base = self.path(folder)
        if not base.is_dir():
            return None
        found = sorted(p for p in (base.rglob("*") if recurse else base.iterdir())
                       if p.is_file() and not p.is_symlink() and not is_our_temporary(p.name))
        result: list[Any] = []
        for path in found:
            relative = path.relative_to(base).as_posix()
            if full_info:
                stat = path.stat()
                result.append({"path": relative, "size": stat.st_size, "modified": stat.st_mtime,
                               "created": stat.st_ctime})
            else:
                result.append([relative, *relative.split("/")] if split else relative)
        return result

    def write(self, relative: str, data: bytes, overwrite: bool) -> Path:
        """Write a file of the user's atomically; :class:`AlreadyExists` when it exists and not ``overwrite``.

        Other refusals are OSErrors: :class:`NotADirectoryError` where a file stands in for one of the
        folders on the way, :class:`IsADirectoryError` where ``relative`` is a folder.
        """
        path = self.path(relative)
        with self._lock:
            if path.is_dir():
                raise IsADirectoryError(f"{relative} is a folder")
            if not overwrite and path.exists():
                raise AlreadyExists(relative)
            _make_parents(path)
            atomic_write(path, lambda tmp: tmp.write_bytes(data))
        return path

    def move(self, source_relative: str, dest_relative: str, overwrite: bool) -> Path:
        """Move a file of the user's to another name in the user's folder; returns where it went.

        :class:`FileNotFoundError` when the source is no file, :class:`AlreadyExists` when the
        destination exists and not ``overwrite``, :class:`IsADirectoryError` when it is a folder (never
        replaced), :class:`NotADirectoryError` when a file stands where a folder on the way should be.
        """
        source, dest = self.path(source_relative), self.path(dest_relative)
        with self._lock:
            if not source.is_file():
                raise FileNotFoundError(source_relative)
            if dest.is_dir():
                raise IsADirectoryError(f"{dest_relative} is a folder")
            if not overwrite and dest.exists():
                raise AlreadyExists(dest_relative)
            _make_parents(dest)
            os.replace(source, dest)
        return dest

    def delete(self, relative: str) -> None:
        """Delete a file of the user's; :class:`FileNotFoundError` when there is no such file."""
        path = self.path(relative)
        with self._lock:
            if not path.is_file():
                raise FileNotFoundError(relative)
            path.unlink()

    def info(self, path: Path) -> dict[str, Any]:
        stat = path.stat()
        return {"path": path.relative_to(self.root.resolve()).as_posix(), "size": stat.st_size,
                "modified": stat.st_mtime, "created": stat.st_ctime}


def _make_parents(path: Path) -> None:
    """The folders above ``path``; :class:`NotADirectoryError` where a file stands in for one (mkdir
    itself says FileExistsError then, which would read as "the file exists")."""
    for parent in reversed(path.parents):
        if parent.exists() and not parent.is_dir():
            raise NotADirectoryError(f"{parent.name} is a file, not a folder")
    path.parent.mkdir(parents=True, exist_ok=True)


class History:
    """Finished prompts, newest last, one JSON file each in ``folder`` (so a restart keeps them).

    While a prompt runs its queue entry is kept in :data:`RUNNING_FILE`; a server killed meanwhile
    leaves it, and the next start records that prompt as failed ("the server stopped while it ran").
    """

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        tidy_folder(self.folder)  # temporaries a killed server left
        self._lock = threading.Lock()
        self._items: dict[str, dict[str, Any]] = {}
        self._order = 0
        self._load()
        self._recover_interrupted()

    def _load(self) -> None:
        entries = []
        for file in self.folder.glob("*.json"):
            try:
                entry = json.loads(file.read_text(encoding="utf-8"))
                entries.append((int(entry["order"]), file.stem, entry["item"]))
            except (OSError, ValueError, KeyError, TypeError):
                continue  # not one of ours, or unreadable: a history is not worth failing the start for
        for order, prompt_id, item in sorted(entries, key=lambda e: e[0]):
            self._items[prompt_id] = item
            self._order = max(self._order, order)

    def _recover_interrupted(self) -> None:
        running = self.folder / RUNNING_FILE
        try:
            queued = json.loads(running.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return
        # killed between recording the prompt and removing this file: the history already says how it ended
        if (isinstance(queued, list) and len(queued) >= 2 and isinstance(queued[1], str) and PROMPT_ID.match(queued[1])
                and queued[1] not in self._items):
            message = {"prompt_id": queued[1], "node_id": None, "node_type": None, "executed": [],
                       "exception_message": "the server stopped while this prompt ran; files it had written "
                       "completely were kept", "exception_type": "ServerStopped", "traceback": [],
                       "current_inputs": {}, "current_outputs": []}
            self.add(queued[1], history_item(queued, {}, "error", [["execution_error", message]]))
        running.unlink(missing_ok=True)

    def running(self, queued: list[Any]) -> None:
        """Note the prompt now running (its queue entry)."""
        atomic_write_text(self.folder / RUNNING_FILE, json.dumps(queued, default=str))

    def add(self, prompt_id: str, item: dict[str, Any]) -> None:
        """Record a finished prompt, and that none is running."""
        with self._lock:
            self._order += 1
            atomic_write_text(self.folder / f"{prompt_id}.json",
                              json.dumps({"order": self._order, "item": item}, default=str))
            self._items.pop(prompt_id, None)
            self._items[prompt_id] = item
            (self.folder / RUNNING_FILE).unlink(missing_ok=True)
            while len(self._items) > HISTORY_LIMIT:
                self._remove(next(iter(self._items)))

    def _remove(self, prompt_id: str) -> None:
        self._items.pop(prompt_id, None)
        (self.folder / f"{prompt_id}.json").unlink(missing_ok=True)

    def __contains__(self, prompt_id: object) -> bool:
        with self._lock:
            return prompt_id in self._items

    def delete(self, prompt_ids: list[str]) -> None:
        with self._lock:
            for prompt_id in prompt_ids:
                if isinstance(prompt_id, str) and prompt_id in self._items:
                    self._remove(prompt_id)

    def clear(self) -> None:
        with self._lock:
            for prompt_id in list(self._items):
                self._remove(prompt_id)

    def get(self, prompt_id: str | None = None, max_items: int | None = None, offset: int = -1) -> dict[str, Any]:
        """As ComfyUI's ``/history``: all (or the last ``max_items``, or from ``offset``), or one prompt's."""
        with self._lock:
            if prompt_id is not None:
                return {prompt_id: self._items[prompt_id]} if prompt_id in self._items else {}
            ids = list(self._items)
            if offset < 0 and max_items is not None:
                offset = len(ids) - max_items
            chosen = ids[max(offset, 0):]
            if max_items is not None:
                chosen = chosen[:max(max_items, 0)]
            return {i: self._items[i] for i in chosen}


def history_item(queued: list[Any], outputs: dict[str, Any], status: str, messages: list[Any]) -> dict[str, Any]:
    """A finished prompt as ComfyUI's history lists it: its queue entry, outputs and status."""
    number, prompt_id, prompt, extra_data, targets = (list(queued) + [None] * 5)[:5]
    extra = {k: v for k, v in (extra_data or {}).items() if k not in SENSITIVE_EXTRA_DATA}
    return {"prompt": [number, prompt_id, prompt, extra, targets or []], "outputs": outputs,
            "status": {"status_str": status, "completed": status == "success", "messages": messages},
            "meta": {node: {"node_id": node, "display_node": node} for node in outputs}}
