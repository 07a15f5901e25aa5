"""Writing files safely: atomically, never over another writer's file, with failures in words.

Every write goes to a temporary name in the destination folder and is renamed into place when
it is complete, so a crash never leaves a half-written file under the final name. Temporaries
are named ``.{name}.lntmp-{host}-{pid}-{token}``: recognisably ours and naming their writer, so
a later write into the same folder removes the ones whose writer died (a SIGKILL runs no
cleanup) and never touches anything else.
"""

from __future__ import annotations

import errno
import itertools
import os
import re
import secrets
import shutil
import socket
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from safetensors import SafetensorError

from .errors import NodeError

try:  # POSIX only; on Windows the disk cache is used without a lock (see exclusive_lock)
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

TEMP_TAG = ".lntmp-"
STALE_AFTER = 24 * 3600  # seconds: another machine's temporaries (its processes cannot be asked)
_NAME_BYTES = 120  # of the final name kept in a temporary's name (file names stop at 255 bytes)
_OLD = ".old"  # a folder moved aside while being replaced (see atomic_folder)
_TEMP = re.compile(rf"^\.(?P<name>.*){re.escape(TEMP_TAG)}(?P<host>.+)-(?P<pid>\d+)-(?P<token>[0-9a-f]{{8}})"
                   rf"(?P<old>{re.escape(_OLD)})?$", re.DOTALL)

_WORDS = {
    errno.ENOSPC: "the disk is full",
    getattr(errno, "EDQUOT", -1): "the disk quota is exceeded",
    errno.EROFS: "the file system is read-only",
    errno.EACCES: "permission denied",
    errno.EPERM: "permission denied",
    errno.EIO: "an input/output error (a failing disk or a lost network mount)",
    errno.ENAMETOOLONG: "the file name is too long",
}
_OS_ERROR_IN_TEXT = re.compile(r"\(os error (\d+)\)")  # how safetensors (Rust) reports the errno
_FULL_BELOW = 1 << 20  # bytes free under which a failed write is taken to be a full disk
# what a writer raises when the disk fails without saying why (torch: RuntimeError "unexpected pos");
# a ValueError or the like is a bad value, never blamed on the disk
_MAY_HIDE_ERRNO = (OSError, RuntimeError, SafetensorError)


class WriteError(NodeError, OSError):
    """A file or folder could not be written; the message says why in words (a full disk, ...).

    Also an OSError, so callers that handle file errors as OSError keep doing so.
    """

    def __init__(self, path: Path, reason: str, code: int | None = None):
        super().__init__(f"could not write {path}: {reason}")
        self.path, self.reason, self.errno = path, reason, code


# --------------------------------------------------------------------------- failures in words


def failure_errno(exc: BaseException) -> int | None:
    """The errno behind a failed write, wherever the library put it.

    An OSError carries it; torch raises a RuntimeError ("unexpected pos ...") whose context is the
    OSError of the file object it wrote to; safetensors says "(os error 28)" in its message.
    """
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno:
            return current.errno
        if found := _OS_ERROR_IN_TEXT.search(str(current)):
            return int(found.group(1))
        current = current.__cause__ or current.__context__
    return None


def disk_nearly_full(path: Path) -> bool:
    """Whether the file system holding ``path`` (or its nearest existing parent) has under 1 MiB free."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        stats = os.statvfs(path)
    except (OSError, AttributeError):  # Windows has no statvfs
        return False
    return stats.f_bavail * stats.f_frsize < _FULL_BELOW


def describe_write_failure(exc: BaseException, path: Path | None = None) -> str | None:
    """Why a write failed, in words ("the disk is full (errno 28, No space left on device)").

    None when ``exc`` is not a recognisable write failure (a bug or a bad value: not ours to
    reword). ``path``, where the write went, lets a failure without an errno (torch, safetensors
    without one) be recognised as a full disk.
    """
    code = failure_errno(exc)
    if code in _WORDS:
        return f"{_WORDS[code]} (errno {code}, {os.strerror(code)})"
    if path is not None and isinstance(exc, _MAY_HIDE_ERRNO) and disk_nearly_full(path):
        detail = f"errno {code}, {os.strerror(code)}" if code else f"{type(exc).__name__}: {exc}"
        return f"the disk is full ({detail})"
    return None


def describe_any_failure(exc: BaseException, path: Path | None = None) -> str:
    """:func:`describe_write_failure`, or the exception's own type and message."""
    if isinstance(exc, WriteError):
        return exc.reason
    return describe_write_failure(exc, path) or f"{type(exc).__name__}: {exc}"


@contextmanager
def naming_write_failures(path: Path) -> Iterator[None]:
    """Turn a failed write to ``path`` into a :class:`WriteError` that says why in words.

    Failures that are not about the disk (a bug, a bad value, FileExistsError) pass unchanged.
    """
    try:
        yield
    except (WriteError, FileExistsError):  # already in words; a taken name is the caller's to handle
        raise
    except Exception as exc:
        reason = describe_write_failure(exc, path)
        if reason is None:
            raise
        raise WriteError(path, reason, failure_errno(exc)) from exc


# --------------------------------------------------------------------------- our temporaries


def _host() -> str:
    name = re.sub(r"[^A-Za-z0-9._-]", "_", socket.gethostname())[:40]
    return name or "host"


def temporary_name(final_name: str) -> str:
    """A hidden name for a temporary that becomes ``final_name``, naming its host and process."""
    name = final_name.encode()[:_NAME_BYTES].decode(errors="ignore")
    return f".{name}{TEMP_TAG}{_host()}-{os.getpid()}-{secrets.token_hex(4)}"


def is_our_temporary(name: str) -> bool:
    """Whether a file or folder name is one of our temporaries (or a folder moved aside)."""
    return _TEMP.match(name) is not None


def _writer_alive(host: str, pid: int, age: float) -> bool:
    """Whether the process that made a temporary may still be writing it (when unsure: yes)."""
    if host != _host() or os.name == "nt":  # Windows: os.kill would terminate the process, not probe it
        return age < STALE_AFTER
    if pid <= 0 or pid == os.getpid():  # ours (another thread); pid 0 would probe our process group
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # alive but another user's (EPERM), or unknown: leave it
        return True
    return True


_tidied: dict[str, float] = {}  # folder -> when this process last removed stale temporaries there
TIDY_EVERY = 60.0  # seconds: a folder written to often (SaveImages' batches) is scanned once a minute


def tidy_folder(folder: Path) -> None:
    """:func:`remove_stale_temporaries` of ``folder``, at most once per :data:`TIDY_EVERY` per process."""
    key, now = str(folder), time.monotonic()
    if now - _tidied.get(key, -TIDY_EVERY) >= TIDY_EVERY:
        _tidied[key] = now
        remove_stale_temporaries(folder)


def remove_stale_temporaries(folder: Path) -> list[Path]:
    """Remove our temporaries in ``folder`` whose writer is gone; return what was removed.

    Gone: on this host, the process no longer exists; from another host, older than
    :data:`STALE_AFTER`. Anything not named like ours, symlinks and live writers' temporaries
    are never touched. A folder moved aside while being replaced is put back when the replacement
    never arrived (its final name is free), so an interrupted overwrite loses nothing.
    """
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return []
    removed = []
    for entry in entries:
        found = _TEMP.match(entry.name)
        if found is None or entry.is_symlink():
            continue
        try:
            age = time.time() - entry.stat(follow_symlinks=False).st_mtime
        except OSError:  # already gone (another process tidying the same folder)
            continue
        if _writer_alive(found["host"], int(found["pid"]), age):
            continue
        path = Path(entry.path)
        try:
            if found["old"] and _put_back(path, found["name"]):
                continue
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(path)
            else:
                path.unlink()
        except OSError:  # another process tidying, or not ours to remove after all: leave it
            continue
        removed.append(path)
    return removed


def _put_back(aside: Path, name: str) -> bool:
    """Rename a folder moved aside during an interrupted replace back to its name, when free."""
    if len(name.encode()) >= _NAME_BYTES or not aside.is_dir():  # a truncated name is not the final one
        return False
    final = aside.parent / name
    if final.exists():
        return False
    os.replace(aside, final)
    return True


def _make_folder(folder: Path) -> None:
    with naming_write_failures(folder):
        folder.mkdir(parents=True, exist_ok=True)


def new_temporary_file(path: Path) -> Path:
    """Create an empty temporary file of ours beside ``path`` (its parent made if needed)."""
    return _new_temporary(path, lambda tmp: os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)))


def new_temporary_folder(path: Path) -> Path:
    """Create an empty temporary folder of ours beside ``path`` (its parent made if needed)."""
    return _new_temporary(path, Path.mkdir)


def _new_temporary(path: Path, create: Callable[[Path], None]) -> Path:
    """``create`` (failing if it exists) a fresh temporary name of ours beside ``path``; that name."""
    _make_folder(path.parent)
    while True:
        tmp = path.parent / temporary_name(path.name)
        try:
            with naming_write_failures(tmp):
                create(tmp)
            return tmp
        except FileExistsError:  # the random token collided: draw another
            continue


# --------------------------------------------------------------------------- writing


def atomic_write(path: str | Path, write: Callable[[Path], None], overwrite: bool = True) -> Path:
    """Call ``write(tmp_path)`` and move the result to ``path`` only when it succeeded.

    A crash or error leaves no half-written file at ``path`` (and no temporary file behind; one
    left by a killed process is removed by the next write into the folder). A failure of the disk
    raises :class:`WriteError` saying why. Without ``overwrite`` an existing ``path``, even one
    that appears while writing, is never replaced: FileExistsError.
    """
    path = Path(path)
    if not overwrite:
        return write_new_file([path], write)
    tidy_folder(path.parent)
    tmp = new_temporary_file(path)
    try:
        with naming_write_failures(path):
            write(tmp)
            os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_new_file(candidates: Iterable[str | Path], write: Callable[[Path], None]) -> Path:
    """Write once, then give the file the first of ``candidates`` (one folder) that is still free.

    Each name is claimed atomically, so two writers at the same moment (threads or processes)
    never take the same one and nothing is overwritten. Raises FileExistsError when all are taken.
    """
    names = (Path(c) for c in candidates)
    first = next(names)
    tidy_folder(first.parent)
    tmp = new_temporary_file(first)
    try:
        with naming_write_failures(first):
            write(tmp)
        for path in itertools.chain([first], names):
            with naming_write_failures(path):
                if _claim(tmp, path):
                    return path
        raise FileExistsError(f"{first} exists")
    finally:
        tmp.unlink(missing_ok=True)


_NO_FALLBACK = {errno.ENOSPC, getattr(errno, "EDQUOT", -1), errno.EROFS, errno.EIO}


def _claim(tmp: Path, path: Path) -> bool:
    """Give the finished ``tmp`` the name ``path`` unless it exists; False when it does.

    A hard link fails when the name exists, so the file appears whole and is never replaced.
    Where hard links are not supported (EPERM on FAT, some network file systems), the name is
    claimed with an exclusive create and the file renamed over the (empty) claim.
    """
    try:
        os.link(tmp, path)
        return True
    except FileExistsError:
        return False
    except OSError as exc:
        if exc.errno in _NO_FALLBACK:  # the disk itself failed: the fallback cannot succeed either
            raise
    try:
        os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
    except FileExistsError:
        return False
    os.replace(tmp, path)
    return True


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def atomic_folder(path: str | Path, write: Callable[[Path], None],
                  overwrite: bool | Callable[[Path], bool] = False) -> Path:
    """Call ``write(tmp_folder)`` beside ``path`` and rename the result to ``path`` when it succeeded.

    What is already at ``path`` is replaced only when ``overwrite`` is True, or is a function that
    returns True for it (asked once the new folder is complete); otherwise FileExistsError (at once,
    before writing, when ``overwrite`` is False). A replaced folder is moved aside first, deleted
    once the new one is in place, and put back if the rename fails. A failure leaves no temporary
    folder; one left by a killed process is removed by the next write into the same folder, and a
    folder it had moved aside is put back. A failure of the disk raises WriteError saying why.
    """
    path = Path(path)
    if not callable(overwrite) and not overwrite and path.exists():
        raise FileExistsError(f"{path} exists")
    remove_stale_temporaries(path.parent)
    tmp = new_temporary_folder(path)
    old = path.parent / f"{tmp.name}{_OLD}"  # recognised as ours too: put back if we are killed in between
    try:
        with naming_write_failures(path):
            write(tmp)
            if path.exists():
                if not (overwrite(path) if callable(overwrite) else overwrite):
                    raise FileExistsError(f"{path} exists")
                os.replace(path, old)
            try:
                os.replace(tmp, path)
            except OSError as exc:
                if old.exists():
                    os.replace(old, path)
                elif exc.errno in (errno.ENOTEMPTY, errno.EEXIST):  # another writer got there in between
                    raise FileExistsError(f"{path} exists") from exc
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if old.is_dir():
            shutil.rmtree(old, ignore_errors=True)
        elif old.exists():
            old.unlink()
    return path


# --------------------------------------------------------------------------- the cache folder


def work_folder(cache_dir: str | Path, kind: str, node_type: str, key: str) -> Path:
    """Where one kind of a node's work is kept under the cache dir: ``<cache dir>/<kind>/<node type>/<key>``.

    ``key`` is the node's cache key, so the folder belongs to its exact inputs; ``kind`` says what
    is kept (``results`` for a result kept on disk, ``checkpoints`` for a training's checkpoints).
    """
    return Path(cache_dir) / kind / node_type / key


def sibling_work_folder(folder: Path, kind: str) -> Path:
    """The :func:`work_folder` of another ``kind`` for the same node type and key as ``folder`` (one too)."""
    return work_folder(folder.parents[2], kind, folder.parent.name, folder.name)


# --------------------------------------------------------------------------- one process at a time


@contextmanager
def exclusive_lock(path: Path, on_wait: Callable[[], None] | None = None) -> Iterator[str | None]:
    """Hold an exclusive lock on the file ``path`` for the ``with`` body; other holders wait.

    ``on_wait`` is called once before waiting for another holder. The kernel frees the lock when
    its holder exits however it dies, so a killed holder's lock is taken over at once; the lock
    file names its holder while held, so a takeover is noticed: the body gets that holder
    (``"process 123 on host"``), or None. Without locks (Windows, a read-only or full cache
    folder) the body runs unlocked.
    """
    handle = _open_lock(path)
    if handle is not None and not _take_lock(handle, on_wait):
        os.close(handle)
        handle = None
    if handle is None:
        yield None
        return
    try:
        previous = _read_holder(handle)
        _write_holder(handle, f"process {os.getpid()} on {_host()}")
        try:
            yield previous
        finally:
            _write_holder(handle, "")  # released normally: nobody to take over from
    finally:
        os.close(handle)  # closing releases the lock


def _take_lock(handle: int, on_wait: Callable[[], None] | None) -> bool:
    """Lock ``handle`` exclusively, waiting for another holder; False where the file system has no
    locks (ENOLCK on NFS without lockd, ENOSYS on Lustre without ``-o flock``)."""
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if on_wait is not None:
                on_wait()
            fcntl.flock(handle, fcntl.LOCK_EX)
    except OSError:
        return False
    return True


def _open_lock(path: Path) -> int | None:
    if fcntl is None:
        return None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        return os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError:
        return None


def _read_holder(handle: int) -> str | None:
    try:
        return os.pread(handle, 200, 0).decode(errors="replace").strip() or None
    except OSError:
        return None


def _write_holder(handle: int, holder: str) -> None:
    try:
        os.ftruncate(handle, 0)
        if holder:
            os.pwrite(handle, holder.encode(), 0)
    except OSError:  # a full disk: the lock itself still holds
        pass
