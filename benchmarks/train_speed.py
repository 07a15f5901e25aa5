"""LoRA training speed: TrainLoRA against a plain PEFT + diffusers loop, same batch, rank and layers.

    python benchmarks/train_speed.py             # builtin:shapes, 64x64, batch 8, rank 8 (~2 min on 2 CPU cores)
    python benchmarks/train_speed.py --tiny      # builtin:tiny, a few steps (a quick check, ~15 s)
    python benchmarks/train_speed.py --device cuda --steps 100 --batch 16

The baseline is the core loop of diffusers' ``examples/text_to_image/train_text_to_image_lora.py``:
the UNet frozen, ``unet.add_adapter(LoraConfig(r, lora_alpha=r, init_lora_weights="gaussian"))``
on exactly the layers TrainLoRA trains for ``target=attention_mlp`` (its attention projections,
feed-forward and proj_in/proj_out layers), then per step: tokenize the captions,
``vae.encode(pixels).latent_dist.sample() * scaling_factor``, ``text_encoder(input_ids)[0]``,
noise, ``DDPMScheduler.add_noise``, ``unet(...)``, MSE, backward, gradient clipping at 1.0, AdamW
(weight decay 1e-2, as the script's default) on the LoRA parameters only, ``zero_grad``,
``loss.item()``. Both sides train on the same dataset (workflows/datasets/purple_star, 16 images
at the base's native size) with the same batches (``Dataset.epoch_batches``), the same weights'
dtype and device, and without mixed precision (TrainLoRA with ``mixed_precision="no"``).

Rows:
1. the PEFT loop;
2. TrainLoRA without caches (the VAE and text encoder run every step, as in the PEFT loop);
   goal: at least 1.0x the PEFT loop's steps per second;
3. TrainLoRA with cached latents and text embeddings (its defaults); goal: at least 1.3x.

How it is timed. Each side runs in its own worker process, started once (so imports and model
loading are not timed, and each process's peak memory is that side's alone). The parent drives
the three workers in lockstep: one optimizer step of one side, then one of the next (which side
goes first rotates), so a slow spell of a shared machine falls on all sides alike and only one
worker computes at a time, with all ``--threads``. A worker times each step itself, from the
go-ahead to the step's end (TrainLoRA: between its progress callbacks; CUDA synchronized first).
A run is ``--warmup`` + ``--steps`` steps from a fresh start (new LoRA, optimizer, caches); the
warm-up steps hold the one-off work (TrainLoRA's setup and cache filling, first-call
allocations) and are not counted. steps/s is 1 / the median of the counted steps' times over
``--repeats`` runs; the table also shows their quartiles, a measure of the noise. "vs PEFT" is
paired: the median, over rounds, of the PEFT step's time over this side's step time in the same
round (those steps ran a fraction of a second apart: this cancels the machine's slower swings).

Peak memory: max RSS of the worker process on the CPU (libraries and the loaded base included;
"above load" is the part added by training), ``torch.cuda.max_memory_allocated`` on CUDA.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DATASET = REPO / "workflows" / "datasets" / "purple_star"
SIDES = ("peft", "ours", "ours_cached")
LABELS = {"peft": "PEFT + diffusers loop", "ours": "TrainLoRA, no caches", "ours_cached": "TrainLoRA, cached"}
GOALS = {"peft": None, "ours": 1.0, "ours_cached": 1.3}
MARK = "@train_speed "  # prefixes the workers' protocol lines (libraries may print too)


# ---------------------------------------------------------------------- worker side

def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_mb(device) -> float:
    import resource

    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


class Quit(Exception):
    """The parent said "quit" (or went away) where a step was expected."""


class Gate:
    """Lets a worker take one optimizer step per "step" line on stdin and reports how long it took."""

    def __init__(self, device):
        self.device, self.start = device, 0.0

    def open(self) -> None:
        """Wait for the parent's go-ahead for the next step."""
        command = sys.stdin.readline().strip()
        if command != "step":
            raise Quit(command)
        self.start = time.perf_counter()

    def close(self, loss: float) -> None:
        """The step is done: report its seconds (work queued on a GPU included)."""
        _sync(self.device)
        _say({"seconds": time.perf_counter() - self.start, "loss": loss})


class OursRunner:
    """TrainLoRA (``train_lora``), a fresh run (new LoRA, optimizer, caches) every time."""

    def __init__(self, base, dataset, opts: dict, cached: bool):
        self.base, self.dataset, self.opts, self.cached = base, dataset, opts, cached

    def run(self, gate: Gate) -> None:
        from lora_nodes.training.config import TrainConfig
        from lora_nodes.training.trainer import TrainCallbacks, train_lora

        opts = self.opts
        total = opts["warmup"] + opts["steps"]

        def progress(step, steps, loss):  # called after every optimizer step
            gate.close(loss)
            if step < steps:
                gate.open()

        config = TrainConfig(steps=total, batch_size=opts["batch"], rank=opts["rank"], alpha=opts["rank"],
                             target="attention_mlp", learning_rate=1e-4, mixed_precision="no",
                             cache_latents=self.cached, cache_text_embeddings=self.cached, save_every_n_steps=0)
        gate.open()  # the first step's time includes the trainer's setup: it is a warm-up step
        train_lora(self.base, self.dataset, config, callbacks=TrainCallbacks(progress=progress))


class PeftRunner:
    """The core loop of diffusers' train_text_to_image_lora.py, on a base of its own."""

    def __init__(self, base, dataset, opts: dict):
        from diffusers import DDPMScheduler
        from peft import LoraConfig

        from lora_nodes.training.network import select_targets

        self.base, self.dataset, self.opts = base, dataset, opts
        self.device = base.device
        parts = base.components
        self.unet, self.vae, self.text_encoder = parts["unet"], parts["vae"], parts["text_encoder"]
        self.tokenizer = parts["tokenizer"]
        self.scheduler = DDPMScheduler.from_config(parts["scheduler"].config)
        for model in (self.unet, self.vae, self.text_encoder):
            model.requires_grad_(False)
        names = [name.split(".", 1)[1] for name in select_targets(base, "attention_mlp", False)]
        self.unet.add_adapter(LoraConfig(r=opts["rank"], lora_alpha=opts["rank"], init_lora_weights="gaussian",
                                         target_modules=names))
        self.params = [p for p in self.unet.parameters() if p.requires_grad]
        for param in self.params:  # the script keeps trainable parameters in float32 (cast_training_params)
            param.data = param.data.float()
        self.examples = dataset.examples(base.native_size)
        self.epoch = (0, dataset.epoch_batches(self.examples, opts["batch"], 0, 0))  # TrainLoRA's batches (seed 0)

    def _batch(self, batch_number: int):
        """The script's collate: pixel values and tokenized captions (TrainLoRA's batches)."""
        import torch

        epoch, position = divmod(batch_number, len(self.epoch[1]))
        if epoch != self.epoch[0]:  # shuffled once an epoch, as a DataLoader does
            self.epoch = (epoch, self.dataset.epoch_batches(self.examples, self.opts["batch"], epoch, 0))
        indices = self.epoch[1][position]
        pixels = torch.stack([self.examples[i].pixels for i in indices])
        input_ids = self.tokenizer([self.examples[i].caption for i in indices], max_length=self.tokenizer.model_max_length,
                                   padding="max_length", truncation=True, return_tensors="pt").input_ids
        return pixels.to(self.device, self.vae.dtype), input_ids.to(self.device)

    def run(self, gate: Gate) -> None:
        import torch
        import torch.nn.functional as F

        opts = self.opts
        gate.open()
        optimizer = torch.optim.AdamW(self.params, lr=1e-4, weight_decay=1e-2)  # a fresh start every run
        self.unet.train()
        for step in range(opts["warmup"] + opts["steps"]):
            if step:
                gate.open()
            pixels, input_ids = self._batch(step)
            latents = self.vae.encode(pixels).latent_dist.sample() * self.vae.config.scaling_factor
            noise = torch.randn_like(latents)
            timesteps = torch.randint(0, self.scheduler.config.num_train_timesteps, (latents.shape[0],),
                                      device=latents.device).long()
            noisy = self.scheduler.add_noise(latents, noise, timesteps)
            hidden = self.text_encoder(input_ids, return_dict=False)[0]
            if self.scheduler.config.prediction_type == "v_prediction":
                target = self.scheduler.get_velocity(latents, noise, timesteps)
            else:
                target = noise
            prediction = self.unet(noisy, timesteps, hidden, return_dict=False)[0]
            loss = F.mse_loss(prediction.float(), target.float(), reduction="mean")
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.params, 1.0)
            optimizer.step()
            optimizer.zero_grad()
            gate.close(loss.item())  # the script logs the loss every step
        self.unet.eval()


def _say(message: dict) -> None:
    print(MARK + json.dumps(message), flush=True)


def worker(side: str, opts: dict) -> None:
    """Load the base and the dataset, say "ready", then train one step per "step" line until "quit".

    A run is ``warmup + steps`` steps; after its last step the worker reports its peak memory.
    """
    import torch

    from lora_nodes.datasets.folder import read_folder
    from lora_nodes.models.loading import load_base
    from lora_nodes.training.network import select_targets

    if opts["threads"]:
        torch.set_num_threads(opts["threads"])
    base = load_base(opts["source"], dtype=opts["dtype"], device=opts["device"])
    dataset = read_folder(opts["dataset"])
    modules = len(select_targets(base, "attention_mlp", False))  # before PEFT wraps them
    if side == "peft":
        runner = PeftRunner(base, dataset, opts)
    else:
        runner = OursRunner(base, dataset, opts, cached=side == "ours_cached")
    _sync(base.device)
    _say({"ready": True, "load_mb": _peak_mb(base.device), "device": str(base.device),
          "threads": torch.get_num_threads(), "size": base.native_size, "images": len(dataset),
          "modules": modules})
    gate = Gate(base.device)
    while True:
        try:
            runner.run(gate)
        except Quit:
            return
        _say({"end": True, "peak_mb": _peak_mb(base.device)})


# ---------------------------------------------------------------------- parent side

class Worker:
    """One side's worker process, driven step by step over its stdin."""

    def __init__(self, side: str, opts: dict):
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
        env.setdefault("DIFFUSERS_VERBOSITY", "error")
        env.setdefault("TRANSFORMERS_VERBOSITY", "error")
        self.side = side
        self.proc = subprocess.Popen([sys.executable, __file__, "--worker", side, json.dumps(opts)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)

    def read(self) -> dict:
        for line in self.proc.stdout:
            if line.startswith(MARK):
                return json.loads(line[len(MARK):])
        raise RuntimeError(f"the {self.side} worker stopped (exit code {self.proc.wait()}); see its stderr above")

    def step(self) -> dict:
        self.proc.stdin.write("step\n")
        self.proc.stdin.flush()
        return self.read()

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write("quit\n")
                self.proc.stdin.close()
            except BrokenPipeError:
                pass
        self.proc.wait()


def interleaved_runs(workers: dict[str, Worker], repeats: int, steps_per_run: int) -> dict[str, list[dict]]:
    """Every side's runs, one optimizer step at a time in turn (the side going first rotates), so a
    slow spell of a shared machine falls on all sides alike. Returns each side's step reports, run
    by run, and each run's end report (peak memory) last."""
    reports: dict[str, list[dict]] = {side: [] for side in workers}
    sides = list(workers)
    turn = 0
    for _ in range(repeats):
        for _ in range(steps_per_run):
            for side in sides[turn % len(sides):] + sides[:turn % len(sides)]:
                reports[side].append(workers[side].step())
            turn += 1
        for side in sides:
            reports[side].append(workers[side].read())  # {"end": ..., "peak_mb": ...}
    return reports


def main(argv: list[str] | None = None) -> dict[str, dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true",
                        help="builtin:tiny (32x32), batch 2, rank 4, 3+4 steps, 1 repeat: checks the script runs")
    parser.add_argument("--source", default=None, help="base model (default builtin:shapes; --tiny: builtin:tiny)")
    parser.add_argument("--dataset", default=str(DATASET), help="dataset folder (LoadDataset's layout)")
    parser.add_argument("--device", default="auto", help="auto (CUDA if there is a GPU), cpu or cuda")
    parser.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"),
                        help="the base's weights (both sides train float32 LoRA factors)")
    parser.add_argument("--steps", type=int, default=None, help="timed optimizer steps per run (default 60)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps at the start of each run (>= 1)")
    parser.add_argument("--batch", type=int, default=None, help="images per step (default 8)")
    parser.add_argument("--rank", type=int, default=None, help="LoRA rank, alpha = rank (default 8)")
    parser.add_argument("--repeats", type=int, default=None, help="runs per side, each a fresh start (default 3)")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch intra-op threads per worker (default 0: torch's choice, the physical cores; "
                             "the workers take turns, so each may use them all)")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures to this JSON file")
    parser.add_argument("--worker", nargs=2, metavar=("SIDE", "OPTIONS"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args.worker[0], json.loads(args.worker[1]))
        return {}

    tiny = {"source": "builtin:tiny", "steps": 4, "batch": 2, "rank": 4, "repeats": 1}
    full = {"source": "builtin:shapes", "steps": 60, "batch": 8, "rank": 8, "repeats": 3}
    for key, value in (tiny if args.tiny else full).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.warmup < 1 or args.steps < 1:
        parser.error("--warmup and --steps must be at least 1")
    opts = {key: getattr(args, key) for key in ("source", "dataset", "device", "dtype", "steps", "warmup", "batch",
                                                "rank", "threads")}

    workers = {side: Worker(side, opts) for side in SIDES}  # they import and load in parallel
    try:
        ready = {side: w.read() for side, w in workers.items()}
        reports = interleaved_runs(workers, args.repeats, args.warmup + args.steps)
    finally:
        for w in workers.values():
            w.close()

    figures = {}
    per_run = args.warmup + args.steps + 1  # the steps, then the end report
    for side in SIDES:
        runs = [reports[side][i:i + per_run] for i in range(0, len(reports[side]), per_run)]
        seconds = [r["seconds"] for run in runs for r in run[args.warmup:-1]]
        peak = max(run[-1]["peak_mb"] for run in runs)
        quartiles = statistics.quantiles(seconds, n=4) if len(seconds) > 1 else [seconds[0]] * 3
        figures[side] = {"steps_per_s": 1 / statistics.median(seconds), "step_seconds": seconds,
                         "step_ms_quartiles": [q * 1e3 for q in quartiles], "peak_mb": peak,
                         "above_load_mb": peak - ready[side]["load_mb"], "last_loss": runs[-1][-2]["loss"]}
    peft = figures["peft"]["step_seconds"]
    for side in SIDES:  # paired: steps of the same round ran within a second of each other
        figures[side]["vs_peft"] = statistics.median(
            theirs / ours for theirs, ours in zip(peft, figures[side]["step_seconds"], strict=True))

    info = ready["peft"]
    memory = "CUDA max allocated" if info["device"].startswith("cuda") else "max RSS"
    print(f"\nLoRA training on {args.source} ({info['size']}x{info['size']}, {info['images']} images), "
          f"{info['device']} {args.dtype}, {info['threads']} threads; batch {args.batch}, rank {args.rank}, "
          f"{info['modules']} attention_mlp layers; {args.repeats} run(s) x {args.steps} timed steps "
          f"after {args.warmup}, interleaved")
    print(f"{'':24}{'steps/s':>9}{'vs PEFT':>9}{'goal':>8}{'met':>6}{'step ms (q1 med q3)':>22}"
          f"{'peak MB':>10}{'above load':>12}")
    for side in SIDES:
        f, goal = figures[side], GOALS[side]
        goal_text, met = (f">={goal:.1f}x", "yes" if f["vs_peft"] >= goal else "NO") if goal else ("", "")
        q1, med, q3 = f["step_ms_quartiles"]
        print(f"{LABELS[side]:24}{f['steps_per_s']:>9.2f}{f['vs_peft']:>8.2f}x{goal_text:>8}{met:>6}"
              f"{f'{q1:.1f} {med:.1f} {q3:.1f}':>22}{f['peak_mb']:>10.0f}{f['above_load_mb']:>12.0f}")
    print(f"(steps/s: 1 / the median step time; vs PEFT: the median of paired per-round ratios; "
          f"peak MB: {memory} of each side's own process)")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))
    return figures


if __name__ == "__main__":
    main()
