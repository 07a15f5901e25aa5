"""The web editor: ComfyUI's published frontend package, installed separately (``lora-nodes[editor]``).

The frontend is GPL-3.0 and ships as static files in the ``comfyui-frontend-package`` wheel, so it is
never part of this repository: the server finds the installed package, checks that it is the version
whose backend API the server implements, and serves its files.
"""

from __future__ import annotations

import importlib.util
from importlib import metadata
from pathlib import Path

DISTRIBUTION = "comfyui-frontend-package"
MODULE = "comfyui_frontend_package"
# The version whose HTTP + WebSocket API the server implements (1.27 still uses /queue and /history;
# later releases move to /api/jobs). pyproject's `editor` extra pins the same version.
PINNED_VERSION = "1.27.10"
INSTALL_HINT = f"pip install '{DISTRIBUTION}=={PINNED_VERSION}'  (or: pip install 'lora-nodes[editor]')"


class FrontendError(RuntimeError):
    """The editor's files are missing or of another version; the message says what to install."""


def installed_version() -> str | None:
    """The installed frontend package's version, or None when it is not installed."""
    try:
        return metadata.version(DISTRIBUTION)
    except metadata.PackageNotFoundError:
        return None


def static_root(version: str | None = None) -> Path:
    """The folder of the editor's static files (``index.html`` and its assets).

    Raises :class:`FrontendError` when the package is missing or not :data:`PINNED_VERSION`:
    another version calls endpoints this server does not have, and would fail in ways that are hard to tell.
    """
    version = installed_version() if version is None else version
    if version is None:
        raise FrontendError(f"the web editor is not installed: {INSTALL_HINT}")
    if version != PINNED_VERSION:
        raise FrontendError(f"the installed web editor is version {version}, but this server speaks the API of "
                            f"{PINNED_VERSION}: {INSTALL_HINT}")
    spec = importlib.util.find_spec(MODULE)
    if spec is None or spec.origin is None:
        raise FrontendError(f"the web editor's package is broken (no module {MODULE}): reinstall it: {INSTALL_HINT}")
    root = Path(spec.origin).parent / "static"
    if not (root / "index.html").is_file():
        raise FrontendError(f"the web editor's files are missing from {root}: reinstall it: {INSTALL_HINT}")
    return root
