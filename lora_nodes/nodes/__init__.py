"""The node catalogue: every node type, declared once in its family's module."""

from __future__ import annotations

from functools import lru_cache

from .spec import Catalogue


@lru_cache(maxsize=1)
def catalogue() -> Catalogue:
    """All node types a workflow may use, by id: ours, then the ComfyUI core nodes we run headless."""
    # deferred: the node modules import torch; ``nodes.spec`` alone (declarations) must stay cheap
    from . import base, bridge, dataset, grid, images, lora, merge, sample, save, train
    from .core import core_specs

    return Catalogue([
        base.load_base,
        lora.load_lora,
        lora.apply_lora,
        lora.lora_stack,
        lora.apply_lora_stack,
        *bridge.SPECS,
        grid.grid_node,
        sample.sample,
        images.save_images,
        save.save_lora,
        save.save_model,
        merge.merge_loras,
        merge.resize_lora,
        merge.extract_lora,
        dataset.load_dataset,
        train.train_lora_node,
        *core_specs(),
    ])
