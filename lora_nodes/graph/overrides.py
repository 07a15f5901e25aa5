"""``--set`` and ``--sweep``: changing inputs of a workflow from the command line."""

from __future__ import annotations

import hashlib
import itertools
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..nodes.spec import Catalogue
from ..paths import folder_checks_remembered
from .load import ParseError, parse_yaml
from .problems import Problem, WorkflowError, listing, shown
from .validate import BoundNode, bind, resolve_path
from .workflow import Link, Workflow, is_link

LABEL_LIMIT = 60  # characters of a sweep value in a file name
MAX_VARIANTS = 1000  # variants of one run (the product of the sweeps' lengths): each is bound and run


def _yaml(text: str, flag: str, whole: str) -> Any:
    try:
        return parse_yaml(text)
    except ParseError as exc:
        raise WorkflowError([Problem("bad_override", f"{flag} {shown(whole)}: the value {shown(text)} is not valid "
                                     f"YAML ({exc}); quote text that has YAML characters, e.g. "
                                     "'node.prompt=\"a: b\"'")]) from None


@dataclass(frozen=True)
class Override:
    """Set input ``input`` of node ``node`` to ``value``."""

    node: str
    input: str
    value: Any

    @property
    def label(self) -> str:
        """A file-name-safe name for this value (long values cut, with a hash to keep them apart)."""
        shown = str(self.value)
        if isinstance(self.value, str) and ("/" in shown or shown.endswith(".safetensors")):
            shown = Path(shown).stem or shown  # a path: its file name says enough
        label = re.sub(r"[^A-Za-z0-9._=+-]+", "-", f"{self.node}.{self.input}={shown}").strip("-")
        if len(label) > LABEL_LIMIT:
            digest = hashlib.blake2b(label.encode(), digest_size=4).hexdigest()
            label = f"{label[:LABEL_LIMIT - 9]}-{digest}"
        return label


def _split(text: str, flag: str) -> tuple[str, str, str]:
    target, sep, value = text.partition("=")
    node, dot, name = target.rpartition(".")
    if not sep or not dot or not node or not name:
        raise WorkflowError([Problem("bad_override", f"{flag} expects NODE.INPUT=VALUE, got {shown(text)}")])
    return node, name, value


def parse_set(text: str) -> Override:
    """``NODE.INPUT=VALUE``; the value is read as YAML (``0.5`` is a number, ``[a, 0]`` a link)."""
    node, name, value = _split(text, "--set")
    return Override(node, name, _yaml(value, "--set", text) if value != "" else "")


def parse_sweep(text: str) -> list[Override]:
    """``NODE.INPUT=V1,V2,...`` (or a YAML list ``[V1, V2]`` when values hold commas)."""
    node, name, value = _split(text, "--sweep")
    parsed = _yaml(value, "--sweep", text) if value.strip().startswith("[") else None
    if isinstance(parsed, list):
        items = parsed
    else:
        pieces = value.split(",")
        _check_variant_count(len(pieces), f"--sweep {shown(text)} has {len(pieces):,} values")  # before parsing each
        items = [_yaml(v, "--sweep", text) if v else "" for v in pieces]
    if not items:
        raise WorkflowError([Problem("bad_override", f"--sweep {shown(text)} has no values")])
    _check_variant_count(len(items), f"--sweep {shown(text)} has {len(items):,} values")
    return [Override(node, name, item) for item in items]


def _check_variant_count(count: int, what: str) -> None:
    if count > MAX_VARIANTS:
        raise WorkflowError([Problem("bad_override", f"{what}: at most {MAX_VARIANTS:,} variants run at once; "
                                     "split the sweep over several runs")])


def sweep_variants(sweeps: list[list[Override]]) -> list[tuple[Override, ...]]:
    """The cartesian product of several sweeps; one empty variant when there is no sweep.

    Raises (``bad_override``) for more than :data:`MAX_VARIANTS` variants, before building any.
    """
    count = math.prod(len(sweep) for sweep in sweeps)
    sizes = " x ".join(str(len(sweep)) for sweep in sweeps)
    _check_variant_count(count, f"the sweeps give {count:,} variants ({sizes})")
    return list(itertools.product(*sweeps))


def file_suffix(overrides: tuple[Override, ...] | list[Override]) -> str:
    """What a variant adds to the names of the files it writes (empty without overrides)."""
    label = "_".join(o.label for o in overrides)
    return f"_{label}" if label else ""


def apply_overrides(workflow: Workflow, overrides: list[Override] | tuple[Override, ...],
                    catalogue: Catalogue, cwd: Path | None = None) -> Workflow:
    """A copy of ``workflow`` with the overrides applied.

    A relative path given on the command line means relative to where the command runs
    (``cwd``), not to the workflow file, so it is made absolute here (a name not there is looked up
    in the model folders, as a name in the workflow is).
    """
    result = workflow.copy()
    problems = []
    for override in overrides:
        call = result.nodes.get(override.node)
        if call is None:
            problems.append(Problem("missing_node", f"--set/--sweep names node {shown(override.node)}, which is not "
                                    f"in the workflow (nodes: {listing(result.nodes)})", override.node, override.input))
            continue
        value = override.value
        spec = catalogue.get(call.type)
        decl = spec.input(override.input) if spec else None
        if is_link(value):
            value = Link(str(value[0]), value[1])
        elif decl is not None and decl.path and isinstance(value, str) and cwd is not None:
            value = resolve_path(value, cwd, decl.folder)
        call.inputs[override.input] = value
    if problems:
        raise WorkflowError(problems)
    return result


def bind_variants(workflow: Workflow, variants: list[tuple[Override, ...]], catalogue: Catalogue,
                  cwd: Path | None = None) -> list[tuple[Workflow, dict[str, BoundNode], tuple[Override, ...]]]:
    """Every variant applied and bound; raises one WorkflowError with the problems of all of them."""
    prepared, problems = [], []
    seen: set[Problem] = set()  # variants repeat each other's problems: each is reported once
    with folder_checks_remembered():  # variants mostly name the same folders: list each once
        for overrides in variants:
            try:
                variant = apply_overrides(workflow, overrides, catalogue, cwd)
                suffix_bytes = len(file_suffix(overrides).encode("utf-8", "replace"))
                prepared.append((variant, bind(variant, catalogue, suffix_bytes), overrides))
            except WorkflowError as exc:
                problems += [p for p in exc.problems if not (p in seen or seen.add(p))]
    if problems:
        raise WorkflowError(problems)
    return prepared
