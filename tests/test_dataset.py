"""LoadDataset: captioned image folders (kohya layout), crops, buckets, epochs and caption shuffling."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import WORKFLOWS
from PIL import Image

from lora_nodes.datasets.folder import Dataset, bucket_sizes, read_folder, read_image
from lora_nodes.engine.context import NodeContext
from lora_nodes.engine.events import Collector
from lora_nodes.errors import NodeError
from lora_nodes.nodes import catalogue
from lora_nodes.nodes.dataset import load_dataset


def image(path: Path, width: int = 32, height: int = 32, colour=(200, 40, 40), mode: str = "RGB") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, (width, height), colour).save(path)
    return path


def kohya_folder(root: Path) -> Path:
    """root: a.png (captioned), b.png (no caption); 3_purple star/: c.png (captioned), d.png (no caption)."""
    image(root / "a.png")
    (root / "a.txt").write_text("red square, plain\n", encoding="utf-8")
    image(root / "b.jpg")
    image(root / "3_purple star" / "c.png", 48, 32)
    (root / "3_purple star" / "c.txt").write_text("Purple, star, White background", encoding="utf-8")
    image(root / "3_purple star" / "d.webp")
    return root


def run_node(path: Path, **inputs) -> tuple[Dataset, Collector]:
    spec = catalogue()["LoadDataset"]
    values = {i.name: i.default for i in spec.inputs if i.name != "path"} | inputs
    events = Collector()
    ctx = NodeContext("data", "LoadDataset", path / "out", path / "cache", events)
    (dataset,) = spec.run(ctx, str(path), **values)
    return dataset, events


def test_captions_from_files_folder_names_and_default(tmp_path):
    dataset = read_folder(kohya_folder(tmp_path / "data"), default_caption="a thing")
    captions = {Path(item.path).name: (item.caption, item.repeats) for item in dataset.items}
    assert captions == {
        "a.png": ("red square, plain", 1),
        "b.jpg": ("a thing", 1),  # no caption file, no folder name: default_caption
        "c.png": ("Purple, star, White background", 3),
        "d.webp": ("purple star", 3),  # the folder's name after the repeat count
    }
    assert len(dataset) == 1 + 1 + 3 + 3
    assert all(item.image.dtype == np.uint8 and item.image.shape[2] == 3 for item in dataset.items)


def test_the_node_reports_ignored_folders_and_missing_captions(tmp_path):
    root = kohya_folder(tmp_path / "data")
    image(root / "not repeated" / "e.png")
    dataset, events = run_node(root, caption_extension="txt")  # "txt" means ".txt"
    warnings = [e["message"] for e in events.of("warning")]
    assert any("not repeated" in w for w in warnings)
    assert any("1 of 4 images have no caption" in w for w in warnings)
    assert "e.png" not in {Path(item.path).name for item in dataset.items}
    (info,) = events.of("info")
    assert info["message"].startswith("4 images, 8 per epoch, 2 folders")
    assert info["folders"]["3_purple star"] == {"n_repeats": 3, "img_count": 2}
    assert spec_input("crop").choices == ("center", "buckets") and spec_input("resolution").default == 0


def spec_input(name):
    return catalogue()["LoadDataset"].input(name)


def test_a_workflow_with_a_dataset_folder_validates(tmp_path):
    from lora_nodes.graph import parse_workflow
    from lora_nodes.graph.validate import check

    kohya_folder(tmp_path / "data")
    good = parse_workflow({"nodes": {"d": {"type": "LoadDataset", "inputs": {"path": "data", "resolution": 64}}}},
                          tmp_path)
    # A dataset alone runs nothing (no output node); apart from that the workflow is valid.
    assert [problem.code for problem in check(good, catalogue())[0]] == ["no_outputs"]
    bad = parse_workflow({"nodes": {"d": {"type": "LoadDataset", "inputs": {"path": "nowhere", "resolution": 60}}}},
                         tmp_path)
    codes = {problem.code for problem in check(bad, catalogue())[0]}
    assert codes == {"file_not_found", "out_of_range", "no_outputs"}


def test_epoch_batches_are_deterministic_permutations_of_the_repeats(tmp_path):
    dataset = read_folder(kohya_folder(tmp_path / "data"), resolution=32, crop="buckets")
    examples = dataset.examples(0)
    batches = dataset.epoch_batches(examples, batch_size=2, epoch=0, seed=5)
    assert batches == dataset.epoch_batches(examples, batch_size=2, epoch=0, seed=5)
    assert batches != dataset.epoch_batches(examples, batch_size=2, epoch=1, seed=5)
    occurrences = Counter(index for batch in batches for index in batch)
    assert occurrences == {i: item.repeats for i, item in enumerate(dataset.items)}
    for batch in batches:
        assert 1 <= len(batch) <= 2
        assert len({tuple(examples[i].pixels.shape) for i in batch}) == 1  # one bucket per batch
    # The 3:2 image has a bucket of its own: it is never batched with the squares.
    assert {tuple(e.pixels.shape) for e in examples} == {(3, 32, 32), (3, 24, 40)}


def test_center_crop_resizes_the_short_side_and_crops_the_middle(tmp_path):
    root = tmp_path / "data"
    picture = np.zeros((40, 80, 3), np.uint8)
    picture[:, 20:60] = 255  # white in the middle half, black at the sides
    root.mkdir()
    Image.fromarray(picture).save(root / "wide.png")
    dataset = read_folder(root, crop="center")
    (example,) = dataset.examples(16)
    assert example.pixels.shape == (3, 16, 16) and example.pixels.dtype == torch.float32
    assert example.original_size == (40, 80) and example.crop_top_left == (0, 8)
    assert example.pixels.min() >= -1 and example.pixels.max() <= 1
    assert (example.pixels[:, :, 3:13] > 0.95).all()  # only the white middle is kept
    assert (example.pixels[:, :, 2:14] > 0.9).all()
    assert dataset.examples(16)[0] is example  # computed once per resolution
    assert dataset.examples(24)[0].pixels.shape == (3, 24, 24)
    assert read_folder(root, resolution=8).examples(16)[0].pixels.shape == (3, 8, 8)  # its own size wins
    with pytest.raises(NodeError, match="no training resolution"):
        dataset.examples(0)


def test_buckets_keep_the_aspect_ratio_within_the_area(tmp_path):
    root = tmp_path / "data"
    image(root / "wide.png", 200, 100)
    image(root / "tall.png", 100, 300)
    image(root / "square.png", 90, 90)
    for resolution in (64, 512):
        dataset = read_folder(root, resolution=resolution, crop="buckets")
        sizes = {Path(item.path).stem: tuple(e.pixels.shape[1:]) for item, e in
                 zip(dataset.items, dataset.examples(0), strict=True)}
        step = 64 if resolution >= 256 else 8
        for name, (height, width) in sizes.items():
            assert height * width <= resolution**2 and height % step == 0 and width % step == 0, name
        height, width = sizes["wide"]
        assert width > height and abs(width / height - 2) < 0.25
        height, width = sizes["tall"]
        assert height > width and abs(height / width - 3) < 0.6
        assert sizes["square"] == (resolution, resolution)
    assert (512, 512) in bucket_sizes(512) and (1024, 256) in bucket_sizes(512)
    assert dataset.buckets() == {"704x320": 1, "256x832": 1, "512x512": 1}  # width x height: images


def test_shuffled_captions_keep_the_first_tags(tmp_path):
    root = tmp_path / "data"
    image(root / "a.png")
    (root / "a.txt").write_text("sks, purple, star, white background, centered, small", encoding="utf-8")
    dataset = read_folder(root, shuffle_captions=True, keep_tokens=1)
    example = dataset.examples(8)[0]
    seen = set()
    for seed in range(20):
        caption = dataset.caption(example, torch.Generator().manual_seed(seed))
        tags = caption.split(", ")
        assert tags[0] == "sks" and sorted(tags) == sorted(example.caption.split(", "))
        seen.add(caption)
    assert len(seen) > 1  # the order changes with the generator
    assert dataset.caption(example, torch.Generator().manual_seed(3)) == \
        dataset.caption(example, torch.Generator().manual_seed(3))
    plain = read_folder(root)
    assert plain.caption(plain.examples(8)[0], torch.Generator()) == example.caption


def test_tag_frequency_counts_each_image_once_per_folder(tmp_path):
    dataset = read_folder(kohya_folder(tmp_path / "data"))
    assert dataset.tag_frequency() == {
        "data": {"red square": 1, "plain": 1},
        "3_purple star": {"purple": 1, "star": 1, "white background": 1, "purple star": 1},
    }


def test_unreadable_files_are_named(tmp_path):
    root = tmp_path / "data"
    good = image(root / "good.png", 64, 64)
    (root / "broken.png").write_bytes(good.read_bytes()[:60])  # truncated
    with pytest.raises(NodeError, match="broken.png"):
        read_folder(root)
    (root / "broken.png").unlink()
    (root / "good.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(NodeError, match=r"good\.txt is not UTF-8"):
        read_folder(root)


def test_missing_and_empty_folders_say_what_to_do(tmp_path):
    with pytest.raises(NodeError, match="not found"):
        read_folder(tmp_path / "missing")
    with pytest.raises(NodeError, match="not a folder"):
        read_folder(image(tmp_path / "x.png"))
    (tmp_path / "empty" / "notes").mkdir(parents=True)
    (tmp_path / "empty" / "readme.txt").write_text("hi")
    with pytest.raises(NodeError, match=r"no images in .*\.png .*subfolders.*ignored subfolders: notes"):
        read_folder(tmp_path / "empty")


def test_transparency_is_composited_on_white(tmp_path):
    path = image(tmp_path / "clear.png", 4, 4, (255, 0, 0, 0), mode="RGBA")
    assert (read_image(path) == 255).all()
    grey16 = tmp_path / "grey16.png"
    Image.fromarray(np.full((4, 4), 32768, np.uint16)).save(grey16)
    assert abs(int(read_image(grey16)[0, 0, 0]) - 128) <= 1  # 16-bit greys scaled, not clipped to white


def test_the_purple_star_dataset_is_shipped():
    folder = WORKFLOWS / "datasets" / "purple_star"
    dataset = read_folder(folder, resolution=64)
    assert len(dataset.items) == len(dataset) == 16
    assert {item.caption for item in dataset.items} == {"a purple star on a white background"}
    assert all(item.image.shape == (64, 64, 3) for item in dataset.items)
    assert sorted(p.name for p in folder.glob("*.txt")) == [f"star_{i:02d}.txt" for i in range(1, 17)]


def test_load_dataset_spec():
    assert load_dataset.id == "LoadDataset" and load_dataset.category == "lora-nodes/training"
    assert [o.type for o in load_dataset.outputs] == ["LN_DATASET"]
    assert spec_input("path").content_key and spec_input("path").path
