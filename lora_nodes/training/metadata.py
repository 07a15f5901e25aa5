"""kohya's ``ss_*`` metadata for a LoRA we trained, so other tools read how it was made."""

from __future__ import annotations

import json
import time

from ..lora.save import kohya_version
from .config import TrainConfig


def training_metadata(config: TrainConfig, dataset, base, name: str, started: float,
                      autocast: str) -> dict[str, str]:
    """The keys sd-scripts writes: network, hyperparameters, dataset folders and tag frequency."""
    resolution = dataset.resolution or base.native_size
    described = dataset.describe()
    text_lr = config.text_lr() if config.train_text_encoder else 0.0
    epoch_images = len(dataset)
    steps_per_epoch = max(1, -(-epoch_images // (config.batch_size * config.gradient_accumulation)))
    metadata = {
        "ss_output_name": name,
        "ss_sd_model_name": base.source,
        "ss_base_model_version": kohya_version(base),
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(config.rank),
        "ss_network_alpha": str(float(config.alpha)),
        "ss_network_args": json.dumps({"target": config.target, **(
            {"conv_dim": str(config.rank), "conv_alpha": str(float(config.alpha))} if config.target == "all" else {})}),
        "ss_network_train_unet_only": str(not config.train_text_encoder),
        "ss_learning_rate": str(config.learning_rate),
        "ss_unet_lr": str(config.learning_rate),
        "ss_text_encoder_lr": str(text_lr),
        "ss_lr_scheduler": config.lr_scheduler,
        "ss_lr_warmup_steps": str(config.lr_warmup_steps),
        "ss_optimizer": "torch.optim.AdamW(weight_decay=0.01)" if config.optimizer == "adamw"
        else "torch.optim.SGD(momentum=0.9)",
        "ss_max_train_steps": str(config.steps),
        "ss_steps": str(config.steps),
        "ss_num_epochs": str(-(-config.steps // steps_per_epoch)),
        "ss_batch_size_per_device": str(config.batch_size),
        "ss_gradient_accumulation_steps": str(config.gradient_accumulation),
        "ss_seed": str(config.seed),
        "ss_min_snr_gamma": str(config.min_snr_gamma or None),
        "ss_noise_offset": str(config.noise_offset or None),
        "ss_max_grad_norm": str(config.max_grad_norm),
        "ss_mixed_precision": autocast,
        "ss_gradient_checkpointing": str(config.gradient_checkpointing),
        "ss_cache_latents": str(config.cache_latents),
        "ss_resolution": str((resolution, resolution)),
        "ss_enable_bucket": str(dataset.crop == "buckets"),
        "ss_num_train_images": str(epoch_images),
        "ss_caption_extension": described.get("caption_extension", ".txt"),
        "ss_shuffle_caption": str(dataset.shuffle_captions),
        "ss_keep_tokens": str(dataset.keep_tokens),
        "ss_flip_aug": str(dataset.flip),
        "ss_dataset_dirs": json.dumps(described.get("folders", {})),
        "ss_tag_frequency": json.dumps(dataset.tag_frequency()),
        "ss_training_started_at": str(started),
        "ss_training_finished_at": str(time.time()),
        "ss_training_comment": "trained with lora-nodes TrainLoRA",
    }
    return metadata

