"""What a model family is: everything that differs between families, declared as data.

Each family is one module of this package (``sd1.py``, ``sd2.py``, ``sdxl.py``) that declares one
:class:`Family`. The rest of lora-nodes asks a family what it needs (its components, how LoRA
files name its modules, where a single-file checkpoint keeps each part, which pipeline draws
with it, what it is trained to predict) and never names one. The ``lora`` and ``models``
packages meet here: ``lora`` works on anything that is a :class:`LoRATarget`, and
``models.BaseModel`` is one, so neither package imports the other.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

if TYPE_CHECKING:  # annotations only: importing the families must not import torch
    from torch import nn


def kohya_spelling(prefix: str, path: str) -> str:
    """kohya's name for a module: a prefix, then the module path with dots as underscores."""
    return prefix + path.replace(".", "_")


@dataclass(frozen=True)
class TextEncoder:
    """One text encoder of a family: its component name and where files keep it."""

    component: str  # "text_encoder", "text_encoder_2": the pipeline's name for it
    tokenizer: str  # the pipeline's name for its tokenizer
    checkpoint_prefix: str  # where a single-file (LDM/SGM) checkpoint keeps its weights
    open_clip: bool  # kept there in OpenCLIP's layout (fused q/k/v, transposed), not HF CLIP's
    kohya_prefix: str  # the prefix kohya's sd-scripts writes for it in this family's LoRAs
    model_class: str = "CLIPTextModel"  # its transformers class
    # text that only this encoder's module names hold (CLIP's ``text_model``, T5's ``encoder_block``):
    # tells whose text encoder a LoRA key is for where two families use one component name
    key_markers: tuple[str, ...] = ("text_model",)
    # the token its prompts are padded with ("": the end token, as CLIP's own tokenizer pads;
    # OpenCLIP's encoders were trained padding with "!", id 0)
    pad_token: str = ""
    # diffusers keeps one layer fewer than the original model has: its last hidden state is the
    # original's penultimate layer (so a file holding the whole model has one layer to drop)
    cuts_last_layer: bool = False
    # what ComfyUI's CLIP calls it: its weights there are ``<comfy_name>.transformer.<Hugging Face name>``
    comfy_name: str = ""


@dataclass(frozen=True)
class LoRANaming:
    """How LoRA files name a family's modules: the prefixes that tell a key's component and the
    spellings of each module, written as small functions so that a new layout is one declaration.

    ``component_prefixes`` maps a key prefix to the component it names (longest prefix wins).
    ``spellings(component, path, original_path)`` lists every name a file may use for a module
    (``original_path``: the module's path in the original checkpoint tree, when it has one);
    ``naming_of(key)`` says which naming a key uses (two keys of one naming spell a module alike);
    ``normalize(key)`` gives a key without a component prefix one, and fixes old spellings.
    """

    component_prefixes: Mapping[str, str]
    denoiser_kohya_prefix: str  # kohya's prefix for the denoiser's modules (text encoders: TextEncoder)
    spellings: Callable[[str, str, str | None], list[str]]
    naming_of: Callable[[str], str]
    normalize: Callable[[str], str]  # a file key -> the one spelling of its module this naming reads
    # which block a (normalized) key changes, in people's words (``("double blocks", 3)``), and
    # the order those groups are listed in; None: the family's files are not described by blocks
    block_of: Callable[[str], tuple[str, int | None] | None] | None = None
    block_groups: tuple[str, ...] = ()

    def component_of(self, key: str) -> str | None:
        """The component a LoRA key belongs to, or None when no prefix of this naming fits."""
        for prefix in self._prefixes_longest_first:
            if key.startswith(prefix):
                return self.component_prefixes[prefix]
        return None

    @functools.cached_property
    def _prefixes_longest_first(self) -> list[str]:
        return sorted(self.component_prefixes, key=len, reverse=True)


@dataclass(frozen=True, eq=False)
class Family:
    """A model family. Compared by identity: there is one object per family.

    Detection uses the ``*_markers`` and widths; a family with no marker of a kind matches any
    input of that kind, so the registry tries families most specific first.
    """

    id: str  # as files, facts and ``inspect --json`` spell it
    display_name: str  # as people write it
    text_encoders: tuple[TextEncoder, ...]
    naming: LoRANaming
    # where a single-file checkpoint keeps the denoiser and the VAE
    denoiser_checkpoint_prefix: str
    vae_checkpoint_prefix: str
    # UNet config entries that only this family has (all must match); empty: any UNet config
    unet_config_markers: Mapping[str, Any]
    # single-file checkpoint key prefixes only this family has (any one is enough)
    checkpoint_markers: tuple[str, ...]
    # width of the cross-attention context (what attn2.to_k reads): the released models', then
    # those of the built-in tiny models, which are told apart the same way
    context_widths: tuple[int, ...]
    builtin_context_widths: tuple[int, ...] = ()
    # the denoiser and the VAE: their component names and diffusers classes
    denoiser: str = "unet"
    denoiser_class: str = "UNet2DConditionModel"
    vae: str = "vae"
    vae_class: str = "AutoencoderKL"
    # how a single-file checkpoint lays out its keys: models/ has one converter per layout
    checkpoint_layout: str = "ldm"
    # the cross-attention key projection of the denoiser (module path suffix): the width it
    # reads tells families apart when nothing else does
    context_key: str = "attn2.to_k"
    # kohya sd-scripts' ss_base_model_version: what we write, and the prefixes we recognise
    kohya_version: str = ""
    kohya_version_prefixes: tuple[str, ...] = ()
    kohya_v_prediction_version: str = ""  # written instead for a v-prediction base ("" : the same)
    kohya_original_unet_names: bool = False  # kohya names the UNet by the original (SGM) tree
    kohya_network_module: str = "networks.lora"  # sd-scripts' ss_network_module for a plain LoRA of it
    pipeline_class: str = ""  # the diffusers pipeline that draws with it
    pipeline_class_marker: str = ""  # text of a model_index.json ``_class_name`` that says this family
    pipeline_options: Mapping[str, Any] = field(default_factory=dict)  # extra constructor arguments
    # the UNet also takes the pooled text embedding and size/crop ids (SDXL's added conditioning)
    pooled_text_conditioning: bool = False
    # sampler name (ComfyUI's names) -> (diffusers scheduler class, config changes)
    samplers: Mapping[str, tuple[str, Mapping[str, Any]]] = field(default_factory=dict)
    # the image size (pixels) a base was built for, from its components
    native_size_of: Callable[[Mapping[str, Any]], int] | None = None
    vae_upcast_in_fp16: bool = False  # its VAE overflows in float16 unless the config says otherwise
    # trained by flow matching (the denoiser predicts noise - data along a straight path), not by
    # noise (epsilon) or v prediction on a diffusion schedule
    flow_matching: bool = False
    # distilled to take the guidance scale as an input (one pass per step), not classifier-free
    # guidance (two passes); the Sample node's ``guidance`` input reaches it
    guidance_distilled: bool = False
    # the CLIP hidden layer its prompts are read from (as diffusers' encoders number them: -1 the
    # last, -2 the penultimate), as its pipeline and ComfyUI read it when nothing says otherwise
    # (ComfyUI's CLIPSetLastLayer, A1111's clip skip); a family that reads the last layer reads
    # any other through the final layer norm too, one that reads an earlier one never does
    text_layer: int = -1
    # for a denoiser whose original checkpoint tree differs from diffusers' by more than names
    # (fused weights): (module path -> weight shape) -> (path -> original path for modules that
    # are one weight in both), (fused original path -> its pieces, see LoRATarget.fused_targets)
    original_modules: Callable[[Mapping[str, Sequence[int]]],
                               tuple[dict[str, str], dict[str, tuple[tuple[str, int, int], ...]]]] | None = None
    # the ``type`` names ComfyUI's CLIP loaders give this family's text encoders (CLIPLoader,
    # DualCLIPLoader); families sharing one are told apart by the encoder's width (context_widths)
    comfy_clip_types: tuple[str, ...] = ()
    # where ComfyUI's DualCLIPLoader lists this family's type (its first comfy_clip_types name) among
    # its choices (0: first, the default); None: a family DualCLIPLoader does not load
    comfy_dual_clip_place: int | None = None
    # what tells a v-prediction model of this family from its weights when the file carries no
    # marker: (single-file key, the population standard deviation above which it predicts v)
    v_prediction_probe: tuple[str, float] | None = None

    def __repr__(self) -> str:
        return f"<family {self.id}>"

    @property
    def text_components(self) -> tuple[str, ...]:
        """The text encoders' component names, in order."""
        return tuple(t.component for t in self.text_encoders)

    @property
    def all_context_widths(self) -> tuple[int, ...]:
        """Every cross-attention context width that tells this family: the released models' and the
        built-in tiny models'."""
        return (*self.context_widths, *self.builtin_context_widths)

    @property
    def lora_components(self) -> tuple[str, ...]:
        """The components a LoRA can change: the denoiser and the text encoders."""
        return (self.denoiser, *self.text_components)

    @property
    def pipeline_parts(self) -> tuple[str, ...]:
        """The components of its diffusers pipeline, in ``model_index.json`` order."""
        text = [name for t in self.text_encoders for name in (t.component, t.tokenizer)]
        return (self.denoiser, self.vae, *text, "scheduler")

    @property
    def model_parts(self) -> tuple[str, ...]:
        """The pipeline parts that are torch modules with a ``config.json`` of their own."""
        return tuple(p for p in self.pipeline_parts if not p.startswith(("tokenizer", "scheduler")))

    def text_encoder(self, component: str) -> TextEncoder:
        """The text encoder declared under a component name."""
        return next(t for t in self.text_encoders if t.component == component)

    @property
    def tokenizers(self) -> tuple[str, ...]:
        return tuple(t.tokenizer for t in self.text_encoders)

    def same_layout(self, other: Family) -> bool:
        """Whether pipelines of both families hold the same parts (their folders look alike)."""
        return self.pipeline_parts == other.pipeline_parts

    def matches_unet_config(self, config: Mapping[str, Any]) -> bool:
        """Whether a denoiser config is this family's: every marker matches (``...``: is present)."""
        return all(key in config if value is ... else config.get(key) == value
                   for key, value in self.unet_config_markers.items())

    def matches_checkpoint(self, keys: list[str]) -> bool:
        return any(key.startswith(self.checkpoint_markers) for key in keys)

    def kohya_name(self, component: str, path: str, original_path: str | None) -> str:
        """The name kohya's sd-scripts writes for a module in this family's LoRA files."""
        if component == self.denoiser:
            if self.kohya_original_unet_names and original_path is not None:
                path = original_path
            prefix = self.naming.denoiser_kohya_prefix
        else:
            prefix = self.text_encoder(component).kohya_prefix
        return kohya_spelling(prefix, path)

    def kohya_version_for(self, components: Mapping[str, Any]) -> str:
        """kohya's base model version for a base of this family with these components (sd-scripts'
        spelling; it tells a v-prediction base by its scheduler)."""
        scheduler_config = getattr(components.get("scheduler"), "config", None) or {}
        if self.training_objective(scheduler_config) == "v_prediction" and self.kohya_v_prediction_version:
            return self.kohya_v_prediction_version
        return self.kohya_version

    def training_objective(self, scheduler_config: Mapping[str, Any]) -> str:
        """What the denoiser learns to predict: ``epsilon`` (the noise), ``v_prediction`` or
        ``flow_matching`` (the velocity noise - data)."""
        if self.flow_matching:
            return "flow_matching"
        return "v_prediction" if scheduler_config.get("prediction_type") == "v_prediction" else "epsilon"

    def native_size(self, components: Mapping[str, Any]) -> int:
        """The image size (pixels) a base of this family with these components was built for."""
        if self.native_size_of is None:
            raise NotImplementedError(f"{self.display_name} declares no native size")
        return self.native_size_of(components)

    def make_pipeline(self, parts: Mapping[str, Any]) -> Any:
        """Its diffusers pipeline over ``parts`` (components; nothing is copied)."""
        import diffusers  # deferred: diffusers takes seconds to import

        return getattr(diffusers, self.pipeline_class)(**parts, **self.pipeline_options)

    def load_pipeline(self, folder: Any) -> Any:
        """Its diffusers pipeline from a local folder (nothing is downloaded)."""
        import diffusers  # deferred: diffusers takes seconds to import

        pipeline_class = getattr(diffusers, self.pipeline_class)
        return pipeline_class.from_pretrained(folder, local_files_only=True, **self.pipeline_options)


class HostPiece(NamedTuple):
    """Where a model another program holds (ComfyUI's MODEL and CLIP) keeps one of our parameters,
    or some of its rows: the ``lora`` and ``models`` packages meet here (see models.hosted)."""

    key: str  # the host's parameter name
    rows: range | None = None  # the rows of the host's tensor that hold it (None: the whole tensor)
    own_rows: range | None = None  # the rows of our parameter those are (None: all of them)


class LoRATarget(Protocol):
    """What the ``lora`` package needs of a loaded base (``models.BaseModel`` is one)."""

    source: str

    @property
    def family(self) -> Family: ...

    @property
    def lora_targets(self) -> Mapping[str, nn.Module]:
        """Every module a LoRA can change, as ``component.module_path`` (file spelling)."""

    @property
    def lora_name_index(self) -> Mapping[str, str]:
        """Every name a LoRA file may use for a target -> the target."""

    @property
    def fused_targets(self) -> Mapping[str, tuple[tuple[str, int, int], ...]]:
        """Modules that files may name as one but the base holds as several (Flux's fused q/k/v):
        name (as in :attr:`lora_name_index`'s values) -> pieces ``(target, first_row, end_row)``.

        The fused module's output rows are its pieces' rows in order: each target's weight is the
        concatenation of its pieces' row ranges, so a piece list can also reorder a target's rows.
        """

    @property
    def kohya_names(self) -> Mapping[str, str]:
        """Target -> the name kohya's sd-scripts writes for it in this family's files (targets that
        one fused module holds share its name)."""

    @property
    def components(self) -> Mapping[str, Any]: ...

    @property
    def native_size(self) -> int:
        """The image size (pixels) the base was built for."""
