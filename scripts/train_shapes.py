"""Train ``builtin:shapes`` from nothing, on images drawn in code: one command, fixed seeds, CPU.

    python -u scripts/train_shapes.py                  # the shipped weights, ~16 min on 2 shared cores
    python -u scripts/train_shapes.py --steps 4000     # longer (not yet run: ~55 min)
    python -u scripts/train_shapes.py --export-only    # write the weights from the latest checkpoint

Stages (each saved under --work-dir, so a stopped run resumes where it stopped):

1. draw --images pictures, ``a {colour} {shape} on a {background} background``, with the colours
   red/green/blue/yellow, the shapes circle/square/triangle and white/black/gray backgrounds
   (purple and star are kept out on purpose, for LoRAs to teach);
2. the VAE (factor 4: 64x64 pixels <-> 16x16x4 latents) starts as an exact autoencoder
   (4x4 average pooling of RGB and back, see ``start_as_pooling``), is fine-tuned as a plain
   autoencoder (MSE + L1, a tiny KL term) for --vae-steps, then frozen;
3. encode every picture once; the latents' std sets the VAE's ``scaling_factor``;
4. train the UNet and the text encoder together on SD1.5's noise schedule (epsilon prediction,
   scaled_linear betas, min-SNR weighting), --drop-caption of the captions empty so
   classifier-free guidance works, with an EMA of the weights, which is what is shipped;
5. write the EMA weights, float16, to --out (``lora_nodes/models/weights/shapes.safetensors``).

Every random draw comes from a generator seeded by (--seed, stage, step), so the same command
gives the same weights, and a resumed run gives the same weights as an unbroken one. Measure the
result with ``python benchmarks/shapes_quality.py --weights OUT``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from lora_nodes.datasets.shape_images import BACKGROUNDS, BASE_COLOURS, BASE_SHAPES, make_dataset
from lora_nodes.models.builtin import SHAPES_PREFIXES, shapes_components

DEFAULT_OUT = REPO / "lora_nodes" / "models" / "weights" / "shapes.safetensors"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="the weights file to write (default: %(default)s)")
    parser.add_argument("--work-dir", type=Path, default=REPO / ".cache" / "train_shapes",
                        help="checkpoints and the encoded dataset; delete it to start over (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed of every random draw (default: %(default)s)")
    parser.add_argument("--images", type=int, default=8000, help="pictures drawn for training (default: %(default)s)")
    parser.add_argument("--vae-steps", type=int, default=100, help="autoencoder steps (default: %(default)s)")
    parser.add_argument("--vae-batch", type=int, default=16, help="autoencoder batch size (default: %(default)s)")
    parser.add_argument("--vae-lr", type=float, default=5e-4, help="autoencoder learning rate (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=3000, help="UNet + text encoder steps (default: %(default)s)")
    parser.add_argument("--batch", type=int, default=64, help="UNet batch size (default: %(default)s)")
    parser.add_argument("--lr", type=float, default=1e-3, help="UNet + text encoder peak learning rate "
                        "(linear warmup, then cosine down to a tenth; default: %(default)s)")
    parser.add_argument("--warmup", type=int, default=100, help="warmup steps (default: %(default)s)")
    parser.add_argument("--ema", type=float, default=0.999, help="EMA decay of the shipped weights (default: %(default)s)")
    parser.add_argument("--drop-caption", type=float, default=0.1,
                        help="share of empty captions, for classifier-free guidance (default: %(default)s)")
    parser.add_argument("--min-snr", type=float, default=5.0, help="min-SNR loss weighting gamma; 0 is off "
                        "(default: %(default)s)")
    parser.add_argument("--checkpoint-every", type=int, default=100,
                        help="save a resumable checkpoint every N steps (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=2,
                        help="torch CPU threads; on shared cores more than 1 can be many times slower, as "
                        "OpenMP threads wait on each other (default: %(default)s)")
    parser.add_argument("--stop-at", type=int, default=0,
                        help="stop after this many steps (the lr schedule still spans --steps) and write --out")
    parser.add_argument("--export-only", action="store_true",
                        help="write --out from the latest checkpoint in --work-dir and stop")
    return parser.parse_args(argv)


def generator(seed: int, stage: int, step: int) -> torch.Generator:
    """The random source of one step of one stage: the same every run, and after a resume."""
    return torch.Generator().manual_seed(seed * 1_000_003 + stage * 10_000_019 + step)


def lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / max(1, warmup)
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def draw_dataset(args: argparse.Namespace) -> tuple[torch.Tensor, list[str]]:
    log(f"drawing {args.images} pictures (seed {args.seed})")
    images, captions, _ = make_dataset(args.images, seed=args.seed, colours=BASE_COLOURS, shapes=BASE_SHAPES,
                                       backgrounds=tuple(BACKGROUNDS))
    pixels = torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)  # [-1, 1]
    return pixels, captions


def _identity_(weight: torch.Tensor, bias: torch.Tensor | None = None, scale: float = 1.0) -> None:
    """Make a conv (out, in, k, k) copy input channel i to output channel i (its centre tap), scaled."""
    weight.zero_()
    centre = weight.shape[-1] // 2
    for i in range(min(weight.shape[0], weight.shape[1])):
        weight[i, i, centre, centre] = scale
    if bias is not None:
        bias.zero_()


@torch.no_grad()
def start_as_pooling(vae, constant: float = 10.0) -> None:
    """Set the VAE to an exact, simple autoencoder before it trains: 4x4 average pooling of RGB and back.

    Every residual branch (resnet ``conv2``, attention ``to_out``) starts at zero, so each block
    is the identity; downsamplers average 2x2, upsamplers repeat. Each colour c travels as the
    channels (c, -c, K, -K): their group mean is zero and their spread is nearly constant, so the
    final GroupNorm keeps absolute colour, and SiLU(z) - SiLU(-z) = z undoes the SiLU after it.
    Training from there only has to sharpen edges, which takes a few hundred steps instead of
    thousands, and the posterior std starts near zero (noisy latents would teach a blurry decoder).
    """
    from diffusers.models.attention_processor import Attention
    from diffusers.models.resnet import Downsample2D, ResnetBlock2D, Upsample2D

    for module in vae.modules():
        if isinstance(module, ResnetBlock2D):
            module.conv2.weight.zero_()
            module.conv2.bias.zero_()
            if module.conv_shortcut is not None:
                _identity_(module.conv_shortcut.weight, module.conv_shortcut.bias)
        elif isinstance(module, Attention):
            module.to_out[0].weight.zero_()
            module.to_out[0].bias.zero_()
        elif isinstance(module, Downsample2D):  # pads right/bottom by one, stride 2: taps (0..1, 0..1) average
            module.conv.weight.zero_()
            module.conv.bias.zero_()
            for i in range(module.conv.weight.shape[0]):
                module.conv.weight[i, i, :2, :2] = 0.25
        elif isinstance(module, Upsample2D):
            _identity_(module.conv.weight, module.conv.bias)
    def spread(conv, source_of) -> None:  # conv writes colour c as (c, -c, K, -K) into channels 4c..4c+3
        conv.weight.zero_()
        conv.bias.zero_()
        for c in range(3):
            for k, sign in enumerate((1.0, -1.0)):
                conv.weight[4 * c + k, source_of(c), conv.weight.shape[-1] // 2, conv.weight.shape[-1] // 2] = sign
            conv.bias[4 * c + 2], conv.bias[4 * c + 3] = constant, -constant

    def collect(norm, conv, members: int, target_of) -> None:  # GroupNorm -> SiLU -> conv gives colour c back
        constants = 2 * min(3, members // 4)  # the K and -K channels among a group's members set its spread
        norm.weight.fill_(constant * (constants / members) ** 0.5)
        norm.bias.zero_()
        conv.weight.zero_()
        conv.bias.zero_()
        for c in range(3):
            centre = conv.weight.shape[-1] // 2
            conv.weight[target_of(c), 4 * c, centre, centre] = 1.0
            conv.weight[target_of(c), 4 * c + 1, centre, centre] = -1.0

    encoder, decoder = vae.encoder, vae.decoder
    spread(encoder.conv_in, lambda c: c)
    groups = encoder.conv_norm_out.num_groups
    collect(encoder.conv_norm_out, encoder.conv_out, encoder.conv_norm_out.num_channels // groups, lambda c: c)
    latent = vae.config.latent_channels
    encoder.conv_out.bias[latent:].fill_(-12.0)  # log-variance: std ~ 0.0025
    _identity_(vae.quant_conv.weight, vae.quant_conv.bias)
    _identity_(vae.post_quant_conv.weight, vae.post_quant_conv.bias)
    spread(decoder.conv_in, lambda c: c)
    groups = decoder.conv_norm_out.num_groups
    collect(decoder.conv_norm_out, decoder.conv_out, decoder.conv_norm_out.num_channels // groups, lambda c: c)


def train_vae(args: argparse.Namespace, vae, pixels: torch.Tensor) -> None:
    path = args.work_dir / "vae.pt"
    if path.exists():
        vae.load_state_dict(torch.load(path, weights_only=True))
        log("autoencoder: loaded from the work dir")
        return
    start_as_pooling(vae)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=args.vae_lr, weight_decay=0.0)
    vae.train()
    start = time.time()
    for step in range(args.vae_steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, args.vae_steps, args.vae_lr, 20)
        index = torch.randint(0, len(pixels), (args.vae_batch,), generator=generator(args.seed, 1, step))
        batch = pixels[index]
        posterior = vae.encode(batch).latent_dist
        latents = posterior.mean + posterior.std * torch.randn(posterior.mean.shape,
                                                               generator=generator(args.seed, 2, step))
        decoded = vae.decode(latents).sample
        loss = F.mse_loss(decoded, batch) + 0.5 * F.l1_loss(decoded, batch) + 1e-6 * posterior.kl().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % 50 == 0 or step == args.vae_steps - 1:
            eta = (time.time() - start) / (step + 1) * (args.vae_steps - step - 1)
            log(f"autoencoder step {step + 1}/{args.vae_steps} loss {loss.item():.4f} (eta {eta / 60:.1f} min)")
    vae.eval()
    torch.save(vae.state_dict(), path)


@torch.no_grad()
def encode(args: argparse.Namespace, vae, pixels: torch.Tensor) -> tuple[torch.Tensor, float]:
    path = args.work_dir / "latents.pt"
    if path.exists():
        saved = torch.load(path, weights_only=True)
        return saved["latents"], float(saved["scaling"])
    vae.eval()
    latents = torch.cat([vae.encode(chunk).latent_dist.mean for chunk in pixels.split(256)])
    scaling = float(1.0 / latents.std())
    error = F.mse_loss(torch.cat([vae.decode(chunk).sample for chunk in latents[:512].split(256)]), pixels[:512])
    log(f"latents {tuple(latents.shape)}, std {latents.std():.3f} -> scaling_factor {scaling:.4f}; "
        f"reconstruction MSE {error:.5f}")
    torch.save({"latents": latents, "scaling": scaling}, path)
    return latents, scaling


def caption_ids(tokenizer, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids of each distinct caption (the empty one last) and each picture's index into them."""
    distinct = sorted(set(captions)) + [""]
    ids = tokenizer(distinct, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    where = {text: i for i, text in enumerate(distinct)}
    return ids, torch.tensor([where[c] for c in captions])


def latest_checkpoint(work_dir: Path) -> Path | None:
    found = sorted(work_dir.glob("step_*.pt"), key=lambda p: int(p.stem.split("_")[1]))
    return found[-1] if found else None


def export(path: Path, ema: dict[str, torch.Tensor], vae, scaling: float, info: dict) -> None:
    from safetensors.torch import save_file

    state = {key: value.detach().to(torch.float16).contiguous() for key, value in ema.items()}
    state.update({f"vae.{k}": v.detach().to(torch.float16).contiguous() for k, v in vae.state_dict().items()})
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(".tmp")
    save_file(state, str(temporary), metadata={"vae_scaling_factor": repr(scaling), "training": json.dumps(info)})
    temporary.replace(path)
    log(f"wrote {path} ({path.stat().st_size / 1e6:.2f} MB)")


def train_unet(args: argparse.Namespace, parts: dict, latents: torch.Tensor, captions: list[str],
               scaling: float) -> None:
    unet, text_encoder, scheduler = parts["unet"], parts["text_encoder"], parts["scheduler"]
    ids, caption_index = caption_ids(parts["tokenizer"], captions)
    empty = len(ids) - 1
    latents = latents * scaling
    models = {"unet": unet, "text_encoder": text_encoder}
    params = [p for m in models.values() for p in m.parameters()]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01)
    ema = {f"{name}.{k}": v.detach().clone() for name, m in models.items() for k, v in m.state_dict().items()}
    start_step = 0
    checkpoint = latest_checkpoint(args.work_dir)
    if checkpoint is not None:
        saved = torch.load(checkpoint, weights_only=True)
        unet.load_state_dict(saved["unet"])
        text_encoder.load_state_dict(saved["text_encoder"])
        optimizer.load_state_dict(saved["optimizer"])
        ema, start_step = saved["ema"], saved["step"]
        log(f"resumed from {checkpoint.name}")
    if args.export_only:
        export(args.out, ema, parts["vae"], scaling, {"step": start_step, **_info(args)})
        return
    alphas = scheduler.alphas_cumprod.float()
    snr = alphas / (1 - alphas)
    unet.train()
    text_encoder.train()
    started, losses = time.time(), []
    stop = min(args.stop_at or args.steps, args.steps)
    for step in range(start_step, stop):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, args.steps, args.lr, args.warmup)
        rng = generator(args.seed, 3, step)
        index = torch.randint(0, len(latents), (args.batch,), generator=rng)
        clean = latents[index]
        noise = torch.randn(clean.shape, generator=rng)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (args.batch,), generator=rng)
        which = caption_index[index].clone()
        which[torch.rand(args.batch, generator=rng) < args.drop_caption] = empty
        used, inverse = torch.unique(which, return_inverse=True)  # encode each distinct caption once
        hidden = text_encoder(ids[used])[0][inverse]
        noisy = scheduler.add_noise(clean, noise, timesteps)
        prediction = unet(noisy, timesteps, hidden).sample
        per_sample = F.mse_loss(prediction, noise, reduction="none").mean(dim=(1, 2, 3))
        if args.min_snr > 0:
            per_sample = per_sample * (snr[timesteps].clamp(max=args.min_snr) / snr[timesteps])
        loss = per_sample.mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        decay = min(args.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            for name, model in models.items():
                for key, value in model.state_dict().items():
                    average = ema[f"{name}.{key}"]
                    if average.dtype.is_floating_point:
                        average.lerp_(value, 1 - decay)
        losses.append(loss.item())
        done = step + 1
        if done % 50 == 0 or done == args.steps:
            rate = (time.time() - started) / (done - start_step)
            log(f"step {done}/{args.steps} loss {np.mean(losses[-50:]):.4f} lr {optimizer.param_groups[0]['lr']:.2e} "
                f"{rate:.2f} s/step (eta {rate * (args.steps - done) / 60:.1f} min)")
        if done % args.checkpoint_every == 0 or done == args.steps:
            path = args.work_dir / f"step_{done:06d}.pt"
            torch.save({"unet": unet.state_dict(), "text_encoder": text_encoder.state_dict(),
                        "optimizer": optimizer.state_dict(), "ema": ema, "step": done}, path.with_suffix(".tmp"))
            path.with_suffix(".tmp").replace(path)
            export(args.work_dir / f"step_{done:06d}.safetensors", ema, parts["vae"], scaling,
                   {"step": done, **_info(args)})
            for old in args.work_dir.glob("step_*.pt"):
                if old != path:
                    old.unlink()
    export(args.out, ema, parts["vae"], scaling, {"step": max(stop, start_step), **_info(args)})


def _info(args: argparse.Namespace) -> dict:
    return {key: value for key, value in vars(args).items() if key not in ("out", "work_dir", "export_only")}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)  # tiny EMA/Adam values are slow on CPUs otherwise
    args.work_dir.mkdir(parents=True, exist_ok=True)
    started = time.time()
    pixels, captions = draw_dataset(args)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(args.seed)
        parts = shapes_components()
    assert set(SHAPES_PREFIXES) <= set(parts)
    train_vae(args, parts["vae"], pixels)
    parts["vae"].requires_grad_(False)
    latents, scaling = encode(args, parts["vae"], pixels)
    parts["vae"].register_to_config(scaling_factor=scaling)
    del pixels
    train_unet(args, parts, latents, captions, scaling)
    log(f"done in {(time.time() - started) / 60:.1f} min")


if __name__ == "__main__":
    main()
