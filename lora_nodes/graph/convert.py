"""Writing a workflow as a file of any format we read: ours (YAML, JSON) or ComfyUI's (API, UI)."""

from __future__ import annotations

import json

import yaml

from ..nodes.spec import Catalogue
from .comfy.api import to_api
from .comfy.ui_write import to_ui
from .workflow import Workflow

FORMATS = ("yaml", "json", "comfyui-api", "comfyui-ui")


def convert(workflow: Workflow, to: str, catalogue: Catalogue) -> str:
    """The workflow as the text of a file in format ``to``: yaml, json, comfyui-api or comfyui-ui."""
    if to == "yaml":
        return yaml.safe_dump(workflow.to_dict(), sort_keys=False, default_flow_style=None, allow_unicode=True)
    if to == "json":
        return json.dumps(workflow.to_dict(), indent=2) + "\n"
    if to == "comfyui-api":
        return json.dumps(to_api(workflow, catalogue), indent=2) + "\n"
    if to == "comfyui-ui":
        return json.dumps(to_ui(workflow, catalogue), indent=2) + "\n"
    raise ValueError(f"unknown format {to!r} (formats: {', '.join(FORMATS)})")
