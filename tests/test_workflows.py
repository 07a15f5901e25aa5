"""Every example workflow in workflows/ runs on a fresh checkout, as users will first run them."""

from pathlib import Path

import pytest
from conftest import WORKFLOWS

from lora_nodes.engine.events import Collector
from lora_nodes.engine.scheduler import Runner
from lora_nodes.graph import load_workflow
from lora_nodes.graph.overrides import parse_sweep, sweep_variants

EXAMPLES = sorted(WORKFLOWS.glob("*.yaml")) + sorted(WORKFLOWS.glob("*.json"))


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_example_workflow_runs(path, tmp_path, cache_dir):
    events = Collector()
    result = Runner(output_dir=tmp_path, cache_dir=cache_dir, emit=events).run(load_workflow(path))
    assert result.files and all(Path(f).exists() for f in result.files)
    assert not events.of("warning"), events.of("warning")


def strength_images(files: list[str]) -> tuple:
    """The images a workflow saved as strength_0, strength_0.5 and strength_1, as float arrays."""
    import numpy as np
    from PIL import Image

    by_name = {f.rsplit("/", 1)[1]: np.asarray(Image.open(f), dtype=np.float32) for f in files if f.endswith(".png")}
    return tuple(by_name[f"strength_{s}_00001.png"] for s in ("0", "0.5", "1"))


@pytest.mark.parametrize("name", ["quickstart.yaml", "flux.yaml"])
def test_example_images_differ_by_strength(tmp_path, name):
    import numpy as np

    result = Runner(output_dir=tmp_path).run(load_workflow(WORKFLOWS / name))
    plain, half, full = strength_images(result.files)
    assert 0 < np.abs(half - plain).mean() < np.abs(full - plain).mean()


def test_the_flux_training_example_saves_both_layouts_and_its_lora_changes_the_picture(tmp_path, cache_dir):
    import numpy as np
    from safetensors import safe_open

    result = Runner(output_dir=tmp_path, cache_dir=cache_dir).run(load_workflow(WORKFLOWS / "flux_train.yaml"))
    saved = {Path(f).name: f for f in result.files if f.endswith(".safetensors")}
    with safe_open(saved["flux_purple_star.safetensors"], "pt") as kohya:
        kohya_keys = set(kohya.keys())
    with safe_open(saved["flux_purple_star_diffusers.safetensors"], "pt") as diffusers_file:
        diffusers_keys = set(diffusers_file.keys())
    assert "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight" in kohya_keys  # fused q/k/v, as kohya writes
    assert "transformer.transformer_blocks.0.attn.to_q.lora_A.weight" in diffusers_keys
    plain, half, full = strength_images(result.files)
    assert 0 < np.abs(half - plain).mean() < np.abs(full - plain).mean()


def test_strength_sweep_example_with_its_documented_sweep(tmp_path):
    variants = sweep_variants([parse_sweep("styled.strength_model=0,0.5,1")])
    results = Runner(output_dir=tmp_path).run_variants(load_workflow(WORKFLOWS / "strength_sweep.yaml"), variants)
    assert len({f for r in results for f in r.files}) == 3
