"""TrainLoRA: it teaches, leaves the base untouched, resumes after a kill and never retrains."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO, WORKFLOWS, weights, write_workflow
from safetensors import safe_open
from safetensors.torch import load_file

from lora_nodes.datasets.folder import read_folder
from lora_nodes.engine.events import Collector
from lora_nodes.engine.scheduler import RunFailed, Runner
from lora_nodes.graph import load_workflow
from lora_nodes.training.config import TrainConfig
from lora_nodes.training.network import select_targets
from lora_nodes.training.trainer import train_lora

STARS = WORKFLOWS / "datasets" / "purple_star"
PURPLE = np.array([140, 40, 180]) / 255


def tiny_workflow(folder: Path, steps: int = 6, extra: str = "", batch_size: int = 2, save_every: int = 5) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    return write_workflow(folder, f"""
nodes:
  base:  {{type: LoadBase, inputs: {{source: "builtin:tiny", device: cpu}}}}
  data:  {{type: LoadDataset, inputs: {{path: {STARS}}}}}
  train: {{type: TrainLoRA, inputs: {{model: [base, model], dataset: [data, dataset], steps: {steps}, batch_size: {batch_size},
          rank: 4, alpha: 4, learning_rate: 0.001, save_every_n_steps: {save_every}, {extra}}}}}
  save:  {{type: SaveLoRA, inputs: {{lora: [train, lora], path: trained.safetensors}}}}
""")


def run_cli(workflow: Path, out: Path, cache: Path, *launcher: str) -> subprocess.Popen:
    command = [*launcher] if launcher else [sys.executable, "-m", "lora_nodes.cli"]
    return subprocess.Popen(
        [*command, "run", str(workflow), "--output-dir", str(out), "--cache-dir", str(cache), "--events", "jsonl"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
        env={**os.environ, "OMP_NUM_THREADS": "1"})


def events_of(stdout: str) -> list[dict]:
    return [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]


def lora_tensors(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def assert_close_loras(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float) -> None:
    assert a.keys() == b.keys()
    worst = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
    assert worst <= atol, worst


# --------------------------------------------------------------------------- it teaches


def purple_distance(image: np.ndarray) -> float:
    """Mean colour of the drawn shape (pixels away from the white background) to purple; a blank
    image counts as white."""
    shape = np.linalg.norm(image - 1.0, axis=-1) > 0.25
    colour = image[shape].mean(0) if shape.sum() >= 10 else np.ones(3)
    return float(np.linalg.norm(colour - PURPLE))


def star_fill() -> float:
    """How much of its bounding box the training images' shape fills (a star: about 0.4)."""
    from PIL import Image

    from lora_nodes.datasets.shape_images import classify

    return float(np.mean([classify(np.asarray(Image.open(p).convert("RGB")))[2] for p in STARS.glob("*.png")]))


def test_a_trained_lora_teaches_purple_stars_and_its_effect_grows_with_strength(trained_star):
    """Samples move toward the training images: colour (distance to purple) and shape (how much of
    its box the shape fills: a square 1, a star about 0.4)."""
    from lora_nodes.datasets.shape_images import classify
    from lora_nodes.engine.context import NodeContext
    from lora_nodes.lora.recipe import AppliedLoRA
    from lora_nodes.nodes.sample import sample

    result, events = trained_star
    lora = result.outputs["train"][0]
    base_recipe = result.outputs["base"][0]
    ctx = NodeContext("probe", "Sample", Path("."), Path("."), lambda ev: None)
    colour, shape = [], []
    for strength in (0.0, 0.5, 1.0):
        model = base_recipe.with_loras(AppliedLoRA(lora, strength, strength))
        images = [sample.run(ctx, model=model, prompt="a purple star on a white background", negative_prompt="",
                             seed=seed, steps=20, cfg=7.0, sampler="euler", width=0, height=0,
                             batch_size=1)[0][0].numpy() for seed in range(8)]
        colour.append(np.mean([purple_distance(i) for i in images]))
        shape.append(abs(np.mean([classify(i)[2] for i in images]) - star_fill()))
    assert colour[2] <= 0.7 * colour[0], colour  # at least 30% closer to purple at strength 1
    assert colour[1] < colour[0] and colour[2] < colour[0], colour
    total = [c + s for c, s in zip(colour, shape, strict=True)]
    assert total[0] > total[1] > total[2], (colour, shape)  # the whole effect grows with strength
    trained = next(e for e in events.of("info") if e["node"] == "train" and "loss_first" in e)
    assert trained["loss_last"] < trained["loss_first"]


def test_the_training_workflow_saves_a_kohya_lora_with_training_metadata(trained_star):
    result, _ = trained_star
    path = next(Path(f) for f in result.files if f.endswith("purple_star.safetensors"))
    with safe_open(str(path), "pt") as f:
        metadata = f.metadata()
    assert json.loads(metadata["ss_tag_frequency"]) == {"purple_star": {"a purple star on a white background": 16}}
    assert metadata["ss_network_dim"] == "8" and metadata["ss_network_alpha"] == "8.0"
    assert metadata["ss_learning_rate"] == "0.001" and metadata["ss_max_train_steps"] == "300"
    assert metadata["ss_base_model_version"] == "sd_v1" and metadata["ss_output_name"] == "purple_star"
    assert json.loads(metadata["ss_dataset_dirs"]) == {"purple_star": {"n_repeats": 1, "img_count": 16}}
    loss_png = [f for f in result.files if "loss" in Path(f).name]
    assert loss_png


# --------------------------------------------------------------------------- the base stays as it was


def test_training_leaves_the_base_bitwise_unchanged_and_changes_its_outputs_only_through_the_lora(tiny):
    dataset = read_folder(STARS)
    before = {name: weights(tiny.components[name]) for name in ("unet", "text_encoder", "vae")}
    flags = [p.requires_grad for p in tiny.unet.parameters()]
    result = train_lora(tiny, dataset, TrainConfig(steps=3, batch_size=2, rank=4, learning_rate=1e-2,
                                                   train_text_encoder=True, save_every_n_steps=0))
    for name, state in before.items():
        after = weights(tiny.components[name])
        assert all(torch.equal(state[k], after[k]) for k in state), name
    assert flags == [p.requires_grad for p in tiny.unet.parameters()]
    assert not tiny.unet.training and not getattr(tiny.unet, "_forward_hooks", None)
    assert any(layer.up.abs().sum() > 0 for layer in result.network.layers.values())  # it did learn


@pytest.mark.parametrize(("target", "train_text_encoder", "kinds"), [
    ("attention", False, {"to_q", "to_k", "to_v", "0"}),
    ("attention_mlp", False, {"to_q", "to_k", "to_v", "0", "proj", "2", "proj_in", "proj_out"}),
    ("attention", True, {"to_q", "to_k", "to_v", "0", "q_proj", "k_proj", "v_proj", "out_proj"}),
])
def test_targets(tiny, target, train_text_encoder, kinds):
    chosen = select_targets(tiny, target, train_text_encoder)
    assert {name.rsplit(".", 1)[1] for name in chosen} == kinds
    assert any(n.startswith("text_encoder.") for n in chosen) == train_text_encoder


def test_target_all_includes_every_unet_conv(tiny):
    chosen = select_targets(tiny, "all", False)
    convs = {n for n, m in tiny.lora_targets.items() if n.startswith("unet.") and isinstance(m, torch.nn.Conv2d)}
    assert convs and convs <= set(chosen)


def test_learning_rate_schedules():
    warm = TrainConfig(steps=10, lr_warmup_steps=4, lr_scheduler="cosine")
    assert [round(warm.lr_factor(s), 3) for s in range(4)] == [0.2, 0.4, 0.6, 0.8]
    assert warm.lr_factor(4) == 1.0 and warm.lr_factor(9) < 0.1
    linear = TrainConfig(steps=10, lr_scheduler="linear")
    assert linear.lr_factor(0) == 1.0 and linear.lr_factor(5) == 0.5
    assert TrainConfig(steps=10).lr_factor(9) == 1.0


def test_every_option_trains_on_sdxl(tiny_sdxl):
    """Text encoders, buckets, shuffled captions, flips, accumulation, Min-SNR, noise offset, SGD,
    checkpointing and no caches, together, on the SDXL path (pooled text and time ids)."""
    dataset = read_folder(STARS, crop="buckets", shuffle_captions=True, flip=True)
    config = TrainConfig(steps=2, batch_size=2, gradient_accumulation=2, rank=2, alpha=1, target="all",
                         train_text_encoder=True, text_encoder_lr=5e-4, lr_scheduler="cosine", lr_warmup_steps=1,
                         optimizer="sgd", min_snr_gamma=5, noise_offset=0.05, gradient_checkpointing=True,
                         cache_latents=False, cache_text_embeddings=False, save_every_n_steps=0)
    result = train_lora(tiny_sdxl, dataset, config)
    lora = result.network.to_lora(tiny_sdxl, "all", {})
    assert {k.split("_")[1] for k in lora.modules} == {"unet", "te1", "te2"}
    assert len(result.losses) == 2 and all(np.isfinite(result.losses))
    assert not tiny_sdxl.unet.is_gradient_checkpointing


def test_caching_latents_and_text_does_not_change_the_lora(tiny):
    dataset = read_folder(STARS)
    runs = [train_lora(tiny, dataset, TrainConfig(steps=3, batch_size=2, rank=2, learning_rate=1e-2, seed=3,
                                                 cache_latents=c, cache_text_embeddings=c, save_every_n_steps=0))
            for c in (True, False)]
    first, second = (r.network.state_dict() for r in runs)
    assert all(torch.allclose(first[k], second[k], atol=1e-6) for k in first)


def test_initial_lora_is_continued(tiny):
    dataset = read_folder(STARS)
    first = train_lora(tiny, dataset, TrainConfig(steps=2, rank=4, alpha=2, learning_rate=1e-2, save_every_n_steps=0))
    lora = first.network.to_lora(tiny, "first", {})
    frozen = train_lora(tiny, dataset, TrainConfig(steps=1, rank=8, learning_rate=0.0, save_every_n_steps=0),
                        initial_lora=lora)
    again = frozen.network.to_lora(tiny, "again", {})
    assert all(torch.equal(again.modules[k].up, lora.modules[k].up) for k in lora.modules)
    assert {m.rank for m in again.modules.values()} == {4} and {m.alpha for m in again.modules.values()} == {2.0}


def test_half_precision_on_the_cpu_is_refused_naming_the_node(tmp_path):
    events = Collector()
    workflow = load_workflow(tiny_workflow(tmp_path, extra="mixed_precision: fp16"))
    with pytest.raises(RunFailed) as failure:
        Runner(output_dir=tmp_path / "out", cache_dir=tmp_path / "cache", emit=events).run(workflow)
    assert failure.value.node == "train" and "needs a CUDA GPU" in failure.value.message


def test_progress_reports_the_loss_and_previews_are_written(tmp_path):
    events = Collector()
    workflow = load_workflow(tiny_workflow(tmp_path, steps=4, extra="sample_every_n_steps: 2, "
                                                                    "sample_prompts: 'a purple star'"))
    result = Runner(output_dir=tmp_path / "out", cache_dir=tmp_path / "cache", emit=events).run(workflow)
    progress = [e for e in events.of("progress") if e["node"] == "train"]
    assert [e["value"] for e in progress] == [1, 2, 3, 4] and all(np.isfinite(e["loss"]) for e in progress)
    previews = sorted(Path(f).name for f in result.files if "previews" in f)
    assert previews == ["step000002_00.png", "step000004_00.png"]
    assert not (tmp_path / "cache" / "checkpoints").exists() or not any((tmp_path / "cache" / "checkpoints").rglob("*.pt"))


# --------------------------------------------------------------------------- never retrains, resumes


def test_a_new_process_takes_the_trained_lora_from_the_disk_cache(tmp_path):
    workflow = tiny_workflow(tmp_path, save_every=0)  # a change of checkpointing: same key
    first = run_cli(workflow, tmp_path / "out1", tmp_path / "cache")
    assert first.wait(timeout=120) == 0, first.stderr.read()
    second = run_cli(tiny_workflow(tmp_path), tmp_path / "out2", tmp_path / "cache")
    stdout, stderr = second.communicate(timeout=120)
    assert second.returncode == 0, stderr
    events = events_of(stdout)
    cached = [e for e in events if e["event"] == "cached" and e["node"] == "train"]
    assert cached and cached[0]["cache"] == "disk"
    assert not [e for e in events if e["event"] == "executing" and e["node"] == "train"]
    assert_close_loras(lora_tensors(tmp_path / "out1" / "trained.safetensors"),
                       lora_tensors(tmp_path / "out2" / "trained.safetensors"), atol=0)


def test_a_killed_training_resumes_from_its_checkpoint_and_ends_with_the_same_lora(tmp_path):
    steps = 60
    workflow = tiny_workflow(tmp_path, steps=steps)
    killed = run_cli(workflow, tmp_path / "out", tmp_path / "cache")
    for line in killed.stdout:  # kill it for real, part way, after a checkpoint or two
        event = json.loads(line)
        if event["event"] == "progress" and event["node"] == "train" and event["value"] >= 17:
            killed.send_signal(signal.SIGKILL)
            break
    assert killed.wait(timeout=60) == -signal.SIGKILL
    assert not (tmp_path / "out" / "trained.safetensors").exists()
    resumed = run_cli(workflow, tmp_path / "out", tmp_path / "cache")
    stdout, stderr = resumed.communicate(timeout=180)
    assert resumed.returncode == 0, stderr
    infos = [e["message"] for e in events_of(stdout) if e["event"] == "info" and e["node"] == "train"]
    assert any("resumed from the checkpoint at step" in m for m in infos), infos
    steps_run = [e["value"] for e in events_of(stdout) if e["event"] == "progress" and e["node"] == "train"]
    assert steps_run[0] > 1 and (steps_run[0] - 1) % 5 == 0 and steps_run[-1] == steps  # from a checkpoint
    uninterrupted = Runner(output_dir=tmp_path / "ref", cache_dir=tmp_path / "ref-cache")
    uninterrupted.run(load_workflow(workflow))
    assert_close_loras(lora_tensors(tmp_path / "out" / "trained.safetensors"),
                       lora_tensors(tmp_path / "ref" / "trained.safetensors"), atol=1e-5)


def test_training_under_accelerate_launch_single_process(tmp_path):
    workflow = tiny_workflow(tmp_path)
    accelerate = (sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "1",
                  "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "lora_nodes.cli")
    launched = run_cli(workflow, tmp_path / "out", tmp_path / "cache", *accelerate)
    stdout, stderr = launched.communicate(timeout=180)
    assert launched.returncode == 0, stderr
    assert any(e["event"] == "executed" and e["node"] == "train" for e in events_of(stdout))
    Runner(output_dir=tmp_path / "ref", cache_dir=tmp_path / "ref-cache").run(load_workflow(workflow))
    assert_close_loras(lora_tensors(tmp_path / "out" / "trained.safetensors"),
                       lora_tensors(tmp_path / "ref" / "trained.safetensors"), atol=1e-5)


@pytest.mark.parametrize("fmt", ["kohya", "diffusers"])
@pytest.mark.parametrize("base_name", ["tiny", "tiny_sdxl"])
def test_diffusers_loads_a_trained_lora_saved_in_either_format(request, tmp_path, fmt, base_name):
    from safetensors.torch import save_file
    from test_diffusers_parity import assert_same_weights, diffusers_pipeline

    from lora_nodes.lora.recipe import AppliedLoRA, ModelRecipe
    from lora_nodes.lora.save import lora_file

    base = request.getfixturevalue(base_name)
    dataset = read_folder(STARS)
    result = train_lora(base, dataset, TrainConfig(steps=2, rank=4, alpha=2, learning_rate=5e-2, seed=1,
                                                   train_text_encoder=True, save_every_n_steps=0))
    lora = result.network.to_lora(base, "trained", {})
    # every module learned, but SDXL's first text encoder's last layer: SDXL reads its penultimate output
    unlearned = {k.split("_layers_")[0] + "_layers_" + k.split("_layers_")[1].split("_")[0]
                 for k, m in lora.modules.items() if not m.up.abs().max() > 0}
    assert len(unlearned) <= 1 and all(k.startswith("lora_te1_") for k in unlearned), unlearned
    written = lora_file(lora, fmt, base)
    path = tmp_path / f"trained_{fmt}.safetensors"
    save_file(written.tensors, str(path), written.metadata)
    pipe = diffusers_pipeline(base)
    pipe.load_lora_weights(str(path))
    pipe.fuse_lora(lora_scale=1.0)
    pipe.unload_lora_weights()
    ModelRecipe(base, (AppliedLoRA(lora, 1.0, 1.0),)).materialize()
    try:
        for name in ("unet", "text_encoder", "text_encoder_2"):
            if name in base.components:
                assert_same_weights(base.components[name], getattr(pipe, name))
    finally:
        ModelRecipe(base).materialize()


def test_two_processes_average_gradients_like_accumulating_their_two_batches(tmp_path):
    """Data parallel on the CPU (torchrun, gloo): 2 processes x batch 1 make the same steps as 1 process
    accumulating 2 batches of 1, because process r trains batch number 2 * step + r."""
    parallel = tiny_workflow(tmp_path / "parallel", batch_size=1)
    torchrun = (sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "lora_nodes.cli")
    launched = run_cli(parallel, tmp_path / "out", tmp_path / "cache", *torchrun)
    stdout, stderr = launched.communicate(timeout=180)
    assert launched.returncode == 0, stderr
    infos = [e for e in events_of(stdout) if e["event"] == "info" and e["node"] == "train" and "processes" in e]
    assert infos and infos[0]["processes"] == 2
    single = tiny_workflow(tmp_path / "single", batch_size=1, extra="gradient_accumulation: 2")
    Runner(output_dir=tmp_path / "ref", cache_dir=tmp_path / "ref-cache").run(load_workflow(single))
    assert_close_loras(lora_tensors(tmp_path / "out" / "trained.safetensors"),
                       lora_tensors(tmp_path / "ref" / "trained.safetensors"), atol=1e-5)


def test_the_dataset_key_is_its_contents_not_its_timestamps(tmp_path):
    import shutil
    import time

    data = tmp_path / "data"
    shutil.copytree(STARS, data)
    workflow = write_workflow(tmp_path, f"""
nodes:
  base:  {{type: LoadBase, inputs: {{source: "builtin:tiny", device: cpu}}}}
  data:  {{type: LoadDataset, inputs: {{path: {data}}}}}
  train: {{type: TrainLoRA, inputs: {{model: [base, model], dataset: [data, dataset], steps: 1, rank: 2}}}}
  save:  {{type: SaveLoRA, inputs: {{lora: [train, lora], path: t.safetensors, overwrite: true}}}}
""")

    def trained(cache: Path) -> bool:
        events = Collector()
        Runner(output_dir=tmp_path / "out", cache_dir=cache, emit=events).run(load_workflow(workflow))
        return any(e["node"] == "train" for e in events.of("executing"))

    assert trained(tmp_path / "cache")
    caption = data / "star_01.txt"
    os.utime(caption, (time.time() + 60, time.time() + 60))  # touched, same contents
    assert not trained(tmp_path / "cache")
    caption.write_text("a violet star on a white background")
    assert trained(tmp_path / "cache")


def test_starting_over_clears_an_old_runs_checkpoints(tmp_path, tiny):
    from lora_nodes.training.checkpoint import checkpoints

    dataset = read_folder(STARS)
    config = TrainConfig(steps=7, rank=2, save_every_n_steps=3)
    train_lora(tiny, dataset, config, checkpoint_dir=tmp_path)
    assert [s for s, _ in checkpoints(tmp_path)] == [3, 6]
    train_lora(tiny, dataset, TrainConfig(steps=4, rank=2, save_every_n_steps=3, resume=False),
               checkpoint_dir=tmp_path)
    assert [s for s, _ in checkpoints(tmp_path)] == [3]


def test_the_progress_bar_shows_step_loss_and_time_left():
    import io

    from lora_nodes.cli_display import ProgressDisplay

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    stream = Terminal()
    display = ProgressDisplay(stream)
    display({"event": "executing", "node": "train", "type": "TrainLoRA"})
    display({"event": "progress", "node": "train", "value": 3, "max": 300, "loss": 0.1234})
    shown = stream.getvalue()
    assert "3/300" in shown and "loss 0.1234" in shown and "<" in shown  # tqdm's elapsed<remaining


def test_a_diverging_run_stops_with_advice(tiny):
    with pytest.raises(Exception, match="training diverged; lower learning_rate"):
        train_lora(tiny, read_folder(STARS), TrainConfig(steps=5, rank=2, learning_rate=1e30, max_grad_norm=0,
                                                          save_every_n_steps=0))


def test_training_works_whatever_the_callers_grad_mode(tiny):
    with torch.no_grad():
        result = train_lora(tiny, read_folder(STARS), TrainConfig(steps=1, rank=2, learning_rate=1e-2,
                                                                   save_every_n_steps=0))
    assert any(layer.up.abs().sum() > 0 for layer in result.network.layers.values())


def test_buckets_fit_the_models_unet(tmp_path):
    """builtin:shapes needs sides in multiples of 16: a wide image lands in a 16-multiple bucket."""
    from PIL import Image

    from lora_nodes.models.loading import load_base

    Image.new("RGB", (128, 56), "purple").save(tmp_path / "wide.png")
    Image.new("RGB", (64, 64), "purple").save(tmp_path / "square.png")
    base = load_base("builtin:shapes", device="cpu")
    dataset = read_folder(tmp_path, crop="buckets", default_caption="purple")
    result = train_lora(base, dataset, TrainConfig(steps=2, rank=2, save_every_n_steps=0))
    sizes = {tuple(e.pixels.shape[1:]) for e in dataset.examples(64, 16)}
    assert (64, 64) in sizes and all(h % 16 == 0 and w % 16 == 0 for h, w in sizes) and len(sizes) == 2
    assert len(result.losses) == 2


def test_training_encodes_captions_as_sampling_does(tiny):
    from lora_nodes.models.pipeline import pipeline_for
    from lora_nodes.training.trainer import TrainCallbacks, Trainer

    trainer = Trainer(tiny, read_folder(STARS), TrainConfig(steps=1), None, TrainCallbacks())
    captions = ["a purple star on a white background", "a red circle"]
    with torch.no_grad():
        ours = trainer._encode_text(captions)[0]
        sampling = pipeline_for(tiny).encode_prompt(captions, tiny.device, 1, False)[0]
    assert torch.equal(ours, sampling)


def test_a_base_loaded_in_inference_mode_is_refused_with_a_reason():
    from lora_nodes.errors import NodeError
    from lora_nodes.models.loading import load_base

    with torch.inference_mode():
        base = load_base("builtin:tiny", device="cpu")
    with pytest.raises(NodeError, match="inference_mode"):
        train_lora(base, read_folder(STARS), TrainConfig(steps=1, rank=2, save_every_n_steps=0))
