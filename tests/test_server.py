"""`lora-nodes serve`: every endpoint the 1.27 editor calls, through aiohttp's test client.

One server (and so one engine, whose memory cache persists across prompts) serves the module's
tests; prompts are builtin:tiny at 32x32 with one step. Expectations are what the editor (or a user
looking at the files) would see: message types and order, image files that open, settings on disk.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import time
from pathlib import Path
from typing import Any

import pytest

aiohttp = pytest.importorskip("aiohttp", reason="the server needs aiohttp: pip install 'lora-nodes[editor]'")
from aiohttp.test_utils import TestClient, TestServer
from PIL import Image

from lora_nodes.fileio import temporary_name
from lora_nodes.modelfolders import models_dir_folders
from lora_nodes.server import frontend
from lora_nodes.server.app import MAX_REQUEST_BYTES, Hub, Server, ServerConfig, is_loopback, json_response
from lora_nodes.server.app import _number as queue_number
from lora_nodes.server.prompts import OUTSIDE_MESSAGE
from lora_nodes.server.storage import RUNNING_FILE, History, history_item
from lora_nodes.server.worker import Interrupted, PromptQueue, PromptRun, QueuedPrompt

REPO = Path(__file__).resolve().parent.parent
FINAL = ("execution_success", "execution_error", "execution_interrupted")


def tiny_prompt(seed: int = 1, steps: int = 1, prefix: str = "tiny", size: int = 32) -> dict[str, Any]:
    """An API-format prompt as the editor posts it: our nodes under their ComfyUI ids."""
    return {
        "1": {"class_type": "lora-nodes.LoadBase", "inputs": {"source": "builtin:tiny"}},
        "2": {"class_type": "lora-nodes.Sample", "inputs": {"model": ["1", 0], "prompt": "a red circle", "seed": seed,
                                                            "steps": steps, "width": size, "height": size}},
        "3": {"class_type": "lora-nodes.SaveImages", "inputs": {"images": ["2", 0], "prefix": prefix}},
    }


EXAMPLE_LORA = REPO / "workflows" / "loras" / "tiny_style.safetensors"
# a prompt that loads no base (quick): the example LoRA saved again
COPY_LORA = {"1": {"class_type": "lora-nodes.LoadLoRA", "inputs": {"path": str(EXAMPLE_LORA)}},
             "2": {"class_type": "lora-nodes.SaveLoRA", "inputs": {"lora": ["1", 0], "path": "copied.safetensors"}}}


def make_config(root: Path, **changes: Any) -> ServerConfig:
    """A server's folders under ``root``; the models folder holds one (empty-named) LoRA to list."""
    models = root / "models"
    (models / "loras" / "style").mkdir(parents=True, exist_ok=True)
    (models / "loras" / "style" / "listed.safetensors").write_bytes(b"")
    config = ServerConfig(output_dir=root / "out", user_dir=root / "user", history_dir=root / "user" / "history",
                          cache_dir=root / "cache", base_dir=root, folders=models_dir_folders(models),
                          examples_dir=REPO / "workflows")
    for name, value in changes.items():
        setattr(config, name, value)
    return config


class Live:
    """A running server and a client, driven from synchronous tests on the module's own event loop."""

    def __init__(self, config: ServerConfig):
        self.config = config
        self.loop = asyncio.new_event_loop()
        self.server = Server(config)

        async def start():
            client = TestClient(TestServer(self.server.app()))
            await client.start_server()
            return client
        self.client = self.call(start())

    def call(self, coroutine):
        return self.loop.run_until_complete(coroutine)

    def request(self, method: str, path: str, **kwargs) -> tuple[int, Any]:
        async def go():
            response = await self.client.request(method, path, **kwargs)
            body = await response.read()
            kind = response.headers.get("Content-Type", "")
            return response.status, json.loads(body) if "json" in kind else body
        return self.call(go())

    def get(self, path: str, **kwargs) -> tuple[int, Any]:
        return self.request("GET", path, **kwargs)

    def post(self, path: str, payload: Any = None, **kwargs) -> tuple[int, Any]:
        if payload is not None:
            kwargs["json"] = payload
        return self.request("POST", path, **kwargs)

    def queue(self, prompt: dict[str, Any], **extra: Any) -> str:
        status, body = self.post("/api/prompt", {"prompt": prompt, **extra})
        assert status == 200, body
        return body["prompt_id"]

    def run_watched(self, prompts: list[dict[str, Any]], timeout: float = 60, client_id: str = "watcher",
                    on_message=None) -> tuple[list[str], list[dict[str, Any]]]:
        """Queue ``prompts`` with a WebSocket open; the prompt ids and every message until all ended."""
        async def go():
            messages: list[dict[str, Any]] = []
            async with self.client.ws_connect(f"/ws?clientId={client_id}") as ws:
                ids = []
                for prompt in prompts:
                    response = await self.client.post("/api/prompt", json={"prompt": prompt, "client_id": client_id})
                    assert response.status == 200, await response.text()
                    ids.append((await response.json())["prompt_id"])
                ended: set[str] = set()
                deadline = time.monotonic() + timeout
                while ended != set(ids):
                    message = await ws.receive_json(timeout=max(deadline - time.monotonic(), 0.1))
                    messages.append(message)
                    if on_message is not None:
                        await on_message(message)
                    if message["type"] == "executing" and message["data"]["node"] is None:
                        ended.add(message["data"]["prompt_id"])  # the prompt's last message: its history is kept
                return ids, messages
        return self.call(go())

    def close(self) -> None:
        self.call(self.client.close())
        self.loop.close()


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    server = Live(make_config(tmp_path_factory.mktemp("serve")))
    yield server
    server.close()


TOKEN = "s3cret-token"
BEARER = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def token_live(tmp_path_factory):
    """A server started for the network (a token), with a stand-in for the editor's files."""
    root = tmp_path_factory.mktemp("serve-token")
    (root / "static").mkdir()
    (root / "static" / "index.html").write_text("<html>editor</html>")
    server = Live(make_config(root, token=TOKEN, host="0.0.0.0", static_root=root / "static"))
    yield server
    server.close()


def of(messages: list[dict[str, Any]], kind: str, prompt_id: str | None = None) -> list[dict[str, Any]]:
    return [m["data"] for m in messages
            if m["type"] == kind and (prompt_id is None or m["data"].get("prompt_id") == prompt_id)]


# ----------------------------------------------------------------------------- the frontend pin


def test_the_frontend_version_is_pinned_and_checked(monkeypatch):
    tomllib = pytest.importorskip("tomllib", reason="reading pyproject.toml needs Python 3.11's tomllib")
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert f"{frontend.DISTRIBUTION}=={frontend.PINNED_VERSION}" in extras["editor"]
    assert any(req.startswith("aiohttp") for req in extras["editor"])
    with pytest.raises(frontend.FrontendError, match=r"1\.28\.0.*pip install 'comfyui-frontend-package==1\.27\.10'"):
        frontend.static_root("1.28.0")
    monkeypatch.setattr(frontend, "installed_version", lambda: None)
    with pytest.raises(frontend.FrontendError, match=r"not installed: pip install 'comfyui-frontend-package==1\.27\.10'"):
        frontend.static_root()


def test_serve_refuses_to_start_without_the_pinned_editor(monkeypatch, capsys, tmp_path):
    from lora_nodes.cli import main

    monkeypatch.setattr(frontend, "installed_version", lambda: "1.30.1")
    monkeypatch.chdir(tmp_path)
    assert main(["serve", "--port", "1"]) == 2
    assert "pip install 'comfyui-frontend-package==1.27.10'" in capsys.readouterr().err


# ----------------------------------------------------------------------------- what the editor reads at start


def test_users_settings_i18n_extensions_embeddings_features(live):
    assert live.get("/api/users") == (200, {"storage": "server", "migrated": True})
    status, settings = live.get("/api/settings")
    assert status == 200 and settings["Comfy.TutorialCompleted"] is True
    assert live.post("/api/settings", {"Comfy.Locale": "en", "Comfy.Custom": [1, 2]})[0] == 200
    assert live.post("/api/settings/Comfy.Single", 7)[0] == 200
    assert live.get("/api/settings/Comfy.Custom") == (200, [1, 2])
    on_disk = json.loads((live.config.user_dir / "default" / "comfy.settings.json").read_text())
    assert on_disk["Comfy.Single"] == 7 and on_disk["Comfy.Locale"] == "en"
    assert live.get("/api/i18n") == (200, {})
    status, extensions = live.get("/api/extensions")
    assert "/extensions/lora-nodes/editor.js" in extensions
    status, script = live.get("/extensions/lora-nodes/editor.js")
    assert status == 200 and b"registerExtension" in script
    assert live.get("/api/embeddings") == (200, [])
    assert live.get("/api/features")[1]["max_upload_size"] == MAX_REQUEST_BYTES
    status, stats = live.get("/api/system_stats")
    assert stats["system"]["required_frontend_version"] == frontend.PINNED_VERSION
    assert stats["system"]["ram_total"] > 0 and stats["devices"][0]["type"] in ("cpu", "cuda")


def test_object_info_lists_core_nodes_plainly_ours_namespaced_and_folder_files(live):
    status, info = live.get("/api/object_info")
    assert status == 200
    assert {"lora-nodes.LoadBase", "lora-nodes.LoadLoRA", "lora-nodes.Sample", "KSampler", "LoraLoader"} <= set(info)
    assert "LoadBase" not in info and "lora-nodes.KSampler" not in info
    assert info["KSampler"]["python_module"] == "nodes" and info["KSampler"]["name"] == "KSampler"
    # file inputs offer the models folder's files (subfolders as ComfyUI names them) and the examples' LoRAs
    lora_choices = info["lora-nodes.LoadLoRA"]["input"]["required"]["path"][0]
    assert "style/listed.safetensors" in lora_choices and "shapes_style.safetensors" in lora_choices
    assert info["LoraLoader"]["input"]["required"]["lora_name"][0] == lora_choices
    assert info["lora-nodes.LoadBase"]["input"]["required"]["source"][0][0] == "builtin:tiny"
    assert live.get("/api/object_info/KSampler")[1] == {"KSampler": info["KSampler"]}
    assert live.get("/api/object_info/lora-nodes.Sample")[1] == {"lora-nodes.Sample": info["lora-nodes.Sample"]}
    assert live.get("/api/models/loras")[1] == [name for name in lora_choices if not name.startswith("builtin:")]


def test_templates_are_our_examples_and_the_quickstart_comes_first(live):
    status, templates = live.get("/api/workflow_templates")
    assert status == 200 and templates["lora-nodes"][0] == "quickstart"
    status, graph = live.get("/api/workflow_templates/lora-nodes/quickstart.json")
    types = {node["type"] for node in graph["nodes"]}
    assert {"lora-nodes.LoadBase", "lora-nodes.LoadLoRA", "lora-nodes.SaveImages"} <= types
    lora_node = next(node for node in graph["nodes"] if node["type"] == "lora-nodes.LoadLoRA")
    assert not os.path.isabs(lora_node["widgets_values"][0])  # by name: the graph moves between machines
    assert live.get("/api/workflow_templates/lora-nodes/nope.json")[0] == 404
    assert live.get("/api/workflow_templates/other/quickstart.json")[0] == 404


# ----------------------------------------------------------------------------- the user's files


def test_userdata_saves_lists_opens_moves_and_deletes_workflows(live):
    graph = json.dumps({"nodes": [], "links": [], "version": 0.4}).encode()
    status, path = live.post("/api/userdata/workflows%2Fmine.json", data=graph)
    assert (status, path) == (200, "workflows/mine.json")
    assert live.post("/api/userdata/workflows%2Fmine.json?overwrite=false", data=b"{}")[0] == 409
    assert live.get("/api/userdata?dir=workflows")[1] == ["mine.json"]
    status, full = live.get("/api/userdata?dir=workflows&recurse=true&full_info=true")
    assert full[0]["path"] == "mine.json" and full[0]["size"] == len(graph)
    assert live.get("/api/userdata/workflows%2Fmine.json") == (200, json.loads(graph))
    status, moved = live.post("/api/userdata/workflows%2Fmine.json/move/workflows%2Fsub%2Fours.json?full_info=true")
    assert status == 200 and moved["path"] == "workflows/sub/ours.json"
    names = {(e["path"], e["type"]) for e in live.get("/api/v2/userdata?path=workflows")[1]}
    assert names == {("workflows/sub", "directory"), ("workflows/sub/ours.json", "file")}
    assert live.request("DELETE", "/api/userdata/workflows%2Fsub%2Fours.json")[0] == 204
    assert live.get("/api/userdata/workflows%2Fsub%2Fours.json")[0] == 404
    assert live.get("/api/userdata?dir=nothing-here")[0] == 404


def test_userdata_never_leaves_the_users_folder(live, tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("secret")
    user_root = live.config.user_dir / "default"
    (user_root / "link").symlink_to(tmp_path, target_is_directory=True)
    for name in ["..%2F..%2Fsecret.txt", "%2Fetc%2Fpasswd", "workflows%2F..%2F..%2Fx", "link%2Fsecret.txt"]:
        assert live.get(f"/api/userdata/{name}")[0] in (403, 404), name
        assert live.post(f"/api/userdata/{name}", data=b"x")[0] == 403, name
    # encoded twice, the name arrives as "%2E%2E%2Fx": a name with percent signs in it, inside the folder
    assert live.post("/api/userdata/%252E%252E%252Fx", data=b"x") == (200, "%2E%2E%2Fx")
    assert (user_root / "%2E%2E%2Fx").read_bytes() == b"x"
    (user_root / "%2E%2E%2Fx").unlink()
    assert live.get("/api/userdata?dir=..%2F..")[0] == 403
    assert live.get("/api/userdata/link%2Fsecret.txt")[0] == 403
    assert secret.read_text() == "secret" and not (live.config.user_dir.parent / "x").exists()
    (user_root / "link").unlink()


# ----------------------------------------------------------------------------- prompts and the queue


def test_an_invalid_prompt_gets_node_errors_naming_node_and_input(live):
    prompt = tiny_prompt()
    prompt["2"]["inputs"]["steps"] = -3
    prompt["1"]["inputs"]["source"] = "builtin:nope"
    status, body = live.post("/api/prompt", {"prompt": prompt})
    assert status == 400
    assert body["error"]["type"] == "prompt_outputs_failed_validation"
    assert set(body["node_errors"]) == {"1", "2"}
    error = body["node_errors"]["2"]["errors"][0]
    assert error["extra_info"]["input_name"] == "steps" and "-3" in error["message"]
    assert body["node_errors"]["2"]["class_type"] == "lora-nodes.Sample"
    assert body["node_errors"]["1"]["errors"][0]["extra_info"]["input_name"] == "source"
    assert live.post("/api/prompt", {"no": "prompt"})[1]["error"]["type"] == "no_prompt"
    assert live.post("/api/prompt", data=b"{not json")[0] == 400
    status, body = live.post("/api/prompt", {"prompt": {"1": {"class_type": "ThirdPartyNode", "inputs": {}}}})
    assert status == 400 and "ThirdPartyNode" in body["error"]["message"]
    assert live.post("/api/prompt", {"prompt": tiny_prompt(), "prompt_id": "../../etc"})[0] == 400


def test_a_prompt_runs_with_live_messages_images_and_history(live):
    (prompt_id,), messages = live.run_watched([tiny_prompt(seed=11, prefix="first")])
    kinds = [m["type"] for m in messages if m["data"].get("prompt_id") == prompt_id]
    execution = [kind for kind in kinds if kind.startswith("execution_")]
    assert execution[0] == "execution_start" and execution[-1] == "execution_success" and kinds[-1] == "executing"
    ran = [d["node"] for d in of(messages, "executing", prompt_id) if d["node"] is not None]
    assert ran == ["1", "2", "3"]
    progress = of(messages, "progress", prompt_id)
    assert progress and progress[-1]["value"] == progress[-1]["max"] and progress[-1]["node"] == "2"
    (executed,) = of(messages, "executed", prompt_id)
    assert executed["node"] == "3"
    (image,) = executed["output"]["images"]
    assert image["type"] == "output" and image["filename"].startswith("first")
    assert of(messages, "status")[-1]["status"]["exec_info"]["queue_remaining"] == 0
    status, png = live.get(f"/api/view?filename={image['filename']}&subfolder={image['subfolder']}&type=output")
    assert status == 200 and Image.open(io.BytesIO(png)).size == (32, 32)
    # the PNG carries the graph in the editor's format: dropped onto the editor, it opens
    graph = json.loads(Image.open(io.BytesIO(png)).info["workflow"])
    assert sorted(node["type"] for node in graph["nodes"]) == ["lora-nodes.LoadBase", "lora-nodes.Sample",
                                                                "lora-nodes.SaveImages"]
    history = live.get(f"/api/history/{prompt_id}")[1][prompt_id]
    assert history["status"]["status_str"] == "success" and history["status"]["completed"] is True
    assert history["outputs"] == {"3": {"images": [image]}}
    assert history["prompt"][1] == prompt_id and history["prompt"][2]["2"]["inputs"]["seed"] == 11
    assert history["status"]["messages"][0][0] == "execution_start"


def test_the_engine_cache_persists_across_prompts(live):
    live.run_watched([tiny_prompt(seed=21, prefix="cache")])
    (same,), messages = live.run_watched([tiny_prompt(seed=21, prefix="cache")])
    assert {n for d in of(messages, "execution_cached", same) for n in d["nodes"]} == {"1", "2", "3"}
    assert [d["node"] for d in of(messages, "executing", same) if d["node"]] == []
    assert of(messages, "executed", same), "a cached output node still shows its images"
    (changed,), messages = live.run_watched([tiny_prompt(seed=22, prefix="cache")])
    assert [d["node"] for d in of(messages, "executing", changed) if d["node"]] == ["2", "3"]
    assert {n for d in of(messages, "execution_cached", changed) for n in d["nodes"]} == {"1"}


def test_a_failing_node_or_malformed_prompt_does_not_stop_the_queue(live):
    failing = tiny_prompt(prefix="huge")
    failing["2"]["inputs"].update(width=16384, height=16384)
    failing["2"]["inputs"]["batch_size"] = 64  # refused by the memory check, at run time
    assert live.post("/api/prompt", data=b"[1, 2")[0] == 400
    (bad, good), messages = live.run_watched([failing, tiny_prompt(seed=31, prefix="after")])
    (error,) = of(messages, "execution_error", bad)
    assert error["node_id"] == "2" and error["node_type"] == "lora-nodes.Sample" and error["exception_message"]
    assert of(messages, "execution_success", good)
    history = live.get("/api/history")[1]
    assert history[bad]["status"]["status_str"] == "error" and history[good]["status"]["status_str"] == "success"


def test_queue_listing_delete_clear_and_interrupt_within_a_step(live):
    slow = tiny_prompt(seed=41, steps=400, prefix="slow")
    waiting = [tiny_prompt(seed=s, prefix="waiting") for s in (42, 43, 44)]
    seen: dict[str, Any] = {}

    async def on_message(message):
        if message["type"] == "progress":
            seen.setdefault("progress_at", []).append(time.monotonic())
        if message["type"] == "progress" and len(seen["progress_at"]) == 3 and "listed" not in seen:
            seen["listed"] = (await (await live.client.get("/api/queue")).json())
            await live.client.post("/api/queue", json={"delete": [seen["ids"][1]]})
            seen["after_delete"] = (await (await live.client.get("/api/queue")).json())
            await live.client.post("/api/queue", json={"clear": True})
            seen["after_clear"] = (await (await live.client.get("/api/queue")).json())
            seen["interrupted_at"] = time.monotonic()
            await live.client.post("/api/interrupt", json={})

    async def queue_all():
        ids = []
        for prompt in [slow, *waiting]:
            response = await live.client.post("/api/prompt", json={"prompt": prompt})
            ids.append((await response.json())["prompt_id"])
        return ids

    async def go():
        messages = []
        async with live.client.ws_connect("/ws?clientId=q") as ws:
            seen["ids"] = ids = await queue_all()
            while True:
                message = await ws.receive_json(timeout=60)
                messages.append(message)
                await on_message(message)
                if message["type"] in FINAL and message["data"]["prompt_id"] == ids[0]:
                    seen["ended_at"] = time.monotonic()
                if message["type"] == "executing" and message["data"] == {"node": None, "prompt_id": ids[0]}:
                    return ids, messages
    ids, messages = live.call(go())
    running, pending = seen["listed"]["queue_running"], seen["listed"]["queue_pending"]
    assert [entry[1] for entry in running] == [ids[0]] and [entry[1] for entry in pending] == ids[1:]
    assert [entry[1] for entry in seen["after_delete"]["queue_pending"]] == [ids[2], ids[3]]
    assert seen["after_clear"]["queue_pending"] == []
    (interrupted,) = of(messages, "execution_interrupted", ids[0])
    assert interrupted["node_id"] == "2" and interrupted["node_type"] == "lora-nodes.Sample"
    step = seen["progress_at"][2] - seen["progress_at"][1]  # one sampling step, as the client saw it
    assert seen["ended_at"] - seen["interrupted_at"] < max(2.0, 5 * step), "interrupt stops within a step"
    assert len(of(messages, "progress", ids[0])) < 10  # of 400 steps
    history = live.get(f"/api/history/{ids[0]}")[1][ids[0]]
    assert history["status"]["status_str"] == "error"
    assert [m[0] for m in history["status"]["messages"]][-1] == "execution_interrupted"
    assert all(live.get(f"/api/history/{i}")[1] == {} for i in ids[1:])  # deleted or cleared: never ran
    live.run_watched([tiny_prompt(seed=45, prefix="after-interrupt")])  # and the queue goes on


def test_a_client_that_disconnects_mid_run_changes_nothing(live):
    async def go():
        quitter = await live.client.ws_connect("/ws?clientId=quitter")
        async with live.client.ws_connect("/ws?clientId=stayer") as stayer:
            response = await live.client.post("/api/prompt", json={"prompt": tiny_prompt(seed=51, steps=3, prefix="dc")})
            prompt_id = (await response.json())["prompt_id"]
            while (await quitter.receive_json(timeout=30))["type"] != "executing":
                pass
            await quitter.close()  # mid-run
            kinds = []
            while True:
                message = await stayer.receive_json(timeout=60)
                kinds.append(message["type"])
                if message["type"] == "executing" and message["data"] == {"node": None, "prompt_id": prompt_id}:
                    return prompt_id, kinds
    prompt_id, kinds = live.call(go())
    assert [k for k in kinds if k in FINAL] == ["execution_success"] and "progress" in kinds and "executed" in kinds
    assert live.get(f"/api/history/{prompt_id}")[1][prompt_id]["status"]["status_str"] == "success"
    assert "quitter" not in live.server.hub.clients


def test_history_listing_deleting_and_clearing(live):
    # (seeds other tests ran: from the engine's cache when the module runs whole, so quick)
    ids, _ = live.run_watched([tiny_prompt(seed=11, prefix="first"), tiny_prompt(seed=21, prefix="cache")])
    everything = live.get("/api/history")[1]
    assert list(everything)[-2:] == ids  # oldest first, as ComfyUI lists them
    assert list(live.get("/api/history?max_items=1")[1]) == [ids[1]]
    assert live.post("/api/history", {"delete": [ids[0]]})[0] == 200
    assert ids[0] not in live.get("/api/history")[1]
    assert not (live.config.history_dir / f"{ids[0]}.json").exists()
    # the history survives a restart: a new server on the same folder lists what this one did
    assert ids[1] in History(live.config.history_dir).get()
    assert live.post("/api/history", {"clear": True})[0] == 200
    assert live.get("/api/history") == (200, {})
    assert list(live.config.history_dir.glob("*.json")) == [] and History(live.config.history_dir).get() == {}


def test_view_serves_only_files_of_the_output_folder(live, tmp_path):
    (tmp_path / "outside.png").write_bytes(b"x")
    for query in ["filename=..%2F..%2Foutside.png", f"filename={tmp_path / 'outside.png'}",
                  "filename=outside.png&subfolder=..%2F..", "filename=x.png&type=temp", "filename="]:
        assert live.get(f"/api/view?{query}")[0] in (403, 404), query
    assert live.get("/api/view?filename=nothing.png")[0] == 404


def test_free_drops_the_engine_cache(live):
    live.run_watched([COPY_LORA])
    (cached,), messages = live.run_watched([COPY_LORA])
    assert [d["node"] for d in of(messages, "executing", cached) if d["node"]] == []
    assert live.post("/api/free", {"free_memory": True, "unload_models": True})[0] == 200
    (again,), messages = live.run_watched([COPY_LORA])
    assert [d["node"] for d in of(messages, "executing", again) if d["node"]] == ["1", "2"]


def test_while_memory_is_short_the_least_recent_prompts_results_go_first(live, monkeypatch):
    """After each prompt, while memory is short, the results of the prompt run longest ago go first;
    those of the last prompt stay. While memory lasts, every prompt's results stay."""
    shapes_lora = str(EXAMPLE_LORA.with_name("shapes_style.safetensors"))
    other = {"1": {"class_type": "lora-nodes.LoadLoRA", "inputs": {"path": shapes_lora}},
             "2": {"class_type": "lora-nodes.SaveLoRA", "inputs": {"lora": ["1", 0], "path": "other.safetensors"}}}

    def ran(prompt) -> list[str]:
        (prompt_id,), messages = live.run_watched([prompt])
        return [d["node"] for d in of(messages, "executing", prompt_id) if d["node"]]

    monkeypatch.setattr(live.server.queue, "memory_short", lambda: False)
    ran(COPY_LORA), ran(other)
    assert ran(COPY_LORA) == [] and ran(other) == []  # both remembered
    checks = []
    monkeypatch.setattr(live.server.queue, "memory_short", lambda: checks.append(1) or True)
    assert ran(COPY_LORA) == []  # still remembered; after it, the other prompt's results go
    assert len(checks) >= 2  # asked again after each prompt's results went, until only the last prompt's were left
    monkeypatch.setattr(live.server.queue, "memory_short", lambda: False)
    assert ran(COPY_LORA) == []  # the last prompt's results stayed
    assert ran(other) == ["1", "2"]  # the least recent prompt's went


def test_memory_is_short_below_a_quarter_free_and_never_asks_more_than_half():
    from lora_nodes.server.worker import _short

    gib = 2**30
    assert _short(15 * gib, 64 * gib) and not _short(17 * gib, 64 * gib)  # a quarter of 64 GiB
    assert _short(int(2.9 * gib), 8 * gib) and not _short(int(3.1 * gib), 8 * gib)  # at least 3 GiB
    assert _short(int(1.9 * gib), 4 * gib) and not _short(int(2.1 * gib), 4 * gib)  # at most half
    assert not _short(None, 8 * gib) and not _short(gib, None)  # unknown: nothing is forgotten


def test_get_prompt_and_queue_when_idle(live):
    assert live.get("/api/prompt") == (200, {"exec_info": {"queue_remaining": 0}})
    assert live.get("/api/queue") == (200, {"queue_running": [], "queue_pending": []})


# ----------------------------------------------------------------------------- safety


def test_foreign_hosts_origins_and_oversized_requests_are_refused(live):
    assert live.get("/api/queue", headers={"Host": "attacker.example:8188"})[0] == 403  # DNS rebinding
    assert live.post("/api/prompt", {"prompt": tiny_prompt()}, headers={"Origin": "http://attacker.example"})[0] == 403
    assert live.get("/api/queue", headers={"Sec-Fetch-Site": "cross-site"})[0] == 403
    host = f"127.0.0.1:{live.client.port}"
    assert live.get("/api/queue", headers={"Origin": f"http://{host}"})[0] == 200  # the editor itself
    assert live.post("/api/userdata/big.json", data=b"x" * (MAX_REQUEST_BYTES + 1))[0] == 413

    async def foreign_websocket():
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await live.client.ws_connect("/ws", headers={"Origin": "http://attacker.example"})
        return refused.value.status
    assert live.call(foreign_websocket()) == 403


def test_a_server_with_a_token_wants_it_on_every_request_and_websocket(tmp_path):
    token_server = Live(make_config(tmp_path, token="s3cret-token", host="0.0.0.0"))
    try:
        assert token_server.get("/api/queue")[0] == 401
        assert token_server.get("/api/queue", headers={"Authorization": "Bearer wrong"})[0] == 401
        assert token_server.get("/api/queue", headers={"Authorization": "Bearer s3cret-token"})[0] == 200
        # with a token, other host names are fine (the server was started for the network)
        assert token_server.get("/api/queue", headers={"Host": "box.lan:8188", "Authorization": "Bearer s3cret-token"})[0] == 200

        async def browser():
            session = token_server.client.session
            first = await token_server.client.get("/api/system_stats?token=s3cret-token")
            cookie = session.cookie_jar.filter_cookies(first.url).get("lora_nodes_token")
            after = await token_server.client.get("/api/queue")  # the cookie now carries the token
            with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
                session.cookie_jar.clear()
                await token_server.client.ws_connect("/ws")
            async with token_server.client.ws_connect("/ws?token=s3cret-token") as ws:
                hello = await ws.receive_json(timeout=10)
            return first.status, cookie is not None, after.status, refused.value.status, hello["type"]
        assert token_server.call(browser()) == (200, True, 200, 401, "status")
    finally:
        token_server.close()


def test_a_killed_prompt_is_recorded_as_failed_at_the_next_start(tmp_path):
    history = History(tmp_path)
    history.add("done", {"prompt": [0, "done", {}, {}, []], "outputs": {}, "status": {"status_str": "success"}})
    history.running([1, "cut-short", {"1": {}}, {}, ["1"]])
    assert (tmp_path / RUNNING_FILE).exists()
    reopened = History(tmp_path).get()
    assert list(reopened) == ["done", "cut-short"]
    assert reopened["cut-short"]["status"]["status_str"] == "error"
    assert "stopped" in reopened["cut-short"]["status"]["messages"][0][1]["exception_message"]
    assert not (tmp_path / RUNNING_FILE).exists()


def test_serve_listens_on_loopback_by_default_and_wants_a_token_elsewhere(tmp_path, monkeypatch):
    from lora_nodes.cli import build_parser
    from lora_nodes.server.main import config_from_args

    monkeypatch.chdir(tmp_path)
    local = build_parser().parse_args(["serve"])
    assert local.host == "127.0.0.1" and config_from_args(local, None).token is None
    wide = config_from_args(build_parser().parse_args(["serve", "--host", "0.0.0.0"]), None)
    assert wide.token and len(wide.token) >= 24  # generated: hard to guess
    given = config_from_args(build_parser().parse_args(["serve", "--host", "::", "--token", "mine"]), None)
    assert given.token == "mine"


# ----------------------------------------------------------------------------- review fixes


def small_png(path: Path) -> Path:
    Image.new("RGB", (8, 8), (200, 10, 10)).save(path)
    return path


def copy_image_prompt(image: str) -> dict[str, Any]:
    """LoadImage then SaveImage: a file read anywhere would land in the output folder, served by /view."""
    return {"1": {"class_type": "LoadImage", "inputs": {"image": image}},
            "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "copied"}}}


def test_a_server_others_can_reach_reads_files_only_from_its_folders(token_live, tmp_path_factory):
    elsewhere = tmp_path_factory.mktemp("elsewhere")
    secret_png = small_png(elsewhere / "secret.png")
    secret_lora = elsewhere / "secret.safetensors"
    secret_lora.write_bytes(EXAMPLE_LORA.read_bytes())
    relative = os.path.relpath(secret_png, token_live.config.base_dir)
    assert relative.startswith("..")
    for prompt, node, name in [(copy_image_prompt(str(secret_png)), "1", "image"),
                               (copy_image_prompt(relative), "1", "image"),
                               ({**COPY_LORA, "1": {"class_type": "lora-nodes.LoadLoRA",
                                                    "inputs": {"path": str(secret_lora)}}}, "1", "path")]:
        status, body = token_live.post("/api/prompt", {"prompt": prompt}, headers=BEARER)
        assert status == 400, body
        (error,) = body["node_errors"][node]["errors"]
        assert error["extra_info"]["input_name"] == name and error["message"] == OUTSIDE_MESSAGE
    assert not list(Path(token_live.config.output_dir).rglob("copied*"))
    # the folder it was started in, the model folders (here the examples' LoRAs) and builtins are fine
    small_png(Path(token_live.config.base_dir) / "mine.png")
    assert token_live.post("/api/prompt", {"prompt": copy_image_prompt("mine.png")}, headers=BEARER)[0] == 200
    assert token_live.post("/api/prompt", {"prompt": COPY_LORA}, headers=BEARER)[0] == 200
    assert token_live.server.queue.wait_idle(60)


def test_on_loopback_a_prompt_may_read_any_file(live, tmp_path):
    outside = small_png(tmp_path / "anywhere.png")
    (prompt_id,), messages = live.run_watched([copy_image_prompt(str(outside))])
    assert of(messages, "execution_success", prompt_id)


@pytest.mark.parametrize("body", [b"NaN", b"Infinity", b'{"a": -Infinity}', b"[" * 100_000, b"\xff"])
def test_request_json_that_is_not_standard_json_is_refused(live, body):
    assert live.post("/api/settings/Comfy.Strict", data=body)[0] == 400
    assert live.post("/api/settings", data=body)[0] == 400
    assert "Comfy.Strict" not in live.get("/api/settings")[1]


def test_a_prompt_number_must_be_finite_and_answers_refuse_nan(live):
    body = b'{"prompt": {}, "number": NaN}'
    status, answer = live.post("/api/prompt", data=body)
    assert status == 400 and answer["error"]["type"] == "invalid_prompt"
    assert [queue_number(v) for v in (float("inf"), float("nan"), 10**400, True, 2)] == [None, None, None, None, 2.0]
    with pytest.raises(ValueError):
        json_response({"x": float("nan")})


def test_a_prompt_id_in_use_is_refused_and_a_full_queue_asks_to_wait(live, monkeypatch):
    assert live.post("/api/prompt", {"prompt": COPY_LORA, "prompt_id": "only-once"})[0] == 200
    status, body = live.post("/api/prompt", {"prompt": COPY_LORA, "prompt_id": "only-once"})  # queued or running
    assert status == 400 and "only-once" in body["error"]["message"] and body["node_errors"] == {}
    assert live.server.queue.wait_idle(60)
    assert live.post("/api/prompt", {"prompt": COPY_LORA, "prompt_id": "only-once"})[0] == 400  # in the history
    monkeypatch.setattr(live.server.queue, "pending_limit", 0)
    status, body = live.post("/api/prompt", {"prompt": COPY_LORA})
    assert status == 503 and "wait" in body["error"]["message"]
    assert live.get("/api/queue")[1]["queue_pending"] == []


def test_userdata_names_keep_their_percent_signs_and_temporaries_are_not_listed(live):
    assert live.post("/api/userdata/workflows%2Fa%2541.json", data=b"{}") == (200, "workflows/a%41.json")
    (live.config.user_dir / "default" / "workflows" / temporary_name("half.json")).write_bytes(b"{")
    listed = live.get("/api/userdata?dir=workflows")[1]
    assert "a%41.json" in listed and "aA.json" not in listed and not any("half" in n for n in listed)
    assert not any("half" in e["name"] for e in live.get("/api/v2/userdata?path=workflows")[1])
    assert live.request("DELETE", "/api/userdata/workflows%2Fa%2541.json")[0] == 204


def test_userdata_moves_onto_folders_and_writes_under_files_are_refused_plainly(live):
    assert live.post("/api/userdata/workflows%2Fplain.json", data=b"{}")[0] == 200
    status, body = live.post("/api/userdata/workflows%2Fplain.json%2Finner.json", data=b"{}")
    assert status == 400 and "folder" in body["error"]
    status, body = live.post("/api/userdata/workflows%2Fplain.json/move/workflows")
    assert status == 409 and "folder" in body["error"]
    assert live.post("/api/userdata/workflows%2Fplain.json/move/workflows%2Fplain.json%2Fx.json")[0] == 400
    assert live.post("/api/userdata/workflows%2Fnone.json/move/workflows%2Fy.json")[0] == 404
    assert live.request("DELETE", "/api/userdata/workflows")[0] == 404
    assert live.request("DELETE", "/api/userdata/workflows%2Fplain.json")[0] == 204


def test_view_refuses_a_symlink_in_the_output_folder_leading_out(live, tmp_path):
    small_png(tmp_path / "private.png")
    link = Path(live.config.output_dir) / "shortcut.png"
    link.symlink_to(tmp_path / "private.png")
    try:
        assert live.get("/api/view?filename=shortcut.png")[0] == 403
    finally:
        link.unlink()


def test_origin_null_and_foreign_origins_are_refused_even_with_the_token(live, token_live):
    assert live.post("/api/prompt", {"prompt": tiny_prompt()}, headers={"Origin": "null"})[0] == 403
    assert token_live.get("/api/queue", headers={"Origin": "http://attacker.example", **BEARER})[0] == 403
    assert token_live.get("/api/queue", headers={"Origin": "null", **BEARER})[0] == 403
    assert token_live.get("/api/queue", headers=BEARER)[0] == 200


def test_opening_the_editor_with_the_token_redirects_with_a_cookie(token_live):
    import warnings

    async def go():
        response = await token_live.client.get(f"/?token={TOKEN}", allow_redirects=False)
        return response.status, response.headers.get("Location"), response.cookies.get("lora_nodes_token")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        status, location, cookie = token_live.call(go())
    assert (status, location) == (302, "/") and cookie is not None and cookie.value == TOKEN
    assert not [w for w in caught if "HTTPException" in str(w.message)]


def test_loopback_means_a_loopback_address_or_localhost():
    assert all(is_loopback(h) for h in ("127.0.0.1", "127.1.2.3", "::1", "localhost"))
    assert not any(is_loopback(h) for h in ("127.example.com", "0.0.0.0", "::", "box.lan", ""))


def test_dropping_a_client_with_a_full_backlog_does_not_raise():
    hub = Hub()
    backlog: asyncio.Queue = asyncio.Queue(2)
    backlog.put_nowait("a")
    backlog.put_nowait("b")
    hub.clients["slow"] = backlog
    hub.drop("slow")
    assert "slow" not in hub.clients and backlog.get_nowait() is None and backlog.empty()
    hub.drop("slow")  # gone already: nothing to do


def queued(prompt_id: str) -> QueuedPrompt:
    return QueuedPrompt(0, prompt_id, {"5": {"class_type": "lora-nodes.Sample"}}, {}, [], None)


def test_interrupt_sets_its_flag_under_the_queue_lock(tmp_path):
    queue = PromptQueue(lambda emit: None, History(tmp_path / "h"), None, tmp_path, lambda *_: None)

    class Checked:  # the flag, asserting that whoever sets it holds the queue's lock
        def set(self):
            assert queue._cond._is_owned(), "set outside the lock: the next prompt may be interrupted instead"
    queue._interrupt = Checked()
    queue._running = queued("now")
    assert queue.interrupt("other") is False
    assert queue.interrupt("now") is True


def test_an_interrupt_names_the_node_it_stopped_before(tmp_path):
    sent = []
    flag = __import__("threading").Event()
    run = PromptRun(queued("p"), tmp_path, lambda kind, data: sent.append((kind, data)), flag)
    run({"event": "executing", "node": "4", "type": "LoadBase"})
    flag.set()
    with pytest.raises(Interrupted):
        run({"event": "executing", "node": "5", "type": "Sample"})
    run.interrupted(None)
    assert sent[-1][0] == "execution_interrupted" and sent[-1][1]["node_id"] == "5"
    assert sent[-1][1]["node_type"] == "lora-nodes.Sample"


def test_a_kill_after_recording_a_prompt_keeps_its_success(tmp_path):
    history = History(tmp_path)
    entry = [0, "finished", {}, {}, []]
    history.running(entry)
    history.add("finished", history_item(entry, {}, "success", []))
    history.running(entry)  # as if killed between writing finished.json and removing the running note
    reopened = History(tmp_path).get()
    assert reopened["finished"]["status"]["status_str"] == "success"
    assert not (tmp_path / RUNNING_FILE).exists()
