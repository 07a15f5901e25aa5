"""Nodes that make new LoRAs from LoRAs or models: merge, resize, extract."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any

from .. import families
from ..errors import LoRAError
from ..lora.model import FullModule, LoRA, LoRAModule, Module
from ..lora.placement import check_placement, module_namings, naming_conflict
from .lora import FAMILY_MISMATCH, lora_problems
from .spec import COMBO, FLOAT, INT, LORA, LORA_STACK, MODEL, STRING, Input, Output, Preflight, node

if TYPE_CHECKING:  # annotations only: declaring the nodes must not import torch
    from ..lora import ops
    from ..lora.recipe import AppliedLoRA, ModelRecipe

MERGE_METHODS = ("concat", "svd", "ties", "dare_linear", "dare_ties")


def to_lowrank(module: Module) -> ops.LowRank:
    """A module as a plain low-rank pair: exact (other formats by SVD at their numerical rank)."""
    from ..lora import ops
    from ..lora.save import to_plain

    if module.dora_scale is not None:
        raise LoRAError(f"module '{module.key}' is DoRA: its effect depends on the base weight, so it cannot be "
                        "merged or resized on its own; apply it to a model and use ExtractLoRA instead")
    if not module.is_plain:
        module, _ = to_plain(module, None, None, 0)
    return ops.LowRank(module.up.float(), module.down.float(),
                       module.alpha if module.alpha is not None else float(module.rank))


def from_lowrank(key: str, lowrank: ops.LowRank) -> LoRAModule:
    return LoRAModule(key=key, alpha=lowrank.alpha, down=lowrank.down, up=lowrank.up)


def _keyed_modules(ctx, applied: AppliedLoRA, model: ModelRecipe | None) -> dict[str, Module]:
    """A LoRA's modules by target when a model is given (so namings can mix), else by file key."""
    if model is None:
        return applied.lora.modules
    placement = check_placement(applied.lora, model.base)
    if placement.unplaced:
        ctx.warn(f"{placement.summary(applied.lora)}; {len(placement.unplaced)} could not be placed and are "
                 "left out of the merge", lora=applied.lora.name, unplaced=placement.unplaced)
    return placement.placed


CONNECT_MODEL = ("merged by name, one of them would never be applied; connect the 'model' input (the base they "
                 "are for) so that names are matched through its modules")


def _check_one_naming(stack: tuple[AppliedLoRA, ...]) -> None:
    """Without a model, LoRAs that spell the same modules differently cannot be merged exactly: refuse them."""
    conflict = naming_conflict([(a.lora.name, module_namings(a.lora.modules)) for a in stack])
    if conflict:
        raise LoRAError(f"MergeLoRAs input 'model' is not connected, and the LoRAs name modules differently "
                        f"({conflict}): {CONNECT_MODEL}.")


def merge_preflight(literals: dict[str, Any], upstream: dict[str, dict[str, Any]]) -> Preflight:
    """MergeLoRAs: LoRAs for the model's family (or one family among them), and one naming without a model."""
    loras = upstream.get("stack", {}).get("loras", [])
    if "model" in upstream:
        model = upstream["model"]
        return Preflight(facts={"family": model.get("family"), "name": "merge"},
                         problems=lora_problems(loras, model, "stack"))
    problems = []
    made_for = {lora["family"]: lora.get("name", "?") for lora in loras if lora.get("family")}
    if len(made_for) > 1:
        mixed = " and ".join(f"{families.describe(families.by_id(f))} ('{name}')" for f, name in sorted(made_for.items()))
        problems.append((FAMILY_MISMATCH, "stack", f"the stack mixes LoRAs for {mixed}; a merge of them fits no base"))
    named = [(lora.get("name", "?"), {c: set(n) for c, n in lora["namings"].items()}) for lora in loras
             if "namings" in lora]
    conflict = naming_conflict(named)
    if conflict:
        problems.append(("missing_input", "model", f"the LoRAs name modules differently ({conflict}): {CONNECT_MODEL}"))
    family = next(iter(made_for)) if len(made_for) == 1 else None
    return Preflight(facts={"family": family, "name": "merge"}, problems=problems)


def _summary(name: str, energies: list[float], ranks: list[int]) -> str:
    import statistics

    if not energies:
        return f"{name}: no modules"
    return (f"{name}: {len(energies)} modules, rank {min(ranks)}..{max(ranks)}, energy kept "
            f"min {min(energies):.4f} mean {statistics.fmean(energies):.4f}")


@node(
    "MergeLoRAs",
    display_name="Merge LoRAs",
    category="lora/tools",
    outputs=[Output("lora", LORA), Output("report", STRING, "what the merge kept")],
    preflight=merge_preflight,
)
def merge_loras(
    ctx,
    stack: Annotated[tuple[AppliedLoRA, ...], Input(LORA_STACK, description="the LoRAs to merge; each slot's "
                                                                            "strengths weight it")],
    method: Annotated[str, Input(COMBO, choices=MERGE_METHODS,
                                 description="concat: exact (rank adds up); svd: exact sum cut to `rank`; "
                                             "ties/dare: PEFT's merges")] = "concat",
    rank: Annotated[int, Input(INT, min=0, max=4096, description="svd: target rank (0: the largest input rank); "
                                                                 "ties/dare: 0 keeps full deltas")] = 0,
    density: Annotated[float, Input(FLOAT, min=0.0, max=1.0, step=0.01,
                                    description="ties/dare: fraction of values kept")] = 0.5,
    # no "randomize" control in ComfyUI's editor: the same inputs give the same merge on every queue
    seed: Annotated[int, Input(INT, min=0, max=2**63 - 1, seed_control=False,
                               description="dare: the random drop pattern")] = 0,
    model: Annotated[ModelRecipe | None, Input(MODEL, optional=True,
                                               description="the base the LoRAs are for: lets LoRAs with different "
                                                           "key namings merge")] = None,
):
    """Merge a stack of LoRAs into one LoRA (strengths included), module by module.

    Without a model, modules are matched by their names in the files, so LoRAs of different
    namings (kohya and diffusers/PEFT) are refused: connect the model to merge those.
    """
    if not stack:
        raise LoRAError("the stack is empty: connect at least one LoRA")
    if model is None:
        _check_one_naming(stack)
    keyed = [(_keyed_modules(ctx, applied, model), applied) for applied in stack]
    keys = list(dict.fromkeys(k for modules, _ in keyed for k in modules))
    merged, energies, ranks = {}, [], []
    for key in keys:
        parts = [(modules[key], applied.strength_for(key)) for modules, applied in keyed if key in modules]
        module, energy = _merge_module(key, parts, method, rank, density, seed)
        merged[key] = module
        energies.append(energy)
        ranks.append(module.rank or 0)
    report = _summary(f"merged {len(stack)} LoRAs by {method}", energies, ranks)
    ctx.info(report, energy_kept=dict(zip(keys, energies)))
    name = "+".join(applied.lora.name for applied in stack)
    return LoRA(f"merge({name})", "diffusers" if model else stack[0].lora.format, merged), report


def _merge_module(key: str, parts: list[tuple[Module, float]], method: str, rank: int, density: float,
                  seed: int) -> tuple[Module, float]:
    from ..lora import ops

    lowranks = [(to_lowrank(m), w) for m, w in parts]
    if method == "concat":
        return from_lowrank(key, ops.concat(lowranks)), 1.0
    if method == "svd":
        merged, energy = ops.svd_merge(lowranks, rank or max(lr.rank for lr, _ in lowranks))
        return from_lowrank(key, merged), energy
    shape = lowranks[0][0].shape
    deltas = [(lr.delta(shape), w) for lr, w in lowranks]
    if method == "ties":
        delta = ops.ties(deltas, density)
    else:
        merge = ops.dare_linear if method == "dare_linear" else ops.dare_ties
        delta = merge(deltas, density, seed)
    if rank == 0:
        return FullModule(key=key, diff=delta), 1.0
    lowrank, energy = ops.svd_lowrank(delta, rank)
    return from_lowrank(key, lowrank), energy


@node(
    "ResizeLoRA",
    display_name="Resize LoRA",
    category="lora/tools",
    outputs=[Output("lora", LORA), Output("report", STRING, "per-module ranks and error")],
    preflight=lambda literals, upstream: Preflight(facts=dict(upstream.get("lora", {}))),  # same modules, names, family
)
def resize_lora(
    ctx,
    lora: Annotated[LoRA, Input(LORA)],
    rank: Annotated[int, Input(INT, min=0, max=4096, description="fixed: the new rank; sv_fro/sv_ratio: the most "
                                                                 "it may keep (0: the current rank)")] = 0,
    rule: Annotated[str, Input(COMBO, choices=("fixed", "sv_fro", "sv_ratio"),
                               description="fixed rank; keep a Frobenius fraction; keep singular values above "
                                           "largest/threshold")] = "fixed",
    threshold: Annotated[float, Input(FLOAT, min=0.0, max=10000.0, step=0.001,
                                      description="sv_fro: the fraction to keep (0..1); sv_ratio: the ratio to "
                                                  "the largest")] = 0.9,
):
    """Change a LoRA's rank by SVD (as kohya's resize_lora does), reporting each module's new rank and error."""
    from ..lora import ops

    if rule == "fixed" and rank == 0:
        raise LoRAError("rule 'fixed' needs a rank above 0")
    modules, lines, stats = {}, [], {}
    for key, module in lora.modules.items():
        options = {"fro": threshold} if rule == "sv_fro" else {"ratio": threshold} if rule == "sv_ratio" else {}
        resized, info = ops.resize(to_lowrank(module), rank or None, **options)
        modules[key] = from_lowrank(key, resized)
        stats[key] = {"rank": info["rank"], "rel_error": info["rel_error"]}
        lines.append(f"{key}: rank {module.rank} -> {info['rank']}, relative error {info['rel_error']:.4f}")
    errors = [s["rel_error"] for s in stats.values()]
    head = (f"resized {len(modules)} modules ({rule}): ranks {min(s['rank'] for s in stats.values())}.."
            f"{max(s['rank'] for s in stats.values())}, relative error max {max(errors):.4f}")
    ctx.info(head, modules=stats)
    return LoRA(f"{lora.name}-resized", lora.format, modules, dict(lora.metadata)), "\n".join([head, *lines])


def extract_preflight(literals: dict[str, Any], upstream: dict[str, dict[str, Any]]) -> Preflight:
    """ExtractLoRA: both models of one family; the LoRA made is for it."""
    a, b = upstream.get("model_a", {}), upstream.get("model_b", {})
    problems = []
    family_a, family_b = families.by_id(a.get("family")), families.by_id(b.get("family"))
    if families.mismatch(family_b, family_a):
        message = (f"model_b is {families.describe(family_b)}, model_a is {families.describe(family_a)}: "
                   "a LoRA is extracted between two models of one family")
        problems.append((FAMILY_MISMATCH, "model_b", message))
    return Preflight(facts={"family": a.get("family"), "name": "extracted"}, problems=problems)


@node(
    "ExtractLoRA",
    display_name="Extract LoRA",
    category="lora/tools",
    outputs=[Output("lora", LORA), Output("report", STRING, "energy kept")],
    preflight=extract_preflight,
)
def extract_lora(
    ctx,
    model_a: Annotated[ModelRecipe, Input(MODEL, description="the model to start from (e.g. the base)")],
    model_b: Annotated[ModelRecipe, Input(MODEL, description="the model to reach (e.g. a fine-tune, or the base "
                                                             "with LoRAs)")],
    rank: Annotated[int, Input(INT, min=1, max=4096, description="rank for linear layers and 1x1 convs")] = 16,
    conv_rank: Annotated[int, Input(INT, min=0, max=4096, description="rank for 3x3 convs (0: leave them out)")] = 0,
    min_diff: Annotated[float, Input(FLOAT, min=0.0, max=1.0, step=1e-6,
                                     description="skip modules whose change is smaller than this fraction of "
                                                 "their weight")] = 1e-6,
):
    """A LoRA approximating model_b minus model_a by truncated SVD, for the UNet and the text encoders."""
    from ..lora import ops

    targets_a, targets_b = model_a.base.lora_targets, model_b.base.lora_targets
    plan_a, plan_b = model_a.patch_plan(), model_b.patch_plan()
    modules, energies, ranks = {}, [], []
    shared = [t for t in targets_a if t in targets_b and targets_a[t].weight.shape == targets_b[t].weight.shape]
    for done, target in enumerate(shared, start=1):
        ctx.progress(done, len(shared))
        weight = targets_a[target].weight
        k = conv_rank if weight.dim() == 4 and weight.shape[2:] != (1, 1) else rank
        if k == 0:
            continue
        wa, wb = model_a.weight(target, plan_a), model_b.weight(target, plan_b)
        if (wb - wa).norm() <= min_diff * wa.norm():
            continue
        lowrank, energy = ops.extract(wa, wb, k)
        modules[target] = from_lowrank(target, lowrank)
        energies.append(energy)
        ranks.append(lowrank.rank)
    if not modules:
        raise LoRAError("model_a and model_b do not differ in any module LoRAs can target: nothing to extract")
    report = _summary(f"extracted {len(modules)} of {len(shared)} modules", energies, ranks)
    ctx.info(report)
    return LoRA("extracted", "diffusers", modules), report



