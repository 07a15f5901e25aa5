"""LoRA files of every Flux layout for a Flux base (``builtin:tiny-flux``), each with the weights it
must give, computed here from the file's own tensors by the layout's definition (docs/flux-notes.md
sections 2 and 3), never through lora_nodes' placement code.

``flux_lora(layout, base, seed)`` makes a :class:`FluxLoRAFile`: its tensors and metadata, the file
keys that must stay unplaced, and ``expected(originals, strength)``, which maps every target the file
changes (and ``target.bias`` for biases) to its weight after the LoRA is applied at ``strength``.
``write(path)`` saves it. Widths and block counts are read from the base's modules.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import Tensor

# BFL module -> diffusers module(s), restated from docs/flux-notes.md section 1 so that the tests
# do not use the package's own map. A tuple is a fused module: its rows are the parts' rows in order.
DOUBLE = {
    "img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
    "img_attn.proj": "attn.to_out.0",
    "txt_attn.proj": "attn.to_add_out",
    "img_mlp.0": "ff.net.0.proj",
    "img_mlp.2": "ff.net.2",
    "txt_mlp.0": "ff_context.net.0.proj",
    "txt_mlp.2": "ff_context.net.2",
    "img_mod.lin": "norm1.linear",
    "txt_mod.lin": "norm1_context.linear",
}
SINGLE = {
    "linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"),
    "linear2": "proj_out",
    "modulation.lin": "norm.linear",
}
TOP = {
    "img_in": "x_embedder",
    "txt_in": "context_embedder",
    "time_in.in_layer": "time_text_embed.timestep_embedder.linear_1",
    "time_in.out_layer": "time_text_embed.timestep_embedder.linear_2",
    "vector_in.in_layer": "time_text_embed.text_embedder.linear_1",
    "vector_in.out_layer": "time_text_embed.text_embedder.linear_2",
    "guidance_in.in_layer": "time_text_embed.guidance_embedder.linear_1",
    "guidance_in.out_layer": "time_text_embed.guidance_embedder.linear_2",
    "final_layer.linear": "proj_out",
}
ADALN = "final_layer.adaLN_modulation.1"  # BFL (shift, scale) = diffusers norm_out.linear (scale, shift)
XLABS_SINGLE_QKV = "linear1[:3H]"  # XLabs' single-block qkv_lora: the q/k/v rows of linear1 only

LAYOUTS = ("kohya", "kohya_te2", "kohya_double", "kohya_split_qkv", "bfl", "bfl_lora_ab", "peft",
           "peft_no_metadata", "peft_double", "xlabs", "xlabs_prefixed", "onetrainer", "lycoris_fused", "lycoris_split",
           "dora_fused")
EPS = torch.finfo(torch.float32).eps


def kohya(bfl: str) -> str:
    return "lora_unet_" + bfl.replace(".", "_")


@dataclass
class Change:
    """One module's change: ``delta`` (scaled, strength 1) on ``place``'s rows; DoRA when ``dora`` is set."""

    place: str  # "bfl:<BFL path>" or a target ("transformer.x_embedder", "text_encoder....")
    delta: Tensor
    bias: Tensor | None = None
    dora: Tensor | None = None  # per output row [R, 1] (ComfyUI: norm of the original rows) or [1, in]


@dataclass
class FluxLoRAFile:
    tensors: dict[str, Tensor]
    metadata: dict[str, str] | None
    changes: list[Change]
    rows: Callable[[str], dict[str, Tensor]]  # place -> {target: the place's rows it holds, in target order}
    unplaced: set[str] = field(default_factory=set)  # file module keys (as read) that must not place

    def write(self, path: str | Path) -> Path:
        save_file({k: v.contiguous() for k, v in self.tensors.items()}, str(path), metadata=self.metadata)
        return Path(path)

    @property
    def targets(self) -> set[str]:
        return {t for change in self.changes for t in self.rows(change.place)}

    def expected(self, originals: dict[str, Tensor], strength: float) -> dict[str, Tensor]:
        """target (and ``target.bias``) -> its weight after this file at ``strength``, float32, for
        every weight the file changes (the others must stay as they are)."""
        out = {k: v.float().clone() for k, v in originals.items()}
        touched = set()
        for change in self.changes:
            rows = self.rows(change.place)
            fused_rows = change.delta.shape[0]
            weight = torch.zeros(fused_rows, change.delta.shape[1])
            for target, index in rows.items():
                weight[index] = out[target]
            if change.dora is None:
                weight += strength * change.delta
            else:
                updated = weight + change.delta
                on_rows = change.dora.shape[0] == fused_rows
                norm = weight.norm(dim=1, keepdim=True) if on_rows else updated.norm(dim=0, keepdim=True)
                weight = weight + strength * (updated * change.dora / (norm + EPS) - weight)
            for target, index in rows.items():
                out[target] = weight[index]
                touched.add(target)
                if change.bias is not None:
                    out[f"{target}.bias"] = out[f"{target}.bias"] + strength * change.bias[index]
                    touched.add(f"{target}.bias")
        return {key: out[key] for key in touched}


def _row_map(base) -> Callable[[str], dict[str, Tensor]]:
    """place -> {target: fused rows in target order}, from the test's tables and the base's widths."""
    targets = base.lora_targets

    def rows_of(target: str) -> int:
        return targets[target].weight.shape[0]

    def pieces(prefix: str, parts: tuple[str, ...]) -> dict[str, Tensor]:
        out, start = {}, 0
        for part in parts:
            target = f"transformer.{prefix}.{part}"
            out[target] = torch.arange(start, start + rows_of(target))
            start += rows_of(target)
        return out

    def rows(place: str) -> dict[str, Tensor]:
        if not place.startswith("bfl:"):
            return {place: torch.arange(rows_of(place))}
        bfl = place[len("bfl:"):]
        if bfl == ADALN:
            half = rows_of("transformer.norm_out.linear") // 2
            return {"transformer.norm_out.linear": torch.cat([torch.arange(half, 2 * half), torch.arange(half)])}
        if bfl in TOP:
            return {f"transformer.{TOP[bfl]}": torch.arange(rows_of(f"transformer.{TOP[bfl]}"))}
        kind, n, module = re.match(r"(double|single)_blocks\.(\d+)\.(.+)", bfl).groups()
        prefix = f"{'transformer_blocks' if kind == 'double' else 'single_transformer_blocks'}.{n}"
        if module == XLABS_SINGLE_QKV:
            return pieces(prefix, SINGLE["linear1"][:3])
        diffusers = (DOUBLE if kind == "double" else SINGLE)[module]
        if isinstance(diffusers, tuple):
            return pieces(prefix, diffusers)
        return {f"transformer.{prefix}.{diffusers}": torch.arange(rows_of(f"transformer.{prefix}.{diffusers}"))}

    return rows


class _Maker:
    """Random factors of the right shapes, written under a layout's keys, with their changes noted."""

    def __init__(self, base, seed: int, biases: bool):
        self.base, self.biases = base, biases
        self.g = torch.Generator().manual_seed(seed)
        self.rows = _row_map(base)
        self.tensors: dict[str, Tensor] = {}
        self.changes: list[Change] = []

    def rnd(self, *shape: int, std: float = 1.0) -> Tensor:
        return torch.randn(*shape, generator=self.g) * std

    def shape(self, place: str) -> tuple[int, int]:
        rows = self.rows(place)
        fused = sum(len(index) for index in rows.values())
        target = next(iter(rows))
        return fused, self.base.lora_targets[target].weight.shape[1]

    def lora(self, key: str, place: str, rank: int = 4, alpha: float | None = None, down: str = ".lora_down.weight",
             up: str = ".lora_up.weight", alpha_key: str | None = ".alpha", scale: float | None = None) -> None:
        """A plain LoRA module; its scale is alpha/rank, or ``scale`` when the layout sets it another way."""
        out, inp = self.shape(place)
        a, b = self.rnd(rank, inp, std=inp ** -0.5), self.rnd(out, rank, std=0.3)
        self.tensors[key + down], self.tensors[key + up] = a, b
        if alpha is not None and alpha_key is not None:
            self.tensors[key + alpha_key] = torch.tensor(float(alpha))
        if scale is None:
            scale = 1.0 if alpha is None else alpha / rank
        self.changes.append(Change(place, scale * b @ a))

    def block_diagonal(self, key: str, place: str, rank: int, alpha: float) -> None:
        """kohya's split_qkv file: down = cat(down_i) [n*r, in], up = blockdiag(up_i), alpha kept."""
        rows = self.rows(place)
        out, inp = self.shape(place)
        n = len(rows)
        down = self.rnd(n * rank, inp, std=inp ** -0.5)
        up = torch.zeros(out, n * rank)
        start = 0
        for i, index in enumerate(rows.values()):
            up[start:start + len(index), i * rank:(i + 1) * rank] = self.rnd(len(index), rank, std=0.3)
            start += len(index)
        self.tensors.update({key + ".lora_down.weight": down, key + ".lora_up.weight": up,
                             key + ".alpha": torch.tensor(float(alpha))})
        self.changes.append(Change(place, alpha / (n * rank) * up @ down))

    def lokr(self, key: str, place: str, alpha: float) -> None:
        out, inp = self.shape(place)
        w1 = self.rnd(4, 4)
        w2a, w2b = self.rnd(out // 4, 2, std=0.3), self.rnd(2, inp // 4, std=0.3)
        self.tensors.update({key + ".lokr_w1": w1, key + ".lokr_w2_a": w2a, key + ".lokr_w2_b": w2b,
                             key + ".alpha": torch.tensor(float(alpha))})
        self.changes.append(Change(place, alpha / 2 * torch.kron(w1, w2a @ w2b)))

    def loha(self, key: str, place: str, alpha: float, rank: int = 3) -> None:
        out, inp = self.shape(place)
        a1, b1, a2, b2 = (self.rnd(out, rank, std=0.5), self.rnd(rank, inp, std=0.5),
                          self.rnd(out, rank, std=0.5), self.rnd(rank, inp, std=0.5))
        self.tensors.update({key + ".hada_w1_a": a1, key + ".hada_w1_b": b1, key + ".hada_w2_a": a2,
                             key + ".hada_w2_b": b2, key + ".alpha": torch.tensor(float(alpha))})
        self.changes.append(Change(place, alpha / rank * (a1 @ b1) * (a2 @ b2)))

    def full(self, key: str, place: str, with_bias: bool | None = None) -> None:
        with_bias = self.biases if with_bias is None else with_bias
        out, inp = self.shape(place)
        diff, diff_b = self.rnd(out, inp, std=0.05), self.rnd(out, std=0.05)
        self.tensors[key + ".diff"] = diff
        if with_bias:
            self.tensors[key + ".diff_b"] = diff_b
        self.changes.append(Change(place, diff, diff_b if with_bias else None))

    def dora(self, key: str, place: str, alpha: float, per_row: bool, rank: int = 4,
             down: str = ".lora_down.weight", up: str = ".lora_up.weight") -> None:
        out, inp = self.shape(place)
        a, b = self.rnd(rank, inp, std=inp ** -0.5), self.rnd(out, rank, std=0.3)
        m = torch.rand(out, 1, generator=self.g) + 0.5 if per_row else torch.rand(1, inp, generator=self.g) + 0.5
        self.tensors.update({key + down: a, key + up: b, key + ".alpha": torch.tensor(float(alpha)),
                             key + ".dora_scale": m})
        self.changes.append(Change(place, alpha / rank * b @ a, dora=m))

    def done(self, metadata: dict[str, str] | None = None, unplaced: set[str] | None = None) -> FluxLoRAFile:
        return FluxLoRAFile(self.tensors, metadata, self.changes, self.rows, unplaced or set())


def blocks(base) -> tuple[int, int]:
    """(double blocks, single blocks) of the base, counted from its modules."""
    def count(pattern: str) -> int:
        return 1 + max(int(m.group(1)) for t in base.lora_targets if (m := re.match(pattern, t)))
    return count(r"transformer\.transformer_blocks\.(\d+)\."), count(r"transformer\.single_transformer_blocks\.(\d+)\.")


CLIP_Q = "text_model.encoder.layers.{n}.self_attn.q_proj"
CLIP_FC1 = "text_model.encoder.layers.{n}.mlp.fc1"
T5_Q = "encoder.block.{n}.layer.0.SelfAttention.q"
T5_WI = "encoder.block.{n}.layer.1.DenseReluDense.wi_0"


def _kohya(m: _Maker, t5_prefix: str = "lora_te3_", clip_prefix: str = "lora_te1_", double_only: bool = False) -> None:
    doubles, singles = blocks(m.base)
    for n in range(doubles):
        for i, bfl in enumerate(DOUBLE):
            m.lora(kohya(f"double_blocks.{n}.{bfl}"), f"bfl:double_blocks.{n}.{bfl}", rank=4, alpha=1.0 + i % 4)
    if double_only:
        return
    for n in range(singles):
        for i, bfl in enumerate(SINGLE):
            m.lora(kohya(f"single_blocks.{n}.{bfl}"), f"bfl:single_blocks.{n}.{bfl}", rank=2 + i, alpha=2.0)
    for bfl in ("img_in", "txt_in", "time_in.in_layer", "vector_in.out_layer", "guidance_in.in_layer",
                "final_layer.linear", ADALN):
        m.lora(kohya(bfl), f"bfl:{bfl}", rank=4, alpha=3.0)
    for n in range(2):
        for path in (CLIP_Q, CLIP_FC1):
            module = path.format(n=n)
            m.lora(clip_prefix + module.replace(".", "_"), f"text_encoder.{module}", rank=4, alpha=2.0)
        for path in (T5_Q, T5_WI):
            module = path.format(n=n)
            m.lora(t5_prefix + module.replace(".", "_"), f"text_encoder_2.{module}", rank=4, alpha=8.0)


def _bfl(m: _Maker, prefix: str, down: str, up: str, with_alpha: bool) -> None:
    doubles, singles = blocks(m.base)
    for n in range(doubles):
        for bfl in ("img_attn.qkv", "txt_attn.proj", "txt_mlp.0", "img_mod.lin"):
            path = f"double_blocks.{n}.{bfl}"
            m.lora(prefix + path, f"bfl:{path}", rank=4, alpha=2.0 if with_alpha else None, down=down, up=up)
    for n in range(singles):
        for bfl in ("linear1", "linear2"):
            path = f"single_blocks.{n}.{bfl}"
            m.lora(prefix + path, f"bfl:{path}", rank=3, alpha=6.0 if with_alpha else None, down=down, up=up)
    for bfl in (ADALN, "img_in", "final_layer.linear"):
        m.lora(prefix + bfl, f"bfl:{bfl}", rank=2, alpha=1.0 if with_alpha else None, down=down, up=up)


PEFT_DOUBLE = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.add_q_proj", "attn.add_v_proj", "attn.to_out.0",
               "ff.net.0.proj", "ff_context.net.2", "norm1.linear")
PEFT_SINGLE = ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp", "proj_out", "norm.linear")
PEFT_TOP = ("x_embedder", "context_embedder", "time_text_embed.guidance_embedder.linear_1", "norm_out.linear",
            "proj_out")


def _peft(m: _Maker, with_metadata: bool, rank: int = 4, alpha: float = 8.0, pattern: dict | None = None,
          double_only: bool = False) -> dict | None:
    """A diffusers/PEFT file; alpha from ``lora_adapter_metadata`` (``alpha_pattern`` overrides).
    ``double_only``: the double blocks alone, no text encoder (what diffusers' kohya converter reads
    at any width, once saved in kohya layout)."""
    doubles, singles = blocks(m.base)
    pattern = pattern or {}

    def scale_of(path: str) -> float:
        if not with_metadata:
            return 1.0
        found = next((a for p, a in pattern.items() if path == p or path.endswith("." + p)), alpha)
        return found / rank

    paths = [f"transformer_blocks.{n}.{p}" for n in range(doubles) for p in PEFT_DOUBLE]
    if not double_only:
        paths += [f"single_transformer_blocks.{n}.{p}" for n in range(singles) for p in PEFT_SINGLE] + list(PEFT_TOP)
    for path in paths:
        m.lora(f"transformer.{path}", f"transformer.{path}", rank=rank, down=".lora_A.weight", up=".lora_B.weight",
               alpha_key=None, scale=scale_of(path))
    meta = {"transformer.r": rank, "transformer.lora_alpha": alpha, "transformer.alpha_pattern": pattern,
            "transformer.rank_pattern": {}, "transformer.target_modules": sorted(paths)}
    if not double_only:
        for n in range(2):
            path = CLIP_Q.format(n=n)
            m.lora(f"text_encoder.{path}", f"text_encoder.{path}", rank=rank, down=".lora_A.weight",
                   up=".lora_B.weight", alpha_key=None, scale=1.0)
        meta.update({"text_encoder.r": rank, "text_encoder.lora_alpha": rank, "text_encoder.target_modules": ["q_proj"]})
    return {"lora_adapter_metadata": json.dumps(meta)} if with_metadata else None


def _xlabs(m: _Maker, prefix: str) -> None:
    doubles, singles = blocks(m.base)
    for n in range(doubles):
        for name, bfl in (("qkv_lora1", "img_attn.qkv"), ("qkv_lora2", "txt_attn.qkv"),
                          ("proj_lora1", "img_attn.proj"), ("proj_lora2", "txt_attn.proj")):
            m.lora(f"{prefix}double_blocks.{n}.processor.{name}", f"bfl:double_blocks.{n}.{bfl}", rank=4,
                   down=".down.weight", up=".up.weight", alpha_key=None)
    for n in range(singles):
        m.lora(f"{prefix}single_blocks.{n}.processor.qkv_lora", f"bfl:single_blocks.{n}.{XLABS_SINGLE_QKV}", rank=4,
               down=".down.weight", up=".up.weight", alpha_key=None)
        m.lora(f"{prefix}single_blocks.{n}.processor.proj_lora", f"bfl:single_blocks.{n}.linear2", rank=4,
               down=".down.weight", up=".up.weight", alpha_key=None)


def _onetrainer(m: _Maker) -> None:
    doubles, singles = blocks(m.base)
    paths = ([f"transformer_blocks.{n}.{p}" for n in range(doubles) for p in ("attn.to_q", "attn.to_k", "ff.net.2")]
             + [f"single_transformer_blocks.{n}.{p}" for n in range(singles) for p in ("attn.to_v", "proj_mlp")]
             + ["norm_out.linear", "x_embedder"])
    for path in paths:
        m.lora("lora_transformer_" + path.replace(".", "_"), f"transformer.{path}", rank=4, alpha=2.0)
    for n in range(2):
        module = T5_Q.format(n=n)
        m.lora("lora_te2_" + module.replace(".", "_"), f"text_encoder_2.{module}", rank=4, alpha=4.0)


def _lycoris_fused(m: _Maker) -> None:
    """LyCORIS types on kohya's fused BFL modules (and on the adaLN, whose halves swap)."""
    m.lokr(kohya("double_blocks.0.img_attn.qkv"), "bfl:double_blocks.0.img_attn.qkv", alpha=1.0)
    m.loha(kohya("single_blocks.0.linear1"), "bfl:single_blocks.0.linear1", alpha=1.5)
    m.full(kohya("double_blocks.0.txt_attn.qkv"), "bfl:double_blocks.0.txt_attn.qkv")
    m.dora(kohya("double_blocks.1.img_attn.qkv"), "bfl:double_blocks.1.img_attn.qkv", alpha=2.0, per_row=True)
    m.dora(kohya("single_blocks.1.linear1"), "bfl:single_blocks.1.linear1", alpha=2.0, per_row=True)
    m.lokr(kohya(ADALN), f"bfl:{ADALN}", alpha=2.0)
    m.full(kohya("double_blocks.1.img_attn.proj"), "bfl:double_blocks.1.img_attn.proj")


def _dora_fused(m: _Maker) -> set[str]:
    """DoRA on fused modules: per output row on the adaLN (its magnitudes swap halves with the rows),
    and per input column (older LyCORIS) on a qkv, whose norms run over every row of the fused
    weight, which the base holds as separate weights: that one stays unplaced (with a reason)."""
    m.dora(kohya(ADALN), f"bfl:{ADALN}", alpha=2.0, per_row=True)
    unplaced = kohya("double_blocks.1.txt_attn.qkv")
    out, inp = m.shape("bfl:double_blocks.1.txt_attn.qkv")
    m.tensors.update({unplaced + ".lora_down.weight": m.rnd(4, inp), unplaced + ".lora_up.weight": m.rnd(out, 4),
                      unplaced + ".alpha": torch.tensor(2.0), unplaced + ".dora_scale": torch.rand(1, inp, generator=m.g)})
    return {unplaced}


def _lycoris_split(m: _Maker) -> None:
    """LyCORIS types on diffusers' split modules (SimpleTuner ``lycoris_``, ai-toolkit ``transformer.``),
    and a full diff with a bias change on BFL's adaLN."""
    m.lokr("lycoris_transformer_blocks_0_attn_to_q", "transformer.transformer_blocks.0.attn.to_q", alpha=2.0)
    m.lokr("transformer.transformer_blocks.1.attn.add_k_proj", "transformer.transformer_blocks.1.attn.add_k_proj",
           alpha=1.0)
    m.loha("lycoris_single_transformer_blocks_0_proj_mlp", "transformer.single_transformer_blocks.0.proj_mlp",
           alpha=1.0)
    m.dora("lycoris_transformer_blocks_0_attn_to_v", "transformer.transformer_blocks.0.attn.to_v", alpha=2.0,
           per_row=False)
    m.dora("lycoris_single_transformer_blocks_1_attn_to_k", "transformer.single_transformer_blocks.1.attn.to_k",
           alpha=2.0, per_row=True)
    m.full("diffusion_model." + ADALN, f"bfl:{ADALN}")  # BFL's order: weight and bias halves swap


def flux_lora(layout: str, base, seed: int = 0, biases: bool = True) -> FluxLoRAFile:
    """A LoRA file of ``layout`` (see :data:`LAYOUTS`) for ``base``, with the weights it must give.

    ``biases`` off: full diffs without ``.diff_b`` (what a diffusers file can hold)."""
    m = _Maker(base, seed, biases)
    metadata, unplaced = None, set()
    if layout == "kohya":
        _kohya(m)
    elif layout == "kohya_te2":
        _kohya(m, t5_prefix="lora_te2_", clip_prefix="lora_te_")
    elif layout == "kohya_double":  # what diffusers' kohya converter reads at any width
        _kohya(m, double_only=True)
    elif layout == "kohya_split_qkv":
        doubles, singles = blocks(base)
        for n in range(doubles):
            for bfl in ("img_attn.qkv", "txt_attn.qkv"):
                m.block_diagonal(kohya(f"double_blocks.{n}.{bfl}"), f"bfl:double_blocks.{n}.{bfl}", rank=2, alpha=4.0)
        for n in range(singles):
            m.block_diagonal(kohya(f"single_blocks.{n}.linear1"), f"bfl:single_blocks.{n}.linear1", rank=2, alpha=1.0)
    elif layout == "bfl":
        _bfl(m, "diffusion_model.", ".lora_down.weight", ".lora_up.weight", with_alpha=True)
    elif layout == "bfl_lora_ab":
        _bfl(m, "diffusion_model.", ".lora_A.weight", ".lora_B.weight", with_alpha=False)
    elif layout == "peft":
        metadata = _peft(m, True, pattern={"transformer_blocks.0.attn.to_k": 2.0, "proj_mlp": 1.0})
    elif layout == "peft_no_metadata":
        metadata = _peft(m, False)
    elif layout == "peft_double":
        metadata = _peft(m, True, alpha=2.0, pattern={"add_q_proj": 6.0}, double_only=True)
    elif layout == "xlabs":
        _xlabs(m, "")
    elif layout == "xlabs_prefixed":
        _xlabs(m, "diffusion_model.")
    elif layout == "onetrainer":
        _onetrainer(m)
    elif layout == "lycoris_fused":
        _lycoris_fused(m)
    elif layout == "dora_fused":
        unplaced = _dora_fused(m)
    elif layout == "lycoris_split":
        _lycoris_split(m)
    else:
        raise ValueError(f"unknown layout {layout!r}")
    return m.done(metadata, unplaced)
