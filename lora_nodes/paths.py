"""Rules for the paths a workflow names: files it reads, and the names it writes under the output folder.

Workflow files are shared, so every path in one is untrusted. The checks here touch the file
system as little as they can: output names are checked by their text alone, input paths with one
``stat`` (never a read, which could block on a FIFO or never end on ``/dev/zero``), and folders
by listing their entries up to a bound.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path, PurePosixPath

NAME_MAX = 255  # bytes in one file or folder name, on every common file system
# Bytes a writer may add to the last name of an output path: SaveImages' "_00001.png" (10), SaveLoRA's
# ".safetensors" (12). (Temporary names cut the final name to fit: lora_nodes.fileio.temporary_name.)
OUTPUT_NAME_RESERVE = 16
OUTPUT_NAME_MAX = 1024  # bytes in a whole output name (the output folder's own path comes on top)
FOLDER_ENTRY_LIMIT = 50_000  # files and folders a folder input may hold (counted recursively)

# (code, message) as validation reports it
PathProblem = tuple[str, str]


def cut(text: str, limit: int) -> str:
    """``text`` cut to ``limit`` characters (with ``...``), for showing user text in a message."""
    return text if len(text) <= limit else f"{text[:limit]}..."


def output_name_problem(name: str, reserve: int = 0) -> str | None:
    """Why ``name`` cannot be written under the output folder, or None when it can.

    Only the text is looked at: empty, a NUL, not encodable, absolute, starting with ``~``,
    climbing out with ``..``, naming the folder itself, or names too long for a file system.
    ``reserve`` is how many bytes will be appended to the last name besides
    :data:`OUTPUT_NAME_RESERVE` (e.g. a sweep variant's suffix). Symlinks inside the output folder
    are the runtime check's business (:meth:`NodeContext.output_path`).
    """
    shown = repr(cut(name, 120))
    if not name.strip():
        return "the output name is empty: give a file or folder name"
    if "\0" in name:
        return f"the output name {shown} contains a NUL character"
    try:
        encoded = os.fsencode(name)
    except UnicodeError:
        return f"the output name {shown} is not valid text for a file name"
    if len(encoded) > OUTPUT_NAME_MAX:
        return f"the output name is {len(encoded)} bytes long; at most {OUTPUT_NAME_MAX} are allowed"
    hint = "give a path relative to it (set the folder itself with --output-dir)"
    if PurePosixPath(name).is_absolute() or os.path.isabs(name):
        return f"{shown} is outside the output folder (an absolute path): {hint}"
    if name.startswith("~"):
        return f"{shown} is outside the output folder (it starts with '~', a home folder): {hint}"
    parts = [p for p in PurePosixPath(name).parts if p != "."]
    depth = 0
    for part in parts:
        depth += -1 if part == ".." else 1
        if depth < 0:
            return f"{shown} is outside the output folder (it climbs out with '..'): {hint}"
    if depth == 0:
        return f"{shown} names the output folder itself: give a file or folder name inside it"
    return _long_part(parts, reserve)


def _long_part(parts: list[str], reserve: int) -> str | None:
    """Why one name of ``parts`` is too long for a file system, or None."""
    for index, part in enumerate(parts):
        size = len(os.fsencode(part))
        last = index == len(parts) - 1
        limit = NAME_MAX - (OUTPUT_NAME_RESERVE + reserve if last else 0)
        if size > limit:
            why = (f" (file systems allow {NAME_MAX}, and a file name needs room for a counter, an extension or a "
                   "sweep variant's suffix)" if last else "")
            return f"the name {cut(part, 60)!r} in the output path is {size} bytes; at most {limit} fit{why}"
    return None


def expand_input_path(value: str, base_dir: Path) -> Path:
    """``value`` as an absolute path: ``~`` expanded, a relative path resolved against ``base_dir``.

    Raises ValueError with a message for the user when that cannot be done (a NUL character,
    text that is no file name, ``~user`` of an unknown user).
    """
    if "\0" in value:
        raise ValueError("the path contains a NUL character")
    try:
        os.fsencode(value)
    except UnicodeError:
        raise ValueError("the path is not valid text for a file name") from None
    path = Path(value)
    if value.startswith("~"):
        try:
            path = path.expanduser()
        except RuntimeError:  # ~user of a user this machine does not have
            user = value[1:].split("/", 1)[0]
            raise ValueError(f"'~{cut(user, 60)}' names no user on this machine") from None
    if path.is_absolute():
        return path  # as the user wrote it: only relative paths are anchored (and resolved)
    try:
        return (base_dir / path).resolve()
    except (OSError, RuntimeError) as exc:  # a symlink loop, a name too long to resolve
        raise ValueError(f"the path cannot be resolved ({exc.__class__.__name__}: {cut(str(exc), 120)})") from None


_SPECIAL_KINDS = (
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


def kind_of(mode: int) -> str:
    """What a file system entry is, in words: 'a file', 'a folder', 'a FIFO (named pipe)', ..."""
    if stat.S_ISREG(mode):
        return "a file"
    if stat.S_ISDIR(mode):
        return "a folder"
    return next((name for test, name in _SPECIAL_KINDS if test(mode)), "not a regular file")


def input_path_problem(value: str, base_dir: Path, kind: str) -> PathProblem | None:
    """What is wrong with an existing-path input, or None; ``kind`` is "file", "folder" or "any".

    One ``stat`` and, for a folder, a bounded listing: nothing is read, so a FIFO, a device or a
    huge folder is reported instead of hanging the check (and the fingerprint after it).
    """
    shown = repr(cut(value, 120))
    try:
        path = expand_input_path(value, base_dir)
    except ValueError as exc:
        return "invalid_value", f"{shown}: {exc}"
    try:
        mode = os.stat(path).st_mode
    except (FileNotFoundError, NotADirectoryError):
        return "file_not_found", f"file not found: {cut(value, 120)} (looked for {cut(str(path), 300)})"
    except OSError as exc:
        return "invalid_value", f"{shown} cannot be used: {exc.strerror or exc}"
    found = kind_of(mode)
    if kind == "folder" and not stat.S_ISDIR(mode):
        return "not_a_folder", f"{shown} is {found}; a folder is expected"
    if kind == "file" and not stat.S_ISREG(mode):
        return "not_a_file", f"{shown} is {found}; a file is expected"
    if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
        return "not_a_file", f"{shown} is {found}; a file or a folder is expected"
    return _folder_problem(path, shown) if stat.S_ISDIR(mode) else None


_remembered: ContextVar[dict[Path, PathProblem | None] | None] = ContextVar("remembered_folders", default=None)


@contextmanager
def folder_checks_remembered() -> Iterator[None]:
    """Within this block each folder is listed once, however many workflows name it (sweep variants)."""
    token = _remembered.set({})
    try:
        yield
    finally:
        _remembered.reset(token)


def _folder_problem(folder: Path, shown: str) -> PathProblem | None:
    """A folder that is too big to be what the user meant, or that holds a FIFO or device."""
    memo = _remembered.get()
    if memo is None:
        return _list_folder(folder, shown)
    if folder not in memo:
        memo[folder] = _list_folder(folder, shown)
    return memo[folder]


def _list_folder(folder: Path, shown: str) -> PathProblem | None:
    special: PathProblem | None = None
    for count, (relative, mode) in enumerate(scan_tree(folder), start=1):
        if count > FOLDER_ENTRY_LIMIT:  # said first: a wrong folder explains its odd entries too
            message = f"{shown} holds more than {FOLDER_ENTRY_LIMIT:,} files and folders: is this the right folder?"
            return "too_many_files", message
        if special is None and mode is not None and not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
            special = "not_a_file", f"{shown} holds {cut(relative, 120)!r}, which is {kind_of(mode)} and cannot be read"
    return special


def scan_tree(root: Path) -> Iterator[tuple[str, int | None]]:
    """Every entry under ``root`` as (relative path, mode), depth first, in no particular order.

    Symlinked folders are listed but not entered (no loops, no leaving the folder); the mode is
    that of a symlink's target (None for a dangling link); unreadable folders are skipped.
    """
    pending = [root]
    while pending:
        folder = pending.pop()
        try:
            listing = os.scandir(folder)
        except OSError:
            continue
        with listing:  # read lazily: a folder of millions of entries is never listed whole
            for entry in listing:
                mode = _entry_mode(entry)
                if mode is not None and stat.S_ISDIR(mode) and not entry.is_symlink():
                    pending.append(Path(entry.path))
                yield os.path.relpath(entry.path, root), mode


def _entry_mode(entry: os.DirEntry) -> int | None:
    """The kind of ``entry`` (of its target, for a symlink), without a system call where the listing told it."""
    try:
        if not entry.is_symlink():
            if entry.is_dir(follow_symlinks=False):
                return stat.S_IFDIR
            if entry.is_file(follow_symlinks=False):
                return stat.S_IFREG
        return entry.stat().st_mode
    except OSError:
        return None
