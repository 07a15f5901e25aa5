"""Encoded prompts as a denoiser takes them: ComfyUI's CONDITIONING, made by the base's text encoders.

A :class:`Condition` is one encoded prompt (ComfyUI's ``[tensor, dict]`` entry): the tensors the
family's denoiser reads (prompt embeddings; pooled embeddings where the family has them), the
distilled guidance of guidance-distilled families, and the part of the schedule it is active in.
A :data:`Conditioning` is several of them: the sampler averages their predictions.

How a prompt is encoded (as ComfyUI encodes it; for plain text of one window, as the family's
diffusers pipeline does):

- CLIP encoders read windows of their tokenizer's length: start token, up to length - 2 tokens,
  end token, then padding with the tokenizer's pad token. A longer prompt is encoded window by
  window and the windows' embeddings are concatenated; a sequence encoder without a start token
  (T5) reads one window, cut at its length.
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

import torch
from torch import Tensor

if TYPE_CHECKING:
    from ..families import Family, TextEncoder
    from .base import BaseModel

Tokens = list[tuple[int, float]]  # (token id, weight)


@dataclass(frozen=True)
class Condition:
    """One encoded prompt, as the denoiser takes it (ComfyUI: one ``[tensor, dict]`` entry).

    ``tensors`` holds ``"embeds"`` ([1, tokens, width]: the prompt's sequence embeddings) and, for
    families with pooled text conditioning, ``"pooled"`` ([1, width]). ``guidance`` is FluxGuidance's
    value for guidance-distilled families (None: 3.5). ``start`` / ``end``: the fractions of the
    schedule it is active in (ConditioningSetTimestepRange; 0 = the first step, 1 = the last).
    """

    tensors: dict[str, Tensor]
    guidance: float | None = None
    start: float = 0.0
    end: float = 1.0


Conditioning = tuple[Condition, ...]  # several entries (ConditioningCombine): their predictions averaged


def encode_prompt(base: BaseModel, prompt: str | Sequence[tuple[str, float]],
                  last_layer: int | None = None) -> Condition:
    """Encode a prompt with ``base``'s text encoders as they are now (the caller has merged its LoRAs).

    ``prompt``: text, or ``(text, weight)`` pieces as ComfyUI's emphasis parser gives them; a weight
    moves its tokens' embeddings away from the empty prompt's (ComfyUI's rule). Prompts longer than
    one window of the tokenizer are encoded in windows and concatenated, as ComfyUI does.
    ``last_layer``: ComfyUI's CLIPSetLastLayer (-1 the last CLIP layer, -2 the penultimate: A1111's
    clip_skip N is ``-N``); None is the family's own choice when no CLIPSetLastLayer is given (the
    last layer for SD1, the penultimate for SD2 and SDXL: ``Family.text_layer``).
    """
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
    return Condition(tensors)


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
    return min(index, -1)


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


def weighted_tokens(tokenizer: Any, pieces: Sequence[tuple[str, float]]) -> Tokens:
    """Each piece's tokens (no start or end token) with the piece's weight, in order."""
    tokens: Tokens = []
    for text, weight in pieces:
        if text:
            tokens += [(int(i), weight) for i in tokenizer(text, add_special_tokens=False).input_ids]
    return tokens


def clip_windows(tokenizer: Any, tokens: Tokens) -> list[Tokens]:
    """Windows of the tokenizer's length: start token, up to length - 2 tokens, end token, padding
    (at least one window, for the empty prompt)."""
    length = int(tokenizer.model_max_length)
    size = length - 2
    windows = []
    for first in range(0, max(len(tokens), 1), size):
        body = tokens[first:first + size]
        window = [(tokenizer.bos_token_id, 1.0), *body, (tokenizer.eos_token_id, 1.0)]
        windows.append(window + [(tokenizer.pad_token_id, 1.0)] * (length - len(window)))
    return windows


def encode_clip(base: BaseModel, encoder: TextEncoder, pieces: Sequence[tuple[str, float]],
                layer: int | None, normalize: bool) -> tuple[Tensor | None, Tensor | None]:
    """(sequence embeddings from hidden layer ``layer`` or None when not asked, pooled vector of the
    first window) of one CLIP encoder, its windows weighted and concatenated."""
    model, tokenizer = base.components[encoder.component], base.components[encoder.tokenizer]
    windows = clip_windows(tokenizer, weighted_tokens(tokenizer, pieces))
    weighted = any(w != 1.0 for window in windows for _, w in window)
    if weighted:  # the empty prompt's window: what weights are relative to
        windows.append(clip_windows(tokenizer, [])[0])
    ids = torch.tensor([[i for i, _ in window] for window in windows], device=base.device)
    output = model(ids, output_hidden_states=layer is not None)
    pooled = getattr(output, "text_embeds", None)
    pooled = (output.pooler_output if pooled is None else pooled)[:1]
    if layer is None:
        return None, pooled
    states = output.last_hidden_state if layer == -1 else output.hidden_states[layer]
    if normalize and layer != -1:  # the last layer's output is normalized already
        states = getattr(model, "text_model", model).final_layer_norm(states)  # transformers 4 nests it
    if weighted:
        states = apply_weights(states[:-1], states[-1:], windows[:-1])
    return states.reshape(1, -1, states.shape[-1]), pooled


def encode_sequence(base: BaseModel, encoder: TextEncoder, pieces: Sequence[tuple[str, float]]) -> Tensor:
    """A sequence encoder's (T5's) output for the prompt: one window of its tokenizer's length (at
    most 512), ended by its end token and padded, weighted like CLIP's."""
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
    weights = torch.tensor([[w for _, w in window] for window in windows], dtype=states.dtype,
                           device=states.device).unsqueeze(-1)
    return empty + weights * (states - empty)
