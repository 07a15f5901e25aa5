"""What a training run is asked to do: every hyperparameter, as data."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch

from ..errors import NodeError

LR_SCHEDULERS = ("constant", "linear", "cosine")
OPTIMIZERS = ("adamw", "sgd")
MIXED_PRECISION = ("auto", "no", "fp16", "bf16")


@dataclass(frozen=True)
class TrainConfig:
    """TrainLoRA's hyperparameters. ``steps`` counts optimizer updates (as kohya's max_train_steps)."""

    rank: int = 8
    alpha: float = 8.0
    target: str = "attention_mlp"
    train_text_encoder: bool = False
    learning_rate: float = 1e-4
    text_encoder_lr: float = 0.0  # 0: the same as learning_rate
    lr_scheduler: str = "constant"
    lr_warmup_steps: int = 0
    optimizer: str = "adamw"
    steps: int = 500
    batch_size: int = 1
    gradient_accumulation: int = 1
    seed: int = 0
    min_snr_gamma: float = 0.0  # 0: off
    noise_offset: float = 0.0
    max_grad_norm: float = 1.0  # 0: no clipping
    mixed_precision: str = "auto"
    gradient_checkpointing: bool = False
    cache_latents: bool = True
    cache_text_embeddings: bool = True
    save_every_n_steps: int = 100
    sample_every_n_steps: int = 0
    sample_prompts: str = ""
    resume: bool = True

    def lr_factor(self, step: int) -> float:
        """The learning rate at optimizer step ``step`` (0-based) as a fraction of the set one."""
        if step < self.lr_warmup_steps:
            return (step + 1) / (self.lr_warmup_steps + 1)
        if self.lr_scheduler == "constant":
            return 1.0
        progress = (step - self.lr_warmup_steps) / max(1, self.steps - self.lr_warmup_steps)
        if self.lr_scheduler == "linear":
            return max(0.0, 1.0 - progress)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    def autocast_dtype(self, device: torch.device) -> torch.dtype | None:
        """The autocast dtype for ``device``, or None for full precision.

        ``auto`` takes ``accelerate launch --mixed_precision``, else bf16 on a GPU that has it (fp16
        on one that does not) and full precision on the CPU.
        """
        choice = self.mixed_precision
        if choice == "auto":
            choice = os.environ.get("ACCELERATE_MIXED_PRECISION", "")
            if choice not in ("fp16", "bf16"):
                choice = "no" if device.type != "cuda" else ("bf16" if torch.cuda.is_bf16_supported() else "fp16")
        if choice == "no":
            return None
        if device.type != "cuda":
            raise NodeError(f"mixed_precision {choice} needs a CUDA GPU; the model is on {device.type}: "
                            "use 'no' (or 'auto')")
        return torch.float16 if choice == "fp16" else torch.bfloat16

    def text_lr(self) -> float:
        return self.text_encoder_lr or self.learning_rate
