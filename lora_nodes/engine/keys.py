"""Cache keys: blake2b of canonical JSON, never Python's ``hash()`` (it changes per process)."""

from __future__ import annotations

import hashlib
import json
import os
import stat
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..paths import scan_tree

if TYPE_CHECKING:
    from ..nodes.spec import NodeSpec

CONTENT_HASH_LIMIT = 64 * 2**20  # files up to this size are hashed by content; larger by size and mtime


def digest(data: Any) -> str:
    """Stable hex digest of JSON-ready ``data``."""
    text = json.dumps(data, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.blake2b(text.encode("utf-8"), digest_size=16).hexdigest()


class Fingerprints:
    """File fingerprints, each content hash computed once per file version in a process (and other
    hashes of a file, :meth:`hashed`, likewise)."""

    def __init__(self) -> None:
        self._hashes: dict[tuple[str, int, int], str] = {}
        self._other: dict[tuple[str, str, int, int], str] = {}

    def hashed(self, path: str | Path, compute: Callable[[Path], str]) -> str:
        """``compute(path)`` (a hash of the file, e.g. A1111's sha256 of a model), computed once per
        file version (path, size, mtime) in a process: a big model is read once, not per image."""
        status = os.stat(path)
        version = (f"{compute.__module__}.{compute.__qualname__}", str(path), status.st_size, status.st_mtime_ns)
        if version not in self._other:
            self._other[version] = compute(Path(path))
        return self._other[version]

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
            version = (str(path), status.st_size, status.st_mtime_ns)
            if version not in self._hashes:
                self._hashes[version] = content_hash(path)
            fp["blake2b"] = self._hashes[version]
        return fp


def content_fingerprint(fingerprint: dict[str, Any]) -> dict[str, Any]:
    """A fingerprint without where or when: the same files copied elsewhere key the same.

    Files too big to hash by content keep their size only.
    """
    if "files" in fingerprint:
        return {"files": [content_fingerprint(f) | {"path": f["path"]} for f in fingerprint["files"]]}
    return {k: v for k, v in fingerprint.items() if k in ("size", "blake2b")}


def content_hash(path: str | Path) -> str:
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


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
