"""A small CLIP BPE tokenizer that the package builds itself, so no tokenizer is downloaded.

It speaks CLIP's format (byte-level symbols, ``</w>`` word ends, start/end tokens), so the real
``transformers.CLIPTokenizer`` runs it. Its merges cover a fixed list of words; any other word
falls back to single characters, which still encodes every prompt.
"""

from __future__ import annotations

import itertools
import json
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

START, END = "<|startoftext|>", "<|endoftext|>"

WORDS = (
    "a", "an", "the", "of", "on", "in", "with", "and", "or", "at", "by", "to", "from",
    "red", "green", "blue", "yellow", "purple", "orange", "pink", "black", "white", "gray", "grey",
    "brown", "cyan", "magenta",
    "circle", "square", "triangle", "star", "rectangle", "shape", "shapes",
    "small", "large", "big", "tiny", "background", "photo", "picture", "image", "drawing", "style",
    "painting",
)


def _byte_symbols() -> list[str]:
    """One printable unicode character per byte value, as CLIP's byte-level BPE uses."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(extra)) for b in range(256)]


def build_vocab(words: tuple[str, ...] | list[str] = WORDS) -> tuple[dict[str, int], list[str]]:
    """The vocabulary and merge list: every byte symbol, then BPE merges learned on ``words``.

    Merges are learned until every word is one token (most frequent pair first, ties broken
    alphabetically), so encoding reproduces that segmentation and each word is a single token.
    """
    symbols = _byte_symbols()
    vocab: dict[str, int] = {}
    for token in [*symbols, *(s + "</w>" for s in symbols)]:
        vocab.setdefault(token, len(vocab))
    pieces = [[*w[:-1], w[-1] + "</w>"] for w in dict.fromkeys(words)]
    merges: list[str] = []
    while True:
        counts: dict[tuple[str, str], int] = {}
        for word in pieces:
            for pair in itertools.pairwise(word):
                counts[pair] = counts.get(pair, 0) + 1
        if not counts:
            break
        best = min(counts, key=lambda pair: (-counts[pair], pair))
        merges.append(" ".join(best))
        vocab.setdefault("".join(best), len(vocab))
        pieces = [_merge(word, best) for word in pieces]
    vocab[START] = len(vocab)
    vocab[END] = len(vocab)
    return vocab, merges


def _merge(word: list[str], pair: tuple[str, str]) -> list[str]:
    out: list[str] = []
    i = 0
    while i < len(word):
        if i + 1 < len(word) and (word[i], word[i + 1]) == pair:
            out.append(word[i] + word[i + 1])
            i += 2
        else:
            out.append(word[i])
            i += 1
    return out


def build_tokenizer(max_length: int = 77):
    """A ``CLIPTokenizer`` over :func:`build_vocab`, identical every time it is built."""
    from transformers import CLIPTokenizer

    vocab, merges = build_vocab()
    with tempfile.TemporaryDirectory() as folder:
        vocab_file, merges_file = Path(folder, "vocab.json"), Path(folder, "merges.txt")
        vocab_file.write_text(json.dumps(vocab), encoding="utf-8")
        merges_file.write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
        return CLIPTokenizer(str(vocab_file), str(merges_file), model_max_length=max_length)


def build_t5_tokenizer(max_length: int = 32):
    """A T5 tokenizer (``T5TokenizerFast``) over :data:`WORDS`, built in code: no sentencepiece model.

    A unigram vocabulary in T5's layout (pad 0, end 1, unknown 2, a ``▁`` marking word starts):
    each word of the list is one token; any other text falls back to single characters.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    mark = "\u2581"
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    vocab += [(mark + word, -1.0) for word in dict.fromkeys(WORDS)]  # whole words score best
    vocab += [(c, -5.0) for c in mark + "abcdefghijklmnopqrstuvwxyz0123456789.,-'"]  # then characters
    tokenizer = Tokenizer(models.Unigram(vocab, unk_id=2))
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement=mark, prepend_scheme="always")
    tokenizer.decoder = decoders.Metaspace(replacement=mark, prepend_scheme="always")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)])
    return T5TokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                           extra_ids=0, model_max_length=max_length)


def tokenizer_files(tokenizer) -> dict[str, str]:
    """The files ``tokenizer.save_pretrained`` writes, as ``{file name: text}``."""
    with tempfile.TemporaryDirectory() as folder:
        tokenizer.save_pretrained(folder)
        return {p.name: p.read_text(encoding="utf-8") for p in sorted(Path(folder).iterdir()) if p.is_file()}


def tokenizer_from_files(files: Mapping[str, str], tokenizer_class: Any = None):
    """A tokenizer (default ``CLIPTokenizer``) from :func:`tokenizer_files`' output, as ``from_pretrained`` reads them."""
    if tokenizer_class is None:
        from transformers import (
            CLIPTokenizer as tokenizer_class,  # deferred: transformers takes seconds to import
        )

    with tempfile.TemporaryDirectory() as folder:
        for name, text in files.items():
            Path(folder, Path(name).name).write_text(text, encoding="utf-8")
        return tokenizer_class.from_pretrained(folder)


# --------------------------------------------------------------------------- CLIP's own vocabulary

CLIP_MERGES = Path(__file__).with_name("configs") / "clip_merges.txt.gz"  # MIT, see LICENSE-CLIP-BPE.txt
CLIP_VOCAB_SIZE = 49408  # the byte symbols twice (plain, word end), 48894 merges, start and end


def _clip_byte_order() -> list[str]:
    """CLIP's byte symbols in its vocabulary's order: the printable bytes as themselves, in byte
    order, then the other bytes as the characters from 256 up (the same symbols as
    :func:`_byte_symbols`, listed printable first)."""
    symbols = _byte_symbols()
    printable = [s for b, s in enumerate(symbols) if ord(s) == b]
    return printable + [s for b, s in enumerate(symbols) if ord(s) != b]


def _clip_files() -> tuple[str, str]:
    """CLIP's ``vocab.json`` and ``merges.txt`` texts, derived from the shipped merges as CLIP
    derives its vocabulary: every byte symbol, the same with ``</w>``, each merge's result, then
    the start and end tokens."""
    import gzip

    merges_text = gzip.decompress(CLIP_MERGES.read_bytes()).decode("utf-8")
    merges = [line for line in merges_text.splitlines() if line and not line.startswith("#version")]
    symbols = _clip_byte_order()
    tokens = [*symbols, *(s + "</w>" for s in symbols), *(m.replace(" ", "") for m in merges), START, END]
    return json.dumps({token: i for i, token in enumerate(tokens)}), merges_text


def build_clip_tokenizer(pad_token: str = "", max_length: int = 77):
    """The released CLIP text encoders' tokenizer (49408 tokens), from the merges the package ships;
    ``pad_token`` "" pads with the end token (CLIP's), else with that token (OpenCLIP's "!")."""
    from transformers import CLIPTokenizer

    vocab, merges = _clip_files()
    with tempfile.TemporaryDirectory() as folder:
        vocab_file, merges_file = Path(folder, "vocab.json"), Path(folder, "merges.txt")
        vocab_file.write_text(vocab, encoding="utf-8")
        merges_file.write_text(merges, encoding="utf-8")
        return CLIPTokenizer(str(vocab_file), str(merges_file), model_max_length=max_length,
                             pad_token=pad_token or END)


def tokenizer_for(model_class: str, vocab_size: int, pad_token: str = ""):
    """The tokenizer of a text encoder of this transformers class and vocabulary size, told by the
    size: the released CLIP encoders' (49408 tokens, from the shipped merges), or ours (the
    built-in models'); None when neither fits (a T5 needs its own sentencepiece model)."""
    if model_class.startswith("T5"):
        tokenizer = build_t5_tokenizer()
        return tokenizer if len(tokenizer) == vocab_size else None
    if vocab_size == CLIP_VOCAB_SIZE:
        return build_clip_tokenizer(pad_token)
    tokenizer = build_tokenizer()
    return tokenizer if len(tokenizer) == vocab_size else None
