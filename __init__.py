"""ComfyUI entry point: clone this repository into ComfyUI/custom_nodes/ and restart ComfyUI.

ComfyUI imports this folder as a package and reads the two mappings below; the nodes themselves
live in the ``lora_nodes`` package beside this file.
"""

from .lora_nodes.comfyui import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
