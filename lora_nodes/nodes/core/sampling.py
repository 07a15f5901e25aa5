"""ComfyUI core nodes: sampling (see the package docstring)."""

from __future__ import annotations

SPECS: list = []  # this module's node specs, in the order `lora-nodes nodes` lists them
