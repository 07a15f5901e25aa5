"""TrainLoRA: teach a base model something new from a dataset, resumably, never twice."""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..fileio import atomic_write, new_temporary_folder, remove_stale_temporaries, temporary_name
from ..lora.formats import parse_lora, read_state_dict
from ..lora.model import LoRA
from ..lora.save import kohya_tensors
from ..models.recipe import ModelRecipe, check_placement
from ..training.checkpoint import remove_checkpoints
from ..training.config import LR_SCHEDULERS, MIXED_PRECISION, OPTIMIZERS, TrainConfig
from ..training.metadata import training_metadata
from ..training.network import TARGETS
from ..training.plot import loss_plot
from ..training.trainer import TRAINER_VERSION, TrainCallbacks, train_lora
from .lora import train_lora_preflight
from .sample import MAX_SEED, make_pipeline
from .spec import BOOLEAN, COMBO, DATASET, FLOAT, IMAGE, INT, LORA, MODEL, STRING, Input, Output, node

PREVIEW_STEPS, PREVIEW_CFG = 20, 7.0


class TrainedLoRACache:
    """Keeps a trained LoRA and its loss plot on disk under the cache dir, keyed by the node's key.

    The run's checkpoints are deleted only once its result is stored here: if storing fails (a
    full disk), a new run resumes from the last checkpoint instead of starting over.
    """

    def save(self, outputs: tuple, folder: Path) -> None:
        """Store ``outputs`` as ``folder`` (it appears whole or not at all), then drop the checkpoints."""
        lora, plot = outputs
        tensors: dict[str, torch.Tensor] = {}
        for key, module in lora.modules.items():
            tensors.update(kohya_tensors(key, module))
        remove_stale_temporaries(folder.parent)
        staging = new_temporary_folder(folder)
        try:
            save_file({k: v.contiguous() for k, v in tensors.items()}, staging / "lora.safetensors", lora.metadata)
            save_file({"loss": plot.contiguous()}, staging / "loss.safetensors")
            (staging / "entry.json").write_text(json.dumps({"name": lora.name, "trainer": TRAINER_VERSION}))
            try:
                os.replace(staging, folder)
            except OSError:
                if not folder.is_dir():
                    raise
                if not self._readable(folder):  # a damaged entry (why this was trained again): replace it
                    aside = folder.parent / temporary_name(folder.name)
                    os.replace(folder, aside)
                    os.replace(staging, folder)
                    shutil.rmtree(aside, ignore_errors=True)
                # else another process stored the same result first (it is the same training): keep that
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        try:
            remove_checkpoints(checkpoints_of(folder))
        except OSError:  # leftover checkpoints cost disk space only: the result is stored
            pass

    def _readable(self, folder: Path) -> bool:
        try:
            self.load(folder)
        except Exception:  # noqa: BLE001 - whatever is wrong with it, it is not a usable entry
            return False
        return True

    def load(self, folder: Path) -> tuple[LoRA, torch.Tensor]:
        entry = json.loads((folder / "entry.json").read_text())
        tensors, metadata = read_state_dict(folder / "lora.safetensors")
        return parse_lora(tensors, metadata, name=entry["name"]), load_file(folder / "loss.safetensors")["loss"]


def checkpoints_of(result_folder: Path) -> Path:
    """The checkpoint folder of the training whose result is kept in ``result_folder``.

    Both are work folders of the same node key, ``<cache dir>/<kind>/TrainLoRA/<key>`` (see
    NodeContext.work_dir): ``results`` for the result, ``checkpoints`` for the checkpoints.
    """
    node_folder = result_folder.parent
    return node_folder.parent.parent / "checkpoints" / node_folder.name / result_folder.name


@node(
    "TrainLoRA",
    display_name="Train LoRA",
    category="training",
    inputs=[
        Input("model", MODEL, description="the base to train on (LoRAs already applied stay applied, frozen)"),
        Input("dataset", DATASET),
        Input("rank", INT, 8, min=1, max=1024, description="the LoRA's rank (kohya network_dim)"),
        Input("alpha", FLOAT, 8.0, min=0.0, max=4096.0, step=0.5,
              description="scale is alpha / rank (kohya network_alpha)"),
        Input("target", COMBO, "attention_mlp", choices=tuple(TARGETS),
              description="attention projections; plus feed-forward layers (kohya's default); or every layer incl. convs"),
        Input("train_text_encoder", BOOLEAN, False, description="also train LoRA on the text encoder(s)"),
        Input("learning_rate", FLOAT, 1e-4, min=0.0, max=1.0, step=1e-5, description="the UNet's learning rate"),
        Input("text_encoder_lr", FLOAT, 0.0, min=0.0, max=1.0, step=1e-5,
              description="the text encoders' learning rate; 0 is the same as learning_rate"),
        Input("lr_scheduler", COMBO, "constant", choices=LR_SCHEDULERS, description="how the rate changes over steps"),
        Input("lr_warmup_steps", INT, 0, min=0, max=1_000_000, description="steps the rate ramps up from 0"),
        Input("optimizer", COMBO, "adamw", choices=OPTIMIZERS, description="adamw (weight decay 0.01) or sgd"),
        Input("steps", INT, 500, min=1, max=1_000_000, description="optimizer steps"),
        Input("batch_size", INT, 1, min=1, max=256, description="images per batch (per GPU)"),
        Input("gradient_accumulation", INT, 1, min=1, max=1024, description="batches per optimizer step"),
        Input("seed", INT, 0, min=0, max=MAX_SEED, description="same seed and inputs train the same LoRA"),
        Input("min_snr_gamma", FLOAT, 0.0, min=0.0, max=100.0, step=0.5,
              description="Min-SNR loss weighting; 5 is common, 0 is off"),
        Input("noise_offset", FLOAT, 0.0, min=0.0, max=1.0, step=0.01,
              description="extra per-channel noise (helps very dark/bright images); 0.05 is common"),
        Input("max_grad_norm", FLOAT, 1.0, min=0.0, max=1000.0, step=0.1, description="gradient clipping; 0 is off"),
        Input("mixed_precision", COMBO, "auto", choices=MIXED_PRECISION,
              description="auto: bf16 (or fp16) on a GPU, none on the CPU"),
        Input("gradient_checkpointing", BOOLEAN, False, in_key=False,
              description="less GPU memory for about 30% more time"),
        Input("cache_latents", BOOLEAN, True, in_key=False, description="encode each image with the VAE once"),
        Input("cache_text_embeddings", BOOLEAN, True, in_key=False,
              description="encode each caption once (not when training the text encoder)"),
        Input("save_every_n_steps", INT, 100, min=0, max=1_000_000, in_key=False,
              description="checkpoint under the cache dir so a stopped run resumes; 0 is never"),
        Input("sample_every_n_steps", INT, 0, min=0, max=1_000_000, in_key=False,
              description="write preview images every n steps; 0 is never"),
        Input("sample_prompts", STRING, "", multiline=True, in_key=False,
              description="preview prompts, one per line; empty: the first caption"),
        Input("resume", BOOLEAN, True, in_key=False,
              description="continue from the last checkpoint of this same training, if it was stopped"),
        Input("name", STRING, "trained_lora", description="the LoRA's name (kohya ss_output_name)"),
        Input("initial_lora", LORA, optional=True, description="continue training this LoRA instead of a new one"),
    ],
    outputs=[
        Output("lora", LORA, "the trained LoRA (save it with SaveLoRA, use it with ApplyLoRA)"),
        Output("loss", IMAGE, "loss per step, as an image"),
    ],
    version=TRAINER_VERSION,
    disk_cache=TrainedLoRACache(),
    preflight=train_lora_preflight,
)
def train_lora_node(ctx, model: ModelRecipe, dataset, rank: int, alpha: float, target: str,
                    train_text_encoder: bool, learning_rate: float, text_encoder_lr: float, lr_scheduler: str,
                    lr_warmup_steps: int, optimizer: str, steps: int, batch_size: int, gradient_accumulation: int,
                    seed: int, min_snr_gamma: float, noise_offset: float, max_grad_norm: float,
                    mixed_precision: str, gradient_checkpointing: bool, cache_latents: bool,
                    cache_text_embeddings: bool, save_every_n_steps: int, sample_every_n_steps: int,
                    sample_prompts: str, resume: bool, name: str, initial_lora: LoRA | None = None):
    """Train a LoRA on the dataset. The base stays frozen; the result is kept on disk, so running
    the same training again (even in a new process) loads it instead of training, and a stopped
    run continues from its last checkpoint."""
    config = TrainConfig(
        rank=rank, alpha=alpha, target=target, train_text_encoder=train_text_encoder,
        learning_rate=learning_rate, text_encoder_lr=text_encoder_lr, lr_scheduler=lr_scheduler,
        lr_warmup_steps=lr_warmup_steps, optimizer=optimizer, steps=steps, batch_size=batch_size,
        gradient_accumulation=gradient_accumulation, seed=seed, min_snr_gamma=min_snr_gamma,
        noise_offset=noise_offset, max_grad_norm=max_grad_norm, mixed_precision=mixed_precision,
        gradient_checkpointing=gradient_checkpointing, cache_latents=cache_latents,
        cache_text_embeddings=cache_text_embeddings, save_every_n_steps=save_every_n_steps,
        sample_every_n_steps=sample_every_n_steps, sample_prompts=sample_prompts, resume=resume)
    base = model.materialize()
    if initial_lora is not None:
        check_placement(initial_lora, model.base)  # another family's LoRA, or one that places nothing, is refused
    if train_text_encoder and cache_text_embeddings:
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
    metadata = training_metadata(config, dataset, base, name, started, precision)
    lora = result.network.to_lora(base, name, metadata)
    first, last = _mean(result.losses[:10]), _mean(result.losses[-10:])
    where = f" on {result.processes} processes" if result.processes > 1 else ""
    ctx.info(f"trained {len(lora.modules)} modules for {steps} steps in {result.seconds:.1f} s{where}; "
             f"loss {first:.4f} -> {last:.4f} (mean of the first and last 10 steps)",
             loss_first=first, loss_last=last, seconds=round(result.seconds, 3), resumed_from=result.resumed_from,
             processes=result.processes)
    return lora, loss_plot(result.losses, title=f"{name}: loss per step")


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def _previewer(ctx, base, dataset, config: TrainConfig):
    """Draws the preview prompts with the LoRA as it is at a step, and saves them as PNGs."""
    if not config.sample_every_n_steps:
        return None
    from .io import to_pil

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
            images = pipe(prompt, num_inference_steps=PREVIEW_STEPS, guidance_scale=PREVIEW_CFG,
                          generator=generator, output_type="pt").images
            path = ctx.output_path(f"{folder}/step{step:06d}_{number:02d}.png")
            picture = to_pil(images[0].float().permute(1, 2, 0))
            atomic_write(path, lambda tmp, picture=picture: picture.save(tmp, format="PNG"))
            ctx.wrote(path)

    return preview
