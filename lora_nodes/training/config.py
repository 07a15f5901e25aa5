"""What a training run is asked to do: every hyperparameter, as data."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated

from ..errors import NodeError
from ..nodes.spec import BOOLEAN, COMBO, FLOAT, INT, MAX_SEED, STRING, Input
from .flow import TIMESTEP_SAMPLING

if TYPE_CHECKING:  # annotations only: declaring TrainLoRA imports this module, and must not import torch
    import torch

TRAINER_VERSION = 1  # part of the cache key: a change to what training computes must bump it

_UNET_ATTENTION = r"attn\d\.(to_q|to_k|to_v|to_out\.0)"
_UNET_MLP = r"attentions\.\d+\.(proj_in|proj_out|transformer_blocks\.\d+\.ff\.net\.(0\.proj|2))"
# a joint-attention transformer (diffusers' tree): both streams' q/k/v and outputs in the double-stream
# blocks, q/k/v in the single-stream ones (as diffusers' dreambooth script targets them); its MLP: both
# streams' feed-forward layers, and the single-stream blocks' MLP input and fused output projection
_TRANSFORMER_ATTENTION = r"attn\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out)"
_TRANSFORMER_MLP = r"(ff|ff_context)\.net\.(0\.proj|2)|single_transformer_blocks\.\d+\.(proj_mlp|proj_out)"
_DENOISER_ATTENTION = f"{_UNET_ATTENTION}|{_TRANSFORMER_ATTENTION}"
_DENOISER_MLP = f"{_UNET_MLP}|{_TRANSFORMER_MLP}"
_TEXT_ATTENTION = r"self_attn\.(q_proj|k_proj|v_proj|out_proj)"
_TEXT_MLP = r"mlp\.(fc1|fc2)"

# target choice -> (denoiser module pattern, text encoder module pattern); matched at the end of the
# path. Each UNet pattern matches nothing in a transformer's tree and the reverse. Text encoders:
# CLIP's layers (a T5 encoder's are named otherwise: it is not trained, as kohya and diffusers default).
TARGETS: dict[str, tuple[str, str]] = {
    "attention": (_DENOISER_ATTENTION, _TEXT_ATTENTION),
    "attention_mlp": (f"{_DENOISER_ATTENTION}|{_DENOISER_MLP}", f"({_TEXT_ATTENTION}|{_TEXT_MLP})"),
    "all": (r".*", f"({_TEXT_ATTENTION}|{_TEXT_MLP})"),
}

LR_SCHEDULERS = ("constant", "linear", "cosine")
OPTIMIZERS = ("adamw", "sgd")
MIXED_PRECISION = ("auto", "no", "fp16", "bf16")


@dataclass(frozen=True)
class TrainConfig:
    """TrainLoRA's hyperparameters. ``steps`` counts optimizer updates (as kohya's max_train_steps).

    Each field declares TrainLoRA's input of that name (type, range, choices, description) and its
    default: the node takes the whole class as one group of inputs, so they are written only here.
    """

    rank: Annotated[int, Input(INT, min=1, max=1024, description="the LoRA's rank (kohya network_dim)")] = 8
    alpha: Annotated[float, Input(FLOAT, min=0.0, max=4096.0, step=0.5,
                                  description="scale is alpha / rank (kohya network_alpha)")] = 8.0
    target: Annotated[str, Input(COMBO, choices=tuple(TARGETS),
                                 description="attention projections; plus feed-forward layers (kohya's default); "
                                             "or every layer incl. convs")] = "attention_mlp"
    train_text_encoder: Annotated[bool, Input(BOOLEAN, description="also train LoRA on the text encoder(s)")] = False
    learning_rate: Annotated[float, Input(FLOAT, min=0.0, max=1.0, step=1e-5,
                                          description="the denoiser's (UNet's or transformer's) learning "
                                                      "rate")] = 1e-4
    text_encoder_lr: Annotated[float, Input(FLOAT, min=0.0, max=1.0, step=1e-5,
                                            description="the text encoders' learning rate; "
                                                        "0 is the same as learning_rate")] = 0.0
    lr_scheduler: Annotated[str, Input(COMBO, choices=LR_SCHEDULERS,
                                       description="how the rate changes over steps")] = "constant"
    lr_warmup_steps: Annotated[int, Input(INT, min=0, max=1_000_000, description="steps the rate ramps up from 0")] = 0
    optimizer: Annotated[str, Input(COMBO, choices=OPTIMIZERS,
                                    description="adamw (weight decay 0.01) or sgd")] = "adamw"
    steps: Annotated[int, Input(INT, min=1, max=1_000_000, description="optimizer steps")] = 500
    batch_size: Annotated[int, Input(INT, min=1, max=256, description="images per batch (per GPU)")] = 1
    gradient_accumulation: Annotated[int, Input(INT, min=1, max=1024, description="batches per optimizer step")] = 1
    # no "randomize" control in ComfyUI's editor: a new seed each queue would train again every time
    seed: Annotated[int, Input(INT, min=0, max=MAX_SEED, seed_control=False,
                               description="same seed and inputs train the same LoRA")] = 0
    min_snr_gamma: Annotated[float, Input(FLOAT, min=0.0, max=100.0, step=0.5,
                                          description="Min-SNR loss weighting of noise-prediction models; 5 is "
                                                      "common, 0 is off")] = 0.0
    noise_offset: Annotated[float, Input(FLOAT, min=0.0, max=1.0, step=0.01,
                                         description="extra per-channel noise (helps very dark/bright images); "
                                                     "0.05 is common")] = 0.0
    max_grad_norm: Annotated[float, Input(FLOAT, min=0.0, max=1000.0, step=0.1,
                                          description="gradient clipping; 0 is off")] = 1.0
    mixed_precision: Annotated[str, Input(COMBO, choices=MIXED_PRECISION,
                                          description="auto: bf16 (or fp16) on a GPU, none on the CPU")] = "auto"
    # in_key=False: these change how the work is done, not the LoRA it makes
    gradient_checkpointing: Annotated[bool, Input(BOOLEAN, in_key=False,
                                                  description="less GPU memory for about 30% more time")] = False
    cache_latents: Annotated[bool, Input(BOOLEAN, in_key=False, description="encode each image with the VAE once")] = True
    cache_text_embeddings: Annotated[bool, Input(BOOLEAN, in_key=False,
                                                 description="encode each caption once (not when training the "
                                                             "text encoder)")] = True
    save_every_n_steps: Annotated[int, Input(INT, min=0, max=1_000_000, in_key=False,
                                             description="checkpoint under the cache dir so a stopped run "
                                                         "resumes; 0 is never")] = 100
    sample_every_n_steps: Annotated[int, Input(INT, min=0, max=1_000_000, in_key=False,
                                               description="write preview images every n steps; 0 is never")] = 0
    sample_prompts: Annotated[str, Input(STRING, multiline=True, in_key=False,
                                         description="preview prompts, one per line; empty: the first caption")] = ""
    resume: Annotated[bool, Input(BOOLEAN, in_key=False,
                                  description="continue from the last checkpoint of this same training, "
                                              "if it was stopped")] = True
    # last, so that the widget values of ComfyUI files saved before them still fall on the right inputs
    timestep_sampling: Annotated[str, Input(COMBO, choices=TIMESTEP_SAMPLING,
                                            description="flow-matching models: how each image's noise level is "
                                                        "drawn: uniform (diffusers' default); logit_normal "
                                                        "(kohya's sigmoid); shift (logit-normal shifted by the "
                                                        "schedule's shift, kohya's shift); resolution_shift "
                                                        "(shifted by the image size as the sampler shifts)")] = "uniform"
    guidance: Annotated[float, Input(FLOAT, min=0.0, max=100.0, step=0.1,
                                     description="guidance-distilled models: the guidance scale they are given "
                                                 "while training (1 is kohya's advice); ignored by others")] = 1.0

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
        import torch

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
