"""Memory: Sample and TrainLoRA refuse work that cannot fit, before allocating it; NaN images are reported."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO, WORKFLOWS, write_workflow

from lora_nodes.cli import main
from lora_nodes.engine.context import NodeContext
from lora_nodes.engine.events import Collector
from lora_nodes.engine.scheduler import RunFailed, Runner
from lora_nodes.errors import NodeError
from lora_nodes.graph import load_workflow
from lora_nodes.lora.recipe import ModelRecipe
from lora_nodes.models import memory
from lora_nodes.models.memory import GiB, MiB, check_sample, free_memory, sample_estimate
from lora_nodes.nodes.sample import sample

SAMPLE = """
nodes:
  base:   {{type: LoadBase, inputs: {{source: "builtin:tiny", device: cpu, dtype: float32}}}}
  images: {{type: Sample, inputs: {{model: [base, model], prompt: "a red circle", steps: 1,
           width: {size}, height: {size}, batch_size: {batch}}}}}
  save:   {{type: SaveImages, inputs: {{images: [images, images], prefix: big}}}}
"""


def sample_workflow(folder, size: int, batch: int = 1):
    return write_workflow(folder, SAMPLE.format(size=size, batch=batch))


def draw(recipe, events, **overrides):
    ctx = NodeContext("s", "Sample", None, None, events)
    inputs = {"prompt": "a red circle", "negative_prompt": "", "seed": 3, "steps": 2, "cfg": 7.0,
              "sampler": "euler", "width": 32, "height": 32, "batch_size": 2}
    return sample.run(ctx, recipe, **{**inputs, **overrides})[0]


# --------------------------------------------------------------------------- refusing what cannot fit


def test_an_8192_sample_on_tiny_is_refused_at_once_naming_the_node(tmp_path, capsys):
    # batch 8: well over any machine's memory (batch 1 alone is estimated at about 170 GB)
    path = sample_workflow(tmp_path, 8192, batch=8)
    timed: list[tuple[float, dict]] = []
    with pytest.raises(RunFailed) as failure:
        Runner(output_dir=tmp_path / "out", emit=lambda e: timed.append((time.perf_counter(), e))).run(
            load_workflow(path))
    assert failure.value.node == "images" and failure.value.node_type == "Sample"
    started = next(t for t, e in timed if e["event"] == "executing" and e["node"] == "images")
    failed = next(t for t, e in timed if e["event"] == "error")
    assert failed - started < 5  # refused from the configs (sampling this would take hours)
    message = failure.value.message
    assert "8192x8192" in message and "needs about" in message and "GB" in message and "free" in message
    assert "--no-memory-check" in message and "width/height or batch_size" in message
    # the command line: exit 1, the node named
    assert main(["run", str(path), "--output-dir", str(tmp_path / "out")]) == 1
    assert "node 'images' (Sample) failed" in capsys.readouterr().err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_the_estimate_grows_with_area_batch_and_guidance(tiny):
    def unet_and_vae(width, height, batch=1, cfg=7.0):
        return sample_estimate(tiny, width, height, batch, cfg).phases

    small, wide, big = unet_and_vae(128, 128), unet_and_vae(256, 128), unet_and_vae(256, 256)
    for part in ("UNet", "VAE decode"):
        assert small[part] < wide[part] < big[part]
        assert big[part] == pytest.approx(4 * small[part], rel=0.15)  # activations scale with the pixels
        assert unet_and_vae(128, 128, batch=3)[part] == pytest.approx(3 * small[part], rel=0.05)
    # no guidance: half the UNet's batch
    assert unet_and_vae(128, 128, cfg=1.0)["UNet"] == pytest.approx(small["UNet"] / 2, rel=0.05)
    assert sample_estimate(tiny, 8192, 8192, 1, 7.0).total > 50 * GiB


def test_a_normal_sample_is_not_refused(tiny):
    check_sample(tiny, 64, 64, 4, 7.0)
    assert sample_estimate(tiny, 64, 64, 4, 7.0).total < 256 * MiB


def test_little_free_memory_refuses_and_no_memory_check_runs_anyway(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(memory, "free_memory", lambda device: 4 * MiB)
    workflow = load_workflow(sample_workflow(tmp_path, 32))
    with pytest.raises(RunFailed) as failure:
        Runner(output_dir=tmp_path / "refused").run(workflow)
    assert failure.value.node == "images" and "only 4 MB of RAM is free" in failure.value.message
    result = Runner(output_dir=tmp_path / "out", check_memory=False).run(workflow)
    assert result.outputs["images"][0].shape == (1, 32, 32, 3)
    assert main(["run", str(tmp_path / "workflow.yaml"), "--output-dir", str(tmp_path / "cli"),
                 "--no-memory-check"]) == 0
    assert len(list((tmp_path / "cli").glob("big_*.png"))) == 1


def test_free_memory_of_the_cpu_is_known_and_plausible():
    free = free_memory(torch.device("cpu"))
    assert free is not None and 64 * MiB < free < 64 * 1024 * GiB



def test_total_memory_is_the_ram_or_a_containers_limit_below_it(tmp_path):
    physical = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    assert memory.total_memory(torch.device("cpu"), cgroup=tmp_path / "none") == physical
    (tmp_path / "memory.max").write_text("max\n")
    assert memory.total_memory(torch.device("cpu"), cgroup=tmp_path) == physical
    (tmp_path / "memory.max").write_text(f"{GiB}\n")
    assert memory.total_memory(torch.device("cpu"), cgroup=tmp_path) == min(physical, GiB)
    assert memory.total_memory(torch.device("meta")) is None


MEASURE = """
import torch
from lora_nodes.engine.context import NodeContext
from lora_nodes.engine.events import Collector
from lora_nodes.models.loading import load_base
from lora_nodes.lora.recipe import ModelRecipe
from lora_nodes.nodes.sample import sample

def status(key):
    return next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith(key))

base = load_base("builtin:tiny", dtype="float32", device="cpu")
open("/proc/self/clear_refs", "w").write("5")  # the peak so far (loading) forgotten: it starts again here
before = status("VmRSS")
sample.run(NodeContext("s", "Sample", None, None, Collector()), ModelRecipe(base), prompt="a red circle",
           negative_prompt="", seed=0, steps=1, cfg=7.0, sampler="euler", width=128, height=128, batch_size=2)
print(status("VmHWM") - before)
"""


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="measures the peak with Linux's clear_refs")
def test_the_estimate_is_above_the_measured_peak(tiny):
    # a fresh process, the first sample in it: the peak resident memory over the loaded model's
    env = {**os.environ, "OMP_NUM_THREADS": "2"}  # scratch memory grows with threads: measure as calibrated
    peak = int(subprocess.run([sys.executable, "-c", MEASURE], cwd=REPO, capture_output=True, text=True,
                              check=True, env=env).stdout.split()[-1])
    estimate = sample_estimate(tiny, 128, 128, 2, 7.0).total
    assert peak < estimate < 3 * peak


def test_absurd_training_is_refused_before_it_starts(tmp_path, cache_dir):
    path = write_workflow(tmp_path, f"""
nodes:
  base:  {{type: LoadBase, inputs: {{source: "builtin:tiny", device: cpu}}}}
  data:  {{type: LoadDataset, inputs: {{path: {WORKFLOWS / "datasets" / "purple_star"}, resolution: 4096}}}}
  train: {{type: TrainLoRA, inputs: {{model: [base, model], dataset: [data, dataset], steps: 2, batch_size: 16}}}}
  save:  {{type: SaveLoRA, inputs: {{lora: [train, lora], path: never.safetensors}}}}
""")
    timed: list[tuple[float, dict]] = []
    with pytest.raises(RunFailed) as failure:
        Runner(output_dir=tmp_path / "out", cache_dir=cache_dir,
               emit=lambda e: timed.append((time.perf_counter(), e))).run(load_workflow(path))
    started = next(t for t, e in timed if e["event"] == "executing" and e["node"] == "train")
    assert next(t for t, e in timed if e["event"] == "error") - started < 5  # before preparing any image
    assert failure.value.node == "train" and failure.value.node_type == "TrainLoRA"
    message = failure.value.message
    assert "TrainLoRA at 4096x4096" in message and "--no-memory-check" in message
    assert "resolution or batch_size" in message and "gradient_checkpointing" in message


# --------------------------------------------------------------------------- NaN images


@pytest.fixture
def fresh_tiny():
    """A tiny base of its own: these tests hook its modules."""
    from lora_nodes.models.loading import load_base

    return load_base("builtin:tiny", dtype="float32", device="cpu")


def poison(module: torch.nn.Module, index: int, value: float):
    """Make ``module``'s output for batch item ``index`` ``value``, as a broken weight would."""
    def hook(_module, _inputs, output):
        output = output.clone()
        output[index] = value
        return output

    return module.register_forward_hook(hook)


def test_nan_from_denoising_is_reported(fresh_tiny):
    events = Collector()
    # the UNet's batch is [negative x 2, positive x 2] under guidance: item 1 is the second image's
    handle = poison(fresh_tiny.unet.conv_out, 1, float("nan"))
    try:
        images = draw(ModelRecipe(fresh_tiny), events)
    finally:
        handle.remove()
    assert torch.isnan(images[1]).all() and torch.isfinite(images[0]).all()  # handed on as they are
    [warning] = events.of("warning")
    assert warning["node"] == "s" and warning["images"] == 1 and warning["source"] == "latents"
    assert "1 of 2 images" in warning["message"] and "LoRA" in warning["message"]
    assert "float32" in warning["message"]


def test_infinities_from_the_vae_are_reported_though_the_clamp_hides_them(fresh_tiny):
    events = Collector()
    handle = poison(fresh_tiny.components["vae"].decoder.conv_out, 0, float("inf"))
    try:
        images = draw(ModelRecipe(fresh_tiny), events)
    finally:
        handle.remove()
    assert torch.isfinite(images).all()  # diffusers clamped the infinities to white
    [warning] = events.of("warning")
    assert warning["images"] == 1 and warning["source"] == "vae" and "VAE" in warning["message"]
    draw(ModelRecipe(fresh_tiny), events)  # the hooks are gone: a clean batch warns of nothing
    assert len(events.of("warning")) == 1


def test_refused_sample_says_what_is_free(tiny, monkeypatch):
    monkeypatch.setattr(memory, "free_memory", lambda device: 10 * MiB)
    with pytest.raises(NodeError, match=r"Sample at 64x48 \(2 images.*needs about \d+ MB.*only 10 MB of RAM"):
        check_sample(tiny, 64, 48, 2, 7.0)
    check_sample(tiny, 64, 48, 2, 7.0, enabled=False)


# --------------------------------------------------------------------------- sweeps share one set of patched weights


SWEEP = """
nodes:
  base:   {{type: LoadBase, inputs: {{source: "builtin:tiny", device: cpu, dtype: float32}}}}
  style:  {{type: LoadLoRA, inputs: {{path: "{lora}"}}}}
  styled: {{type: ApplyLoRA, inputs: {{model: [base, model], lora: [style, lora], strength_model: 1.0}}}}
  images: {{type: Sample, inputs: {{model: [styled, model], prompt: "a red circle", steps: 1, width: 32, height: 32}}}}
  save:   {{type: SaveImages, inputs: {{images: [images, images], prefix: sweep}}}}
"""


def live_storages_by_shape() -> dict[tuple[int, ...], set[int]]:
    """Every tensor storage Python holds now, by the shape of a tensor on it (its address as the id)."""
    import gc

    gc.collect()
    storages: dict[tuple[int, ...], set[int]] = {}
    for obj in gc.get_objects():  # type(), not isinstance(): some objects warn when asked their __class__
        if issubclass(type(obj), torch.Tensor) and obj.device.type == "cpu" and obj.layout == torch.strided:
            storages.setdefault(tuple(obj.shape), set()).add(obj.untyped_storage().data_ptr())
    return storages


def test_a_strength_sweep_keeps_one_set_of_patched_weights_however_many_variants(tmp_path):
    # what a long sweep would grow by, were each variant to keep weights of its own: storages of the
    # LoRA's target weights' shapes alive after each variant
    from conftest import EXAMPLE_LORA

    from lora_nodes.graph.overrides import parse_sweep, sweep_variants

    workflow = load_workflow(write_workflow(tmp_path, SWEEP.format(lora=EXAMPLE_LORA)))
    ended: list[int] = []
    seen: list[dict[tuple[int, ...], set[int]]] = []

    def at_variant_end(ev: dict) -> None:  # after the first variant and after the last
        if ev["event"] == "run_end":
            ended.append(1)
            if len(ended) in (1, 4):
                seen.append(live_storages_by_shape())

    runner = Runner(output_dir=tmp_path / "out", emit=at_variant_end)
    variants = sweep_variants([parse_sweep("styled.strength_model=0.25,0.5,0.75,1")])
    results = runner.run_variants(workflow, variants)
    recipe = results[0].outputs["styled"][0]
    target_shapes = {tuple(recipe.base.lora_targets[t].weight.shape) for t in recipe.patch_plan()}
    assert len(ended) == 4 and target_shapes
    first, last = seen
    for shape in target_shapes:  # each shape: the base's own weights of it, plus one buffer per target patched
        assert last[shape] == first[shape], shape
    images = [r.outputs["images"][0] for r in results]
    assert all(not torch.equal(images[0], other) for other in images[1:])  # every strength drew its own picture
