"""What a LoRA file's metadata tells a person: trigger words, base model, training settings."""

from __future__ import annotations

import json
from typing import Any

TRIGGER_LIMIT = 10


def tag_frequency(metadata: dict[str, str]) -> dict[str, int]:
    """Caption tags and how often they occurred in training, summed over dataset folders.

    kohya writes ``ss_tag_frequency`` as ``{folder: {tag: count}}``.
    """
    try:
        folders = json.loads(metadata.get("ss_tag_frequency") or "{}")
    except json.JSONDecodeError:
        return {}
    counts: dict[str, int] = {}
    for tags in folders.values() if isinstance(folders, dict) else ():
        for tag, count in (tags.items() if isinstance(tags, dict) else ()):
            tag = tag.strip()
            if tag:
                counts[tag] = counts.get(tag, 0) + int(count)
    return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def trigger_words(metadata: dict[str, str], limit: int = TRIGGER_LIMIT) -> list[str]:
    """The words to put in a prompt: the ModelSpec trigger phrase, else the most frequent tags."""
    phrase = metadata.get("modelspec.trigger_phrase", "").strip()
    if phrase:
        return [w.strip() for w in phrase.split(",") if w.strip()]
    return list(tag_frequency(metadata))[:limit]


def training_summary(metadata: dict[str, str]) -> dict[str, Any]:
    """The training facts a file records (kohya ``ss_*`` and ModelSpec keys), by plain names."""
    fields = {
        "base_model_version": ("ss_base_model_version", "modelspec.architecture"),
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
