"""Originals mapped from their files give their pages back once read, and only those: a tensor in
ordinary memory, or one written in place, is never touched, and values always read back the same."""

import mmap
import sys

import pytest
import torch

from lora_nodes.filepages import private_file_spans, release_read_pages

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="pages are given back on Linux only")

MIB = 2**20


def resident_bytes() -> int:
    from pathlib import Path

    status = Path("/proc/self/status").read_text()
    return int(status.split("VmRSS:")[1].split()[0]) * 1024


@pytest.fixture
def mapped(tmp_path):
    """A 32 MiB float32 tensor in a private mapping of a file, as safetensors maps a base's weights."""
    path = tmp_path / "weights.bin"
    expected = torch.arange(8 * MIB, dtype=torch.float32)
    path.write_bytes(expected.numpy().tobytes())
    with open(path, "r+b") as f:
        mapping = mmap.mmap(f.fileno(), 0, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    tensor = torch.frombuffer(mapping, dtype=torch.float32)
    yield tensor, expected
    del tensor
    mapping.close()


def test_read_pages_of_a_mapped_file_go_back_and_read_the_same(mapped):
    tensor, expected = mapped
    assert torch.equal(tensor, expected)  # read: resident now
    before = resident_bytes()
    released = release_read_pages(tensor, private_file_spans())
    assert released >= 32 * MIB - 2 * mmap.PAGESIZE
    assert before - resident_bytes() > 24 * MIB
    assert torch.equal(tensor, expected)  # faulted in again from the file


def test_written_pages_are_never_given_back(mapped):
    tensor, expected = mapped
    tensor[5 * MIB] = -1.0  # one page of it written in place: the copy-on-write copy holds it
    assert release_read_pages(tensor, private_file_spans()) == 0
    assert tensor[5 * MIB] == -1.0 and torch.equal(tensor[:MIB], expected[:MIB])


def test_ordinary_memory_is_never_given_back():
    tensor = torch.arange(8 * MIB, dtype=torch.float32)
    assert release_read_pages(tensor, private_file_spans()) == 0
    assert torch.equal(tensor, torch.arange(8 * MIB, dtype=torch.float32))


def test_a_base_mapped_from_its_files_restores_bitwise_after_giving_pages_back(tmp_path, write_lora, tiny):
    """A diffusers folder's weights are file mappings: patched, re-patched and restored, every weight is
    its file's again, bit for bit, and the originals' pages went back while patched."""
    from diffusers import StableDiffusionPipeline

    from lora_nodes.filepages import PAGE, PRESENT
    from lora_nodes.lora.files import read_lora
    from lora_nodes.lora.recipe import AppliedLoRA, ModelRecipe, patcher_of
    from lora_nodes.models.builtin import build_tiny
    from lora_nodes.models.loading import load_base

    parts = build_tiny()
    StableDiffusionPipeline(**{k: parts[k] for k in ("vae", "text_encoder", "tokenizer", "unet", "scheduler")},
                            safety_checker=None, feature_extractor=None, requires_safety_checker=False
                            ).save_pretrained(tmp_path / "tiny")
    base = load_base(str(tmp_path / "tiny"), dtype="float32", device="cpu")
    pristine = {name: p.detach().clone() for name, p in base.unet.named_parameters()}
    lora = read_lora(write_lora(seed=4, rank=4))
    for strength in (1.0, -0.5):
        recipe = ModelRecipe(base, (AppliedLoRA(lora, strength, strength),))
        recipe.materialize()
    target = max((t for t in recipe.patch_plan() if t.startswith("unet.")),
                 key=lambda t: base.lora_targets[t].weight.numel())
    original = patcher_of(base).original(target)
    first = -(-original.data_ptr() // PAGE)
    pages = original.numel() * 4 // PAGE - 1
    assert pages > 0
    with open("/proc/self/pagemap", "rb") as pagemap:
        pagemap.seek(8 * first)
        entries = [int.from_bytes(pagemap.read(8), "little") for _ in range(pages)]
    assert not any(entry & PRESENT for entry in entries)  # given back while the buffer holds the patch
    ModelRecipe(base).materialize()
    assert all(torch.equal(p, pristine[name]) for name, p in base.unet.named_parameters())
