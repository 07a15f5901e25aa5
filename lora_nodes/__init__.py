"""lora-nodes: LoRA work on diffusion models as node graphs, run headless or inside ComfyUI."""

__version__ = "0.1.0"
