"""Regenerates workflows/comfyui/*.json: ComfyUI template graphs of our own making.

UI files laid out by hand, API twins derived from them.

Node declarations (input order, widgets, outputs) are ComfyUI's facts; the graphs, prompts and layout are ours.
"""

from __future__ import annotations

import json
from pathlib import Path

OUT = Path(__file__).resolve().parent.parent / "workflows" / "comfyui"

# type -> (socket inputs [(name, type)], outputs [(name, type)], widget names (control after seeds included))
DECL = {
    "CheckpointLoaderSimple": ([], [("MODEL", "MODEL"), ("CLIP", "CLIP"), ("VAE", "VAE")], ["ckpt_name"]),
    "LoraLoader": ([("model", "MODEL"), ("clip", "CLIP")], [("MODEL", "MODEL"), ("CLIP", "CLIP")],
                   ["lora_name", "strength_model", "strength_clip"]),
    "LoraLoaderModelOnly": ([("model", "MODEL")], [("MODEL", "MODEL")], ["lora_name", "strength_model"]),
    "CLIPTextEncode": ([("clip", "CLIP")], [("CONDITIONING", "CONDITIONING")], ["text"]),
    "EmptyLatentImage": ([], [("LATENT", "LATENT")], ["width", "height", "batch_size"]),
    "EmptySD3LatentImage": ([], [("LATENT", "LATENT")], ["width", "height", "batch_size"]),
    "KSampler": ([("model", "MODEL"), ("positive", "CONDITIONING"), ("negative", "CONDITIONING"),
                  ("latent_image", "LATENT")], [("LATENT", "LATENT")],
                 ["seed", "control_after_generate", "steps", "cfg", "sampler_name", "scheduler", "denoise"]),
    "VAEDecode": ([("samples", "LATENT"), ("vae", "VAE")], [("IMAGE", "IMAGE")], []),
    "VAEEncode": ([("pixels", "IMAGE"), ("vae", "VAE")], [("LATENT", "LATENT")], []),
    "LatentUpscale": ([("samples", "LATENT")], [("LATENT", "LATENT")], ["upscale_method", "width", "height", "crop"]),
    "LoadImage": ([], [("IMAGE", "IMAGE"), ("MASK", "MASK")], ["image", "upload"]),
    "ImageScale": ([("image", "IMAGE")], [("IMAGE", "IMAGE")], ["upscale_method", "width", "height", "crop"]),
    "SaveImage": ([("images", "IMAGE")], [], ["filename_prefix"]),
    "PreviewImage": ([("images", "IMAGE")], [], []),
    "UNETLoader": ([], [("MODEL", "MODEL")], ["unet_name", "weight_dtype"]),
    "DualCLIPLoader": ([], [("CLIP", "CLIP")], ["clip_name1", "clip_name2", "type", "device"]),
    "VAELoader": ([], [("VAE", "VAE")], ["vae_name"]),
    "FluxGuidance": ([("conditioning", "CONDITIONING")], [("CONDITIONING", "CONDITIONING")], ["guidance"]),
    "Reroute": ([("", "*")], [("", "*")], []),
    "Note": ([], [], ["text"]),
}
# widget inputs that are not part of a prompt (the editor's own)
EDITOR_ONLY = {"control_after_generate"}

SD_CHECKPOINT = "v1-5-pruned-emaonly-fp16.safetensors"
STYLE_LORA = "watercolor_style.safetensors"
OUTLINE_LORA = "styles/ink_outline.safetensors"
PROMPT = "a watercolor painting of a lighthouse on a rocky coast at sunset, (soft light:1.2), gentle waves"
NEGATIVE = "blurry, low quality, watermark, text"


class Graph:
    def __init__(self):
        self.nodes: list[dict] = []
        self.links: list[list] = []

    def add(self, node_id, node_type, pos, widgets=(), title=None, size=None, out_type=None):
        sockets, outputs, names = DECL[node_type]
        node = {
            "id": node_id, "type": node_type, "pos": list(pos), "size": list(size or _size(node_type, names)),
            "flags": {}, "order": len(self.nodes), "mode": 0,
            "inputs": [{"name": n, "type": t, "link": None} for n, t in sockets],
            "outputs": [{"name": n, "type": out_type or t, "links": [], **({"slot_index": i} if n else {})}
                        for i, (n, t) in enumerate(outputs)],
            "properties": {"Node name for S&R": node_type} if node_type not in ("Reroute", "Note") else {},
        }
        if node_type == "Reroute":
            node["properties"] = {"showOutputText": False, "horizontal": False}
        if names:
            assert len(widgets) == len(names), (node_type, widgets)
            node["widgets_values"] = list(widgets)
        if title:
            node["title"] = title
        self.nodes.append(node)
        return node_id

    def node(self, node_id):
        return next(n for n in self.nodes if n["id"] == node_id)

    def link(self, origin, slot, target, input_name):
        link_id = len(self.links) + 1
        source, sink = self.node(origin), self.node(target)
        output = source["outputs"][slot]
        index = next(i for i, s in enumerate(sink["inputs"]) if s["name"] == input_name)
        link_type = output["type"] if output["type"] != "*" else sink["inputs"][index]["type"]
        output["links"].append(link_id)
        sink["inputs"][index]["link"] = link_id
        self.links.append([link_id, origin, slot, target, index, link_type])

    def ui(self) -> dict:
        for node in self.nodes:
            for output in node["outputs"]:
                output["links"] = output["links"] or None
        return {
            "last_node_id": max(n["id"] for n in self.nodes), "last_link_id": len(self.links),
            "nodes": self.nodes, "links": self.links, "groups": [], "config": {},
            "extra": {"ds": {"scale": 1, "offset": [0, 0]}}, "version": 0.4,
        }


def _size(node_type, names):
    if node_type == "Reroute":
        return [75, 26]
    if node_type in ("CLIPTextEncode", "Note"):
        return [420, 160]
    return [315, 46 + 26 * max(len(names), 1) + 20 * max(len(DECL[node_type][0]), len(DECL[node_type][1]))]


def api_of(graph: Graph) -> dict:
    """The prompt ComfyUI queues for the UI graph: reroutes followed, notes left out, editor-only widgets dropped."""
    nodes = {n["id"]: n for n in graph.nodes}
    links = {link[0]: link for link in graph.links}

    def source(link_id):
        _, origin, slot, *_ = links[link_id]
        while nodes[origin]["type"] == "Reroute":
            _, origin, slot, *_ = links[nodes[origin]["inputs"][0]["link"]]
        return [str(origin), slot]

    prompt = {}
    for node in sorted(graph.nodes, key=lambda n: n["id"]):
        if node["type"] in ("Reroute", "Note"):
            continue
        sockets, _, names = DECL[node["type"]]
        inputs = {name: value for name, value in zip(names, node.get("widgets_values", [])) if name not in EDITOR_ONLY}
        for slot in node["inputs"]:
            if slot["link"] is not None:
                inputs[slot["name"]] = source(slot["link"])
        order = [n for n in names if n not in EDITOR_ONLY] + [n for n, _ in sockets]  # as the editor exports
        inputs = {k: inputs[k] for k in sorted(inputs, key=order.index)}
        prompt[str(node["id"])] = {"inputs": inputs, "class_type": node["type"],
                                   "_meta": {"title": node.get("title", TITLES.get(node["type"], node["type"]))}}
    return prompt


TITLES = {
    "CheckpointLoaderSimple": "Load Checkpoint", "LoraLoader": "Load LoRA", "LoraLoaderModelOnly": "LoraLoaderModelOnly",
    "CLIPTextEncode": "CLIP Text Encode (Prompt)", "EmptyLatentImage": "Empty Latent Image",
    "EmptySD3LatentImage": "EmptySD3LatentImage", "KSampler": "KSampler", "VAEDecode": "VAE Decode",
    "VAEEncode": "VAE Encode", "LatentUpscale": "Upscale Latent", "LoadImage": "Load Image",
    "ImageScale": "Upscale Image", "SaveImage": "Save Image", "PreviewImage": "Preview Image",
    "UNETLoader": "Load Diffusion Model", "DualCLIPLoader": "DualCLIPLoader", "VAELoader": "Load VAE",
    "FluxGuidance": "FluxGuidance",
}


# --------------------------------------------------------------------------------------------- templates


def sd_start(g: Graph, *, loras=(), note=None):
    """Checkpoint, optional LoRA chain, prompts; returns (model, clip) sources and the VAE reroute id."""
    g.add(4, "CheckpointLoaderSimple", (40, 300), [SD_CHECKPOINT])
    model, clip = (4, 0), (4, 1)
    for n, (node_id, name, strength) in enumerate(loras):
        g.add(node_id, "LoraLoader", (400 + 360 * n, 160), [name, strength, strength])
        g.link(*model, node_id, "model")
        g.link(*clip, node_id, "clip")
        model, clip = (node_id, 0), (node_id, 1)
    x = 400 + 360 * len(loras)
    g.add(6, "CLIPTextEncode", (x, 60), [PROMPT], title="Positive prompt")
    g.add(7, "CLIPTextEncode", (x, 260), [NEGATIVE], title="Negative prompt")
    g.link(*clip, 6, "clip")
    g.link(*clip, 7, "clip")
    g.add(20, "Reroute", (x + 40, 520), out_type="VAE")
    g.link(4, 2, 20, "")
    if note:
        g.add(30, "Note", (40, 40), [note])
    return model, x


def txt2img(loras=(), note=None, prefix="ComfyUI") -> Graph:
    g = Graph()
    model, x = sd_start(g, loras=loras, note=note)
    g.add(5, "EmptyLatentImage", (x, 600), [512, 512, 1])
    g.add(3, "KSampler", (x + 460, 160), [156680208700286, "randomize", 20, 8.0, "euler", "normal", 1.0])
    g.link(*model, 3, "model")
    g.link(6, 0, 3, "positive")
    g.link(7, 0, 3, "negative")
    g.link(5, 0, 3, "latent_image")
    g.add(8, "VAEDecode", (x + 820, 160))
    g.link(3, 0, 8, "samples")
    g.link(20, 0, 8, "vae")
    g.add(9, "SaveImage", (x + 1060, 160), [prefix], size=[512, 560])
    g.link(8, 0, 9, "images")
    return g


def img2img() -> Graph:
    g = Graph()
    model, x = sd_start(g, loras=[(10, STYLE_LORA, 1.0)], note=(
        "img2img: the picture in the input folder (--input-dir, default ./input) is scaled to 512x512, encoded, "
        "and redrawn from the middle of the schedule (denoise 0.6) with the LoRA."))
    g.add(11, "LoadImage", (40, 640), ["example.png", "image"], size=[315, 320])
    g.add(12, "ImageScale", (400, 640), ["lanczos", 512, 512, "center"])
    g.link(11, 0, 12, "image")
    g.add(13, "VAEEncode", (x, 640))
    g.link(12, 0, 13, "pixels")
    g.link(20, 0, 13, "vae")
    g.add(3, "KSampler", (x + 460, 160), [42, "fixed", 20, 7.0, "dpmpp_2m", "karras", 0.6])
    g.link(*model, 3, "model")
    g.link(6, 0, 3, "positive")
    g.link(7, 0, 3, "negative")
    g.link(13, 0, 3, "latent_image")
    g.add(8, "VAEDecode", (x + 820, 160))
    g.link(3, 0, 8, "samples")
    g.link(20, 0, 8, "vae")
    g.add(9, "SaveImage", (x + 1060, 160), ["img2img"], size=[512, 560])
    g.link(8, 0, 9, "images")
    return g


def hires_fix() -> Graph:
    g = Graph()
    model, x = sd_start(g, loras=[(10, STYLE_LORA, 1.0)], note=(
        "Hires fix: draw at 512x512, upscale the latent to 768x768, and redraw it at denoise 0.5 with the same "
        "model; the first pass is previewed (headless: written under previews/)."))
    g.add(21, "Reroute", (x + 40, 470), out_type="MODEL")
    g.link(*model, 21, "")
    g.add(5, "EmptyLatentImage", (x, 600), [512, 512, 1])
    g.add(3, "KSampler", (x + 460, 60), [8566257, "fixed", 20, 7.0, "euler_ancestral", "normal", 1.0],
          title="First pass")
    g.link(21, 0, 3, "model")
    g.link(6, 0, 3, "positive")
    g.link(7, 0, 3, "negative")
    g.link(5, 0, 3, "latent_image")
    g.add(14, "LatentUpscale", (x + 820, 60), ["nearest-exact", 768, 768, "disabled"])
    g.link(3, 0, 14, "samples")
    g.add(15, "KSampler", (x + 1180, 60), [8566257, "fixed", 14, 7.0, "dpmpp_2m", "karras", 0.5],
          title="Second pass")
    g.link(21, 0, 15, "model")
    g.link(6, 0, 15, "positive")
    g.link(7, 0, 15, "negative")
    g.link(14, 0, 15, "latent_image")
    g.add(16, "VAEDecode", (x + 820, 400))
    g.link(3, 0, 16, "samples")
    g.link(20, 0, 16, "vae")
    g.add(17, "PreviewImage", (x + 1060, 400), size=[400, 420])
    g.link(16, 0, 17, "images")
    g.add(8, "VAEDecode", (x + 1540, 60))
    g.link(15, 0, 8, "samples")
    g.link(20, 0, 8, "vae")
    g.add(9, "SaveImage", (x + 1780, 60), ["hires_fix"], size=[512, 560])
    g.link(8, 0, 9, "images")
    return g


def flux_lora() -> Graph:
    g = Graph()
    g.add(30, "Note", (40, 40), [
        ("Flux with a LoRA: the diffusion model, its two text encoders and its VAE as separate files (ComfyUI's "
        "diffusion_models/, text_encoders/ and vae/ folders). Flux dev takes its guidance as an input "
        "(FluxGuidance), so the KSampler's cfg stays 1 and the negative prompt is not used.")])
    g.add(4, "UNETLoader", (40, 200), ["flux1-dev.safetensors", "default"])
    g.add(11, "DualCLIPLoader", (40, 360), ["t5xxl_fp16.safetensors", "clip_l.safetensors", "flux", "default"])
    g.add(12, "VAELoader", (40, 560), ["ae.safetensors"])
    g.add(10, "LoraLoaderModelOnly", (400, 200), ["flux_watercolor_style.safetensors", 1.0])
    g.link(4, 0, 10, "model")
    g.add(6, "CLIPTextEncode", (400, 340), [PROMPT.replace("(soft light:1.2)", "soft light")],
          title="Positive prompt")
    g.add(7, "CLIPTextEncode", (400, 540), [""], title="Negative prompt (unused at cfg 1)")
    g.link(11, 0, 6, "clip")
    g.link(11, 0, 7, "clip")
    g.add(13, "FluxGuidance", (860, 340), [3.5])
    g.link(6, 0, 13, "conditioning")
    g.add(5, "EmptySD3LatentImage", (860, 560), [1024, 1024, 1])
    g.add(3, "KSampler", (1220, 200), [1117, "fixed", 20, 1.0, "euler", "simple", 1.0])
    g.link(10, 0, 3, "model")
    g.link(13, 0, 3, "positive")
    g.link(7, 0, 3, "negative")
    g.link(5, 0, 3, "latent_image")
    g.add(20, "Reroute", (1100, 700), out_type="VAE")
    g.link(12, 0, 20, "")
    g.add(8, "VAEDecode", (1580, 200))
    g.link(3, 0, 8, "samples")
    g.link(20, 0, 8, "vae")
    g.add(9, "SaveImage", (1820, 200), ["flux_lora"], size=[512, 560])
    g.link(8, 0, 9, "images")
    return g


TEMPLATES = {
    "default": lambda: txt2img(note="Text to image: a checkpoint from the models folder (--models-dir), a prompt "
                               "and a negative prompt, one KSampler, saved as PNG.", prefix="default"),
    "lora": lambda: txt2img(loras=[(10, STYLE_LORA, 1.0)], prefix="lora", note=(
        "One LoRA on the model and the text encoder (strength_model, strength_clip); "
        "the rest is the default template.")),
    "multiple_loras": lambda: txt2img(loras=[(10, STYLE_LORA, 1.0), (11, OUTLINE_LORA, 1.0)], prefix="multiple_loras",
                                      note="Two LoRAs chained (the second from a subfolder of loras/); "
                                      "the rest is the default template."),
    "img2img": img2img,
    "hires_fix": hires_fix,
    "flux_lora": flux_lora,
}


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "api").mkdir(exist_ok=True)
    for name, build in TEMPLATES.items():
        graph = build()
        ui = graph.ui()
        (OUT / f"{name}.json").write_text(json.dumps(ui, indent=2) + "\n")
        (OUT / "api" / f"{name}.json").write_text(json.dumps(api_of(graph), indent=2) + "\n")
        print("wrote", name)


if __name__ == "__main__":
    main()
