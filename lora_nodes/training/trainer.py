"""The LoRA training loop: encode, add noise, predict, MSE, step; resumable and data parallel.

A UNet learns the noise (or v) at DDPM noise levels; a flow-matching transformer learns the
velocity along a straight path (see :mod:`.flow`).

Every batch's randomness (which images, flips, caption shuffles, noise, timesteps) comes from a
generator seeded by (seed, batch number), so a run resumed from a checkpoint draws exactly what
the uninterrupted run would have drawn. Under ``accelerate launch`` each process trains on its
own batches (process r the batches numbered r modulo the process count) and gradients are
averaged before every optimizer step.
"""

from __future__ import annotations

import hashlib
import math
import os
import time
from collections.abc import Callable
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import NodeError
from ..models.base import BaseModel
from ..models.memory import check_training
from ..models.pipeline import pipeline_for
from .checkpoint import load_latest, remove_checkpoints, save_checkpoint
from .config import TrainConfig
from .flow import FlowMatching
from .network import LoRANetwork, select_targets


@dataclass
class TrainCallbacks:
    """How the trainer reports to its node: progress, messages, previews."""

    progress: Callable[[int, int, float], None] = lambda step, steps, loss: None
    info: Callable[[str], None] = lambda message: None
    warn: Callable[[str], None] | None = None  # a checkpoint that could not be written; None: that stops the run
    preview: Callable[[int], None] | None = None  # called inside the attached LoRA, without grad


@dataclass
class TrainResult:
    network: LoRANetwork
    losses: list[float]
    resumed_from: int = 0
    seconds: float = 0.0
    processes: int = 1


def process_group(device: torch.device) -> tuple[int, int]:
    """``(rank, world size)``. Under ``accelerate launch`` or torchrun (``WORLD_SIZE`` > 1) joins the
    launcher's process group: NCCL for a model on a GPU, gloo on the CPU."""
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0, 1
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size()


def batch_generator(seed: int, batch_number: int) -> torch.Generator:
    """The generator for one batch: a function of the seed and the batch's number only."""
    data = hashlib.blake2b(f"{seed}:{batch_number}".encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(data, "little") & (2**63 - 1))


class Trainer:
    """One training run of a LoRA on a frozen base (see :func:`train_lora`)."""

    def __init__(self, base: BaseModel, dataset, config: TrainConfig, checkpoint_dir: Path | None,
                 callbacks: TrainCallbacks, initial_lora=None, check_memory: bool = True):
        self.base, self.dataset, self.config, self.callbacks = base, dataset, config, callbacks
        self.checkpoint_dir = checkpoint_dir
        self.device = base.device
        # the UNet also takes the pooled text embedding and size ids (SDXL): the pipeline encodes both
        self.pooled_text = base.family.pooled_text_conditioning
        if next(base.unet.parameters()).is_inference():
            raise NodeError("the base's weights were loaded under torch.inference_mode() and cannot take part in "
                            "training: load the base outside inference mode (torch.no_grad() is fine)")
        self.rank, self.world = process_group(self.device)
        self.autocast_dtype = config.autocast_dtype(self.device)
        self.pipe = pipeline_for(base) if self.pooled_text or base.family.flow_matching else None
        self.flow = FlowMatching(base, self.pipe, config.timestep_sampling, config.guidance) \
            if base.family.flow_matching else None
        if self.flow is not None and config.min_snr_gamma:
            callbacks.info("min_snr_gamma weights noise-prediction losses; this model is trained by flow "
                           "matching, so it is not applied")
        targets = select_targets(base, config.target, config.train_text_encoder)
        if not targets:
            raise NodeError(f"target '{config.target}' matches no layer of this model")
        # before the images are prepared or anything is allocated: a run that cannot fit is refused
        check_training(base, dataset, config, targets, self.autocast_dtype, enabled=check_memory)
        multiple = self._size_multiple()
        self.examples = dataset.examples(dataset.resolution or base.native_size, multiple)
        self._check_sizes(multiple)
        with torch.random.fork_rng(devices=[]):  # the same start on every process, the global RNG untouched
            torch.manual_seed(config.seed)
            self.network = LoRANetwork(targets, config.rank, config.alpha)
        if initial_lora is not None:
            self.network.load_lora(initial_lora, base)
        self.network.to(self.device)
        self.optimizer = self._optimizer()
        self.scaler = torch.amp.GradScaler("cuda") if self.autocast_dtype == torch.float16 else None
        schedule = base.components["scheduler"].config
        if self.flow is None:
            from diffusers import DDPMScheduler

            # the noise levels the model was trained with, whatever its sampler: DDPM's over the same betas
            self.alphas_cumprod = DDPMScheduler.from_config(schedule).alphas_cumprod.float().to(self.device)
        self.v_prediction = base.family.training_objective(schedule) == "v_prediction"
        self.latent_cache: dict[tuple[int, bool], Tensor] = {}
        self.text_cache: dict[str, tuple[Tensor, Tensor | None]] = {}
        self._epoch_batches: tuple[int, list[list[int]]] | None = None
        self.batches_per_epoch = len(self._batches(0))

    # ------------------------------------------------------------------ setup

    def _size_multiple(self) -> int:
        """Image sides must be multiples of this: down through every UNet level, or into packed tokens."""
        if self.flow is not None:
            return self.flow.size_multiple
        return self.base.vae_scale_factor * 2 ** (len(self.base.unet.config.down_block_types) - 1)

    def _check_sizes(self, multiple: int) -> None:
        """Every image's sides must divide down through the UNet's levels."""
        bad = sorted({tuple(e.pixels.shape[1:]) for e in self.examples if e.pixels.shape[1] % multiple
                      or e.pixels.shape[2] % multiple})
        if bad:
            raise NodeError(f"training images of {bad[0][1]}x{bad[0][0]} pixels do not fit this model: sides must "
                            f"be multiples of {multiple}; set LoadDataset's resolution to a multiple of {multiple}")

    def _optimizer(self) -> torch.optim.Optimizer:
        config = self.config
        denoiser = self.base.family.denoiser
        groups = [{"params": params, "lr": config.learning_rate if component == denoiser else config.text_lr()}
                  for component, params in self.network.parameter_groups().items()]
        for group in groups:
            group["initial_lr"] = group["lr"]
        if config.optimizer == "sgd":
            return torch.optim.SGD(groups, lr=config.learning_rate, momentum=0.9)
        try:  # one fused kernel per step (on the CPU from torch 2.4); else the multi-tensor path
            return torch.optim.AdamW(groups, lr=config.learning_rate, weight_decay=1e-2, fused=True)
        except (RuntimeError, TypeError):
            return torch.optim.AdamW(groups, lr=config.learning_rate, weight_decay=1e-2)

    def _batches(self, epoch: int) -> list[list[int]]:
        if self._epoch_batches is None or self._epoch_batches[0] != epoch:
            batches = self.dataset.epoch_batches(self.examples, self.config.batch_size, epoch, self.config.seed)
            self._epoch_batches = (epoch, batches)
        return self._epoch_batches[1]

    # ------------------------------------------------------------------ one batch

    def _latents(self, indices: list[int], flips: list[bool]) -> Tensor:
        """Each image's latents: the mean of the VAE's posterior, shifted and scaled as the VAE's
        config says (``(z - shift_factor) * scaling_factor``; cached or encoded now).

        The mean, not a sample: the built-in models were trained on means, and Stable Diffusion's
        VAE has a posterior std small next to the latents' spread, so a sample adds little but noise.
        """
        missing = [(i, f) for i, f in zip(indices, flips, strict=True) if (i, f) not in self.latent_cache]
        encoded = self._encode_images(missing)
        means = [encoded.get(item) if item in encoded else self.latent_cache[item]
                 for item in zip(indices, flips, strict=True)]
        config = self.base.components["vae"].config
        latents = torch.stack(means)
        if config.get("shift_factor") is not None:  # a VAE whose latents are not centred (16-channel ones)
            latents = latents - config["shift_factor"]
        return latents * config.scaling_factor

    @torch.no_grad()
    def _encode_images(self, wanted: list[tuple[int, bool]]) -> dict[tuple[int, bool], Tensor]:
        """The VAE's posterior mean of each (image, flipped) wanted, in one batch."""
        if not wanted:
            return {}
        vae = self.base.components["vae"]
        pixels = torch.stack([self.examples[i].pixels.flip(-1) if flip else self.examples[i].pixels
                              for i, flip in wanted])
        dist = vae.encode(pixels.to(self.device, vae.dtype)).latent_dist
        mean = dist.mean.float()
        if not torch.isfinite(mean).all():
            raise NodeError(f"the VAE gave NaN in {vae.dtype} for images of this dataset: load the base with "
                            "dtype float32 (or bfloat16)")
        found = {item: mean[n] for n, item in enumerate(wanted)}
        if self.config.cache_latents:
            self.latent_cache.update(found)
        return found

    def _text(self, captions: list[str]) -> tuple[Tensor, Tensor | None]:
        if self.config.train_text_encoder or not self.config.cache_text_embeddings:
            return self._encode_text(captions)
        for caption in dict.fromkeys(captions):
            if caption not in self.text_cache:
                with torch.no_grad():
                    embeds, pooled = self._encode_text([caption])
                self.text_cache[caption] = (embeds[0], None if pooled is None else pooled[0])
        embeds = torch.stack([self.text_cache[c][0] for c in captions])
        pooled = None if not self.pooled_text else torch.stack([self.text_cache[c][1] for c in captions])
        return embeds, pooled

    def _encode_text(self, captions: list[str]) -> tuple[Tensor, Tensor | None]:
        if self.flow is not None:
            return self.flow.encode_text(captions)
        if self.pooled_text:
            embeds, _, pooled, _ = self.pipe.encode_prompt(
                prompt=captions, device=self.device, num_images_per_prompt=1, do_classifier_free_guidance=False)
            return embeds, pooled
        # one text encoder: what the pipeline's encode_prompt does when sampling, without its per-call checks
        text = self.base.family.text_encoders[0]
        tokenizer, encoder = self.base.components[text.tokenizer], self.base.components[text.component]
        ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                        return_tensors="pt").input_ids.to(self.device)
        mask = None
        if getattr(encoder.config, "use_attention_mask", False):
            mask = (ids != tokenizer.pad_token_id).long()
        return encoder(ids, attention_mask=mask)[0], None

    def _time_ids(self, indices: list[int], dtype: torch.dtype) -> Tensor:
        rows = []
        for index in indices:
            example = self.examples[index]
            rows.append([*example.original_size, *example.crop_top_left, *example.pixels.shape[1:]])
        return torch.tensor(rows, dtype=dtype, device=self.device)

    def batch_loss(self, batch_number: int) -> Tensor:
        """The loss of one batch (a function of the batch number and the LoRA's weights only)."""
        config = self.config
        epoch, position = divmod(batch_number, self.batches_per_epoch)
        indices = self._batches(epoch)[position]
        generator = batch_generator(config.seed, batch_number)
        flips = (torch.rand(len(indices), generator=generator) < 0.5).tolist() if self.dataset.flip \
            else [False] * len(indices)
        captions = [self.dataset.caption(self.examples[i], generator) for i in indices]
        latents = self._latents(indices, flips)
        noise = torch.randn(latents.shape, generator=generator)
        if config.noise_offset:
            noise += config.noise_offset * torch.randn((*latents.shape[:2], 1, 1), generator=generator)
        noise = noise.to(self.device)
        if self.flow is not None:
            with self._autocast():
                loss = self.flow.loss(latents, noise, generator, self._text(captions))
            return loss.mean()
        timesteps = torch.randint(0, len(self.alphas_cumprod), (len(indices),), generator=generator).to(self.device)
        alpha = self.alphas_cumprod[timesteps].view(-1, 1, 1, 1)
        noisy = alpha.sqrt() * latents + (1 - alpha).sqrt() * noise
        target = alpha.sqrt() * noise - (1 - alpha).sqrt() * latents if self.v_prediction else noise
        with self._autocast():
            embeds, pooled = self._text(captions)
            extra = {}
            if self.pooled_text:
                extra["added_cond_kwargs"] = {"text_embeds": pooled, "time_ids": self._time_ids(indices, embeds.dtype)}
            dtype = self.base.dtype  # not unet.dtype, which walks every module on each call
            prediction = self.base.unet(noisy.to(dtype), timesteps, encoder_hidden_states=embeds.to(dtype),
                                        **extra).sample
        loss = F.mse_loss(prediction.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
        if config.min_snr_gamma:
            snr = alpha.view(-1) / (1 - alpha.view(-1))
            weight = snr.clamp(max=config.min_snr_gamma) / (snr + 1 if self.v_prediction else snr)
            loss = loss * weight
        return loss.mean()

    def _autocast(self):
        if self.autocast_dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    # ------------------------------------------------------------------ the loop

    def train(self) -> TrainResult:
        config, start = self.config, time.perf_counter()
        step, losses = self._resume()
        resumed_from = step
        # whatever the caller's grad mode (ComfyUI runs nodes in inference mode)
        with torch.inference_mode(False), torch.enable_grad(), self._frozen_base(), self.network.attached():
            while step < config.steps:
                loss = self._optimizer_step(step)
                losses.append(loss)
                self._check_finite(losses, step)
                step += 1
                # the checkpoint before the progress report: a stop asked for there (ComfyUI's Cancel raises
                # from it) then resumes from this step, not the one before
                if self.checkpoint_dir and config.save_every_n_steps and step % config.save_every_n_steps == 0 \
                        and step < config.steps and self.rank == 0:
                    save_checkpoint(self.checkpoint_dir, step, self._state(step, losses), self.callbacks.warn)
                self.callbacks.progress(step, config.steps, loss)
                if self.callbacks.preview and config.sample_every_n_steps and \
                        step % config.sample_every_n_steps == 0 and self.rank == 0:
                    with torch.no_grad():
                        self.callbacks.preview(step)
        return TrainResult(self.network, losses, resumed_from, time.perf_counter() - start, self.world)

    def _check_finite(self, losses: list[float], step: int) -> None:
        """Stop on a diverged run. With fp16's gradient scaler a few overflowing steps are normal
        (they are skipped), so only a long run of them counts."""
        patience = 20 if self.scaler else 1
        recent = losses[-patience:]
        if len(recent) == patience and not any(math.isfinite(v) for v in recent):
            raise NodeError(f"the loss is {recent[-1]} at step {step + 1}: training diverged; lower learning_rate "
                            "(or use mixed_precision bf16/no instead of fp16)")

    def _optimizer_step(self, step: int) -> float:
        config = self.config
        for group in self.optimizer.param_groups:
            group["lr"] = group["initial_lr"] * config.lr_factor(step)
        total = 0.0
        for micro in range(config.gradient_accumulation):
            batch_number = (step * config.gradient_accumulation + micro) * self.world + self.rank
            loss = self.batch_loss(batch_number) / config.gradient_accumulation
            (self.scaler.scale(loss) if self.scaler else loss).backward()
            total += loss.item()
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        total = self._average_gradients(params, total)
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        if config.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return total

    def _average_gradients(self, params: list[Tensor], loss: float) -> float:
        """Average gradients (and the loss, for the plot) over processes; a no-op in one process."""
        if self.world == 1:
            return loss
        import torch.distributed as dist

        for param in params:
            if param.grad is None:
                param.grad = torch.zeros_like(param)
            dist.all_reduce(param.grad)
            param.grad /= self.world
        total = torch.tensor([loss], device=self.device)
        dist.all_reduce(total)
        return total.item() / self.world

    @contextmanager
    def _frozen_base(self):
        """No gradients for the base's own weights; gradient checkpointing only while training."""
        models = [m for m in self.base.components.values() if isinstance(m, torch.nn.Module)]
        flags = [(p, p.requires_grad) for m in models for p in m.parameters()]
        modes = [(m, m.training) for m in models]
        for param, _ in flags:
            param.requires_grad_(False)
        checkpointing = self.config.gradient_checkpointing
        if checkpointing:
            self.base.unet.enable_gradient_checkpointing()
            if self.config.train_text_encoder:
                for name in self.base.family.text_components:
                    encoder = self.base.components.get(name)
                    if encoder is not None:
                        encoder.gradient_checkpointing_enable()
                        encoder.train()  # transformers checkpoints only in training mode (CLIP has no dropout)
        try:
            yield
        finally:
            if checkpointing:
                self.base.unet.disable_gradient_checkpointing()
                for name in self.base.family.text_components:
                    encoder = self.base.components.get(name)
                    if encoder is not None and getattr(encoder, "is_gradient_checkpointing", False):
                        encoder.gradient_checkpointing_disable()
            for module, mode in modes:
                module.train(mode)
            for param, flag in flags:
                param.requires_grad_(flag)

    # ------------------------------------------------------------------ checkpoints

    def _state(self, step: int, losses: list[float]) -> dict[str, Any]:
        state = {
            "step": step,
            "network": {k: v.detach().cpu() for k, v in self.network.state_dict().items()},
            "optimizer": self.optimizer.state_dict(),
            "losses": torch.tensor(losses, dtype=torch.float64),
            "rng": {"torch": torch.get_rng_state()},
        }
        if torch.cuda.is_available():
            state["rng"]["cuda"] = torch.cuda.get_rng_state_all()
        if self.scaler:
            state["scaler"] = self.scaler.state_dict()
        return state

    def _resume(self) -> tuple[int, list[float]]:
        if self.checkpoint_dir is None:
            return 0, []
        if not self.config.resume:  # starting over: an old run's later checkpoints must not win next time
            remove_checkpoints(self.checkpoint_dir)
            return 0, []
        found = load_latest(self.checkpoint_dir)
        if found is None:
            return 0, []
        step, state = found
        # in place, so the optimizer keeps its parameters; alphas were set again by __init__ as the first time
        self.network.load_state_dict(state["network"])
        self.optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng"]["torch"])
        if "cuda" in state["rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])
        if self.scaler and "scaler" in state:
            self.scaler.load_state_dict(state["scaler"])
        self.callbacks.info(f"resumed from the checkpoint at step {step} of {self.config.steps}")
        return step, state["losses"].tolist()


def train_lora(base: BaseModel, dataset, config: TrainConfig, checkpoint_dir: Path | None = None,
               callbacks: TrainCallbacks | None = None, initial_lora=None, check_memory: bool = True) -> TrainResult:
    """Train a LoRA for ``base`` on ``dataset``; the base's weights are bitwise the same afterwards.

    A run estimated not to fit in the device's free memory is refused first, unless ``check_memory``
    is False (``--no-memory-check``).
    """
    return Trainer(base, dataset, config, checkpoint_dir, callbacks or TrainCallbacks(), initial_lora,
                   check_memory).train()
