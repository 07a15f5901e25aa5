"""Encoded prompts as a denoiser takes them: ComfyUI's CONDITIONING, made by the base's text encoders.

A :class:`Condition` is one encoded prompt (ComfyUI's ``[tensor, dict]`` entry): the tensors the
family's denoiser reads (prompt embeddings; pooled embeddings where the family has them), the
distilled guidance of guidance-distilled families, and the part of the schedule it is active in.
A :data:`Conditioning` is several of them: the sampler averages their predictions.

How a prompt is encoded (CLIP encoders as ComfyUI encodes them; for plain text of one window,
as the family's diffusers pipeline does):

- CLIP encoders read windows of their tokenizer's length: start token, up to length - 2 tokens,
  end token, then padding with the tokenizer's pad token. A longer prompt is encoded window by
  window and the windows' embeddings are concatenated. As in ComfyUI, a weighted piece of fewer
  than :data:`MAX_WORD_LENGTH` tokens is never split between windows: one that does not fit in
  what is left of a window ends that window early (padded) and starts the next.
- A sequence encoder without a start token (T5) reads one window of its tokenizer's length (at
  most 512), cut there, as the family's diffusers pipeline reads it. ComfyUI differs here: its
  Flux T5 pads to at least 256 tokens and never cuts, so a Flux prompt encoded here gives slightly
  other embeddings than ComfyUI's (the padding is attended to) and a prompt past 512 tokens is cut.
- The sequence embeddings are the CLIP encoders' chosen hidden layer, side by side (SD, SDXL),
  or the sequence encoder's output where the family has one (Flux's T5; its CLIP gives only the
  pooled vector). The pooled vector, for families with pooled conditioning, is the last CLIP
  encoder's (projected where it has a projection) of the first window.
- A token of weight ``w`` != 1 is moved from the empty prompt's embedding at its position:
  ``empty + w * (token - empty)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..errors import NodeError

if TYPE_CHECKING:
    from torch import Tensor

    from ..families import Family, TextEncoder
    from .base import BaseModel

Tokens = list[tuple[int, float]]  # (token id, weight)
# a weighted piece of fewer tokens than this is kept in one CLIP window (ComfyUI's rule, see above)
MAX_WORD_LENGTH = 8


@dataclass(frozen=True)
class Condition:
    """One encoded prompt, as the denoiser takes it (ComfyUI: one ``[tensor, dict]`` entry).

    ``tensors`` holds ``"embeds"`` ([1, tokens, width]: the prompt's sequence embeddings) and, for
    families with pooled text conditioning, ``"pooled"`` ([1, width]). ``guidance`` is FluxGuidance's
    value for guidance-distilled families (None: 3.5). ``start`` / ``end``: the fractions of the
    schedule it is active in (ConditioningSetTimestepRange; 0 = the first step, 1 = the last).
    ``family``: the id of the family whose text encoders made it (a denoiser of another family
    cannot read it: the sampler says so by name rather than failing on tensor shapes).
    """

    tensors: dict[str, Tensor]
    guidance: float | None = None
    start: float = 0.0
    end: float = 1.0
    family: str | None = None


Conditioning = tuple[Condition, ...]  # several entries (ConditioningCombine): their predictions averaged


def encode_prompt(base: BaseModel, prompt: str | Sequence[tuple[str, float]],
                  last_layer: int | None = None) -> Condition:
    """Encode a prompt with ``base``'s text encoders as they are now (the caller has merged its LoRAs).

    ``prompt``: text, or ``(text, weight)`` pieces as ComfyUI's emphasis parser gives them; a weight
    moves its tokens' embeddings away from the empty prompt's (ComfyUI's rule). Prompts longer than
    one window of a CLIP tokenizer are encoded in windows and concatenated, as ComfyUI does (see the
    module docstring for the sequence encoder's one window, where we differ).
    ``last_layer``: ComfyUI's CLIPSetLastLayer (-1 the last CLIP layer, -2 the penultimate: A1111's
    clip_skip N is ``-N``); None is the family's own choice when no CLIPSetLastLayer is given (the
    last layer for SD1, the penultimate for SD2 and SDXL: ``Family.text_layer``). An encoder kept
    without its last layer (SD2's: see :func:`missing_layer_note`) reads its penultimate layer for -1.
    """
    import torch

    pieces = [(prompt, 1.0)] if isinstance(prompt, str) else [(str(t), float(w)) for t, w in prompt]
    family = base.family
    sequence_encoders = [t for t in family.text_encoders if not is_clip(t)]
    clips = [t for t in family.text_encoders if is_clip(t)]
    with torch.no_grad():
        hidden, pooled = [], None
        for encoder in clips:
            layer = None if sequence_encoders else clip_layer_index(family, encoder, last_layer)
            states, pooled = encode_clip(base, encoder, pieces, layer, normalize=family.text_layer == -1)
            if states is not None:
                hidden.append(states)
        hidden += [encode_sequence(base, encoder, pieces) for encoder in sequence_encoders]
        length = min(h.shape[1] for h in hidden)  # ComfyUI cuts side-by-side encoders to the shorter
        tensors = {"embeds": torch.cat([h[:, :length] for h in hidden], dim=-1)}
        if family.pooled_text_conditioning and pooled is not None:
            tensors["pooled"] = pooled
    return Condition(tensors, family=family.id)


def is_clip(encoder: TextEncoder) -> bool:
    """Whether a text encoder is a CLIP text model (windows with start and end tokens, hidden layers
    to choose from), not a sequence encoder like T5."""
    return encoder.model_class.startswith("CLIP")


def clip_layer_index(family: Family, encoder: TextEncoder, last_layer: int | None) -> int:
    """The hidden-state index (diffusers' numbering) a CLIPSetLastLayer value reads; an encoder that
    diffusers keeps one layer short of the original holds the original's ``-k`` at ``-(k - 1)``."""
    if last_layer is None:
        return family.text_layer
    index = int(last_layer) + (1 if encoder.cuts_last_layer else 0)
    return min(index, -1)  # the original's last layer, which we do not hold: the nearest we do


def missing_layer_note(family: Family, last_layer: int | None) -> str | None:
    """Why ``last_layer`` (CLIPSetLastLayer's value) reads another layer than ComfyUI reads on ``family``,
    or None: -1 on an encoder loaded without its last layer (as diffusers keeps SD2's) reads the
    penultimate layer, which ComfyUI reads only for -2."""
    if last_layer is None or not reads_clip_layers(family):
        return None
    cut = [t for t in family.text_encoders if t.cuts_last_layer]
    if not cut or clip_layer_index(family, cut[0], last_layer) == int(last_layer) + 1:
        return None
    return (f"{family.display_name}'s text encoder is loaded without its last layer (as diffusers keeps it), "
            f"so stop_at_clip_layer {last_layer} reads the penultimate layer, as -2 does; ComfyUI reads the "
            "last layer here")


def clip_skip_layer(family: Family, clip_skip: int) -> int | None:
    """A1111's clip skip as a CLIPSetLastLayer value: 1 (the default) is the family's own layer (None),
    each more skips one more layer before it."""
    if clip_skip <= 1:
        return None
    first = family.text_encoders[0]
    own = family.text_layer - (1 if first.cuts_last_layer else 0)  # in the original model's numbering
    return own - (clip_skip - 1)


def reads_clip_layers(family: Family) -> bool:
    """Whether the family's prompts are read from a CLIP hidden layer (clip skip changes them), not
    only from a sequence encoder with CLIP's pooled vector beside it."""
    return all(is_clip(t) for t in family.text_encoders)


def weighted_groups(tokenizer: Any, pieces: Sequence[tuple[str, float]]) -> list[Tokens]:
    """Each non-empty piece's tokens (no start or end token) with the piece's weight, in order."""
    groups = []
    for text, weight in pieces:
        if text:
            groups.append([(int(i), weight) for i in tokenizer(text, add_special_tokens=False).input_ids])
    return groups


def weighted_tokens(tokenizer: Any, pieces: Sequence[tuple[str, float]]) -> Tokens:
    """Each piece's tokens (no start or end token) with the piece's weight, in order."""
    return [token for group in weighted_groups(tokenizer, pieces) for token in group]


def clip_windows(tokenizer: Any, groups: Sequence[Tokens]) -> list[Tokens]:
    """Windows of the tokenizer's length: start token, up to length - 2 tokens, end token, padding
    (at least one window, for the empty prompt). A group (one weighted piece's tokens) shorter than
    :data:`MAX_WORD_LENGTH` that does not fit in what is left of a window starts the next one;
    a longer group fills the window and goes on in the next."""
    length = int(tokenizer.model_max_length)
    size = length - 2
    bodies: list[Tokens] = [[]]
    for group in groups:
        group = list(group)
        while group:
            room = size - len(bodies[-1])
            if len(group) <= room:
                bodies[-1] += group
                break
            if len(group) >= MAX_WORD_LENGTH:  # split: as much as fits here, the rest in the next window
                bodies[-1] += group[:room]
                group = group[room:]
            bodies.append([])
    windows = []
    for body in bodies:
        window = [(tokenizer.bos_token_id, 1.0), *body, (tokenizer.eos_token_id, 1.0)]
        windows.append(window + [(tokenizer.pad_token_id, 1.0)] * (length - len(window)))
    return windows


def encode_clip(base: BaseModel, encoder: TextEncoder, pieces: Sequence[tuple[str, float]],
                layer: int | None, normalize: bool) -> tuple[Tensor | None, Tensor | None]:
    """(sequence embeddings from hidden layer ``layer`` or None when not asked, pooled vector of the
    first window) of one CLIP encoder, its windows weighted and concatenated."""
    import torch

    model, tokenizer = base.components[encoder.component], base.components[encoder.tokenizer]
    windows = clip_windows(tokenizer, weighted_groups(tokenizer, pieces))
    weighted = any(w != 1.0 for window in windows for _, w in window)
    if weighted:  # the empty prompt's window: what weights are relative to
        windows.append(clip_windows(tokenizer, [])[0])
    ids = torch.tensor([[i for i, _ in window] for window in windows], device=base.device)
    output = model(ids, output_hidden_states=layer is not None)
    pooled = getattr(output, "text_embeds", None)
    pooled = (output.pooler_output if pooled is None else pooled)[:1]
    if layer is None:
        return None, pooled
    # a family whose encoders read any layer through the final layer norm (SD1, SD2) has the last
    # layer's output normalized already; one whose encoders never normalize (SDXL) reads the last
    # layer as it leaves the transformer, as ComfyUI reads it for CLIPSetLastLayer -1
    if normalize and layer == -1:
        states = output.last_hidden_state
    else:
        layers = len(output.hidden_states) - 1  # the embeddings' output comes first
        if -layer > layers:
            raise NodeError(f"the prompt is to be read {-layer} layers from the end of {encoder.component}, which has "
                            f"{layers}: use a clip skip (or CLIPSetLastLayer) of at most {layers} (-{layers})")
        states = output.hidden_states[layer]
        if normalize:
            states = getattr(model, "text_model", model).final_layer_norm(states)  # transformers 4 nests it
    if weighted:
        states = apply_weights(states[:-1], states[-1:], windows[:-1])
    return states.reshape(1, -1, states.shape[-1]), pooled


def encode_sequence(base: BaseModel, encoder: TextEncoder, pieces: Sequence[tuple[str, float]]) -> Tensor:
    """A sequence encoder's (T5's) output for the prompt: one window of its tokenizer's length (at
    most 512), ended by its end token and padded, weighted like CLIP's. This is the family's diffusers
    pipeline's rule, not ComfyUI's (see the module docstring)."""
    import torch

    model, tokenizer = base.components[encoder.component], base.components[encoder.tokenizer]
    length = int(min(tokenizer.model_max_length, 512))

    def window(tokens: Tokens) -> Tokens:
        tokens = [*tokens[:length - 1], (tokenizer.eos_token_id, 1.0)]
        return tokens + [(tokenizer.pad_token_id, 1.0)] * (length - len(tokens))

    windows = [window(weighted_tokens(tokenizer, pieces))]
    weighted = any(w != 1.0 for _, w in windows[0])
    if weighted:
        windows.append(window([]))
    ids = torch.tensor([[i for i, _ in w] for w in windows], device=base.device)
    states = model(ids).last_hidden_state
    return apply_weights(states[:1], states[1:], windows[:1]) if weighted else states


def apply_weights(states: Tensor, empty: Tensor, windows: Sequence[Tokens]) -> Tensor:
    """Move each token's embedding from the empty prompt's by its weight: ``empty + w * (x - empty)``."""
    import torch

    weights = torch.tensor([[w for _, w in window] for window in windows], dtype=states.dtype,
                           device=states.device).unsqueeze(-1)
    return empty + weights * (states - empty)
