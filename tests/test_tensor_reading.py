"""Reading a .safetensors file's tensors: the same tensors as the safetensors library reads, every
dtype, bytes aligned or not; writing to them never writes the file."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from lora_nodes import tensorfiles

DTYPES = [torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.float16,
          torch.bfloat16, torch.float32, torch.float64, torch.float8_e4m3fn, torch.float8_e5m2,
          torch.uint16, torch.uint32, torch.uint64, torch.complex64]


def some_values(dtype: torch.dtype, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    values = torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 50
    if dtype == torch.bool:
        return values > 0
    if dtype == torch.complex64:
        return torch.complex(values, -values).to(dtype)
    if not dtype.is_floating_point:
        return values.abs().to(torch.int64).to(dtype) if str(dtype).startswith("torch.uint") else values.to(dtype)
    return values.to(dtype)


def same(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor]) -> bool:
    """Equal keys, dtypes, shapes and bytes (bytes: NaN-safe, and exact for every dtype)."""
    return ours.keys() == theirs.keys() and all(
        ours[k].dtype == theirs[k].dtype and ours[k].shape == theirs[k].shape
        and bytes(ours[k].contiguous().view(-1).view(torch.uint8).numpy())
        == bytes(theirs[k].contiguous().view(-1).view(torch.uint8).numpy())
        for k in theirs)


def test_every_dtype_reads_as_the_safetensors_library_reads_it(tmp_path):
    tensors = {f"t{i}": some_values(dtype, (3, 5), i) for i, dtype in enumerate(DTYPES)}
    tensors |= {"scalar": torch.tensor(2.5), "empty": torch.zeros(0, 4), "long": torch.arange(10.0)}
    path = tmp_path / "all.safetensors"
    save_file(tensors, str(path), metadata={"ss_network_dim": "4"})
    ours, metadata = tensorfiles.read_tensors(path)
    assert same(ours, load_file(str(path))) and same(ours, tensors)
    assert metadata == {"ss_network_dim": "4"}


def handwritten(path: Path, entries: list[tuple[str, str, list[int], bytes]]) -> None:
    """A .safetensors file laid out by hand: tensors' bytes packed with no padding, in this order."""
    header, data = {}, b""
    for name, dtype, shape, raw in entries:
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [len(data), len(data) + len(raw)]}
        data += raw
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)


def test_tensors_whose_bytes_start_unaligned_read_right(tmp_path):
    # a 3-byte tensor first: every float after it starts off a multiple of its size
    weight, half = torch.randn(4, 3), torch.randn(5).half()
    path = tmp_path / "packed.safetensors"
    handwritten(path, [("a_bytes", "U8", [3], b"\x01\x02\x03"),
                       ("b_weight", "F32", [4, 3], weight.numpy().tobytes()),
                       ("c_half", "F16", [5], half.numpy().tobytes())])
    ours, _ = tensorfiles.read_tensors(path)
    assert torch.equal(ours["b_weight"], weight) and torch.equal(ours["c_half"], half)
    assert ours["a_bytes"].tolist() == [1, 2, 3]
    assert same(ours, load_file(str(path)))


def test_a_dtype_torch_reads_only_through_safetensors_still_reads(tmp_path):
    packed = torch.tensor([0x12, 0x34], dtype=torch.uint8).view(torch.float4_e2m1fn_x2)
    path = tmp_path / "f4.safetensors"
    save_file({"packed": packed, "plain": torch.ones(2)}, str(path))
    ours, _ = tensorfiles.read_tensors(path)
    assert same(ours, load_file(str(path)))


def test_writing_to_a_read_tensor_leaves_the_file_as_it_was(tmp_path):
    """The patcher merges in place into the weights of a model read from one file: the file must not change."""
    path = tmp_path / "model.safetensors"
    save_file({"w": torch.ones(256, 256)}, str(path))
    before = path.read_bytes()
    ours, _ = tensorfiles.read_tensors(path)
    ours["w"].add_(1.0)
    del ours
    assert path.read_bytes() == before
    assert torch.equal(tensorfiles.read_tensors(path)[0]["w"], torch.ones(256, 256))


@pytest.mark.parametrize("damage", ["cut", "longer"])
def test_a_damaged_file_is_named(tmp_path, damage):
    path = tmp_path / "lora.safetensors"
    save_file({"w": torch.ones(8)}, str(path))
    raw = path.read_bytes()
    path.write_bytes(raw[:-1] if damage == "cut" else raw + b"\0")
    with pytest.raises(tensorfiles.UnreadableTensorFile, match="lora.safetensors is not a readable .safetensors file"):
        tensorfiles.read_tensors(path)
