"""The node catalogue: every node type, declared once in its family's module."""

from __future__ import annotations

from functools import lru_cache

from .spec import Catalogue


@lru_cache(maxsize=1)
def catalogue() -> Catalogue:
    """All node types a workflow may use, by id: ours, then the ComfyUI core nodes we run headless.

    Declaring them imports no model library (torch, diffusers, numpy, PIL): a node module imports at
    its top what its declarations and preflights use, its run functions import what running needs,
    and the types of its values are imported under ``TYPE_CHECKING`` (see :mod:`.spec`). So
    ``lora-nodes validate``, ``nodes`` and ``convert`` answer in a fraction of a second
    (tests/test_quick_commands.py holds them to it).
    """
    # deferred: every node module, a tenth of a second; ``nodes.spec`` alone (declarations) must stay cheap
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
