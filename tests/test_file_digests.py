"""Big files are hashed once per version, across processes: a run that hashed a LoRA leaves its hash
in the cache dir, the next run reads it there, and any change to the file hashes it again."""

import hashlib
import json
import os

from lora_nodes.engine.keys import REMEMBERED_FROM, DigestStore, Fingerprints


class Counting:
    """A file hash (the file's sha256) that counts how often it reads the file."""

    def __init__(self):
        self.reads = 0
        self.__qualname__ = "counting_sha256"  # what the store files the hash under, as for a function

    def __call__(self, path):
        self.reads += 1
        return hashlib.sha256(path.read_bytes()).hexdigest()


def big_file(path, fill=b"a"):
    path.write_bytes(fill * REMEMBERED_FROM)
    return path


def test_the_content_hash_is_the_files_sha256(tmp_path):
    path = big_file(tmp_path / "captions.txt")
    assert Fingerprints()(path)["content"] == hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_safetensors_files_content_hash_is_its_headers_and_its_datas(tmp_path):
    """Hashed apart, so that the data's hash (A1111's LoRA hash) serves the PNGs as well; any byte
    changed, in the header or the data, changes it."""
    from conftest import EXAMPLE_LORA

    raw = EXAMPLE_LORA.read_bytes()
    split = 8 + int.from_bytes(raw[:8], "little")
    expected = f"{hashlib.sha256(raw[:split]).hexdigest()}+{hashlib.sha256(raw[split:]).hexdigest()}"
    path = tmp_path / "style.safetensors"
    path.write_bytes(raw)
    assert Fingerprints()(path)["content"] == expected
    for changed in (20, split + 5):  # a byte of the header's JSON; a byte of a tensor
        path.write_bytes(raw[:changed] + bytes([raw[changed] ^ 1]) + raw[changed + 1:])
        assert Fingerprints()(path)["content"] != expected


def test_a_second_process_reads_the_hash_a_first_one_kept(tmp_path):
    path, store = big_file(tmp_path / "lora.safetensors"), tmp_path / "cache" / "file-digests.json"
    count = Counting()
    first = Fingerprints(DigestStore(store))
    expected = first.hashed(path, count)
    assert first.hashed(path, count) == expected and count.reads == 1  # once per process
    first.save()
    second = Fingerprints(DigestStore(store))  # as a new process makes it
    assert second.hashed(path, count) == expected and count.reads == 1
    assert second(path) == first(path)


def test_any_change_to_the_file_is_hashed_again(tmp_path):
    path, store = big_file(tmp_path / "lora.safetensors"), tmp_path / "file-digests.json"
    count = Counting()
    fingerprints = Fingerprints(DigestStore(store))
    before = fingerprints.hashed(path, count)
    fingerprints.save()
    status = os.stat(path)
    big_file(path, b"b")  # the same size ...
    os.utime(path, ns=(status.st_atime_ns, status.st_mtime_ns))  # ... and modification time, as cp -p leaves
    after = Fingerprints(DigestStore(store)).hashed(path, count)
    assert count.reads == 2 and after != before and after == hashlib.sha256(b"b" * REMEMBERED_FROM).hexdigest()


def test_small_files_are_not_remembered_and_a_damaged_store_is_empty(tmp_path):
    store = tmp_path / "file-digests.json"
    small = tmp_path / "caption.txt"
    small.write_text("a red circle")
    fingerprints = Fingerprints(DigestStore(store))
    fingerprints(small)
    fingerprints.save()
    assert not store.exists()  # nothing worth keeping: hashing it again costs nothing
    store.write_text("{not json")
    path, count = big_file(tmp_path / "lora.safetensors"), Counting()
    damaged = Fingerprints(DigestStore(store))
    assert damaged.hashed(path, count) == hashlib.sha256(path.read_bytes()).hexdigest()
    damaged.save()
    assert str(path) in json.loads(store.read_text())  # the store is whole again


def test_a_run_keeps_the_hashes_in_its_cache_dir(tmp_path, monkeypatch):
    from conftest import EXAMPLE_LORA, write_workflow

    from lora_nodes.cli import main
    from lora_nodes.engine import keys

    monkeypatch.setattr(keys, "REMEMBERED_FROM", 0)  # the example LoRA is small: remember it all the same
    lora = tmp_path / "style.safetensors"
    lora.write_bytes(EXAMPLE_LORA.read_bytes())
    path = write_workflow(tmp_path, "nodes:\n  lora: {type: LoadLoRA, inputs: {path: style.safetensors}}\n"
                                    "  save: {type: SaveLoRA, inputs: {lora: [lora, lora], path: copy.safetensors}}\n")
    assert main(["run", str(path), "--output-dir", str(tmp_path / "out"), "--cache-dir", str(tmp_path / "c")]) == 0
    kept = json.loads((tmp_path / "c" / "file-digests.json").read_text())
    raw = lora.read_bytes()
    data = raw[8 + int.from_bytes(raw[:8], "little"):]
    assert kept[str(lora)]["digests"]["lora_nodes.tensorfiles.tensor_data_sha256"] == hashlib.sha256(data).hexdigest()
