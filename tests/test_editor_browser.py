"""The web editor in a real browser: the system's headless Chromium, driven by Playwright's Python package
(never a browser an installer downloads). It loads the editor from `lora-nodes serve`, sees no console
errors, finds our nodes in the node library, queues the quickstart graph it opens with (one step per
image, so it is quick), sees its images load, saves the graph and drops a PNG back in, and keeps a
screenshot in its folder. `LORA_NODES_DOCS_SCREENSHOT=1 python -m pytest tests/test_editor_browser.py`
also writes the README's docs/editor.png (more steps, the view on the saved images).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import threading
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest

pytest.importorskip("aiohttp", reason="the server needs aiohttp: pip install 'lora-nodes[editor]'")
playwright_api = pytest.importorskip("playwright.sync_api", reason="the browser test needs Playwright's Python "
                                     "package: pip install playwright (the browser itself comes from the system)")

from aiohttp import web
from test_server import make_config

from lora_nodes.cli import main as cli_main
from lora_nodes.graph import load_workflow
from lora_nodes.server import frontend
from lora_nodes.server.app import Server

REPO = Path(__file__).resolve().parent.parent
BROWSERS = ("/usr/bin/chromium", "/usr/bin/chromium-browser", "/usr/bin/google-chrome")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
QUICKSTART = REPO / "workflows" / "quickstart.yaml"
# LORA_NODES_DOCS_SCREENSHOT=1: also write docs/editor.png (the README's), with enough steps for builtin:shapes
# to draw its shapes and the view on the saved images; otherwise one step per image, so the test is quick
DOCS = os.environ.get("LORA_NODES_DOCS_SCREENSHOT") == "1"
STEPS = 8 if DOCS else 1


def system_chromium() -> str | None:
    found = [path for path in BROWSERS if Path(path).is_file()]
    return found[0] if found else shutil.which("chromium")


class ServerThread:
    """The server on a free port of 127.0.0.1, in a thread with its own event loop."""

    def __init__(self, server: Server):
        self.server = server
        self.loop = asyncio.new_event_loop()
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.started = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()
        assert self.started.wait(60), "the server did not start"

    def _serve(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.runner = web.AppRunner(self.server.app())
        self.loop.run_until_complete(self.runner.setup())
        self.loop.run_until_complete(web.TCPSite(self.runner, "127.0.0.1", self.port).start())
        self.started.set()
        self.loop.run_forever()

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(60)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(30)


def viewed(urls: set[str]) -> set[str]:
    """The image files among the editor's ``/api/view`` requests."""
    return {parse_qs(urlsplit(url).query)["filename"][0] for url in urls}


@pytest.fixture(scope="module")
def editor(tmp_path_factory):
    browser = system_chromium()
    if browser is None:
        pytest.skip("no Chromium on this machine (apt-get install chromium; .ci/run installs it)")
    try:
        static = frontend.static_root()
    except frontend.FrontendError as exc:
        pytest.skip(str(exc))
    root = tmp_path_factory.mktemp("editor")
    server = Server(make_config(root, static_root=static))
    # the whole graph fits the screenshot at about half size: draw its text there too (the editor stops at 0.6)
    server.users.update_settings({"LiteGraph.Canvas.LowQualityRenderingZoomThreshold": 0.3})
    server = ServerThread(server)
    yield browser, f"http://127.0.0.1:{server.port}/", root
    server.stop()


def quickstart_counts() -> tuple[int, int]:
    """How many Sample and SaveImages nodes the quickstart example has (each SaveImages saves one image)."""
    nodes = load_workflow(QUICKSTART).nodes.values()
    return sum(n.type == "Sample" for n in nodes), sum(n.type == "SaveImages" for n in nodes)


def test_the_editor_opens_the_quickstart_finds_our_nodes_and_runs_it(editor, tmp_path):
    browser, url, root = editor
    samples, saved_images = quickstart_counts()
    problems: list[str] = []
    images: set[str] = set()
    with playwright_api.sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(tmp_path / "profile"), executable_path=browser, headless=True, args=CHROMIUM_ARGS,
            viewport={"width": 1600, "height": 1000})
        try:
            page = context.new_page()
            page.on("console", lambda m: problems.append(f"console: {m.text}") if m.type == "error" else None)
            page.on("pageerror", lambda error: problems.append(f"page error: {error}"))
            page.on("response", lambda r: images.add(r.url) if "/api/view?" in r.url and r.ok else None)
            page.goto(url)
            # the editor opens with our quickstart graph
            page.wait_for_function("() => window.comfyAPI?.app?.app?.graph?._nodes?.length >= 10", timeout=90_000)
            types = page.evaluate("() => window.comfyAPI.app.app.graph._nodes.map(n => n.type)")
            assert types.count("lora-nodes.Sample") == samples and "lora-nodes.LoadLoRA" in types

            # our nodes are in the node library, under our category
            page.get_by_role("button", name="Node Library (n)").click()
            page.get_by_placeholder("Search Nodes...").fill("LoRA")
            for name in ("lora-nodes", "Apply LoRA", "Merge LoRAs", "Train LoRA"):
                page.get_by_text(name, exact=True).first.wait_for(timeout=10_000)
            page.get_by_role("button", name="Node Library (n)").click()

            # queue it (fewer steps per image) and see its images load on their nodes
            changed = page.evaluate("""() => { let n = 0; const STEPS = """ + str(STEPS) + """;
                for (const node of window.comfyAPI.app.app.graph._nodes)
                    if (node.type === 'lora-nodes.Sample') { node.widgets.find(w => w.name === 'steps').value = STEPS; n++ }
                return n }""")
            assert changed == samples
            page.get_by_role("button", name="Fit View (.)").click()
            page.get_by_role("button", name="Run").first.click()
            page.wait_for_function(f"() => Object.values(window.comfyAPI.app.app.nodeOutputs)"
                                   f".filter(o => o.images?.length).length >= {saved_images}", timeout=240_000)
            for _ in range(60):  # the previews load as the canvas draws their nodes
                if len(viewed(images)) >= saved_images:
                    break
                page.wait_for_timeout(500)
            if DOCS:  # the saved images, large enough to see
                page.evaluate("""() => { const app = window.comfyAPI.app.app;
                    // the image grid and its saved picture where the graph has one, else every saved image
                    const grids = app.graph._nodes.filter(n => n.type === 'lora-nodes.Grid');
                    const fed = grids.flatMap(g => (g.outputs[0].links ?? []).map(l => app.graph.links[l].target_id));
                    const saves = grids.length ? [...grids, ...fed.map(id => app.graph.getNodeById(id))]
                        : app.graph._nodes.filter(n => n.type === 'lora-nodes.SaveImages');
                    const x = Math.min(...saves.map(n => n.pos[0])), y = Math.min(...saves.map(n => n.pos[1] - 30));
                    const right = Math.max(...saves.map(n => n.pos[0] + n.size[0]));
                    const bottom = Math.max(...saves.map(n => n.pos[1] + n.size[1]));
                    app.canvas.ds.fitToBounds([x - 20, y - 20, right - x + 40, bottom - y + 40], {zoom: 0.9});
                    app.canvas.setDirty(true, true) }""")
            page.wait_for_timeout(1000)  # and are drawn
            shot = tmp_path / "editor.png"
            page.screenshot(path=str(shot))

            # the graph as the editor saves it runs headless (checked here with `validate`)
            saved = tmp_path / "saved.json"
            saved.write_text(page.evaluate("() => JSON.stringify(window.comfyAPI.app.app.graph.serialize())"))
            # a PNG the engine wrote, dropped onto an emptied editor, opens its graph
            png = urlsplit(min(images))
            dropped = page.evaluate("""async (url) => { const app = window.comfyAPI.app.app; app.graph.clear();
                const blob = await (await fetch(url)).blob();
                await app.handleFile(new File([blob], 'image.png', {type: 'image/png'}));
                return app.graph._nodes.map(n => n.type) }""", f"{png.path}?{png.query}")
            assert sorted(dropped) == sorted(types)
        finally:
            context.close()
    assert problems == []
    assert len(viewed(images)) == saved_images, images
    assert len(list((root / "out").rglob("*.png"))) == saved_images
    assert shot.stat().st_size > 10_000
    assert cli_main(["validate", str(saved), "--models-dir", str(REPO / "workflows")]) == 0
    if DOCS:
        shutil.copyfile(shot, REPO / "docs" / "editor.png")
