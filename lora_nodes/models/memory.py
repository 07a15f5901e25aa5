"""How much memory sampling and training will take, checked against what the machine has free.

The estimates are upper bounds of the *working* memory a Sample or a TrainLoRA run adds on top
of the loaded model: the weights are resident already and do not count again. They are worked
out from the model's own configs (channels per UNet level, layers, attention levels and heads,
the VAE decoder's channels, the dtype), the image size and the batch, with no trial run. The
per-layer constants below were calibrated on the built-in models and on SD1.5-shaped components
(peak RSS of a fresh process on the CPU, float32): the estimate stays above what was measured,
at most about 2.8x it (at the smallest sizes, where the fixed part dominates).

Attention: PyTorch's fused ``scaled_dot_product_attention`` kernels (flash attention on the CPU
since torch 2.2, flash / memory-efficient on CUDA) never hold the whole attention matrix, and
diffusers' ``AttnProcessor2_0`` calls it. Where PyTorch would fall back to its plain (math)
kernel, or the model uses an attention processor that builds the matrix itself, the matrix is
counted: ``heads x tokens x tokens`` per image, twice (scores and softmax).

A transformer denoiser (Flux-shaped: double- and single-stream blocks over one joint sequence of
text and image tokens) is estimated the same way from its config: its width, its blocks, and the
joint sequence (the text encoder's padded length plus one token per packed latent patch).
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from ..errors import NodeError

MiB, GiB = 2**20, 2**30

# Live activations at the peak of one block, in multiples of its channel count per position:
# a ResNet block holds its input, the norm and SiLU outputs (3 x input channels) and its
# convolution's output with a reordered copy of it (oneDNN), plus its own output;
# a transformer block holds its residuals, norms and q/k/v (about 8 x channels) and the
# feed-forward's GEGLU projection (8x), GELU (4x) and product (4x), plus the skips around it.
RESNET_LIVE = (3, 3)  # (x input channels, x output channels)
TRANSFORMER_LIVE = 26
VAE_ATTENTION_LIVE = 7  # group norm, q, k, v, attention output, projection, residual
OUTPUT_COPIES = 6  # decoded image: denormalised, float32, permuted, contiguous... (3 channels each)
# What allocators hold beyond the live tensors: glibc keeps freed blocks under its 32 MB mmap
# threshold in the heap and oneDNN convolutions make reordered copies (measured: up to 1.6x the
# live tensors for small models on the CPU, about 1.1x for SD1.5's VAE); CUDA's caching allocator
# rounds blocks up and fragments. Applied to the activations, not to the fixed part.
ALLOCATOR_SLACK = 1.5
# The first call also costs thread pools, kernel caches and the text encoders' run: fixed.
FIXED_OVERHEAD = {"cpu": 48 * MiB}
FIXED_OVERHEAD_ACCELERATOR = 256 * MiB  # CUDA kernels loaded lazily, cuBLAS/cuDNN workspaces
# Training keeps every block's activations for the backward pass: per position, in multiples of
# the block's channels (ResNet: its inputs, norms, SiLUs and convolutions' inputs; transformer:
# q/k/v, the attention output, three norms, the projections' inputs and the feed-forward's 16x).
TRAIN_RESNET_SAVED = (3, 6)
TRAIN_TRANSFORMER_SAVED = 36
# Backward needs the gradients of a block's activations besides the saved ones: the largest
# block's working set, this many times.
TRAIN_BACKWARD_WORK = 2
# AdamW: the LoRA's float32 weight, gradient and two moments.
OPTIMIZER_BYTES_PER_PARAMETER = 16


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes a piece of work needs at its peak, by phase (the peak is the largest phase plus ``kept``)."""

    what: str  # e.g. "Sample at 512x512 (1 image)"
    device: torch.device
    phases: dict[str, int]
    kept: dict[str, int] = field(default_factory=dict)  # held through every phase (e.g. optimizer state)

    @property
    def total(self) -> int:
        return max(self.phases.values(), default=0) + sum(self.kept.values())

    def breakdown(self) -> str:
        """``UNet 1.2 GB, VAE decode 3.4 GB`` : what the total is made of."""
        parts = {**self.phases, **self.kept}
        return ", ".join(f"{name} {format_bytes(size)}" for name, size in parts.items())


MEMORY_CHECK_VARIABLE = "LORA_NODES_MEMORY_CHECK"  # "0" turns the check off where there is no flag (ComfyUI)


def format_bytes(size: float) -> str:
    """``1.5 GB``, ``640 MB``: binary units, as free memory is usually shown."""
    if size >= GiB:
        return f"{size / GiB:.1f} GB"
    return f"{max(size, 0) / MiB:.0f} MB"


# --------------------------------------------------------------------------- free memory


def free_memory(device: torch.device) -> int | None:
    """Bytes free for new tensors on ``device``; None where that cannot be known (then nothing is refused).

    CUDA: what the driver reports free, plus what PyTorch's allocator holds unused. CPU: the
    kernel's MemAvailable (swap not counted: sampling in swap is unusably slow), capped by a
    cgroup (container) limit.
    """
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    if device.type == "cpu":
        available = mem_available()
        limit = _cgroup_available()
        if available is None or limit is None:
            return available if limit is None else limit
        return min(available, limit)
    return None  # MPS and others: unified or unknown memory, no reliable number


def mem_available() -> int | None:
    """Bytes of memory available to new work (Linux's MemAvailable), or None where the system does not say."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:  # no /proc (macOS, BSD): free pages, which understates what could be reclaimed
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def total_memory(device: torch.device, cgroup: Path = Path("/sys/fs/cgroup")) -> int | None:
    """Bytes of memory ``device`` has in all: a CUDA GPU's, or the RAM (capped by a cgroup v2 limit, as
    in a container); None where that cannot be known."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    if device.type != "cpu":
        return None
    try:
        physical = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None
    try:
        limit = (cgroup / "memory.max").read_text().strip()
        return physical if limit == "max" else min(physical, int(limit))
    except (OSError, ValueError):
        return physical


def _cgroup_available(root: Path = Path("/sys/fs/cgroup")) -> int | None:
    """A cgroup v2 memory limit minus what the group uses (page cache it could drop not counted)."""
    try:
        limit = (root / "memory.max").read_text().strip()
        if limit == "max":
            return None
        used = int((root / "memory.current").read_text())
        stat = dict(line.split() for line in (root / "memory.stat").read_text().splitlines())
        return int(limit) - used + int(stat.get("inactive_file", 0))
    except (OSError, ValueError):
        return None


def check_fits(estimate: MemoryEstimate, advice: str, enabled: bool = True) -> None:
    """Raise a NodeError when ``estimate`` is above the memory free on its device.

    ``advice`` says what to lower (``width/height or batch_size``); the message also gives the
    estimate, what is free and ``--no-memory-check``. Nothing is refused when ``enabled`` is False
    or the free memory is unknown.
    """
    if not enabled:
        return
    free = free_memory(estimate.device)
    if free is None or estimate.total <= free:
        return
    where = "RAM" if estimate.device.type == "cpu" else f"memory on {estimate.device}"
    raise NodeError(
        f"{estimate.what} needs about {format_bytes(estimate.total)} ({estimate.breakdown()}), but only "
        f"{format_bytes(free)} of {where} is free: lower {advice}, or run with --no-memory-check "
        f"(inside ComfyUI: start it with {MEMORY_CHECK_VARIABLE}=0) to try anyway (the estimate is an upper bound)")


def _estimated(estimate: Callable[[], MemoryEstimate]) -> MemoryEstimate | None:
    """``estimate()``, or None where the model is shaped in a way the estimate does not know: such
    work is not refused (a wrong refusal would block work that fits; the work itself still runs)."""
    try:
        return estimate()
    except Exception:  # noqa: BLE001 - any surprise in an unusual config means "no estimate", not a failure
        return None


# --------------------------------------------------------------------------- model shapes


@dataclass(frozen=True)
class UNetLevel:
    """One resolution level of a UNet (level 0: the latent's own size)."""

    channels: int
    layers: int  # ResNets in its down block (its up block has one more)
    transformer_layers: int  # transformer blocks in each of its attention modules
    down_attention: bool  # an attention module after each ResNet of its down block
    up_attention: bool
    heads: int


def unet_levels(config: Any) -> list[UNetLevel]:
    """The levels of a diffusers ``UNet2DConditionModel`` config."""
    channels = list(config["block_out_channels"])
    count = len(channels)
    layers = _per_level(config.get("layers_per_block", 2), count)
    transformer_layers = _per_level(config.get("transformer_layers_per_block", 1), count)
    # diffusers reads attention_head_dim as the number of heads when num_attention_heads is unset
    heads = _per_level(config.get("num_attention_heads") or config.get("attention_head_dim", 8), count)
    up_types = list(reversed(config["up_block_types"]))
    return [UNetLevel(channels[i], layers[i], transformer_layers[i], "CrossAttn" in config["down_block_types"][i],
                      "CrossAttn" in up_types[i], heads[i])
            for i in range(count)]


def _per_level(value: Any, count: int) -> list[int]:
    if isinstance(value, (list, tuple)):
        return [int(v[0] if isinstance(v, (list, tuple)) else v) for v in value]
    return [int(value)] * count


def level_positions(height: int, width: int, levels: int) -> list[int]:
    """Positions (height x width) at each level; stride-2 convolutions round up."""
    sizes = []
    for _ in range(levels):
        sizes.append(height * width)
        height, width = math.ceil(height / 2), math.ceil(width / 2)
    return sizes


def _resnet_live(in_channels: int, out_channels: int) -> int:
    return RESNET_LIVE[0] * in_channels + RESNET_LIVE[1] * out_channels


def _up_inputs(levels: list[UNetLevel], i: int) -> int:
    """The widest input of a ResNet in level ``i``'s up block: the way up concatenated with a skip."""
    widest_skip = max(levels[j].channels for j in range(max(i - 1, 0), i + 1))
    from_below = levels[i + 1].channels if i + 1 < len(levels) else levels[i].channels
    return max(from_below, levels[i].channels) + widest_skip


def _mid_has_attention(config: Any) -> bool:
    return config.get("mid_block_type", "UNetMidBlock2DCrossAttn") == "UNetMidBlock2DCrossAttn"


def is_unet(base: Any) -> bool:
    """Whether the base denoises with a UNet (levels of channels), not a transformer over tokens."""
    return "block_out_channels" in base.denoiser.config


@dataclass(frozen=True)
class TransformerShape:
    """What the memory of a transformer denoiser depends on."""

    hidden: int  # width of every token
    heads: int
    blocks: int  # double- and single-stream blocks alike: each runs over the joint sequence
    patch: int  # latent positions per side of one image token (the pipeline's packing times the patch)
    text_tokens: int  # the text sequence joined to the image's tokens


# the most text tokens a pipeline pads a sequence encoder's prompt to (FluxPipeline's default)
MAX_TEXT_TOKENS = 512


def transformer_shape(base: Any) -> TransformerShape:
    """The shape of a diffusers transformer denoiser (Flux-like config: heads, head dim, block counts)."""
    config = base.denoiser.config
    heads = int(config["num_attention_heads"])
    blocks = int(config.get("num_layers", 0) or 0) + int(config.get("num_single_layers", 0) or 0)
    # the pipeline packs 2x2 latent patches into channels (in_channels = 4 x the VAE's latent channels)
    latent_channels = int(base.components["vae"].config.latent_channels)
    pack = max(1, round(math.sqrt(int(config["in_channels"]) / latent_channels)))
    tokenizer = base.components.get(base.family.text_encoders[-1].tokenizer) if base.family.text_encoders else None
    text = min(int(getattr(tokenizer, "model_max_length", MAX_TEXT_TOKENS)), MAX_TEXT_TOKENS)
    return TransformerShape(heads * int(config["attention_head_dim"]), heads, blocks,
                            pack * int(config.get("patch_size", 1) or 1), text)


def transformer_tokens(shape: TransformerShape, latent_h: int, latent_w: int) -> int:
    """The joint sequence: the text's tokens and one per packed latent patch ((h/16) x (w/16) for
    an image of h x w pixels with an 8x VAE and 2x2 packing)."""
    return shape.text_tokens + math.ceil(latent_h / shape.patch) * math.ceil(latent_w / shape.patch)


# --------------------------------------------------------------------------- attention


@functools.lru_cache(maxsize=64)
def _fused_attention(device: str, dtype: torch.dtype, heads: int, head_dim: int, grad: bool) -> bool:
    """Whether PyTorch's SDPA picks a fused kernel (no attention matrix) for these inputs."""
    try:
        query = torch.empty(1, heads, 2, head_dim, device=device, dtype=dtype, requires_grad=grad)
        choice = torch._fused_sdp_choice(query, query, query)  # the dispatcher's pick; nothing runs
        from torch.nn.attention import SDPBackend

        return choice not in (SDPBackend.MATH.value, SDPBackend.ERROR.value)
    except Exception:  # noqa: BLE001 - an older torch or another device: judge by what is known
        if device.startswith("cpu"):
            return tuple(int(p) for p in torch.__version__.split(".")[:2]) >= (2, 2)
        return device.startswith("cuda") and head_dim <= 256


def _processors_fuse(module: torch.nn.Module) -> bool:
    """Whether every attention processor of ``module`` calls SDPA (or xformers, or another fused
    kernel) rather than building the matrix."""
    processors = getattr(module, "attn_processors", None)
    if processors is None:
        return True
    return all(type(p).__name__.endswith("2_0") or type(p).__name__.startswith("XFormers") or _dispatch_fuses(p)
               for p in processors.values())


def _dispatch_fuses(processor: Any) -> bool:
    """Whether a processor that hands attention to diffusers' dispatcher (the newer processors, e.g. the
    transformers') gets a fused kernel: SDPA ("native") or a flash/xformers/sage backend, not the
    plain math one."""
    if not hasattr(type(processor), "_attention_backend"):
        return False
    backend = processor._attention_backend
    if backend is None:
        try:
            from diffusers.models.attention_dispatch import _AttentionBackendRegistry

            backend = _AttentionBackendRegistry.get_active_backend()[0]
        except (ImportError, AttributeError, IndexError, TypeError):
            return True  # the dispatcher's default is SDPA
    return "math" not in str(getattr(backend, "value", backend))


def attention_matrix(module: torch.nn.Module, device: torch.device, dtype: torch.dtype, heads: int,
                     channels: int, grad: bool = False) -> int:
    """Elements per query position of the attention matrix that ``module`` materialises at a level
    of ``channels`` with ``heads`` (0 when fused), per token of the sequence: multiply by tokens."""
    head_dim = max(channels // max(heads, 1), 1)
    if _processors_fuse(module) and _fused_attention(str(device), dtype, heads, head_dim, grad):
        return 0
    return 2 * heads  # scores and their softmax, for every key


# --------------------------------------------------------------------------- sampling


def unet_sampling_elements(base: Any, latent_h: int, latent_w: int) -> int:
    """Peak activation elements of one UNet forward per image of its batch, at a latent size."""
    unet, config = base.unet, base.unet.config
    levels = unet_levels(config)
    positions = level_positions(latent_h, latent_w, len(levels))
    # every down block's outputs wait for the way up: all of them, at the peak's worst
    skips = levels[0].channels * positions[0]
    for i, level in enumerate(levels):
        skips += level.layers * level.channels * positions[i]
        if i + 1 < len(levels):
            skips += level.channels * positions[i + 1]
    work = 0
    for i, level in enumerate(levels):
        has_attention = level.down_attention or level.up_attention or \
            (i == len(levels) - 1 and _mid_has_attention(config))
        live = _resnet_live(_up_inputs(levels, i), level.channels)
        if has_attention:
            matrix = attention_matrix(unet, base.device, base.dtype, level.heads, level.channels)
            live = max(live, TRANSFORMER_LIVE * level.channels + matrix * positions[i])
        work = max(work, live * positions[i])
    return skips + work


def transformer_sampling_elements(base: Any, latent_h: int, latent_w: int) -> int:
    """Peak activation elements of one transformer forward per image of its batch: the residual
    streams of the whole sequence, and the working set of one block (with its attention matrix
    where the kernel builds one)."""
    shape = transformer_shape(base)
    tokens = transformer_tokens(shape, latent_h, latent_w)
    matrix = attention_matrix(base.denoiser, base.device, base.dtype, shape.heads, shape.hidden)
    return tokens * (2 * shape.hidden + TRANSFORMER_LIVE * shape.hidden + matrix * tokens)


def denoiser_sampling_elements(base: Any, latent_h: int, latent_w: int) -> int:
    """Peak activation elements of one denoiser forward per image: a UNet's or a transformer's."""
    if is_unet(base):
        return unet_sampling_elements(base, latent_h, latent_w)
    return transformer_sampling_elements(base, latent_h, latent_w)


def denoiser_label(base: Any) -> str:
    """How estimates name the denoiser: ``UNet``, or its component name (``transformer``)."""
    return "UNet" if is_unet(base) else base.family.denoiser


def vae_decode_elements(vae: torch.nn.Module, latent_h: int, latent_w: int, device: torch.device,
                        dtype: torch.dtype) -> int:
    """Peak activation elements of decoding one image's latents with a diffusers ``AutoencoderKL``."""
    config = vae.config
    channels = list(reversed(config["block_out_channels"]))
    position = latent_h * latent_w
    top = channels[0]
    peak = _resnet_live(top, top) * position
    if config.get("mid_block_add_attention", True):
        matrix = attention_matrix(vae, device, dtype, 1, top)
        peak = max(peak, (VAE_ATTENTION_LIVE * top + matrix * position) * position)
    previous = top
    # nearest-neighbour upsampling runs in float32 for bfloat16 (diffusers casts): a wider copy
    interpolated = 3 if dtype == torch.bfloat16 else 1
    for i, out in enumerate(channels):
        shortcut = out if previous != out else 0  # a 1x1 convolution to the new width
        peak = max(peak, (_resnet_live(previous, out) + shortcut) * position)
        previous = out
        if i + 1 < len(channels):  # 2x upsampling, then a convolution at the new size
            peak = max(peak, out * position + (interpolated + 1) * out * position * 4)
            position *= 4
    return max(peak, 3 * previous * position + OUTPUT_COPIES * 3 * position)


def _activation_bytes(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _vae_upcast(base: Any) -> bool:
    """Whether the pipeline decodes in float32 with a float16 VAE it must upcast (SDXL's ``force_upcast``)."""
    vae = base.components["vae"]
    return base.family.vae_upcast_in_fp16 and base.dtype == torch.float16 and bool(vae.config.get("force_upcast", True))


def largest_weight(module: torch.nn.Module) -> int:
    """Bytes of ``module``'s largest convolution weight: oneDNN (CPU) and cuDNN convolve with a
    reordered copy of it (measured: about 120 MB of SD1.5's UNet peak at 256x256 on the CPU)."""
    return max((p.numel() * p.element_size() for p in module.parameters() if p.dim() == 4), default=0)


def _fixed_overhead(device: torch.device) -> int:
    return FIXED_OVERHEAD.get(device.type, FIXED_OVERHEAD_ACCELERATOR)


def sample_estimate(base: Any, width: int, height: int, batch_size: int, cfg: float) -> MemoryEstimate:
    """Peak working memory of sampling ``batch_size`` images of ``width`` x ``height`` on ``base``.

    The UNet runs on twice the batch when ``cfg`` > 1 (classifier-free guidance; a guidance-distilled
    model's pipeline runs its rarer second pass after the first, on the same batch); the VAE decodes
    the whole batch at once, at full resolution. Text encoding and the scheduler are small and
    covered by the fixed part.
    """
    factor = base.vae_scale_factor
    latent_h, latent_w = math.ceil(height / factor), math.ceil(width / factor)
    doubled = cfg > 1 and not base.family.guidance_distilled
    unet_batch = batch_size * (2 if doubled else 1)
    unet_activations = unet_batch * _activation_bytes(base.dtype) * denoiser_sampling_elements(base, latent_h, latent_w)
    unet = int(unet_activations * ALLOCATOR_SLACK) + largest_weight(base.unet)
    vae_model, upcast = base.components["vae"], _vae_upcast(base)
    vae_dtype = torch.float32 if upcast else base.dtype
    vae_activations = batch_size * _activation_bytes(vae_dtype) * vae_decode_elements(
        vae_model, latent_h, latent_w, base.device, vae_dtype)
    vae = int(vae_activations * ALLOCATOR_SLACK) + largest_weight(vae_model)
    if upcast:  # the float32 copy of the VAE's weights the pipeline decodes with
        vae += sum(p.numel() for p in vae_model.parameters()) * 4
    images = f"{batch_size} images" if batch_size > 1 else "1 image"
    label = denoiser_label(base)
    return MemoryEstimate(
        f"Sample at {width}x{height} ({images}{f', cfg doubles the {label} batch' if doubled else ''})",
        base.device, {label: unet, "VAE decode": vae}, {"fixed": _fixed_overhead(base.device)})


def check_sample(base: Any, width: int, height: int, batch_size: int, cfg: float, enabled: bool = True) -> None:
    """Refuse (NodeError) a sample estimated not to fit in the free memory of the base's device."""
    estimate = _estimated(lambda: sample_estimate(base, width, height, batch_size, cfg)) if enabled else None
    if estimate is not None:
        check_fits(estimate, "width/height or batch_size")


# --------------------------------------------------------------------------- training


def _resnet_saved(in_channels: int, out_channels: int) -> int:
    return TRAIN_RESNET_SAVED[0] * in_channels + TRAIN_RESNET_SAVED[1] * out_channels


def unet_training_elements(base: Any, latent_h: int, latent_w: int, rank: int, checkpointing: bool) -> int:
    """Activation elements one training step keeps for backward, per image of the batch, plus the
    backward's own working set.

    Without checkpointing every ResNet and transformer block keeps its intermediates (the LoRA's
    rank-wide middles too); with diffusers' gradient checkpointing each keeps only its input, and
    one block at a time is recomputed during backward.
    """
    config = base.unet.config
    levels = unet_levels(config)
    positions = level_positions(latent_h, latent_w, len(levels))
    saved, largest = 0, 0
    for i, level in enumerate(levels):
        deepest = i == len(levels) - 1
        widest_in = max(levels[i - 1].channels if i else level.channels, _up_inputs(levels, i))
        resnets = 2 * level.layers + 1 + (2 if deepest else 0)  # down, up (one more), the middle's two
        attentions = level.layers * level.down_attention + (level.layers + 1) * level.up_attention + \
            (deepest and _mid_has_attention(config))
        resnet = _resnet_saved(widest_in, level.channels)
        # the LoRA on a block's attention and feed-forward projections keeps its rank-wide middles
        block = TRAIN_TRANSFORMER_SAVED * level.channels + 8 * rank + positions[i] * attention_matrix(
            base.unet, base.device, base.dtype, level.heads, level.channels, grad=True)
        largest = max(largest, resnet * positions[i], block * positions[i] if attentions else 0)
        blocks = attentions * level.transformer_layers
        if checkpointing:  # each ResNet and transformer block keeps its input; the attention modules'
            # own norm and projections (not checkpointed) keep about four more
            saved += (resnets * widest_in + blocks * level.channels + attentions * 4 * level.channels) * positions[i]
        else:
            saved += (resnets * resnet + blocks * block + attentions * 4 * level.channels) * positions[i]
    recomputed = largest if checkpointing else 0  # one block at a time, during backward
    return saved + recomputed + TRAIN_BACKWARD_WORK * largest


def transformer_training_elements(base: Any, latent_h: int, latent_w: int, rank: int, checkpointing: bool) -> int:
    """Activation elements one training step of a transformer keeps for backward, per image, plus
    the backward's working set: every block's intermediates over the joint sequence (with
    checkpointing: its input, and one block recomputed at a time)."""
    shape = transformer_shape(base)
    tokens = transformer_tokens(shape, latent_h, latent_w)
    matrix = attention_matrix(base.denoiser, base.device, base.dtype, shape.heads, shape.hidden, grad=True)
    block = tokens * (TRAIN_TRANSFORMER_SAVED * shape.hidden + 8 * rank + matrix * tokens)
    saved = shape.blocks * (2 * shape.hidden * tokens if checkpointing else block)
    recomputed = block if checkpointing else 0
    return saved + recomputed + TRAIN_BACKWARD_WORK * block


def vae_encode_elements(vae: torch.nn.Module, height: int, width: int, device: torch.device,
                        dtype: torch.dtype) -> int:
    """Peak activation elements of encoding one image with a diffusers ``AutoencoderKL`` (no grad)."""
    config = vae.config
    channels = list(config["block_out_channels"])
    position = height * width
    peak, previous = 0, channels[0]
    for i, out in enumerate(channels):
        peak = max(peak, (_resnet_live(previous, out) + (out if previous != out else 0)) * position)
        previous = out
        if i + 1 < len(channels):  # stride-2 convolution (its padded input is a copy)
            peak = max(peak, 2 * out * position + out * position // 4)
            position = math.ceil(position / 4)
    if config.get("mid_block_add_attention", True):
        matrix = attention_matrix(vae, device, dtype, 1, previous)
        peak = max(peak, (VAE_ATTENTION_LIVE * previous + matrix * position) * position)
    return peak + 3 * height * width  # the batch's pixels on the device


def text_training_elements(encoder: torch.nn.Module, tokens: int | None = None) -> int:
    """Activation elements a text encoder keeps for backward, per caption: a CLIP's (77 tokens, its
    positions) or a T5's (``tokens``: what its tokenizer pads to; T5's widths go by other names)."""
    config = encoder.config
    tokens = tokens or getattr(config, "max_position_embeddings", None) or MAX_TEXT_TOKENS
    hidden = config.hidden_size
    intermediate = getattr(config, "intermediate_size", None) or getattr(config, "d_ff", 4 * hidden)
    per_layer = tokens * (12 * hidden + 3 * intermediate) + 2 * config.num_attention_heads * tokens ** 2
    return config.num_hidden_layers * per_layer


def _text_tokens(base: Any, component: str) -> int | None:
    """The tokens a text encoder's tokenizer pads to (at most :data:`MAX_TEXT_TOKENS`), if known."""
    tokenizer = base.components.get(base.family.text_encoder(component).tokenizer)
    length = getattr(tokenizer, "model_max_length", None)
    return min(int(length), MAX_TEXT_TOKENS) if length else None


def train_estimate(base: Any, sizes: dict[tuple[int, int], int], batch_size: int, rank: int,
                   lora_parameters: int, gradient_checkpointing: bool, train_text_encoder: bool,
                   autocast_dtype: torch.dtype | None) -> MemoryEstimate:
    """Peak working memory of a LoRA training run on ``base``.

    ``sizes`` maps each training image size ``(height, width)`` to how many images have it; a
    batch of ``batch_size`` images of the largest sets the peak. Counted: the training images
    prepared as float32 tensors and their cached latents, the LoRA and its optimizer state, and
    the largest of encoding a batch with the VAE and one UNet step (forward activations kept for
    backward, plus backward's working set).
    """
    height, width = max(sizes, key=lambda hw: hw[0] * hw[1])
    factor = base.vae_scale_factor
    latent_h, latent_w = math.ceil(height / factor), math.ceil(width / factor)
    # the prepared images are float32 CPU tensors; their latents (each also flipped) stay on the device
    images = sum(count * 3 * h * w * 4 for (h, w), count in sizes.items()) if base.device.type == "cpu" else 0
    channels = int(base.components["vae"].config.latent_channels)
    latents = sum(2 * count * channels * math.ceil(h / factor) * math.ceil(w / factor) * 4
                  for (h, w), count in sizes.items())
    # under autocast the convolutions and projections keep half-precision inputs, the norms float32 ones
    size = 3 if autocast_dtype is not None else _activation_bytes(base.dtype)
    training_elements = unet_training_elements if is_unet(base) else transformer_training_elements
    unet = batch_size * size * training_elements(base, latent_h, latent_w, rank, gradient_checkpointing)
    if train_text_encoder:
        unet += batch_size * size * sum(text_training_elements(base.components[n], _text_tokens(base, n))
                                        for n in base.family.text_components if n in base.components)
    vae = batch_size * _activation_bytes(base.dtype) * vae_encode_elements(
        base.components["vae"], height, width, base.device, base.dtype)
    # forward and backward (transposed) convolutions each reorder the largest weight
    unet = int(unet * ALLOCATOR_SLACK) + 2 * largest_weight(base.unet)
    vae = int(vae * ALLOCATOR_SLACK) + largest_weight(base.components["vae"])
    return MemoryEstimate(
        f"TrainLoRA at {width}x{height}, {batch_size} images per batch", base.device,
        {f"{denoiser_label(base)} step": unet, "VAE encode": vae},
        {"training images": images + latents, "LoRA and optimizer": lora_parameters * OPTIMIZER_BYTES_PER_PARAMETER,
         "fixed": _fixed_overhead(base.device)})


def lora_parameter_count(targets: dict[str, torch.nn.Module], rank: int) -> int:
    """Parameters of a new LoRA of ``rank`` on ``targets`` (its rank is capped by each layer's shape)."""
    total = 0
    for module in targets.values():
        out_features, fan_in = module.weight.shape[0], module.weight[0].numel()
        total += min(rank, out_features, fan_in) * (fan_in + out_features)
    return total


def check_training(base: Any, dataset: Any, config: Any, targets: dict[str, torch.nn.Module],
                   autocast_dtype: torch.dtype | None, enabled: bool = True) -> None:
    """Refuse (NodeError) a training run estimated not to fit in the free memory of the base's device.

    ``dataset`` is a :class:`~lora_nodes.datasets.folder.Dataset` (its bucket sizes are read
    without preparing any image) and ``config`` a :class:`~lora_nodes.training.config.TrainConfig`.
    """
    estimate = _estimated(lambda: _train_estimate(base, dataset, config, targets, autocast_dtype)) if enabled else None
    if estimate is None:
        return
    advice = "LoadDataset's resolution or batch_size"
    if not config.gradient_checkpointing:
        advice += ", turn on gradient_checkpointing"
    check_fits(estimate, advice)


def _train_estimate(base: Any, dataset: Any, config: Any, targets: dict[str, torch.nn.Module],
                    autocast_dtype: torch.dtype | None) -> MemoryEstimate | None:
    sizes: dict[tuple[int, int], int] = {}
    for name, count in dataset.buckets(base.native_size).items():
        width, height = (int(side) for side in name.split("x"))
        sizes[(height, width)] = sizes.get((height, width), 0) + count
    if not sizes:
        return None
    batch = max(1, min(config.batch_size, len(dataset)))  # a batch holds at most every image once per repeat
    estimate = train_estimate(base, sizes, batch, config.rank, lora_parameter_count(targets, config.rank),
                              config.gradient_checkpointing, config.train_text_encoder, autocast_dtype)
    if config.sample_every_n_steps:  # previews are drawn between steps, at the native size
        preview = sample_estimate(base, base.native_size, base.native_size, 1, 7.0)
        estimate = replace(estimate, phases={**estimate.phases, "previews": max(preview.phases.values())})
    return estimate
