"""Workflow files: the model, loading, overrides and validation."""

from .load import load_workflow, parse_workflow
from .problems import Problem, WorkflowError
from .workflow import Link, NodeCall, Workflow

__all__ = ["Link", "NodeCall", "Problem", "Workflow", "WorkflowError", "load_workflow", "parse_workflow"]
