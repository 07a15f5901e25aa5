"""The text chunks of a PNG: the one place that reads and writes them.

A PNG written by SaveImages carries up to four text chunks, in this order: ours (:data:`WORKFLOW_KEY`,
the workflow as run, in our format), and ComfyUI's ``prompt`` (API format) and ``workflow`` (its
editor's graph), the two ComfyUI's own SaveImage writes, so the PNG dropped into ComfyUI opens the
graph; and A1111's ``parameters`` (:data:`PARAMETERS_KEY`: the prompt and settings as text, which
A1111's PNG Info and Civitai show; written and parsed here, :func:`parameters_text`). ``lora-nodes
run`` on a PNG reads the first three back in that order; ``inspect`` shows all four.

This module sits below the rest of the package (standard library and PIL only), so the node that
writes the chunks and the loader that reads them can both use it. It only moves text: making the
texts from a workflow is the graph's job (:func:`lora_nodes.graph.embed.png_chunks`), parsing them
is the loader's.

Reading is bounded: PNGs are shared files, and PIL reads every chunk before the image data whole
into memory when it opens one, before its own text limits apply. So those chunks are walked from
their 8-byte headers first, and a PNG with a huge or a great many of them is refused unread.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from .paths import cut

WORKFLOW_KEY = "lora-nodes"  # our workflow (JSON)
PROMPT_KEY = "prompt"  # ComfyUI's API-format prompt (JSON)
GRAPH_KEY = "workflow"  # ComfyUI's editor graph (JSON)
# The chunks a PNG's workflow is read from, in order of preference: ours, ComfyUI's prompt, its editor graph.
CHUNK_KEYS = (WORKFLOW_KEY, PROMPT_KEY, GRAPH_KEY)
PARAMETERS_KEY = "parameters"  # A1111's generation parameters (text, not a workflow)
TEXT_KEYS = (*CHUNK_KEYS, PARAMETERS_KEY)  # every chunk this module knows
NEGATIVE_PREFIX = "Negative prompt:"  # A1111's line that starts the negative prompt

MAX_TEXT_BYTES = 16 * 2**20  # one text chunk: as much as a workflow file may hold
# All chunks before the image data together: room for our workflow, ComfyUI's two, and a colour profile.
MAX_HEADER_BYTES = 4 * MAX_TEXT_BYTES
MAX_CHUNKS = 1000  # chunks before the image data (a real PNG has a dozen or so)
_PATH_SHOWN = 200  # characters of a path shown in a message (a path may be anything)

_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_IMAGE_DATA = (b"IDAT", b"fdAT", b"IEND")  # where PIL stops reading chunks when it opens a PNG


class ChunkError(ValueError):
    """A PNG whose workflow chunks cannot be read. ``code`` is the problem code a workflow loader
    reports it under (``parse_error``, ``file_not_found``); the message is for the user."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


# ---------------------------------------------------------------------------------------------
# reading


def read_chunks(path: str | Path, keys: tuple[str, ...] = CHUNK_KEYS) -> dict[str, str]:
    """The text chunks of ``keys`` (default: the workflow chunks, :data:`CHUNK_KEYS`) a PNG holds,
    in that order, by key.

    Raises :class:`ChunkError` for a file that is not a readable PNG, or whose chunks before the image
    data are too large or too many (checked before PIL reads them). A PNG without any of the chunks
    gives an empty mapping.
    """
    # deferred: PIL is heavy, and only reading or writing a PNG needs it
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    _check_chunk_sizes(path)
    try:
        with Image.open(path, formats=["PNG"]) as image:
            info = dict(image.info)
    except UnidentifiedImageError:
        raise ChunkError("parse_error", f"{path} is not a PNG file") from None
    except Exception as exc:  # noqa: BLE001 - PIL on a damaged file raises many kinds; each is the file's fault
        raise ChunkError("parse_error", f"{path} is a PNG that cannot be read ({type(exc).__name__}: "
                         f"{cut(str(exc), _PATH_SHOWN)})") from None
    return {key: text for key in keys if isinstance(text := info.get(key), str)}


def is_png(path: str | Path) -> bool:
    """Whether ``path`` is a file that starts as a PNG does (False for anything unreadable)."""
    try:
        with open(path, "rb") as f:
            return f.read(len(_SIGNATURE)) == _SIGNATURE
    except OSError:
        return False


def preferred_chunk(path: str | Path, chunks: Mapping[str, str]) -> tuple[str, str] | None:
    """The chunk a workflow is read from (ours, else ComfyUI's prompt, else its graph) as (key, text),
    or None; :class:`ChunkError` when that one is larger than :data:`MAX_TEXT_BYTES`."""
    for key in CHUNK_KEYS:
        text = chunks.get(key)
        if text is None:
            continue
        if len(text) > MAX_TEXT_BYTES:
            raise ChunkError("parse_error", f"{path}: its '{key}' text chunk is larger than "
                             f"{MAX_TEXT_BYTES // 2**20} MiB: too large for a workflow")
        return key, text
    return None


def _chunk_headers(f: Any) -> Iterator[tuple[bytes, int]]:
    """(type, declared length) of each chunk before a PNG's image data, read from the 8-byte headers
    alone (the data is skipped). Stops at a file that is not a PNG or a damaged header: PIL reports those."""
    if f.read(len(_SIGNATURE)) != _SIGNATURE:
        return
    while len(header := f.read(8)) == 8 and header[4:] not in _IMAGE_DATA:
        length = int.from_bytes(header[:4], "big")
        yield header[4:], length
        f.seek(length + 4, os.SEEK_CUR)  # past the data and its CRC


def _check_chunk_sizes(path: Path) -> None:
    """Refuse a PNG whose chunks PIL would read into memory on opening it are too large or too many:
    a text chunk of gigabytes would cost gigabytes before PIL's own text limits apply."""
    total = 0
    try:
        with open(path, "rb") as f:
            for count, (kind, length) in enumerate(_chunk_headers(f), 1):
                total += length
                if length > MAX_TEXT_BYTES:
                    raise ChunkError("parse_error", f"{path}: its {kind.decode('latin-1')!r} chunk is {length:,} "
                                     f"bytes, larger than {MAX_TEXT_BYTES // 2**20} MiB: too large for a workflow PNG")
                if count > MAX_CHUNKS or total > MAX_HEADER_BYTES:
                    raise ChunkError("parse_error", f"{path} has more than {MAX_CHUNKS:,} chunks or "
                                     f"{MAX_HEADER_BYTES // 2**20} MiB before its image data: too much for a "
                                     "workflow PNG")
    except OSError as exc:
        raise ChunkError("file_not_found", f"cannot read {cut(str(path), _PATH_SHOWN)}: {exc.strerror or exc}") from None


# ---------------------------------------------------------------------------------------------
# writing


def chunk_texts(workflow: dict[str, Any] | None = None, prompt: dict[str, Any] | None = None,
                graph: dict[str, Any] | None = None) -> dict[str, str]:
    """The text chunks to embed, in :data:`CHUNK_KEYS` order: each given (non-empty) document as JSON.

    ``workflow`` is ours (as run), ``prompt`` and ``graph`` ComfyUI's API-format prompt and editor
    graph. Made once per run by whoever runs the nodes, and handed to SaveImages.
    """
    documents = {WORKFLOW_KEY: workflow, PROMPT_KEY: prompt, GRAPH_KEY: graph}
    return {key: json.dumps(document) for key, document in documents.items() if document}


def parameters_text(prompt: str, negative_prompt: str, fields: Mapping[str, Any]) -> str:
    """A1111's ``parameters`` text: the prompt, a ``Negative prompt:`` line when there is one, and one
    line of ``key: value`` pairs joined by ``", "`` (a value holding a comma, colon or line break is
    quoted as JSON, as A1111 quotes it)."""
    settings = ", ".join(f"{key}: {_quote(str(value))}" for key, value in fields.items())
    negative = f"\n{NEGATIVE_PREFIX} {negative_prompt}" if negative_prompt else ""
    return f"{prompt}{negative}\n{settings}".strip()


def _quote(text: str) -> str:
    return json.dumps(text, ensure_ascii=False) if any(c in text for c in ",\n:") else text


def parse_parameters(text: str) -> dict[str, str]:
    """A1111's ``parameters`` text read as A1111 reads it: ``prompt``, ``negative_prompt`` (each
    possibly empty), then every ``key: value`` of the last line (quoted values unquoted). A last
    line with fewer than three pairs is part of the prompt, as in A1111."""
    *lines, last = text.strip().split("\n")
    settings = _settings(last)
    if len(settings) < 3:
        lines, settings = [*lines, last], []
    prompt: list[str] = []
    negative: list[str] = []
    for line in lines:
        line = line.strip()
        if line.startswith(NEGATIVE_PREFIX):
            negative.append(line[len(NEGATIVE_PREFIX):].strip())
        else:
            (negative if negative else prompt).append(line)
    result = {"prompt": "\n".join(prompt), "negative_prompt": "\n".join(negative)}
    for key, value in settings:
        result[key] = _unquote(value)
    return result


def _settings(line: str) -> list[tuple[str, str]]:
    """The ``key: value`` items of a settings line, split at commas outside double quotes; an item
    without a colon or with an empty key makes the line not a settings line (no items)."""
    items, start, quoted, escaped = [], 0, False, False
    for i, char in enumerate(line + ","):
        if escaped:
            escaped = False
        elif char == "\\" and quoted:
            escaped = True
        elif char == '"':
            quoted = not quoted
        elif char == "," and not quoted:
            items.append(line[start:i])
            start = i + 1
    pairs = []
    for item in filter(str.strip, items):
        key, colon, value = item.partition(":")
        if not colon or not key.strip():
            return []
        pairs.append((key.strip(), value.strip()))
    return pairs


def _unquote(value: str) -> str:
    if len(value) > 1 and value[0] == value[-1] == '"':
        try:
            return str(json.loads(value))
        except ValueError:
            return value
    return value


def png_info(chunks: Mapping[str, str]) -> Any:
    """A ``PIL.PngImagePlugin.PngInfo`` that writes ``chunks`` as text chunks, for ``Image.save``."""
    # deferred: PIL is heavy, and only reading or writing a PNG needs it
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    for key, text in chunks.items():
        info.add_text(key, text)
    return info
