"""Regenerate the example LoRAs the workflows use: ``python scripts/make_example_lora.py``.

They are random (seeded) kohya-format LoRAs over the attention layers of builtin:tiny and
builtin:tiny-sdxl (SGM names, te1/te2, as kohya writes SDXL LoRAs), so the example workflows run
on a fresh clone with nothing downloaded. Same seed, same tensors.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from safetensors.torch import save_file

from lora_nodes.fileio import atomic_write
from lora_nodes.lora.synthetic import synthetic_lora
from lora_nodes.models.loading import load_base

LORAS = Path(__file__).resolve().parent.parent / "workflows" / "loras"
EXAMPLES = {  # base -> (file, kohya's ss_base_model_version, how far up-weights spread)
    "builtin:tiny": ("tiny_style.safetensors", "sd_v1", 0.5),
    "builtin:tiny-sdxl": ("tiny_sdxl_style.safetensors", "sdxl_base_v1-0", 0.5),
    "builtin:shapes": ("shapes_style.safetensors", "sd_v1", 0.15),  # gentle: the base draws real shapes
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out-dir", type=Path, default=LORAS, help=f"where to write (default: {LORAS})")
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--seed", type=int, default=1234)
    args = parser.parse_args()
    for source, (name, version, up_std) in EXAMPLES.items():
        base = load_base(source, device="cpu")
        tensors = synthetic_lora(base, rank=args.rank, alpha=args.rank / 2, seed=args.seed, up_std=up_std)
        metadata = {"ss_network_module": "networks.lora", "ss_network_dim": str(args.rank),
                    "ss_network_alpha": str(args.rank / 2), "ss_base_model_version": version,
                    "ss_tag_frequency": '{"1_example": {"tiny style": 1}}',
                    "lora_nodes_note": f"synthetic example LoRA for {source} (scripts/make_example_lora.py)"}
        out = args.out_dir / name
        atomic_write(out, lambda tmp, t=tensors, m=metadata: save_file(t, str(tmp), metadata=m))
        print(f"wrote {out} ({len(tensors)} tensors)")


if __name__ == "__main__":
    main()
