"""TrainLoRA on a flow-matching transformer (builtin:tiny-flux): it teaches, by the flow-matching
objective as diffusers and kohya define it, and what it saves applies in diffusers as in our nodes."""

from __future__ import annotations

import math
import os

import pytest
import torch
from conftest import write_workflow
from PIL import Image

from lora_nodes.datasets.folder import read_folder
from lora_nodes.engine.events import Collector
from lora_nodes.engine.scheduler import Runner
from lora_nodes.graph import load_workflow
from lora_nodes.lora.recipe import AppliedLoRA, ModelRecipe
from lora_nodes.training.config import TrainConfig
from lora_nodes.training.network import select_targets
from lora_nodes.training.trainer import TrainCallbacks, Trainer, train_lora

GREEN = (30, 200, 60)
CAPTION = "a green picture"


@pytest.fixture(scope="module")
def green(tmp_path_factory):
    """A dataset folder: four solid green 32x32 images captioned 'a green picture'."""
    folder = tmp_path_factory.mktemp("green")
    for number in range(4):
        Image.new("RGB", (32, 32), GREEN).save(folder / f"green_{number}.png")
        (folder / f"green_{number}.txt").write_text(CAPTION + "\n")
    return folder


@pytest.fixture(scope="module")
def trained(flux, green):
    """A rank-8 LoRA on every transformer linear, 100 steps on the green pictures."""
    config = TrainConfig(steps=100, rank=8, alpha=8, target="all", learning_rate=1e-2, batch_size=4,
                         save_every_n_steps=0)
    return train_lora(flux, read_folder(green), config)


def pack(latents: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] -> [B, H/2 * W/2, 4C], channel c*4 + dy*2 + dx (docs/flux-notes.md section 4)."""
    b, c, h, w = latents.shape
    return latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), 4 * c)


def data_latents(base, colour=GREEN, size: int = 32) -> torch.Tensor:
    """A solid image of ``colour`` as the transformer sees it: ``(z - shift) * scale``, packed."""
    vae = base.components["vae"]
    pixels = (torch.tensor(colour, dtype=torch.float32) / 255 * 2 - 1).view(1, 3, 1, 1).expand(1, 3, size, size)
    with torch.no_grad():
        z = vae.encode(pixels).latent_dist.mean
    return pack((z - vae.config.shift_factor) * vae.config.scaling_factor)


def drawn_latents(base, lora, strength: float, seeds: int = 4) -> torch.Tensor:
    """What the transformer draws for the caption (the latents before the VAE), one per seed."""
    from lora_nodes.nodes.sample import make_pipeline

    patched = ModelRecipe(base, (AppliedLoRA(lora, strength, strength),)).materialize()
    pipe = make_pipeline(patched, "euler")
    with torch.inference_mode():
        return pipe(CAPTION, height=32, width=32, num_inference_steps=8, guidance_scale=3.5, max_sequence_length=32,
                    num_images_per_prompt=seeds, generator=torch.Generator().manual_seed(0),
                    output_type="latent").images


# --------------------------------------------------------------------------- it teaches


def test_a_lora_trained_on_flux_moves_the_picture_toward_its_data(flux, trained):
    """Samples move toward the training images, the more the higher the strength.

    Compared as the transformer draws them (before the VAE): the random tiny VAE decodes nearly
    every latent to the same grey noise, so its pixels cannot show it (a drawing tiny Flux could).
    Both the whole picture and its mean colour (per latent channel) move toward the data's.
    """
    lora = trained.network.to_lora(flux, "green", {})
    target = data_latents(flux)
    drawn = {s: drawn_latents(flux, lora, s) for s in (0.0, 0.5, 1.0)}
    distance = {s: float((d - target).pow(2).mean()) for s, d in drawn.items()}
    colour = {s: float((d.mean(dim=(0, 1)) - target.mean(dim=(0, 1))).norm()) for s, d in drawn.items()}
    assert distance[1.0] < 0.7 * distance[0.0] and distance[0.0] > distance[0.5] > distance[1.0], distance
    assert colour[1.0] < 0.7 * colour[0.0] and colour[0.0] > colour[0.5] > colour[1.0], colour
    assert sum(trained.losses[-10:]) < 0.8 * sum(trained.losses[:10])


def test_training_leaves_the_flux_base_bitwise_unchanged(flux, green):
    from conftest import weights

    before = {name: weights(flux.components[name]) for name in ("transformer", "text_encoder", "text_encoder_2", "vae")}
    result = train_lora(flux, read_folder(green), TrainConfig(steps=2, rank=2, learning_rate=1e-2, batch_size=2,
                                                              train_text_encoder=True, save_every_n_steps=0))
    for name, state in before.items():
        after = weights(flux.components[name])
        assert all(torch.equal(state[k], after[k]) for k in state), name
    assert not flux.denoiser.training and not getattr(flux.denoiser, "_forward_hooks", None)
    assert any(layer.up.abs().sum() > 0 for layer in result.network.layers.values())


# --------------------------------------------------------------------------- the objective


def test_the_loss_is_the_flow_matching_objective_on_packed_latents(flux, green):
    """x_t = (1 - s) x0 + s noise, target noise - x0, the transformer at timestep s with the guidance
    vector and FluxPipeline's position ids, computed here by the definitions (docs/flux-notes.md 4)."""
    trainer = Trainer(flux, read_folder(green), TrainConfig(steps=1, guidance=1.0), None, TrainCallbacks())
    latents = torch.randn(2, 16, 16, 16, generator=torch.Generator().manual_seed(1))
    noise = torch.randn(2, 16, 16, 16, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        embeds, pooled = trainer._encode_text([CAPTION, "a red circle"])
        ours = trainer.flow.loss(latents, noise, torch.Generator().manual_seed(3), (embeds, pooled))
        levels = torch.rand(2, generator=torch.Generator().manual_seed(3))  # uniform: the default
        s = levels.view(-1, 1, 1, 1)
        ids = torch.stack(torch.meshgrid(torch.arange(8.0), torch.arange(8.0), indexing="ij"), -1).reshape(64, 2)
        prediction = flux.denoiser(hidden_states=pack((1 - s) * latents + s * noise), timestep=levels,
                                   guidance=torch.ones(2), pooled_projections=pooled, encoder_hidden_states=embeds,
                                   txt_ids=torch.zeros(embeds.shape[1], 3),
                                   img_ids=torch.cat([torch.zeros(64, 1), ids], 1)).sample
        expected = (prediction - pack(noise - latents)).pow(2).mean(dim=(1, 2))
    assert torch.allclose(ours, expected, rtol=1e-5, atol=1e-7)


def test_training_encodes_captions_as_sampling_does(flux, green):
    from lora_nodes.models.pipeline import pipeline_for

    trainer = Trainer(flux, read_folder(green), TrainConfig(steps=1), None, TrainCallbacks())
    with torch.no_grad():
        embeds, pooled = trainer._encode_text([CAPTION])
        expected, expected_pooled, _ = pipeline_for(flux).encode_prompt([CAPTION], max_sequence_length=32)
    assert embeds.shape == (1, 32, 32) and torch.equal(embeds, expected) and torch.equal(pooled, expected_pooled)


def test_the_guidance_vector_reaches_a_guidance_distilled_transformer(flux, green):
    seen = []
    handle = flux.denoiser.register_forward_pre_hook(lambda _m, _a, kw: seen.append(kw["guidance"]), with_kwargs=True)
    try:
        train_lora(flux, read_folder(green), TrainConfig(steps=1, rank=2, batch_size=2, guidance=2.5,
                                                        save_every_n_steps=0))
    finally:
        handle.remove()
    assert len(seen) == 1 and torch.equal(seen[0], torch.full((2,), 2.5))


@pytest.mark.parametrize(("sampling", "median"), [
    ("uniform", 0.5),
    ("logit_normal", 0.5),  # sigmoid(N(0, 1))
    ("shift", 0.75),  # 3 s / (1 + 2 s) at s = 0.5, the schedule's shift 3
    ("resolution_shift", math.exp(0.5) / (math.exp(0.5) + 1)),  # mu = base_shift 0.5 at 256 tokens
])
def test_timestep_sampling_draws_noise_levels_as_defined(flux, sampling, median):
    from lora_nodes.training.flow import noise_levels

    schedule = flux.components["scheduler"].config
    levels = noise_levels(sampling, 20000, torch.Generator().manual_seed(0), schedule, tokens=256)
    assert 0 <= float(levels.min()) and float(levels.max()) <= 1
    assert abs(float(levels.median()) - median) < 0.01
    if sampling == "uniform":
        assert abs(float((levels < 0.25).float().mean()) - 0.25) < 0.01
    if sampling == "logit_normal":  # the logit is standard normal
        assert abs(float(torch.logit(levels).std()) - 1) < 0.02


def test_every_option_trains_on_flux(flux, green):
    """Every timestep sampling, the text encoder, flips, accumulation, noise offset, SGD, checkpointing,
    no caches, together."""
    dataset = read_folder(green, flip=True)
    for sampling in ("logit_normal", "shift", "resolution_shift"):
        config = TrainConfig(steps=2, batch_size=2, gradient_accumulation=2, rank=2, alpha=1, target="attention",
                             train_text_encoder=True, text_encoder_lr=5e-4, optimizer="sgd", noise_offset=0.05,
                             gradient_checkpointing=True, cache_latents=False, cache_text_embeddings=False,
                             timestep_sampling=sampling, save_every_n_steps=0)
        result = train_lora(flux, dataset, config)
        assert len(result.losses) == 2 and all(math.isfinite(v) for v in result.losses)
        assert not flux.denoiser.is_gradient_checkpointing
    lora = result.network.to_lora(flux, "all", {})
    assert {k.split(".")[0] for k in lora.modules} == {"transformer", "text_encoder"}  # T5 is not trained


def test_caching_latents_and_text_does_not_change_the_lora(flux, green):
    dataset = read_folder(green)
    runs = [train_lora(flux, dataset, TrainConfig(steps=3, batch_size=2, rank=2, learning_rate=1e-2, seed=3,
                                                  cache_latents=c, cache_text_embeddings=c, save_every_n_steps=0))
            for c in (True, False)]
    first, second = (r.network.state_dict() for r in runs)
    assert all(torch.allclose(first[k], second[k], atol=1e-6) for k in first)


# --------------------------------------------------------------------------- targets and names


@pytest.mark.parametrize(("target", "kinds"), [
    ("attention", {"to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"}),
    ("attention_mlp", {"to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
                       "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2", "proj_mlp",
                       "proj_out"}),
])
def test_targets_on_a_flux_transformer(flux, target, kinds):
    import re

    chosen = select_targets(flux, target, False)
    found = {re.sub(r"^transformer\.(single_)?transformer_blocks\.\d+\.(attn\.)?", "", n) for n in chosen}
    assert found == kinds
    assert all(n.startswith("transformer.") for n in chosen)
    every = select_targets(flux, "all", False)
    assert set(every) == {n for n in flux.lora_targets if n.startswith("transformer.")}


def test_a_trained_flux_lora_names_its_modules_by_target(flux, trained):
    """kohya names q/k/v of a block by their one fused module: the LoRA keeps one module per target,
    by its diffusers name (SaveLoRA fuses them for a kohya file)."""
    lora = trained.network.to_lora(flux, "green", {})
    assert set(lora.modules) == set(trained.network.targets)
    assert "transformer.transformer_blocks.0.attn.to_q" in lora.modules
    assert lora.format == "diffusers"


def test_initial_lora_is_continued(flux, green, trained):
    lora = trained.network.to_lora(flux, "first", {})
    frozen = train_lora(flux, read_folder(green), TrainConfig(steps=1, rank=8, alpha=8, target="all",
                                                              learning_rate=0.0, save_every_n_steps=0),
                        initial_lora=lora)
    again = frozen.network.to_lora(flux, "again", {})
    assert all(torch.equal(again.modules[k].up, lora.modules[k].up) for k in lora.modules)


# --------------------------------------------------------------------------- saved, it applies in diffusers


def test_a_saved_trained_flux_lora_applies_identically_in_diffusers(flux, green, tmp_path):
    """The diffusers-layout file through FluxPipeline.load_lora_weights + fuse_lora gives our weights
    (transformer and CLIP, relative error < 1e-5) and our Sample's image; the kohya-layout file
    (fused q/k/v) read back by our loader gives the same weights too."""
    from diffusers import FluxPipeline
    from safetensors.torch import save_file
    from test_diffusers_parity import assert_same_weights

    from lora_nodes.engine.context import NodeContext
    from lora_nodes.lora.files import read_lora
    from lora_nodes.lora.save import lora_file
    from lora_nodes.models.loading import load_base
    from lora_nodes.nodes.sample import sample

    result = train_lora(flux, read_folder(green), TrainConfig(steps=2, rank=4, alpha=2, target="all",
                                                              learning_rate=5e-2, train_text_encoder=True, seed=1,
                                                              save_every_n_steps=0))
    lora = result.network.to_lora(flux, "trained", {})
    assert all(m.up.abs().max() > 0 for m in lora.modules.values())
    paths = {}
    for fmt in ("diffusers", "kohya"):
        written = lora_file(lora, fmt, flux)
        paths[fmt] = tmp_path / f"trained_{fmt}.safetensors"
        save_file(written.tensors, str(paths[fmt]), written.metadata)
    theirs = load_base("builtin:tiny-flux", dtype="float32", device="cpu")  # a second copy, same weights
    pipe = FluxPipeline(**{k: theirs.components[k] for k in flux.family.pipeline_parts})
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(str(paths["diffusers"]))
    pipe.fuse_lora(components=["transformer", "text_encoder"], lora_scale=1.0)  # Flux's default: transformer only
    pipe.unload_lora_weights()
    ModelRecipe(flux, (AppliedLoRA(lora, 1.0, 1.0),)).materialize()
    for name in ("transformer", "text_encoder", "text_encoder_2"):
        assert_same_weights(flux.components[name], pipe.components[name])
    ctx = NodeContext("s", "Sample", None, None, Collector())
    ours = sample.run(ctx, ModelRecipe(flux, (AppliedLoRA(lora, 1.0, 1.0),)), prompt=CAPTION, negative_prompt="",
                      seed=5, steps=4, cfg=1.0, sampler="euler", width=0, height=0, batch_size=1, guidance=3.5)[0]
    with torch.inference_mode():
        diffusers_image = pipe(CAPTION, height=32, width=32, num_inference_steps=4, guidance_scale=3.5,
                               max_sequence_length=32, generator=torch.Generator().manual_seed(5),
                               output_type="pt").images.permute(0, 2, 3, 1)
    assert torch.allclose(ours, diffusers_image, atol=1e-5)
    kohya = read_lora(paths["kohya"])
    assert any(key.endswith("_img_attn_qkv") for key in kohya.modules)  # q/k/v saved fused, as kohya does
    ModelRecipe(flux, (AppliedLoRA(kohya, 1.0, 1.0),)).materialize()
    for name in ("transformer", "text_encoder"):
        assert_same_weights(flux.components[name], pipe.components[name])


# --------------------------------------------------------------------------- resumes, never retrains


def test_a_stopped_flux_training_resumes_from_its_checkpoint_and_ends_with_the_same_lora(flux, green, tmp_path):
    """Checkpoints every 3 steps; a run started again over them continues from step 3 (the first run,
    uninterrupted, left that checkpoint) and ends where the uninterrupted run ended."""
    config = TrainConfig(steps=6, rank=2, batch_size=2, learning_rate=1e-2, save_every_n_steps=3)
    first = train_lora(flux, read_folder(green), config, checkpoint_dir=tmp_path)
    infos = []
    again = train_lora(flux, read_folder(green), config, checkpoint_dir=tmp_path,
                       callbacks=TrainCallbacks(info=infos.append))
    assert again.resumed_from == 3 and any("resumed from the checkpoint at step 3" in m for m in infos)
    assert again.losses == pytest.approx(first.losses, abs=1e-6)
    a, b = first.network.state_dict(), again.network.state_dict()
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_a_new_runner_takes_the_trained_flux_lora_from_the_disk_cache(tmp_path, green):
    """The first run trains (and draws its preview with the LoRA as it is), the second loads it."""
    workflow = write_workflow(tmp_path, f"""
nodes:
  base:  {{type: LoadBase, inputs: {{source: "builtin:tiny-flux", device: cpu}}}}
  data:  {{type: LoadDataset, inputs: {{path: {green}}}}}
  train: {{type: TrainLoRA, inputs: {{model: [base, model], dataset: [data, dataset], steps: 3, rank: 2,
          batch_size: 2, save_every_n_steps: 2, sample_every_n_steps: 3, sample_prompts: {CAPTION}}}}}
  save:  {{type: SaveLoRA, inputs: {{lora: [train, lora], model: [base, model], path: trained.safetensors,
          overwrite: true}}}}
""")
    runs, files = [], []
    for _ in range(2):
        events = Collector()
        result = Runner(output_dir=tmp_path / "out", cache_dir=tmp_path / "cache", emit=events).run(
            load_workflow(workflow))
        runs.append(events)
        files.append(result.files)
    assert any(e["node"] == "train" for e in runs[0].of("executing"))
    assert [f.rsplit("/", 1)[1] for f in files[0] if "previews" in f] == ["step000003_00.png"]
    cached = [e for e in runs[1].of("cached") if e["node"] == "train"]
    assert cached and cached[0]["cache"] == "disk"
    assert not any(e["node"] == "train" for e in runs[1].of("executing"))


def test_two_processes_train_flux_like_one_accumulating_their_two_batches(tmp_path, green):
    """Data parallel on the CPU (torchrun, gloo) on Flux: 2 processes x batch 1 make the same LoRA as
    1 process accumulating 2 batches of 1 (process r trains batch number 2 * step + r)."""
    import subprocess
    import sys

    from safetensors.torch import load_file

    def workflow(folder, extra: str = ""):
        folder.mkdir()
        return write_workflow(folder, f"""
nodes:
  base:  {{type: LoadBase, inputs: {{source: "builtin:tiny-flux", device: cpu}}}}
  data:  {{type: LoadDataset, inputs: {{path: {green}}}}}
  train: {{type: TrainLoRA, inputs: {{model: [base, model], dataset: [data, dataset], steps: 2, batch_size: 1,
          rank: 2, learning_rate: 0.01, {extra}}}}}
  save:  {{type: SaveLoRA, inputs: {{lora: [train, lora], model: [base, model], path: trained.safetensors}}}}
""")

    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "lora_nodes.cli"]
    launched = subprocess.run(
        [*torchrun, "run", str(workflow(tmp_path / "parallel")), "--output-dir", str(tmp_path / "out"),
         "--cache-dir", str(tmp_path / "cache")],
        check=False, capture_output=True, text=True, timeout=180, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert launched.returncode == 0, launched.stderr[-3000:]
    Runner(output_dir=tmp_path / "ref", cache_dir=tmp_path / "ref-cache").run(
        load_workflow(workflow(tmp_path / "single", "gradient_accumulation: 2")))
    parallel, single = (load_file(str(tmp_path / d / "trained.safetensors")) for d in ("out", "ref"))
    assert parallel.keys() == single.keys() and parallel
    assert all(torch.allclose(parallel[k], single[k], atol=1e-5) for k in parallel)
