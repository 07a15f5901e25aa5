"""Cache keys: blake2b of canonical JSON, never Python's ``hash()`` (it changes per process)."""

from __future__ import annotations

import hashlib
import json
import os
import stat
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import NodeError
from ..fileio import atomic_write_text
from ..paths import scan_tree
from ..tensorfiles import file_sha256, header_sha256, tensor_data_sha256

if TYPE_CHECKING:
    from ..nodes.spec import NodeSpec

CONTENT_HASH_LIMIT = 64 * 2**20  # files up to this size are hashed by content; larger by size and mtime
REMEMBERED_FROM = 2**20  # files at least this big have their hashes remembered across processes
STORE_ENTRIES = 20_000  # files remembered in a digest store; the least recently hashed are forgotten first

Version = tuple[int, int, int, int]  # what tells a file's versions apart: size, mtime, ctime, inode


def digest(data: Any) -> str:
    """Stable hex digest of JSON-ready ``data``."""
    text = json.dumps(data, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.blake2b(text.encode("utf-8"), digest_size=16).hexdigest()


def file_version(status: os.stat_result) -> Version:
    """A file's version as ``os.stat`` tells it. The change time is in it because no tool can set
    it back: a file rewritten with its old size and modification time (``cp -p``, ``rsync -t``)
    is still a new version."""
    return status.st_size, status.st_mtime_ns, status.st_ctime_ns, status.st_ino


class DigestStore:
    """File hashes remembered across processes, in one JSON file (the cache dir's ``file-digests.json``):
    a big LoRA or model is hashed once per version, not once per run.

    Entries are keyed by path and version (:func:`file_version`); a file that changed in any way is
    hashed again. Unreadable or damaged stores count as empty, and failing to write one only costs
    the next run the hashing: it is a cache. Writes merge with what other processes wrote meanwhile
    and replace the file atomically.
    """

    def __init__(self, path: Path):
        self.path = path
        self._entries: dict[str, dict[str, Any]] | None = None  # read on first use
        self._new: dict[str, dict[str, Any]] = {}

    def get(self, path: str, version: Version, what: str) -> str | None:
        entry = self._read().get(path)
        if entry and entry.get("version") == list(version):
            value = entry.get("digests", {}).get(what)
            return value if isinstance(value, str) else None
        return None

    def put(self, path: str, version: Version, what: str, value: str) -> None:
        entries = self._read()
        entry = entries.get(path)
        if not entry or entry.get("version") != list(version):
            entry = {"version": list(version), "digests": {}}
        entry["digests"][what] = value
        entries.pop(path, None)
        entries[path] = self._new[path] = entry  # last in the order: forgotten last

    def save(self) -> None:
        """Write what this process added, merged into what the file holds now."""
        if not self._new:
            return
        entries = {**self._load(), **self._new}
        entries = dict(list(entries.items())[-STORE_ENTRIES:])
        try:
            atomic_write_text(self.path, json.dumps(entries, separators=(",", ":")))
        except (OSError, NodeError):
            pass  # only a cache: the next run hashes again
        self._new.clear()

    def _read(self) -> dict[str, dict[str, Any]]:
        if self._entries is None:
            self._entries = self._load()
        return self._entries

    def _load(self) -> dict[str, dict[str, Any]]:
        try:
            entries = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        return {k: v for k, v in entries.items() if isinstance(v, dict) and isinstance(v.get("digests"), dict)} \
            if isinstance(entries, dict) else {}


class Fingerprints:
    """File fingerprints, each hash of a file computed once per file version in a process, and, with
    a :class:`DigestStore`, once per file version across processes for files of a MiB or more."""

    def __init__(self, store: DigestStore | None = None) -> None:
        self._hashes: dict[tuple[str, str, Version], str] = {}
        self.store = store

    def hashed(self, path: str | Path, compute: Callable[[Path], str]) -> str:
        """``compute(path)`` (a hash of the file, e.g. A1111's sha256 of a model), computed once per
        file version (:func:`file_version`): a big model is read once, not per image or per run."""
        return self._hashed(str(path), file_version(os.stat(path)), compute)

    def _hashed(self, path: str, version: Version, compute: Callable[[Path], str]) -> str:
        what = f"{compute.__module__}.{compute.__qualname__}"
        known = self._hashes.get((what, path, version))
        if known is None:
            remembered = self.store is not None and version[0] >= REMEMBERED_FROM
            known = self.store.get(path, version, what) if remembered else None
            if known is None:
                known = compute(Path(path))
                if remembered:
                    self.store.put(path, version, what, known)
            self._hashes[(what, path, version)] = known
        return known

    def save(self) -> None:
        """Keep the hashes computed so far for other processes (where there is a store)."""
        if self.store is not None:
            self.store.save()

    def __call__(self, path: str | Path) -> dict[str, Any]:
        """What identifies a file's version: path, size, mtime, and its content hash where cheap.

        A folder is fingerprinted by every regular file under it (symlinked folders are not
        entered). Anything else (a FIFO, a device) is never read: reading it could block or never end.
        """
        path = Path(path)
        status = os.stat(path)
        if stat.S_ISDIR(status.st_mode):
            files = sorted(path / relative for relative, mode in scan_tree(path)
                           if mode is not None and stat.S_ISREG(mode))
            return {"path": str(path), "files": [self(p) | {"path": str(p.relative_to(path))} for p in files]}
        fp: dict[str, Any] = {"path": str(path), "size": status.st_size, "mtime_ns": status.st_mtime_ns}
        if not stat.S_ISREG(status.st_mode):
            return fp | {"mode": stat.S_IFMT(status.st_mode)}
        if status.st_size <= CONTENT_HASH_LIMIT:
            fp["content"] = self._content_hash(path, file_version(status))
        return fp

    def _content_hash(self, path: Path, version: Version) -> str:
        """A hash of the file's bytes: its sha256; for a ``.safetensors`` file, the sha256 of its header
        and that of its tensor data. The second is A1111's hash of a LoRA without ``sshs_model_hash``
        (PNG parameters name LoRAs by it), so the data of such a LoRA is read and hashed once, not twice."""
        if path.suffix.lower() != ".safetensors":
            return self._hashed(str(path), version, file_sha256)
        return f"{self._hashed(str(path), version, header_sha256)}+{self._hashed(str(path), version, tensor_data_sha256)}"


def content_fingerprint(fingerprint: dict[str, Any]) -> dict[str, Any]:
    """A fingerprint without where or when: the same files copied elsewhere key the same.

    Files too big to hash by content keep their size only.
    """
    if "files" in fingerprint:
        return {"files": [content_fingerprint(f) | {"path": f["path"]} for f in fingerprint["files"]]}
    return {k: v for k, v in fingerprint.items() if k in ("size", "content")}


def node_key(node_type: str, version: int, literals: dict[str, Any],
             upstream: dict[str, tuple[str, int]], files: dict[str, Any]) -> str:
    """The cache key of one node: what it is, what it was given, and what it read."""
    return digest({
        "type": node_type,
        "version": version,
        "inputs": literals,
        "upstream": {name: list(ref) for name, ref in upstream.items()},
        "files": files,
    })


def spec_key(spec: NodeSpec, literals: dict[str, Any], upstream: dict[str, tuple[str, int]],
             fingerprints: Fingerprints) -> str:
    """The cache key of a node of type ``spec``: the one rule both hosts use (the scheduler headless,
    the ComfyUI pack from ComfyUI's prompt).

    ``literals`` are its literal inputs as it runs with them (defaults filled in, paths resolved),
    ``upstream`` each linked input's (upstream key, output index). Keyed: the node type and version,
    the literals that change the result (``in_key``), the upstream keys, and a fingerprint of each
    existing file a path input names (by content alone where ``content_key``). Raises OSError for
    a file that exists but cannot be read.
    """
    files = {}
    for decl in spec.inputs:
        value = literals.get(decl.name)
        if decl.path and value and Path(value).exists():
            fingerprint = fingerprints(value)
            files[decl.name] = content_fingerprint(fingerprint) if decl.content_key else fingerprint
    keyed = {d.name for d in spec.inputs if d.in_key and not d.content_key}
    return node_key(spec.id, spec.version, {name: value for name, value in literals.items() if name in keyed},
                    upstream, files)
