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


def test_quickstart_images_differ_by_strength(tmp_path):
    import numpy as np
    from PIL import Image

    result = Runner(output_dir=tmp_path).run(load_workflow(WORKFLOWS / "quickstart.yaml"))
    by_name = {f.rsplit("/", 1)[1]: np.asarray(Image.open(f), dtype=np.float32) for f in result.files}
    plain, half, full = (by_name[f"strength_{s}_00001.png"] for s in ("0", "0.5", "1"))
    assert 0 < np.abs(half - plain).mean() < np.abs(full - plain).mean()


def test_strength_sweep_example_with_its_documented_sweep(tmp_path):
    variants = sweep_variants([parse_sweep("styled.strength_model=0,0.5,1")])
    results = Runner(output_dir=tmp_path).run_variants(load_workflow(WORKFLOWS / "strength_sweep.yaml"), variants)
    assert len({f for r in results for f in r.files}) == 3
