"""Run events: what a run tells its observers (the CLI's progress bars, ``--events jsonl``, tools).

Every event is a plain JSON-ready dict with an ``"event"`` key:

- ``run_start``  {"nodes": [ids to run], "variant": label}
- ``cached``     {"node", "type", "cache": "memory" | "disk"}
- ``executing``  {"node", "type"}
- ``progress``   {"node", "value", "max"}
- ``info``       {"node", "type", "message", ...details}: what a node found or decided
- ``warning``    {"node", "type", "message", ...details}
- ``executed``   {"node", "type", "files": [paths written], "seconds"}
- ``error``      {"node", "type", "message"}
- ``run_end``    {"ok", "seconds", "executed", "cached", "files"}
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from typing import Any, TextIO

Event = dict[str, Any]
EventSink = Callable[[Event], None]


def event(kind: str, **fields: Any) -> Event:
    return {"event": kind, **fields}


def ignore(_: Event) -> None:
    """An event sink that drops everything."""


class Collector:
    """An event sink that keeps every event (for tests and tools)."""

    def __init__(self) -> None:
        self.events: list[Event] = []

    def __call__(self, ev: Event) -> None:
        self.events.append(ev)

    def of(self, kind: str) -> list[Event]:
        return [e for e in self.events if e["event"] == kind]


class JsonLines:
    """An event sink that prints one JSON object per line."""

    def __init__(self, stream: TextIO | None = None):
        self.stream = stream or sys.stdout

    def __call__(self, ev: Event) -> None:
        self.stream.write(json.dumps(ev, default=str) + "\n")
        self.stream.flush()

