"""What validation reports: one :class:`Problem` per thing wrong with a workflow.

Workflow files are shared and may be hostile, so nothing from one is shown at full length: every
value in a message goes through :func:`shown` (and lists through :func:`listing`), and a message
is cut at :data:`MESSAGE_LIMIT` whatever it holds.
"""

from __future__ import annotations

import reprlib
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from datetime import date, datetime
from typing import Any

from ..paths import cut as cut_text

VALUE_LIMIT = 200  # characters of a value shown in a message
MESSAGE_LIMIT = 2000  # characters of a whole message
ID_LIMIT = 100  # characters of a node id, input name or type in a problem's heading
_BIG_INT_BITS = 600  # larger integers are described by their size (str() of one can be slow or refused)


class _ShortRepr(reprlib.Repr):
    """reprlib with small limits, and integers too big to print described by their size."""

    def __init__(self) -> None:
        super().__init__()
        self.maxlevel, self.maxlist, self.maxtuple, self.maxdict, self.maxset = 3, 6, 6, 4, 6
        self.maxstring, self.maxlong, self.maxother = VALUE_LIMIT, 60, 80

    def repr_int(self, x: int, level: int) -> str:
        if x.bit_length() > _BIG_INT_BITS:
            return f"<an integer of about {int(x.bit_length() * 0.30103)} digits>"
        return super().repr_int(x, level)

    def repr_str(self, x: str, level: int) -> str:
        return repr(x) if len(x) <= VALUE_LIMIT else repr(x[:VALUE_LIMIT]) + "..."


_REPR = _ShortRepr()


def shown(value: Any) -> str:
    """``repr(value)`` for a message: at most about :data:`VALUE_LIMIT` characters, whatever the value.

    Safe on anything a file can hold: huge or deeply nested containers, shared references (a YAML
    alias bomb), integers of thousands of digits.
    """
    try:
        text = _REPR.repr(value)
    except Exception:  # noqa: BLE001 - a value whose repr fails is still named
        text = f"<a {type(value).__name__}>"
    return text if len(text) <= VALUE_LIMIT + 10 else text[:VALUE_LIMIT] + "..."


def cut(text: str, limit: int = VALUE_LIMIT) -> str:
    """``text`` cut to ``limit`` characters (for text shown without quotes, like a node id)."""
    return cut_text(text, limit)


def describe(value: Any) -> str:
    """What kind of value ``value`` is, in words ("a date", "a list", "null")."""
    simple = {type(None): "null", bool: "true or false", int: "a number", float: "a number", str: "text",
              list: "a list", dict: "a mapping"}
    if type(value) in simple:
        return simple[type(value)]
    if isinstance(value, datetime):
        return "a date and time"
    if isinstance(value, date):
        return "a date"
    if isinstance(value, (set, frozenset)):
        return "a set"
    if isinstance(value, (bytes, bytearray)):
        return "binary data"
    if isinstance(value, tuple):  # YAML's !!omap and !!pairs: lists of pairs
        return "a list of pairs (!!omap or !!pairs)"
    return f"a {type(value).__name__}"


def listing(items: Iterable[Any], limit: int = 12) -> str:
    """``a, b, c`` for a message: at most ``limit`` items (each cut), then how many more."""
    items = list(items)
    names = [cut(str(item), 60) for item in items[:limit]]
    more = f", ... ({len(items) - limit} more)" if len(items) > limit else ""
    return ", ".join(names) + more


def valid_text(text: str) -> str:
    """``text`` with each lone surrogate written as its escape (``\\udcff``), so it can be printed.

    A workflow's JSON escapes, or a file name that is not UTF-8, put them in a str; printing or
    encoding one then fails, and a problem about such a value must still reach the user.
    """
    if text.isascii():
        return text
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a workflow, tied to a node and input where it has one."""

    code: str
    message: str
    node: str | None = None
    input: str | None = None
    type: str | None = None

    def __post_init__(self) -> None:
        for name in ("message", "node", "input", "type"):  # all printed, and a print of a lone surrogate fails
            value = getattr(self, name)
            if isinstance(value, str):
                object.__setattr__(self, name, valid_text(value))
        if len(self.message) > MESSAGE_LIMIT:  # whoever built it, a message stays readable
            extra = len(self.message) - MESSAGE_LIMIT
            object.__setattr__(self, "message", f"{self.message[:MESSAGE_LIMIT]}... ({extra} more characters)")

    def to_dict(self) -> dict[str, str | None]:
        return asdict(self)

    def __str__(self) -> str:
        where = ""
        if self.node is not None:
            where = f"node '{cut(self.node, ID_LIMIT)}'" + (f" ({cut(self.type, ID_LIMIT)})" if self.type else "")
            if self.input is not None:
                where += f", input '{cut(self.input, ID_LIMIT)}'"
            where += ": "
        return f"[{self.code}] {where}{self.message}"


class WorkflowError(Exception):
    """A workflow that cannot run; carries every problem found."""

    def __init__(self, problems: list[Problem]):
        self.problems = problems
        super().__init__("\n".join(str(p) for p in problems))
