"""TrainLoRA on a CUDA GPU: mixed precision and gradient checkpointing (skipped without a GPU)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import WORKFLOWS, weights

from lora_nodes.datasets.folder import read_folder
from lora_nodes.training.config import TrainConfig
from lora_nodes.training.trainer import train_lora

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
STARS = WORKFLOWS / "datasets" / "purple_star"


@pytest.fixture(scope="module")
def shapes_half():
    from lora_nodes.models.loading import load_base

    return load_base("builtin:shapes", dtype="float16", device="cuda")


@pytest.mark.parametrize("precision", ["fp16", "bf16", "no"])
def test_mixed_precision_trains_and_keeps_the_base(shapes_half, precision):
    before = weights(shapes_half.unet)
    config = TrainConfig(steps=40, batch_size=8, learning_rate=1e-3, min_snr_gamma=5, mixed_precision=precision,
                         gradient_checkpointing=True, train_text_encoder=True, save_every_n_steps=0)
    result = train_lora(shapes_half, read_folder(STARS), config)
    assert all(np.isfinite(result.losses))
    assert np.mean(result.losses[-10:]) < np.mean(result.losses[:10])
    assert all(p.dtype == torch.float32 and p.device.type == "cuda" for p in result.network.parameters())
    after = weights(shapes_half.unet)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_cuda_resume_matches_an_uninterrupted_run(shapes_half, tmp_path):
    dataset = read_folder(STARS)
    config = TrainConfig(steps=20, batch_size=4, learning_rate=1e-3, mixed_precision="bf16", save_every_n_steps=10)
    whole = train_lora(shapes_half, dataset, config).network.state_dict()
    train_lora(shapes_half, dataset, config, checkpoint_dir=tmp_path)  # leaves its step-10 checkpoint
    resumed = train_lora(shapes_half, dataset, config, checkpoint_dir=tmp_path).network.state_dict()
    worst = max((whole[k] - resumed[k]).abs().max().item() for k in whole)
    assert worst < 1e-3, worst
