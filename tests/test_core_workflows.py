"""ComfyUI graphs of ComfyUI's own core nodes, run headless: the templates in workflows/comfyui/ (UI format,
and their API-format twins in api/) run with ``lora-nodes run FILE --models-dir DIR`` from a models folder
of config-less single files and LoRAs, and the image core nodes do what ComfyUI's do.

The templates keep ComfyUI's sizes (512x512 and 20 steps, Flux 1024x1024): the runs here shrink them with
``--set`` (the tiny models draw anything in a few steps).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import EXAMPLE_LORA, WORKFLOWS
from PIL import Image
from PIL.PngImagePlugin import PngInfo
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from lora_nodes import cli
from lora_nodes.graph import Link, load_workflow, parse_workflow
from lora_nodes.graph.comfy.widgets import CONTROL_VALUES
from lora_nodes.nodes import catalogue
from lora_nodes.nodes.core.images import image_scale, read_picture

TEMPLATES = WORKFLOWS / "comfyui"
NAMES = ["default", "lora", "multiple_loras", "img2img", "hires_fix", "flux_lora"]
FLUX_LORA = WORKFLOWS / "loras" / "tiny_flux_style.safetensors"
EDITOR_TYPES = {"Reroute", "Note", "PrimitiveNode"}  # the editor's own: never queued
# what each template's run here changes: small sizes and 2 steps for the tiny models (node ids are the files')
SMALL = {  # the tiny models' VAEs halve a side, where real ones divide it by 8: 32 pixels are 16 latent cells
    "default": ["5.width=32", "5.height=32", "3.steps=2"],
    "img2img": ["12.width=32", "12.height=32", "3.steps=2"],
    "hires_fix": ["5.width=32", "5.height=32", "3.steps=2", "14.width=64", "14.height=64", "15.steps=2"],
    "flux_lora": ["5.width=32", "5.height=32", "3.steps=2"],
}
SMALL["lora"] = SMALL["multiple_loras"] = SMALL["default"]
LORA_NODES = {"lora": ["10"], "multiple_loras": ["10", "11"], "img2img": ["10"], "hires_fix": ["10"],
              "flux_lora": ["10"]}


def ui_file(name: str) -> Path:
    return TEMPLATES / f"{name}.json"


def api_file(name: str) -> Path:
    return TEMPLATES / "api" / f"{name}.json"


def strengths(name: str, value: float) -> list[str]:
    """--set values putting every LoRA of template ``name`` at ``value`` (LoraLoaderModelOnly has no clip side).

    The templates have every LoRA at 1: a run without these is the strength 1 run."""
    sets = []
    for node_id in LORA_NODES[name]:
        sets.append(f"{node_id}.strength_model={value}")
        if name != "flux_lora":
            sets.append(f"{node_id}.strength_clip={value}")
    return sets


# --------------------------------------------------------------------------- the models folder


def without_embedded_configs(path: Path) -> Path:
    """Rewrite a single file we saved without our embedded configs: what shapes cannot tell must be found."""
    with safe_open(str(path), "pt") as f:
        metadata = dict(f.metadata() or {})
    tensors = load_file(str(path))
    assert metadata.pop("lora_nodes_configs", None) is not None  # the key our single files write
    save_file(tensors, str(path), metadata=metadata)
    return path


def ldm_vae_file(vae) -> dict[str, torch.Tensor]:
    """A diffusers VAE in LDM names, as BFL's ``ae.safetensors`` keeps it (attention as 1x1 convs)."""
    from lora_nodes.models.ldm import vae_key_map

    names = vae_key_map(vae.config)
    return {names[k]: (v.reshape(*v.shape, 1, 1) if ".attentions." in k and v.ndim == 2 else v).contiguous()
            for k, v in vae.state_dict().items()}


@pytest.fixture(scope="module")
def models(tiny, flux, tmp_path_factory) -> Path:
    """A ComfyUI models folder (and input folder beside it) with the names the templates use.

    builtin:tiny is the SD checkpoint and builtin:tiny-flux the Flux files, saved by our own save
    functions with their embedded configs stripped; the LoRAs are the examples, and one made here.
    """
    from lora_nodes.lora.synthetic import synthetic_lora
    from lora_nodes.models.save import save_single_file
    from lora_nodes.models.text_names import file_state_dict

    root = tmp_path_factory.mktemp("comfy")
    folders = {kind: root / "models" / kind for kind in ("checkpoints", "loras", "diffusion_models",
                                                           "text_encoders", "vae")}
    for folder in folders.values():
        folder.mkdir(parents=True)
    (folders["loras"] / "styles").mkdir()
    without_embedded_configs(save_single_file(tiny, folders["checkpoints"] / "v1-5-pruned-emaonly-fp16.safetensors"))
    without_embedded_configs(save_single_file(flux, folders["diffusion_models"] / "flux1-dev.safetensors"))
    save_file(file_state_dict(flux.components["text_encoder"]), str(folders["text_encoders"] / "clip_l.safetensors"))
    t5 = {k: v.contiguous() for k, v in flux.components["text_encoder_2"].state_dict().items()
          if k != "encoder.embed_tokens.weight"}  # the tied embedding once, as shared.weight (ComfyUI's files)
    save_file(t5, str(folders["text_encoders"] / "t5xxl_fp16.safetensors"))
    save_file(ldm_vae_file(flux.components["vae"]), str(folders["vae"] / "ae.safetensors"))
    shutil.copy(EXAMPLE_LORA, folders["loras"] / "watercolor_style.safetensors")
    save_file(synthetic_lora(tiny, seed=11), str(folders["loras"] / "styles" / "ink_outline.safetensors"))
    shutil.copy(FLUX_LORA, folders["loras"] / "flux_watercolor_style.safetensors")
    (root / "input").mkdir()
    Image.fromarray(gradient(40, 48)).save(root / "input" / "example.png")
    return root


def gradient(height: int, width: int) -> np.ndarray:
    """An 8-bit RGB picture with something in it: red across, green down, blue constant."""
    y, x = np.mgrid[0:height, 0:width]
    return np.stack([x * 255 // (width - 1), y * 255 // (height - 1), np.full_like(x, 90)], -1).astype(np.uint8)


@pytest.fixture(scope="module")
def run(models, tmp_path_factory):
    """``run(file, *sets)``: the PNGs ``lora-nodes run FILE --models-dir ...`` writes, by path; runs once per call."""
    done: dict[tuple, dict[str, np.ndarray]] = {}
    cache = tmp_path_factory.mktemp("cache")

    def run_file(path: Path, *sets: str) -> dict[str, np.ndarray]:
        key = (str(path), sets)
        if key not in done:
            out = tmp_path_factory.mktemp("out")
            args = ["run", str(path), "--models-dir", str(models / "models"), "--input-dir", str(models / "input"),
                    "--output-dir", str(out), "--cache-dir", str(cache)]
            for value in sets:
                args += ["--set", value]
            assert cli.main(args) == 0, f"{path.name} {sets} failed"
            done[key] = {p.relative_to(out).as_posix(): np.asarray(Image.open(p)) for p in sorted(out.rglob("*.png"))}
        return done[key]

    return run_file


def only_picture(pictures: dict[str, np.ndarray], prefix: str) -> np.ndarray:
    found = [pixels for path, pixels in pictures.items() if path.startswith(prefix)]
    assert len(found) == 1, list(pictures)
    return found[0]


def bypassed(name: str, node_ids: list[str], tmp_path: Path) -> Path:
    """The UI template with nodes bypassed (mode 4): ComfyUI then hands their inputs straight on."""
    data = json.loads(ui_file(name).read_text())
    for node in data["nodes"]:
        if str(node["id"]) in node_ids:
            node["mode"] = 4
    path = tmp_path / f"{name}_bypassed.json"
    path.write_text(json.dumps(data))
    return path


# --------------------------------------------------------------------------- the templates as files


@pytest.mark.parametrize("name", NAMES)
def test_templates_are_comfyui_ui_files_of_core_nodes_with_api_twins(name):
    data = json.loads(ui_file(name).read_text())
    core = {spec.id for spec in catalogue().values() if spec.comfy_core}
    types = {node["type"] for node in data["nodes"]}
    assert types - EDITOR_TYPES <= core and "Reroute" in types
    for node in data["nodes"]:
        if node["type"] not in EDITOR_TYPES:
            assert isinstance(node.get("widgets_values"), list) or node["type"] in ("VAEDecode", "VAEEncode",
                                                                                    "PreviewImage"), node
        if node["type"] == "KSampler":  # seed, control_after_generate, steps, cfg, sampler, scheduler, denoise
            assert len(node["widgets_values"]) == 7 and node["widgets_values"][1] in CONTROL_VALUES
    api = json.loads(api_file(name).read_text())
    assert {body["class_type"] for body in api.values()} == types - EDITOR_TYPES
    # the API twin is the graph ComfyUI would queue for the UI file: the same nodes, inputs and links
    assert graph_of(parse_workflow(api, TEMPLATES)) == graph_of(load_workflow(ui_file(name)))


def graph_of(workflow) -> dict[str, tuple[str, dict]]:
    """Types, literal inputs and links as (node, output index): what runs, however the file wrote it."""
    cat = catalogue()
    graph = {}
    for node_id, call in workflow.nodes.items():
        inputs = {}
        for name, value in call.inputs.items():
            if isinstance(value, Link):
                value = ("link", value.node, cat[workflow.nodes[value.node].type].output_index(value.output))
            inputs[name] = value
        graph[node_id] = (cat[call.type].id, inputs)
    return graph


def test_convert_keeps_core_node_ids_unprefixed_both_ways(models, tmp_path):
    mine = tmp_path / "lora.yaml"
    folders = ["--models-dir", str(models / "models")]  # the files keep their names in the models folder
    assert cli.main(["convert", str(ui_file("lora")), "--to", "yaml", "-o", str(mine), *folders]) == 0
    text = mine.read_text()
    assert "type: KSampler" in text and "type: LoraLoader" in text and "lora-nodes." not in text
    for to in ("comfyui-api", "comfyui-ui"):
        target = tmp_path / f"lora_{to}.json"
        assert cli.main(["convert", str(mine), "--to", to, "-o", str(target), *folders]) == 0
        data = json.loads(target.read_text())
        types = [body["class_type"] for body in data.values()] if to == "comfyui-api" else \
            [node["type"] for node in data["nodes"]]
        assert "KSampler" in types and not any(t.startswith("lora-nodes.") for t in types)
        assert graph_of(load_workflow(target)) == graph_of(load_workflow(mine))
    assert graph_of(load_workflow(mine)) == graph_of(load_workflow(ui_file("lora")))


def test_a_ui_file_with_node_types_we_lack_gives_the_one_unsupported_nodes_problem(tmp_path, capsys):
    data = json.loads(ui_file("default").read_text())
    extra = [(40, "UpscaleModelLoader", 0), (41, "FaceDetailer", 0), (42, "SomeoneElsesNode", 2)]  # 42: muted
    for node_id, node_type, mode in extra:
        data["nodes"].append({"id": node_id, "type": node_type, "pos": [0, 0], "size": [200, 60], "flags": {},
                              "order": node_id, "mode": mode, "inputs": [], "outputs": [], "widgets_values": []})
    path = tmp_path / "with_custom_nodes.json"
    path.write_text(json.dumps(data))
    assert cli.main(["validate", str(path), "--json"]) == 2
    [problem] = json.loads(capsys.readouterr().out)
    assert problem["code"] == "unsupported_nodes"
    assert "FaceDetailer (node 41)" in problem["message"] and "UpscaleModelLoader (node 40)" in problem["message"]
    assert "SomeoneElsesNode" not in problem["message"]  # muted: ComfyUI would not run it either
    assert "KSampler" not in problem["message"] and "lora-nodes nodes" in problem["message"]


def test_lora_nodes_nodes_lists_the_core_nodes_after_ours_and_json_stays_ours(capsys):
    assert cli.main(["nodes"]) == 0
    text = capsys.readouterr().out
    ours, _, core = text.partition("ComfyUI core nodes")
    assert "\nSample  (" in ours and "\nKSampler  (" not in ours
    for node_type in ("LoadImage", "ImageScale", "SaveImage", "PreviewImage"):
        assert f"\n{node_type}  (" in core
    assert cli.main(["nodes", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert "Sample" in listed and not {"SaveImage", "LoadImage", "KSampler"} & set(listed)


# --------------------------------------------------------------------------- the templates, run headless


@pytest.mark.parametrize("name", NAMES)
def test_each_template_runs_headless_and_its_api_twin_draws_the_same(name, run):
    from_ui = run(ui_file(name), *SMALL[name])
    from_api = run(api_file(name), *SMALL[name])
    assert from_ui and from_ui.keys() == from_api.keys()
    for path, pixels in from_ui.items():
        assert pixels.ndim == 3 and pixels.shape[2] == 3 and pixels.std() > 0, path  # a picture, not a flat field
        assert np.array_equal(pixels, from_api[path]), path


@pytest.mark.parametrize("name", ["lora", "multiple_loras"])
def test_strength_0_draws_the_base_picture_and_strength_1_another(name, run):
    base = only_picture(run(ui_file("default"), *SMALL["default"]), "default")
    off = only_picture(run(ui_file(name), *SMALL[name], *strengths(name, 0)), name)
    on = only_picture(run(ui_file(name), *SMALL[name]), name)
    assert np.array_equal(off, base)
    assert np.abs(on.astype(int) - base.astype(int)).mean() > 1


@pytest.mark.parametrize("name", ["img2img", "hires_fix", "flux_lora"])
def test_strength_0_draws_what_the_graph_draws_without_its_lora(name, run, tmp_path):
    prefix = json.loads(api_file(name).read_text())["9"]["inputs"]["filename_prefix"]
    base = only_picture(run(bypassed(name, LORA_NODES[name], tmp_path), *SMALL[name]), prefix)
    off = only_picture(run(ui_file(name), *SMALL[name], *strengths(name, 0)), prefix)
    on = only_picture(run(ui_file(name), *SMALL[name]), prefix)
    assert np.array_equal(off, base)
    assert np.abs(on.astype(int) - base.astype(int)).mean() > 1


def test_img2img_draws_at_the_size_image_scale_gives(run):
    """ImageScale makes the 48x40 picture 32x32 (centre crop); VAEEncode and VAEDecode keep that size."""
    assert only_picture(run(ui_file("img2img"), *SMALL["img2img"]), "img2img").shape == (32, 32, 3)


def test_hires_fix_previews_the_first_pass_and_saves_the_upscaled_second(run):
    pictures = run(ui_file("hires_fix"), *SMALL["hires_fix"])
    first, second = only_picture(pictures, "previews/"), only_picture(pictures, "hires_fix")
    assert second.shape == (64, 64, 3) and first.shape == (32, 32, 3)  # the sizes asked for, in pixels


def test_a_comfyui_png_and_our_yaml_of_a_template_draw_what_its_ui_file_draws(run, models, tmp_path):
    """ComfyUI's PNGs carry the API prompt; our YAML keeps ComfyUI's node ids and names (convert both ways)."""
    expected = only_picture(run(ui_file("lora"), *SMALL["lora"]), "lora")
    info = PngInfo()
    info.add_text("prompt", api_file("lora").read_text())
    png = tmp_path / "ComfyUI_00001_.png"
    Image.new("RGB", (8, 8)).save(png, pnginfo=info)
    assert np.array_equal(only_picture(run(png, *SMALL["lora"]), "lora"), expected)
    mine = tmp_path / "lora.yaml"
    assert cli.main(["convert", str(ui_file("lora")), "--to", "yaml", "-o", str(mine),
                     "--models-dir", str(models / "models")]) == 0
    assert np.array_equal(only_picture(run(mine, *SMALL["lora"]), "lora"), expected)


# --------------------------------------------------------------------------- the image nodes


def test_load_image_gives_the_colours_and_one_minus_alpha_as_comfyui_does(tmp_path):
    rgba = np.concatenate([gradient(6, 5), np.arange(30, dtype=np.uint8).reshape(6, 5, 1) * 8], axis=-1)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    image, mask = read_picture(str(tmp_path / "a.png"))
    assert image.shape == (1, 6, 5, 3) and mask.shape == (1, 6, 5)
    assert torch.equal(image[0], torch.from_numpy(rgba[..., :3].astype(np.float32) / 255))  # colours kept, not blended
    assert torch.equal(mask[0], torch.from_numpy(1 - rgba[..., 3].astype(np.float32) / 255))
    Image.fromarray(gradient(6, 5)).save(tmp_path / "b.png")
    _, mask = read_picture(str(tmp_path / "b.png"))
    assert torch.equal(mask, torch.zeros(1, 64, 64))  # no alpha: ComfyUI's empty 64x64 mask


def test_load_image_turns_by_exif_and_reads_every_frame_of_an_animation(tmp_path):
    picture = gradient(4, 6)
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: turned 90 degrees clockwise to view
    Image.fromarray(picture).save(tmp_path / "turned.png", exif=exif)
    image, _ = read_picture(str(tmp_path / "turned.png"))
    assert image.shape == (1, 6, 4, 3)
    assert torch.equal(image[0], torch.from_numpy(np.rot90(picture, k=-1).astype(np.float32) / 255))
    frames = [Image.fromarray(np.full((4, 4, 3), value, np.uint8)) for value in (0, 128, 255)]
    frames[0].save(tmp_path / "anim.webp", save_all=True, append_images=frames[1:], lossless=True)
    image, mask = read_picture(str(tmp_path / "anim.webp"))
    assert image.shape == (3, 4, 4, 3) and mask.shape[0] == 3
    assert [round(float(frame.mean()) * 255) for frame in image] == [0, 128, 255]


def test_image_scale_follows_comfyuis_rules():
    picture = torch.arange(2 * 4 * 3, dtype=torch.float32).reshape(1, 2, 4, 3) / 24  # [batch, H=2, W=4, 3]
    [doubled] = image_scale.run(None, picture, "nearest-exact", 8, 4, "disabled")
    assert torch.equal(doubled, picture.repeat_interleave(2, dim=1).repeat_interleave(2, dim=2))
    [same] = image_scale.run(None, picture, "bilinear", 0, 0, "disabled")
    assert same is picture  # both 0: unchanged
    [by_height] = image_scale.run(None, picture, "nearest-exact", 0, 1, "disabled")
    assert by_height.shape == (1, 1, 2, 3)  # width from the aspect ratio: 4 * 1 / 2
    # centre crop to the new (square) aspect first: the middle 2x2; then area: its mean
    [cropped] = image_scale.run(None, picture, "area", 1, 1, "center")
    assert torch.allclose(cropped[0, 0, 0], picture[0, :, 1:3].mean(dim=(0, 1)))
    [lanczos] = image_scale.run(None, picture, "lanczos", 8, 4, "disabled")
    eight_bit = Image.fromarray((picture[0].numpy() * 255).round().astype(np.uint8))
    expected = np.asarray(eight_bit.resize((8, 4), Image.Resampling.LANCZOS), dtype=np.float32) / 255
    assert torch.equal(lanczos[0], torch.from_numpy(expected))


def test_the_image_nodes_are_declared_as_comfyui_declares_them():
    cat = catalogue()
    scale = cat["ImageScale"]
    assert [(i.name, i.type) for i in scale.inputs] == [("image", "IMAGE"), ("upscale_method", "COMBO"),
                                                        ("width", "INT"), ("height", "INT"), ("crop", "COMBO")]
    assert scale.input("upscale_method").choices == ("nearest-exact", "bilinear", "area", "bicubic", "lanczos")
    assert (scale.input("width").default, scale.input("width").min, scale.input("width").max) == (512, 0, 16384)
    assert [o.type for o in cat["LoadImage"].outputs] == ["IMAGE", "MASK"]
    assert cat["SaveImage"].input("filename_prefix").default == "ComfyUI" and cat["SaveImage"].output_node
    assert [i.name for i in cat["PreviewImage"].inputs] == ["images"] and cat["PreviewImage"].output_node
    assert all(cat[t].comfy_core and cat[t].comfy_id == t for t in ("LoadImage", "ImageScale", "SaveImage",
                                                                   "PreviewImage"))

