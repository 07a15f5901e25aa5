"""Which model family a LoRA was made for, from its metadata, key names and shapes."""

from __future__ import annotations

from .model import LoRA

NAMES = {"sd1": "SD1.5", "sd2": "SD2.x", "sdxl": "SDXL"}

# Width of the cross-attention context (what attn2.to_k reads), per family. The built-in tiny
# models use their own widths so that their LoRAs are told apart the same way.
CONTEXT_WIDTHS = {768: "sd1", 1024: "sd2", 2048: "sdxl", 32: "sd1", 64: "sd1", 80: "sdxl"}

# family -> kohya sd-scripts' ss_base_model_version (model_util.get_model_version_str_for_sd1_sd2 and
# sdxl_model_util); reading, a version is recognised by these prefixes (sd_v2_v, sdxl_base_v0-9, ...).
KOHYA_VERSIONS = {"sd1": "sd_v1", "sd2": "sd_v2", "sdxl": "sdxl_base_v1-0"}
METADATA_VERSIONS = (("sdxl", "sdxl"), ("sd_v2", "sd2"), ("sd_v1", "sd1"), ("sd_2", "sd2"), ("sd_1", "sd1"))


def lora_architecture(lora: LoRA) -> str | None:
    """``sd1``, ``sd2``, ``sdxl``, or None when nothing in the file tells."""
    version = lora.metadata.get("ss_base_model_version", "")
    for prefix, family in METADATA_VERSIONS:
        if version.startswith(prefix):
            return family
    if "text_encoder_2" in lora.components():
        return "sdxl"
    for key, module in lora.modules.items():
        if key.replace(".", "_").endswith("attn2_to_k") and len(module.delta_shape) >= 2:  # 1-D: fits nothing
            family = CONTEXT_WIDTHS.get(int(module.delta_shape[1]))
            if family:
                return family
    return None


def family_name(family: str | None) -> str:
    """A family as people write it (``SD1.5``, ``SDXL``)."""
    return NAMES.get(family or "", family or "an unknown model")


def family_mismatch(lora_family: str | None, base_family: str | None) -> str | None:
    """The sentence for a LoRA made for another family than the base's, or None when they fit or are unknown.

    The same words at validation (from file headers) and at run time (from the loaded files).
    """
    if lora_family is None or base_family is None or lora_family == base_family:
        return None
    return f"this LoRA is for {family_name(lora_family)}, the base is {family_name(base_family)}"
