"""What the Stable Diffusion families (SD1, SD2, SDXL) share: how LoRA files name their modules,
and where a single-file checkpoint keeps each text encoder. The family modules declare
themselves from these pieces; nothing here names a family.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .base import LoRANaming, TextEncoder, kohya_spelling

UNET_KOHYA_PREFIX = "lora_unet_"
# kohya's prefixes for the text encoders: "te" alone, "te1"/"te2" where a family has two
KOHYA_TE, KOHYA_TE1, KOHYA_TE2 = "lora_te_", "lora_te1_", "lora_te2_"
KOHYA_PREFIXES = {"unet": UNET_KOHYA_PREFIX, "text_encoder": KOHYA_TE, "text_encoder_2": KOHYA_TE2}
# kohya names of the original (SGM/LDM) UNet tree, as SDXL files use; others follow the diffusers tree
ORIGINAL_UNET_PREFIXES = tuple(f"{UNET_KOHYA_PREFIX}{p}" for p in (
    "input_blocks_", "middle_block_", "output_blocks_", "time_embed_", "label_emb_", "out_"))


def spellings(component: str, path: str, original_path: str | None) -> list[str]:
    """Every name a LoRA file may use for one module of a Stable Diffusion model.

    Our names (= diffusers/PEFT names), kohya's underscore names of those, kohya's names of the
    original (LDM/SGM) UNet tree (``lora_unet_input_blocks_4_1_...``), and the first text encoder
    as ``lora_te1_`` too (SDXL files call it that). Whatever the family: a file is read by the
    modules the base has, and the family check tells a LoRA for another family apart.
    """
    names = [f"{component}.{path}", kohya_spelling(KOHYA_PREFIXES[component], path)]
    if component == "text_encoder":
        names.append(kohya_spelling(KOHYA_TE1, path))
    if component == "unet" and original_path is not None:
        names.append(kohya_spelling(UNET_KOHYA_PREFIX, original_path))
    return names


def naming_of(key: str) -> str:
    """How a module key spells its module's name (two keys of one naming spell a module alike).

    ``diffusers`` (dotted, PEFT and older diffusers alike once normalized), ``kohya`` (underscores
    of the diffusers tree), ``kohya SGM`` (underscores of the original UNet tree, as SDXL files
    name it) or ``kohya te1`` (SDXL's name for the first text encoder).
    """
    if key.startswith(ORIGINAL_UNET_PREFIXES):
        return "kohya SGM"
    if key.startswith(KOHYA_TE1):
        return "kohya te1"
    if key.startswith("lora_"):
        return "kohya"
    return "diffusers"


# bare diffusers module paths (PEFT files saved per component) and the component they are in
_BARE_PATHS = {("down_blocks.", "mid_block.", "up_blocks.", "conv_in", "conv_out", "time_embedding."): "unet",
               ("text_model.",): "text_encoder"}


def normalize(key: str) -> str:
    """A LoRA key with its component prefix (PEFT files saved per component have none), and old
    diffusers attention-processor names (``...processor.to_q_lora``) as the module's own."""
    for starts, component in _BARE_PATHS.items():
        if key.startswith(starts):
            key = f"{component}.{key}"
            break
    for old, new in ((".processor.to_out", ".to_out.0"), (".processor.", ".")):
        key = key.replace(old, new)
    return key


NAMING = LoRANaming(
    component_prefixes={
        **{prefix: component for component, prefix in KOHYA_PREFIXES.items()},
        KOHYA_TE1: "text_encoder",
        **{f"{component}.": component for component in KOHYA_PREFIXES},
    },
    denoiser_kohya_prefix=UNET_KOHYA_PREFIX,
    spellings=spellings,
    naming_of=naming_of,
    normalize=normalize,
)

OPEN_CLIP_PAD = "!"  # OpenCLIP pads prompts with token 0, which is "!" in CLIP's vocabulary

# The text encoders as the families keep them (component, tokenizer, checkpoint prefix, layout,
# kohya prefix): HF CLIP under cond_stage_model.transformer (SD1), OpenCLIP under
# cond_stage_model.model (SD2), and both under conditioner.embedders (SDXL).
CLIP_TEXT = TextEncoder("text_encoder", "tokenizer", "cond_stage_model.transformer.", False, KOHYA_TE,
                        comfy_name="clip_l")
OPEN_CLIP_TEXT = TextEncoder("text_encoder", "tokenizer", "cond_stage_model.model.", True, KOHYA_TE,
                             pad_token=OPEN_CLIP_PAD, cuts_last_layer=True, comfy_name="clip_h")
FIRST_OF_TWO_TEXT = TextEncoder("text_encoder", "tokenizer", "conditioner.embedders.0.transformer.", False, KOHYA_TE1,
                                comfy_name="clip_l")
SECOND_OF_TWO_TEXT = TextEncoder("text_encoder_2", "tokenizer_2", "conditioner.embedders.1.model.", True, KOHYA_TE2,
                                 model_class="CLIPTextModelWithProjection", pad_token=OPEN_CLIP_PAD,
                                 comfy_name="clip_g")

# the original (LDM/SGM) checkpoint layout every SD family shares
LDM_DENOISER, LDM_VAE = "model.diffusion_model.", "first_stage_model."
# sampler name -> (diffusers scheduler class, config changes); names follow ComfyUI's
SAMPLERS: dict[str, tuple[str, dict[str, Any]]] = {
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_ancestral": ("EulerAncestralDiscreteScheduler", {}),
    "ddim": ("DDIMScheduler", {}),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    # ComfyUI's others that diffusers has (uni_pc is UniPC's bh1 variant at order 3, as ComfyUI runs it)
    "heun": ("HeunDiscreteScheduler", {}),
    "dpm_2": ("KDPM2DiscreteScheduler", {}),
    "dpm_2_ancestral": ("KDPM2AncestralDiscreteScheduler", {}),
    "lms": ("LMSDiscreteScheduler", {}),
    "dpmpp_2m_sde": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++", "solver_order": 2}),
    "dpmpp_sde": ("DPMSolverSDEScheduler", {}),
    # (bh1's last step to sigma 0 is NaN in diffusers: it stops at the lowest trained level instead)
    "uni_pc": ("UniPCMultistepScheduler", {"solver_type": "bh1", "solver_order": 3, "final_sigmas_type": "sigma_min"}),
}


def native_size(components: Mapping[str, Any]) -> int:
    """The UNet's latent sample size times the VAE's downscaling: the pixels it was trained at."""
    vae_scale = 2 ** (len(components["vae"].config.block_out_channels) - 1)
    return int(components["unet"].config.sample_size) * vae_scale


# the pipeline arguments SD1/SD2 pipelines take for the safety checker we never load: the images
# are the user's to judge
NO_SAFETY_CHECKER = {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}
