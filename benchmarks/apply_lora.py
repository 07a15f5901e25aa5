"""Applying a stack of LoRAs to a full-size denoiser: lora-nodes against diffusers and the floor.

    python benchmarks/apply_lora.py                   # SD1.5-shaped UNet (~860M params, float32, CPU)
    python benchmarks/apply_lora.py --tiny            # the same steps on builtin:tiny's UNet (seconds)
    python benchmarks/apply_lora.py --family flux     # Flux-shaped transformer at full width (~1.3B params)
    python benchmarks/apply_lora.py --family flux --tiny   # builtin:tiny-flux's transformer (seconds)

SD: three kohya rank-32 LoRAs over every attention and feed-forward linear of the UNet's
transformer blocks (160 modules, ~224M weights touched), random weights.
Flux: FLUX.1's widths (24 heads x 128 = 3072 hidden, MLP 12288, T5 context 4096, CLIP pooled 768)
with 2 double and 4 single blocks (FLUX.1 has 19 and 38), random weights; three rank-16 LoRAs over
every attention and MLP linear (44 modules, ~906M weights touched), in two layouts, each timed:
- PEFT/diffusers (``transformer.transformer_blocks.0.attn.to_q.lora_A.weight``, q/k/v split): what
  diffusers reads natively and what ai-toolkit and SimpleTuner save;
- kohya sd-scripts (``lora_unet_double_blocks_0_img_attn_qkv``: q/k/v fused, and the single
  blocks' q/k/v + MLP input in one ``linear1``): what most shared Flux LoRAs are; our loader
  splits each fused module by rows, diffusers converts the file to PEFT first (its converter
  hard-codes FLUX.1's widths, so with ``--tiny`` it refuses the file and the table says so).
Timed, in one run, best of --repeats (on a shared machine other processes only ever add time, and
a busy core stalls torch's two-thread ops at random: the least time is the work's own); ours and
the floor in alternation, after one untimed round that allocates both sides' buffers:
- full apply: ours = read the three files + ApplyLoRA x3 + materialize (the patcher merges);
  diffusers = load_lora_weights x3 + set_adapters + fuse_lora;
- strength change: one LoRA's strength changes and the model is made real again;
  diffusers = unfuse_lora + set_adapters + fuse_lora;
- last use, in place: what ``lora-nodes run`` does for a base in its own memory (built, or
  converted at load), where nothing needs the originals after the sampler: read the three files
  and patch the weights in place (no buffer); against diffusers' full apply;
- the floor: the bare in-place ``addmm_`` of every LoRA's delta into its weight, tensors in memory;
- the bound: the floor plus the bare cost of the bytes the row must move that the floor does not,
  each timed alone: the three files read once (``readinto`` a buffer already allocated; the first
  and last rows), and each patched weight copied once (``copy_`` into a weight-sized tensor; the
  first two rows, which keep the originals for a sweep or the server).
Goals (issue 17): at least 5x faster than diffusers; within 1.05x of the floor. The bound says how
close to the floor a row can come on this machine: no code moves those bytes for free.
"""

from __future__ import annotations

import argparse
import copy
import gc
import os
import re
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import torch
from torch import Tensor, nn

from lora_nodes.libraries import import_model_libraries

os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")  # its "no text-encoder keys" note, once per LoRA

SD15_UNET = {
    "sample_size": 64, "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
    "block_out_channels": (320, 640, 1280, 1280), "cross_attention_dim": 768, "attention_head_dim": 8,
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
}
TARGETS = re.compile(r"transformer_blocks\.\d+\.(attn[12]\.(to_q|to_k|to_v|to_out\.0)|ff\.net\.(0\.proj|2))$")
# FLUX.1-dev's transformer config with fewer blocks: every width is the real one
FLUX_TRANSFORMER = {
    "patch_size": 1, "in_channels": 64, "num_layers": 2, "num_single_layers": 4, "attention_head_dim": 128,
    "num_attention_heads": 24, "joint_attention_dim": 4096, "pooled_projection_dim": 768, "guidance_embeds": True,
    "axes_dims_rope": (16, 56, 56),
}
# every attention and MLP linear of the double blocks (both streams) and the single blocks
# (whose proj_out is attention output and MLP output in one)
FLUX_TARGETS = re.compile(
    r"^(single_)?transformer_blocks\.\d+\.(attn\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out)"
    r"|ff(_context)?\.net\.(0\.proj|2)|proj_mlp|proj_out)$")
# kohya's fused Flux modules (BFL tree) -> the diffusers modules whose rows they hold, in order
FLUX_KOHYA_DOUBLE = {
    "img_attn_qkv": ("attn.to_q", "attn.to_k", "attn.to_v"), "img_attn_proj": ("attn.to_out.0",),
    "img_mlp_0": ("ff.net.0.proj",), "img_mlp_2": ("ff.net.2",),
    "txt_attn_qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"), "txt_attn_proj": ("attn.to_add_out",),
    "txt_mlp_0": ("ff_context.net.0.proj",), "txt_mlp_2": ("ff_context.net.2",),
}
FLUX_KOHYA_SINGLE = {"linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"), "linear2": ("proj_out",)}
STRENGTHS = (0.8, 0.5, 0.3)
FLOOR_GOAL = 1.05  # issue 17: every apply within this of the floor

# (target module path, up, down, scale) for one LoRA: its deltas as the floor adds them (up may be
# a row slice of a fused module's up, as a view)
Factors = list[tuple[str, Tensor, Tensor, float]]


class Layout(NamedTuple):
    """One LoRA file layout: how to write a LoRA over the targets, and its factors for the floor."""

    label: str
    write: Callable[[dict[str, nn.Module], int, int, Path], Factors]  # (targets, rank, seed, path) -> factors


class Setup(NamedTuple):
    """What one family's benchmark runs on: the denoiser, its targets, the layouts, the pipeline."""

    title: str  # what the table calls the model
    component: str  # the denoiser's name among the pipeline's components
    model: nn.Module
    targets: dict[str, nn.Module]  # module path -> module
    rank: int
    layouts: list[Layout]
    parts: Callable[[], dict]  # the pipeline's other components, tiny (they are not patched)
    pipeline: Callable[[dict], object]  # components -> a diffusers pipeline


def random_model(cls, config: dict) -> nn.Module:
    """A diffusers model with random weights, allocated without running the slow initialisers."""
    with torch.device("meta"):
        model = cls(**config)
    model = model.to_empty(device="cpu").requires_grad_(False).eval()
    generator = torch.Generator().manual_seed(0)
    for param in model.parameters():
        param.normal_(0, 0.02, generator=generator)
    return model


def random_pair(out_features: int, in_features: int, rank: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """(up [out, rank], down [rank, in]) with small random values."""
    down = torch.randn(rank, in_features, generator=generator) * 0.01
    up = torch.randn(out_features, rank, generator=generator) * 0.01
    return up, down


def write_kohya_unet(targets: dict[str, nn.Module], rank: int, seed: int, path: Path) -> Factors:
    """A kohya-format LoRA over the UNet's targets (alpha = rank)."""
    from safetensors.torch import save_file

    generator, tensors, factors = torch.Generator().manual_seed(seed), {}, []
    for name, module in targets.items():
        key = "lora_unet_" + name.replace(".", "_")
        up, down = random_pair(*module.weight.shape, rank, generator)
        tensors |= {f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up, f"{key}.alpha": torch.tensor(float(rank))}
        factors.append((name, up, down, 1.0))
    save_file(tensors, str(path))
    return factors


def write_peft_flux(targets: dict[str, nn.Module], rank: int, seed: int, path: Path) -> Factors:
    """A PEFT/diffusers-format Flux LoRA (q/k/v split), no alphas: scale 1, as PEFT reads it."""
    from safetensors.torch import save_file

    generator, tensors, factors = torch.Generator().manual_seed(seed), {}, []
    for name, module in targets.items():
        up, down = random_pair(*module.weight.shape, rank, generator)
        tensors |= {f"transformer.{name}.lora_A.weight": down, f"transformer.{name}.lora_B.weight": up}
        factors.append((name, up, down, 1.0))
    save_file(tensors, str(path))
    return factors


def write_kohya_flux(targets: dict[str, nn.Module], rank: int, seed: int, path: Path) -> Factors:
    """A kohya sd-scripts Flux LoRA (BFL tree: q/k/v fused, linear1 = q/k/v + MLP input), alpha = rank.

    One down per fused module, its up holding every piece's rows; the floor adds each piece's rows.
    """
    from safetensors.torch import save_file

    generator, tensors, factors = torch.Generator().manual_seed(seed), {}, []
    for kind, prefix, table in (("double", "transformer_blocks", FLUX_KOHYA_DOUBLE),
                                ("single", "single_transformer_blocks", FLUX_KOHYA_SINGLE)):
        for block in sorted({int(n.split(".")[1]) for n in targets if n.startswith(prefix + ".")}):
            for fused, parts in table.items():
                pieces = [targets[f"{prefix}.{block}.{part}"] for part in parts]
                rows = [p.weight.shape[0] for p in pieces]
                up, down = random_pair(sum(rows), pieces[0].weight.shape[1], rank, generator)
                key = f"lora_unet_{kind}_blocks_{block}_{fused}"
                tensors |= {f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up,
                            f"{key}.alpha": torch.tensor(float(rank))}
                for part, piece_up in zip(parts, up.split(rows)):
                    factors.append((f"{prefix}.{block}.{part}", piece_up, down, 1.0))
    save_file(tensors, str(path))
    return factors


def sd_setup(tiny: bool) -> Setup:
    """An SD1.5-shaped UNet (or builtin:tiny's) and kohya files, on StableDiffusionPipeline."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    from lora_nodes.models.builtin import TINY_UNET, build_tiny

    unet = random_model(UNet2DConditionModel, TINY_UNET if tiny else SD15_UNET)
    targets = {n: m for n, m in unet.named_modules() if TARGETS.search(n)}
    return Setup(
        title="UNet", component="unet", model=unet, targets=targets, rank=4 if tiny else 32,
        layouts=[Layout("kohya", write_kohya_unet)],
        parts=lambda: {k: v for k, v in build_tiny().items() if k != "unet"},
        pipeline=lambda components: StableDiffusionPipeline(**components, safety_checker=None, feature_extractor=None,
                                                            requires_safety_checker=False))


def flux_setup(tiny: bool) -> Setup:
    """A Flux-shaped transformer at full width (or builtin:tiny-flux's), PEFT and kohya files, on FluxPipeline."""
    from diffusers import FluxPipeline, FluxTransformer2DModel

    from lora_nodes.models.builtin import TINY_FLUX_TRANSFORMER, build_tiny_flux

    transformer = random_model(FluxTransformer2DModel, TINY_FLUX_TRANSFORMER if tiny else FLUX_TRANSFORMER)
    targets = {n: m for n, m in transformer.named_modules() if FLUX_TARGETS.search(n)}
    return Setup(
        title="Flux transformer", component="transformer", model=transformer, targets=targets, rank=4 if tiny else 16,
        layouts=[Layout("PEFT", write_peft_flux), Layout("kohya", write_kohya_flux)],
        parts=lambda: {k: v for k, v in build_tiny_flux().items() if k != "transformer"},
        pipeline=lambda components: FluxPipeline(**components))


SETUPS = {"sd": sd_setup, "flux": flux_setup}


class Timings(NamedTuple):
    """Best seconds of our three rows, the floor, and what the bound adds to the floor."""

    full: float
    switch: float
    last_use: float
    floor: float
    reads: float  # the three files' bytes read once
    copies: float  # every patched weight copied once

    def bounds(self) -> tuple[float, float, float]:
        """The bound of each of our rows: the floor and the bytes that row moves beyond it."""
        return (self.floor + self.reads + self.copies, self.floor + self.copies, self.floor + self.reads)


def time_ours_and_floor(setup: Setup, paths: list[Path], factors: list[Factors], repeats: int) -> Timings:
    """Ours (full apply, files read every time; strength change; last use in place), the floor and
    the bound's parts, best seconds.

    Timed in alternation (on a shared machine the load drifts; all should meet the same), after
    one untimed round that allocates every side's buffers.
    """
    from lora_nodes.lora.recipe import ModelRecipe
    from lora_nodes.models.base import BaseModel

    parts = setup.parts()
    base = BaseModel("bench", {setup.component: setup.model, **parts}, torch.float32, torch.device("cpu"))
    weights = {name: module.weight.detach().clone() for name, module in setup.targets.items()}
    file_buffers = [bytearray(path.stat().st_size) for path in paths]
    floor, full, switch, last, reads, copies = [], [], [], [], [], []
    for _ in range(repeats + 1):
        floor.append(floor_once(weights, factors))
        copies.append(copies_once(setup.targets, weights))
        reads.append(reads_once(paths, file_buffers))
        seconds, loras = ours_full_once(base, paths)
        full.append(seconds)
        switch.append(ours_switch_once(base, loras))
    ModelRecipe(base).materialize()
    originals = {name: module.weight.detach().clone() for name, module in setup.targets.items()}
    for _ in range(repeats + 1):
        floor.append(floor_once(weights, factors))
        last.append(ours_last_use_once(setup, parts, originals, paths))
    for name, module in setup.targets.items():  # diffusers gets the model as it was
        module.weight.data = originals[name]
    return Timings(*(min(times[1:]) for times in (full, switch, last, floor, reads, copies)))


def floor_once(weights: dict[str, Tensor], factors: list[Factors]) -> float:
    """The bare in-place merge: addmm_ of each delta into a copy of its weight, tensors in memory."""
    start = time.perf_counter()
    for lora, strength in zip(factors, STRENGTHS):
        for name, up, down, scale in lora:
            weights[name].addmm_(up, down, alpha=strength * scale)
    return time.perf_counter() - start


def copies_once(targets: dict[str, nn.Module], weights: dict[str, Tensor]) -> float:
    """Each patched weight copied once into a weight-sized tensor (the floor's, which this also resets)."""
    start = time.perf_counter()
    for name, module in targets.items():
        weights[name].copy_(module.weight)
    return time.perf_counter() - start


def reads_once(paths: list[Path], buffers: list[bytearray]) -> float:
    """The files' bytes read once, each into a buffer of its size already allocated."""
    start = time.perf_counter()
    for path, buffer in zip(paths, buffers):
        with open(path, "rb", buffering=0) as f:
            f.readinto(buffer)
    return time.perf_counter() - start


def ours_full_once(base, paths: list[Path]) -> tuple[float, list]:
    """From the bare base: read the files, place them, make the three LoRAs' weights real;
    seconds, and the LoRAs read."""
    from lora_nodes.lora.files import read_lora
    from lora_nodes.lora.placement import check_placement
    from lora_nodes.lora.recipe import AppliedLoRA, ModelRecipe

    ModelRecipe(base).materialize()
    start = time.perf_counter()
    loras = [read_lora(p) for p in paths]
    for lora in loras:
        check_placement(lora, base)
    ModelRecipe(base, tuple(AppliedLoRA(lora, s, s) for lora, s in zip(loras, STRENGTHS))).materialize()
    return time.perf_counter() - start, loras


def ours_last_use_once(setup: Setup, parts: dict, originals: dict[str, Tensor], paths: list[Path]) -> float:
    """What ``lora-nodes run`` does for a base in its own memory (built, or converted at load): read
    the files and patch for the weights' last use, in place. Every repeat starts from a new base over
    the original weights, copied back untimed into the same memory (as a loaded base is: already there)."""
    from lora_nodes.lora.files import read_lora
    from lora_nodes.lora.placement import check_placement
    from lora_nodes.lora.recipe import AppliedLoRA, ModelRecipe
    from lora_nodes.models.base import BaseModel

    for name, module in setup.targets.items():
        module.weight.data.copy_(originals[name])
    base = BaseModel("bench", {setup.component: setup.model, **parts}, torch.float32, torch.device("cpu"))
    start = time.perf_counter()
    loras = [read_lora(p) for p in paths]
    for lora in loras:
        check_placement(lora, base)
    ModelRecipe(base, tuple(AppliedLoRA(lora, s, s) for lora, s in zip(loras, STRENGTHS))).materialize(final=True)
    return time.perf_counter() - start


def ours_switch_once(base, loras: list) -> float:
    """The last LoRA's strength changes (0.3 -> 0.6) and the weights are made real again."""
    from lora_nodes.lora.recipe import AppliedLoRA, ModelRecipe

    strengths = (*STRENGTHS[:-1], 0.6)
    changed = ModelRecipe(base, tuple(AppliedLoRA(lora, s, s) for lora, s in zip(loras, strengths)))
    start = time.perf_counter()
    changed.materialize()
    return time.perf_counter() - start


def time_diffusers(setup: Setup, paths: list[Path], repeats: int) -> tuple[float, float]:
    """load_lora_weights x3 + set_adapters + fuse_lora, and a strength change, best seconds."""
    full, switch = [], []
    names = [f"l{i}" for i in range(len(paths))]
    for _ in range(repeats):
        pipe = setup.pipeline({setup.component: copy.deepcopy(setup.model), **setup.parts()})
        start = time.perf_counter()
        for path, name in zip(paths, names):
            pipe.load_lora_weights(str(path), adapter_name=name)
        pipe.set_adapters(names, adapter_weights=list(STRENGTHS))
        pipe.fuse_lora(adapter_names=names)
        full.append(time.perf_counter() - start)
        start = time.perf_counter()
        pipe.unfuse_lora()
        pipe.set_adapters(names, adapter_weights=[*STRENGTHS[:2], 0.6])
        pipe.fuse_lora(adapter_names=names)
        switch.append(time.perf_counter() - start)
        del pipe
        gc.collect()  # the model copy goes before the next one is made
    return min(full), min(switch)


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", choices=sorted(SETUPS), default="sd",
                        help="sd: an SD1.5-shaped UNet; flux: a Flux-shaped transformer at full width")
    parser.add_argument("--tiny", action="store_true",
                        help="the family's builtin tiny denoiser and rank 4 (a quick check)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    # the process as `lora-nodes run` has it: the libraries' objects frozen, so that no collection
    # walking them lands at random in a timing (both sides alike)
    import_model_libraries()
    with torch.no_grad():  # not set_grad_enabled(False): the tests run this in their own process
        return _run(args)


def _run(args: argparse.Namespace) -> dict[str, float]:
    setup = SETUPS[args.family](args.tiny)
    rows, figures = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for n, layout in enumerate(setup.layouts):
            paths = [Path(tmp) / f"{layout.label}_{i}.safetensors" for i in range(len(STRENGTHS))]
            factors = [layout.write(setup.targets, setup.rank, 100 + i, path) for i, path in enumerate(paths)]
            timings = time_ours_and_floor(setup, paths, factors, args.repeats)
            del factors
            gc.collect()  # our patch buffers go with the base before diffusers copies the model
            theirs, why_not = _diffusers_or_why_not(setup, paths, args.repeats)
            prefix = "" if n == 0 else f"{layout.label}_"
            bounds = timings.bounds()
            figures |= {f"{prefix}{name}": value for name, value in (
                ("floor", timings.floor), ("ours_full", timings.full), ("ours_switch", timings.switch),
                ("ours_last_use", timings.last_use), ("bound_reads", timings.reads), ("bound_copies", timings.copies),
                ("bound_full", bounds[0]), ("bound_switch", bounds[1]), ("bound_last_use", bounds[2]))}
            if theirs is not None:
                figures |= {f"{prefix}diffusers_full": theirs[0], f"{prefix}diffusers_switch": theirs[1]}
            rows.append((layout.label, timings, theirs, why_not))
    _print_table(setup, rows, args.repeats)
    return figures


def _diffusers_or_why_not(setup: Setup, paths: list[Path],
                          repeats: int) -> tuple[tuple[float, float] | None, str | None]:
    """diffusers' times, or (None, why) where it cannot read the files (its kohya-Flux converter
    assumes FLUX.1's full widths, so it refuses the tiny model's kohya files)."""
    try:
        return time_diffusers(setup, paths, repeats), None
    except (AssertionError, ValueError, RuntimeError, KeyError) as error:
        gc.collect()
        where = traceback.extract_tb(error.__traceback__)[-1]
        message = f": {str(error)[:80]}" if str(error) else ""
        return None, f"{type(error).__name__}{message} in {where.name} ({Path(where.filename).name}:{where.lineno})"


def _print_table(setup: Setup, rows: list, repeats: int) -> None:
    params = sum(p.numel() for p in setup.model.parameters())
    touched = sum(m.weight.numel() for m in setup.targets.values())
    layouts = " and ".join(label for label, *_ in rows)
    print(f"\n{setup.title} {params / 1e6:.0f}M params; 3 LoRAs ({layouts}) of rank {setup.rank} over "
          f"{len(setup.targets)} modules ({touched / 1e6:.0f}M weights touched); best of {repeats}, seconds")
    prefixed = len(rows) > 1  # one layout: the rows keep their plain names
    # (row, diffusers' row it compares with): a run's last use has no strength change after it
    labels = [("full apply (files read)", 0), ("one strength changed", 1), ("last use, in place (a run)", 0)]
    width = 28 + (max(len(label) for label, *_ in rows) + 2 if prefixed else 0)
    print(f"{'':{width}}{'lora-nodes':>12}{'diffusers':>12}{'floor':>9}{'bound':>9}{'vs diffusers':>14}"
          f"{'vs floor':>10}{'vs bound':>10}")
    notes = []
    for layout, timings, theirs, why_not in rows:
        ours = (timings.full, timings.switch, timings.last_use)
        for (label, j), mine, bound in zip(labels, ours, timings.bounds()):
            name = f"{layout}: {label}" if prefixed else label
            against = (f"{theirs[j]:>12.3f}", f"{theirs[j] / mine:>13.1f}x") if theirs else (f"{'n/a':>12}", f"{'':>14}")
            print(f"{name:{width}}{mine:>12.3f}{against[0]}{timings.floor:>9.3f}{bound:>9.3f}{against[1]}"
                  f"{mine / timings.floor:>9.2f}x{mine / bound:>9.2f}x   (goals: >= 5x, <= {FLOOR_GOAL}x the floor)")
        print(f"{'':{width}}(the bound: the floor, + {timings.reads:.3f} s reading the files' bytes once where a "
              f"row reads them, + {timings.copies:.3f} s copying the weights once where a row keeps the originals)")
        if why_not:
            notes.append(f"diffusers could not read the {layout} files: {why_not}")
    for note in notes:
        print(note)


if __name__ == "__main__":
    main()
