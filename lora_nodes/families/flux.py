"""FLUX.1 (Black Forest Labs): a flow-matching transformer with double-stream and single-stream
blocks, CLIP-L for the pooled vector and T5 for the text sequence, a 16-channel VAE.

Two module trees name the same weights: diffusers' (``transformer_blocks.N.attn.to_q``, what a
loaded base holds) and BFL's own (``double_blocks.N.img_attn.qkv``, what single-file checkpoints,
ComfyUI, kohya and XLabs LoRAs use). BFL fuses q/k/v (and, in single blocks, the MLP input) into
one weight, and keeps the final adaLN rows as (shift, scale) where diffusers keeps (scale, shift).
:func:`original_modules` maps one tree onto the other from a base's own shapes (block counts and
widths are read, never assumed), so LoRA files of either tree land on the right rows.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

from .base import Family, LoRANaming, TextEncoder, kohya_spelling

Pieces = tuple[tuple[str, int, int], ...]  # (module path, first row, end row) in a fused module's rows

KOHYA_DENOISER = "lora_unet_"
KOHYA_CLIP, KOHYA_T5 = "lora_te1_", "lora_te3_"  # sd-scripts' prefixes; CLIP is also "lora_te_"
ONETRAINER_T5 = "lora_te2_"  # OneTrainer's prefix for T5 (ComfyUI reads both)
ONETRAINER_DENOISER, LYCORIS_DENOISER = "lora_transformer_", "lycoris_"  # kohya-style diffusers-tree names
CHECKPOINT_PREFIXES = ("model.diffusion_model.", "diffusion_model.")  # ComfyUI full checkpoints, BFL LoRAs

# top-level BFL modules and diffusers modules: a bare key starting with one names the transformer
BFL_ROOTS = ("double_blocks.", "single_blocks.", "img_in", "txt_in", "time_in.", "vector_in.", "guidance_in.",
             "final_layer.")
DIFFUSERS_ROOTS = ("transformer_blocks.", "single_transformer_blocks.", "x_embedder", "context_embedder",
                   "time_text_embed.", "norm_out.", "proj_out")

# diffusers path -> BFL path, one to one
_TOP = {
    "x_embedder": "img_in",
    "context_embedder": "txt_in",
    "time_text_embed.timestep_embedder.linear_1": "time_in.in_layer",
    "time_text_embed.timestep_embedder.linear_2": "time_in.out_layer",
    "time_text_embed.text_embedder.linear_1": "vector_in.in_layer",
    "time_text_embed.text_embedder.linear_2": "vector_in.out_layer",
    "time_text_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
    "time_text_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
    "proj_out": "final_layer.linear",
}
_DOUBLE = {
    "norm1.linear": "img_mod.lin",
    "norm1_context.linear": "txt_mod.lin",
    "attn.to_out.0": "img_attn.proj",
    "attn.to_add_out": "txt_attn.proj",
    "ff.net.0.proj": "img_mlp.0",
    "ff.net.2": "img_mlp.2",
    "ff_context.net.0.proj": "txt_mlp.0",
    "ff_context.net.2": "txt_mlp.2",
}
_SINGLE = {"proj_out": "linear2", "norm.linear": "modulation.lin"}
# fused BFL module -> the diffusers modules whose rows it holds, in order
_DOUBLE_FUSED = {"img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
                 "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")}
_SINGLE_FUSED = {"linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"),
                 "linear1.qkv": ("attn.to_q", "attn.to_k", "attn.to_v")}  # XLabs' single-block LoRA: no MLP rows
FINAL_ADALN, NORM_OUT = "final_layer.adaLN_modulation.1", "norm_out.linear"
_DOUBLE_BLOCK, _SINGLE_BLOCK = re.compile(r"transformer_blocks\.(\d+)\.(.+)"), re.compile(
    r"single_transformer_blocks\.(\d+)\.(.+)")


def block_counts(paths: Sequence[str]) -> tuple[int, int]:
    """(double blocks, single blocks) of a diffusers Flux transformer, from its module paths."""
    doubles = {int(m.group(1)) for p in paths if (m := _DOUBLE_BLOCK.match(p))}
    singles = {int(m.group(1)) for p in paths if (m := _SINGLE_BLOCK.match(p))}
    return (max(doubles) + 1 if doubles else 0), (max(singles) + 1 if singles else 0)


def original_modules(shapes: Mapping[str, Sequence[int]]) -> tuple[dict[str, str], dict[str, Pieces]]:
    """The BFL tree of a diffusers Flux transformer, from its Linear weights' shapes (path -> shape).

    Returns (diffusers path -> BFL path) for modules that are one weight in both trees, and
    (BFL path -> pieces) for fused modules: BFL's q/k/v (and single blocks' MLP input) and the final
    adaLN, whose halves are swapped. Row counts come from ``shapes``; nothing is assumed.
    """
    renamed = {path: bfl for path, bfl in _TOP.items() if path in shapes}
    fused: dict[str, Pieces] = {}
    doubles, singles = block_counts(list(shapes))
    for prefix, bfl_prefix, count, table, fused_table in (
            ("transformer_blocks", "double_blocks", doubles, _DOUBLE, _DOUBLE_FUSED),
            ("single_transformer_blocks", "single_blocks", singles, _SINGLE, _SINGLE_FUSED)):
        for n in range(count):
            here, there = f"{prefix}.{n}.", f"{bfl_prefix}.{n}."
            renamed.update({here + p: there + b for p, b in table.items() if here + p in shapes})
            for bfl, parts in fused_table.items():
                if all(here + p in shapes for p in parts):
                    fused[there + bfl] = _stacked([here + p for p in parts], shapes)
    if NORM_OUT in shapes:
        half = int(shapes[NORM_OUT][0]) // 2
        fused[FINAL_ADALN] = ((NORM_OUT, half, 2 * half), (NORM_OUT, 0, half))  # BFL (shift, scale)
    return renamed, fused


def _stacked(paths: list[str], shapes: Mapping[str, Sequence[int]]) -> Pieces:
    pieces, row = [], 0
    for path in paths:
        rows = int(shapes[path][0])
        pieces.append((path, row, row + rows))
        row += rows
    return tuple(pieces)


# --------------------------------------------------------------------------- LoRA naming


def spellings(component: str, path: str, original_path: str | None) -> list[str]:
    """Every name a LoRA file may use for one module of a Flux base (or one fused BFL module).

    The transformer: diffusers/PEFT names (``transformer.transformer_blocks.0.attn.to_q``), their
    kohya-style spellings (OneTrainer ``lora_transformer_``, SimpleTuner ``lycoris_``), and by
    its BFL name: as BFL/ComfyUI/XLabs files (normalized to ``transformer.double_blocks...``) and
    kohya's sd-scripts (``lora_unet_double_blocks_0_img_attn_qkv``). CLIP: ``lora_te1_`` and
    ``lora_te_``; T5: ``lora_te3_`` (sd-scripts) and ``lora_te2_`` (OneTrainer).
    """
    names = [f"{component}.{path}"]
    if component == "transformer":
        names += [kohya_spelling(ONETRAINER_DENOISER, path), kohya_spelling(LYCORIS_DENOISER, path)]
        if original_path is not None:
            names += [f"{component}.{original_path}", kohya_spelling(KOHYA_DENOISER, original_path)]
    elif component == "text_encoder":
        names += [kohya_spelling(KOHYA_CLIP, path), kohya_spelling("lora_te_", path)]
    else:
        names += [kohya_spelling(KOHYA_T5, path), kohya_spelling(ONETRAINER_T5, path)]
    return names


_KOHYA_BFL_ROOTS = tuple(KOHYA_DENOISER + root.rstrip(".").replace(".", "_") for root in BFL_ROOTS)


_XLABS_KEY = re.compile(r"(?:(?:model\.)?diffusion_model\.)?(?:double|single)_blocks\.\d+\.processor\.")


def naming_of(key: str) -> str:
    """``kohya`` (sd-scripts: BFL tree, underscores), ``kohya diffusers`` (OneTrainer/SimpleTuner:
    diffusers tree, underscores), ``bfl`` (BFL/ComfyUI dotted names, XLabs' once normalized) or
    ``diffusers``. A key as the file writes it (before :func:`normalize`) may also be ``xlabs``
    (x-flux's attention-processor names), which normalized keys never are."""
    if key.startswith((KOHYA_DENOISER, KOHYA_T5)):
        return "kohya"
    if key.startswith((ONETRAINER_DENOISER, LYCORIS_DENOISER)):
        return "kohya diffusers"
    if _XLABS_KEY.match(key):
        return "xlabs"
    bare = key.removeprefix("transformer.")
    for prefix in CHECKPOINT_PREFIXES:
        bare = bare.removeprefix(prefix)
    return "bfl" if bare.startswith(BFL_ROOTS) else "diffusers"


_XLABS = re.compile(r"transformer\.(double|single)_blocks\.(\d+)\.processor\.(qkv|proj)(?:_lora)?([12]?)$")
_XLABS_MODULES = {("double", "qkv", "1"): "img_attn.qkv", ("double", "qkv", "2"): "txt_attn.qkv",
                  ("double", "proj", "1"): "img_attn.proj", ("double", "proj", "2"): "txt_attn.proj",
                  ("single", "qkv", ""): "linear1.qkv", ("single", "proj", ""): "linear2"}


def normalize(key: str) -> str:
    """A Flux transformer key with the ``transformer.`` prefix: BFL/ComfyUI keys lose
    ``diffusion_model.``, bare BFL and diffusers paths gain it, and XLabs processor names
    (``double_blocks.0.processor.qkv_lora1``: 1 the image stream, 2 the text stream) become the
    BFL modules they change. Keys of other families pass unchanged."""
    for prefix in CHECKPOINT_PREFIXES:
        if key.startswith(prefix) and key[len(prefix):].startswith(BFL_ROOTS):
            key = key[len(prefix):]
            break
    if key.startswith(BFL_ROOTS + DIFFUSERS_ROOTS):
        key = "transformer." + key
    match = _XLABS.match(key)
    if match:
        kind, block, part, stream = match.groups()
        module = _XLABS_MODULES.get((kind, part, stream))
        if module is not None:
            key = f"transformer.{kind}_blocks.{block}.{module}"
    return key


# module-name patterns -> the block group people know them by; single before double, since
# diffusers' ``single_transformer_blocks`` ends like its ``transformer_blocks``
_BLOCKS = (
    (re.compile(r"(?:^|[._])single(?:_transformer)?_blocks[._](\d+)(?:[._]|$)"), "single blocks"),
    (re.compile(r"(?:^|[._])(?:double|transformer)_blocks[._](\d+)(?:[._]|$)"), "double blocks"),
    (re.compile(r"text_model[._]encoder[._]layers[._](\d+)(?:[._]|$)"), "CLIP layers"),
    (re.compile(r"encoder[._]block[._](\d+)(?:[._]|$)"), "T5 blocks"),
    (re.compile(r"(?:^|[._])(?:final_layer|norm_out|proj_out)(?:[._]|$)"), "final layer"),
    (re.compile(r"(?:^|[._])(?:img_in|txt_in|time_in|vector_in|guidance_in|x_embedder|context_embedder"
                r"|time_text_embed)(?:[._]|$)"), "input embedders"),
)


BLOCK_GROUPS = ("input embedders", "double blocks", "single blocks", "final layer", "CLIP layers", "T5 blocks")


def block_of(key: str) -> tuple[str, int | None] | None:
    """The block a LoRA module key (any Flux naming, normalized) changes: ``("double blocks", 3)``,
    ``("single blocks", 0)``, ``("CLIP layers", 1)``, ``("T5 blocks", 0)``, ``("final layer", None)``,
    ``("input embedders", None)``; None for a key that names none of them."""
    for pattern, group in _BLOCKS:
        match = pattern.search(key)
        if match:
            return group, int(match.group(1)) if match.groups() else None
    return None


NAMING = LoRANaming(
    component_prefixes={
        "transformer.": "transformer",
        ONETRAINER_DENOISER: "transformer",
        LYCORIS_DENOISER: "transformer",
        **dict.fromkeys(_KOHYA_BFL_ROOTS, "transformer"),
        KOHYA_T5: "text_encoder_2",
    },
    denoiser_kohya_prefix=KOHYA_DENOISER,
    spellings=spellings,
    naming_of=naming_of,
    normalize=normalize,
    block_of=block_of,
    block_groups=BLOCK_GROUPS,
)


# --------------------------------------------------------------------------- the family


def native_size(components: Mapping[str, Any]) -> int:
    """The VAE's sample size: 1024 for FLUX.1 (what FluxPipeline draws by default)."""
    return int(components["vae"].config.sample_size)


# Samplers that draw with FluxPipeline (diffusers 0.42.1), which hands the scheduler sigmas and the
# resolution shift ``mu``: the multistep solvers in their flow-matching mode build the same shifted
# schedule themselves (the pipeline leaves the sigmas to a scheduler with ``use_flow_sigmas``) and
# follow the same ODE (tests/test_flux_sample.py checks they converge to euler's image). Left out:
# DEIS (its schedule repeats its last sigma), UniPC bh1 (NaN), Heun (takes no sigmas), and ancestral
# samplers (diffusers' stochastic flow-matching Euler is not ComfyUI's euler_ancestral).
_FLOW_SOLVER = {"use_flow_sigmas": True, "prediction_type": "flow_prediction"}
SAMPLERS: dict[str, tuple[str, dict[str, Any]]] = {
    "euler": ("FlowMatchEulerDiscreteScheduler", {}),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {**_FLOW_SOLVER, "algorithm_type": "dpmsolver++", "solver_order": 2}),
    "uni_pc_bh2": ("UniPCMultistepScheduler", {**_FLOW_SOLVER, "solver_type": "bh2"}),
}

CLIP_L = TextEncoder("text_encoder", "tokenizer", "text_encoders.clip_l.transformer.", False, KOHYA_CLIP,
                     comfy_name="clip_l")
T5_XXL = TextEncoder("text_encoder_2", "tokenizer_2", "text_encoders.t5xxl.transformer.", False, KOHYA_T5,
                     model_class="T5EncoderModel", key_markers=("encoder_block", "encoder.block"), comfy_name="t5xxl")

FLUX = Family(
    id="flux",
    display_name="Flux",
    text_encoders=(CLIP_L, T5_XXL),
    naming=NAMING,
    denoiser_checkpoint_prefix=CHECKPOINT_PREFIXES[0],
    vae_checkpoint_prefix="vae.",
    unet_config_markers={"axes_dims_rope": ..., "joint_attention_dim": ...},
    checkpoint_markers=tuple(p + "double_blocks." for p in ("", *CHECKPOINT_PREFIXES)),
    context_widths=(4096,),
    denoiser="transformer",
    denoiser_class="FluxTransformer2DModel",
    checkpoint_layout="bfl",
    context_key="context_embedder",
    kohya_version="flux1",
    kohya_version_prefixes=("flux",),
    kohya_original_unet_names=True,
    kohya_network_module="networks.lora_flux",
    pipeline_class="FluxPipeline",
    pipeline_class_marker="Flux",
    samplers=SAMPLERS,
    native_size_of=native_size,
    pooled_text_conditioning=True,
    flow_matching=True,
    guidance_distilled=True,
    original_modules=original_modules,
    comfy_clip_types=("flux",),
    comfy_dual_clip_place=2,  # ComfyUI: sdxl, sd3, flux, hunyuan_video, hidream, hunyuan_image
)
