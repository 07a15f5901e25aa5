"""Base model nodes."""

from __future__ import annotations

from typing import Annotated, Any

from ..lora.recipe import ModelRecipe
from ..models.builtin import BUILTINS
from ..models.loading import base_family
from ..models.loading import load_base as load_base_model
from .spec import COMBO, MODEL, STRING, Input, Output, Preflight, node

BAD_MODEL = "bad_model"  # a base source that is not a model we can load (incomplete folder, unreadable file)


def load_base_preflight(literals: dict[str, Any], upstream: dict[str, dict[str, Any]]) -> Preflight:
    """LoadBase before running: the base's family (``{"family": its id, "source"}``) without loading it."""
    source = literals.get("source")
    if not isinstance(source, str) or not source:
        return Preflight()
    family, problems = base_family(source, literals.get("config") or "")
    codes = {"source": BAD_MODEL, "config": "missing_input"}
    return Preflight(facts={"family": family.id if family else None, "source": source},
                     problems=[(codes[name], name, message) for name, message in problems])


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
                                 description="builtin:NAME, a diffusers pipeline folder, or a single-file "
                                             ".safetensors checkpoint")] = "builtin:tiny",
    dtype: Annotated[str, Input(COMBO, choices=("auto", "float32", "float16", "bfloat16"),
                                description="weight precision; auto is float16 on a GPU and float32 on "
                                            "the CPU")] = "auto",
    device: Annotated[str, Input(COMBO, choices=("auto", "cpu", "cuda", "mps"),
                                 description="where the model runs; auto picks a GPU when there is one")] = "auto",
    # optional with a default: ComfyUI shows "" in the widget; left out, the function gets None
    config: Annotated[str | None, Input(STRING, path=True, path_kind="folder", optional=True,
                                        description="for a single-file checkpoint: a diffusers folder with its "
                                                    "configs and tokenizer")] = "",
):
    """Load a Stable Diffusion base model once; every variant made from it shares its weights."""
    return (ModelRecipe(load_base_model(source, dtype, device, config or "")),)
