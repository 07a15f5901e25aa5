"""Base model nodes."""

from __future__ import annotations

from typing import Annotated, Any

from ..models.builtin import BUILTINS
from ..models.loading import base_family
from ..models.loading import load_base as load_base_model
from .spec import COMBO, MODEL, STRING, Input, Output, Preflight, node

BAD_MODEL = "bad_model"  # a base source that is not a model we can load (incomplete folder, unreadable file)


COMPONENT_INPUTS = ("text_encoder", "text_encoder_2", "vae")  # components a file of their own may give


def component_files(values: dict[str, Any]) -> dict[str, str]:
    """The component files set among LoadBase's inputs (component -> path)."""
    return {name: values[name] for name in COMPONENT_INPUTS if isinstance(values.get(name), str) and values[name]}


def load_base_preflight(literals: dict[str, Any], upstream: dict[str, dict[str, Any]]) -> Preflight:
    """LoadBase before running: the base's family (``{"family": its id, "source"}``) without loading it."""
    source = literals.get("source")
    if not isinstance(source, str) or not source:
        return Preflight()
    family, problems = base_family(source, literals.get("config") or "", component_files(literals))
    codes = {"bad": BAD_MODEL, "missing": "missing_input"}
    return Preflight(facts={"family": family.id if family else None, "source": source},
                     problems=[(codes[kind], name, message) for name, kind, message in problems])


def _component_file(description: str) -> Input:
    """A file that holds one component, for a single-file checkpoint that lacks it (or to replace it)."""
    return Input(STRING, path=True, path_kind="file", optional=True, description=description)


@node(
    "LoadBase",
    display_name="Load Base Model",
    category="models",
    outputs=[Output("model", MODEL, "the base model, ready for LoRAs")],
    preflight=load_base_preflight,
)
def load_base(
    ctx,
    source: Annotated[str, Input(STRING, path=True, builtins=tuple(BUILTINS), folder="checkpoints",
                                 description="builtin:NAME, a single-file .safetensors checkpoint or a "
                                             "diffusers pipeline folder: by name in the checkpoints or "
                                             "diffusers models folders, or by path")] = "builtin:tiny",
    dtype: Annotated[str, Input(COMBO, choices=("auto", "float32", "float16", "bfloat16"),
                                description="weight precision; auto is float16 on a GPU and float32 on "
                                            "the CPU")] = "auto",
    device: Annotated[str, Input(COMBO, choices=("auto", "cpu", "cuda", "mps"),
                                 description="where the model runs; auto picks a GPU when there is one")] = "auto",
    # optional with a default: ComfyUI shows "" in the widget; left out, the function gets None
    config: Annotated[str | None, Input(STRING, path=True, path_kind="folder", optional=True,
                                        description="for a single-file checkpoint: a diffusers folder with its "
                                                    "configs and tokenizers (and the weights of parts the file "
                                                    "lacks)")] = "",
    text_encoder: Annotated[str | None, _component_file(
        "for a single-file checkpoint: a .safetensors file with the (first) text encoder in Hugging Face names "
        "(e.g. clip_l.safetensors), as ComfyUI's CLIP loaders take it")] = "",
    text_encoder_2: Annotated[str | None, _component_file(
        "for a single-file checkpoint: a .safetensors file with the second text encoder in Hugging Face names "
        "(e.g. t5xxl_fp16.safetensors)")] = "",
    vae: Annotated[str | None, _component_file(
        "for a single-file checkpoint: a .safetensors file with the VAE in original (LDM) or diffusers names "
        "(e.g. ae.safetensors), as ComfyUI's VAE loader takes it")] = "",
):
    """Load a base model once; every node using it shares its weights (nothing is copied).

    A single-file checkpoint that holds only the denoiser (a transformer as ComfyUI's diffusion
    model loader takes it) takes its text encoders and VAE from files of their own or from the
    config folder's weights; files of their own also replace what a whole checkpoint holds.
    """
    from ..lora.recipe import ModelRecipe

    files = component_files({"text_encoder": text_encoder, "text_encoder_2": text_encoder_2, "vae": vae})
    return (ModelRecipe(load_base_model(source, dtype, device, config or "", files)),)
