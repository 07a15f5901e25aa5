"""``lora-nodes serve``: ComfyUI's published web editor, served by our engine.

The editor (the ``comfyui-frontend-package`` wheel, installed with ``lora-nodes[editor]``) talks to its
backend over a small HTTP + WebSocket API; :mod:`.app` serves that API from our engine, :mod:`.worker`
runs the queued prompts one at a time, :mod:`.storage` keeps settings, saved workflows and the history
on disk, :mod:`.catalogue` and :mod:`.templates` describe our nodes and examples to the editor.
"""

from __future__ import annotations

import secrets
from dataclasses import replace
from pathlib import Path

from ..modelfolders import ModelFolders

EXAMPLES_DIR = Path(__file__).resolve().parents[2] / "workflows"  # the repository's examples, where present


def with_example_loras(folders: ModelFolders, examples_dir: Path | None) -> ModelFolders:
    """``folders`` with the examples' ``loras/`` folder searched last for LoRAs, so the example graphs
    (which name their LoRAs relative to themselves) find them by name in the editor too."""
    if examples_dir is None or not (examples_dir / "loras").is_dir():
        return folders
    kinds = dict(folders.kinds)
    loras = examples_dir.resolve() / "loras"
    if loras not in kinds.get("loras", ()):
        kinds["loras"] = (*kinds.get("loras", ()), loras)
    return replace(folders, kinds=kinds)


def new_token() -> str:
    """A token that is hard to guess (for a server others on the network can reach)."""
    return secrets.token_urlsafe(24)
