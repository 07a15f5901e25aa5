"""A LoRA file's metadata: kohya's ``ss_*`` keys (and ModelSpec's), read for people, written for tools.

Reading tells a person the trigger words, base model and training settings; writing gives other
tools (kohya sd-scripts, A1111, ComfyUI) the keys sd-scripts writes. Callers pass in plain values
(ranks, a base model version), so this module imports nothing else of the package and every part
of it (file reading, saving, training) can use it.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping
from typing import Any

from ..families import LoRATarget

TRIGGER_LIMIT = 10
BASE_MODEL_VERSION = "ss_base_model_version"  # kohya's name for the model family a LoRA was trained on


def tag_frequency(metadata: dict[str, str]) -> dict[str, int]:
    """Caption tags and how often they occurred in training, summed over dataset folders.

    kohya writes ``ss_tag_frequency`` as ``{folder: {tag: count}}``. Parts that do not parse are
    left out (:func:`metadata_warnings` says which).
    """
    return _parse_tag_frequency(metadata)[0]


def metadata_warnings(metadata: dict[str, str]) -> list[str]:
    """What in a LoRA's metadata does not parse, for people; the weights load regardless."""
    return _parse_tag_frequency(metadata)[1]


def _parse_tag_frequency(metadata: dict[str, str]) -> tuple[dict[str, int], list[str]]:
    raw = metadata.get("ss_tag_frequency")
    if not raw:
        return {}, []
    try:
        folders = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        return {}, [f"ss_tag_frequency is not JSON ({str(exc)[:80]}); no trigger words from it"]
    if not isinstance(folders, dict):
        kind = type(folders).__name__
        return {}, [f"ss_tag_frequency is a JSON {kind}, not {{folder: {{tag: count}}}}; no trigger words from it"]
    counts: dict[str, int] = {}
    bad: list[str] = []
    for folder, tags in folders.items():
        if not isinstance(tags, dict):
            bad.append(f"folder {folder!r} holds a {type(tags).__name__}")
            continue
        for tag, count in tags.items():
            number = _count(count)
            if number is None:
                bad.append(f"{tag!r}: {count!r}")
            elif tag.strip():
                counts[tag.strip()] = counts.get(tag.strip(), 0) + number
    warnings = []
    if bad:
        entries = "1 entry" if len(bad) == 1 else f"{len(bad)} entries"
        warnings.append(f"ss_tag_frequency: {entries} not {{tag: count}} ({', '.join(bad[:3])}); "
                        "trigger words leave them out")
    return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))), warnings


def _count(value: Any) -> int | None:
    """A tag count: a whole, finite, non-negative JSON number (kohya writes ints), else None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    if isinstance(value, float) and not (math.isfinite(value) and value.is_integer()):
        return None
    return int(value) if value >= 0 else None


def trigger_words(metadata: dict[str, str], limit: int = TRIGGER_LIMIT) -> list[str]:
    """The words to put in a prompt: the ModelSpec trigger phrase, else the most frequent tags."""
    phrase = metadata.get("modelspec.trigger_phrase", "").strip()
    if phrase:
        return [w.strip() for w in phrase.split(",") if w.strip()]
    return list(tag_frequency(metadata))[:limit]


def training_summary(metadata: dict[str, str]) -> dict[str, Any]:
    """The training facts a file records (kohya ``ss_*`` and ModelSpec keys), by plain names."""
    fields = {
        "base_model_version": (BASE_MODEL_VERSION, "modelspec.architecture"),
        "base_model": ("ss_sd_model_name",),
        "network_module": ("ss_network_module",),
        "rank": ("ss_network_dim",),
        "alpha": ("ss_network_alpha",),
        "resolution": ("ss_resolution", "modelspec.resolution"),
        "steps": ("ss_max_train_steps", "ss_steps"),
        "epochs": ("ss_num_epochs", "ss_epoch"),
        "learning_rate": ("ss_learning_rate",),
        "images": ("ss_num_train_images",),
        "title": ("modelspec.title", "ss_output_name"),
    }
    summary = {}
    for name, keys in fields.items():
        value = next((metadata[k] for k in keys if metadata.get(k) not in (None, "", "None")), None)
        if value is not None:
            summary[name] = value
    return summary


# --------------------------------------------------------------------------- writing


def ss_metadata(metadata: Mapping[str, str]) -> dict[str, str]:
    """Only kohya's ``ss_*`` keys of ``metadata`` (what sd-scripts keeps and hashes)."""
    return {k: v for k, v in metadata.items() if k.startswith("ss_")}


def _one_or_dynamic(values: set, kind: type) -> str:
    """The one value as sd-scripts writes it (dim an int, alpha a float); ``Dynamic`` when modules
    differ, as kohya's ``resize_lora.py`` writes it."""
    return str(kind(values.pop())) if len(values) == 1 else "Dynamic"


def network_metadata(source: Mapping[str, str], *, lycoris: bool, dims: set[int], alphas: set[float],
                     base_model_version: str | None, network_module: str = "networks.lora") -> dict[str, str]:
    """The ``ss_*`` metadata of a LoRA file we write: ``source``'s, with network module, dim, alpha and
    base version set.

    ``lycoris``: some module is not a plain low-rank pair (``lycoris.kohya``, else ``network_module``,
    the family's: ``networks.lora`` for Stable Diffusion);
    ``dims`` and ``alphas``: those of the modules that have a rank (none: dim and alpha are kept).
    """
    metadata = ss_metadata(source)
    metadata["ss_network_module"] = "lycoris.kohya" if lycoris else network_module
    if dims:
        metadata["ss_network_dim"] = _one_or_dynamic(set(dims), int)
        metadata["ss_network_alpha"] = _one_or_dynamic(set(alphas), float)
    if base_model_version:
        metadata[BASE_MODEL_VERSION] = base_model_version
    return metadata


def training_metadata(config: Any, dataset: Any, base: LoRATarget, name: str, started: float, autocast: str, *,
                      base_model_version: str) -> dict[str, str]:
    """The keys sd-scripts writes for a LoRA we trained: network, hyperparameters, dataset folders
    and tag frequency, so other tools read how it was made.

    ``config`` is the run's :class:`~lora_nodes.training.config.TrainConfig`, ``base`` the model it
    trained on, ``base_model_version`` kohya's name for that model's family.
    """
    resolution = dataset.resolution or base.native_size
    described = dataset.describe()
    text_lr = config.text_lr() if config.train_text_encoder else 0.0
    epoch_images = len(dataset)
    steps_per_epoch = max(1, -(-epoch_images // (config.batch_size * config.gradient_accumulation)))
    metadata = {
        "ss_output_name": name,
        "ss_sd_model_name": base.source,
        BASE_MODEL_VERSION: base_model_version,
        "ss_network_module": base.family.kohya_network_module,
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
