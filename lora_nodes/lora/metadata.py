"""What a LoRA file's metadata tells a person: trigger words, base model, training settings."""

from __future__ import annotations

import json
import math
from typing import Any

TRIGGER_LIMIT = 10


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
