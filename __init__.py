"""ComfyUI entry point: clone this repository into ComfyUI/custom_nodes/ and restart ComfyUI.

ComfyUI imports this folder as a package and reads the two mappings below; the nodes themselves
live in the ``lora_nodes`` package beside this file.
"""

if __package__:  # imported as a package, as ComfyUI does
    from .lora_nodes import comfyui as _pack
else:  # imported as a plain module (e.g. by a test runner from a folder whose name is not a package name)
    from lora_nodes import comfyui as _pack

# before the node classes are built (they import the libraries): one clear line naming the pip command
_pack.report_missing_requirements()
NODE_CLASS_MAPPINGS = _pack.NODE_CLASS_MAPPINGS
NODE_DISPLAY_NAME_MAPPINGS = _pack.NODE_DISPLAY_NAME_MAPPINGS

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
