"""Regenerate workflows/loras/purple_star.safetensors: ``python -u scripts/make_purple_star_lora.py``.

The quickstart's LoRA is the one ``workflows/train_lora.yaml`` trains (rank 8, 300 steps on the 16
purple stars of workflows/datasets/purple_star, fixed seeds): this runs that workflow's training
and save nodes in a fresh cache and copies the saved kohya-format file next to the other example
LoRAs. Minutes on 2 CPU cores (it took 28 minutes, 703 CPU-seconds, on 2 cores shared with other busy
jobs); on the CPU a rerun gives the same tensors (within the float rounding of the machine's math libraries).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # runs from a checkout without installing the package

from lora_nodes.engine.events import JsonLines
from lora_nodes.engine.scheduler import Runner
from lora_nodes.graph import load_workflow

WORKFLOW = REPO / "workflows" / "train_lora.yaml"
OUT = REPO / "workflows" / "loras" / "purple_star.safetensors"
SAVE_NODE = "save"  # the workflow's SaveLoRA: the only output this script needs


def make_purple_star_lora(out: Path = OUT) -> Path:
    """Train the workflow's LoRA from scratch (an empty cache) and copy it to ``out``."""
    workflow = load_workflow(WORKFLOW)
    for node_id, call in list(workflow.nodes.items()):  # only the training and its save: no sampling
        if call.type == "SaveImages":
            del workflow.nodes[node_id]
    with tempfile.TemporaryDirectory(prefix="purple-star-") as scratch:
        runner = Runner(output_dir=Path(scratch) / "out", cache_dir=Path(scratch) / "cache",
                        emit=JsonLines(sys.stderr))
        result = runner.run(workflow)
        saved = next(Path(f) for f in result.files if f.endswith(".safetensors"))
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(saved, out)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=OUT, help=f"where to write (default: {OUT})")
    args = parser.parse_args()
    started = time.perf_counter()
    out = make_purple_star_lora(args.out)
    print(f"wrote {out} ({out.stat().st_size:,} bytes) in {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
