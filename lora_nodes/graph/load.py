"""Reading workflow files: our YAML/JSON format, and dispatch to the other readers.

A file is ours (YAML or JSON), ComfyUI's API or UI format (read by :mod:`.comfy.api` and
:mod:`.comfy.ui`), or a PNG whose workflow chunk is read by :mod:`lora_nodes.pngchunks`.

Workflow files are shared, so reading one is bounded: the file's size, a PNG's chunks, YAML alias
expansion (in values and in text), nesting depth, and the value types (everything must be something
JSON can hold, text valid Unicode, since the workflow is embedded in the PNGs it makes). Whatever
is wrong ends as a :class:`Problem`, never as an exception from a parser.
"""

from __future__ import annotations

import codecs
import json
import math
import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from ..nodes import catalogue
from ..paths import kind_of
from ..pngchunks import CHUNK_KEYS, MAX_TEXT_BYTES, ChunkError, preferred_chunk, read_chunks
from .comfy.api import from_api, is_api_format
from .comfy.ui import from_ui, is_ui_format
from .problems import Problem, WorkflowError, cut, describe, shown
from .workflow import FORMAT, NodeCall, Workflow, node_ids, parse_inputs

# a workflow file: as much as the workflow chunk of a PNG may hold, since the PNGs it makes embed it
MAX_DOCUMENT_BYTES = MAX_TEXT_BYTES
MAX_DEPTH = 64  # nesting levels of a document (ours needs 5; ComfyUI's editor files about 10)
MAX_ALIAS_NODES = 100_000  # YAML nodes that aliases may add when expanded (a "billion laughs" adds 10^9)
MAX_SHAPE_PROBLEMS = 20  # problems reported about a document's values before the rest are left out
OUR_KEYS = ("format", "nodes", "description")  # the other top-level keys of our format are kept as extras


def _fail(code: str, message: str, node: str | None = None) -> WorkflowError:
    return WorkflowError([Problem(code, message, node)])


# ---------------------------------------------------------------------------------------------
# parsing text within bounds


class ParseError(ValueError):
    """Text that cannot be read as YAML or JSON within the limits; the message says why, for a user."""


class _Limits:
    """What both of our YAML loaders refuse while building: alias bombs, values that contain
    themselves, nesting past :data:`MAX_DEPTH` through aliases, and a key written twice."""

    def construct_document(self, node: yaml.Node) -> Any:
        _check_composed(node)  # before anything is built from it
        return super().construct_document(node)  # type: ignore[misc]

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        if isinstance(node, yaml.MappingNode):
            self._refuse_duplicate_keys(node)
        return super().construct_mapping(node, deep=deep)  # type: ignore[misc]

    def _refuse_duplicate_keys(self, node: yaml.MappingNode) -> None:
        """A key written twice in one mapping (YAML lets the last one win silently; we refuse)."""
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                continue  # merge keys (<<) override on purpose; other non-scalar keys fail in PyYAML itself
            key = self.construct_object(key_node)  # type: ignore[attr-defined]
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"the key {shown(key)} appears twice in one mapping (the second one would "
                    "silently replace the first): node ids and input names must be unique", key_node.start_mark)
            seen.add(key)


def _too_deep(mark: Any) -> yaml.MarkedYAMLError:
    return yaml.scanner.ScannerError(None, None, f"values are nested more than {MAX_DEPTH} levels deep", mark)


class _PureLoader(_Limits, yaml.SafeLoader):
    """PyYAML's Python loader, refusing deep nesting while it scans.

    Its scanner costs (tokens x flow depth) and its composer recurses once per level, so a file
    of brackets would otherwise take minutes or exhaust the stack.
    """

    def fetch_flow_collection_start(self, TokenClass: type) -> None:
        if self.flow_level >= MAX_DEPTH:
            raise _too_deep(self.get_mark())
        super().fetch_flow_collection_start(TokenClass)

    def add_indent(self, column: int) -> bool:
        if self.indent < column and len(self.indents) >= MAX_DEPTH:
            raise _too_deep(self.get_mark())
        return super().add_indent(column)

    def construct_scalar(self, node: yaml.ScalarNode) -> Any:
        """Refuse a ``"\\udcff"`` escape (a lone surrogate), as libyaml does: ``--set`` values are read
        here and never pass through the loader's walk over a document."""
        value = super().construct_scalar(node)
        if isinstance(value, str) and (bad := _not_unicode(value)):
            raise yaml.constructor.ConstructorError(None, None, f"the text {shown(value)} {bad}", node.start_mark)
        return value


_C_LOADER = getattr(yaml, "CSafeLoader", None)  # libyaml: about 6x faster, where PyYAML was built with it
_FastLoader = type("_FastLoader", (_Limits, _C_LOADER), {}) if _C_LOADER is not None else None


def _check_event_depth(text: str) -> None:
    """Refuse nesting past :data:`MAX_DEPTH` from libyaml's event stream, before its composer (which
    recurses in C, and crashes on deep nesting) sees the text. Events come lazily: a deep file stops early."""
    depth = 0
    for event in yaml.parse(text, Loader=_C_LOADER):
        if isinstance(event, yaml.CollectionStartEvent):
            depth += 1
            if depth > MAX_DEPTH:
                raise _too_deep(event.start_mark)
        elif isinstance(event, yaml.CollectionEndEvent):
            depth -= 1


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.MappingNode):
        return [item for pair in node.value for item in pair]
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    return []


def _check_composed(root: yaml.Node) -> None:
    """Refuse a composed YAML document that would expand too far, contains itself, or nests too deep.

    Aliases make the composed graph a DAG whose expansion can be exponential in its size, so sizes
    and depths are computed once per distinct node (iteratively: the graph may be deep).
    """
    size: dict[int, int] = {}  # values in the node once its aliases are expanded
    weight: dict[int, int] = {}  # characters of scalars in it, expanded likewise
    depth: dict[int, int] = {}
    on_path: set[int] = set()
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, finished = stack.pop()
        key = id(node)
        if finished:
            children = _children(node)
            size[key] = 1 + sum(size[id(c)] for c in children)
            is_text = isinstance(node, yaml.ScalarNode)
            weight[key] = len(node.value) if is_text else sum(weight[id(c)] for c in children)
            depth[key] = 1 + max((depth[id(c)] for c in children), default=0)
            on_path.discard(key)
            if depth[key] > MAX_DEPTH:
                raise _limit(node, f"values are nested more than {MAX_DEPTH} levels deep")
            continue
        if key in size:
            continue
        if key in on_path:
            raise _limit(node, "an alias refers to a value that contains it (a value cannot contain itself)")
        on_path.add(key)
        stack.append((node, True))
        stack.extend((child, False) for child in _children(node))
    _check_expansion(root, size[id(root)] - len(size), weight[id(root)])


def _check_expansion(root: yaml.Node, added: int, weight: int) -> None:
    """Refuse aliases that add more than :data:`MAX_ALIAS_NODES` values, or expand the document past
    :data:`MAX_DOCUMENT_BYTES` of text: a few aliases of one long string are a small file but a huge
    workflow, which ``convert`` would write out and SaveImages embed in every PNG.

    (Without aliases the scalars hold no more characters than the file, which is within the limit.)
    """
    if added > MAX_ALIAS_NODES:
        raise _limit(root, f"its aliases expand to more than {MAX_ALIAS_NODES:,} values (a 'billion laughs' "
                     "file?); write the values out instead")
    if weight > MAX_DOCUMENT_BYTES:
        raise _limit(root, f"its aliases expand it to more than {MAX_DOCUMENT_BYTES // 2**20} MiB of text (about "
                     f"{weight // 2**20:,} MiB), more than a workflow may hold; write the values out instead")


def _limit(node: yaml.Node, message: str) -> yaml.MarkedYAMLError:
    return yaml.constructor.ConstructorError(None, None, message, node.start_mark)


def _yaml_message(exc: yaml.YAMLError) -> str:
    """A PyYAML error as one line: where, then what."""
    if isinstance(exc, yaml.MarkedYAMLError) and exc.problem_mark is not None:
        mark = exc.problem_mark
        context = f" ({exc.context})" if exc.context else ""
        return f"line {mark.line + 1}, column {mark.column + 1}: {cut(str(exc.problem), 500)}{context}"
    return cut(str(exc).replace("\n", " "), 500)


def _value_message(exc: Exception) -> str:
    text = str(exc)
    if "integer string conversion" in text:  # Python refuses ints of more than 4300 digits
        return "a number in it has more digits than can be read (4300)"
    return f"a value in it cannot be read ({cut(text.replace(chr(10), ' '), 500)})"


def parse_yaml(text: str) -> Any:
    """``text`` read as YAML (safe types only), within the limits; raises :class:`ParseError`."""
    loader = None
    try:
        if _FastLoader is not None:
            _check_event_depth(text)
            loader = _FastLoader(text)
        else:
            loader = _PureLoader(text)
        return loader.get_single_data()
    except yaml.YAMLError as exc:
        raise ParseError(_yaml_message(exc)) from None
    except RecursionError:
        raise ParseError(f"values are nested too deeply (at most {MAX_DEPTH} levels)") from None
    except (ValueError, OverflowError, TypeError) as exc:  # a scalar PyYAML cannot build: 2020-13-45, 10**5000
        raise ParseError(_value_message(exc)) from None
    finally:
        if loader is not None:
            loader.dispose()


def _unique_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result = dict(pairs)
    if len(result) < len(pairs):
        seen: set[str] = set()
        duplicate = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise ParseError(f"the key {shown(duplicate)} appears twice in one object (the second one would silently "
                         "replace the first): node ids and input names must be unique")
    return result


def parse_json(text: str) -> Any:
    """``text`` read as JSON, refusing duplicate keys; raises :class:`ParseError`."""
    try:
        return json.loads(text, object_pairs_hook=_unique_object)
    except ParseError:
        raise
    except json.JSONDecodeError as exc:
        raise ParseError(f"line {exc.lineno}, column {exc.colno}: {exc.msg}") from None
    except RecursionError:
        raise ParseError(f"values are nested too deeply (at most {MAX_DEPTH} levels)") from None
    except ValueError as exc:
        raise ParseError(_value_message(exc)) from None


# ---------------------------------------------------------------------------------------------
# reading files


def load_workflow(path: str | Path) -> Workflow:
    """Read a workflow from a ``.yaml``/``.yml``/``.json`` file or a PNG that embeds one."""
    path = Path(path)
    _check_workflow_file(path)
    if path.suffix.lower() == ".png":
        data = _read_png_workflow(path)
    else:
        text = _read_text(path)
        kind = "JSON" if path.suffix.lower() == ".json" else "YAML"
        try:
            data = parse_json(text) if kind == "JSON" else parse_yaml(text)
        except ParseError as exc:
            raise _fail("parse_error", f"{path} is not valid {kind}: {exc}") from None
        if data is None:
            raise _fail("parse_error", f"{path} is empty: a workflow needs 'format: {FORMAT}' and a 'nodes' mapping")
    return parse_workflow(data, base_dir=path.resolve().parent, source=path)


def _check_workflow_file(path: Path) -> None:
    """Raise unless ``path`` is a regular file (a folder, FIFO or device is named, never read)."""
    try:
        mode = os.stat(path).st_mode
    except (FileNotFoundError, NotADirectoryError):
        raise _fail("file_not_found", f"workflow file not found: {cut(str(path))}") from None
    except (OSError, ValueError) as exc:
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise _fail("file_not_found", f"cannot open the workflow file {cut(str(path))}: {why}") from None
    if not stat.S_ISREG(mode):
        raise _fail("not_a_file", f"{cut(str(path))} is {kind_of(mode)}: give a workflow file (.yaml, .json or .png)")


def _read_text(path: Path) -> str:
    """The text of a workflow file: at most :data:`MAX_DOCUMENT_BYTES`, UTF-8 (or UTF-16/32 with a BOM)."""
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_DOCUMENT_BYTES + 1)
    except OSError as exc:
        raise _fail("file_not_found", f"cannot read {cut(str(path))}: {exc.strerror or exc}") from None
    if len(raw) > MAX_DOCUMENT_BYTES:
        raise _fail("parse_error", f"{path} is larger than {MAX_DOCUMENT_BYTES // 2**20} MiB: too large for a "
                    "workflow file")
    return _decode(raw, path)


_BOMS = (  # UTF-32 first: its little-endian mark starts with UTF-16's
    (codecs.BOM_UTF32_LE, "utf-32"), (codecs.BOM_UTF32_BE, "utf-32"), (codecs.BOM_UTF8, "utf-8-sig"),
    (codecs.BOM_UTF16_LE, "utf-16"), (codecs.BOM_UTF16_BE, "utf-16"),
)


def _decode(raw: bytes, path: Path) -> str:
    codec = next((name for bom, name in _BOMS if raw.startswith(bom)), "utf-8")
    try:
        text = raw.decode(codec)
    except UnicodeDecodeError as exc:
        raise _fail("parse_error", f"{path} is not UTF-8 text (byte {exc.start} cannot be decoded): "
                    "save it as UTF-8") from None
    if "\0" in text:
        raise _fail("parse_error", f"{path} holds NUL characters (UTF-16 without a byte-order mark?): "
                    "save it as UTF-8")
    return text


def _read_png_workflow(path: Path) -> Any:
    """The workflow a PNG embeds: ours if it has one, else ComfyUI's ``prompt``, else its ``workflow``."""
    try:
        chosen = preferred_chunk(path, read_chunks(path))
    except ChunkError as exc:
        raise _fail(exc.code, str(exc)) from None
    if chosen is not None:
        key, text = chosen
        try:
            return parse_json(text)
        except ParseError as exc:
            raise _fail("parse_error", f"{path}: its '{key}' text chunk is not valid JSON: {exc}") from None
    names = ", ".join(f"'{k}'" for k in CHUNK_KEYS)
    raise _fail("no_workflow", f"{path} holds no workflow (none of the text chunks {names})")


# ---------------------------------------------------------------------------------------------
# what a document may hold


_JSON_SCALARS = (str, int, float, bool, type(None))
_NON_FINITE = "non-finite"  # what _shape_problems yields for NaN and infinities


def _shape_problems(data: Any) -> Iterator[tuple[tuple[Any, ...], str]]:
    """(path, what is wrong) for each value JSON cannot hold, each text that is not valid Unicode,
    each level past :data:`MAX_DEPTH`, and (path, :data:`_NON_FINITE`) for each NaN or infinity.
    Iterative: the data may be deep."""
    stack: list[tuple[Any, tuple[Any, ...]]] = [(data, ())]
    while stack:
        value, path = stack.pop()
        if len(path) >= MAX_DEPTH:
            yield path, f"is nested more than {MAX_DEPTH} levels deep"
        elif isinstance(value, dict):
            for key, item in value.items():
                if not isinstance(key, _JSON_SCALARS):
                    yield path, f"has a key that is {describe(key)} ({shown(key)}); quote it to make it text"
                elif isinstance(key, str) and (bad := _not_unicode(key)):
                    yield (*path, key), f"is a key that {bad}"
                else:
                    stack.append((item, (*path, key)))
        elif isinstance(value, list):
            stack.extend((item, (*path, index)) for index, item in enumerate(value))
        elif isinstance(value, float) and not math.isfinite(value):
            yield path, _NON_FINITE
        elif isinstance(value, str) and (bad := _not_unicode(value)):
            yield path, f"is text that {bad}"
        elif not isinstance(value, _JSON_SCALARS):
            hint = ("write a list instead" if isinstance(value, (set, frozenset)) else "write a mapping instead"
                    if isinstance(value, tuple) else "quote it to keep it as text")
            yield path, f"is {describe(value)} ({shown(value)}), which a JSON workflow cannot hold: {hint}"


def _not_unicode(text: str) -> str | None:
    """Why ``text`` is not valid Unicode, or None when it is.

    JSON's ``\\udcff`` escape makes a lone surrogate, which Python keeps in a str but
    nothing downstream takes: writing the PNG, a file name or the tokenizer would fail after sampling.
    """
    if text.isascii():
        return None  # the common case, without copying the text
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        return (f"holds a lone surrogate ({shown(text[exc.start])} at character {exc.start + 1}), which is not "
                "valid Unicode and cannot be saved or read as text: remove it, or write the character it was "
                "meant to be")
    return None


def _where(path: tuple[Any, ...]) -> str:
    if not path:
        return "the document"
    return "".join(f".{cut(k, 60)}" if isinstance(k, str) else f"[{shown(k)}]" for k in path).lstrip(".")


def _check_shape(data: dict[str, Any], form: str | None) -> None:
    """Raise for values no JSON file can hold or text that is not valid Unicode; in our format also
    for NaN/infinity in extra keys. ``form`` is what :func:`_form_of` says the document is.

    (NaN in a node input is left to validation, which names the input's expected type.)
    """
    problems = []
    for path, what in _shape_problems(data):
        if what == _NON_FINITE:
            if form != "ours" or not path or path[0] in OUR_KEYS:
                continue
            what = f"is {shown(_get(data, path))}, which a JSON workflow cannot hold"
        node, name = _node_and_input(data, path, form)
        problems.append(Problem("invalid_value", f"'{_where(path)}' {what}", node, name))
        if len(problems) >= MAX_SHAPE_PROBLEMS:
            break
    if problems:
        raise WorkflowError(problems)


def _node_and_input(data: dict[str, Any], path: tuple[Any, ...], form: str | None) -> tuple[str | None, str | None]:
    """The node id and input name a value at ``path`` belongs to, as far as the document's form tells,
    so a problem is listed under the node like validation's own are."""
    if form == "ours" and len(path) >= 2 and path[0] == "nodes":  # nodes.ID.inputs.NAME
        return str(path[1]), str(path[3]) if len(path) >= 4 and path[2] == "inputs" else None
    if form == "api" and path:  # ID.inputs.NAME
        return str(path[0]), str(path[2]) if len(path) >= 3 and path[1] == "inputs" else None
    if form == "ui" and len(path) >= 2 and path[0] == "nodes" and isinstance(path[1], int):  # nodes[i], by its id
        node = data["nodes"][path[1]]
        if isinstance(node, dict) and isinstance(node.get("id"), (int, str)):
            return str(node["id"]), None  # its widgets are named by the catalogue, later
    return None, None


def _get(data: Any, path: tuple[Any, ...]) -> Any:
    for key in path:
        data = data[key]
    return data


# ---------------------------------------------------------------------------------------------
# parsing documents


def parse_workflow(data: Any, base_dir: Path, source: Path | None = None) -> Workflow:
    """Build a :class:`Workflow` from parsed file contents: our format, or ComfyUI's API or UI format."""
    if not isinstance(data, dict):
        found = "nothing" if data is None else describe(data)
        raise _fail("parse_error", f"a workflow must be a mapping with a 'nodes' key, not {found}")
    form = _form_of(data)
    _check_shape(data, form)
    if form == "ours":
        return _parse_ours(data, base_dir, source)
    if form == "ui":
        return from_ui(data, base_dir, catalogue(), source)
    if form == "api":
        return from_api(data, base_dir, catalogue(), source)
    raise _fail("parse_error", f"not a workflow: expected 'format: {FORMAT}' with a 'nodes' mapping")


def _form_of(data: dict[Any, Any]) -> str | None:
    """Which format a document is in: "ours", "ui" (ComfyUI's editor), "api" (ComfyUI's prompt), or None."""
    if is_ui_format(data):
        return "ui"
    if "nodes" in data:
        return "ours"
    if is_api_format(data):
        return "api"
    return None


def _parse_ours(data: dict[str, Any], base_dir: Path, source: Path | None) -> Workflow:
    fmt = data.get("format", FORMAT)
    if fmt != FORMAT:
        raise _fail("unsupported_format", f"unknown workflow format {shown(fmt)} (this version reads '{FORMAT}')")
    if not isinstance(data["nodes"], dict):
        raise _fail("parse_error", f"'nodes' must be a mapping of node ids to nodes, not {describe(data['nodes'])}")
    description = data.get("description")
    if description is not None and not isinstance(description, str):
        raise _fail("parse_error", f"'description' must be text, not {describe(description)}")
    bodies, problems = node_ids(data["nodes"])
    nodes: dict[str, NodeCall] = {}
    for node_id, body in bodies.items():
        if not isinstance(body, dict) or not isinstance(body.get("type"), str):
            problems.append(Problem("parse_error", "each node needs a 'type' (text) and an 'inputs' mapping", node_id))
            continue
        inputs, input_problems = parse_inputs(body.get("inputs"), node_id, body["type"])
        problems += input_problems
        nodes[node_id] = NodeCall(body["type"], inputs)
    if problems:
        raise WorkflowError(problems)
    extra = {k: v for k, v in data.items() if k not in OUR_KEYS}
    return Workflow(nodes, base_dir, description or "", source, extra)
