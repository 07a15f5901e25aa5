"""The ComfyUI custom-node pack: one ComfyUI class per node declaration, generated, not written.

ComfyUI finds ``NODE_CLASS_MAPPINGS`` and ``NODE_DISPLAY_NAME_MAPPINGS`` in the pack's
``__init__`` (the repository's, which takes them from here). They are built by :mod:`.pack` on
first access, so the pack's other module, :mod:`.object_info` (a node as ComfyUI's ``/object_info``
describes it, which ``lora-nodes nodes --json`` prints), loads without building the classes.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any

MAPPINGS = ("NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS")
REQUIREMENTS = Path(__file__).resolve().parents[2] / "requirements.txt"  # the repository's, beside the pack


def missing_requirements(requirements: Path = REQUIREMENTS) -> list[str]:
    """The distributions ``requirements`` names that are not installed (none when there is no such file)."""
    from importlib import metadata  # deferred: ``import lora_nodes`` must stay cheap (the CLI imports it)

    try:
        lines = requirements.read_text(encoding="utf-8").splitlines()
    except OSError:
        return []
    names = [re.split(r"[<>=!~;\[\s]", line.strip(), maxsplit=1)[0] for line in lines]
    missing = []
    for name in (n for n in names if n and not n.startswith("#")):
        try:
            metadata.distribution(name)
        except metadata.PackageNotFoundError:
            missing.append(name)
    return missing


def report_missing_requirements(requirements: Path = REQUIREMENTS) -> list[str]:
    """At ComfyUI's start-up: one log line naming what is missing and the pip command that installs it
    (rather than a ModuleNotFoundError at a node's first use). Returns the missing names."""
    import logging

    missing = missing_requirements(requirements)
    if missing:
        logging.getLogger("lora_nodes").warning(
            "lora-nodes: missing %s; its nodes fail until you run: %s -m pip install -r %s",
            ", ".join(missing), sys.executable, requirements)
    return missing


def __getattr__(name: str) -> Any:
    if name in MAPPINGS:
        # deferred: building the classes loads the node catalogue, and with it torch
        from . import pack

        return getattr(pack, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *MAPPINGS])
