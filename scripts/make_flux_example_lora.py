"""Regenerate workflows/loras/tiny_flux_style.safetensors: ``python scripts/make_flux_example_lora.py``.

A random (seeded) LoRA for builtin:tiny-flux in kohya sd-scripts' Flux layout: every linear layer
of the double and single blocks (kohya's default targets) under BFL's fused names
(``lora_unet_double_blocks_0_img_attn_qkv``, ``lora_unet_single_blocks_0_linear1``, ...), with
alphas and kohya's metadata, so workflows/flux.yaml runs on a fresh clone with nothing downloaded.
Same seed, same tensors.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from safetensors.torch import save_file

from lora_nodes.fileio import atomic_write
from lora_nodes.lora.synthetic import synthetic_lora
from lora_nodes.models.loading import load_base

OUT = Path(__file__).resolve().parent.parent / "workflows" / "loras" / "tiny_flux_style.safetensors"
BLOCK_LINEARS = re.compile(r"^transformer\.(single_)?transformer_blocks\.")  # kohya's default LoRA targets


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=OUT, help=f"where to write (default: {OUT})")
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--seed", type=int, default=1234)
    # the random tiny VAE shows little of small changes: a wide spread makes the LoRA's effect visible
    parser.add_argument("--up-std", type=float, default=2.0, help="how far up-weights spread (default: 2)")
    args = parser.parse_args()
    base = load_base("builtin:tiny-flux", device="cpu")
    tensors = synthetic_lora(base, rank=args.rank, alpha=args.rank / 2, seed=args.seed, pattern=BLOCK_LINEARS,
                             up_std=args.up_std)
    metadata = {"ss_network_module": "networks.lora_flux", "ss_network_dim": str(args.rank),
                "ss_network_alpha": str(args.rank / 2), "ss_base_model_version": "flux1",
                "ss_tag_frequency": '{"1_example": {"tiny flux style": 1}}',
                "lora_nodes_note": "synthetic example LoRA for builtin:tiny-flux (scripts/make_flux_example_lora.py)"}
    atomic_write(args.out, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))
    print(f"wrote {args.out} ({len(tensors)} tensors)")


if __name__ == "__main__":
    main()
