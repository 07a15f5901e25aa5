"""Check lora-nodes inside a real ComfyUI: start it, post API prompts over HTTP, compare the pictures.

    python scripts/comfyui_check.py --comfyui ~/ComfyUI --python ~/ComfyUI/venv/bin/python

ComfyUI is not a pip package, so this cannot run in CI: run it by hand. It needs a ComfyUI
checkout (tested: v0.3.64) with this pack in ``custom_nodes/`` (a clone or copy of this
repository, installed with ``pip install -e`` into ComfyUI's Python, whose path ``--python``
gives), and this repository's own Python to run the script (numpy, torch, PIL and the package).
The pack ComfyUI loads is the copy in its ``custom_nodes``: copy your working tree there first.
It took 7-9 minutes on 2 busy CPU cores (4-5 CPU-minutes, 2.2 GB of scratch); nothing needs a GPU.

What it does, in a scratch folder (a temporary one, or ``--workdir``), writing nothing into
ComfyUI's own folders (its models, input, output, user and temp folders all point at the
scratch folder; ``PYTHONDONTWRITEBYTECODE`` keeps even ``__pycache__`` out):

1. Builds the models itself, seeded, nothing downloaded: a single-file checkpoint that ComfyUI's
   CheckpointLoaderSimple reads as an SD1.5 model (full-size CLIP-L and VAE, as ComfyUI's fixed
   configs want, but a small random UNet so that sampling takes a second on a CPU), a second
   checkpoint that differs from it in a few attention weights (for ExtractLoRA), a kohya LoRA on
   UNet and text encoder, a LyCORIS LoKr LoRA, and a small captioned dataset in ``input/``.
2. Starts ComfyUI on 127.0.0.1 (``--port``, default 8199) with ``--cpu`` and an
   ``extra_model_paths.yaml`` whose section is ``is_default``, logs it to ``comfyui.log``, and
   stops it at the end or on any failure (and restarts it once, for the disk-cache check).
3. Runs the checks, one line each, ``PASS`` or ``FAIL`` with its numbers; the exit status is 0
   only when every check passed:

   a. the bridge (LoadLoRA -> ApplyLoRAToModel on ComfyUI's MODEL and CLIP) into ComfyUI's
      KSampler: strengths 0, 0.5 and 1 give different pictures; 0 is the graph without it.
   b. the bridge at strength 1 draws what ComfyUI's own LoraLoader draws with the same file.
   c. the same API graphs run headless (``lora-nodes run``) give ComfyUI's pixels, and our own
      LoadBase -> LoadLoRA -> ApplyLoRA -> Sample (euler, normal, same seed) draws the bridge's.
   d. a LoKr file through the bridge changes the picture.
   e. a training graph queued twice: the second queue takes TrainLoRA from ComfyUI's cache;
      after a restart of ComfyUI the same queue takes it from our disk cache (no training).
   f. a training interrupted (POST /interrupt) after its first checkpoint resumes from it.
   g. SaveLoRA -> LoadLoRA by name: the saved file is in LoadLoRA's list and samples.
   h. ExtractLoRA between two checkpoints picked by name runs and finds what differs.

Pixels are compared as 8-bit images: ``max`` and ``mean`` absolute differences in levels
(0-255). Within ComfyUI, the bridge and LoraLoader must agree within 1 level (measured: identical).
Headless against ComfyUI: ComfyUI's own nodes run headless save levels as ComfyUI's SaveImage does
(cut down), so the files agree but where the floats differ in their last bits across a level
boundary (allowed: max 1 level, mean 0.05; measured 0.012-0.027). Our SaveImages rounds to the
nearest level, so our Sample's picture differs by rounding: ours - ComfyUI = 0 or +1 (mean about
0.5) and almost never -1 (allowed: 1% of values).
Options: ``--only a,c`` runs some checks (the models are always built), ``--keep``
keeps the temporary folder, ``--workdir DIR`` uses (and keeps) DIR and reuses the models built
there before (its results, cache and outputs are cleared at the start).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the checkout this script is in, whatever lora-nodes pip installed elsewhere

import numpy as np
import torch
from PIL import Image

PACK = "lora-nodes."  # our node ids inside ComfyUI start with it
MARKER = ".comfyui_check"  # a workdir this script made (so it may clear its results)
BASE_NAME, OTHER_BASE_NAME = "check_base.safetensors", "check_base_b.safetensors"
KOHYA_NAME, LOKR_NAME = "check_kohya.safetensors", "check_lokr.safetensors"
DATASET_FOLDER = "check_dataset"  # under input/, given to LoadDataset as a relative path
SEED, STEPS, CFG, SIZE = 7, 4, 7.0, 64  # every sampling here: euler, normal schedule
PROMPT, NEGATIVE = "a red circle on a white background", "blurry"
# "changed": the mean absolute difference of two pictures, in 8-bit levels, is above this
CHANGED_MEAN = 1.0
# "the same picture" within one ComfyUI process: identical weights and noise give identical pixels
SAME_MAX = 0
# "the same picture" when the weights come from another code path (our patches vs ComfyUI's LoraLoader):
# measured identical on the CPU in float32; one level allows for another order of rounding W + s*(up@down)
PATCH_MAX, PATCH_MEAN = 1, 0.02
# headless vs ComfyUI, as 8-bit files: ComfyUI's SaveImage run headless cuts levels down as ComfyUI does
# (must be equal); our SaveImages rounds, so equal floats differ by 0 or +1 level (mean ~0.5), and a share
# of values where ours is lower says the floats differ too
HEADLESS_MAX, HEADLESS_MEAN, HEADLESS_LOWER = 1, 0.6, 0.01
# ComfyUI's nodes run headless against ComfyUI (both savers cut levels down): measured max 1, mean 0.012-0.027
CORE_MAX, CORE_MEAN = 1, 0.05


# --------------------------------------------------------------------------- scratch folder


@dataclass
class Workdir:
    """The scratch folder: ComfyUI's models, input, output, user and temp folders, all ours."""

    root: Path

    @property
    def models(self) -> Path:
        return self.root / "models"

    @property
    def input(self) -> Path:
        return self.root / "input"

    @property
    def output(self) -> Path:
        return self.root / "output"

    @property
    def user(self) -> Path:
        return self.root / "user"

    @property
    def headless(self) -> Path:
        return self.root / "headless"

    @property
    def yaml(self) -> Path:
        return self.root / "extra_model_paths.yaml"

    @property
    def log(self) -> Path:
        return self.root / "comfyui.log"

    def checkpoint(self, name: str) -> Path:
        return self.models / "checkpoints" / name

    def lora(self, name: str) -> Path:
        return self.models / "loras" / name


def make_workdir(path: Path | None) -> Workdir:
    """A fresh scratch folder, or ``path`` with its earlier results cleared (the models are kept)."""
    root = Path(tempfile.mkdtemp(prefix="comfyui_check_")) if path is None else path.resolve()
    root.mkdir(parents=True, exist_ok=True)
    if any(root.iterdir()) and not (root / MARKER).exists():
        raise SystemExit(f"{root} is not empty and was not made by this script: give an empty or new folder")
    (root / MARKER).write_text("made by scripts/comfyui_check.py; everything here may be deleted\n")
    work = Workdir(root)
    # earlier results would make the cache and SaveLoRA checks pass vacuously (the LoRAs are rebuilt)
    for stale in (work.output, work.user, work.headless, work.input, work.models / "loras", root / "cache",
                  root / "temp"):
        shutil.rmtree(stale, ignore_errors=True)
    work.log.unlink(missing_ok=True)
    for folder in (work.models / "checkpoints", work.models / "loras", work.models / "diffusers", work.input,
                   work.output, work.user, work.headless):
        folder.mkdir(parents=True, exist_ok=True)
    write_extra_model_paths(work)
    return work


def write_extra_model_paths(work: Workdir) -> None:
    """ComfyUI's extra_model_paths.yaml: our models folder first in every kind we use (is_default)."""
    work.yaml.write_text(
        "lora_nodes_check:\n"
        f"    base_path: {work.models}\n"
        "    is_default: true\n"
        "    checkpoints: checkpoints\n"
        "    loras: loras\n"
        "    diffusers: diffusers\n"
    )


# --------------------------------------------------------------------------- models and data


def seeded(seed: int, build: Callable[[], Any]) -> Any:
    """``build()`` with torch's generator at ``seed``: the same random weights every time."""
    torch.manual_seed(seed)
    return build()


def build_components() -> tuple[Any, Any, Any]:
    """UNet, VAE and CLIP-L text encoder: random, seeded; the UNet small, the others full-size.

    ComfyUI reads an SD1.5 checkpoint's UNet shape from its tensors (model_channels 320,
    context_dim 768, 8 heads, conv proj_in) but takes CLIP-L's and the VAE's configs as fixed.
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    unet = seeded(1, lambda: UNet2DConditionModel(
        sample_size=64, in_channels=4, out_channels=4, block_out_channels=(320, 640), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=768, attention_head_dim=8))
    vae = seeded(2, lambda: AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
        layers_per_block=2,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, sample_size=512))
    text = seeded(3, lambda: CLIPTextModel(CLIPTextConfig(
        hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
        max_position_embeddings=77, vocab_size=49408, hidden_act="quick_gelu", projection_dim=768,
        bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)))
    return unet, vae, text


def checkpoint_state(unet: Any, vae: Any, text: Any) -> dict[str, torch.Tensor]:
    """The three parts as one LDM single-file state dict (ComfyUI's and A1111's layout)."""
    from lora_nodes.models.ldm import to_ldm_checkpoint
    from lora_nodes.models.text_names import file_state_dict

    state = to_ldm_checkpoint(unet.state_dict(), vae.state_dict(), file_state_dict(text), unet.config, vae.config)
    return {key: value.detach().contiguous() for key, value in state.items()}


def perturbed(state: dict[str, torch.Tensor], seed: int = 11,
              rank: int = 2) -> tuple[dict[str, torch.Tensor], list[str]]:
    """``state`` with a rank-``rank`` random change added to every UNet self-attention query weight,
    and the names of the weights changed (what ExtractLoRA should find)."""
    generator = torch.Generator().manual_seed(seed)
    changed = sorted(key for key in state
                     if key.startswith("model.diffusion_model.") and key.endswith("attn1.to_q.weight"))
    out = dict(state)
    for key in changed:
        rows, cols = state[key].shape
        delta = torch.randn(rows, rank, generator=generator) @ torch.randn(rank, cols, generator=generator) / cols
        out[key] = (state[key] + delta).contiguous()
    return out, changed


def write_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """A .safetensors file, written as our package writes them (atomically)."""
    from safetensors.torch import save_file

    from lora_nodes.fileio import atomic_write

    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata or {"format": "pt"}))


def build_checkpoints(work: Workdir) -> list[str]:
    """Write both checkpoints unless an earlier run left them; the names of the UNet weights that
    differ between them."""
    base, other = work.checkpoint(BASE_NAME), work.checkpoint(OTHER_BASE_NAME)
    if base.is_file() and other.is_file() and (work.root / "changed.json").is_file():
        return json.loads((work.root / "changed.json").read_text())
    state = checkpoint_state(*build_components())
    write_tensors(base, state)
    other_state, changed = perturbed(state)
    write_tensors(other, other_state)
    (work.root / "changed.json").write_text(json.dumps(changed))
    return changed


def synthetic_lokr(base: Any, seed: int = 5, factor: int = 4, rank: int = 4) -> dict[str, torch.Tensor]:
    """A LyCORIS LoKr state dict over the UNet's attention linears: delta = kron(w1, w2_a @ w2_b) * alpha/rank,
    with w1 ``factor`` x ``factor`` and w2 factored at ``rank``; seeded, sized to change the picture."""
    from lora_nodes.lora.synthetic import ATTENTION

    generator = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    for target, module in base.lora_targets.items():
        if not (target.startswith("unet.") and ATTENTION.search(target)):
            continue
        rows, cols = module.weight.shape
        key = base.kohya_names[target]
        tensors[f"{key}.lokr_w1"] = torch.randn(factor, factor, generator=generator)
        tensors[f"{key}.lokr_w2_a"] = torch.randn(rows // factor, rank, generator=generator) * 0.5
        fan_in = cols // factor
        tensors[f"{key}.lokr_w2_b"] = torch.randn(rank, fan_in, generator=generator) / fan_in**0.5
        tensors[f"{key}.alpha"] = torch.tensor(float(rank))
    return tensors


def build_loras(work: Workdir) -> dict[str, int]:
    """The kohya LoRA (UNet and text encoder attention) and the LoKr for the base checkpoint; checks on the
    way that our loader reads the checkpoint. Returns how many modules each file has."""
    from lora_nodes.lora.synthetic import synthetic_lora
    from lora_nodes.models.loading import load_base

    base = load_base(str(work.checkpoint(BASE_NAME)), device="cpu")
    kohya = synthetic_lora(base, rank=4, alpha=4.0, seed=3)
    lokr = synthetic_lokr(base)
    write_tensors(work.lora(KOHYA_NAME), kohya, {"ss_network_module": "networks.lora", "ss_network_dim": "4"})
    write_tensors(work.lora(LOKR_NAME), lokr, {"ss_network_module": "lycoris.kohya"})
    return {"kohya": sum(k.endswith(".alpha") for k in kohya), "lokr": sum(k.endswith(".alpha") for k in lokr),
            "kohya_text": sum(k.startswith("lora_te") and k.endswith(".alpha") for k in kohya)}


def build_dataset(work: Workdir, count: int = 4) -> None:
    """A few seeded 64x64 pictures with captions, in input/<DATASET_FOLDER>."""
    folder = work.input / DATASET_FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for number in range(count):
        picture = np.zeros((64, 64, 3), np.uint8)
        picture[...] = rng.integers(0, 256, 3, dtype=np.uint8)  # a flat colour ...
        top, left = rng.integers(8, 40, 2)
        picture[top:top + 20, left:left + 20] = rng.integers(0, 256, 3, dtype=np.uint8)  # ... with a square
        Image.fromarray(picture).save(folder / f"picture_{number}.png")
        (folder / f"picture_{number}.txt").write_text(f"a check square, number {number}")


# --------------------------------------------------------------------------- ComfyUI over HTTP


class ComfyUI:
    """A ComfyUI server we started: start, stop, restart, and its HTTP API."""

    def __init__(self, comfyui: Path, python: str, work: Workdir, port: int, start_timeout: float):
        self.comfyui, self.python, self.work, self.port = comfyui, python, work, port
        self.start_timeout = start_timeout
        self.process: subprocess.Popen | None = None
        self.url = f"http://127.0.0.1:{port}"
        self.client_id = uuid.uuid4().hex
        self._log_offset = 0  # where the current server's lines start in the log

    # ----- process

    def command(self) -> list[str]:
        work = self.work
        return [self.python, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(self.port),
                "--extra-model-paths-config", str(work.yaml), "--output-directory", str(work.output),
                "--input-directory", str(work.input), "--user-directory", str(work.user),
                "--temp-directory", str(work.root), "--database-url", f"sqlite:///{work.user / 'comfyui.db'}",
                "--disable-auto-launch"]

    def start(self) -> float:
        """Start ComfyUI and wait until it serves; the seconds that took."""
        if _port_open(self.port):
            raise RuntimeError(f"something already listens on 127.0.0.1:{self.port}: stop it or pass --port")
        started = time.time()
        self._log_offset = self.work.log.stat().st_size if self.work.log.exists() else 0
        log = open(self.work.log, "ab")  # noqa: SIM115 - the server holds it open while it runs
        env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1", "PYTHONUNBUFFERED": "1"}
        self.process = subprocess.Popen(self.command(), cwd=self.comfyui, stdout=log, stderr=subprocess.STDOUT,
                                        stdin=subprocess.DEVNULL, env=env, start_new_session=True)
        log.close()
        while time.time() - started < self.start_timeout:
            if self.process.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with status {self.process.returncode} while starting:\n"
                                   + self.log_tail())
            try:
                self.get("/system_stats")
                return time.time() - started
            except (urllib.error.URLError, ConnectionError, OSError):
                time.sleep(0.5)
        raise RuntimeError(f"ComfyUI did not serve within {self.start_timeout:.0f} s:\n" + self.log_tail())

    def stop(self) -> None:
        """Stop the server we started (its whole process group), politely first."""
        if self.process is None or self.process.poll() is not None:
            self.process = None
            return
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=20)
        self.process = None

    def restart(self) -> float:
        self.stop()
        return self.start()

    def log_text(self) -> str:
        """What the current server wrote to its log so far."""
        with open(self.work.log, "rb") as file:
            file.seek(self._log_offset)
            return file.read().decode("utf-8", "replace")

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    # ----- HTTP

    def get(self, path: str) -> Any:
        with urllib.request.urlopen(self.url + path, timeout=30) as response:
            return json.load(response)

    def post(self, path: str, body: Any) -> tuple[int, Any]:
        request = urllib.request.Request(self.url + path, data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                text = response.read()
                return response.status, json.loads(text) if text else None
        except urllib.error.HTTPError as exc:
            text = exc.read()
            return exc.code, json.loads(text) if text else None

    def node_types(self) -> set[str]:
        return set(self.get("/object_info"))

    def object_info(self, node_type: str) -> dict[str, Any]:
        return self.get(f"/object_info/{node_type}")[node_type]

    def queue(self, graph: dict[str, Any]) -> str:
        """Post an API prompt; its prompt id. Raises with ComfyUI's node_errors when it is refused."""
        status, answer = self.post("/prompt", {"prompt": graph, "client_id": self.client_id})
        if status != 200:
            raise RuntimeError(f"ComfyUI refused the prompt ({status}): {json.dumps(answer)[:1500]}")
        return answer["prompt_id"]

    def wait(self, prompt_id: str, timeout: float = 600) -> History:
        """The finished prompt's history entry (success, error or interrupted)."""
        started = time.time()
        while time.time() - started < timeout:
            entry = self.get(f"/history/{prompt_id}").get(prompt_id)
            if entry and entry.get("status", {}).get("completed") is not None \
                    and entry["status"].get("status_str") in ("success", "error"):
                return History(entry, time.time() - started)
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError("ComfyUI died while running the prompt:\n" + self.log_tail())
            time.sleep(0.25)
        raise RuntimeError(f"prompt {prompt_id} did not finish within {timeout:.0f} s")

    def run(self, graph: dict[str, Any], timeout: float = 600) -> History:
        """Queue ``graph`` and wait for it; raises when it failed (with ComfyUI's error message)."""
        history = self.wait(self.queue(graph), timeout)
        if not history.ok:
            raise RuntimeError(f"the prompt failed in ComfyUI: {history.error()}")
        return history


@dataclass
class History:
    """One prompt's entry in ComfyUI's /history, and how long we waited for it."""

    entry: dict[str, Any]
    seconds: float

    @property
    def ok(self) -> bool:
        return self.entry["status"]["status_str"] == "success"

    def messages(self, kind: str) -> list[dict[str, Any]]:
        return [body for name, body in self.entry["status"].get("messages", []) if name == kind]

    def cached_nodes(self) -> set[str]:
        return {node for body in self.messages("execution_cached") for node in body.get("nodes", [])}

    def interrupted(self) -> bool:
        return bool(self.messages("execution_interrupted"))

    def error(self) -> str:
        for body in self.messages("execution_error"):
            message = body.get("exception_message", "").strip()
            return f"node {body.get('node_id')} ({body.get('node_type')}): {message}"
        return "interrupted" if self.interrupted() else json.dumps(self.entry["status"])[:800]

    def image_files(self, output: Path) -> list[Path]:
        """The pictures the prompt's output nodes saved, in node order."""
        files = []
        for node_id in sorted(self.entry.get("outputs", {}), key=_node_order):
            for image in self.entry["outputs"][node_id].get("images", []):
                if image.get("type") == "output":
                    files.append(output / image.get("subfolder", "") / image["filename"])
        return files


def _node_order(node_id: str) -> tuple[int, str]:
    return (int(node_id), "") if node_id.isdigit() else (1 << 30, node_id)


def _port_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


# --------------------------------------------------------------------------- graphs


def with_defaults(graph: dict[str, Any], infos: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """``graph`` with every widget input it leaves out set to the node's default, as ComfyUI's editor
    sends them (an API prompt must name every required input)."""
    out = {}
    for node_id, node in graph.items():
        inputs = dict(node["inputs"])
        info = infos[node["class_type"]]["input"]
        for name, spec in {**info.get("required", {}), **info.get("optional", {})}.items():
            if name in inputs:
                continue
            kind, options = spec[0], (spec[1] if len(spec) > 1 else {})
            if "default" in options:
                inputs[name] = options["default"]
            elif isinstance(kind, list) and kind and name in info.get("required", {}):
                inputs[name] = kind[0]  # a choice without a default: the editor shows the first
        out[node_id] = {"class_type": node["class_type"], "inputs": inputs}
    return out


def sampling_tail(model: list, clip: list, vae: list, prefix: str, first_id: int = 10) -> dict[str, Any]:
    """CLIPTextEncode x2 -> EmptyLatentImage -> KSampler -> VAEDecode -> SaveImage after a MODEL and a CLIP."""
    n = [str(first_id + i) for i in range(6)]
    return {
        n[0]: {"class_type": "CLIPTextEncode", "inputs": {"text": PROMPT, "clip": clip}},
        n[1]: {"class_type": "CLIPTextEncode", "inputs": {"text": NEGATIVE, "clip": clip}},
        n[2]: {"class_type": "EmptyLatentImage", "inputs": {"width": SIZE, "height": SIZE, "batch_size": 1}},
        n[3]: {"class_type": "KSampler", "inputs": {
            "model": model, "seed": SEED, "steps": STEPS, "cfg": CFG,
            "sampler_name": "euler", "scheduler": "normal",
            "positive": [n[0], 0], "negative": [n[1], 0], "latent_image": [n[2], 0], "denoise": 1.0}},
        n[4]: {"class_type": "VAEDecode", "inputs": {"samples": [n[3], 0], "vae": vae}},
        n[5]: {"class_type": "SaveImage", "inputs": {"images": [n[4], 0], "filename_prefix": prefix}},
    }


def plain_graph(prefix: str) -> dict[str, Any]:
    """The checkpoint drawn with no LoRA."""
    return {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": BASE_NAME}},
            **sampling_tail(["1", 0], ["1", 1], ["1", 2], prefix)}


def lora_loader_graph(lora_name: str, strength: float, prefix: str) -> dict[str, Any]:
    """The checkpoint with ComfyUI's own LoraLoader."""
    return {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": BASE_NAME}},
            "2": {"class_type": "LoraLoader", "inputs": {"model": ["1", 0], "clip": ["1", 1],
                                                         "lora_name": lora_name,
                                                         "strength_model": strength, "strength_clip": strength}},
            **sampling_tail(["2", 0], ["2", 1], ["1", 2], prefix)}


def bridge_graph(lora_name: str, strength: float, prefix: str) -> dict[str, Any]:
    """The checkpoint with our LoadLoRA -> ApplyLoRAToModel (the bridge) on ComfyUI's MODEL and CLIP."""
    return {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": BASE_NAME}},
            "2": {"class_type": PACK + "LoadLoRA", "inputs": {"path": lora_name}},
            "3": {"class_type": PACK + "ApplyLoRAToModel", "inputs": {
                "model": ["1", 0], "clip": ["1", 1], "lora": ["2", 0],
                "strength_model": strength, "strength_clip": strength}},
            **sampling_tail(["3", 0], ["3", 1], ["1", 2], prefix)}


def our_sample_graph(lora_name: str, strength: float, prefix: str) -> dict[str, Any]:
    """Our own nodes: LoadBase -> LoadLoRA -> ApplyLoRA -> Sample -> SaveImages, same seed, steps, cfg, size."""
    return {"1": {"class_type": "LoadBase", "inputs": {"source": BASE_NAME, "device": "cpu"}},
            "2": {"class_type": "LoadLoRA", "inputs": {"path": lora_name}},
            "3": {"class_type": "ApplyLoRA", "inputs": {"model": ["1", 0], "lora": ["2", 0],
                                                        "strength_model": strength, "strength_text": strength}},
            "4": {"class_type": "Sample", "inputs": {
                "model": ["3", 0], "prompt": PROMPT, "negative_prompt": NEGATIVE, "seed": SEED, "steps": STEPS,
                "cfg": CFG, "sampler": "euler", "scheduler": "normal", "width": SIZE, "height": SIZE}},
            "5": {"class_type": "SaveImages", "inputs": {"images": ["4", 0], "prefix": prefix}}}


def training_graph(source: str, steps: int, seed: int, save_as: str, every: int, resolution: int = 32,
                   learning_rate: float = 1e-4) -> dict[str, Any]:
    """LoadBase -> LoadDataset (a relative folder: ComfyUI's input/) -> TrainLoRA -> SaveLoRA."""
    return {"1": {"class_type": PACK + "LoadBase", "inputs": {"source": source, "device": "cpu"}},
            "2": {"class_type": PACK + "LoadDataset",
                  "inputs": {"path": DATASET_FOLDER, "resolution": resolution}},
            "3": {"class_type": PACK + "TrainLoRA", "inputs": {
                "model": ["1", 0], "dataset": ["2", 0], "steps": steps, "seed": seed, "rank": 4, "alpha": 4.0,
                "target": "attention", "save_every_n_steps": every, "learning_rate": learning_rate}},
            "4": {"class_type": PACK + "SaveLoRA", "inputs": {"lora": ["3", 0], "path": save_as}}}


# --------------------------------------------------------------------------- pictures


def read_picture(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


def difference(a: np.ndarray, b: np.ndarray) -> tuple[int, float]:
    """Max and mean absolute difference of two 8-bit pictures, in levels."""
    if a.shape != b.shape:
        raise RuntimeError(f"pictures of different sizes: {a.shape} and {b.shape}")
    diff = np.abs(a - b)
    return int(diff.max()), float(diff.mean())


def describe(a: np.ndarray, b: np.ndarray) -> str:
    high, mean = difference(a, b)
    return f"max {high} mean {mean:.3f}"


# --------------------------------------------------------------------------- the headless side


def run_headless(graph: dict[str, Any], work: Workdir, name: str,
                 timeout: float = 600) -> tuple[list[Path], float]:
    """``lora-nodes run`` of an API graph in this checkout's package; the pictures it wrote and its seconds."""
    path = work.headless / f"{name}.json"
    path.write_text(json.dumps(graph, indent=1))
    output = work.headless / name
    command = [sys.executable, "-m", "lora_nodes.cli", "run", str(path), "--models-dir", str(work.models),
               "--input-dir", str(work.input), "--output-dir", str(output), "--cache-dir",
               str(work.headless / "cache"), "--events", "jsonl"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    started = time.time()
    done = subprocess.run(command, check=False, capture_output=True, text=True, timeout=timeout, env=env)
    seconds = time.time() - started
    events = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    end = next((e for e in events if e["event"] == "run_end"), None)
    if done.returncode != 0 or end is None or not end.get("ok"):
        problems = [e for e in events if e["event"] in ("error", "invalid")]
        raise RuntimeError(f"lora-nodes run failed ({done.returncode}): {json.dumps(problems)[:1500]} "
                           f"{done.stderr[-1500:]}")
    return [Path(f) for f in end["files"] if f.endswith(".png")], seconds


# --------------------------------------------------------------------------- the checks


class CheckFailed(Exception):
    """A check's expectation did not hold; the message has the numbers."""


def expect(condition: bool, message: str) -> None:
    if not condition:
        raise CheckFailed(message)


@dataclass
class Session:
    """What the checks share: the server, the folders, and pictures drawn once and compared often."""

    server: ComfyUI
    work: Workdir
    infos: dict[str, dict[str, Any]] = field(default_factory=dict)
    pictures: dict[str, np.ndarray] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def refresh_infos(self) -> None:
        self.infos = self.server.get("/object_info")

    def complete(self, graph: dict[str, Any]) -> dict[str, Any]:
        missing = sorted({node["class_type"] for node in graph.values()} - set(self.infos))
        if missing:
            raise CheckFailed(f"ComfyUI has no node {', '.join(missing)} (see its /object_info)")
        return with_defaults(graph, self.infos)

    def draw(self, key: str, graph: dict[str, Any]) -> np.ndarray:
        """The picture ``graph`` draws in ComfyUI (drawn once per key)."""
        if key not in self.pictures:
            history = self.server.run(self.complete(graph))
            files = history.image_files(self.work.output)
            expect(len(files) == 1, f"{key}: expected one picture, ComfyUI saved {len(files)}")
            self.pictures[key] = read_picture(files[0])
        return self.pictures[key]


def check_base_picture(s: Session) -> str:
    """ComfyUI loads our checkpoint as SD1.5 and draws a picture that is not flat."""
    picture = s.draw("plain", plain_graph("check/plain"))
    spread = float(picture.std())
    expect(spread > 2.0, f"the picture is flat (std {spread:.2f} levels): the model draws nothing to compare")
    detected = next((line.strip() for line in s.server.log_text().splitlines() if "model_type" in line), "?")
    return f"{picture.shape[1]}x{picture.shape[0]}, pixel std {spread:.1f} levels; ComfyUI's log: '{detected}'"


def check_lora_loader(s: Session) -> str:
    """ComfyUI's own LoraLoader with our kohya file changes the picture (the LoRA is strong enough)."""
    plain = s.draw("plain", plain_graph("check/plain"))
    loaded = s.draw("loraloader_1", lora_loader_graph(KOHYA_NAME, 1.0, "check/loraloader_1"))
    high, mean = difference(plain, loaded)
    expect(mean > CHANGED_MEAN, f"LoraLoader at 1 hardly changes the picture (max {high} mean {mean:.3f})")
    unloaded = [line for line in s.server.log_text().splitlines() if "lora key not loaded" in line]
    expect(not unloaded, f"ComfyUI did not place {len(unloaded)} keys: {unloaded[:2]}")
    return f"vs no LoRA: max {high} mean {mean:.2f}; every key placed"


def check_a_bridge_strengths(s: Session) -> str:
    """a. The bridge at 0, 0.5, 1 draws three different pictures; at 0 the picture without it."""
    plain = s.draw("plain", plain_graph("check/plain"))
    drawn = {strength: s.draw(f"bridge_{strength}", bridge_graph(KOHYA_NAME, strength, f"check/bridge_{strength}"))
             for strength in (0.0, 0.5, 1.0)}
    zero_high, zero_mean = difference(drawn[0.0], plain)
    pairs = {(a, b): difference(drawn[a], drawn[b]) for a, b in ((0.0, 0.5), (0.5, 1.0), (0.0, 1.0))}
    numbers = "; ".join(f"{a} vs {b}: max {h} mean {m:.2f}" for (a, b), (h, m) in pairs.items())
    expect(zero_high <= SAME_MAX, f"strength 0 differs from the graph without the bridge (max {zero_high} "
                                  f"mean {zero_mean:.3f}); {numbers}")
    expect(all(m > CHANGED_MEAN for _, m in pairs.values()), f"strengths do not all differ: {numbers}")
    return f"0 vs no bridge: max {zero_high} mean {zero_mean:.3f}; {numbers}"


def check_b_bridge_vs_lora_loader(s: Session) -> str:
    """b. The bridge at 1 draws what ComfyUI's LoraLoader draws with the same kohya file."""
    ours = s.draw("bridge_1.0", bridge_graph(KOHYA_NAME, 1.0, "check/bridge_1.0"))
    theirs = s.draw("loraloader_1", lora_loader_graph(KOHYA_NAME, 1.0, "check/loraloader_1"))
    half_ours = s.draw("bridge_0.5", bridge_graph(KOHYA_NAME, 0.5, "check/bridge_0.5"))
    half_theirs = s.draw("loraloader_0.5", lora_loader_graph(KOHYA_NAME, 0.5, "check/loraloader_0.5"))
    high, mean = difference(ours, theirs)
    half_high, half_mean = difference(half_ours, half_theirs)
    numbers = f"at 1: max {high} mean {mean:.3f}; at 0.5: max {half_high} mean {half_mean:.3f}"
    expect(max(high, half_high) <= PATCH_MAX and max(mean, half_mean) <= PATCH_MEAN,
           f"bridge and LoraLoader differ beyond max {PATCH_MAX} / mean {PATCH_MEAN}: {numbers}")
    return numbers


def rounding_difference(ours: np.ndarray, comfy: np.ndarray) -> tuple[int, float, float]:
    """Max and mean absolute difference of a picture we saved and one ComfyUI saved, and the share of
    values where ours is the lower one. Our savers round to the nearest level, ComfyUI's SaveImage
    truncates: the same floats then give ours - ComfyUI in {0, +1} everywhere (mean about 0.5)."""
    high, mean = difference(ours, comfy)
    return high, mean, float((ours < comfy).mean())


def merged(graphs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Several API graphs as one (node ids offset by 100 per graph), so one headless run loads the
    checkpoint once for all of them."""
    out = {}
    for number, graph in enumerate(graphs.values(), start=1):
        def moved(node_id: str, offset: int = 100 * number) -> str:
            return str(int(node_id) + offset)

        for node_id, node in graph.items():
            inputs = {name: [moved(value[0]), value[1]] if isinstance(value, list) else value
                      for name, value in node["inputs"].items()}
            out[moved(node_id)] = {"class_type": node["class_type"], "inputs": inputs}
    return out


def saved_as(files: list[Path], prefix: str) -> Path:
    """The one picture of ``files`` a saver wrote with ``prefix`` (``<prefix>_00001_.png`` or the like)."""
    folder, stem = Path(prefix).parent.name, Path(prefix).name + "_"
    found = [f for f in files if f.parent.name == folder and f.name.startswith(stem)]
    expect(len(found) == 1, f"expected one headless picture named {prefix}_*, found {[str(f) for f in found]}")
    return found[0]


def check_c_headless(s: Session) -> str:
    """c. The same API graphs run headless by `lora-nodes run` give ComfyUI's pixels, and our own
    LoadBase -> LoadLoRA -> ApplyLoRA -> Sample (euler, normal) draws what the bridge draws in ComfyUI."""
    graphs = {"plain": plain_graph, "loraloader_1": lambda prefix: lora_loader_graph(KOHYA_NAME, 1.0, prefix)}
    if PACK + "ApplyLoRAToModel" in s.infos:
        graphs["bridge_1.0"] = lambda prefix: bridge_graph(KOHYA_NAME, 1.0, prefix)
    else:
        s.notes.append("c: the bridge graph was not compared headless (ComfyUI has no ApplyLoRAToModel)")
    comfy = {key: s.draw(key, make(f"check/{key}")) for key, make in graphs.items()}
    headless = {key: s.complete(make(f"headless/{key}")) for key, make in graphs.items()}
    headless["our_sample"] = our_sample_graph(KOHYA_NAME, 1.0, "headless/our_sample")
    files, seconds = run_headless(merged(headless), s.work, "all")
    # our Sample against the bridge in ComfyUI (LoraLoader's picture when there is no bridge: b says they agree)
    against = {**{key: key for key in comfy},
               "our_sample": "bridge_1.0" if "bridge_1.0" in comfy else "loraloader_1"}
    measured = {key: rounding_difference(read_picture(saved_as(files, f"headless/{key}")), comfy[theirs])
                for key, theirs in against.items()}
    numbers = "; ".join(f"{key}{' vs ' + against[key] if key == 'our_sample' else ''}: max {h} mean {m:.3f}, "
                        f"ours lower at {low:.2%}" for key, (h, m, low) in measured.items())
    # ComfyUI's own SaveImage, run headless, cuts levels down as ComfyUI does: the files agree but where the
    # floats differ in the last bits across a level boundary (measured: 1-3% of values, one level)
    core = [key for key in measured if key != "our_sample"]
    expect(all(measured[key][0] <= CORE_MAX and measured[key][1] <= CORE_MEAN for key in core),
           f"ComfyUI's nodes run headless differ from ComfyUI beyond max {CORE_MAX} / mean {CORE_MEAN}: {numbers}")
    high, mean, lower = measured["our_sample"]
    expect(high <= HEADLESS_MAX and mean <= HEADLESS_MEAN and lower <= HEADLESS_LOWER,
           f"our Sample differs from ComfyUI beyond rounding (max {HEADLESS_MAX} / mean {HEADLESS_MEAN} / ours lower "
           f"at {HEADLESS_LOWER:.0%}): {numbers}")
    return f"{numbers} (one headless run of all: {seconds:.0f} s)"


def check_d_lycoris(s: Session) -> str:
    """d. A LoKr file through the bridge changes the picture (and is compared with ComfyUI's LoraLoader)."""
    plain = s.draw("plain", plain_graph("check/plain"))
    ours = s.draw("bridge_lokr", bridge_graph(LOKR_NAME, 1.0, "check/bridge_lokr"))
    high, mean = difference(ours, plain)
    theirs = s.draw("loraloader_lokr", lora_loader_graph(LOKR_NAME, 1.0, "check/loraloader_lokr"))
    versus = describe(ours, theirs)
    expect(mean > CHANGED_MEAN, f"the LoKr hardly changes the picture: max {high} mean {mean:.3f}")
    return f"vs no LoRA: max {high} mean {mean:.2f}; vs ComfyUI's LoraLoader with the same LoKr: {versus}"


def _train_lines(s: Session, node_type: str = "TrainLoRA") -> list[str]:
    """Our TrainLoRA's "trained ..." info lines in the current server's log (one per training that ran)."""
    return [line for line in s.server.log_text().splitlines()
            if f"({node_type})" in line and ": trained " in line]


def _checkpoint_files(s: Session) -> list[Path]:
    return sorted(s.work.root.rglob("step_*.pt"))


def check_e_training_cached(s: Session) -> str:
    """e. A training graph queued twice: TrainLoRA is in ComfyUI's execution_cached the second time; after a
    restart the same queue loads it from our disk cache (no "trained ..." line, no training progress)."""
    graph = s.complete(training_graph("builtin:tiny", steps=6, seed=1, save_as="check_e_trained.safetensors",
                                      every=2))
    first = s.server.run(graph)
    trained_first = len(_train_lines(s))
    expect(trained_first == 1, f"the first queue logged {trained_first} trainings (expected 1)")
    second = s.server.run(graph)
    expect("3" in second.cached_nodes(), f"second queue: TrainLoRA not among ComfyUI's cached nodes "
                                         f"{sorted(second.cached_nodes())}")
    restart = s.server.restart()
    s.refresh_infos()
    third = s.server.run(graph)
    trained_third = len(_train_lines(s))
    log = s.server.log_text().splitlines()
    from_disk = [line.split(": ", 2)[-1] for line in log if "(TrainLoRA)" in line and "cached on disk" in line]
    expect(trained_third == 0, f"after the restart TrainLoRA trained again ({third.seconds:.1f} s, first queue "
                               f"{first.seconds:.1f} s): no disk cache inside ComfyUI")
    expect("3" not in third.cached_nodes(), "after a restart ComfyUI's memory cache cannot hold TrainLoRA")
    results = sorted(p.parent.name for p in s.work.root.rglob("results/TrainLoRA/*/entry.json"))
    return (f"queue 1 trained ({first.seconds:.1f} s); queue 2 cached {sorted(second.cached_nodes())} "
            f"({second.seconds:.1f} s); restart {restart:.0f} s; queue 3 ran without training "
            f"({third.seconds:.1f} s, no 'trained' line; the pack logs: "
            f"{from_disk[-1] if from_disk else 'nothing about the disk cache'}); "
            f"disk cache entries {len(results)}")


def check_f_resume(s: Session) -> str:
    """f. A longer training interrupted after its first checkpoint resumes from it when queued again."""
    graph = s.complete(training_graph("builtin:tiny", steps=30, seed=2, save_as="check_f_trained.safetensors",
                                      every=5))
    before = set(_checkpoint_files(s))
    prompt_id = s.server.queue(graph)
    started = time.time()
    while not (set(_checkpoint_files(s)) - before):
        expect(time.time() - started < 300, "no checkpoint appeared within 300 s")
        entry = s.server.get(f"/history/{prompt_id}").get(prompt_id)
        expect(not entry, f"the training finished before a checkpoint was seen: {json.dumps(entry)[:300]}")
        time.sleep(0.05)
    written, seen_after = sorted(set(_checkpoint_files(s)) - before), time.time() - started
    s.server.post("/interrupt", {})
    stopped = s.server.wait(prompt_id)
    expect(stopped.interrupted(), f"the interrupted prompt ended as {stopped.entry['status']['status_str']}, "
                                  f"not interrupted: {stopped.error()}")
    kept = sorted(set(_checkpoint_files(s)) - before)
    expect(bool(kept), "the interrupted training left no checkpoint")
    resumed = s.server.run(graph)
    lines = [line for line in s.server.log_text().splitlines() if "resumed from the checkpoint at step" in line]
    expect(bool(lines), f"the second queue did not resume (no 'resumed from' line; "
                        f"it took {resumed.seconds:.1f} s)")
    return (f"first checkpoint {written[0].name} after {seen_after:.1f} s, interrupted "
            f"({stopped.seconds:.1f} s); kept {[p.name for p in kept]}; "
            f"re-queued: '{lines[-1].split(': ', 2)[-1]}' "
            f"({resumed.seconds:.1f} s)")


def check_g_save_then_load(s: Session) -> str:
    """g. SaveLoRA writes where LoadLoRA lists it, and LoadLoRA(by that name) -> bridge -> KSampler draws."""
    name = "check_g_trained.safetensors"
    s.server.run(s.complete(training_graph(BASE_NAME, steps=3, seed=4, save_as=name, every=0, resolution=64,
                                           learning_rate=1e-2)))
    choices = s.server.object_info(PACK + "LoadLoRA")["input"]["required"]["path"][0]
    expect(isinstance(choices, list) and name in choices,
           f"{name} is not in LoadLoRA's list {choices if isinstance(choices, list) else type(choices).__name__}; "
           f"saved at {[str(p) for p in s.work.root.rglob(name)]}")
    s.refresh_infos()
    picture = s.draw("bridge_trained", bridge_graph(name, 1.0, "check/bridge_trained"))
    where = [str(p.relative_to(s.work.root)) for p in s.work.root.rglob(name)]
    return (f"saved as {', '.join(where)}, listed by LoadLoRA; drawn through the bridge; vs no LoRA: "
            f"{describe(picture, s.pictures['plain'])}")


def check_h_extract(s: Session, changed: list[str]) -> str:
    """h. ExtractLoRA between the two checkpoints (picked by name) finds the weights that differ."""
    from lora_nodes.lora.files import read_state_dict

    name = "check_h_extracted.safetensors"
    graph = {"1": {"class_type": PACK + "LoadBase", "inputs": {"source": BASE_NAME, "device": "cpu"}},
             "2": {"class_type": PACK + "LoadBase", "inputs": {"source": OTHER_BASE_NAME, "device": "cpu"}},
             "3": {"class_type": PACK + "ExtractLoRA",
                   "inputs": {"model_a": ["1", 0], "model_b": ["2", 0], "rank": 4}},
             # kohya names come from the base: SaveLoRA needs it for a LoRA made from diffusers modules
             "4": {"class_type": PACK + "SaveLoRA", "inputs": {"lora": ["3", 0], "path": name, "model": ["1", 0]}}}
    history = s.server.run(s.complete(graph))
    saved = [p for p in s.work.root.rglob(name)]
    expect(len(saved) == 1, f"SaveLoRA's file {name} not found under the scratch folder")
    tensors, _ = read_state_dict(saved[0])
    modules = sorted(k[: -len(".lora_down.weight")] for k in tensors if k.endswith(".lora_down.weight"))
    expect(len(modules) == len(changed) and all(m.endswith("attn1_to_q") for m in modules),
           f"extracted {modules}; the {len(changed)} weights that differ are the UNet's attn1.to_q")
    return (f"{len(modules)} modules extracted, the {len(changed)} attn1.to_q weights that differ "
            f"({history.seconds:.1f} s)")


# --------------------------------------------------------------------------- main


@dataclass
class Check:
    letter: str
    name: str
    run: Callable[[], str]


def run_checks(checks: list[Check]) -> list[bool]:
    """Run each check, print its PASS/FAIL line with its numbers and time; whether each passed."""
    passed = []
    for check in checks:
        started = time.time()
        try:
            detail, ok = check.run(), True
        except CheckFailed as exc:
            detail, ok = str(exc), False
        except Exception as exc:  # noqa: BLE001 - any failure is this check's FAIL, the next ones still run
            detail, ok = f"{type(exc).__name__}: {exc}", False
            if os.environ.get("COMFYUI_CHECK_DEBUG"):
                traceback.print_exc()
        seconds = time.time() - started
        print(f"{'PASS' if ok else 'FAIL'} {check.letter}. {check.name} [{seconds:.1f} s]: {detail}", flush=True)
        passed.append(ok)
    return passed


def make_checks(s: Session, changed: list[str]) -> list[Check]:
    return [
        Check("0", "ComfyUI draws our checkpoint", lambda: check_base_picture(s)),
        Check("0", "ComfyUI's LoraLoader with our kohya file", lambda: check_lora_loader(s)),
        Check("a", "bridge into KSampler at strengths 0, 0.5, 1", lambda: check_a_bridge_strengths(s)),
        Check("b", "bridge = ComfyUI's LoraLoader", lambda: check_b_bridge_vs_lora_loader(s)),
        Check("c", "headless = ComfyUI", lambda: check_c_headless(s)),
        Check("d", "LoKr through the bridge", lambda: check_d_lycoris(s)),
        Check("e", "training queued twice, then after a restart", lambda: check_e_training_cached(s)),
        Check("f", "interrupted training resumes", lambda: check_f_resume(s)),
        Check("g", "SaveLoRA -> LoadLoRA by name -> bridge", lambda: check_g_save_then_load(s)),
        Check("h", "ExtractLoRA between two checkpoints by name", lambda: check_h_extract(s, changed)),
    ]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--comfyui", type=Path, required=True, help="the ComfyUI checkout (it has main.py)")
    parser.add_argument("--python", default=sys.executable,
                        help="the Python that runs ComfyUI (its venv's; default: this one)")
    parser.add_argument("--port", type=int, default=8199, help="port on 127.0.0.1 (default 8199)")
    parser.add_argument("--workdir", type=Path, help="scratch folder to use and keep (default: a temporary one)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary scratch folder")
    parser.add_argument("--only", default="",
                        help="comma-separated check letters to run, e.g. a,b,c (the 0 checks always run)")
    parser.add_argument("--start-timeout", type=float, default=240, help="seconds to wait for ComfyUI to serve")
    return parser.parse_args(argv)


def prepare(work: Workdir) -> tuple[list[str], str]:
    """Build models, LoRAs and dataset; the changed weights' names and a line saying what was built."""
    started = time.time()
    changed = build_checkpoints(work)
    counts = build_loras(work)
    build_dataset(work)
    size = work.checkpoint(BASE_NAME).stat().st_size / 2**20
    return changed, (f"models built in {time.time() - started:.0f} s: {BASE_NAME} ({size:.0f} MiB; our load_base "
                     f"reads it), {KOHYA_NAME} ({counts['kohya']} modules, {counts['kohya_text']} in the text "
                     f"encoder), {LOKR_NAME} ({counts['lokr']} LoKr modules), {OTHER_BASE_NAME} "
                     f"({len(changed)} weights changed)")


def _exit_on_signal(signum: int, _frame: Any) -> None:
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not (args.comfyui / "main.py").is_file():
        raise SystemExit(f"{args.comfyui} has no main.py: give the ComfyUI checkout with --comfyui")
    work = make_workdir(args.workdir)
    print(f"scratch folder {work.root}; ComfyUI log {work.log}", flush=True)
    started = time.time()
    server = ComfyUI(args.comfyui.resolve(), args.python, work, args.port, args.start_timeout)
    passed: list[bool] = []
    signal.signal(signal.SIGTERM, _exit_on_signal)  # so that `finally` stops ComfyUI
    try:
        changed, built = prepare(work)
        print(built, flush=True)
        print(f"ComfyUI serves after {server.start():.0f} s", flush=True)
        session = Session(server, work)
        session.refresh_infos()
        wanted = {letter.strip() for letter in args.only.split(",") if letter.strip()} | {"0"}
        checks = [c for c in make_checks(session, changed) if not args.only or c.letter in wanted]
        passed = run_checks(checks)
        for note in session.notes:
            print(f"note: {note}")
    except Exception as exc:  # noqa: BLE001 - building the models or starting ComfyUI failed: one FAIL line
        print(f"FAIL setup: {type(exc).__name__}: {exc}", flush=True)
        passed.append(False)
    finally:
        server.stop()
        if not all(passed) and work.log.exists():
            print(f"--- the end of ComfyUI's log ({work.log}) ---\n{server.log_tail(30)}")
        if args.workdir is None and not args.keep:
            shutil.rmtree(work.root, ignore_errors=True)
    total = len(passed)
    print(f"{sum(passed)} of {total} checks passed in {time.time() - started:.0f} s", flush=True)
    return 0 if passed and all(passed) else 1


if __name__ == "__main__":
    sys.exit(main())
