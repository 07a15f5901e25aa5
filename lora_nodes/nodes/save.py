"""Nodes that write models: a LoRA file (kohya or diffusers naming) and a merged base model."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

from ..errors import NodeError
from ..fileio import atomic_write
from ..lora.model import LoRA
from .lora import save_lora_preflight
from .spec import BOOLEAN, COMBO, INT, LORA, MODEL, STRING, Input, node

if TYPE_CHECKING:  # annotations only: declaring the nodes must not import torch
    from torch import Tensor

    from ..lora.recipe import ModelRecipe

SUFFIX = ".safetensors"


def output_path(ctx, path: str, suffix: str = "") -> Path:
    """Where to write: inside the run's output folder, the sweep variant's suffix added to the name
    (before ``suffix``, which is appended when missing)."""
    target = ctx.output_path(path)
    name = target.name
    stem = name[: -len(suffix)] if suffix and name.lower().endswith(suffix) else name
    return target.with_name(f"{stem}{ctx.file_suffix}{suffix}")


def refuse_overwrite(target: Path, overwrite: bool) -> None:
    """Raise when ``target`` exists and ``overwrite`` is off: nothing is replaced silently."""
    if target.exists() and not overwrite:
        raise exists_error(target)


def exists_error(target: Path) -> NodeError:
    """The error for a save that would replace ``target`` without ``overwrite``."""
    return NodeError(f"{target} already exists; set overwrite to true to replace it, or choose another path")


# the overwrite input of every node that saves (its default, False, is each parameter's)
OVERWRITE = Input(BOOLEAN, description="replace an existing file or folder at path")


@node(
    "SaveLoRA",
    display_name="Save LoRA",
    category="io",
    preflight=save_lora_preflight,
    output_node=True,
)
def save_lora(
    ctx,
    lora: Annotated[LoRA, Input(LORA)],
    path: Annotated[str, Input(STRING, writes=True, folder="loras",
                               description="file to write, under the output folder (inside ComfyUI: under "
                                           "models/loras, where LoadLoRA lists it); .safetensors is "
                                           "added")] = "lora.safetensors",
    format: Annotated[str, Input(COMBO, choices=("kohya", "diffusers"),
                                 description="kohya: lora_unet_*/lora_te*_* keys (A1111, ComfyUI, sd-scripts); "
                                             "diffusers: unet.*.lora_A/lora_B keys (load_lora_weights)")] = "kohya",
    model: Annotated[ModelRecipe | None, Input(MODEL, optional=True,
                                               description="the base the LoRA is for: needed to convert names "
                                                           "between namings, and for DoRA")] = None,
    rank: Annotated[int, Input(INT, min=0, max=4096, description="rank for modules that must become plain LoRA "
                                                                 "(LoHa, LoKr, DoRA, full); 0: exact")] = 0,
    overwrite: Annotated[bool, OVERWRITE] = False,
):
    """Write a LoRA as a .safetensors file in kohya or diffusers naming.

    Headless the file goes under the output folder; inside ComfyUI under its models/loras folder,
    so that LoadLoRA lists it. A file already at ``path`` is replaced only with ``overwrite``; one
    that holds exactly this LoRA (the same graph queued again) is left as it is, without an error.

    Names are converted through the connected model only (never guessed). kohya files keep
    LyCORIS modules (LoHa, LoKr, DoRA, LoCon) as they are where kohya names the module as the file
    does, and carry sd-scripts' ss_* metadata and hashes; modules on weights that kohya's files
    hold fused (Flux's q/k/v) are fused, and LyCORIS ones among them become plain LoRA by SVD of
    their change. diffusers files hold plain LoRA only: other modules are converted by SVD of their
    change (reported when less than 99.99% of it is kept); DoRA is converted against the model's
    weights and equals the original at strength 1 only.
    """
    from ..lora.placement import check_placement
    from ..lora.save import ENERGY_WARNING, lora_file

    target = output_path(ctx, path, SUFFIX)
    base = model.base if model is not None else None
    if base is not None:
        check_placement(lora, base)
    built = lora_file(lora, format, base, rank)
    for name, energy in built.energy.items():
        if energy < ENERGY_WARNING:
            ctx.warn(f"module {name} kept {energy:.4%} of its change at rank {rank}",
                     module=name, energy=energy)
    from safetensors.torch import save_file

    if target.exists() and not overwrite:
        # the same graph queued again (its LoRA cached) finds its own file: nothing to write, nothing lost
        if not holds(target, built.tensors, built.metadata):
            raise exists_error(target)
        ctx.info(f"{target} already holds this LoRA (the same tensors and metadata): left as it is")
    else:
        try:  # the check again as the file is put in place (another writer may be quicker)
            atomic_write(target, lambda tmp: save_file(built.tensors, str(tmp), metadata=built.metadata), overwrite)
        except FileExistsError as exc:
            raise exists_error(target) from exc
    ctx.wrote(target)


def holds(target: Path, tensors: Mapping[str, Tensor], metadata: Mapping[str, str]) -> bool:
    """Whether the .safetensors file ``target`` holds exactly these tensors (names, dtypes, values) and
    this metadata. Compared as content: safetensors does not write its header in a fixed order, so two
    writes of one LoRA need not be equal byte for byte. A file that does not read holds nothing."""
    import torch
    from safetensors import safe_open

    try:
        with safe_open(str(target), "pt") as stored:
            if (stored.metadata() or {}) != dict(metadata) or set(stored.keys()) != set(tensors):
                return False
            for name, tensor in tensors.items():
                kept = stored.get_tensor(name)
                if kept.dtype != tensor.dtype or not torch.equal(kept, tensor.cpu()):
                    return False
    except Exception:  # noqa: BLE001 - a damaged or foreign file is simply not this LoRA
        return False
    return True


@node(
    "SaveModel",
    display_name="Save Model",
    category="io",
    output_node=True,
)
def save_model(
    ctx,
    model: Annotated[ModelRecipe, Input(MODEL)],
    path: Annotated[str, Input(STRING, writes=True, description="folder (diffusers) or file (single_file; "
                                                                ".safetensors is added) to write; relative paths "
                                                                "go under the output folder")] = "models/merged",
    format: Annotated[str, Input(COMBO, choices=("diffusers", "single_file"),
                                 description="diffusers: a pipeline folder; single_file: one checkpoint as "
                                             "A1111/ComfyUI load it (Stable Diffusion: every component; a "
                                             "BFL-layout transformer: the transformer alone, for ComfyUI's "
                                             "diffusion_models, its text encoders and VAE staying in their "
                                             "own files)")] = "diffusers",
    dtype: Annotated[str, Input(COMBO, choices=("same", "float16", "bfloat16", "float32"),
                                description="weight precision of the written model; same keeps the model's")] = "same",
    overwrite: Annotated[bool, OVERWRITE] = False,
):
    """Write the model with its LoRAs merged in, as a diffusers folder or one .safetensors file.

    Single files carry their configs and tokenizers in the metadata, so Load Base reads them back
    without a config folder. Where a family's single files hold the denoiser alone (a transformer in
    BFL names), Load Base takes the text encoders and VAE from their own files or a config folder
    with weights; a LoRA's changes to those parts are then not saved (a warning says so).
    """
    from ..models.save import save_diffusers_folder, save_single_file, single_file_parts

    single = format == "single_file"
    target = output_path(ctx, path, SUFFIX if single else "")
    refuse_overwrite(target, overwrite)
    base = model.materialize(final=ctx.last_weight_use)
    if single:
        warn_parts_left_out(ctx, model, single_file_parts(base))
    try:  # checked before the work, and again as the result is put in place (another writer may be quicker)
        if single:
            save_single_file(base, target, dtype, overwrite=overwrite)
        else:
            save_diffusers_folder(base, target, dtype, overwrite=overwrite)
    except FileExistsError as exc:  # with overwrite: a folder that is not a model, which is never replaced
        raise (NodeError(str(exc)) if overwrite else exists_error(target)) from exc
    ctx.wrote(target)


def warn_parts_left_out(ctx, model: ModelRecipe, kept: tuple[str, ...]) -> None:
    """Warn when the recipe's LoRAs change components that the file written holds no copy of."""
    changed = {target.split(".", 1)[0] for target in model.patch_plan()}
    left_out = sorted(changed - set(kept))
    if left_out:
        ctx.warn(f"the single file holds only the {', '.join(kept)}: the LoRA changes to the {', '.join(left_out)} "
                 "are not in it; save format diffusers to keep them", components=left_out)
