"""ComfyUI's file formats, one module per job.

- :mod:`.api`: the API format (a prompt): reading and writing.
- :mod:`.ui`: the editor's UI format (``workflow.json``): reading.
- :mod:`.ui_write`: the UI format: writing, and laying the graph out.
- :mod:`.shared`: what they share: ids, titles, the kept layout, the unsupported-node error.
- :mod:`.widgets`: how ComfyUI's editor shows one node: input order, widgets, sockets, seed controls.

The ``/object_info`` entry of a node is rendered by the pack: :mod:`lora_nodes.comfyui.object_info`.
"""
