"""The ComfyUI custom-node pack: one ComfyUI class per node declaration, generated, not written.

ComfyUI finds ``NODE_CLASS_MAPPINGS`` and ``NODE_DISPLAY_NAME_MAPPINGS`` in the pack's
``__init__`` (the repository's, which takes them from here). They are built by :mod:`.pack` on
first access, so the pack's other module, :mod:`.object_info` (a node as ComfyUI's ``/object_info``
describes it, which ``lora-nodes nodes --json`` prints), loads without building the classes.
"""

from __future__ import annotations

from typing import Any

MAPPINGS = ("NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS")


def __getattr__(name: str) -> Any:
    if name in MAPPINGS:
        # deferred: building the classes loads the node catalogue, and with it torch
        from . import pack

        return getattr(pack, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *MAPPINGS])
