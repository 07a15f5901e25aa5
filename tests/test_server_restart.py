"""A server killed mid-prompt (SIGKILL, no chance to tidy up), then started again on the same folders:
no half-written file, and a history that says what happened to every prompt."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from PIL import Image
from safetensors.torch import load_file

pytest.importorskip("aiohttp", reason="the server needs aiohttp: pip install 'lora-nodes[editor]'")

from test_server import COPY_LORA, EXAMPLE_LORA, tiny_prompt

from lora_nodes.server.storage import RUNNING_FILE

# the server as `lora-nodes serve` builds it, without the editor's files (only the API is exercised here)
SERVE = """
import sys
from pathlib import Path
from aiohttp import web
from lora_nodes.server.app import Server, ServerConfig
root = Path(sys.argv[1])
config = ServerConfig(output_dir=root / "out", user_dir=root / "user", history_dir=root / "user" / "history",
                      cache_dir=root / "cache", base_dir=root)
web.run_app(Server(config).app(), host="127.0.0.1", port=int(sys.argv[2]), print=None)
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def call(port: int, path: str, payload=None):
    data = json.dumps(payload).encode() if payload is not None else None
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=data,
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read() or b"null")


def start(root: Path, port: int) -> subprocess.Popen:
    process = subprocess.Popen([sys.executable, "-c", SERVE, str(root), str(port)], stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    wait_for(lambda: call(port, "/api/prompt") is not None, 90, process)
    return process


def wait_for(condition, timeout: float, process: subprocess.Popen | None = None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise AssertionError(f"the server exited: {process.stderr.read().decode()[-2000:]}")
        try:
            if result := condition():
                return result
        except (urllib.error.URLError, ConnectionError, OSError):
            pass
        time.sleep(0.2)
    raise AssertionError("timed out")


def test_a_server_killed_mid_prompt_restarts_with_a_consistent_history(tmp_path):
    port = free_port()
    server = start(tmp_path, port)
    try:
        done = call(port, "/api/prompt", {"prompt": tiny_prompt(seed=1, prefix="before")})["prompt_id"]
        cut = call(port, "/api/prompt", {"prompt": tiny_prompt(seed=2, steps=2000, prefix="cut")})["prompt_id"]
        wait_for(lambda: done in call(port, "/api/history"), 90, server)
        wait_for(lambda: [e[1] for e in call(port, "/api/queue")["queue_running"]] == [cut], 30, server)
        time.sleep(1.0)  # well into the long prompt
        server.send_signal(signal.SIGKILL)
        server.wait(10)
    finally:
        if server.poll() is None:
            server.kill()
            server.wait(10)
    history_dir = tmp_path / "user" / "history"
    assert (history_dir / RUNNING_FILE).exists(), "the running prompt was noted before it ran"

    server = start(tmp_path, port)
    try:
        history = call(port, "/api/history")
        assert list(history) == [done, cut]
        assert history[done]["status"]["status_str"] == "success"
        (image,) = history[done]["outputs"]["3"]["images"]
        assert Image.open(tmp_path / "out" / image["subfolder"] / image["filename"]).size == (32, 32)
        assert history[cut]["status"]["status_str"] == "error"
        assert "server stopped" in history[cut]["status"]["messages"][0][1]["exception_message"]
        assert not (history_dir / RUNNING_FILE).exists()
        # every file left is whole: each PNG opens, and nothing half-written carries a final name
        for png in (tmp_path / "out").rglob("*.png"):
            Image.open(png).load()
        assert not list((tmp_path / "out").rglob("cut*"))
        for file in history_dir.glob("*.json"):
            json.loads(file.read_text())
        # and the restarted server runs prompts (one that loads no base, to stay quick)
        after = call(port, "/api/prompt", {"prompt": COPY_LORA})["prompt_id"]
        wait_for(lambda: after in call(port, "/api/history"), 90, server)
        assert call(port, "/api/history")[after]["status"]["status_str"] == "success"
        assert load_file(tmp_path / "out" / "copied.safetensors").keys() == load_file(EXAMPLE_LORA).keys()
    finally:
        server.terminate()
        server.wait(20)
