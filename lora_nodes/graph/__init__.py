"""Workflow files: the model, loading (ours and ComfyUI's formats), the link graph, overrides,
validation, conversion, and what a run's files embed."""

from .load import load_workflow, parse_workflow
from .problems import Problem, WorkflowError
from .workflow import Link, NodeCall, Workflow

__all__ = ["Link", "NodeCall", "Problem", "Workflow", "WorkflowError", "load_workflow", "parse_workflow"]
