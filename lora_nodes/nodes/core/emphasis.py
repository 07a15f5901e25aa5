"""ComfyUI's prompt emphasis: ``(text:1.3)``, ``(text)``, escapes and ``embedding:`` words, read as ComfyUI reads them.

The rules (ComfyUI's CLIPTextEncode; written from its behaviour, with its quirks, because a prompt
must weigh the same here as there):

- ``(text)`` multiplies the weight of ``text`` by 1.1; nesting multiplies again: ``((text))`` is 1.21.
- ``(text:1.3)`` sets the weight to 1.3, whatever the brackets around it said; brackets inside it
  multiply from there: ``((text):1.5)`` is 1.65. The number is what follows the group's LAST colon,
  read as Python reads a float; a group whose text after that colon is no number (``(a:b)``), or
  whose only colon comes first (``(:2)``), keeps its colon and text at 1.1.
- ``\\(`` and ``\\)`` are literal brackets (the backslash goes); any other backslash stays as it is.
- ``[text]`` means nothing special: the brackets stay in the text at weight 1 (A1111 divides by 1.1
  there; ComfyUI does not).
- Brackets that do not pair up are text, as counting them makes them: ``(a`` is the text ``(a``; a
  ``)`` with no ``(`` before it is text, and so is every bracket after it until the count is back to
  zero (``a) (b)`` is all text at weight 1); an item that begins with ``(`` and ends with ``)`` is a
  group even if the brackets inside it do not pair (``((a)`` is ``(a`` at 1.1).
- ``embedding:NAME`` (at the start of a piece or after a space or newline) names a textual-inversion
  embedding. We have none: the word is dropped, as ComfyUI drops an embedding it cannot find, and
  reported, so the caller can say so; what follows the name is kept.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass

EMPHASIS = 1.1  # what one pair of brackets multiplies by
EMBEDDING_WORD = "embedding:"
# Escaped brackets are swapped for characters no prompt types while the brackets are counted.
_ESCAPED = {"\\(": "\x00\x02", "\\)": "\x00\x01"}
_EMBEDDING_SPLIT = re.compile(f"[ \n]{EMBEDDING_WORD}")


@dataclass(frozen=True)
class ParsedPrompt:
    """A prompt as ComfyUI's text encoders take it: pieces of text, each with its weight, in order."""

    pieces: tuple[tuple[str, float], ...]  # each piece is tokenized on its own, its tokens weighted
    embeddings: tuple[str, ...] = ()  # names of the ``embedding:`` words dropped from the pieces


def parse_prompt(text: str) -> ParsedPrompt:
    """Split ``text`` into weighted pieces by ComfyUI's emphasis rules (see the module docstring)."""
    pieces: list[tuple[str, float]] = []
    embeddings: list[str] = []
    for segment, weight in weighted_segments(_escape(text), 1.0):
        for word, embedding in _embedding_words(_unescape(segment)):
            if embedding is not None:
                embeddings.append(embedding)
            if word:
                pieces.append((word, weight))
    return ParsedPrompt(tuple(pieces), tuple(embeddings))


def weighted_segments(text: str, weight: float) -> list[tuple[str, float]]:
    """The (text, weight) segments of ``text`` (escaped brackets already swapped out), at ``weight``."""
    segments: list[tuple[str, float]] = []
    for item in _top_level_items(text):
        if len(item) >= 2 and item.startswith("(") and item.endswith(")"):
            inner, inner_weight = _group_weight(item[1:-1], weight)
            segments.extend(weighted_segments(inner, inner_weight))
        else:
            segments.append((item, weight))
    return segments


def _group_weight(inner: str, outer: float) -> tuple[str, float]:
    """A group's text and weight: ``text:number`` sets it, else the outer weight times 1.1."""
    colon = inner.rfind(":")
    if colon > 0:
        try:
            return inner[:colon], float(inner[colon + 1:])
        except ValueError:
            pass  # not a number: the colon is text
    return inner, outer * EMPHASIS


def _top_level_items(text: str) -> Iterator[str]:
    """``text`` cut into plain runs and outermost bracket groups, by counting brackets.

    A ``(`` at depth 0 starts a group (ending the run before it); the ``)`` that brings the depth
    back to 0 ends it. A ``)`` at depth 0 makes the depth negative, and until it is 0 again no
    bracket starts or ends anything (see the module docstring).
    """
    item, depth = "", 0
    for char in text:
        if char == "(":
            if depth == 0 and item:
                yield item
                item = ""
            depth += 1
            item += char
        elif char == ")":
            depth -= 1
            item += char
            if depth == 0:
                yield item
                item = ""
        else:
            item += char
    if item:
        yield item


def _embedding_words(segment: str) -> Iterator[tuple[str, str | None]]:
    """(text to tokenize, embedding name or None) for each part of a segment cut at ``embedding:`` words.

    As ComfyUI does with an embedding it cannot find: the name is the first word after
    ``embedding:`` (commas around it are not part of it, and what follows it is kept); the words
    after the name are joined by single spaces.
    """
    parts = _EMBEDDING_SPLIT.split(segment)
    for index, part in enumerate(parts):
        if part == "":
            continue
        if index == 0 and not part.startswith(EMBEDDING_WORD):
            yield part, None
            continue
        words = part.removeprefix(EMBEDDING_WORD).split()
        if not words:
            continue  # "embedding:" and no name: nothing to tokenize, nothing to name
        name, rest = words[0], " ".join(words[1:])
        stripped = name.strip(",")
        if len(stripped) < len(name):
            # ComfyUI keeps the name's characters past the stripped name's length as text: the trailing
            # commas of "style," (the usual case) stay, so the prompt's punctuation is not lost
            rest = f"{name[len(stripped):]} {rest}"
        yield rest, stripped


def _escape(text: str) -> str:
    for escaped, placeholder in _ESCAPED.items():
        text = text.replace(escaped, placeholder)
    return text


def _unescape(text: str) -> str:
    for escaped, placeholder in _ESCAPED.items():
        text = text.replace(placeholder, escaped[1])
    return text
