"""Applying a stack of LoRAs to an SD1.5-sized UNet: lora-nodes against diffusers and the floor.

    python benchmarks/apply_lora.py            # SD1.5-shaped UNet (~860M params, float32, CPU)
    python benchmarks/apply_lora.py --tiny     # the same steps on builtin:tiny's UNet (seconds)

Three kohya rank-32 LoRAs over every attention and feed-forward linear of the UNet's
transformer blocks (160 modules, ~224M weights touched), random weights. Timed, in one run:
- full apply: ours = read the three files + ApplyLoRA x3 + materialize (the patcher merges);
  diffusers = load_lora_weights x3 + set_adapters + fuse_lora;
- strength change: one LoRA's strength changes and the model is made real again;
  diffusers = unfuse_lora + set_adapters + fuse_lora;
- the floor: the bare in-place ``addmm_`` of every LoRA's delta into its weight, tensors in memory.
Goals: at least 5x faster than diffusers; full apply within 1.3x of the floor; a strength change
within 1.2x of the floor.
"""

from __future__ import annotations

import argparse
import copy
import os
import re
import statistics
import tempfile
import time
from pathlib import Path

import torch

os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")  # its "no text-encoder keys" note, once per LoRA

SD15_UNET = {
    "sample_size": 64, "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
    "block_out_channels": (320, 640, 1280, 1280), "cross_attention_dim": 768, "attention_head_dim": 8,
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
}
TARGETS = re.compile(r"transformer_blocks\.\d+\.(attn[12]\.(to_q|to_k|to_v|to_out\.0)|ff\.net\.(0\.proj|2))$")
STRENGTHS = (0.8, 0.5, 0.3)


def random_unet(config: dict):
    """A UNet2DConditionModel with random weights, allocated without running the slow initialisers."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**config)
    unet = unet.to_empty(device="cpu").requires_grad_(False).eval()
    generator = torch.Generator().manual_seed(0)
    for param in unet.parameters():
        param.normal_(0, 0.02, generator=generator)
    return unet


def write_loras(unet, rank: int, folder: Path) -> list[Path]:
    """Three kohya-format LoRA files over the target linears."""
    from safetensors.torch import save_file

    modules = [(n, m) for n, m in unet.named_modules() if TARGETS.search(n)]
    paths = []
    for i in range(3):
        generator = torch.Generator().manual_seed(100 + i)
        tensors = {}
        for name, module in modules:
            key = "lora_unet_" + name.replace(".", "_")
            out_features, in_features = module.weight.shape
            tensors[f"{key}.lora_down.weight"] = torch.randn(rank, in_features, generator=generator) * 0.01
            tensors[f"{key}.lora_up.weight"] = torch.randn(out_features, rank, generator=generator) * 0.01
            tensors[f"{key}.alpha"] = torch.tensor(float(rank))
        paths.append(folder / f"lora_{i}.safetensors")
        save_file(tensors, str(paths[-1]))
    return paths


def tiny_parts():
    from lora_nodes.models.builtin import build_tiny

    parts = build_tiny()
    return {k: v for k, v in parts.items() if k != "unet"}


def time_ours(unet, paths: list[Path], repeats: int) -> tuple[float, float]:
    """Full apply (files read every time) and strength change, median seconds."""
    from lora_nodes.lora.files import read_lora
    from lora_nodes.lora.placement import check_placement
    from lora_nodes.lora.recipe import AppliedLoRA, ModelRecipe
    from lora_nodes.models.base import BaseModel

    base = BaseModel("bench", {"unet": unet, **tiny_parts()}, torch.float32, torch.device("cpu"))
    full, switch = [], []
    for _ in range(repeats):
        ModelRecipe(base).materialize()
        start = time.perf_counter()
        loras = [read_lora(p) for p in paths]
        for lora in loras:
            check_placement(lora, base)
        recipe = ModelRecipe(base, tuple(AppliedLoRA(lora, s, s) for lora, s in zip(loras, STRENGTHS)))
        recipe.materialize()
        full.append(time.perf_counter() - start)
        changed = ModelRecipe(base, (*recipe.loras[:2], AppliedLoRA(loras[2], 0.6, 0.6)))
        start = time.perf_counter()
        changed.materialize()
        switch.append(time.perf_counter() - start)
    ModelRecipe(base).materialize()
    return statistics.median(full), statistics.median(switch)


def time_floor(unet, paths: list[Path], repeats: int) -> float:
    """The bare in-place merge: addmm_ of each delta into a copy of its weight, tensors in memory."""
    from safetensors.torch import load_file

    states = [load_file(str(p)) for p in paths]
    modules = [(n, m) for n, m in unet.named_modules() if TARGETS.search(n)]
    weights = [m.weight.detach().clone() for _, m in modules]
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for (name, _), weight in zip(modules, weights):
            key = "lora_unet_" + name.replace(".", "_")
            for state, strength in zip(states, STRENGTHS):
                up, down = state[f"{key}.lora_up.weight"], state[f"{key}.lora_down.weight"]
                weight.addmm_(up, down, alpha=strength * float(state[f"{key}.alpha"]) / down.shape[0])
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def time_diffusers(unet, paths: list[Path], repeats: int) -> tuple[float, float]:
    """load_lora_weights x3 + set_adapters + fuse_lora, and a strength change, median seconds."""
    from diffusers import StableDiffusionPipeline

    full, switch = [], []
    names = [f"l{i}" for i in range(len(paths))]
    for _ in range(repeats):
        pipe = StableDiffusionPipeline(unet=copy.deepcopy(unet), **tiny_parts(), safety_checker=None,
                                       feature_extractor=None, requires_safety_checker=False)
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
    return statistics.median(full), statistics.median(switch)


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="builtin:tiny's UNet and rank 4 (a quick check)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    with torch.no_grad():  # not set_grad_enabled(False): the tests run this in their own process
        return _run(args)


def _run(args: argparse.Namespace) -> dict[str, float]:
    if args.tiny:
        from lora_nodes.models.builtin import TINY_UNET

        config, rank = TINY_UNET, 4
    else:
        config, rank = SD15_UNET, 32
    unet = random_unet(config)
    touched = sum(m.weight.numel() for n, m in unet.named_modules() if TARGETS.search(n))
    count = sum(1 for n, _ in unet.named_modules() if TARGETS.search(n))
    with tempfile.TemporaryDirectory() as tmp:
        paths = write_loras(unet, rank, Path(tmp))
        floor = time_floor(unet, paths, args.repeats)
        ours_full, ours_switch = time_ours(unet, paths, args.repeats)
        theirs_full, theirs_switch = time_diffusers(unet, paths, args.repeats)
    params = sum(p.numel() for p in unet.parameters())
    print(f"\nUNet {params / 1e6:.0f}M params; 3 LoRAs of rank {rank} over {count} modules "
          f"({touched / 1e6:.0f}M weights touched); median of {args.repeats}, seconds")
    print(f"{'':28}{'lora-nodes':>12}{'diffusers':>12}{'floor':>9}{'vs diffusers':>14}{'vs floor':>10}")
    for label, ours, theirs, goal in (("full apply (files read)", ours_full, theirs_full, 1.3),
                                      ("one strength changed", ours_switch, theirs_switch, 1.2)):
        print(f"{label:28}{ours:>12.3f}{theirs:>12.3f}{floor:>9.3f}{theirs / ours:>13.1f}x"
              f"{ours / floor:>9.2f}x   (goals: >= 5x, <= {goal}x)")
    return {"floor": floor, "ours_full": ours_full, "ours_switch": ours_switch,
            "diffusers_full": theirs_full, "diffusers_switch": theirs_switch}


if __name__ == "__main__":
    main()
