"""How the CLI shows a run: a progress bar per running node and a one-line summary."""

from __future__ import annotations

import sys
from typing import Any

from tqdm import tqdm

from .engine.events import Event


class ProgressDisplay:
    """An event sink that draws node progress on stderr."""

    def __init__(self, stream: Any = None):
        self.stream = stream or sys.stderr
        self.bar: tqdm | None = None
        self.executed = self.cached = 0
        self.files: list[str] = []
        self.interactive = hasattr(self.stream, "isatty") and self.stream.isatty()

    def __call__(self, ev: Event) -> None:
        handler = getattr(self, f"on_{ev['event']}", None)
        if handler is not None:
            handler(ev)

    def _line(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text, file=self.stream)
        else:
            print(text, file=self.stream, flush=True)

    def _close_bar(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def on_run_start(self, ev: Event) -> None:
        if ev.get("variant"):
            self._line(f"variant {ev['variant']}")

    def on_cached(self, ev: Event) -> None:
        self.cached += 1
        where = " on disk, not run again" if ev.get("cache") == "disk" else ""
        self._line(f"  = {ev['node']} ({ev['type']}): cached{where}")

    def on_executing(self, ev: Event) -> None:
        self._close_bar()
        self.bar = tqdm(total=None, desc=f"  > {ev['node']} ({ev['type']})", file=self.stream, leave=False,
                        bar_format="{desc}: {elapsed}", dynamic_ncols=True, disable=not self.interactive)

    def on_progress(self, ev: Event) -> None:
        if self.bar is None or self.bar.disable:
            self._progress_line(ev)
            return
        if self.bar.total != ev["max"]:
            self.bar.reset(total=ev["max"])
            self.bar.bar_format = "{desc}: {percentage:3.0f}%|{bar}| {n}/{total} [{elapsed}<{remaining}{postfix}]"
        self.bar.n = ev["value"]
        if "loss" in ev:
            self.bar.set_postfix_str(f"loss {ev['loss']:.4f}", refresh=False)
        self.bar.refresh()

    def _progress_line(self, ev: Event) -> None:
        """Without a terminal, long work with a loss (training) still reports every tenth of the way."""
        if "loss" not in ev or ev["value"] % max(1, ev["max"] // 10) and ev["value"] != ev["max"]:
            return
        self._line(f"    {ev['node']}: step {ev['value']}/{ev['max']} loss {ev['loss']:.4f}")

    def on_warning(self, ev: Event) -> None:
        self._line(f"  ! {ev['node']} ({ev['type']}): {ev['message']}")
        for key, reason in list((ev.get("unplaced") or {}).items())[:20]:
            self._line(f"      not placed: {key} ({reason})")
        if len(ev.get("unplaced") or {}) > 20:
            self._line(f"      ... and {len(ev['unplaced']) - 20} more")

    def on_info(self, ev: Event) -> None:
        self._line(f"  i {ev['node']} ({ev['type']}): {ev['message']}")

    def on_executed(self, ev: Event) -> None:
        self._close_bar()
        self.executed += 1
        self.files += ev.get("files", [])
        self._line(f"  + {ev['node']} ({ev['type']}): {ev['seconds']:.2f}s")

    def on_error(self, ev: Event) -> None:
        self._close_bar()
        self._line(f"error: node '{ev['node']}' ({ev['type']}) failed: {ev['message']}")

    def summary(self, seconds: float) -> str:
        files = f"; wrote {len(self.files)} file{'s' * (len(self.files) != 1)}" if self.files else ""
        where = f" in {_common_folder(self.files)}" if self.files else ""
        return (f"Done in {seconds:.1f}s: {self.executed} node{'s' * (self.executed != 1)} run, "
                f"{self.cached} cached{files}{where}")


def _common_folder(files: list[str]) -> str:
    import os

    return os.path.commonpath([os.path.dirname(f) or "." for f in files])
