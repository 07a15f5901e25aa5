"""``--set`` and ``--sweep``: changing inputs of a workflow from the command line."""

from __future__ import annotations

import fnmatch
import hashlib
import itertools
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..modelfolders import MODEL_SUFFIXES
from ..nodes.spec import Catalogue
from ..paths import folder_checks_remembered
from .load import ParseError, parse_yaml
from .problems import Problem, WorkflowError, listing, shown
from .validate import BoundNode, bind, resolve_path
from .workflow import Link, Workflow, is_link

LABEL_LIMIT = 60  # characters of a sweep value in a file name
MAX_VARIANTS = 1000  # variants of one run (the product of the sweeps' lengths): each is bound and run
REPLACE = ":replace"  # NODE.INPUT:replace=FIND,R1,R2: A1111's "Prompt S/R" (the first value is the text to find)
EVERY_CHOICE = "*"  # NODE.INPUT=*: every value a choice input offers (every sampler, every scheduler)
WILDCARDS = "*?["  # an input name holding one of these names every input it matches (strength_model_*)


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
    # set: ``value`` replaces this text in the input's own text instead of replacing the whole input
    find: str | None = None

    @property
    def axis_title(self) -> str:
        """What a sweep of this override changes, as a grid's axis title: ``node.input``."""
        where = f"{self.node}.{self.input}"
        return f"{where} ({shown(self.find)} replaced)" if self.find is not None else where

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
    """``NODE.INPUT=V1,V2,...`` (or a YAML list ``[V1, V2]`` when values hold commas).

    ``NODE.INPUT:replace=FIND,R1,R2`` replaces the text FIND in the input's text by each value in
    turn, FIND itself first (A1111's "Prompt S/R"). INPUT may name several inputs with a wildcard
    (``stack.strength_model_*``: every slot of a stack at once).
    """
    target, sep, rest = text.partition("=")
    find = target.endswith(REPLACE)
    if find:
        text = f"{target.removesuffix(REPLACE)}{sep}{rest}"
    node, name, value = _split(text, "--sweep")
    parsed = _yaml(value, "--sweep", text) if value.strip().startswith("[") else None
    if isinstance(parsed, list):
        items = parsed
    else:
        pieces = value.split(",")
        _check_variant_count(len(pieces), f"--sweep {shown(text)} has {len(pieces):,} values")  # before parsing each
        items = [_yaml(v, "--sweep", text) if v and v != EVERY_CHOICE else v for v in pieces]
    if not items:
        raise WorkflowError([Problem("bad_override", f"--sweep {shown(text)} has no values")])
    _check_variant_count(len(items), f"--sweep {shown(text)} has {len(items):,} values")
    if find:
        return _replacements(node, name, items, text)
    return [Override(node, name, item) for item in items]


def _replacements(node: str, name: str, items: list[Any], text: str) -> list[Override]:
    """A Prompt S/R sweep: the first value is the text to find, and the first variant keeps it."""
    words = [str(item) for item in items]
    if not words[0]:
        raise WorkflowError([Problem("bad_override", f"--sweep {shown(text)}: the first value is the text to "
                                     "replace and cannot be empty")])
    return [Override(node, name, word, find=words[0]) for word in words]


def _check_variant_count(count: int, what: str) -> None:
    if count > MAX_VARIANTS:
        raise WorkflowError([Problem("bad_override", f"{what}: at most {MAX_VARIANTS:,} variants run at once; "
                                     "split the sweep over several runs")])


def expand_sweeps(workflow: Workflow, sweeps: list[list[Override]], catalogue: Catalogue,
                  cwd: Path | None = None) -> list[list[Override]]:
    """The sweeps with their shorthands spelled out against ``workflow``: ``*`` for every choice of a
    choice input, and a folder given as the only value of a file input for every model file in it
    (sorted: a folder of LoRAs compared side by side)."""
    return [_expanded(workflow, sweep, catalogue, cwd) for sweep in sweeps]


def _expanded(workflow: Workflow, sweep: list[Override], catalogue: Catalogue, cwd: Path | None) -> list[Override]:
    first = sweep[0]
    call = workflow.nodes.get(first.node)
    spec = catalogue.get(call.type) if call else None
    decl = spec.input(first.input) if spec else None
    if decl is None or len(sweep) != 1 or first.find is not None or not isinstance(first.value, str):
        return sweep  # nothing to spell out (unknown names are reported when the overrides are applied)
    if first.value == EVERY_CHOICE and decl.choices:
        return [Override(first.node, first.input, choice) for choice in decl.choices]
    if decl.path and decl.path_kind == "file":
        folder = Path(first.value).expanduser()
        folder = folder if folder.is_absolute() or cwd is None else cwd / folder
        if folder.is_dir():
            return [Override(first.node, first.input, path) for path in _model_files(folder, first)]
    return sweep


def _model_files(folder: Path, override: Override) -> list[str]:
    files = sorted(str(entry.path) for entry in os.scandir(folder)
                   if entry.is_file() and Path(entry.name).suffix.lower() in MODEL_SUFFIXES)
    if not files:
        raise WorkflowError([Problem("bad_override", f"--sweep {override.node}.{override.input}: the folder "
                                     f"{shown(str(folder))} holds no model files (.safetensors ...) to sweep over",
                                     override.node, override.input)])
    _check_variant_count(len(files), f"--sweep {override.node}.{override.input}: {folder} has {len(files):,} files")
    return files


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
        spec = catalogue.get(call.type)
        names = _input_names(override, spec)
        if not names:
            problems.append(Problem("unknown_input", f"--set/--sweep {shown(override.input)} matches no input of "
                                    f"node {shown(override.node)} ({call.type})", override.node, override.input))
        for name in names:
            try:
                call.inputs[name] = _new_value(override, spec.input(name) if spec else None, call.inputs.get(name),
                                               cwd)
            except WorkflowError as exc:
                problems += exc.problems
    if problems:
        raise WorkflowError(problems)
    return result


def _input_names(override: Override, spec) -> list[str]:
    """The inputs an override sets: its own, or every declared one its wildcard matches."""
    if not any(char in override.input for char in WILDCARDS):
        return [override.input]
    return [decl.name for decl in (spec.inputs if spec else ()) if fnmatch.fnmatchcase(decl.name, override.input)]


def _new_value(override: Override, decl, current: Any, cwd: Path | None) -> Any:
    """The value ``override`` gives an input that holds ``current`` now."""
    value = override.value
    if override.find is not None:
        if current is None and decl is not None and not decl.required:
            current = decl.default
        if not isinstance(current, str) or override.find not in current:
            raise WorkflowError([Problem("bad_override", f"--sweep {override.node}.{override.input}{REPLACE}: the text "
                                         f"to replace, {shown(override.find)}, is not in the input's value "
                                         f"{shown(current)}; the first value must be text the input holds",
                                         override.node, override.input)])
        return current.replace(override.find, str(value))
    if is_link(value):
        return Link(str(value[0]), value[1])
    if decl is not None and decl.path and isinstance(value, str) and cwd is not None:
        return resolve_path(value, cwd, decl.folder)
    return value


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
