"""The bridge: our LoRAs on ComfyUI's MODEL and CLIP (issue 14 point 1).

Inside ComfyUI the nodes clone its ModelPatcher and CLIP and add patches that its patcher asks for
the weight. Here stand-ins play ComfyUI's part as v0.3.64 behaves (``add_patches`` keeps patches
for keys its model holds; patching a weight hands each adapter a float32 copy, cut to the patch's
rows), over state dicts in ComfyUI's names made from our tiny bases. What a user would notice:
the weights ComfyUI ends up with are the format's definition (computed in the test), or exactly
what our own ApplyLoRA makes of the same file; unplaced keys come as one message; headless, the
bridge draws what LoraLoader draws.
"""

import sys
import types

import pytest
import torch
from safetensors.torch import save_file
from test_every_format import KINDS, make

from lora_nodes.engine.context import NodeContext
from lora_nodes.engine.events import Collector
from lora_nodes.errors import NodeError
from lora_nodes.lora.files import read_lora
from lora_nodes.lora.recipe import AppliedLoRA, ModelRecipe
from lora_nodes.lora.synthetic import ATTENTION, synthetic_lora
from lora_nodes.models import bfl, ldm
from lora_nodes.models.text_names import file_state_dict
from lora_nodes.nodes.bridge import apply_lora_stack_to_model, apply_lora_to_model


class StandInAdapter:
    """comfy.weight_adapter.WeightAdapterBase: ComfyUI asks instances of it for the patched weight."""


class StandInPatcher:
    """ComfyUI's ModelPatcher, as far as the bridge uses it and as it patches a weight."""

    def __init__(self, state):
        self.model = torch.nn.Module()  # ComfyUI's BaseModel: the bridge keys its cache by it
        self.state, self.patches = state, {}

    def clone(self):
        twin = StandInPatcher(self.state)
        twin.model, twin.patches = self.model, {k: list(v) for k, v in self.patches.items()}
        return twin

    def model_state_dict(self):
        return self.state

    def add_patches(self, patches, strength_patch=1.0, strength_model=1.0):
        added = []
        for k in patches:
            key, offset = (k, None) if isinstance(k, str) else (k[0], k[1])
            if key in self.state:
                added.append(k)
                self.patches.setdefault(key, []).append((strength_patch, patches[k], strength_model, offset, None))
        return added

    def patched(self, key):
        """The weight as ComfyUI's patcher makes it: float32 copy, each patch on its rows."""
        weight = self.state[key].float().clone()
        for strength, adapter, _, offset, function in self.patches.get(key, []):
            assert isinstance(adapter, StandInAdapter)
            view = weight.narrow(*offset) if offset is not None else weight
            adapter.calculate_weight(view, key, strength, 1.0, offset, function, torch.float32, None)
        return weight


class StandInClip:
    def __init__(self, state):
        self.patcher = StandInPatcher(state)
        self.cond_stage_model = self.patcher.model

    def clone(self):
        twin = StandInClip.__new__(StandInClip)
        twin.patcher = self.patcher.clone()
        twin.cond_stage_model = self.cond_stage_model
        return twin

    def add_patches(self, patches, strength_patch=1.0, strength_model=1.0):
        return self.patcher.add_patches(patches, strength_patch, strength_model)


@pytest.fixture(autouse=True)
def comfy_adapters(monkeypatch):
    module = types.ModuleType("comfy.weight_adapter")
    module.WeightAdapterBase = StandInAdapter
    monkeypatch.setitem(sys.modules, "comfy.weight_adapter", module)


def host_names(base, state):
    """Our denoiser's parameter -> ComfyUI's name for it (its original tree under diffusion_model.)."""
    if base.family.checkpoint_layout == "bfl":
        return None
    return {name: "diffusion_model." + ldm_name for name, ldm_name in ldm.unet_key_map(base.unet.config).items()}


def comfy_states(base):
    """ComfyUI's MODEL and CLIP state dicts of ``base``: the denoiser in its original tree (converted by
    our single-file writers), each text encoder under ``<ComfyUI name>.transformer.``."""
    denoiser = base.denoiser.state_dict()
    if base.family.checkpoint_layout == "bfl":
        original = bfl.to_bfl(denoiser, base.family, base.denoiser.config)
    else:
        names = ldm.unet_key_map(base.unet.config)
        original = {names[k]: v for k, v in denoiser.items()}
    model = {"diffusion_model." + k: v.detach().clone() for k, v in original.items()}
    clip = {f"{text.comfy_name}.transformer.{k}": v.detach().clone()
            for text in base.family.text_encoders for k, v in file_state_dict(base.components[text.component]).items()}
    return model, clip


def ctx(tmp_path, events=None):
    return NodeContext("7", "ApplyLoRAToModel", tmp_path, tmp_path / "cache", events or Collector())


def ours_in_comfy_names(base, *applied):
    """What our own ApplyLoRA makes of ``applied`` on ``base``, in ComfyUI's names (the base is then
    given its own weights back)."""
    states = comfy_states(ModelRecipe(base).with_loras(*applied).materialize())
    ModelRecipe(base).materialize()
    return states


@pytest.mark.parametrize("base_name", ["tiny", "tiny_sdxl", "flux"])
def test_comfyui_ends_with_the_weights_our_apply_makes(request, tmp_path, base_name):
    base = request.getfixturevalue(base_name)
    path = tmp_path / "lora.safetensors"
    save_file(synthetic_lora(base, rank=4, seed=3, fmt="kohya", pattern=ATTENTION), str(path))
    lora = read_lora(path)
    model_state, clip_state = comfy_states(base)
    model, clip = StandInPatcher(model_state), StandInClip(clip_state)
    new_model, new_clip = apply_lora_to_model.run(ctx(tmp_path), model, lora, clip, 0.7, 0.4)
    expected_model, expected_clip = ours_in_comfy_names(base, AppliedLoRA(lora, 0.7, 0.4))
    changed = 0
    for key in model_state:
        torch.testing.assert_close(new_model.patched(key), expected_model[key].float(), rtol=1e-5, atol=1e-6)
        changed += not torch.equal(expected_model[key], model_state[key])
    for key in clip_state:
        torch.testing.assert_close(new_clip.patcher.patched(key), expected_clip[key].float(), rtol=1e-5, atol=1e-6)
        changed += not torch.equal(expected_clip[key], clip_state[key])
    assert changed > 4
    # the inputs are left as they were (ComfyUI's nodes share them): the patches went on clones
    assert model.patches == {} and clip.patcher.patches == {}


@pytest.mark.parametrize("kind", KINDS)
def test_every_format_reaches_comfyui_by_its_definition(tiny, tmp_path, kind):
    tensors, expect = make(kind, tiny, torch.Generator().manual_seed(KINDS.index(kind)))
    path = tmp_path / f"{kind}.safetensors"
    save_file(tensors, str(path))
    model_state, clip_state = comfy_states(tiny)
    new_model, _ = apply_lora_to_model.run(ctx(tmp_path), StandInPatcher(model_state), read_lora(path),
                                           StandInClip(clip_state), 0.8, 0.8)
    names = host_names(tiny, model_state)
    for target, expected in expect.items():
        key = names[target.removeprefix("unet.") + ".weight"]
        original = model_state[key].float()
        torch.testing.assert_close(new_model.patched(key), expected(original, 0.8), rtol=1e-4, atol=1e-5)


def test_a_fused_flux_module_is_patched_on_comfyui_rows(flux, tmp_path):
    """kohya's Flux LoRA names BFL's fused q/k/v as one module: in ComfyUI (which holds it fused too) the
    change is up @ down over the whole fused weight, by definition."""
    tensors = synthetic_lora(flux, rank=2, seed=5, fmt="kohya", pattern=ATTENTION)
    path = tmp_path / "flux.safetensors"
    save_file(tensors, str(path))
    key = next(k for k in tensors if k.startswith("lora_unet_double_blocks_0_img_attn_qkv") and k.endswith("lora_up.weight"))
    name = key.removesuffix(".lora_up.weight")
    up, down, alpha = tensors[key], tensors[f"{name}.lora_down.weight"], tensors[f"{name}.alpha"]
    model_state, _ = comfy_states(flux)
    new_model, new_clip = apply_lora_to_model.run(ctx(tmp_path), StandInPatcher(model_state), read_lora(path), None, 0.5, 1.0)
    host_key = "diffusion_model.double_blocks.0.img_attn.qkv.weight"
    expected = model_state[host_key].float() + 0.5 * (alpha / up.shape[1]) * up @ down
    torch.testing.assert_close(new_model.patched(host_key), expected, rtol=1e-5, atol=1e-6)
    assert new_clip is None


def test_text_encoder_modules_without_a_clip_are_named_once(tiny, tmp_path):
    path = tmp_path / "te.safetensors"
    save_file(synthetic_lora(tiny, rank=2, seed=4, fmt="kohya", pattern=ATTENTION), str(path))
    lora = read_lora(path)
    text_modules = sum(1 for key in lora.modules if key.startswith("lora_te"))
    events = Collector()
    model_state, _ = comfy_states(tiny)
    apply_lora_to_model.run(ctx(tmp_path, events), StandInPatcher(model_state), lora, None, 1.0, 1.0)
    (warning,) = events.of("warning")
    assert f"its {text_modules} text-encoder modules are not applied: no CLIP is connected" in warning["message"]


def test_unplaced_keys_come_as_one_message(tiny, tmp_path):
    tensors = synthetic_lora(tiny, rank=2, seed=1, fmt="kohya", pattern=ATTENTION)
    for name in ("lora_unet_no_such_block_1", "lora_unet_no_such_block_2"):
        tensors[f"{name}.lora_down.weight"], tensors[f"{name}.lora_up.weight"] = torch.ones(2, 4), torch.ones(4, 2)
    path = tmp_path / "extra.safetensors"
    save_file(tensors, str(path))
    events = Collector()
    model_state, clip_state = comfy_states(tiny)
    apply_lora_to_model.run(ctx(tmp_path, events), StandInPatcher(model_state), read_lora(path),
                            StandInClip(clip_state), 1.0, 1.0)
    warnings = [e for e in events.events if e["event"] == "warning"]
    assert len(warnings) == 1
    message = warnings[0]["message"]
    assert "2 keys: no module of that name" in message and "lora_unet_no_such_block_1" in message
    assert set(warnings[0]["unplaced"]) == {"lora_unet_no_such_block_1", "lora_unet_no_such_block_2"}


def test_a_stack_applies_each_lora_at_its_strengths(tiny, tmp_path):
    files = []
    for seed in (1, 2):
        path = tmp_path / f"l{seed}.safetensors"
        save_file(synthetic_lora(tiny, rank=2, seed=seed, fmt="kohya", pattern=ATTENTION), str(path))
        files.append(read_lora(path))
    stack = (AppliedLoRA(files[0], 0.5, 0.0), AppliedLoRA(files[1], -1.0, 2.0))
    model_state, clip_state = comfy_states(tiny)
    new_model, new_clip = apply_lora_stack_to_model.run(ctx(tmp_path), StandInPatcher(model_state), stack,
                                                        StandInClip(clip_state))
    expected_model, expected_clip = ours_in_comfy_names(tiny, *stack)
    for key in model_state:
        torch.testing.assert_close(new_model.patched(key), expected_model[key].float(), rtol=1e-5, atol=1e-6)
    for key in clip_state:
        torch.testing.assert_close(new_clip.patcher.patched(key), expected_clip[key].float(), rtol=1e-5, atol=1e-6)


def test_a_lora_for_another_family_is_refused(tiny, flux, tmp_path):
    path = tmp_path / "flux.safetensors"
    save_file(synthetic_lora(flux, rank=2, seed=1, fmt="kohya", pattern=ATTENTION), str(path))
    model_state, clip_state = comfy_states(tiny)
    with pytest.raises(NodeError, match="LoRA 'flux'"):
        apply_lora_to_model.run(ctx(tmp_path), StandInPatcher(model_state), read_lora(path), StandInClip(clip_state),
                                1.0, 1.0)


def test_an_old_comfyui_without_weight_adapters_is_told_to_update(tiny, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "comfy.weight_adapter", None)  # import fails, as in an old ComfyUI
    from lora_nodes.nodes import bridge

    bridge._patch_class.cache_clear()
    path = tmp_path / "l.safetensors"
    save_file(synthetic_lora(tiny, rank=2, seed=1, fmt="kohya", pattern=ATTENTION), str(path))
    model_state, _ = comfy_states(tiny)
    try:
        with pytest.raises(NodeError, match="update ComfyUI"):
            apply_lora_to_model.run(ctx(tmp_path), StandInPatcher(model_state), read_lora(path), None, 1.0, 1.0)
    finally:
        bridge._patch_class.cache_clear()


def test_headless_the_bridge_draws_what_lora_loader_draws(tiny, tmp_path):
    """Headless, MODEL and CLIP are our core nodes' recipes: LoadLoRA -> the bridge gives the picture
    ComfyUI's LoraLoader node gives with the same file (and the LoRA changes it)."""
    from test_core_nodes import draw, load, with_lora

    path = tmp_path / "lora.safetensors"
    save_file(synthetic_lora(tiny, rank=4, seed=2, fmt="kohya", pattern=ATTENTION, up_std=2.0), str(path))
    model, clip, vae = load(tiny)
    by_loader = draw(*with_lora(model, clip, path, 0.8, 0.6), vae)
    bridged = apply_lora_to_model.run(ctx(tmp_path), model, read_lora(path), clip, 0.8, 0.6)
    assert torch.equal(draw(*bridged, vae), by_loader)
    assert (by_loader - draw(model, clip, vae)).abs().mean() > 1e-3
    model_only, no_clip = apply_lora_to_model.run(ctx(tmp_path), model, read_lora(path), None, 0.8, 0.6)
    assert no_clip is None and model_only.loras
