"""Applying three LoRAs as a user waits for it: whole processes, lora-nodes against diffusers.

    python benchmarks/apply_whole_process.py                 # SD1.5-shaped UNet (~860M params, float32, CPU)
    python benchmarks/apply_whole_process.py --repeats 5

Issue 17's measure. ``benchmarks/apply_lora.py`` times the apply step inside one process; a user
waits for a whole run. Here each side runs as its own process, twice: once with three kohya
rank-32 LoRAs (every attention and feed-forward linear of the UNet's transformer blocks, as
apply_lora.py makes them) and once without, and the LoRAs' cost is the difference.

- ours: ``lora-nodes run`` of LoadBase (a diffusers folder) + 3 x (LoadLoRA, ApplyLoRA) + a
  1-step 64x64 Sample + SaveImages; without: LoadBase + Sample + SaveImages.
- diffusers: ``from_pretrained`` + 3 x ``load_lora_weights`` + ``set_adapters`` + ``fuse_lora`` +
  the same 1-step sample; without: ``from_pretrained`` + the sample.

The model is an SD1.5-shaped UNet with random weights, a one-layer CLIP text encoder of SD1.5's
width (768) and builtin:tiny's VAE and tokenizer, saved once as a diffusers folder in a scratch
folder. Runs alternate (ours, diffusers, ours without, diffusers without ...) and the table gives
medians of --repeats. The cache dir is a fresh one per run (no disk-cache help).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from apply_lora import SD15_UNET, STRENGTHS, TARGETS, random_model, write_kohya_unet

PROMPT, STEPS, SIDE = "a red circle", 1, 64

DIFFUSERS_RUN = """
import sys, torch
from diffusers import StableDiffusionPipeline
folder, out, loras, strengths = sys.argv[1], sys.argv[2], sys.argv[3:6] if len(sys.argv) > 3 else [], {strengths}
pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
if loras:
    names = [f"l{{i}}" for i in range(len(loras))]
    for path, name in zip(loras, names):
        pipe.load_lora_weights(path, adapter_name=name)
    pipe.set_adapters(names, adapter_weights=list(strengths))
    pipe.fuse_lora(adapter_names=names)
image = pipe({prompt!r}, num_inference_steps={steps}, width={side}, height={side},
             generator=torch.Generator().manual_seed(7)).images[0]
image.save(out)
"""


def make_model(folder: Path) -> None:
    """The SD1.5-shaped pipeline folder (see the module docstring)."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from lora_nodes.models.builtin import build_tiny

    tiny = build_tiny()
    tokenizer = tiny["tokenizer"]
    text = CLIPTextModel(CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=768, intermediate_size=3072,
                                        num_hidden_layers=1, num_attention_heads=12, max_position_embeddings=77,
                                        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                        pad_token_id=tokenizer.pad_token_id))
    unet = random_model(UNet2DConditionModel, SD15_UNET)
    pipe = StableDiffusionPipeline(vae=tiny["vae"], text_encoder=text, tokenizer=tokenizer, unet=unet,
                                   scheduler=tiny["scheduler"], safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(folder)


def make_loras(folder: Path, model: Path) -> list[Path]:
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(model / "unet")
    targets = {n: m for n, m in unet.named_modules() if TARGETS.search(n)}
    paths = [folder / f"lora_{i}.safetensors" for i in range(3)]
    for seed, path in enumerate(paths):
        write_kohya_unet(targets, 32, seed, path)
    return paths


def workflow(model: Path, loras: list[Path]) -> str:
    """Our workflow, with the LoRAs or without."""
    lines = ["format: lora-nodes/1", "nodes:", f"  base: {{type: LoadBase, inputs: {{source: '{model}'}}}}"]
    last = "base"
    for i, (path, strength) in enumerate(zip(loras, STRENGTHS)):
        lines += [f"  l{i}: {{type: LoadLoRA, inputs: {{path: '{path}'}}}}",
                  (f"  a{i}: {{type: ApplyLoRA, inputs: {{model: [{last}, model], lora: [l{i}, lora], "
                  f"strength_model: {strength}, strength_text: {strength}}}}}")]
        last = f"a{i}"
    lines += [(f"  draw: {{type: Sample, inputs: {{model: [{last}, model], prompt: '{PROMPT}', seed: 7, "
              f"steps: {STEPS}, width: {SIDE}, height: {SIDE}}}}}"),
              "  save: {type: SaveImages, inputs: {images: [draw, images], prefix: out}}"]
    return "\n".join(lines) + "\n"


def timed(command: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(command, check=True, capture_output=True)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3, help="runs of each of the four kinds (median)")
    args = parser.parse_args(argv)
    torch.set_grad_enabled(False)
    with tempfile.TemporaryDirectory(prefix="apply-whole-") as scratch:
        root = Path(scratch)
        model = root / "model"
        make_model(model)
        loras = make_loras(root, model)
        ours = {"with": root / "with.yaml", "without": root / "without.yaml"}
        ours["with"].write_text(workflow(model, loras))
        ours["without"].write_text(workflow(model, []))
        script = root / "diffusers_run.py"
        script.write_text(DIFFUSERS_RUN.format(strengths=list(STRENGTHS), prompt=PROMPT, steps=STEPS, side=SIDE))
        commands = {
            ("ours", "with"): lambda n: [sys.executable, "-m", "lora_nodes.cli", "run", str(ours["with"]),
                                         "--output-dir", str(root / f"o{n}"), "--cache-dir", str(root / f"c{n}")],
            ("ours", "without"): lambda n: [sys.executable, "-m", "lora_nodes.cli", "run", str(ours["without"]),
                                            "--output-dir", str(root / f"p{n}"), "--cache-dir", str(root / f"d{n}")],
            ("diffusers", "with"): lambda n: [sys.executable, str(script), str(model), str(root / f"e{n}.png"),
                                              *map(str, loras)],
            ("diffusers", "without"): lambda n: [sys.executable, str(script), str(model), str(root / f"f{n}.png")],
        }
        seconds: dict[tuple[str, str], list[float]] = {key: [] for key in commands}
        for n in range(args.repeats):
            for key, command in commands.items():  # alternating, so load on the machine falls on all alike
                seconds[key].append(timed(command(n)))
    medians = {key: statistics.median(values) for key, values in seconds.items()}
    result = {side: medians[(side, "with")] - medians[(side, "without")] for side in ("ours", "diffusers")}
    print(f"3 kohya rank-32 LoRAs on an SD1.5-shaped UNet, whole processes, median of {args.repeats} (seconds)")
    print(f"{'':12} {'with LoRAs':>11} {'without':>9} {'LoRAs cost':>11}")
    for side in ("ours", "diffusers"):
        print(f"{side:12} {medians[(side, 'with')]:11.2f} {medians[(side, 'without')]:9.2f} {result[side]:11.2f}")
    print(f"diffusers / ours (the LoRAs' cost): {result['diffusers'] / max(result['ours'], 1e-9):.2f}x")
    return result


if __name__ == "__main__":
    main()
