"""The HTTP + WebSocket server: ComfyUI's backend API (as the 1.27 editor calls it) on our engine.

Routes are under ``/api/`` as the editor calls them; the editor's static files are served from
``/``. Safety, by default: the server listens on 127.0.0.1 only and answers only requests whose
``Host`` is a loopback name (a web page cannot reach it by DNS rebinding); a request from another web
origin (``Origin`` or ``Sec-Fetch-Site`` says so) is refused, so a page the user visits cannot queue
prompts; request bodies are bounded; ``view`` and ``userdata`` never leave their folders. Listening on
another address needs a token, checked on every request and WebSocket.
"""

from __future__ import annotations

import asyncio
import functools
import hmac
import ipaddress
import json
import logging
import math
import mimetypes
import os
import platform
import sys
import uuid
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from aiohttp import WSMsgType, web

from ..engine.scheduler import Runner
from ..fileio import is_our_temporary
from ..modelfolders import FOLDER_KINDS, LAYOUT, ModelFolders, names_in, using_folders
from ..nodes import catalogue as default_catalogue
from ..nodes.spec import Catalogue
from . import frontend, with_example_loras
from .catalogue import editor_object_info, node_info
from .editor_js import EDITOR_EXTENSION, EXTENSION_URL
from .prompts import InvalidPrompt, check_prompt, error_body
from .storage import DEFAULT_USER_FILES, PROMPT_ID, AlreadyExists, History, OutsideFolder, UserFiles, confined
from .templates import Templates
from .worker import DuplicatePrompt, PromptQueue, QueuedPrompt, QueueFull

log = logging.getLogger("lora_nodes.server")

MAX_REQUEST_BYTES = 16 * 2**20  # a request body: as much as a workflow file may hold (graph.load's bound)
MAX_WS_MESSAGE_BYTES = 64 * 2**10  # what a client may send over the WebSocket (feature flags only)
CLIENT_BACKLOG = 2000  # messages waiting for one slow client; past this it is disconnected
LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})
TOKEN_COOKIE = "lora_nodes_token"
APP_KEY = web.AppKey("lora_nodes_server", object)


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an address or name to listen on) is this machine only: a loopback address or
    ``localhost`` (a name such as ``127.example.com`` is anywhere)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


# every JSON answer: NaN and Infinity are not JSON (a strict client fails on them), so writing one is a bug
json_response = functools.partial(web.json_response, dumps=functools.partial(json.dumps, allow_nan=False))


@dataclass
class ServerConfig:
    """Where the server keeps and finds things, and who may talk to it."""

    output_dir: Path
    user_dir: Path  # settings and saved workflows, per user
    history_dir: Path
    cache_dir: Path | None = None  # the engine's disk cache (None: its default)
    base_dir: Path = field(default_factory=Path.cwd)  # relative paths in prompts resolve against it
    folders: ModelFolders = field(default_factory=ModelFolders)
    examples_dir: Path | None = None  # workflows offered as templates
    static_root: Path | None = None  # the editor's files (None: API only)
    token: str | None = None  # required on every request when set
    host: str = "127.0.0.1"


class Hub:
    """The connected WebSocket clients; messages from any thread reach each one in order."""

    def __init__(self) -> None:
        self.loop: asyncio.AbstractEventLoop | None = None
        self.clients: dict[str, asyncio.Queue[str | None]] = {}

    def send(self, kind: str, data: dict[str, Any]) -> None:
        """Queue a message for every client (thread-safe; dropped when the server is not running)."""
        if self.loop is None or self.loop.is_closed():
            return
        text = json.dumps({"type": kind, "data": data}, default=str)
        try:
            self.loop.call_soon_threadsafe(self._put, text)
        except RuntimeError:  # the loop closed meanwhile
            pass

    def send_to(self, sid: str, kind: str, data: dict[str, Any]) -> None:
        queue = self.clients.get(sid)
        if queue is not None:
            self._offer(sid, queue, json.dumps({"type": kind, "data": data}, default=str))

    def _put(self, text: str) -> None:
        for sid, queue in list(self.clients.items()):
            self._offer(sid, queue, text)

    def _offer(self, sid: str, queue: asyncio.Queue[str | None], text: str) -> None:
        try:
            queue.put_nowait(text)
        except asyncio.QueueFull:  # a client that stopped reading: let it go rather than hold its backlog
            log.warning("client %s is not reading its messages: disconnected", sid)
            self.drop(sid)

    def drop(self, sid: str) -> None:
        """Let a client go: its waiting messages are dropped and its writer told to close (None).

        Emptied first: a full backlog has no room for the None (put_nowait would raise QueueFull).
        """
        queue = self.clients.pop(sid, None)
        if queue is None:
            return
        while not queue.empty():
            queue.get_nowait()
        queue.put_nowait(None)


class Server:
    """One server: the queue and its worker, the stores, and the request handlers."""

    def __init__(self, config: ServerConfig, catalogue: Catalogue | None = None):
        config.folders = with_example_loras(config.folders, config.examples_dir)
        self.config = config
        self.catalogue = catalogue or default_catalogue()
        self.output_dir = Path(config.output_dir).resolve()
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.users = UserFiles(config.user_dir)
        self.history = History(config.history_dir)
        self.hub = Hub()
        self.templates = Templates(config.examples_dir, self.catalogue, config.folders, config.base_dir)
        self.queue = PromptQueue(self._runner, self.history, config.folders, self.output_dir, self.hub.send)

    def _runner(self, emit) -> Runner:
        return Runner(self.catalogue, output_dir=self.output_dir, cache_dir=self.config.cache_dir, emit=emit)

    # ---------------------------------------------------------------- the application

    def app(self) -> web.Application:
        """The aiohttp application (its start starts the worker; its cleanup stops it)."""
        app = web.Application(client_max_size=MAX_REQUEST_BYTES, middlewares=[self._guard])
        app[APP_KEY] = self
        app.on_startup.append(self._on_startup)
        app.on_shutdown.append(self._on_shutdown)
        app.on_cleanup.append(self._on_cleanup)
        api = [
            web.get("/users", self.get_users), web.post("/users", self.post_users),
            web.get("/settings", self.get_settings), web.post("/settings", self.post_settings),
            web.get("/settings/{id}", self.get_setting), web.post("/settings/{id}", self.post_setting),
            web.get("/i18n", self.get_i18n), web.get("/extensions", self.get_extensions),
            web.get("/object_info", self.get_object_info), web.get("/object_info/{node_class}", self.get_one_object_info),
            web.get("/embeddings", self.get_embeddings), web.get("/system_stats", self.get_system_stats),
            web.get("/features", self.get_features),
            web.get("/models", self.get_model_kinds), web.get("/models/{folder}", self.get_models),
            web.get("/experiment/models", self.get_model_folders), web.get("/experiment/models/{folder}", self.get_model_files),
            web.get("/userdata", self.list_userdata), web.get("/v2/userdata", self.list_userdata_v2),
            web.get("/userdata/{file}", self.get_userdata), web.post("/userdata/{file}", self.post_userdata),
            web.delete("/userdata/{file}", self.delete_userdata),
            web.post("/userdata/{file}/move/{dest}", self.move_userdata),
            web.get("/workflow_templates", self.get_templates),
            web.get("/workflow_templates/{module}/{name}", self.get_template),
            web.get("/prompt", self.get_prompt), web.post("/prompt", self.post_prompt),
            web.get("/queue", self.get_queue), web.post("/queue", self.post_queue),
            web.get("/history", self.get_history), web.get("/history/{prompt_id}", self.get_history_item),
            web.post("/history", self.post_history),
            web.get("/view", self.get_view), web.post("/interrupt", self.post_interrupt), web.post("/free", self.post_free),
        ]
        app.add_routes([web.RouteDef(r.method, "/api" + r.path, r.handler, r.kwargs) for r in api])
        app.add_routes([web.get("/ws", self.websocket), web.get("/", self.get_root), web.get("/user.css", self.get_user_css),
                        web.get("/favicon.ico", self.get_favicon),
                        web.get(EXTENSION_URL, self.get_extension_js),
                        web.get("/templates/index.json", self.get_core_templates)])
        if self.config.static_root is not None:
            app.add_routes([web.static("/", self.config.static_root)])
        return app

    async def _on_startup(self, _: web.Application) -> None:
        self.hub.loop = asyncio.get_running_loop()
        self.queue.start()

    async def _on_shutdown(self, _: web.Application) -> None:
        for sid in list(self.hub.clients):
            self.hub.drop(sid)

    async def _on_cleanup(self, _: web.Application) -> None:
        await asyncio.to_thread(self.queue.stop)

    # ---------------------------------------------------------------- safety

    @web.middleware
    async def _guard(self, request: web.Request, handler):
        refusal = self.refusal(request)
        if refusal is not None:
            status, reason = refusal
            return json_response({"error": reason}, status=status)
        response = await handler(request)
        if self.config.token and request.query.get("token") and isinstance(response, web.StreamResponse):
            # a browser that came with ?token= keeps it as a cookie, so the editor's own requests carry it
            response.set_cookie(TOKEN_COOKIE, self.config.token, httponly=True, samesite="Strict")
        return response

    def refusal(self, request: web.Request) -> tuple[int, str] | None:
        """Why ``request`` is refused (status, reason), or None when it may be answered."""
        if self.config.token is None and not _loopback_host_header(request.host):
            return 403, "this server answers only requests to localhost / 127.0.0.1 (start it with --host and a token)"
        origin = request.headers.get("Origin")
        if origin is not None and not _same_origin(origin, request):
            return 403, "requests from other web pages are refused"
        if request.headers.get("Sec-Fetch-Site") == "cross-site":
            return 403, "requests from other web pages are refused"
        if self.config.token and not self._has_token(request):
            return 401, "this server needs its token: open the address it printed (with ?token=...)"
        return None

    def _has_token(self, request: web.Request) -> bool:
        token = self.config.token or ""
        given = [request.query.get("token", ""), request.cookies.get(TOKEN_COOKIE, "")]
        auth = request.headers.get("Authorization", "")
        if auth.startswith("Bearer "):
            given.append(auth.removeprefix("Bearer "))
        return any(g and hmac.compare_digest(g.encode(), token.encode()) for g in given)

    # ---------------------------------------------------------------- the editor's files

    async def get_root(self, request: web.Request) -> web.StreamResponse:
        if self.config.static_root is None:
            return web.Response(status=503, text=f"the web editor is not installed: {frontend.INSTALL_HINT}")
        if self.config.token and request.query.get("token"):
            # the token now travels in the cookie, not in the address bar (a Response: an HTTPFound returned,
            # not raised, is deprecated, and a raised one would lose the cookie set here)
            response = web.Response(status=302, headers={"Location": "/"})
            response.set_cookie(TOKEN_COOKIE, self.config.token, httponly=True, samesite="Strict")
            return response
        response = web.FileResponse(self.config.static_root / "index.html")
        response.headers["Cache-Control"] = "no-cache"
        return response

    async def get_user_css(self, _: web.Request) -> web.StreamResponse:
        """The user's own styles for the editor (``user.css`` in the user's folder), else none."""
        path = self.users.root / "user.css"
        return web.FileResponse(path) if path.is_file() else web.Response(text="", content_type="text/css")

    async def get_favicon(self, _: web.Request) -> web.StreamResponse:
        path = self.config.static_root / "favicon.ico" if self.config.static_root else None
        return web.FileResponse(path) if path is not None and path.is_file() else web.Response(status=204)

    async def get_extension_js(self, _: web.Request) -> web.Response:
        return web.Response(text=EDITOR_EXTENSION, content_type="application/javascript")

    async def get_extensions(self, _: web.Request) -> web.Response:
        """The editor's own extension scripts, then ours (which opens the quickstart graph)."""
        found = []
        root = self.config.static_root
        if root is not None:
            found = sorted("/" + p.relative_to(root).as_posix() for p in (root / "extensions").rglob("*.js"))
        return json_response([*found, EXTENSION_URL])

    async def get_core_templates(self, _: web.Request) -> web.Response:
        return json_response([])  # ComfyUI's own templates need its model downloads; ours are listed below

    # ---------------------------------------------------------------- users and settings

    async def get_users(self, _: web.Request) -> web.Response:
        return json_response({"storage": "server", "migrated": True})

    async def post_users(self, _: web.Request) -> web.Response:
        return json_response({"error": "this server has one user"}, status=400)

    async def get_settings(self, _: web.Request) -> web.Response:
        return json_response(self.users.settings())

    async def get_setting(self, request: web.Request) -> web.Response:
        return json_response(self.users.settings().get(request.match_info["id"]))

    async def post_settings(self, request: web.Request) -> web.Response:
        changes = await _json(request)
        if not isinstance(changes, dict):
            return json_response({"error": "settings must be a JSON object"}, status=400)
        await asyncio.to_thread(self.users.update_settings, changes)
        return web.Response(status=200)

    async def post_setting(self, request: web.Request) -> web.Response:
        value = await _json(request)
        await asyncio.to_thread(self.users.update_settings, {request.match_info["id"]: value})
        return web.Response(status=200)

    async def get_i18n(self, _: web.Request) -> web.Response:
        return json_response({})  # no translations of our own yet: the editor's English stands

    # ---------------------------------------------------------------- the catalogue and the machine

    async def get_object_info(self, _: web.Request) -> web.Response:
        return json_response(await asyncio.to_thread(self._with_folders, editor_object_info, self.catalogue))

    async def get_one_object_info(self, request: web.Request) -> web.Response:
        spec = self.catalogue.get(request.match_info["node_class"])
        if spec is None:
            return json_response({})
        return json_response({spec.comfy_id: await asyncio.to_thread(self._with_folders, node_info, spec)})

    async def get_embeddings(self, _: web.Request) -> web.Response:
        return json_response([])  # textual-inversion embeddings are not supported

    async def get_features(self, _: web.Request) -> web.Response:
        return json_response(self.features())

    def features(self) -> dict[str, Any]:
        return {"supports_preview_metadata": False, "max_upload_size": MAX_REQUEST_BYTES}

    async def get_system_stats(self, _: web.Request) -> web.Response:
        return json_response(await asyncio.to_thread(system_stats))

    async def get_model_kinds(self, _: web.Request) -> web.Response:
        return json_response(sorted(LAYOUT))

    async def get_models(self, request: web.Request) -> web.Response:
        kind = request.match_info["folder"]
        if kind not in LAYOUT:
            return web.Response(status=404)
        return json_response(await asyncio.to_thread(self._with_folders, names_in, kind))

    async def get_model_folders(self, _: web.Request) -> web.Response:
        return json_response([{"name": kind, "folders": [str(f) for f in self.config.folders.of(kind)]}
                                  for kind in sorted(LAYOUT) if kind not in FOLDER_KINDS])

    async def get_model_files(self, request: web.Request) -> web.Response:
        kind = request.match_info["folder"]
        if kind not in LAYOUT:
            return web.Response(status=404)
        names = await asyncio.to_thread(self._with_folders, names_in, kind)
        return json_response([{"name": name, "pathIndex": 0} for name in names])

    def readable_roots(self) -> list[Path] | None:
        """Where a prompt's path inputs may read from: None (anywhere) on a loopback-only server; with a
        token (others can reach it), the model folders of every kind (the input folder too) and the
        folder the server was started in."""
        if not self.config.token:
            return None
        return [*(folder for folders in self.config.folders.kinds.values() for folder in folders), self.config.base_dir]

    def _with_folders(self, function, *args):
        with using_folders(self.config.folders):
            return function(*args)

    # ---------------------------------------------------------------- the user's files

    def _user_path(self, relative: str) -> Path | web.Response:
        try:
            return self.users.path(relative)
        except OutsideFolder:
            return json_response({"error": "that path is outside your folder"}, status=403)

    async def list_userdata(self, request: web.Request) -> web.Response:
        folder = request.query.get("dir", "")
        if not folder:
            return json_response({"error": "give ?dir="}, status=400)
        try:
            listed = await asyncio.to_thread(self.users.listing, folder, _flag(request, "recurse"),
                                             _flag(request, "full_info"), _flag(request, "split"))
        except OutsideFolder:
            return json_response({"error": "that folder is outside your folder"}, status=403)
        if listed is None:
            return json_response({"error": "no such folder"}, status=404)
        return json_response(listed)

    async def list_userdata_v2(self, request: web.Request) -> web.Response:
        relative = request.query.get("path", "")
        try:
            base = self.users.path(relative) if relative else self.users.root
        except OutsideFolder:
            return json_response({"error": "that path is outside your folder"}, status=400)
        if not base.exists():
            return json_response([]) if not relative else web.Response(status=404)
        if not base.is_dir():
            return web.Response(status=400, text="not a folder")
        root = self.users.root.resolve()
        entries = []
        for path in sorted(base.rglob("*")):
            if path.is_symlink() or is_our_temporary(path.name):
                continue
            entry = {"name": path.name, "path": path.resolve().relative_to(root).as_posix(),
                     "type": "directory" if path.is_dir() else "file"}
            if path.is_file():
                stat = path.stat()
                entry.update(size=stat.st_size, modified=stat.st_mtime)
            entries.append(entry)
        entries.sort(key=lambda e: (e["type"] != "directory", e["name"].lower()))
        return json_response(entries)

    async def get_userdata(self, request: web.Request) -> web.StreamResponse:
        path = self._user_path(request.match_info["file"])
        if isinstance(path, web.Response):
            return path
        if not path.is_file():
            default = DEFAULT_USER_FILES.get(request.match_info["file"])
            return web.Response(status=404) if default is None else web.Response(body=default)
        return web.FileResponse(path)

    async def post_userdata(self, request: web.Request) -> web.Response:
        relative = request.match_info["file"]
        overwrite = request.query.get("overwrite", "true") != "false"
        body = await request.read()
        try:
            path = await asyncio.to_thread(self.users.write, relative, body, overwrite)
        except (OutsideFolder, AlreadyExists, OSError) as exc:
            return _user_file_refusal(exc, "cannot save it")
        info = self.users.info(path)
        return json_response(info if _flag(request, "full_info") else info["path"])

    async def delete_userdata(self, request: web.Request) -> web.Response:
        try:
            await asyncio.to_thread(self.users.delete, request.match_info["file"])
        except (OutsideFolder, OSError) as exc:
            return _user_file_refusal(exc, "cannot delete it")
        return web.Response(status=204)

    async def move_userdata(self, request: web.Request) -> web.Response:
        overwrite = request.query.get("overwrite", "true") != "false"
        try:
            dest = await asyncio.to_thread(self.users.move, request.match_info["file"], request.match_info["dest"],
                                           overwrite)
        except (OutsideFolder, AlreadyExists, OSError) as exc:
            return _user_file_refusal(exc, "cannot move it")
        info = self.users.info(dest)
        return json_response(info if _flag(request, "full_info") else info["path"])

    # ---------------------------------------------------------------- templates

    async def get_templates(self, _: web.Request) -> web.Response:
        names = await asyncio.to_thread(self.templates.names)
        return json_response({Templates.MODULE: names} if names else {})

    async def get_template(self, request: web.Request) -> web.Response:
        if request.match_info["module"] != Templates.MODULE:
            return web.Response(status=404)
        graph = await asyncio.to_thread(self.templates.graph, request.match_info["name"].removesuffix(".json"))
        if graph is None:
            return web.Response(status=404)
        return json_response(graph)

    # ---------------------------------------------------------------- the queue

    async def get_prompt(self, _: web.Request) -> web.Response:
        return json_response(self.queue.status())

    async def post_prompt(self, request: web.Request) -> web.Response:
        """Queue a prompt. 400 (ComfyUI's shape) when it is invalid or its id is taken, 503 when the queue is full.

        Paths: a server others can reach (it has a token) reads files only from the model folders, the
        input folder and the folder it was started in; on loopback the user may name any file.
        """
        try:
            body = await _json(request)
        except BadJson as exc:
            return json_response(error_body("invalid_prompt", "the request body is not valid JSON", exc.text or ""),
                                 status=400)
        if not isinstance(body, dict) or "prompt" not in body:
            return json_response(error_body("no_prompt", "No prompt provided", ""), status=400)
        prompt_id = str(body.get("prompt_id") or uuid.uuid4())
        if not PROMPT_ID.match(prompt_id):
            return json_response(error_body("invalid_prompt", "prompt_id may hold only letters, digits, "
                                                "'_', '-' and '.' (at most 100)", ""), status=400)
        extra_data = body.get("extra_data") if isinstance(body.get("extra_data"), dict) else {}
        if isinstance(body.get("client_id"), str):
            extra_data["client_id"] = body["client_id"]
        try:
            checked = await asyncio.to_thread(self._with_folders, check_prompt, body["prompt"],
                                              self.config.base_dir, self.catalogue, self.readable_roots())
        except InvalidPrompt as exc:
            return json_response(exc.body, status=400)
        number = _number(body.get("number"))
        number = self.queue.next_number(bool(body.get("front"))) if number is None else number
        try:
            self.queue.put(QueuedPrompt(number, prompt_id, body["prompt"], extra_data, checked.outputs,
                                        checked.workflow))
        except DuplicatePrompt as exc:
            return json_response(error_body("duplicate_prompt_id", str(exc), ""), status=400)
        except QueueFull as exc:
            return json_response(error_body("queue_full", str(exc), ""), status=503)
        return json_response({"prompt_id": prompt_id, "number": number, "node_errors": {}})

    async def get_queue(self, _: web.Request) -> web.Response:
        return json_response(self.queue.listing())

    async def post_queue(self, request: web.Request) -> web.Response:
        body = await _json(request)
        if isinstance(body, dict):
            if body.get("clear"):
                self.queue.clear()
            if isinstance(body.get("delete"), list):
                self.queue.delete(body["delete"])
        return web.Response(status=200)

    async def post_interrupt(self, request: web.Request) -> web.Response:
        body = await _json(request, default={})
        prompt_id = body.get("prompt_id") if isinstance(body, dict) else None
        self.queue.interrupt(prompt_id if isinstance(prompt_id, str) else None)
        return web.Response(status=200)

    async def post_free(self, request: web.Request) -> web.Response:
        body = await _json(request, default={})
        if isinstance(body, dict) and (body.get("free_memory") or body.get("unload_models")):
            self.queue.free()
        return web.Response(status=200)

    async def get_history(self, request: web.Request) -> web.Response:
        max_items = _int(request.query.get("max_items"))
        offset = _int(request.query.get("offset"))
        return json_response(self.history.get(max_items=max_items, offset=-1 if offset is None else offset))

    async def get_history_item(self, request: web.Request) -> web.Response:
        return json_response(self.history.get(request.match_info["prompt_id"]))

    async def post_history(self, request: web.Request) -> web.Response:
        body = await _json(request)
        if isinstance(body, dict):
            if body.get("clear"):
                await asyncio.to_thread(self.history.clear)
            if isinstance(body.get("delete"), list):
                await asyncio.to_thread(self.history.delete, body["delete"])
        return web.Response(status=200)

    # ---------------------------------------------------------------- images

    async def get_view(self, request: web.Request) -> web.StreamResponse:
        """An image of the output folder (or of the input folder, for LoadImage), never anything outside."""
        kind = request.query.get("type", "output")
        roots = {"output": [self.output_dir], "input": list(self.config.folders.of("input"))}.get(kind)
        filename = request.query.get("filename", "")
        if not roots or not filename:
            return web.Response(status=404)
        relative = "/".join(part for part in (request.query.get("subfolder", ""), filename) if part)
        try:
            path = confined(roots[0], relative)
        except OutsideFolder:
            return json_response({"error": "that file is outside the folder"}, status=403)
        if not path.is_file():
            return web.Response(status=404)
        response = web.FileResponse(path)
        response.content_type = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        return response

    # ---------------------------------------------------------------- the WebSocket

    async def websocket(self, request: web.Request) -> web.WebSocketResponse:
        """Live messages: ``status`` first (with the client's id), then every run's messages."""
        ws = web.WebSocketResponse(max_msg_size=MAX_WS_MESSAGE_BYTES, heartbeat=30)
        await ws.prepare(request)
        sid = request.query.get("clientId") or uuid.uuid4().hex
        if not PROMPT_ID.match(sid):
            sid = uuid.uuid4().hex
        queue: asyncio.Queue[str | None] = asyncio.Queue(CLIENT_BACKLOG)
        self.hub.drop(sid)  # the same client id connecting again: the old connection goes
        self.hub.clients[sid] = queue
        writer = asyncio.create_task(_write_messages(ws, queue))
        self.hub.send_to(sid, "status", {"status": self.queue.status(), "sid": sid})
        try:
            async for message in ws:
                if message.type == WSMsgType.TEXT and _is_feature_flags(message.data):
                    self.hub.send_to(sid, "feature_flags", self.features())
        finally:
            if self.hub.clients.get(sid) is queue:
                self.hub.clients.pop(sid, None)
            writer.cancel()
        return ws


def _user_file_refusal(exc: Exception, doing: str) -> web.Response:
    """The answer to a refused userdata save, move or delete: 403 outside the user's folder, 404 no such
    file, 409 when it would replace a file (asked not to) or a folder, 400 otherwise (a file where a
    folder should be, a name the file system refuses)."""
    if isinstance(exc, OutsideFolder):
        return json_response({"error": "that path is outside your folder"}, status=403)
    if isinstance(exc, FileNotFoundError):
        return json_response({"error": "no such file"}, status=404)
    if isinstance(exc, AlreadyExists):
        return web.Response(status=409, text="File already exists")
    if isinstance(exc, IsADirectoryError):
        return json_response({"error": f"{doing}: a folder of that name is there"}, status=409)
    message = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
    return json_response({"error": f"{doing}: {message}"}, status=400)


async def _write_messages(ws: web.WebSocketResponse, queue: asyncio.Queue[str | None]) -> None:
    """Send a client its messages in order until it goes (or is let go: None)."""
    try:
        while (text := await queue.get()) is not None:
            await ws.send_str(text)
    except (ConnectionError, RuntimeError):  # the client went away mid-send: nothing to tell anyone
        pass
    finally:
        if not ws.closed:
            await ws.close()


def _is_feature_flags(text: str) -> bool:
    try:
        message = parse_json(text)
    except ValueError:
        return False
    return isinstance(message, dict) and message.get("type") == "feature_flags"


def _loopback_host_header(host: str) -> bool:
    """Whether a request's ``Host`` names this machine (a DNS-rebinding page sends its own name)."""
    name = urlsplit(f"//{host}").hostname or ""
    return name in LOOPBACK_NAMES


def _same_origin(origin: str, request: web.Request) -> bool:
    parts = urlsplit(origin)
    return parts.scheme in ("http", "https") and parts.netloc.lower() == request.host.lower()


class BadJson(web.HTTPBadRequest):
    """A request body that is not JSON as the standard has it (no NaN or Infinity), or too deep to read."""

    def __init__(self, reason: str):
        super().__init__(text=json.dumps({"error": f"the request body is not valid JSON: {reason}"}),
                         content_type="application/json")


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def parse_json(text: str) -> Any:
    """``text`` as strict JSON; :class:`ValueError` for NaN/Infinity, nesting too deep or numbers too large."""
    try:
        return json.loads(text, parse_constant=_reject_constant)
    except (RecursionError, OverflowError) as exc:
        raise ValueError(f"{type(exc).__name__}: too deeply nested or too large") from None


async def _json(request: web.Request, default: Any = None) -> Any:
    """The request's JSON body; ``default`` when it is empty; :class:`BadJson` (400) when it is not JSON."""
    try:
        text = await request.text()
        return parse_json(text) if text.strip() else default
    except ValueError as exc:  # UnicodeDecodeError too
        raise BadJson(str(exc)[:200]) from None


def _flag(request: web.Request, name: str) -> bool:
    return request.query.get(name, "").lower() == "true"


def _int(text: str | None) -> int | None:
    try:
        return int(text) if text is not None else None
    except ValueError:
        return None


def _number(value: Any) -> float | None:
    """A queue position the client gave: a finite number, else None (the queue numbers it)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        number = float(value)
    except OverflowError:  # an integer beyond any float
        return None
    return number if math.isfinite(number) else None


def system_stats() -> dict[str, Any]:
    """``/system_stats``: this machine and its torch device, as ComfyUI reports them."""
    import torch

    try:
        version = metadata.version("lora-nodes")
    except metadata.PackageNotFoundError:  # run from a checkout that was never installed
        version = "unknown"
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    total, free = _ram()
    vram_total = vram_free = total
    name = "cpu"
    if device.type == "cuda":
        vram_free, vram_total = torch.cuda.mem_get_info()
        name = torch.cuda.get_device_name()
    return {
        "system": {"os": os.name, "ram_total": total, "ram_free": free, "comfyui_version": f"lora-nodes {version}",
                   "required_frontend_version": frontend.PINNED_VERSION, "python_version": sys.version,
                   "pytorch_version": torch.__version__, "embedded_python": False, "argv": _shown_argv(),
                   "platform": platform.platform()},
        "devices": [{"name": name, "type": device.type, "index": device.index, "vram_total": vram_total,
                     "vram_free": vram_free, "torch_vram_total": vram_total, "torch_vram_free": vram_free}],
    }


def _shown_argv() -> list[str]:
    """The command line, with the token's value left out (it is shown to whoever asks)."""
    shown, hide = [], False
    for arg in sys.argv:
        shown.append("***" if hide else ("--token=***" if arg.startswith("--token=") else arg))
        hide = arg == "--token"
    return shown


def _ram() -> tuple[int, int]:
    """Total and available memory in bytes (0 where the system does not say)."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        total = 0
    from ..models.memory import mem_available  # deferred: the models package imports torch

    return total, mem_available() or 0
