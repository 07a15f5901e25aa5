"""ComfyUI core nodes: prompts and conditioning (see the package docstring).

CLIPTextEncode reads ComfyUI's emphasis (``(text:1.2)``, see :mod:`.emphasis`) and encodes the
pieces with the CLIP's text encoders, its LoRAs merged in; the other nodes edit conditioning.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Annotated, Any

from ... import families
from ...models.conditioning import Conditioning, encode_prompt, missing_layer_note
from ...models.sampling import DEFAULT_GUIDANCE
from ..spec import CLIP, CONDITIONING, FLOAT, INT, STRING, Input, Output, Preflight, node
from .emphasis import parse_prompt
from .values import ClipRecipe

# FluxGuidance's category names the guidance-distilled family it was made for; the family spells its name
_DISTILLED = next((f.id for f in families.FAMILIES if f.guidance_distilled), "distilled")
GUIDANCE_CATEGORY = f"advanced/conditioning/{_DISTILLED}"


def family_facts(*upstream: dict[str, Any]) -> dict[str, Any]:
    """``{"family": id}`` when the inputs' facts name one family (the sampler checks it against the
    model's), else nothing."""
    named = {facts["family"] for facts in upstream if facts.get("family")}
    return {"family": named.pop()} if len(named) == 1 else {}


def pass_family(literals: dict[str, Any], upstream: dict[str, dict[str, Any]]) -> Preflight:
    """Tell downstream whose text encoders made the conditioning (from the CLIP or conditioning linked in)."""
    return Preflight(facts=family_facts(*upstream.values()))


@node(
    "CLIPTextEncode",
    display_name="CLIP Text Encode (Prompt)",
    category="conditioning",
    outputs=[Output("CONDITIONING", CONDITIONING, "the encoded prompt, to guide the diffusion model")],
    preflight=pass_family,
    comfy_core=True,
)
def clip_text_encode(
    ctx,
    text: Annotated[str, Input(STRING, multiline=True,
                               description="the prompt; (words:1.2) weighs words as ComfyUI does, \\( and \\) are "
                                           "literal brackets")],
    clip: Annotated[ClipRecipe, Input(CLIP, description="the text encoders to encode it with")],
):
    """Encode a prompt with the CLIP's text encoders (their LoRAs merged in), as ComfyUI weighs it."""
    parsed = parse_prompt(text)
    for name in dict.fromkeys(parsed.embeddings):
        ctx.warn(f"'embedding:{name}' is left out of the prompt: lora-nodes does not load textual-inversion "
                 "embeddings (ComfyUI leaves out those it cannot find the same way)", embedding=name)
    prompt = list(parsed.pieces) or ""  # no pieces: the empty prompt
    condition = encode_prompt(clip.materialize(), prompt, last_layer=clip.last_layer)
    return ((condition,),)


@node(
    "CLIPSetLastLayer",
    display_name="CLIP Set Last Layer",
    category="conditioning",
    outputs=[Output("CLIP", CLIP)],
    preflight=pass_family,
    comfy_core=True,
)
def clip_set_last_layer(
    ctx,
    clip: Annotated[ClipRecipe, Input(CLIP)],
    stop_at_clip_layer: Annotated[int, Input(INT, min=-24, max=-1, step=1,
                                             description="the text encoder layer prompts are read from: -1 the "
                                                         "last, -2 the one before (A1111's clip skip 2) ...")] = -1,
):
    """Read prompts from an earlier layer of the text encoders (A1111's clip skip N is -N)."""
    note = missing_layer_note(clip.base.family, stop_at_clip_layer)
    if note:
        ctx.warn(note, stop_at_clip_layer=stop_at_clip_layer)
    return (clip.with_last_layer(stop_at_clip_layer),)


@node(
    "FluxGuidance",
    display_name="FluxGuidance",
    category=GUIDANCE_CATEGORY,
    outputs=[Output("CONDITIONING", CONDITIONING)],
    preflight=pass_family,
    comfy_core=True,
)
def flux_guidance(
    ctx,
    conditioning: Annotated[Conditioning, Input(CONDITIONING)],
    guidance: Annotated[float, Input(FLOAT, min=0.0, max=100.0, step=0.1,
                                     description="the distilled guidance a guidance-distilled model takes as an "
                                                 "input (3.5 is usual); other models ignore it")] = DEFAULT_GUIDANCE,
):
    """Set the distilled guidance of guidance-distilled models on a conditioning."""
    return (tuple(replace(condition, guidance=guidance) for condition in conditioning),)


@node(
    "ConditioningCombine",
    display_name="Conditioning (Combine)",
    category="conditioning",
    outputs=[Output("CONDITIONING", CONDITIONING)],
    preflight=pass_family,
    comfy_core=True,
)
def conditioning_combine(
    ctx,
    conditioning_1: Annotated[Conditioning, Input(CONDITIONING)],
    conditioning_2: Annotated[Conditioning, Input(CONDITIONING)],
):
    """Both conditionings at once: the sampler averages the predictions they give."""
    return (tuple(conditioning_1) + tuple(conditioning_2),)


@node(
    "ConditioningSetTimestepRange",
    display_name="ConditioningSetTimestepRange",
    category="advanced/conditioning",
    outputs=[Output("CONDITIONING", CONDITIONING)],
    preflight=pass_family,
    comfy_core=True,
)
def conditioning_set_timestep_range(
    ctx,
    conditioning: Annotated[Conditioning, Input(CONDITIONING)],
    start: Annotated[float, Input(FLOAT, min=0.0, max=1.0, step=0.001,
                                  description="where in the schedule it starts to act (0: the first step)")] = 0.0,
    end: Annotated[float, Input(FLOAT, min=0.0, max=1.0, step=0.001,
                                description="where in the schedule it stops acting (1: the last step)")] = 1.0,
):
    """Make a conditioning act only over part of the schedule (e.g. one prompt early, another late)."""
    return (tuple(replace(condition, start=start, end=end) for condition in conditioning),)


SPECS = [clip_text_encode, clip_set_last_layer, flux_guidance, conditioning_combine, conditioning_set_timestep_range]
