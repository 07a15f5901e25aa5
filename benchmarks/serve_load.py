"""Load on `lora-nodes serve`: many prompts queued by several clients at once, none lost, memory flat.

Starts the server in this process on a free port of 127.0.0.1 (no editor files needed), then CLIENTS
WebSocket clients each queue their share of PROMPTS builtin:tiny prompts (each with its own seed, so
every one samples) as fast as the server takes them. Every client must see every prompt finish (live
messages reach all clients), the history must hold every prompt as a success, and the process's
resident memory after the run must stay near what it was after the first prompts (the engine's memory
cache keeps each prompt's small result, which is all that may grow).

    python benchmarks/serve_load.py                      # 200 prompts, 4 clients
    python benchmarks/serve_load.py --prompts 8 --clients 4 --size 32 --steps 1   # the test's size
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import socket
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from aiohttp import ClientSession, web

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from lora_nodes.server.app import Server, ServerConfig


def prompt(seed: int, size: int, steps: int) -> dict:
    return {
        "1": {"class_type": "lora-nodes.LoadBase", "inputs": {"source": "builtin:tiny"}},
        "2": {"class_type": "lora-nodes.Sample", "inputs": {"model": ["1", 0], "prompt": "a red circle", "seed": seed,
                                                            "steps": steps, "width": size, "height": size}},
        "3": {"class_type": "lora-nodes.SaveImages", "inputs": {"images": ["2", 0], "prefix": f"load/{seed}"}},
    }


def rss_bytes() -> int:
    """This process's resident memory now (Linux: /proc; elsewhere the peak, which can only rise)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


@dataclass
class ClientLog:
    """What one client queued and saw."""

    queued: dict[str, float] = field(default_factory=dict)  # prompt id -> when it was accepted
    finished: dict[str, tuple[str, float]] = field(default_factory=dict)  # prompt id -> (final message, when)
    refused: int = 0


@dataclass
class LoadResult:
    prompts: int
    clients: int
    seconds: float
    completed: int  # in the history, as successes
    lost: int  # queued but never finished, in the history or in some client's messages
    failed: int
    latencies: list[float]
    rss_warm: int
    rss_end: int


async def client(base: str, name: str, seeds: list[int], size: int, steps: int, log: ClientLog,
                 everyone_queued: asyncio.Event, all_ids: set[str], timeout: float) -> None:
    async with ClientSession() as session, session.ws_connect(f"{base}/ws?clientId={name}") as ws:
        for seed in seeds:
            async with session.post(f"{base}/api/prompt", json={"prompt": prompt(seed, size, steps),
                                                                 "client_id": name}) as response:
                if response.status != 200:
                    log.refused += 1
                    continue
                prompt_id = (await response.json())["prompt_id"]
                log.queued[prompt_id] = time.perf_counter()
                all_ids.add(prompt_id)
        await everyone_queued.wait()
        deadline = time.monotonic() + timeout
        while not all_ids <= set(log.finished):
            message = await ws.receive_json(timeout=max(deadline - time.monotonic(), 0.1))
            if message["type"] in ("execution_success", "execution_error", "execution_interrupted"):
                log.finished[message["data"]["prompt_id"]] = (message["type"], time.perf_counter())


async def run_load(prompts: int, clients: int, size: int, steps: int, root: Path, timeout: float) -> LoadResult:
    config = ServerConfig(output_dir=root / "out", user_dir=root / "user", history_dir=root / "user" / "history",
                          cache_dir=root / "cache", base_dir=root)
    server = Server(config)
    runner = web.AppRunner(server.app())
    await runner.setup()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    await web.TCPSite(runner, "127.0.0.1", port).start()
    base = f"http://127.0.0.1:{port}"
    try:
        # warm up: the base loaded and the first samples taken, so memory is measured from a steady state
        warm = max(2, prompts // 10)
        await _run_clients(base, 1, list(range(10_000, 10_000 + warm)), size, steps, timeout)
        gc.collect()
        rss_warm = rss_bytes()
        started = time.perf_counter()
        logs = await _run_clients(base, clients, list(range(prompts)), size, steps, timeout)
        seconds = time.perf_counter() - started
        gc.collect()
        rss_end = rss_bytes()
        async with ClientSession() as session, session.get(f"{base}/api/history") as response:
            history = await response.json()
    finally:
        await runner.cleanup()
    queued = {pid: when for log in logs for pid, when in log.queued.items()}
    statuses = {pid: history.get(pid, {}).get("status", {}).get("status_str") for pid in queued}
    # lost: refused, missing from the history, or not seen finishing by every client
    unseen = {pid for log in logs for pid in queued if pid not in log.finished}
    lost = sum(log.refused for log in logs) + sum(1 for s in statuses.values() if s is None) + len(unseen)
    finished_at = {pid: when for log in logs for pid, (_, when) in log.finished.items()}
    latencies = [finished_at[pid] - queued[pid] for pid in queued if pid in finished_at]
    return LoadResult(prompts, clients, seconds, sum(s == "success" for s in statuses.values()), lost,
                      sum(s == "error" for s in statuses.values()), latencies, rss_warm, rss_end)


async def _run_clients(base: str, clients: int, seeds: list[int], size: int, steps: int,
                       timeout: float) -> list[ClientLog]:
    logs = [ClientLog() for _ in range(clients)]
    everyone_queued = asyncio.Event()
    all_ids: set[str] = set()
    tasks = [asyncio.create_task(client(base, f"load-{i}", seeds[i::clients], size, steps, logs[i], everyone_queued,
                                        all_ids, timeout)) for i in range(clients)]
    while sum(len(log.queued) + log.refused for log in logs) < len(seeds) and not any(t.done() for t in tasks):
        await asyncio.sleep(0.01)
    everyone_queued.set()
    await asyncio.gather(*tasks)
    return logs


def table(result: LoadResult) -> str:
    latencies = sorted(result.latencies) or [0.0]
    p95 = latencies[min(len(latencies) - 1, int(0.95 * len(latencies)))]
    mib = 2**20
    rows = [
        ("prompts queued", f"{result.prompts} by {result.clients} clients at once"),
        ("completed (history: success)", str(result.completed)),
        ("lost", str(result.lost)),
        ("failed", str(result.failed)),
        ("wall time", f"{result.seconds:.1f} s ({result.prompts / max(result.seconds, 1e-9):.1f} prompts/s)"),
        ("queue-to-done latency p50 / p95", f"{statistics.median(latencies):.2f} s / {p95:.2f} s"),
        ("resident memory after warm-up", f"{result.rss_warm / mib:.0f} MiB"),
        ("resident memory after the run",
         f"{result.rss_end / mib:.0f} MiB ({(result.rss_end - result.rss_warm) / mib:+.0f} MiB)"),
    ]
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


def main(argv: list[str] | None = None) -> LoadResult:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=200)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--size", type=int, default=32, help="image width and height (builtin:tiny)")
    parser.add_argument("--steps", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=1800, help="seconds to wait for all prompts")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="serve-load-") as root:
        result = asyncio.run(run_load(args.prompts, args.clients, args.size, args.steps, Path(root), args.timeout))
    print(table(result))
    return result


if __name__ == "__main__":
    outcome = main()
    sys.exit(0 if outcome.lost == 0 and outcome.completed == outcome.prompts else 1)
