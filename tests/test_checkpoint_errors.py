"""Bad input gets a clear error and loses nothing.

Each test breaks one thing in a tiny reference checkpoint (or in a call) and checks the exception type and that the
message names the file or key and says what to do. Tests marked xfail(strict=True) are known gaps in nanovoco: they
state the error nanovoco should give and start failing (so the mark must go) once it does.
"""
import collections
import io
import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from nanovoco import checkpoint
from nanovoco.generate import generate
from nanovoco.model import CLIPVisionTower, Llama, VoCoLlama
from tiny import IMAGE_TOKEN, NUM_PATCHES, VISION_CONFIG, hf_clip, hf_llama, hf_llava, image_ids, llava_original, stage1

SIZE = VISION_CONFIG["image_size"]
PIXELS = f"(B, 3, {SIZE}, {SIZE})"  # what the vision tower's errors ask for


def at(path) -> str:
    """A path as a regex, to check that a message names the file."""
    return re.escape(str(path))


def edit_config(path, **changes):
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, **changes}))


def edit_tensors(file, drop=(), **add):
    state = load_file(file)
    save_file({**{k: v for k, v in state.items() if k not in drop}, **add}, file)


def llava_original_dir(tmp_path):
    """LLaVA-1.5's own layout (VoCo-LLaMA's training output): tmp_path/original + its CLIP in original/clip."""
    hf_llava(tmp_path / "hf")
    return llava_original(tmp_path / "hf", tmp_path / "original")


def snapshot(path) -> dict:
    return {p.relative_to(path): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


# ----------------------------------------------------------------------------------------------------------------
# Wrong or missing files

@pytest.mark.parametrize("load", [Llama.from_pretrained, CLIPVisionTower.from_pretrained, VoCoLlama.from_pretrained],
                         ids=["Llama", "CLIPVisionTower", "VoCoLlama"])
def test_path_does_not_exist(tmp_path, load):
    with pytest.raises(FileNotFoundError, match=at(tmp_path / "nope") + " does not exist: pass a local checkpoint "
                                                                         "directory.*never downloads"):
        load(tmp_path / "nope")


def test_directory_without_config_json(tmp_path):
    hf_llama(tmp_path)
    (tmp_path / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match=at(tmp_path / "config.json") + " is missing"):
        Llama.from_pretrained(tmp_path)


def test_directory_without_weights(tmp_path):
    hf_llama(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=at(tmp_path) + " holds no weights: expected one of "
                                                               "model.safetensors.index.json, model.safetensors"):
        Llama.from_pretrained(tmp_path)


def test_config_json_not_json(tmp_path):
    hf_llama(tmp_path)
    (tmp_path / "config.json").write_text('{"vocab_size": 160,')
    with pytest.raises(ValueError, match=at(tmp_path / "config.json") + " is not valid JSON.*save it again"):
        Llama.from_pretrained(tmp_path)


def test_shard_index_names_missing_shard(tmp_path):
    sharded(tmp_path)
    shard = tmp_path / "model-00002-of-00004.safetensors"
    shard.unlink()
    with pytest.raises(FileNotFoundError, match=f"shard {at(shard)} named in "
                                                f"{at(tmp_path / 'model.safetensors.index.json')} is missing: "
                                                f"download every shard"):
        Llama.from_pretrained(tmp_path)


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_corrupt_safetensors(tmp_path, damage):
    hf_llama(tmp_path)
    file = tmp_path / "model.safetensors"
    data = file.read_bytes()
    file.write_bytes(bytes(range(256)) * 8 if damage == "garbage" else data[:len(data) // 2])
    with pytest.raises(ValueError, match=at(file) + " is not a readable safetensors file.*corrupt or truncated; "
                                                    "download or save it again"):
        Llama.from_pretrained(tmp_path)


class Anything:
    """A user class: weights_only=True must refuse to rebuild it."""


class StateDict(collections.OrderedDict):
    pass


class Payload:
    """Unpickling this creates a file: proof that nothing was unpickled is that the file is not there."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


def bin_checkpoint(path, content) -> Path:
    """A tiny LLaMA directory whose weights are pytorch_model.bin holding `content` (a callable of the state dict,
    returning what torch.save writes; bytes are written as they are)."""
    hf_llama(path)
    state = load_file(path / "model.safetensors")
    (path / "model.safetensors").unlink()
    obj, file = content(state), path / "pytorch_model.bin"
    file.write_bytes(obj) if isinstance(obj, bytes) else torch.save(obj, file)
    return file


@pytest.mark.parametrize("content, refused", [("instance", "Anything"), ("OrderedDict subclass", "StateDict"),
                                              ("code on unpickle", "open")])
def test_bin_with_pickled_object_is_refused(tmp_path, content, refused):
    file = bin_checkpoint(tmp_path, lambda state: {
        "instance": {**state, "x": Anything()}, "OrderedDict subclass": StateDict(state),
        "code on unpickle": {**state, "x": Payload(tmp_path / "pwned")}}[content])
    # the message quotes only the global that weights_only refused, not torch's advice to turn weights_only off
    with pytest.raises(ValueError, match=at(file) + rf" could not be read as plain tensors \(Unsupported global: "
                       rf"GLOBAL [\w.]*{refused}\): it is corrupt, or holds objects other than tensors, which nanovoco "
                       rf"does not unpickle; download it again, or convert it to safetensors where it was made") as e:
        Llama.from_pretrained(tmp_path)
    assert "weights_only" not in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "pwned").exists()


@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty"])
def test_corrupt_bin(tmp_path, damage):
    def damaged(state):
        if damage == "garbage":
            return bytes(range(256)) * 8
        buffer = io.BytesIO()
        torch.save(state, buffer)
        return buffer.getvalue()[:buffer.tell() // 2] if damage == "truncated" else b""

    file = bin_checkpoint(tmp_path, damaged)
    # which of load_bin's two messages depends on where torch's reader gives up; both name the file and say corrupt
    with pytest.raises(ValueError, match=at(file) + r" (could not be read as plain tensors|is not a readable PyTorch "
                                                    r"file) \(.*\): it is corrupt.*download it again"):
        Llama.from_pretrained(tmp_path)


@pytest.mark.parametrize("content", [lambda state: torch.zeros(3), lambda state: list(state.values()),
                                     lambda state: {**state, "step": 1000}],
                         ids=["bare tensor", "list of tensors", "dict with a non-tensor"])
def test_bin_that_is_not_a_dict_of_tensors(tmp_path, content):
    file = bin_checkpoint(tmp_path, content)
    with pytest.raises(ValueError, match=at(file) + r" is not a dict of tensors \(a state dict\): it is not a "
                                                    r"checkpoint nanovoco can read"):
        Llama.from_pretrained(tmp_path)


@pytest.mark.parametrize("load, layout, file", [
    (Llama.from_pretrained, hf_llama, "model.safetensors"),
    (Llama.from_pretrained, hf_llama, "config.json"),
    (CLIPVisionTower.from_pretrained, hf_clip, "config.json"),
    (VoCoLlama.from_pretrained, hf_llava, "model.safetensors"),
], ids=["Llama weights", "Llama config.json", "CLIPVisionTower config.json", "VoCoLlama weights"])
def test_file_instead_of_directory(tmp_path, load, layout, file):
    layout(tmp_path)
    with pytest.raises(ValueError, match=at(tmp_path / file) + r" is a file: pass the checkpoint directory \(with "
                                                               r"config.json and weights\)"):
        load(tmp_path / file)


def test_vision_path_is_a_file(tmp_path):
    projector = stage1(llava_original_dir(tmp_path), tmp_path / "vicuna")
    clip_weights = tmp_path / "original" / "clip" / "model.safetensors"
    with pytest.raises(ValueError, match=at(clip_weights) + " is a file: pass the checkpoint directory"):
        VoCoLlama.from_pretrained(tmp_path / "vicuna", vision_path=clip_weights, projector_path=projector)


def sharded(path):
    """A tiny LLaMA saved by transformers in 4 shards + model.safetensors.index.json."""
    hf_llama(path / "one").save_pretrained(path, max_shard_size="100KB")
    return path / "model.safetensors.index.json"


def test_shard_index_disagrees_with_shard(tmp_path):
    index_file = sharded(tmp_path)
    index = json.loads(index_file.read_text())
    index["weight_map"]["model.norm.weight"] = "model-00001-of-00004.safetensors"  # it is in shard 4
    index_file.write_text(json.dumps(index))
    with pytest.raises(ValueError, match=at(tmp_path / "model-00001-of-00004.safetensors") + " does not hold the "
                       "tensors that " + at(index_file) + " lists for it: the index and the shards come from "
                       "different downloads; download them again together"):
        Llama.from_pretrained(tmp_path)


def test_shard_holds_tensor_missing_from_index(tmp_path):
    index_file = sharded(tmp_path)
    edit_tensors(tmp_path / "model-00004-of-00004.safetensors", **{"model.extra.weight": torch.zeros(2)})
    with pytest.raises(ValueError, match=at(tmp_path / "model-00004-of-00004.safetensors") + " does not hold the "
                       "tensors that " + at(index_file) + " lists for it: .*download them again together"):
        Llama.from_pretrained(tmp_path)


# ----------------------------------------------------------------------------------------------------------------
# Keys and shapes that do not match the config

def test_missing_tensor(tmp_path):
    hf_llama(tmp_path)
    edit_tensors(tmp_path / "model.safetensors", drop=["model.layers.1.mlp.up_proj.weight"])
    with pytest.raises(ValueError, match=at(tmp_path) + r": 1 expected tensor\(s\) missing, e\.g\. "
                                        r"\['model\.layers\.1\.mlp\.up_proj\.weight'\]: the weights do not match "
                                        + at(tmp_path / "config.json") + r" \(wrong or incomplete checkpoint\?\)"):
        Llama.from_pretrained(tmp_path)


def test_unexpected_tensor(tmp_path):
    hf_llama(tmp_path)
    edit_tensors(tmp_path / "model.safetensors", **{"model.extra.weight": torch.zeros(2)})
    with pytest.raises(ValueError, match=at(tmp_path) + r": 1 unexpected tensor\(s\), e\.g\. "
                                        r"\['model\.extra\.weight'\]: the weights hold more than "
                                        + at(tmp_path / "config.json") + " describes"):
        Llama.from_pretrained(tmp_path)


@pytest.mark.parametrize("field, value, key, on_disk, needed", [
    ("intermediate_size", 128, "model.layers.0.mlp.gate_proj.weight", (112, 64), (128, 64)),
    ("vocab_size", 200, "model.embed_tokens.weight", (160, 64), (200, 64)),
])
def test_config_does_not_fit_weights(tmp_path, field, value, key, on_disk, needed):
    hf_llama(tmp_path)
    edit_config(tmp_path, **{field: value})
    with pytest.raises(ValueError, match=at(tmp_path / "model.safetensors") + f": {re.escape(key)} has shape "
                       f"{re.escape(str(on_disk))}, but the model built from {at(tmp_path / 'config.json')} needs "
                       f"{re.escape(str(needed))}: these weights were saved for another configuration"):
        Llama.from_pretrained(tmp_path)


def test_num_hidden_layers_larger_than_weights(tmp_path):
    hf_llama(tmp_path)
    edit_config(tmp_path, num_hidden_layers=3)
    with pytest.raises(ValueError, match=r"9 expected tensor\(s\) missing, e\.g\. \['model\.layers\.2\..*config\.json"):
        Llama.from_pretrained(tmp_path)


def test_num_hidden_layers_smaller_than_weights(tmp_path):
    hf_llama(tmp_path)
    edit_config(tmp_path, num_hidden_layers=1)
    with pytest.raises(ValueError, match=r"9 unexpected tensor\(s\), e\.g\. \['model\.layers\.1\..*\]: "
                                       r"the weights hold more than " + at(tmp_path / "config.json")
                                       + r" describes \(num_hidden_layers or tie_word_embeddings wrong\?\)"):
        Llama.from_pretrained(tmp_path)


def test_stage1_projector_for_another_clip(tmp_path):
    """mm_projector.bin was trained on a 48-wide CLIP; a 64-wide one is passed."""
    projector = stage1(llava_original_dir(tmp_path), tmp_path / "vicuna")
    hf_clip(tmp_path / "clip64", hidden_size=64)
    with pytest.raises(ValueError, match=at(projector) + r": model\.mm_projector\.0\.weight has shape \(64, 48\), but "
                       r"the model built from " + at(tmp_path / "vicuna" / "config.json") + " \\+ "
                       + at(tmp_path / "clip64" / "config.json") + r" needs \(64, 64\).*or another vision tower"):
        VoCoLlama.from_pretrained(tmp_path / "vicuna", vision_path=tmp_path / "clip64", projector_path=projector)


# ----------------------------------------------------------------------------------------------------------------
# Config values nanovoco does not implement

@pytest.mark.parametrize("change, what", [
    (dict(hidden_act="gelu"), "hidden_act='gelu'"),
    (dict(rope_parameters={"rope_type": "yarn", "factor": 2.0, "rope_theta": 1e4}), "rope type 'yarn'"),
    (dict(rope_parameters=None, rope_scaling={"type": "dynamic", "factor": 2.0}), "rope type 'dynamic'"),
    (dict(attention_bias=True), "attention_bias/mlp_bias=true"),
], ids=["gelu", "yarn", "dynamic_old_spelling", "attention_bias"])
def test_unsupported_llama_config(tmp_path, change, what):
    hf_llama(tmp_path)
    edit_config(tmp_path, **change)
    with pytest.raises(ValueError, match=at(tmp_path / "config.json") + f": {re.escape(what)}.* is not supported by "
                                                                        f"nanovoco's LLaMA"):
        Llama.from_pretrained(tmp_path)


@pytest.mark.parametrize("layout", ["llama", "llava-hf"])
def test_kv_heads_do_not_divide_heads(tmp_path, layout):
    if layout == "llama":
        hf_llama(tmp_path)
        edit_config(tmp_path, num_key_value_heads=3)
        load = Llama.from_pretrained
    else:  # the LLaMA config nested in a VLM's config.json: that file is named
        hf_llava(tmp_path)
        text = json.loads((tmp_path / "config.json").read_text())["text_config"]
        edit_config(tmp_path, text_config={**text, "num_key_value_heads": 3})
        load = VoCoLlama.from_pretrained
    with pytest.raises(ValueError, match=at(tmp_path / "config.json") + ": num_attention_heads=4 is not a multiple of "
                                                                        "num_key_value_heads=3: the config is "
                                                                        "inconsistent"):
        load(tmp_path)


def test_unsupported_clip_hidden_act(tmp_path):
    hf_clip(tmp_path)
    edit_config(tmp_path, hidden_act="gelu")
    with pytest.raises(ValueError, match=at(tmp_path / "config.json") + ": CLIP hidden_act='gelu' is not supported"):
        CLIPVisionTower.from_pretrained(tmp_path)


@pytest.mark.parametrize("select_layer", [4, 10, -5, -10])
def test_clip_select_layer_out_of_range(tmp_path, select_layer):
    hf_clip(tmp_path)  # 3 layers: hidden_states[-4..3]
    with pytest.raises(ValueError, match=rf"select_layer={select_layer} is out of range for a CLIP with 3 layers: use "
                                         rf"-4\.\.3 \(an index into hidden_states, 0 = the embeddings\)"):
        CLIPVisionTower.from_pretrained(tmp_path, select_layer=select_layer)


def test_clip_unsupported_select_feature(tmp_path):
    hf_clip(tmp_path)
    with pytest.raises(ValueError, match="select_feature='cls' is not supported: use 'patch' or 'cls_patch'"):
        CLIPVisionTower.from_pretrained(tmp_path, select_feature="cls")


@pytest.mark.parametrize("layout", ["llava", "llava-hf"])
def test_vlm_select_layer_out_of_range(tmp_path, layout):
    """The value comes from the VLM's config.json (mm_vision_select_layer / vision_feature_layer): that file is
    named."""
    if layout == "llava":
        path = llava_original_dir(tmp_path)
        edit_config(path, mm_vision_select_layer=7)
    else:
        path = tmp_path
        hf_llava(path)
        edit_config(path, vision_feature_layer=7)
    with pytest.raises(ValueError, match=at(path / "config.json") + r": select_layer=7 is out of range for a CLIP with "
                                                                    r"3 layers: use -4\.\.3"):
        VoCoLlama.from_pretrained(path)


@pytest.mark.parametrize("field, value, message", [
    ("mm_projector_type", "qformer", "mm_projector_type='qformer' is not supported: use 'linear' or 'mlp2x_gelu'"),
    ("mm_vision_select_feature", "cls", "select_feature='cls' is not supported: use 'patch' or 'cls_patch'"),
])
def test_llava_original_unsupported_value(tmp_path, field, value, message):
    original = llava_original_dir(tmp_path)
    edit_config(original, **{field: value})
    with pytest.raises(ValueError, match=at(original / "config.json") + ": " + re.escape(message)):
        VoCoLlama.from_pretrained(original)


def test_llava_hf_unsupported_projector_act(tmp_path):
    hf_llava(tmp_path)
    edit_config(tmp_path, projector_hidden_act="relu")
    with pytest.raises(ValueError, match=at(tmp_path / "config.json") + r": only LLaVA-1\.5's projector \(gelu\)"):
        VoCoLlama.from_pretrained(tmp_path)


def test_llava_hf_unsupported_select_strategy(tmp_path):
    hf_llava(tmp_path)
    edit_config(tmp_path, vision_feature_select_strategy="cls")
    with pytest.raises(ValueError, match=at(tmp_path / "config.json") + ": vision_feature_select_strategy='cls' is not "
                                                                        "supported: use 'default' or 'full'"):
        VoCoLlama.from_pretrained(tmp_path)


# ----------------------------------------------------------------------------------------------------------------
# Putting the VLM together from the wrong pieces

def test_hub_vision_tower_needs_vision_path(tmp_path):
    original = llava_original_dir(tmp_path)
    edit_config(original, mm_vision_tower="openai/clip-vit-large-patch14-336")
    with pytest.raises(FileNotFoundError, match=at(original / "config.json") + ": mm_vision_tower='openai/clip-vit-"
                                                "large-patch14-336' is not a local directory: download that CLIP "
                                                "checkpoint and pass vision_path="):
        VoCoLlama.from_pretrained(original)


def test_mm_hidden_size_does_not_match_clip(tmp_path):
    original = llava_original_dir(tmp_path)
    hf_clip(tmp_path / "clip64", hidden_size=64)
    with pytest.raises(ValueError, match=at(original / "config.json") + ": mm_hidden_size=48 but the CLIP in "
                                         + at(tmp_path / "clip64") + " has hidden_size=64: pass the vision tower"):
        VoCoLlama.from_pretrained(original, vision_path=tmp_path / "clip64")


@pytest.mark.parametrize("with_vision", [False, True], ids=["nothing", "vision_path only"])
def test_plain_llama_needs_vision_and_projector(tmp_path, with_vision):
    stage1(llava_original_dir(tmp_path), tmp_path / "vicuna")
    vision = tmp_path / "original" / "clip" if with_vision else None
    with pytest.raises(ValueError, match=at(tmp_path / "vicuna") + " is a plain LLaMA checkpoint.*pass vision_path="
                                         "<CLIP directory> and projector_path=<LLaVA-1.5 mm_projector.bin>"):
        VoCoLlama.from_pretrained(tmp_path / "vicuna", vision_path=vision)


def build(layout, tmp_path) -> Path:
    """The checkpoint directory of one layout."""
    if layout == "llava":
        return llava_original_dir(tmp_path)
    {"llama": hf_llama, "clip": hf_clip, "clip full": lambda path: hf_clip(path, full=True),
     "llava-hf": hf_llava}[layout](tmp_path)
    return tmp_path


LAYOUTS = {  # layout -> (kind that require_kind reports, architectures in its config.json, the loader to use)
    "llama": ("llama", "LlamaForCausalLM", "Llama"),
    "clip": ("clip", "CLIPVisionModel", "CLIPVisionTower"),
    "clip full": ("clip", "CLIPModel", "CLIPVisionTower"),
    "llava-hf": ("llava-hf", "LlavaForConditionalGeneration", "VoCoLlama"),
    "llava": ("llava", "LlavaLlamaForCausalLM", "VoCoLlama"),
}


@pytest.mark.parametrize("load, layout", [
    (Llama.from_pretrained, "clip"), (Llama.from_pretrained, "clip full"), (Llama.from_pretrained, "llava-hf"),
    (Llama.from_pretrained, "llava"),
    (CLIPVisionTower.from_pretrained, "llama"), (CLIPVisionTower.from_pretrained, "llava-hf"),
    (CLIPVisionTower.from_pretrained, "llava"),
    (VoCoLlama.from_pretrained, "clip"), (VoCoLlama.from_pretrained, "clip full"),
], ids=lambda v: v if isinstance(v, str) else v.__qualname__.split(".")[0])
def test_wrong_kind_of_checkpoint(tmp_path, load, layout):
    """A directory of another kind is named as such, with the loader to use, before any weight is read."""
    kind, architecture, loader = LAYOUTS[layout]
    path = build(layout, tmp_path)
    with pytest.raises(ValueError, match=at(path / "config.json") + f" describes a {re.escape(kind)} checkpoint "
                       rf"\(architectures=\['{architecture}'\]\): load it with {loader}\.from_pretrained$"):
        load(path)


@pytest.mark.parametrize("vlm", ["stage1", "llava"])
def test_llama_directory_as_vision_path(tmp_path, vlm):
    projector = stage1(llava_original_dir(tmp_path), tmp_path / "vicuna")
    path = tmp_path / "vicuna" if vlm == "stage1" else tmp_path / "original"
    with pytest.raises(ValueError, match=at(tmp_path / "vicuna" / "config.json") + " describes a llama checkpoint"):
        VoCoLlama.from_pretrained(path, vision_path=tmp_path / "vicuna", projector_path=projector)


def test_projector_path_not_a_weights_file(tmp_path):
    """The projector is a single weights file: only .safetensors and PyTorch .bin/.pt/.pth are read."""
    stage1(llava_original_dir(tmp_path), tmp_path / "vicuna")
    wrong = tmp_path / "vicuna" / "config.json"
    with pytest.raises(ValueError, match=at(wrong) + r" is not a weights file: expected \.safetensors or a PyTorch "
                                                     r"\.bin"):
        VoCoLlama.from_pretrained(tmp_path / "vicuna", vision_path=tmp_path / "original" / "clip", projector_path=wrong)


def test_corrupt_projector(tmp_path):
    projector = stage1(llava_original_dir(tmp_path), tmp_path / "vicuna")
    projector.write_bytes(bytes(range(256)) * 8)
    with pytest.raises(ValueError, match=at(projector) + r" (could not be read as plain tensors|is not a readable "
                                                         r"PyTorch file) \(.*\): it is corrupt"):
        VoCoLlama.from_pretrained(tmp_path / "vicuna", vision_path=tmp_path / "original" / "clip",
                                  projector_path=projector)


def test_projector_path_does_not_exist(tmp_path):
    stage1(llava_original_dir(tmp_path), tmp_path / "vicuna")
    missing = tmp_path / "mm_projector.bin"
    with pytest.raises(FileNotFoundError, match=at(missing) + " does not exist") as e:
        VoCoLlama.from_pretrained(tmp_path / "vicuna", vision_path=tmp_path / "original" / "clip",
                                  projector_path=missing)
    assert "checkpoint directory" not in str(e.value)


# ----------------------------------------------------------------------------------------------------------------
# Bad inputs to a loaded model

@pytest.mark.parametrize("shape", [(2, 3, 64, 64), (2, 1, 56, 56), (2, 56, 56, 3)],
                         ids=["size", "channels", "channels_last"])
def test_pixel_values_wrong_shape(tmp_path, shape):
    hf_llava(tmp_path)
    vlm = VoCoLlama.from_pretrained(tmp_path)
    ids, _ = image_ids()
    expected = re.escape(f"pixel_values must be {PIXELS}, got {shape}") + ": resize/crop"
    with pytest.raises(ValueError, match=expected):
        vlm.vision(torch.randn(shape))
    with pytest.raises(ValueError, match=expected):
        vlm(ids, torch.randn(shape))


@pytest.mark.parametrize("shape", [(3, 56, 56), (1, 2, 3, 56, 56)], ids=["one image unbatched", "extra dim"])
def test_pixel_values_wrong_ndim(tmp_path, shape):
    """Checked before the placeholders are counted: an unbatched image is not taken for 3 images."""
    hf_llava(tmp_path)
    vlm = VoCoLlama.from_pretrained(tmp_path)
    ids, _ = image_ids(batch=1)
    with pytest.raises(ValueError, match=re.escape(f"pixel_values must be (n_images, 3, H, W), got {shape}")):
        vlm(ids, torch.randn(shape))


@pytest.mark.parametrize("case", ["fewer images", "no images", "fewer placeholders"])
def test_image_placeholders_do_not_match_images(tmp_path, case):
    hf_llava(tmp_path)
    vlm = VoCoLlama.from_pretrained(tmp_path)
    ids, pixels = image_ids()  # 2 rows x NUM_PATCHES placeholders
    ids, pixels = {"fewer images": (ids, pixels[:1]), "no images": (ids, None),
                   "fewer placeholders": (ids[:, 2:], pixels)}[case]
    placeholders = int((ids == IMAGE_TOKEN).sum())
    n_images = 0 if pixels is None else len(pixels)
    with pytest.raises(ValueError, match=rf"input_ids hold {placeholders} image placeholder tokens, but {n_images} "
                                         rf"image\(s\) x {NUM_PATCHES} features.*expand each <image> to {NUM_PATCHES}"):
        vlm(ids, pixels)


def test_generate_beyond_context(tmp_path):
    hf_llama(tmp_path)  # max_position_embeddings=256
    llm = Llama.from_pretrained(tmp_path)
    prompt = torch.randint(3, 160, (1, 200))
    with pytest.raises(ValueError, match=r"a prompt that reaches position 199 \+ max_new_tokens=57 exceeds the "
                                         r"model's context of 256 positions: shorten the prompt"):
        generate(llm, prompt, max_new_tokens=57)
    assert len(generate(llm, prompt, max_new_tokens=56)[0]) == 56  # exactly full is fine


def test_generate_zero_new_tokens(tmp_path):
    hf_llama(tmp_path)
    llm = Llama.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="max_new_tokens takes an int >= 1, not 0"):
        generate(llm, torch.randint(3, 160, (1, 5)), max_new_tokens=0)


# ----------------------------------------------------------------------------------------------------------------
# Loses nothing

def test_failed_load_leaves_checkpoint_unchanged(tmp_path):
    hf_llama(tmp_path / "one").save_pretrained(tmp_path / "ckpt", max_shard_size="100KB")
    ckpt = tmp_path / "ckpt"
    edit_config(ckpt, num_hidden_layers=3)
    before = snapshot(ckpt)
    for load in (Llama.from_pretrained, CLIPVisionTower.from_pretrained, VoCoLlama.from_pretrained):
        with pytest.raises(ValueError):
            load(ckpt)
    assert snapshot(ckpt) == before  # same files, byte for byte, and no new ones


def test_failed_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    """A save that dies half-way (disk full, ^C) leaves the previous model.safetensors whole and no temp file."""
    hf_llama(tmp_path)
    llm = Llama.from_pretrained(tmp_path)
    before = snapshot(tmp_path)

    def dies_half_way(tensors, file, metadata=None):
        open(file, "wb").write(b"half a file")
        raise OSError("No space left on device")

    monkeypatch.setattr(checkpoint, "save_file", dies_half_way)
    with pytest.raises(OSError, match="No space left on device"):
        llm.save_pretrained(tmp_path)
    assert snapshot(tmp_path) == before
    Llama.from_pretrained(tmp_path)  # still loads
