"""Regenerate the example LoRA the workflows use: ``python scripts/make_example_lora.py``.

It is a random (seeded) kohya-format LoRA over builtin:tiny's attention layers, so the example
workflows run on a fresh clone with nothing downloaded. Same seed, same tensors.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from safetensors.torch import save_file

from lora_nodes.fileio import atomic_write
from lora_nodes.lora.synthetic import synthetic_lora
from lora_nodes.models.loading import load_base

DEFAULT_OUT = Path(__file__).resolve().parent.parent / "workflows" / "loras" / "tiny_style.safetensors"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"where to write (default: {DEFAULT_OUT})")
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--seed", type=int, default=1234)
    args = parser.parse_args()
    base = load_base("builtin:tiny", device="cpu")
    tensors = synthetic_lora(base, rank=args.rank, alpha=args.rank / 2, seed=args.seed)
    metadata = {"ss_network_module": "networks.lora", "ss_network_dim": str(args.rank),
                "ss_network_alpha": str(args.rank / 2), "ss_base_model_version": "sd_v1",
                "lora_nodes_note": "synthetic example LoRA for builtin:tiny (scripts/make_example_lora.py)"}
    atomic_write(args.out, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))
    print(f"wrote {args.out} ({len(tensors)} tensors)")


if __name__ == "__main__":
    main()
