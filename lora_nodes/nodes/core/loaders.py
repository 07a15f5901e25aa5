"""ComfyUI core nodes: loaders of models and LoRAs (see the package docstring).

CheckpointLoaderSimple loads a base once and gives MODEL, CLIP and VAE over it. The part loaders
(UNETLoader, CLIPLoader, DualCLIPLoader, VAELoader) each load a base holding only their part.
LoraLoader and LoraLoaderModelOnly read LoRAs as LoadLoRA does (every format, the same checks and
errors) and add them to the recipes: MODEL's at strength_model, CLIP's at strength_clip.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any

from ... import families
from ...errors import LoRAError, NodeError
from ...lora.model import LoRA
from ...lora.placement import FAMILY_ADVICE
from ...models.builtin import BUILTINS
from ..base import COMPONENT_INPUTS, load_base_preflight
from ..lora import apply_to, load_lora, load_lora_preflight, lora_problems
from ..spec import CLIP, COMBO, CORE_MODEL, FLOAT, STRING, VAE, Input, Output, Preflight, node
from .values import ClipRecipe

if TYPE_CHECKING:  # annotations only: declaring the nodes must not import torch
    from ...lora.recipe import ModelRecipe
    from ...models.base import BaseModel

# ComfyUI's CLIPLoader and DualCLIPLoader ``type`` choices, in ComfyUI's order (its first is the
# default). A name that is no family of ours is still accepted as a choice (ComfyUI's files carry it);
# validation then says which names we run. DualCLIPLoader's names of families we run come from the
# families themselves, each at the place ComfyUI gives it (Family.comfy_dual_clip_place); the others
# are written here at theirs.
CLIP_TYPES = ("stable_diffusion", "stable_cascade", "sd3", "stable_audio", "mochi", "ltxv", "pixart", "cosmos",
              "lumina2", "wan", "hidream", "chroma", "ace", "omnigen2", "qwen_image", "hunyuan_image")
_DUAL_CLIP_OTHERS = {1: "sd3", 3: "hunyuan_video", 4: "hidream", 5: "hunyuan_image"}


def _dual_clip_types() -> tuple[str, ...]:
    """DualCLIPLoader's ``type`` choices: ours and the others, each at its place in ComfyUI's list."""
    places = dict(_DUAL_CLIP_OTHERS)
    for family in families.FAMILIES:
        if family.comfy_dual_clip_place is not None:
            if family.comfy_dual_clip_place in places:  # a family declared at a place already taken
                raise ValueError(f"{family.display_name}: DualCLIPLoader place {family.comfy_dual_clip_place} "
                                 f"is {places[family.comfy_dual_clip_place]!r}'s")
            places[family.comfy_dual_clip_place] = family.comfy_clip_types[0]
    return tuple(places[place] for place in sorted(places))


DUAL_CLIP_TYPES = _dual_clip_types()
CLIP_DEVICES = ("default", "cpu")
UNET_WEIGHT_DTYPES = ("default", "fp8_e4m3fn", "fp8_e4m3fn_fast", "fp8_e5m2")
UNSUPPORTED_TYPE = "unsupported_type"  # a ComfyUI CLIP type no family of ours has


def _model_file(kind: str, description: str, builtins: tuple[str, ...] = (), path_kind: str = "file") -> Input:
    """A model file input, found by name in the ``kind`` models folder (or a path); ``path_kind``
    "any" where a folder is taken too (a checkpoint may be a diffusers folder, as LoadBase takes)."""
    return Input(STRING, path=True, path_kind=path_kind, folder=kind, builtins=builtins, description=description)


def _lora_strength(what: str) -> Input:
    """A LoraLoader strength, with ComfyUI's range (the parameter gives its default, 1.0)."""
    return Input(FLOAT, min=-100.0, max=100.0, step=0.01,
                 description=f"how strongly to change the {what}; 0 leaves it as it was, negative inverts")


def _clip_device() -> Input:
    return Input(COMBO, choices=CLIP_DEVICES, optional=True,
                 description="cpu: run the text encoders on the CPU; default: where the base's other parts run")


# --------------------------------------------------------------------------- preflight


def checkpoint_preflight(literals: dict[str, Any], upstream: dict[str, dict[str, Any]]) -> Preflight:
    """CheckpointLoaderSimple before running: the family of the checkpoint, as LoadBase tells it."""
    found = load_base_preflight({"source": literals.get("ckpt_name")}, upstream)
    # LoadBase would take the parts a file lacks from inputs of its own; here they come from other loaders
    lacking = [name for code, name, _ in found.problems if code == "missing_input" and name in COMPONENT_INPUTS]
    dropped = {*lacking, "config"} if lacking else set()  # a config folder would not give the parts either
    problems = [(code, "ckpt_name", message) for code, name, message in found.problems if name not in dropped]
    if lacking:
        advice = (f"this file holds no {', '.join(lacking)}: load a diffusion model alone with UNETLoader, text "
                  "encoders with CLIPLoader or DualCLIPLoader and a VAE with VAELoader")
        problems.append(("missing_input", "ckpt_name", advice))
    return Preflight(facts=found.facts, problems=problems)


def clip_type_preflight(literals: dict[str, Any], upstream: dict[str, dict[str, Any]]) -> Preflight:
    """CLIPLoader / DualCLIPLoader: a ``type`` that no family of ours has is refused, naming those we run."""
    name = literals.get("type")
    problem = clip_type_problem(name) if isinstance(name, str) else None
    if problem:
        return Preflight(problems=[(UNSUPPORTED_TYPE, "type", problem)])
    # a type that only one family has tells the family downstream (a KSampler then compares it with the model's)
    named = [family for family in families.FAMILIES if name in family.comfy_clip_types]
    return Preflight(facts={"family": named[0].id} if len(named) == 1 else {})


def clip_type_problem(name: str) -> str | None:
    """Why ComfyUI's CLIP ``type`` ``name`` cannot be loaded here (naming the types we run), or None."""
    ours = [t for family in families.FAMILIES for t in family.comfy_clip_types]
    if name in ours:
        return None
    return f"type {name!r} is for a model family lora-nodes does not run; the types it runs are {', '.join(dict.fromkeys(ours))}"


def lora_loader_preflight(literals: dict[str, Any], upstream: dict[str, dict[str, Any]]) -> Preflight:
    """LoraLoader(ModelOnly): the LoRA file's header must read, and be for the model's family.

    Both strengths 0: ComfyUI does not even read the file, and neither does the node (no problems).
    """
    model = upstream.get("model", {})
    if _changes_nothing(literals.get("strength_model", 1.0), literals.get("strength_clip", 0.0)):
        return Preflight(facts=dict(model))
    found = load_lora_preflight({"path": literals.get("lora_name")}, upstream)
    problems = [(code, "lora_name", message) for code, _, message in found.problems]
    if found.facts:
        problems += lora_problems([found.facts], model, "lora_name")
    return Preflight(facts=dict(model), problems=problems)


def _changes_nothing(strength_model: Any, strength_clip: Any) -> bool:
    return strength_model == 0 and strength_clip == 0


# --------------------------------------------------------------------------- model loaders


@node(
    "CheckpointLoaderSimple",
    display_name="Load Checkpoint",
    category="loaders",
    outputs=[
        Output("MODEL", CORE_MODEL, "the model used for denoising latents"),
        Output("CLIP", CLIP, "the text encoders, for encoding prompts"),
        Output("VAE", VAE, "the VAE, for encoding and decoding images to and from latent space"),
    ],
    preflight=checkpoint_preflight,
    comfy_core=True,
)
def checkpoint_loader_simple(
    ctx,
    ckpt_name: Annotated[str, _model_file("checkpoints", "a checkpoint: its name in the checkpoints folder, a "
                                          "single-file .safetensors, a diffusers folder or builtin:NAME",
                                          tuple(BUILTINS), path_kind="any")],
):
    """Load a checkpoint once; its MODEL, CLIP and VAE share the one base."""
    from ...lora.recipe import ModelRecipe
    from ...models import loading

    base = loading.load_base(ckpt_name)
    model = ModelRecipe(base)
    return model, ClipRecipe(model), base


@node(
    "UNETLoader",
    display_name="Load Diffusion Model",
    category="advanced/loaders",
    outputs=[Output("MODEL", CORE_MODEL)],
    comfy_core=True,
)
def unet_loader(
    ctx,
    unet_name: Annotated[str, _model_file("diffusion_models", "a file holding the denoiser alone (UNet or "
                                          "transformer): its name in the diffusion_models folder, or a path")],
    weight_dtype: Annotated[str, Input(COMBO, choices=UNET_WEIGHT_DTYPES,
                                       description="accepted for ComfyUI's files; the weights are kept at the "
                                                   "usual precision (float16 on a GPU, float32 on the CPU): "
                                                   "lora-nodes does not compute in fp8")] = "default",
):
    """Load a diffusion model (UNet or transformer) from a file of its own; the text encoders and VAE
    come from CLIP and VAE loaders."""
    from ...lora.recipe import ModelRecipe
    from ...models import parts

    if weight_dtype != "default":
        ctx.warn(f"weight_dtype {weight_dtype}: the weights are kept at the usual precision (lora-nodes does "
                 "not compute in fp8)")
    return (ModelRecipe(parts.load_parts({"denoiser": unet_name})),)


@node(
    "CLIPLoader",
    display_name="Load CLIP",
    category="advanced/loaders",
    outputs=[Output("CLIP", CLIP)],
    preflight=clip_type_preflight,
    comfy_core=True,
)
def clip_loader(
    ctx,
    clip_name: Annotated[str, _model_file("text_encoders", "a text encoder file: its name in the text_encoders "
                                          "folder, or a path")],
    type: Annotated[str, Input(COMBO, choices=CLIP_TYPES,
                               description="the model family it is for, as ComfyUI names it")] = CLIP_TYPES[0],
    device: Annotated[str | None, _clip_device()] = "default",
):
    """Load one text encoder from a file of its own."""
    return (_clip_from_files({"text_encoder": clip_name}, type, device),)


@node(
    "DualCLIPLoader",
    display_name="DualCLIPLoader",
    category="advanced/loaders",
    outputs=[Output("CLIP", CLIP)],
    preflight=clip_type_preflight,
    comfy_core=True,
)
def dual_clip_loader(
    ctx,
    clip_name1: Annotated[str, _model_file("text_encoders", "the first text encoder file (e.g. clip_l)")],
    clip_name2: Annotated[str, _model_file("text_encoders", "the second text encoder file (e.g. clip_g, t5xxl)")],
    type: Annotated[str, Input(COMBO, choices=DUAL_CLIP_TYPES,
                               description="the model family they are for, as ComfyUI names it")] = DUAL_CLIP_TYPES[0],
    device: Annotated[str | None, _clip_device()] = "default",
):
    """Load a model family's two text encoders from files of their own."""
    return (_clip_from_files({"text_encoder": clip_name1, "text_encoder_2": clip_name2}, type, device),)


def _clip_from_files(files: dict[str, str], clip_type: str, device: str | None) -> ClipRecipe:
    from ...lora.recipe import ModelRecipe
    from ...models import parts

    problem = clip_type_problem(clip_type)
    if problem:
        raise NodeError(problem)
    base = parts.load_parts(files, family_hint=clip_type, device="cpu" if device == "cpu" else "auto")
    return ClipRecipe(ModelRecipe(base))


@node(
    "VAELoader",
    display_name="Load VAE",
    category="loaders",
    outputs=[Output("VAE", VAE)],
    comfy_core=True,
)
def vae_loader(
    ctx,
    vae_name: Annotated[str, _model_file("vae", "a VAE file: its name in the vae folder, or a path (ComfyUI's "
                                         "taesd previews and pixel_space are not available here)")],
):
    """Load a VAE from a file of its own."""
    from ...models import parts

    return (parts.load_parts({"vae": vae_name}),)


# --------------------------------------------------------------------------- LoRA loaders


@node(
    "LoraLoader",
    display_name="Load LoRA",
    category="loaders",
    outputs=[Output("MODEL", CORE_MODEL, "the model with the LoRA"), Output("CLIP", CLIP, "the CLIP with the LoRA")],
    preflight=lora_loader_preflight,
    comfy_core=True,
)
def lora_loader(
    ctx,
    model: Annotated[ModelRecipe, Input(CORE_MODEL, description="the diffusion model the LoRA is applied to")],
    clip: Annotated[ClipRecipe, Input(CLIP, description="the text encoders the LoRA is applied to")],
    lora_name: Annotated[str, _model_file("loras", "a LoRA file: its name in the loras folder, or a path (kohya, "
                                          "diffusers/PEFT, LyCORIS, DoRA or full diffs)")],
    strength_model: Annotated[float, _lora_strength("diffusion model (the picture)")] = 1.0,
    strength_clip: Annotated[float, _lora_strength("text encoders (how the prompt is read)")] = 1.0,
):
    """Add a LoRA to a model and its text encoders; several chain one after another. Costs nothing
    until sampling; the base is never copied."""
    if _changes_nothing(strength_model, strength_clip):
        return model, clip  # as ComfyUI: the file is not even read
    return add_lora(ctx, model, clip, _read_lora(ctx, lora_name), strength_model, strength_clip)


def add_lora(ctx, model: ModelRecipe, clip: ClipRecipe | None, lora: LoRA, strength_model: float,
             strength_clip: float) -> tuple[ModelRecipe, ClipRecipe | None]:
    """``model`` and ``clip`` (if any) with ``lora`` added at their strengths, as LoraLoader adds it.

    A side at strength 0 is left as it was: nothing is added to its recipe (nor warned about it).
    """
    new_model = _on_model(ctx, model, lora, strength_model) if strength_model != 0 else model
    if clip is None or strength_clip == 0:
        return new_model, clip
    checked = strength_model != 0 and clip.base is model.base  # the LoRA was checked on this base just now
    return new_model, _on_clip(ctx, clip, lora, strength_clip, checked)


@node(
    "LoraLoaderModelOnly",
    display_name="LoraLoaderModelOnly",
    category="loaders",
    outputs=[Output("MODEL", CORE_MODEL, "the model with the LoRA")],
    preflight=lora_loader_preflight,
    comfy_core=True,
)
def lora_loader_model_only(
    ctx,
    model: Annotated[ModelRecipe, Input(CORE_MODEL, description="the diffusion model the LoRA is applied to")],
    lora_name: Annotated[str, _model_file("loras", "a LoRA file: its name in the loras folder, or a path")],
    strength_model: Annotated[float, _lora_strength("diffusion model")] = 1.0,
):
    """Add a LoRA to a model's denoiser only (its text-encoder modules, if any, are left out)."""
    if strength_model == 0:
        return (model,)
    return (_on_model(ctx, model, _read_lora(ctx, lora_name), strength_model),)


def _read_lora(ctx, path: str) -> LoRA:
    """The LoRA at ``path``, read as LoadLoRA reads it (its warnings told)."""
    lora, _words = load_lora.run(ctx, path)
    return lora


def _on_model(ctx, model: ModelRecipe, lora: LoRA, strength: float) -> ModelRecipe:
    """``model`` with ``lora``'s denoiser modules at ``strength`` (after the checks ApplyLoRA makes)."""
    from ...lora.recipe import AppliedLoRA

    if not _has_modules(lora, text=False):
        _check_family(lora, model.base)
        return model  # nothing of it changes a denoiser (a text-encoder-only LoRA)
    return apply_to(ctx, model, [AppliedLoRA(lora, strength, 0.0)])


def _on_clip(ctx, clip: ClipRecipe, lora: LoRA, strength: float, checked: bool) -> ClipRecipe:
    """``clip`` with ``lora``'s text-encoder modules at ``strength``.

    ``checked``: the LoRA was just checked on this base (put on the model over the same base), so
    it is not checked again; otherwise it is checked here, by its family where it has no
    text-encoder modules to place.
    """
    from ...lora.recipe import AppliedLoRA

    if not _has_modules(lora, text=True):
        if not checked:
            _check_family(lora, clip.base)
        return clip  # nothing of it changes a text encoder
    applied = AppliedLoRA(lora, 0.0, strength)
    if checked:
        return clip.with_loras(applied)
    return ClipRecipe(apply_to(ctx, clip.model, [applied]), clip.last_layer)


def _has_modules(lora: LoRA, text: bool) -> bool:
    """Whether ``lora`` has text-encoder modules (``text``) or denoiser modules (not ``text``)."""
    return any((families.component_of(key) in families.TEXT_COMPONENTS) == text for key in lora.modules)


def _check_family(lora: LoRA, base: BaseModel) -> None:
    """Refuse a LoRA for another family, with the words ApplyLoRA uses, even where it places nothing."""
    mismatch = families.mismatch(lora.family, base.family)
    if mismatch:
        raise LoRAError(f"{mismatch} (LoRA '{lora.name}' on {base.source}). {FAMILY_ADVICE}")


SPECS = [checkpoint_loader_simple, unet_loader, clip_loader, dual_clip_loader, vae_loader, lora_loader,
         lora_loader_model_only]
