"""lora-nodes: LoRA work on diffusion models as node graphs, run headless or inside ComfyUI.

Linked (or copied) into ``ComfyUI/custom_nodes/``, this package is also a ComfyUI node pack:
``NODE_CLASS_MAPPINGS`` and ``NODE_DISPLAY_NAME_MAPPINGS`` are built on first access, so a plain
``import lora_nodes`` stays cheap.
"""

from . import comfyui  # cheap: the pack's classes are built only when asked for

__version__ = "0.1.0"


def __getattr__(name: str):
    if name in comfyui.MAPPINGS:
        return getattr(comfyui, name)
    raise AttributeError(f"module 'lora_nodes' has no attribute {name!r}")
