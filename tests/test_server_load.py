"""benchmarks/serve_load.py at its smallest size: prompts queued by 4 clients at once all complete, each
client sees every one finish, none is lost, and memory stays flat."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

pytest.importorskip("aiohttp", reason="the server needs aiohttp: pip install 'lora-nodes[editor]'")

BENCHMARK = Path(__file__).resolve().parent.parent / "benchmarks" / "serve_load.py"
MEMORY_SLACK = 64 * 2**20  # resident memory may wander this much (allocator, lazy imports); a leak of models does not fit


def test_prompts_from_four_clients_all_complete_with_none_lost_and_memory_flat(capsys):
    spec = importlib.util.spec_from_file_location("serve_load", BENCHMARK)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    try:
        spec.loader.exec_module(module)
    finally:
        sys.modules.pop(spec.name, None)
    result = module.main(["--prompts", "8", "--clients", "4", "--size", "32", "--steps", "1", "--timeout", "300"])
    assert (result.completed, result.lost, result.failed) == (8, 0, 0)
    assert len(result.latencies) == 8
    assert result.rss_end - result.rss_warm < MEMORY_SLACK
    printed = capsys.readouterr().out
    assert "lost                             0" in printed and "8 by 4 clients at once" in printed
