"""A1111's ``parameters`` chunk in the PNGs SaveImages writes, read as A1111 reads it; ``inspect``
on PNGs of ours, ComfyUI's and A1111's."""

import hashlib
import json
from pathlib import Path

import test_core_workflows as templates  # the ComfyUI templates, and the models folder they run from
from conftest import write_workflow
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from lora_nodes.cli import main
from lora_nodes.engine.scheduler import Runner
from lora_nodes.graph.load import load_workflow


def split_settings(line: str) -> list[str]:
    """The settings line's ``key: value`` items: split at commas outside double quotes."""
    items, current, quoted, escaped = [], "", False, False
    for char in line:
        if char == "," and not quoted:
            items.append(current)
            current = ""
            continue
        current += char
        if escaped:
            escaped = False
        elif char == "\\":
            escaped = True
        elif char == '"':
            quoted = not quoted
    return [item.strip() for item in [*items, current] if item.strip()]


def a1111_parse(text: str) -> dict[str, str]:
    """The chunk as A1111's PNG Info reads its format: prompt lines, then an optional line starting
    ``Negative prompt:`` (and lines after it), then one line of ``key: value`` items, a value in
    double quotes being a JSON string that may hold commas."""
    *lines, settings = text.strip().split("\n")
    prompt: list[str] = []
    negative: list[str] = []
    into = prompt
    for line in lines:
        if line.startswith("Negative prompt:"):
            into, line = negative, line[len("Negative prompt:"):]
        into.append(line.strip())
    result = {}
    for item in split_settings(settings):
        key, _, value = item.partition(":")
        value = value.strip()
        result[key.strip()] = json.loads(value) if value.startswith('"') and value.endswith('"') else value
    result["Prompt"], result["Negative prompt"] = "\n".join(prompt), "\n".join(negative)
    return result


def sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def sha256_after_header(path: Path) -> str:
    data = path.read_bytes()
    return hashlib.sha256(data[8 + int.from_bytes(data[:8], "little"):]).hexdigest()


def parameters_of(png: Path) -> str:
    with Image.open(png) as image:
        return image.info["parameters"]


WORKFLOW = """
format: lora-nodes/1
nodes:
  base:  {{type: LoadBase, inputs: {{source: "{source}"}}}}
  one:   {{type: LoadLoRA, inputs: {{path: {one}}}}}
  two:   {{type: LoadLoRA, inputs: {{path: {two}}}}}
  unused: {{type: LoadLoRA, inputs: {{path: {unused}}}}}
  first: {{type: ApplyLoRA, inputs: {{model: [base, model], lora: [one, lora], strength_model: 0.5}}}}
  stack: {{type: LoRAStack, inputs: {{lora_1: [unused, lora], enabled_1: false, lora_2: [two, lora],
           strength_model_2: 0.8, lora_3: [unused, lora], strength_model_3: 0, strength_text_3: 0}}}}
  both:  {{type: ApplyLoRAStack, inputs: {{model: [first, model], stack: [stack, stack]}}}}
  draw:  {{type: Sample, inputs: {{model: [both, model], prompt: "a red circle, on white\\nsecond line",
           negative_prompt: "blurry, dark", seed: 1234, steps: 3, cfg: 5.5, sampler: euler_ancestral,
           width: 64, height: 32, batch_size: 2}}}}
  save:  {{type: SaveImages, inputs: {{images: [draw, images], prefix: run/pic}}}}
"""


def run_params(tmp_path: Path, source: str, write_lora) -> tuple[dict[str, str], list[Path], dict[str, Path]]:
    loras = {"one": write_lora("one", metadata={"sshs_model_hash": "abcdef0123456789" * 4}),
             "two": write_lora("two", seed=2), "unused": write_lora("unused", seed=3)}
    path = write_workflow(tmp_path, WORKFLOW.format(source=source, **loras))
    runner = Runner(output_dir=tmp_path / "out")
    result = runner.run(load_workflow(path))
    pngs = sorted(Path(f) for f in result.files)
    texts = {parameters_of(png) for png in pngs}
    assert len(pngs) == 2 and len(texts) == 1  # the batch shares the node's seed
    return a1111_parse(texts.pop()), pngs, loras


def check_common(fields: dict[str, str], loras: dict[str, Path]) -> None:
    assert fields["Prompt"] == "a red circle, on white\nsecond line"
    assert fields["Negative prompt"] == "blurry, dark"
    assert fields["Steps"] == "3"
    assert fields["Sampler"] == "Euler a"
    assert fields["Schedule type"] == "Automatic"
    assert fields["CFG scale"] == "5.5"
    assert fields["Seed"] == "1234"
    assert fields["Size"] == "64x32"
    assert "Guidance" not in fields  # SD1.5 is not guidance-distilled
    # one: its sshs_model_hash; two: the sha256 of its tensor data; unused (switched off; strength 0) is left out
    expected = f"one: {'abcdef0123456789'[:12]}, two: {sha256_after_header(loras['two'])[:12]}"
    assert fields["Lora hashes"] == expected


def test_parameters_chunk_as_a1111_reads_it(tmp_path, write_lora):
    fields, _pngs, loras = run_params(tmp_path, "builtin:tiny", write_lora)
    check_common(fields, loras)
    assert fields["Model"] == "tiny" and "Model hash" not in fields  # a built-in has no file to hash
    assert set(fields) == {"Prompt", "Negative prompt", "Steps", "Sampler", "Schedule type", "CFG scale", "Seed",
                           "Size", "Model", "Lora hashes"}


def test_model_hash_of_a_single_file(tmp_path, write_lora):
    save = write_workflow(tmp_path, """
format: lora-nodes/1
nodes:
  base: {type: LoadBase, inputs: {source: "builtin:tiny"}}
  save: {type: SaveModel, inputs: {model: [base, model], path: my_model, format: single_file}}
""", "save.yaml")
    model = Path(Runner(output_dir=tmp_path / "models").run(load_workflow(save)).files[0])
    fields, pngs, loras = run_params(tmp_path, str(model), write_lora)
    check_common(fields, loras)
    assert fields["Model hash"] == sha256_file(model)[:10]
    assert fields["Model"] == "my_model"
    assert str(tmp_path) not in parameters_of(pngs[0])  # names only, no paths of the user's files


def test_file_hashes_once_per_file_version(tmp_path, write_lora, monkeypatch):
    """Two images, one LoRA without sshs_model_hash: its tensor data is hashed once, for its node's
    cache key and for both PNGs' Lora hashes."""
    from lora_nodes import tensorfiles

    calls = []
    real = tensorfiles._sha256_of

    def counting(f, start, end=None):
        if start > 0 and end is None:  # from the tensor data to the end: tensor_data_sha256
            calls.append(f.name)
        return real(f, start, end)

    monkeypatch.setattr(tensorfiles, "_sha256_of", counting)
    lora = write_lora("two", seed=2)
    path = write_workflow(tmp_path, f"""
format: lora-nodes/1
nodes:
  base: {{type: LoadBase, inputs: {{source: "builtin:tiny"}}}}
  two:  {{type: LoadLoRA, inputs: {{path: {lora}}}}}
  with: {{type: ApplyLoRA, inputs: {{model: [base, model], lora: [two, lora]}}}}
  a:    {{type: Sample, inputs: {{model: [with, model], prompt: x, steps: 1, seed: 1}}}}
  b:    {{type: Sample, inputs: {{model: [with, model], prompt: y, steps: 1, seed: 2}}}}
  save_a: {{type: SaveImages, inputs: {{images: [a, images], prefix: a}}}}
  save_b: {{type: SaveImages, inputs: {{images: [b, images], prefix: b}}}}
""")
    Runner(output_dir=tmp_path / "out").run(load_workflow(path))
    assert calls == [str(lora)]


def inspect_json(capsys, path: Path) -> dict:
    assert main(["inspect", str(path), "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def write_png(path: Path, chunks: dict[str, str]) -> Path:
    info = PngInfo()
    for key, text in chunks.items():
        info.add_text(key, text)
    Image.new("RGB", (8, 8)).save(path, pnginfo=info)
    return path


def test_inspect_an_a1111_png(tmp_path, capsys):
    text = ("masterpiece, a cat\nNegative prompt: lowres, bad hands\nSteps: 28, Sampler: DPM++ 2M, "
            "Schedule type: Karras, CFG scale: 7, Seed: 42, Size: 512x768, Model hash: 6ce0161689, "
            'Model: v1-5-pruned-emaonly, Lora hashes: "cat: 0123456789ab, hat: ba9876543210", Version: v1.10.1')
    png = write_png(tmp_path / "a1111.png", {"parameters": text})
    info = inspect_json(capsys, png)
    assert info["kind"] == "png"
    assert info["parameters"] == {
        "prompt": "masterpiece, a cat", "negative_prompt": "lowres, bad hands", "Steps": "28",
        "Sampler": "DPM++ 2M", "Schedule type": "Karras", "CFG scale": "7", "Seed": "42", "Size": "512x768",
        "Model hash": "6ce0161689", "Model": "v1-5-pruned-emaonly", "Lora hashes": "cat: 0123456789ab, hat: ba9876543210",
        "Version": "v1.10.1"}
    assert main(["inspect", str(png)]) == 0
    out = capsys.readouterr().out
    assert "A1111 parameters" in out and "Lora hashes: cat: 0123456789ab, hat: ba9876543210" in out


def test_inspect_a_comfyui_png(tmp_path, capsys):
    prompt = {"4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "v1-5.safetensors"}},
              "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "a cat", "clip": ["4", 1]}},
              "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "bad", "clip": ["4", 1]}},
              "3": {"class_type": "KSampler", "inputs": {"seed": 1, "model": ["4", 0]}},
              "9": {"class_type": "SaveImage", "inputs": {"filename_prefix": "ComfyUI"}}}
    graph = {"last_node_id": 9, "nodes": [{"id": int(k), "type": v["class_type"]} for k, v in prompt.items()],
             "links": [], "version": 0.4}
    png = write_png(tmp_path / "comfy.png", {"prompt": json.dumps(prompt), "workflow": json.dumps(graph)})
    info = inspect_json(capsys, png)
    assert info["prompt"] == {"nodes": 5, "types": {"CheckpointLoaderSimple": 1, "CLIPTextEncode": 2,
                                                     "KSampler": 1, "SaveImage": 1}}
    assert info["workflow"]["nodes"] == 5 and "parameters" not in info and "lora-nodes" not in info
    assert main(["inspect", str(png)]) == 0
    assert "5 nodes: CheckpointLoaderSimple, CLIPTextEncode x2, KSampler, SaveImage" in capsys.readouterr().out


def test_inspect_our_png_shows_every_chunk(tmp_path, write_lora, capsys):
    _fields, pngs, _loras = run_params(tmp_path, "builtin:tiny", write_lora)
    info = inspect_json(capsys, pngs[0])
    assert set(info) == {"kind", "path", "lora-nodes", "prompt", "workflow", "parameters"}
    assert info["lora-nodes"]["types"]["LoadLoRA"] == 3
    assert info["parameters"]["Sampler"] == "Euler a" and info["parameters"]["negative_prompt"] == "blurry, dark"


def test_a_png_without_chunks(tmp_path, capsys):
    png = write_png(tmp_path / "plain.png", {})
    assert main(["inspect", str(png)]) == 0
    assert "no text chunks" in capsys.readouterr().out


def test_guidance_for_guidance_distilled_models_only(tmp_path):
    from lora_nodes.graph.parameters import parameters_chunk
    from lora_nodes.graph.validate import bind
    from lora_nodes.nodes import catalogue

    def fields(source: str) -> dict[str, str]:
        path = write_workflow(tmp_path, f"""
format: lora-nodes/1
nodes:
  base: {{type: LoadBase, inputs: {{source: "{source}"}}}}
  draw: {{type: Sample, inputs: {{model: [base, model], prompt: x, cfg: 1.0, guidance: 4.5, width: 32, height: 48}}}}
  save: {{type: SaveImages, inputs: {{images: [draw, images]}}}}
""")
        bound = bind(load_workflow(path), catalogue())
        return a1111_parse(parameters_chunk(bound, "save", {})["parameters"])

    flux = fields("builtin:tiny-flux")
    assert flux["Guidance"] == "4.5" and flux["CFG scale"] == "1" and flux["Size"] == "32x48"
    assert "Guidance" not in fields("builtin:tiny")


# --------------------------------------------------------------------------- graphs of ComfyUI's core nodes

models = templates.models  # the fixture: config-less single files and LoRAs in a ComfyUI models folder
SMALL, api_file, ui_file = templates.SMALL, templates.api_file, templates.ui_file


def lora_file_hash(path: Path) -> str:
    """A1111's LoRA hash: the file's sshs_model_hash, else the sha256 of its tensor data; 12 digits."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        given = (f.metadata() or {}).get("sshs_model_hash")
    return (given or sha256_after_header(path))[:12]


def run_template(models: Path, out: Path, path: Path, *sets: str) -> list[Path]:
    """The PNGs ``lora-nodes run`` writes for a ComfyUI template, from the models folder of test_core_workflows."""
    args = ["run", str(path), "--models-dir", str(models / "models"), "--input-dir", str(models / "input"),
            "--output-dir", str(out)]
    for value in sets:
        args += ["--set", value]
    assert main(args) == 0
    return sorted(out.rglob("*.png"))


def test_a_comfyui_hires_fix_template_png_carries_a1111_parameters(models, tmp_path):
    """The saved picture is the second KSampler's (denoise 0.5 over the upscaled latent): it is described,
    at the final size, with the checkpoint's and the LoRA's hashes; the first pass's preview too."""
    pngs = run_template(models, tmp_path, ui_file("hires_fix"), *SMALL["hires_fix"])
    api = json.loads(api_file("hires_fix").read_text())
    [saved] = [p for p in pngs if p.name.startswith("hires_fix")]
    text = parameters_of(saved)
    fields = a1111_parse(text)
    checkpoint = models / "models" / "checkpoints" / "v1-5-pruned-emaonly-fp16.safetensors"
    lora = models / "models" / "loras" / "watercolor_style.safetensors"
    assert fields == {
        "Prompt": api["6"]["inputs"]["text"], "Negative prompt": api["7"]["inputs"]["text"],
        "Steps": "2", "Sampler": "DPM++ 2M", "Schedule type": "Karras", "CFG scale": "7", "Seed": "8566257",
        "Size": "64x64", "Model hash": sha256_file(checkpoint)[:10], "Model": "v1-5-pruned-emaonly-fp16",
        "Denoising strength": "0.5", "Lora hashes": f"watercolor_style: {lora_file_hash(lora)}"}
    assert str(models) not in text  # names, not the user's paths
    [preview] = [p for p in pngs if "previews" in p.parts]
    first = a1111_parse(parameters_of(preview))  # the first pass: KSampler 3 over the empty latent
    assert (first["Steps"], first["Sampler"], first["Schedule type"], first["Size"]) == ("2", "Euler a", "Normal",
                                                                                        "32x32")
    assert "Denoising strength" not in first


def test_a_comfyui_flux_lora_template_png_carries_guidance_and_the_diffusion_models_hash(models, tmp_path):
    [png] = run_template(models, tmp_path, api_file("flux_lora"), *SMALL["flux_lora"])
    api = json.loads(api_file("flux_lora").read_text())
    fields = a1111_parse(parameters_of(png))
    with Image.open(png) as image:  # the tiny Flux VAE's latent cells are not 8 pixels: the size drawn is its own
        size = f"{image.width}x{image.height}"
    denoiser = models / "models" / "diffusion_models" / "flux1-dev.safetensors"
    lora = models / "models" / "loras" / "flux_watercolor_style.safetensors"
    assert fields == {
        "Prompt": api["6"]["inputs"]["text"], "Negative prompt": "", "Steps": "2", "Sampler": "Euler",
        "Schedule type": "Simple", "CFG scale": "1", "Guidance": "3.5", "Seed": "1117", "Size": size,
        "Model hash": sha256_file(denoiser)[:10], "Model": "flux1-dev",
        "Lora hashes": f"flux_watercolor_style: {lora_file_hash(lora)}"}
    assert "Negative prompt:" not in parameters_of(png)  # an empty negative prompt gets no line, as in A1111


def core_chunk(tmp_path: Path, graph: dict, outputs: dict | None = None) -> dict[str, str]:
    """The chunk SaveImage node "save" of an API-format ``graph`` would carry (bound, not run)."""
    from lora_nodes.graph.load import parse_workflow
    from lora_nodes.graph.parameters import parameters_chunk
    from lora_nodes.graph.validate import bind
    from lora_nodes.nodes import catalogue

    api = {node_id: {"class_type": kind, "inputs": inputs} for node_id, (kind, inputs) in graph.items()}
    bound = bind(parse_workflow(api, tmp_path), catalogue())
    return parameters_chunk(bound, "save", outputs or {})


def core_graph(**changes) -> dict:
    """A text-to-image graph of core nodes on builtin:tiny; ``changes`` replace or add nodes."""
    graph = {
        "ckpt": ("CheckpointLoaderSimple", {"ckpt_name": "builtin:tiny"}),
        "pos": ("CLIPTextEncode", {"text": "a (red:1.2) circle, on white", "clip": ["ckpt", 1]}),
        "neg": ("CLIPTextEncode", {"text": "blurry", "clip": ["ckpt", 1]}),
        "empty": ("EmptyLatentImage", {"width": 48, "height": 32, "batch_size": 1}),
        "draw": ("KSampler", {"model": ["ckpt", 0], "seed": 5, "steps": 3, "cfg": 4.5, "sampler_name": "lms",
                              "scheduler": "exponential", "denoise": 1.0, "positive": ["pos", 0],
                              "negative": ["neg", 0], "latent_image": ["empty", 0]}),
        "decode": ("VAEDecode", {"samples": ["draw", 0], "vae": ["ckpt", 2]}),
        "save": ("SaveImage", {"images": ["decode", 0], "filename_prefix": "x"}),
    }
    return {**graph, **changes}


def test_core_graph_loras_clip_skip_and_advanced_sampler(tmp_path, write_lora):
    """LoraLoaders chained: each file at a non-zero strength counts, on the model or on the prompts' CLIP
    alone; both strengths 0 does not. CLIPSetLastLayer -2 is A1111's clip skip 2. A KSamplerAdvanced
    over the whole schedule is described as a KSampler; before a run, Size is the empty latent's."""
    one, clip_only, off = write_lora("one", seed=1), write_lora("clip_only", seed=2), write_lora("off", seed=3)
    graph = core_graph(
        l1=("LoraLoader", {"model": ["ckpt", 0], "clip": ["ckpt", 1], "lora_name": str(one),
                           "strength_model": 0.7, "strength_clip": 0.0}),
        l2=("LoraLoader", {"model": ["l1", 0], "clip": ["l1", 1], "lora_name": str(off),
                           "strength_model": 0.0, "strength_clip": 0.0}),
        side=("LoraLoader", {"model": ["ckpt", 0], "clip": ["l2", 1], "lora_name": str(clip_only),
                             "strength_model": 1.0, "strength_clip": 0.5}),  # its MODEL goes nowhere
        skip=("CLIPSetLastLayer", {"clip": ["side", 1], "stop_at_clip_layer": -2}),
        pos=("CLIPTextEncode", {"text": "a (red:1.2) circle, on white", "clip": ["skip", 0]}),
        neg=("CLIPTextEncode", {"text": "blurry", "clip": ["skip", 0]}),
        empty=("EmptySD3LatentImage", {"width": 48, "height": 32, "batch_size": 1}),
        draw=("KSamplerAdvanced", {"model": ["l2", 0], "add_noise": "enable", "noise_seed": 77, "steps": 4,
                                   "cfg": 6.0, "sampler_name": "dpm_2_ancestral", "scheduler": "sgm_uniform",
                                   "positive": ["pos", 0], "negative": ["neg", 0], "latent_image": ["empty", 0],
                                   "start_at_step": 0, "end_at_step": 10000,
                                   "return_with_leftover_noise": "disable"}),
    )
    fields = a1111_parse(core_chunk(tmp_path, graph)["parameters"])
    assert fields == {
        "Prompt": "a (red:1.2) circle, on white", "Negative prompt": "blurry", "Steps": "4", "Sampler": "DPM2 a",
        "Schedule type": "SGM Uniform", "CFG scale": "6", "Seed": "77", "Size": "48x32", "Model": "tiny",
        "Clip skip": "2", "Lora hashes": f"one: {lora_file_hash(one)}, clip_only: {lora_file_hash(clip_only)}"}


def test_core_graph_size_is_the_saved_images_and_img2img_gives_denoising_strength(tmp_path):
    import torch
    from PIL import Image

    Image.new("RGB", (40, 24), "red").save(tmp_path / "init.png")
    graph = core_graph(
        load=("LoadImage", {"image": str(tmp_path / "init.png")}),
        encode=("VAEEncode", {"pixels": ["load", 0], "vae": ["ckpt", 2]}),
    )
    graph["draw"][1].update(latent_image=["encode", 0], denoise=0.35)
    fields = a1111_parse(core_chunk(tmp_path, graph, {"decode": (torch.zeros(1, 24, 40, 3),)})["parameters"])
    assert (fields["Size"], fields["Denoising strength"], fields["Sampler"], fields["Schedule type"]) == (
        "40x24", "0.35", "LMS", "Exponential")


def test_core_graphs_of_shapes_not_traced_get_no_chunk(tmp_path):
    """Prompts combined or timed, a schedule split between two samplers, a picture no sampler drew: no
    chunk rather than a wrong one."""
    from PIL import Image

    Image.new("RGB", (16, 16)).save(tmp_path / "in.png")
    combined = core_graph(both=("ConditioningCombine", {"conditioning_1": ["pos", 0], "conditioning_2": ["neg", 0]}))
    combined["draw"][1]["positive"] = ["both", 0]
    timed = core_graph(late=("ConditioningSetTimestepRange", {"conditioning": ["pos", 0], "start": 0.5, "end": 1.0}))
    timed["draw"][1]["positive"] = ["late", 0]
    split = {"from": {"add_noise": "enable", "start_at_step": 0, "end_at_step": 2, "latent_image": ["empty", 0],
                      "return_with_leftover_noise": "enable"},
             "to": {"add_noise": "disable", "start_at_step": 2, "end_at_step": 10000, "latent_image": ["first", 0],
                    "return_with_leftover_noise": "disable"}}
    common = {"model": ["ckpt", 0], "noise_seed": 1, "steps": 4, "cfg": 5.0, "sampler_name": "euler",
              "scheduler": "normal", "positive": ["pos", 0], "negative": ["neg", 0]}
    two_samplers = core_graph(first=("KSamplerAdvanced", {**common, **split["from"]}),
                              draw=("KSamplerAdvanced", {**common, **split["to"]}))
    no_sampler = core_graph(load=("LoadImage", {"image": str(tmp_path / "in.png")}),
                            encode=("VAEEncode", {"pixels": ["load", 0], "vae": ["ckpt", 2]}),
                            decode=("VAEDecode", {"samples": ["encode", 0], "vae": ["ckpt", 2]}))
    assert core_chunk(tmp_path, core_graph())  # the untouched graph has one
    for graph in (combined, timed, two_samplers, no_sampler):
        assert core_chunk(tmp_path, graph) == {}


def test_our_sample_writes_its_scheduler_clip_skip_and_guidance(tmp_path):
    from lora_nodes.graph.parameters import parameters_chunk
    from lora_nodes.graph.validate import bind
    from lora_nodes.nodes import catalogue

    path = write_workflow(tmp_path, """
format: lora-nodes/1
nodes:
  base: {type: LoadBase, inputs: {source: "builtin:tiny"}}
  draw: {type: Sample, inputs: {model: [base, model], prompt: x, sampler: dpmpp_2m, scheduler: karras, clip_skip: 2}}
  save: {type: SaveImages, inputs: {images: [draw, images]}}
""")
    fields = a1111_parse(parameters_chunk(bind(load_workflow(path), catalogue()), "save", {})["parameters"])
    assert (fields["Sampler"], fields["Schedule type"], fields["Clip skip"]) == ("DPM++ 2M", "Karras", "2")
