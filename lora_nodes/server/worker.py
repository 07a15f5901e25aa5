"""The queue: prompts run one at a time in one worker thread, never in a request handler.

One :class:`~lora_nodes.engine.scheduler.Runner` serves every prompt, so its memory cache persists
between them: queueing the same graph with one strength changed re-runs only what that touched. A
prompt that fails (a node's error, a file gone since validation) is recorded and the next one runs.
Run events become ComfyUI's WebSocket messages, sent to every connected client.

Memory: the waiting prompts are bounded (:data:`MAX_PENDING`). Every result a prompt produced stays
in the engine's memory cache while memory lasts: after each prompt, while less than
:func:`memory_short`'s margin is free (in RAM, or on the GPU the models use), the results the least
recent earlier prompt used go first, then the next; the last prompt's stay. ``POST /api/free``
(the editor's "free memory" / "unload models") drops them all.
"""

from __future__ import annotations

import gc
import heapq
import itertools
import logging
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..engine.events import Event
from ..engine.scheduler import RunFailed, Runner
from ..graph import Workflow, WorkflowError
from ..modelfolders import ModelFolders, using_folders
from .storage import History, history_item

log = logging.getLogger("lora_nodes.server")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
Send = Callable[[str, dict[str, Any]], None]  # (message type, data) to every connected client
MAX_PENDING = 1000  # prompts waiting at once; past this a client is asked to wait (each holds its graph)
# memory to keep free between prompts, as a share of the machine's (or the GPU's) and at least a few GiB:
# room for the next prompt's model and its work, which the results of old prompts must not take
FREE_SHARE, FREE_AT_LEAST = 0.25, 3 * 2**30


def memory_short() -> bool:
    """Whether RAM, or the memory of a CUDA GPU, has less free than the margin the next prompt needs
    (:data:`FREE_SHARE` of it, at least :data:`FREE_AT_LEAST`); False where that cannot be known."""
    import torch

    from ..models.memory import free_memory, total_memory

    # the GPU only once this process has used it: asking an unused one would start a CUDA context
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_initialized() else [])
    return any(_short(free_memory(device), total_memory(device)) for device in devices)


def _short(free: int | None, total: int | None) -> bool:
    if free is None or total is None:
        return False
    return free < min(max(FREE_AT_LEAST, total * FREE_SHARE), total / 2)


class PromptRefused(Exception):
    """A prompt the queue does not take (its id is in use, or the queue is full); the message says why."""


class DuplicatePrompt(PromptRefused):
    """A prompt whose id is already queued, running or in the history."""


class QueueFull(PromptRefused):
    """The queue holds :data:`MAX_PENDING` waiting prompts already."""


class Interrupted(Exception):
    """Raised from the event sink once the user interrupted: the running node stops at its next step."""


@dataclass(order=True)
class QueuedPrompt:
    """One prompt waiting or running: ComfyUI's queue entry ``[number, prompt_id, prompt, extra_data, outputs]``."""

    number: float
    prompt_id: str = field(compare=False)
    prompt: dict[str, Any] = field(compare=False)
    extra_data: dict[str, Any] = field(compare=False)
    outputs: list[str] = field(compare=False)
    workflow: Workflow = field(compare=False, repr=False)

    def entry(self) -> list[Any]:
        return [self.number, self.prompt_id, self.prompt, self.extra_data, self.outputs]


def now_ms() -> int:
    return int(time.time() * 1000)


class PromptQueue:
    """Waiting prompts by number, the one running, and the worker thread that runs them."""

    def __init__(self, runner_factory: Callable[[Callable[[Event], None]], Runner], history: History,
                 folders: ModelFolders, output_dir: Path, send: Send):
        self.history = history
        self.folders = folders
        self.output_dir = Path(output_dir).resolve()
        self.send = send
        self._runner_factory = runner_factory
        self._runner: Runner | None = None
        self._waiting: list[QueuedPrompt] = []
        self._running: QueuedPrompt | None = None
        self._cond = threading.Condition()
        self._numbers = itertools.count()
        self._interrupt = threading.Event()
        self._free = False
        self._stop = False
        self.memory_short = memory_short  # after each prompt: whether to forget the oldest results
        self.pending_limit = MAX_PENDING
        self._thread = threading.Thread(target=self._work, name="lora-nodes-queue", daemon=True)

    # ------------------------------------------------------------------ from request handlers

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop after the running prompt (interrupted); waiting prompts are dropped."""
        with self._cond:
            self._stop = True
            self._waiting.clear()
            self._cond.notify_all()
        self._interrupt.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def next_number(self, front: bool = False) -> float:
        number = next(self._numbers)
        return -number if front else number

    def put(self, item: QueuedPrompt) -> None:
        """Queue a prompt; :class:`DuplicatePrompt` or :class:`QueueFull` when it is not taken.

        The id is checked under the queue's lock: a prompt moves from running to the history before
        it stops being the running one, so an id is always found in one of the three.
        """
        with self._cond:
            if (any(waiting.prompt_id == item.prompt_id for waiting in self._waiting)
                    or (self._running is not None and self._running.prompt_id == item.prompt_id)
                    or item.prompt_id in self.history):
                raise DuplicatePrompt(f"prompt_id {item.prompt_id!r} is already queued, running or in the history")
            if len(self._waiting) >= self.pending_limit:
                raise QueueFull(f"the queue holds {len(self._waiting)} prompts already: wait for some to finish "
                                "and queue again")
            heapq.heappush(self._waiting, item)
            self._cond.notify_all()
        self.send_status()

    def remaining(self) -> int:
        with self._cond:
            return len(self._waiting) + (self._running is not None)

    def status(self) -> dict[str, Any]:
        return {"exec_info": {"queue_remaining": self.remaining()}}

    def send_status(self) -> None:
        self.send("status", {"status": self.status()})

    def listing(self) -> dict[str, Any]:
        """``/queue``: the running prompt and those waiting, in order, as ComfyUI lists them."""
        with self._cond:
            running = [self._running.entry()] if self._running is not None else []
            pending = [item.entry() for item in sorted(self._waiting)]
        return {"queue_running": running, "queue_pending": pending}

    def delete(self, prompt_ids: list[Any]) -> None:
        with self._cond:
            self._waiting = [item for item in self._waiting if item.prompt_id not in prompt_ids]
            heapq.heapify(self._waiting)
        self.send_status()

    def clear(self) -> None:
        with self._cond:
            self._waiting.clear()
        self.send_status()

    def interrupt(self, prompt_id: str | None = None) -> bool:
        """Stop the running prompt (only that one when ``prompt_id`` is given); False when none matched."""
        with self._cond:  # in one block: the worker may not start the next prompt between the check and the flag
            running = self._running
            if running is None or (prompt_id and running.prompt_id != prompt_id):
                return False
            self._interrupt.set()
            return True

    def free(self) -> None:
        """Drop the engine's memory cache (the loaded bases and every kept result) after the running prompt."""
        with self._cond:
            self._free = True
            self._cond.notify_all()

    def wait_idle(self, timeout: float) -> bool:
        """Wait until nothing is waiting or running (tests, benchmarks); False on timeout."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._waiting or self._running is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(min(left, 0.1))
        return True

    # ------------------------------------------------------------------ the worker thread

    def _take(self) -> QueuedPrompt | None:
        with self._cond:
            while not self._waiting and not self._stop:
                if self._free:
                    self._free_now()
                self._cond.wait(0.5)
            if self._stop:
                return None
            self._running = heapq.heappop(self._waiting)
            self._interrupt.clear()
            return self._running

    def _free_now(self) -> None:
        self._runner, self._free = None, False
        gc.collect()
        self._empty_gpu_cache()

    @staticmethod
    def _empty_gpu_cache() -> None:
        """Give the GPU memory PyTorch holds unused back to the driver (other programs see it free)."""
        try:
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        except ImportError:  # pragma: no cover - torch is a dependency
            pass

    def _forget_while_memory_is_short(self) -> None:
        """The least recent prompts' results go, one prompt's at a time, until enough memory is free or
        only the last prompt's are left."""
        forgot = False
        while self._runner is not None and self.memory_short() and self._runner.forget_oldest_results():
            gc.collect()  # a model's weights go now, not at some later collection
            forgot = True
        if forgot:
            self._empty_gpu_cache()

    def _work(self) -> None:
        while (item := self._take()) is not None:
            self.send_status()
            try:
                self._run(item)
            except Exception:
                log.exception("prompt %s failed outside any node", item.prompt_id)
            finally:
                if not self._free:  # outside the lock: collecting can take a while, and handlers wait on it
                    self._forget_while_memory_is_short()
                with self._cond:
                    self._running = None
                    if self._free:
                        self._free_now()
                    self._cond.notify_all()
                self.send_status()  # then the prompt's last message, as ComfyUI orders them
                self.send("executing", {"node": None, "prompt_id": item.prompt_id})

    def _run(self, item: QueuedPrompt) -> None:
        run = PromptRun(item, self.output_dir, self.send, self._interrupt)
        self.history.running(item.entry())
        if self._runner is None:
            self._runner = self._runner_factory(run)
        self._runner.emit = run
        run.message("execution_start", {})
        try:
            with using_folders(self.folders):
                self._runner.run(item.workflow)
            run.message("execution_success", {})
            status = "success"
        except Interrupted:  # between nodes: raised from the next node's "executing" event
            run.interrupted(None)
            status = "error"
        except RunFailed as exc:
            if self._interrupt.is_set() or _caused_by(exc, Interrupted):
                run.interrupted(exc)
            else:
                run.failed(exc.node, exc.node_type, exc.message, exc.__cause__)
            status = "error"
        except WorkflowError as exc:  # a file changed or vanished between queueing and running
            run.failed(None, None, str(exc), None)
            status = "error"
        except Exception as exc:  # noqa: BLE001 - an engine bug: report it, keep the queue going
            run.failed(None, None, f"{type(exc).__name__}: {exc}", exc)
            status = "error"
        finally:
            self._runner.emit = _ignore
        self.history.add(item.prompt_id, history_item(item.entry(), run.outputs, status, run.messages))


def _ignore(_: Event) -> None:
    pass


def _caused_by(exc: BaseException, kind: type[BaseException]) -> bool:
    """Whether ``kind`` is somewhere in ``exc``'s chain of causes (a node may wrap what it caught)."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, kind):
            return True
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return False


class PromptRun:
    """The event sink of one prompt's run: run events to ComfyUI's messages, and what its history keeps."""

    def __init__(self, item: QueuedPrompt, output_dir: Path, send: Send, interrupt: threading.Event):
        self.item = item
        self.output_dir = output_dir
        self.send = send
        self.interrupt = interrupt
        self.outputs: dict[str, dict[str, Any]] = {}
        self.messages: list[list[Any]] = []
        self.executed: list[str] = []
        self.current: tuple[str | None, str | None] = (None, None)

    def message(self, kind: str, data: dict[str, Any], keep: bool = True) -> None:
        data = {**data, "prompt_id": self.item.prompt_id}
        if keep:  # ComfyUI's history keeps the execution_* messages with a timestamp
            data["timestamp"] = now_ms()
            self.messages.append([kind, data])
        self.send(kind, data)

    def __call__(self, ev: Event) -> None:
        kind = ev["event"]
        if kind == "executing":  # first: an interrupt raised here names this node, not the one before
            self.current = (ev["node"], ev["type"])
        if kind in ("progress", "executing") and self.interrupt.is_set():
            raise Interrupted()
        if kind == "executing":
            self.message("executing", {"node": ev["node"], "display_node": ev["node"]}, keep=False)
        elif kind == "progress":
            self.message("progress", {"node": ev["node"], "value": ev["value"], "max": ev["max"]}, keep=False)
        elif kind == "cached":
            self.executed.append(ev["node"])
            self.message("execution_cached", {"nodes": [ev["node"]]})
            self._images(ev["node"], ev.get("files") or [])
        elif kind == "executed":
            self.executed.append(ev["node"])
            self._images(ev["node"], ev.get("files") or [])
        elif kind in ("warning", "info"):
            log.info("%s %s (%s): %s", kind, ev.get("node"), ev.get("type"), ev.get("message"))

    def _images(self, node: str, files: list[str]) -> None:
        """Send a node's images as ComfyUI's ``executed`` message (the editor shows them on the node)."""
        images = [image for file in files if (image := self.image_ref(Path(file))) is not None]
        if not images:
            return
        self.outputs[node] = {"images": images}
        self.message("executed", {"node": node, "display_node": node, "output": {"images": images}}, keep=False)

    def image_ref(self, path: Path) -> dict[str, str] | None:
        """``{"filename", "subfolder", "type": "output"}`` of an image in the output folder, else None."""
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            return None
        try:
            relative = path.resolve().relative_to(self.output_dir)
        except ValueError:
            return None
        subfolder = relative.parent.as_posix()
        return {"filename": relative.name, "subfolder": "" if subfolder == "." else subfolder, "type": "output"}

    def interrupted(self, exc: RunFailed | None) -> None:
        node, node_type = (exc.node, exc.node_type) if exc is not None else self.current
        self.message("execution_interrupted", {"node_id": node, "node_type": _comfy_type(self.item, node, node_type),
                                               "executed": list(self.executed)})

    def failed(self, node: str | None, node_type: str | None, message: str, cause: BaseException | None) -> None:
        lines = traceback.format_exception(cause) if cause is not None else []
        self.message("execution_error", {
            "node_id": node, "node_type": _comfy_type(self.item, node, node_type), "executed": list(self.executed),
            "exception_message": message, "exception_type": type(cause).__name__ if cause else "WorkflowError",
            "traceback": lines[-20:], "current_inputs": {}, "current_outputs": list(self.executed)})


def _comfy_type(item: QueuedPrompt, node: str | None, fallback: str | None) -> str | None:
    """A node's type as the prompt spelled it (``lora-nodes.Sample``), which the editor matches against."""
    body = item.prompt.get(node) if node is not None else None
    return body.get("class_type", fallback) if isinstance(body, dict) else fallback
