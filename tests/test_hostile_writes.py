"""Writing under pressure: a full disk loses nothing and says so, writers at the same moment never
overwrite each other, one training is never run twice at once, and killed writers leave nothing behind.

A full disk is a real small tmpfs where this runs as root and ``mount`` works; elsewhere the
writers are made to fail as a full disk makes them fail (the same exceptions and messages).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import EXAMPLE_LORA, REPO, WORKFLOWS, write_workflow
from PIL import Image
from safetensors import SafetensorError
from safetensors.torch import load_file

from lora_nodes import fileio
from lora_nodes.engine.context import NodeContext
from lora_nodes.engine.events import Collector
from lora_nodes.engine.scheduler import RunFailed, Runner
from lora_nodes.errors import NodeError
from lora_nodes.fileio import is_our_temporary, temporary_name
from lora_nodes.graph import load_workflow
from lora_nodes.nodes.images import save_images
from lora_nodes.training import checkpoint
from lora_nodes.training.checkpoint import checkpoints, load_latest, save_checkpoint

STARS = WORKFLOWS / "datasets" / "purple_star"
FULL = "the disk is full (errno 28, No space left on device)"
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These tests are about files, not speed: one torch thread keeps their few training steps quick
    on a busy machine (two contending threads made each step take seconds there)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --------------------------------------------------------------------------- a disk that fills up


def _mount_tmpfs(folder: Path, size: str) -> bool:
    if sys.platform != "linux" or os.geteuid() != 0:
        return False
    try:
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                              check=False, capture_output=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0


class FullDisk:
    """A folder whose disk can be filled: a real tmpfs where one can be mounted, else the writers
    (safetensors, torch.save) patched to fail under it exactly as they do on a full disk."""

    def __init__(self, folder: Path, monkeypatch: pytest.MonkeyPatch):
        self.folder = folder
        folder.mkdir(parents=True)
        self.real = _mount_tmpfs(folder, "4m")
        self.full = False
        if not self.real:
            self._inject(monkeypatch)

    def fill(self) -> None:
        self.full = True
        if self.real:
            with open(self.folder / "filler", "wb", buffering=0) as filler:  # unbuffered: nothing left to flush
                try:
                    while True:
                        filler.write(b"\0" * 65536)
                except OSError as exc:
                    assert exc.errno == errno.ENOSPC

    def free(self) -> None:
        self.full = False
        (self.folder / "filler").unlink(missing_ok=True)

    def close(self) -> None:
        if self.real:
            subprocess.run(["umount", "-l", str(self.folder)], check=False, timeout=10)

    def _under(self, path) -> bool:
        return self.full and Path(path).resolve().is_relative_to(self.folder.resolve())

    def _inject(self, monkeypatch: pytest.MonkeyPatch) -> None:
        import safetensors.torch

        real_save, real_write = safetensors.torch.save_file, checkpoint._write

        def save_file(tensors, filename, metadata=None):
            if self._under(filename):
                Path(filename).write_bytes(b"partial")
                raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
            return real_save(tensors, filename, metadata=metadata)

        def write_checkpoint(state, tmp):
            if not self._under(tmp):
                return real_write(state, tmp)
            tmp.write_bytes(b"partial")
            try:  # torch.save through a file object: the OSError becomes the context of its RuntimeError
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            except OSError:
                raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 305216 vs 305104")

        monkeypatch.setattr(safetensors.torch, "save_file", save_file)  # TrainLoRA imports it when it saves
        monkeypatch.setattr(checkpoint, "_write", write_checkpoint)


@pytest.fixture
def full_disk(tmp_path, monkeypatch):
    disk = FullDisk(tmp_path / "small-disk", monkeypatch)
    yield disk
    disk.close()


def temporaries(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if is_our_temporary(p.name)]


@pytest.fixture(scope="module")
def stars(tmp_path_factory) -> Path:
    """Two of the purple stars: enough to train on, few to encode."""
    folder = tmp_path_factory.mktemp("stars")
    for name in ("star_01.png", "star_01.txt", "star_02.png", "star_02.txt"):
        shutil.copy(STARS / name, folder / name)
    return folder


def training_workflow(folder: Path, dataset: Path, steps: int, save_every: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    return write_workflow(folder, f"""
nodes:
  base:  {{type: LoadBase, inputs: {{source: "builtin:tiny", device: cpu}}}}
  data:  {{type: LoadDataset, inputs: {{path: {dataset}}}}}
  train: {{type: TrainLoRA, inputs: {{model: [base, model], dataset: [data, dataset], steps: {steps}, batch_size: 1,
          rank: 4, alpha: 4, learning_rate: 0.001, save_every_n_steps: {save_every}}}}}
  save:  {{type: SaveLoRA, inputs: {{lora: [train, lora], path: trained.safetensors}}}}
""")


def messages(events: Collector, kind: str, node: str = "train") -> list[str]:
    return [e["message"] for e in events.of(kind) if e.get("node") == node]


# --------------------------------------------------------------------------- a full disk


def test_a_full_cache_disk_keeps_the_trained_lora_and_the_next_run_resumes(tmp_path, full_disk, stars):
    """The cache disk fills after the checkpoint at step 2: the checkpoint at step 4 and the stored
    result fail with warnings in words, SaveLoRA still writes the LoRA, the step-2 checkpoint is
    kept, and with room again a new run resumes from it to the same LoRA."""
    workflow = load_workflow(training_workflow(tmp_path, stars, steps=5, save_every=2))
    events = Collector()

    def sink(ev: dict) -> None:
        events(ev)
        if ev["event"] == "progress" and ev["node"] == "train" and ev["value"] == 3:
            full_disk.fill()

    Runner(output_dir=tmp_path / "out", cache_dir=full_disk.folder, emit=sink).run(workflow)
    warnings = messages(events, "warning")
    assert any(m.startswith("could not write the checkpoint to ") and "step_000004.pt: " + FULL in m
               and "resumes from the checkpoint at step 2" in m for m in warnings), warnings
    stored = next(e for e in events.of("warning") if e["message"].startswith("could not write the disk cache"))
    assert stored["node"] == "train" and FULL in stored["message"]
    assert stored["folder"] in stored["message"] and Path(stored["folder"]).is_relative_to(full_disk.folder)
    first = load_file(tmp_path / "out" / "trained.safetensors")  # SaveLoRA wrote the LoRA kept in memory
    kept = full_disk.folder / "checkpoints" / "TrainLoRA"
    assert [step for step, _ in checkpoints(next(kept.iterdir()))] == [2]
    assert temporaries(full_disk.folder) == []
    assert not (full_disk.folder / "results" / "TrainLoRA").exists() or \
        not any((full_disk.folder / "results" / "TrainLoRA").iterdir())

    full_disk.free()
    again = Collector()
    Runner(output_dir=tmp_path / "out2", cache_dir=full_disk.folder, emit=again).run(workflow)
    assert "resumed from the checkpoint at step 2 of 5" in messages(again, "info")
    assert [e["value"] for e in again.of("progress") if e["node"] == "train"] == [3, 4, 5]
    assert again.of("warning") == []
    second = load_file(tmp_path / "out2" / "trained.safetensors")
    assert max((first[k] - second[k]).abs().max().item() for k in first) <= 1e-5
    assert not kept.exists() or not any(kept.iterdir())  # stored at last: the checkpoints go


def test_a_full_disk_while_checkpointing_says_so_and_keeps_the_previous_checkpoint(full_disk):
    folder = full_disk.folder / "checkpoints"
    state = {"step": 3, "weights": torch.arange(1000.0)}
    save_checkpoint(folder, 3, state)
    full_disk.fill()
    with pytest.raises(NodeError) as failure:
        save_checkpoint(folder, 6, {"step": 6, "weights": torch.zeros(100_000)})
    assert str(failure.value) == (f"could not write the checkpoint to {folder / 'step_000006.pt'}: {FULL}; "
                                  "a new run resumes from the checkpoint at step 3")
    reported: list[str] = []
    assert save_checkpoint(folder, 9, {"step": 9, "weights": torch.zeros(100_000)}, reported.append) is None
    assert reported == [(f"could not write the checkpoint to {folder / 'step_000009.pt'}: {FULL}; "
                         "training goes on, and if stopped it resumes from the checkpoint at step 3")]
    step, loaded = load_latest(folder)
    assert step == 3 and torch.equal(loaded["weights"], state["weights"])
    assert [p.name for p in folder.iterdir()] == ["step_000003.pt"]  # no partial file left


def test_a_full_output_disk_fails_the_saving_node_in_words_and_leaves_nothing(tmp_path, full_disk):
    workflow = write_workflow(tmp_path, f"""
nodes:
  lora: {{type: LoadLoRA, inputs: {{path: {EXAMPLE_LORA}}}}}
  save: {{type: SaveLoRA, inputs: {{lora: [lora, lora], path: style.safetensors}}}}
""")
    full_disk.fill()
    with pytest.raises(RunFailed) as failure:
        Runner(output_dir=full_disk.folder, cache_dir=tmp_path / "cache").run(load_workflow(workflow))
    assert failure.value.node == "save"
    assert failure.value.message == f"could not write {full_disk.folder / 'style.safetensors'}: {FULL}"
    if full_disk.real:  # PNGs are written by PIL, which only a real full disk makes fail
        ctx = NodeContext("images", "SaveImages", full_disk.folder, tmp_path / "cache", lambda ev: None)
        with pytest.raises(NodeError, match=r"could not write .*x_00001\.png: the disk is full"):
            save_images.run(ctx, torch.rand(1, 64, 64, 3), "x")
    assert sorted(p.name for p in full_disk.folder.iterdir()) == (["filler"] if full_disk.real else [])


def test_write_failures_are_told_in_words():
    assert fileio.describe_write_failure(OSError(errno.EDQUOT, "Disk quota exceeded")).startswith(
        "the disk quota is exceeded")
    assert fileio.describe_write_failure(OSError(errno.EROFS, "x")).startswith("the file system is read-only")
    assert fileio.describe_write_failure(PermissionError(errno.EACCES, "x")).startswith("permission denied")
    rust = SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
    assert fileio.describe_write_failure(rust) == FULL
    assert fileio.describe_write_failure(ValueError("not a disk problem")) is None


# --------------------------------------------------------------------------- writers at the same moment


def coded_images(writer: int, count: int = 4) -> torch.Tensor:
    """Images whose grey level says who wrote them and which one they are."""
    return torch.stack([torch.full((16, 16, 3), (writer * count + i + 1) * 20 / 255) for i in range(count)])


def code_of(path: Path) -> int:
    return int(np.asarray(Image.open(path))[0, 0, 0]) // 20 - 1


def assert_every_image_kept(folder: Path, files_by_writer: dict[int, list[str]], count: int = 4) -> None:
    reported = [f for files in files_by_writer.values() for f in files]
    assert len(reported) == len(set(reported)) == count * len(files_by_writer)
    assert sorted(p.name for p in folder.glob("*.png")) == sorted(Path(f).name for f in reported)
    for writer, files in files_by_writer.items():
        assert sorted(code_of(Path(f)) for f in files) == [writer * count + i for i in range(count)]
    assert temporaries(folder) == []


def test_two_threads_saving_images_with_one_prefix_never_overwrite(tmp_path):
    for round_ in range(3):  # a few rounds: the start barrier makes them collide on most
        out = tmp_path / f"round{round_}"
        barrier = threading.Barrier(2)
        files: dict[int, list[str]] = {}

        def write(writer: int, out: Path = out, barrier: threading.Barrier = barrier, files: dict = files) -> None:
            ctx = NodeContext("save", "SaveImages", out, out / "cache", lambda ev: None)
            images = coded_images(writer)
            barrier.wait()
            save_images.run(ctx, images, "race")
            files[writer] = ctx.files

        threads = [threading.Thread(target=write, args=(w,)) for w in (0, 1)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
        assert_every_image_kept(out, files)


RACE = """
import json, sys, time
from pathlib import Path
import torch
from lora_nodes.engine.context import NodeContext
from lora_nodes.nodes.images import save_images
out, go, writer = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
images = torch.stack([torch.full((16, 16, 3), (writer * 4 + i + 1) * 20 / 255) for i in range(4)])
ctx = NodeContext("save", "SaveImages", out, out / "cache", lambda ev: None)
print("ready", flush=True)
while not go.exists():
    time.sleep(0.001)
save_images.run(ctx, images, "race")
print(json.dumps(ctx.files), flush=True)
"""


def test_two_processes_saving_images_with_one_prefix_never_overwrite(tmp_path):
    out, go = tmp_path / "out", tmp_path / "go"
    writers = [subprocess.Popen([sys.executable, "-c", RACE, str(out), str(go), str(w)], cwd=REPO, env=ENV,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for w in (0, 1)]
    for proc in writers:
        assert proc.stdout.readline().strip() == "ready", proc.stderr.read()
    go.touch()
    files = {}
    for writer, proc in enumerate(writers):
        stdout, stderr = proc.communicate(timeout=60)
        assert proc.returncode == 0, stderr
        files[writer] = json.loads(stdout)
    assert_every_image_kept(out, files)


def test_non_finite_images_are_written_with_a_warning(tmp_path):
    events = Collector()
    ctx = NodeContext("save", "SaveImages", tmp_path, tmp_path / "cache", events)
    images = torch.full((3, 8, 8, 3), 0.5)
    images[1, 0, 0] = float("nan")
    images[2, 1, 1] = float("inf")
    save_images.run(ctx, images, "odd")
    assert len(ctx.files) == 3
    [warning] = events.of("warning")
    assert warning["node"] == "save" and warning["message"].startswith("2 of 3 images have non-finite pixel values")
    assert tuple(np.asarray(Image.open(ctx.files[1]))[0, 0]) == (0, 0, 0)  # NaN shows as black


# --------------------------------------------------------------------------- one training at a time


HOLD_LOCK = """
import sys, time
from pathlib import Path
from lora_nodes.fileio import exclusive_lock
with exclusive_lock(Path(sys.argv[1])):
    print("locked", flush=True)
    time.sleep(120)
"""


def test_a_second_run_of_the_same_training_waits_and_takes_its_result_and_a_killed_holder_is_taken_over(
        tmp_path, stars):
    workflow = load_workflow(training_workflow(tmp_path, stars, steps=2, save_every=0))
    cache = tmp_path / "cache"
    first_events, second_events = Collector(), Collector()
    first_training, second_waiting = threading.Event(), threading.Event()
    failures: list[BaseException] = []

    def first_sink(ev: dict) -> None:
        first_events(ev)
        if ev["event"] == "progress" and ev["node"] == "train" and ev["value"] == 1:
            first_training.set()
            second_waiting.wait(60)  # keep training (and the lock) until the second run is waiting for it

    def second_sink(ev: dict) -> None:
        second_events(ev)
        if ev["event"] == "info" and ev["node"] == "train" and "waiting for it to finish" in ev["message"]:
            second_waiting.set()

    def run_first() -> None:
        try:
            Runner(output_dir=tmp_path / "out1", cache_dir=cache, emit=first_sink).run(workflow)
        except BaseException as exc:  # noqa: BLE001 - reported by the test below
            failures.append(exc)
            first_training.set()

    first = threading.Thread(target=run_first)
    first.start()
    assert first_training.wait(120)
    Runner(output_dir=tmp_path / "out2", cache_dir=cache, emit=second_sink).run(workflow)
    first.join(timeout=120)
    assert failures == []
    [waiting] = messages(second_events, "info")
    assert waiting.startswith("another process is running TrainLoRA with these same inputs; waiting")
    assert [(e["node"], e["cache"]) for e in second_events.of("cached") if e["node"] == "train"] == [("train", "disk")]
    assert "train" not in [e["node"] for e in second_events.of("executing")]
    a, b = load_file(tmp_path / "out1" / "trained.safetensors"), load_file(tmp_path / "out2" / "trained.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)

    # a holder killed with SIGKILL runs no cleanup: the kernel frees its lock, the next run says so
    [lock] = (cache / "locks" / "TrainLoRA").glob("*.lock")
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(lock)], cwd=REPO, env=ENV, text=True,
                              stdout=subprocess.PIPE)
    assert holder.stdout.readline().strip() == "locked"
    holder.send_signal(signal.SIGKILL)
    holder.wait(timeout=30)
    third = Collector()
    started = time.perf_counter()
    Runner(output_dir=tmp_path / "out3", cache_dir=cache, emit=third).run(workflow)
    assert time.perf_counter() - started < 30
    [taken_over] = messages(third, "info")
    assert taken_over.startswith(f"taking over from process {holder.pid} on ")
    assert [e["cache"] for e in third.of("cached") if e["node"] == "train"] == ["disk"]


# --------------------------------------------------------------------------- no leftovers


KILLED_WRITER = """
import sys, time
from pathlib import Path
from lora_nodes.fileio import atomic_write

def write(tmp):
    tmp.write_bytes(b"half a model" * 1000)
    print("writing", flush=True)
    time.sleep(120)

atomic_write(Path(sys.argv[1]), write)
"""


def test_a_killed_writers_temporaries_are_removed_by_the_next_write_and_nothing_else(tmp_path):
    out = tmp_path / "out"
    killed = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(out / "model.safetensors")], cwd=REPO,
                              env=ENV, stdout=subprocess.PIPE, text=True)
    assert killed.stdout.readline().strip() == "writing"
    killed.send_signal(signal.SIGKILL)
    killed.wait(timeout=30)
    [left] = temporaries(out)
    assert left.name.startswith(".model.safetensors.lntmp-") and f"-{killed.pid}-" in left.name
    host = temporary_name("x")[len(".x.lntmp-"):].rsplit("-", 2)[0]
    dead = killed.pid
    live = subprocess.Popen(["sleep", "60"])
    try:
        stale_folder = out / f".merged.lntmp-{host}-{dead}-0123abcd"  # a SaveModel folder
        (stale_folder / "unet").mkdir(parents=True)
        (stale_folder / "unet" / "weights.safetensors").write_bytes(b"x")
        aside = out / f".model_b.lntmp-{host}-{dead}-0badcafe.old"  # an overwrite killed between its renames
        aside.mkdir()
        (aside / "model_index.json").write_text("{}")
        old_foreign_host = out / f".c.png.lntmp-otherhost-{dead}-89abcdef"
        kept = {
            f".a.png.lntmp-{host}-{live.pid}-0123abcd": "a live writer's",
            f".b.png.lntmp-otherhost-{dead}-0123abcd": "another machine's, recent",
            ".d.png.tmp": "not ours", ".e.lntmp-notes": "not ours", "notes.lntmp-x-1-0123abcd": "not ours",
            "f.png": "a user's file",
        }
        for name in kept:
            (out / name).write_text("keep")
        old_foreign_host.write_text("old")
        two_days_ago = time.time() - 2 * 24 * 3600
        os.utime(old_foreign_host, (two_days_ago, two_days_ago))
        link = out / f".g.png.lntmp-{host}-{dead}-0123abcd"
        link.symlink_to(out / "f.png")

        ctx = NodeContext("save", "SaveImages", out, tmp_path / "cache", lambda ev: None)
        save_images.run(ctx, torch.rand(1, 8, 8, 3), "next")
    finally:
        live.kill()
        live.wait()
    names = {p.name for p in out.iterdir()}
    assert names == {*kept, link.name, "model_b", "next_00001.png"}
    assert (out / "model_b" / "model_index.json").is_file()  # put back, not deleted
    assert all((out / name).read_text() == "keep" for name in kept)


def test_a_folder_another_writer_stores_in_between_is_not_overwritten(tmp_path, monkeypatch):
    """Two processes storing the same result without a lock: the one that renames second sees the
    other's folder (the rename fails with ENOTEMPTY) and gets FileExistsError; the first one's stays."""
    target = tmp_path / "entry"
    real_replace = os.replace

    def replace_after_another_writer(src, dst):
        if Path(dst) == target and not target.exists():
            target.mkdir()
            (target / "theirs").write_text("stored first")
        return real_replace(src, dst)

    monkeypatch.setattr(fileio.os, "replace", replace_after_another_writer)
    with pytest.raises(FileExistsError):
        fileio.atomic_folder(target, lambda tmp: (tmp / "ours").write_text("late"), overwrite=lambda p: False)
    assert sorted(p.name for p in target.iterdir()) == ["theirs"]
    assert [p.name for p in tmp_path.iterdir()] == ["entry"]  # no temporary folder left behind
