"""The ComfyUI core nodes we run are declared as ComfyUI declares them.

ComfyUI's UI files give widget values by position, and its API files by name, so a node's input
names, their order, which are optional, the defaults, ranges and choices, and the output types must
be ComfyUI's. The table below was written by hand from ComfyUI's own declarations (``nodes.py`` and
``comfy_extras/nodes_flux.py``, ``nodes_sd3.py``), not taken from our code; where ours differs on
purpose, the entry says why.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest

from lora_nodes.graph.load import parse_workflow
from lora_nodes.graph.validate import check
from lora_nodes.modelfolders import models_dir_folders, using_folders
from lora_nodes.nodes import catalogue
from lora_nodes.nodes.core import core_specs

MAX_RESOLUTION = 16384  # ComfyUI's nodes.MAX_RESOLUTION
UNSET = object()  # ComfyUI declares no default (a link), or none beyond its combo's first choice


@dataclass(frozen=True)
class Declared:
    """One input as ComfyUI declares it."""

    name: str
    type: str  # ComfyUI's type; "COMBO" for a fixed list of choices
    default: Any = UNSET
    min: float | None = None
    max: float | None = None
    step: float | None = None
    choices: tuple[str, ...] = ()
    optional: bool = False  # in ComfyUI's "optional" section
    folder: str | None = None  # a combo of the files ComfyUI finds in this models folder at run time
    multiline: bool = False


def combo(name: str, *choices: str, optional: bool = False) -> Declared:
    """A fixed list of choices: ComfyUI's default is its first."""
    return Declared(name, "COMBO", choices[0], choices=choices, optional=optional)


def files(name: str, folder: str) -> Declared:
    """A combo of file names ComfyUI lists from a models folder when it starts. Ours on purpose: a
    path input found by name in that folder (any name, checked before running, near names offered),
    because the list is only known at run time and a headless run takes paths too."""
    return Declared(name, "STRING", folder=folder)


# comfy/samplers.py: KSAMPLER_NAMES + ["ddim", "uni_pc", "uni_pc_bh2"], and SCHEDULER_HANDLERS' keys
COMFY_SAMPLERS = (
    "euler", "euler_cfg_pp", "euler_ancestral", "euler_ancestral_cfg_pp", "heun", "heunpp2", "dpm_2",
    "dpm_2_ancestral", "lms", "dpm_fast", "dpm_adaptive", "dpmpp_2s_ancestral", "dpmpp_2s_ancestral_cfg_pp",
    "dpmpp_sde", "dpmpp_sde_gpu", "dpmpp_2m", "dpmpp_2m_cfg_pp", "dpmpp_2m_sde", "dpmpp_2m_sde_gpu",
    "dpmpp_2m_sde_heun", "dpmpp_2m_sde_heun_gpu", "dpmpp_3m_sde", "dpmpp_3m_sde_gpu", "ddpm", "lcm", "ipndm",
    "ipndm_v", "deis", "res_multistep", "res_multistep_cfg_pp", "res_multistep_ancestral",
    "res_multistep_ancestral_cfg_pp", "gradient_estimation", "gradient_estimation_cfg_pp", "er_sde", "seeds_2",
    "seeds_3", "sa_solver", "sa_solver_pece", "ddim", "uni_pc", "uni_pc_bh2",
)
COMFY_SCHEDULERS = ("simple", "sgm_uniform", "karras", "exponential", "ddim_uniform", "beta", "normal",
                    "linear_quadratic", "kl_optimal")
CLIP_TYPES = ("stable_diffusion", "stable_cascade", "sd3", "stable_audio", "mochi", "ltxv", "pixart", "cosmos",
              "lumina2", "wan", "hidream", "chroma", "ace", "omnigen2", "qwen_image", "hunyuan_image")
DUAL_CLIP_TYPES = ("sdxl", "sd3", "flux", "hunyuan_video", "hidream", "hunyuan_image")
LATENT_UPSCALE_METHODS = ("nearest-exact", "bilinear", "area", "bicubic", "bislerp")
IMAGE_UPSCALE_METHODS = ("nearest-exact", "bilinear", "area", "bicubic", "lanczos")


def lora_strength(name: str) -> Declared:
    return Declared(name, "FLOAT", 1.0, -100.0, 100.0, 0.01)


def size(name: str, default: int, minimum: int, step: int) -> Declared:
    return Declared(name, "INT", default, minimum, MAX_RESOLUTION, step)


def sampler_inputs(seed: str) -> list[Declared]:
    """KSampler's and KSamplerAdvanced's shared inputs after ``model`` (and add_noise)."""
    return [Declared(seed, "INT", 0, 0, 0xFFFFFFFFFFFFFFFF),
            Declared("steps", "INT", 20, 1, 10000),
            Declared("cfg", "FLOAT", 8.0, 0.0, 100.0, 0.1),  # ComfyUI also rounds cfg to 0.01 in its widget
            combo("sampler_name", *COMFY_SAMPLERS),
            combo("scheduler", *COMFY_SCHEDULERS),
            Declared("positive", "CONDITIONING"), Declared("negative", "CONDITIONING"),
            Declared("latent_image", "LATENT")]


# node id -> (category, inputs in order, output types)
COMFY_DECLARATIONS: dict[str, tuple[str, list[Declared], list[str]]] = {
    "CheckpointLoaderSimple": ("loaders", [files("ckpt_name", "checkpoints")], ["MODEL", "CLIP", "VAE"]),
    "UNETLoader": ("advanced/loaders", [files("unet_name", "diffusion_models"),
                                        combo("weight_dtype", "default", "fp8_e4m3fn", "fp8_e4m3fn_fast", "fp8_e5m2")],
                   ["MODEL"]),
    "CLIPLoader": ("advanced/loaders", [files("clip_name", "text_encoders"), combo("type", *CLIP_TYPES),
                                        combo("device", "default", "cpu", optional=True)], ["CLIP"]),
    "DualCLIPLoader": ("advanced/loaders", [files("clip_name1", "text_encoders"), files("clip_name2", "text_encoders"),
                                            combo("type", *DUAL_CLIP_TYPES),
                                            combo("device", "default", "cpu", optional=True)], ["CLIP"]),
    # ComfyUI adds its taesd preview VAEs and pixel_space to the files at run time: we run neither
    "VAELoader": ("loaders", [files("vae_name", "vae")], ["VAE"]),
    "LoraLoader": ("loaders", [Declared("model", "MODEL"), Declared("clip", "CLIP"), files("lora_name", "loras"),
                               lora_strength("strength_model"), lora_strength("strength_clip")], ["MODEL", "CLIP"]),
    "LoraLoaderModelOnly": ("loaders", [Declared("model", "MODEL"), files("lora_name", "loras"),
                                        lora_strength("strength_model")], ["MODEL"]),
    "CLIPTextEncode": ("conditioning", [Declared("text", "STRING", multiline=True), Declared("clip", "CLIP")],
                       ["CONDITIONING"]),
    "CLIPSetLastLayer": ("conditioning", [Declared("clip", "CLIP"),
                                          Declared("stop_at_clip_layer", "INT", -1, -24, -1, 1)], ["CLIP"]),
    "FluxGuidance": ("advanced/conditioning/flux", [Declared("conditioning", "CONDITIONING"),
                                                    Declared("guidance", "FLOAT", 3.5, 0.0, 100.0, 0.1)],
                     ["CONDITIONING"]),
    "ConditioningCombine": ("conditioning", [Declared("conditioning_1", "CONDITIONING"),
                                             Declared("conditioning_2", "CONDITIONING")], ["CONDITIONING"]),
    "ConditioningSetTimestepRange": ("advanced/conditioning", [Declared("conditioning", "CONDITIONING"),
                                                               Declared("start", "FLOAT", 0.0, 0.0, 1.0, 0.001),
                                                               Declared("end", "FLOAT", 1.0, 0.0, 1.0, 0.001)],
                                     ["CONDITIONING"]),
    "KSampler": ("sampling", [Declared("model", "MODEL"), *sampler_inputs("seed"),
                              Declared("denoise", "FLOAT", 1.0, 0.0, 1.0, 0.01)], ["LATENT"]),
    "KSamplerAdvanced": ("sampling", [Declared("model", "MODEL"), combo("add_noise", "enable", "disable"),
                                      *sampler_inputs("noise_seed"),
                                      Declared("start_at_step", "INT", 0, 0, 10000),
                                      Declared("end_at_step", "INT", 10000, 0, 10000),
                                      combo("return_with_leftover_noise", "disable", "enable")], ["LATENT"]),
    "EmptyLatentImage": ("latent", [size("width", 512, 16, 8), size("height", 512, 16, 8),
                                    Declared("batch_size", "INT", 1, 1, 4096)], ["LATENT"]),
    "EmptySD3LatentImage": ("latent/sd3", [size("width", 1024, 16, 16), size("height", 1024, 16, 16),
                                           Declared("batch_size", "INT", 1, 1, 4096)], ["LATENT"]),
    "LatentUpscale": ("latent", [Declared("samples", "LATENT"), combo("upscale_method", *LATENT_UPSCALE_METHODS),
                                 size("width", 512, 0, 8), size("height", 512, 0, 8),
                                 combo("crop", "disabled", "center")], ["LATENT"]),
    "LatentUpscaleBy": ("latent", [Declared("samples", "LATENT"), combo("upscale_method", *LATENT_UPSCALE_METHODS),
                                   Declared("scale_by", "FLOAT", 1.5, 0.01, 8.0, 0.01)], ["LATENT"]),
    "VAEDecode": ("latent", [Declared("samples", "LATENT"), Declared("vae", "VAE")], ["IMAGE"]),
    "VAEEncode": ("latent", [Declared("pixels", "IMAGE"), Declared("vae", "VAE")], ["LATENT"]),
    # ComfyUI lists the images of its input folder (and offers an upload): ours is a path found there
    "LoadImage": ("image", [files("image", "input")], ["IMAGE", "MASK"]),
    "ImageScale": ("image/upscaling", [Declared("image", "IMAGE"), combo("upscale_method", *IMAGE_UPSCALE_METHODS),
                                       size("width", 512, 0, 1), size("height", 512, 0, 1),
                                       combo("crop", "disabled", "center")], ["IMAGE"]),
    # ComfyUI's hidden inputs (prompt, extra_pnginfo) are the engine's to give, not declared inputs
    "SaveImage": ("image", [Declared("images", "IMAGE"), Declared("filename_prefix", "STRING", "ComfyUI")], []),
    "PreviewImage": ("image", [Declared("images", "IMAGE")], []),
}

SPECS = {spec.id: spec for spec in core_specs()}


def test_every_core_node_we_run_is_in_the_table():
    assert sorted(SPECS) == sorted(COMFY_DECLARATIONS)


@pytest.mark.parametrize("node_id", sorted(COMFY_DECLARATIONS))
def test_a_core_node_is_declared_as_comfyui_declares_it(node_id):
    category, declared, outputs = COMFY_DECLARATIONS[node_id]
    spec = SPECS[node_id]
    assert spec.comfy_core and spec.category == category
    assert [i.name for i in spec.inputs] == [d.name for d in declared]  # UI files give widgets by position
    assert [o.type for o in spec.outputs] == outputs
    for ours, theirs in zip(spec.inputs, declared, strict=True):
        where = f"{node_id}.{theirs.name}"
        assert ours.type == theirs.type, where
        assert ours.optional == theirs.optional, where
        assert ours.multiline == theirs.multiline, where
        if theirs.folder is not None:  # a file-name combo: a path found by name in that folder
            assert ours.path and ours.folder == theirs.folder, where
            continue
        assert not ours.path and ours.folder is None, where
        assert (ours.min, ours.max, ours.step) == (theirs.min, theirs.max, theirs.step), where
        assert tuple(ours.choices) == theirs.choices, where
        if theirs.default is UNSET:
            assert ours.required, where
        else:
            assert ours.default == theirs.default, where


def test_a_checkpoint_may_be_a_diffusers_folder_found_by_name(tmp_path):
    """CheckpointLoaderSimple says it takes a diffusers folder, and a name finds one in models/diffusers:
    validation takes that folder (here it reads the folder and names the files it lacks) rather than
    saying that it is not a file."""
    pipe = tmp_path / "models" / "diffusers" / "pipe"
    pipe.mkdir(parents=True)
    (pipe / "model_index.json").write_text("{}")
    workflow = {"format": "lora-nodes/1",
                "nodes": {"ckpt": {"type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "pipe"}}}}
    with using_folders(models_dir_folders(tmp_path / "models")):
        problems, _ = check(parse_workflow(workflow, tmp_path), catalogue())
    (problem,) = [p for p in problems if p.node == "ckpt"]
    assert f"{pipe} is not a complete diffusers pipeline folder: missing unet/config.json" in problem.message
