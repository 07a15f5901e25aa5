"""The bridge to ComfyUI's own models: our LoRAs (loaded, merged, resized, extracted or trained by
our nodes) applied to ComfyUI's MODEL and CLIP, so they feed its KSampler, ControlNets, upscalers.

Inside ComfyUI, MODEL is its ModelPatcher and CLIP its CLIP object: the nodes clone them and add
patches, as ComfyUI's LoraLoader does, so its weight backup, offloading and caching keep working.
Where each LoRA module goes, and the change it makes, are ours (:mod:`lora_nodes.models.hosted`,
:mod:`lora_nodes.lora.hosted`): every format we read, our key placement, and one structured
message for the keys that found no place. Headless, MODEL and CLIP are our core nodes' recipes
and the nodes add the LoRA as LoraLoader does.
"""

from __future__ import annotations

import importlib
import weakref
from functools import cache
from typing import TYPE_CHECKING, Annotated, Any

from .. import families
from ..errors import NodeError
from ..lora.model import LoRA
from ..lora.placement import check_placement, describe_unplaced
from .core.loaders import add_lora
from .core.values import ClipRecipe
from .lora import apply_lora_preflight, apply_lora_stack_preflight, strength
from .spec import CLIP, CORE_MODEL, LORA, LORA_STACK, Input, Output, node

if TYPE_CHECKING:  # annotations only: declaring the nodes must not import torch
    from ..lora.hosted import HostPatch
    from ..lora.recipe import AppliedLoRA
    from ..models.hosted import HostedModel

ADAPTER_MODULE = "comfy.weight_adapter"  # ComfyUI's weight adapters (v0.3.30 and later): our patches join them


MODEL_INPUT = Input(CORE_MODEL, description="the diffusion model (ComfyUI's MODEL, e.g. from Load Checkpoint)")
CLIP_INPUT = Input(CLIP, optional=True, description="the text encoders (ComfyUI's CLIP); leave unconnected for "
                                                   "the diffusion model alone")
OUTPUTS = [Output("model", CORE_MODEL, "the diffusion model with the LoRA, for KSampler and other ComfyUI nodes"),
           Output("clip", CLIP, "the text encoders with the LoRA (nothing when no CLIP was connected)")]


@node(
    "ApplyLoRAToModel",
    display_name="Apply LoRA to MODEL and CLIP",
    category="lora",
    outputs=OUTPUTS,
    preflight=apply_lora_preflight,
)
def apply_lora_to_model(
    ctx,
    model: Annotated[Any, MODEL_INPUT],
    lora: Annotated[LoRA, Input(LORA, description="a LoRA from our nodes: Load LoRA, Merge, Resize, Extract, Train")],
    clip: Annotated[Any, CLIP_INPUT] = None,
    strength_model: Annotated[float, strength("diffusion model (the picture)")] = 1.0,
    strength_clip: Annotated[float, strength("text encoders (how the prompt is read)")] = 1.0,
):
    """Apply one of our LoRAs to ComfyUI's MODEL and CLIP, as ComfyUI's Load LoRA applies a file:
    any format we read (LyCORIS, DoRA, merged or trained here), placed by our rules."""
    from ..lora.recipe import AppliedLoRA

    return _apply(ctx, model, clip, [AppliedLoRA(lora, strength_model, strength_clip)])


@node(
    "ApplyLoRAStackToModel",
    display_name="Apply LoRA Stack to MODEL and CLIP",
    category="lora",
    outputs=OUTPUTS,
    preflight=apply_lora_stack_preflight,
)
def apply_lora_stack_to_model(
    ctx,
    model: Annotated[Any, MODEL_INPUT],
    stack: Annotated[tuple[AppliedLoRA, ...], Input(LORA_STACK, description="LoRAs with their strengths "
                                                                           "(LoRA Stack); text strengths go to CLIP")],
    clip: Annotated[Any, CLIP_INPUT] = None,
):
    """Apply every LoRA of a stack to ComfyUI's MODEL and CLIP, in order, each at its own strengths."""
    return _apply(ctx, model, clip, list(stack))


def _apply(ctx, model: Any, clip: Any, applied: list[AppliedLoRA]) -> tuple[Any, Any]:
    from ..lora.recipe import ModelRecipe

    if isinstance(model, ModelRecipe):  # headless: our core nodes' MODEL and CLIP
        if clip is not None and not isinstance(clip, ClipRecipe):
            raise NodeError("clip is not a CLIP from a loader node")
        for item in applied:
            model, clip = add_lora(ctx, model, clip, item.lora, item.strength_model, item.strength_text)
        return model, clip
    return _apply_in_comfyui(ctx, model, clip, applied)


# --------------------------------------------------------------------------- inside ComfyUI


def _apply_in_comfyui(ctx, model: Any, clip: Any, applied: list[AppliedLoRA]) -> tuple[Any, Any]:
    """Clones of ComfyUI's ``model`` (ModelPatcher) and ``clip`` (CLIP) with our patches added."""
    from ..lora.hosted import host_patches
    from ..models.hosted import HOST_DENOISER_PREFIX

    if not (hasattr(model, "clone") and hasattr(model, "add_patches")):
        raise NodeError(f"model is a {type(model).__name__}, not ComfyUI's MODEL or one from a loader node")
    hosted = _hosted(model, clip)
    patch_class = _patch_class()
    new_model = model.clone()
    new_clip = clip.clone() if clip is not None else None
    for item in applied:
        if item.strength_model == 0 and (item.strength_text == 0 or new_clip is None):
            continue  # changes nothing (ComfyUI's LoraLoader does not even read the file then)
        placement = check_placement(item.lora, hosted.base)
        made = host_patches(placement, hosted.base, hosted.pieces, patch_class)
        on_model = {k: p for k, p in made.patches.items() if _host_key(k).startswith(HOST_DENOISER_PREFIX)}
        on_clip = {k: p for k, p in made.patches.items() if k not in on_model}
        refused = set(on_model) - set(new_model.add_patches(on_model, item.strength_model)) if item.strength_model else set()
        if new_clip is not None and item.strength_text:
            refused |= set(on_clip) - set(new_clip.add_patches(on_clip, item.strength_text))
        _report(ctx, item.lora, placement, made.unheld, refused, _text_keys_left(item.lora, placement, new_clip))
    return new_model, new_clip


def _text_keys_left(lora: LoRA, placement, clip: Any) -> int:
    """How many of ``lora``'s text-encoder modules are left out because no CLIP is connected."""
    if clip is not None:
        return 0
    return sum(1 for key in lora.modules
               if key not in placement.sources and families.component_of(key) in families.TEXT_COMPONENTS)


def _host_key(key: Any) -> str:
    return key if isinstance(key, str) else key[0]


def _report(ctx, lora: LoRA, placement, unheld: dict[str, str], refused: set, clip_left: int) -> None:
    """One message for everything of ``lora`` that is not applied, grouped by reason."""
    unplaced = dict(placement.unplaced)
    unplaced.update({placement.placed[target].key: reason for target, reason in unheld.items()})
    unplaced.update({f"{_host_key(key)}": "ComfyUI's model refused the patch (no such weight)" for key in refused})
    if unplaced:
        ctx.warn(f"{placement.summary(lora)}; not applied: {describe_unplaced(unplaced)}",
                 lora=lora.name, unplaced=unplaced)
    if clip_left:
        ctx.warn(f"LoRA '{lora.name}': its {clip_left} text-encoder modules are not applied: no CLIP is connected "
                 "(connect the checkpoint's CLIP to apply them)", lora=lora.name)


# ComfyUI model -> (its CLIP, or the model itself for none) -> the base it is for us: built once per pair
_HOSTED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _hosted(model: Any, clip: Any) -> HostedModel:
    """The base ComfyUI's ``model`` (and ``clip``) is for us, built once for the pair while they live."""
    from ..models.hosted import hosted_model

    inner = model.model
    text = clip.cond_stage_model if clip is not None else inner
    known = _HOSTED.setdefault(inner, weakref.WeakKeyDictionary())
    if text not in known:
        shapes = {key: tuple(tensor.shape) for key, tensor in model.model_state_dict().items()}
        if clip is not None:
            shapes.update({key: tuple(tensor.shape) for key, tensor in clip.patcher.model_state_dict().items()})
        known[text] = hosted_model(shapes, f"ComfyUI's {type(inner).__name__} model")
    return known[text]


@cache
def _patch_class() -> type[HostPatch]:
    """Our patch as one of ComfyUI's weight adapters (which its ModelPatcher asks for the weight)."""
    from ..lora.hosted import HostPatch

    try:
        adapters = importlib.import_module(ADAPTER_MODULE)
    except ImportError:
        raise NodeError("this ComfyUI is too old for lora-nodes' LoRAs on its models (it has no weight adapters, "
                        "added in v0.3.30): update ComfyUI") from None
    return type("LoRANodesPatch", (HostPatch, adapters.WeightAdapterBase), {})


SPECS = [apply_lora_to_model, apply_lora_stack_to_model]
