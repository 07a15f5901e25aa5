"""Shared fixtures: the built-in tiny base and LoRA files made from it (nothing downloaded)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")

REPO = Path(__file__).resolve().parent.parent
WORKFLOWS = REPO / "workflows"
EXAMPLE_LORA = WORKFLOWS / "loras" / "tiny_style.safetensors"


# The bases the whole session shares (built once: a few seconds each). Tests patch them through
# recipes; _shared_bases_unpatched puts them back after every test.
_SHARED_BASES: list = []


@pytest.fixture(scope="session")
def quickstart_run(tmp_path_factory):
    """(output folder, files written) of one run of the quickstart, shared by the tests that look at it."""
    from lora_nodes.engine.scheduler import Runner
    from lora_nodes.graph import load_workflow

    out = tmp_path_factory.mktemp("quickstart_run")
    return out, Runner(output_dir=out).run(load_workflow(WORKFLOWS / "quickstart.yaml")).files


@pytest.fixture(scope="session")
def tiny():
    """builtin:tiny on the CPU in float32, shared by the session; unpatched whenever a test starts."""
    from lora_nodes.models.loading import load_base

    base = load_base("builtin:tiny", dtype="float32", device="cpu")
    _SHARED_BASES.append(base)
    return base


@pytest.fixture(scope="session")
def tiny_sdxl():
    """builtin:tiny-sdxl on the CPU in float32, shared like ``tiny``."""
    from lora_nodes.models.loading import load_base

    base = load_base("builtin:tiny-sdxl", dtype="float32", device="cpu")
    _SHARED_BASES.append(base)
    return base


@pytest.fixture(scope="session")
def flux():
    """builtin:tiny-flux on the CPU in float32 (2 double and 2 single blocks), shared like ``tiny``."""
    from lora_nodes.models.loading import load_base

    base = load_base("builtin:tiny-flux", dtype="float32", device="cpu")
    _SHARED_BASES.append(base)
    return base


@pytest.fixture(autouse=True)
def _shared_bases_unpatched():
    """After every test, the shared bases get their own weights back (bitwise, at no cost).

    A LoRA one test applied would otherwise still be in the weights the next test sees, and
    results would depend on the order the tests run in.
    """
    yield
    if _SHARED_BASES:
        from lora_nodes.lora.recipe import ModelRecipe

        for base in _SHARED_BASES:
            ModelRecipe(base).materialize()


@pytest.fixture
def write_lora(tmp_path, tiny):
    """Write a synthetic LoRA (for builtin:tiny unless base= is given) and return its path."""
    from lora_nodes.lora.synthetic import synthetic_lora

    def write(name: str = "lora", fmt: str = "kohya", metadata: dict | None = None, base=None, **kwargs) -> Path:
        tensors = synthetic_lora(base or tiny, fmt=fmt, **kwargs)
        path = tmp_path / f"{name}.safetensors"
        save_file(tensors, str(path), metadata=metadata)
        return path

    return write


def write_workflow(folder: Path, text: str, name: str = "workflow.yaml") -> Path:
    path = folder / name
    path.write_text(text)
    return path


def weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    """One disk cache for the session: a workflow that trains does so once, whichever test runs it first."""
    return tmp_path_factory.mktemp("lora-nodes-cache")


@pytest.fixture(scope="session")
def trained_star(tmp_path_factory, cache_dir):
    """workflows/train_lora.yaml run once: a rank-8 purple-star LoRA on builtin:shapes, and its events."""
    from lora_nodes.engine.events import Collector
    from lora_nodes.engine.scheduler import Runner
    from lora_nodes.graph import load_workflow

    events = Collector()
    runner = Runner(output_dir=tmp_path_factory.mktemp("train-lora-out"), cache_dir=cache_dir, emit=events)
    result = runner.run(load_workflow(WORKFLOWS / "train_lora.yaml"))
    return result, events
