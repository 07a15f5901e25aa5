"""TrainLoRA: teach a base model something new from a dataset, resumably, never twice."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

from ..datasets.folder import Dataset
from ..fileio import atomic_folder, atomic_write, sibling_work_folder
from ..lora.model import LoRA
from ..training.config import TRAINER_VERSION, TrainConfig
from .images import to_pil
from .lora import train_lora_preflight
from .sample import DEFAULT_GUIDANCE, guidance_arguments, make_pipeline
from .spec import DATASET, IMAGE, LORA, MODEL, STRING, Input, Output, node

if TYPE_CHECKING:  # annotations only: declaring the nodes must not import torch
    import torch

    from ..lora.recipe import ModelRecipe
    from ..models.base import BaseModel

PREVIEW_STEPS, PREVIEW_CFG = 20, 7.0


class TrainedLoRACache:
    """Keeps a trained LoRA and its loss plot on disk under the cache dir, keyed by the node's key.

    The run's checkpoints are deleted only once its result is stored here: if storing fails (a
    full disk), a new run resumes from the last checkpoint instead of starting over.
    """

    def save(self, outputs: tuple, folder: Path) -> None:
        """Store ``outputs`` as ``folder`` (it appears whole or not at all), then drop the checkpoints."""
        from safetensors.torch import save_file

        from ..lora.save import kohya_tensors
        from ..training.checkpoint import remove_checkpoints

        lora, plot = outputs
        tensors: dict[str, torch.Tensor] = {}
        for key, module in lora.modules.items():
            tensors.update(kohya_tensors(key, module))

        def write(staging: Path) -> None:
            save_file({k: v.contiguous() for k, v in tensors.items()}, staging / "lora.safetensors", lora.metadata)
            save_file({"loss": plot.contiguous()}, staging / "loss.safetensors")
            (staging / "entry.json").write_text(json.dumps({"name": lora.name, "trainer": TRAINER_VERSION}))

        try:  # a damaged entry (why this was trained again) is replaced
            atomic_folder(folder, write, overwrite=lambda entry: entry.is_dir() and not self._readable(entry))
        except FileExistsError:
            if not folder.is_dir():
                raise
            # another process stored the same result first (it is the same training): keep that
        try:
            remove_checkpoints(sibling_work_folder(folder, "checkpoints"))
        except OSError:  # leftover checkpoints cost disk space only: the result is stored
            pass

    def _readable(self, folder: Path) -> bool:
        try:
            self.load(folder)
        except Exception:  # noqa: BLE001 - whatever is wrong with it, it is not a usable entry
            return False
        return True

    def load(self, folder: Path) -> tuple[LoRA, torch.Tensor]:
        from safetensors.torch import load_file

        from ..lora.files import read_state_dict
        from ..lora.formats import parse_lora

        entry = json.loads((folder / "entry.json").read_text())
        tensors, metadata = read_state_dict(folder / "lora.safetensors")
        return parse_lora(tensors, metadata, name=entry["name"]), load_file(folder / "loss.safetensors")["loss"]


@node(
    "TrainLoRA",
    display_name="Train LoRA",
    category="training",
    outputs=[
        Output("lora", LORA, "the trained LoRA (save it with SaveLoRA, use it with ApplyLoRA)"),
        Output("loss", IMAGE, "loss per step, as an image"),
    ],
    version=TRAINER_VERSION,
    disk_cache=TrainedLoRACache(),
    preflight=train_lora_preflight,
)
def train_lora_node(
    ctx,
    model: Annotated[ModelRecipe, Input(MODEL, description="the base to train on (LoRAs already applied stay "
                                                           "applied, frozen)")],
    dataset: Annotated[Dataset, Input(DATASET)],
    config: TrainConfig,  # a group: each of its fields is an input (see TrainConfig)
    name: Annotated[str, Input(STRING, description="the LoRA's name (kohya ss_output_name)")] = "trained_lora",
    initial_lora: Annotated[LoRA | None, Input(LORA, optional=True,
                                               description="continue training this LoRA instead of a new one")] = None,
):
    """Train a LoRA on the dataset. The base stays frozen; the result is kept on disk, so running
    the same training again (even in a new process) loads it instead of training, and a stopped
    run continues from its last checkpoint. Inside ComfyUI too, where every node it depends on is
    a lora-nodes or ComfyUI core node (ComfyUI's log says when one is not)."""
    import torch

    from ..lora.metadata import training_metadata
    from ..lora.placement import check_placement
    from ..lora.save import kohya_version
    from ..training.plot import loss_plot
    from ..training.trainer import TrainCallbacks, train_lora

    base = model.materialize()
    if initial_lora is not None:
        check_placement(initial_lora, model.base)  # another family's LoRA, or one that places nothing, is refused
    if config.train_text_encoder and config.cache_text_embeddings:
        ctx.info("cache_text_embeddings is ignored while the text encoder trains: captions are encoded every step")
    checkpoints = ctx.work_dir("checkpoints")
    started = time.time()
    callbacks = TrainCallbacks(
        progress=lambda step, total, loss: ctx.progress(step, total, loss=round(loss, 6)),
        info=ctx.info,
        warn=ctx.warn,  # a full disk skips a checkpoint, not the run
        preview=_previewer(ctx, base, dataset, config),
    )
    result = train_lora(base, dataset, config, checkpoints, callbacks, initial_lora, check_memory=ctx.check_memory)
    autocast = config.autocast_dtype(base.device)
    precision = {torch.float16: "fp16", torch.bfloat16: "bf16"}.get(autocast, "no")
    metadata = training_metadata(config, dataset, base, name, started, precision,
                                 base_model_version=kohya_version(base))
    lora = result.network.to_lora(base, name, metadata)
    first, last = _mean(result.losses[:10]), _mean(result.losses[-10:])
    where = f" on {result.processes} processes" if result.processes > 1 else ""
    steps = f"{config.steps} steps" if not result.resumed_from else \
        f"{config.steps} steps ({config.steps - result.resumed_from} of them now, resumed at step {result.resumed_from})"
    ctx.info(f"trained {len(lora.modules)} modules for {steps} in {result.seconds:.1f} s{where}; "
             f"loss {first:.4f} -> {last:.4f} (mean of the first and last 10 steps)",
             loss_first=first, loss_last=last, seconds=round(result.seconds, 3), resumed_from=result.resumed_from,
             processes=result.processes)
    return lora, loss_plot(result.losses, title=f"{name}: loss per step")


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def _previewer(ctx, base: BaseModel, dataset, config: TrainConfig):
    """Draws the preview prompts with the LoRA as it is at a step, and saves them as PNGs."""
    import torch

    if not config.sample_every_n_steps:
        return None
    prompts = [p.strip() for p in config.sample_prompts.splitlines() if p.strip()]
    if not prompts:
        prompts = [next((item.caption for item in dataset.items if item.caption), "")]
    pipe = make_pipeline(base, "euler")  # over the base's own modules, so it draws with the hooked LoRA
    # the node id comes from a shared file: only its plain characters name the folder
    folder = re.sub(r"[^A-Za-z0-9._-]+", "_", ctx.node_id).strip("._") or "train"
    folder = f"{folder[:100]}_previews{ctx.file_suffix}"

    def preview(step: int) -> None:
        for number, prompt in enumerate(prompts):
            generator = torch.Generator("cpu").manual_seed(config.seed)
            images = pipe(prompt, num_inference_steps=PREVIEW_STEPS, generator=generator, output_type="pt",
                          **guidance_arguments(base, pipe, PREVIEW_CFG, DEFAULT_GUIDANCE, "")).images
            path = ctx.output_path(f"{folder}/step{step:06d}_{number:02d}.png")
            picture = to_pil(images[0].float().permute(1, 2, 0))
            atomic_write(path, lambda tmp, picture=picture: picture.save(tmp, format="PNG"))
            ctx.wrote(path)

    return preview
