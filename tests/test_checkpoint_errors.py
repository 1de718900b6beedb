"""Bad input gets a clear error and loses nothing.

Each test breaks one thing in a tiny reference checkpoint (or in a call) and checks the exception type and that the
message names the file or key and says what to do. Tests marked xfail(strict=True) are known gaps in nanovoco: they
state the error nanovoco should give and start failing (so the mark must go) once it does.
"""
import collections
import json
import re

import pytest
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from nanovoco import checkpoint
from nanovoco.generate import generate
from nanovoco.model import CLIPVisionTower, Llama, VoCoLlama
from tiny import IMAGE_TOKEN, NUM_PATCHES, VISION, hf_clip, hf_llama, hf_llava, image_ids, llava_original, stage1

PIXELS = (f"(B, 3, {VISION['image_size']}, {VISION['image_size']})")  # what the vision tower's errors ask for


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
    hf_llama(tmp_path / "one").save_pretrained(tmp_path, max_shard_size="100KB")
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


@pytest.mark.parametrize("content", ["instance", "OrderedDict subclass", "code on unpickle"])
def test_bin_with_pickled_object_is_refused(tmp_path, content):
    hf_llama(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    (tmp_path / "model.safetensors").unlink()
    obj = {"instance": {**state, "x": Anything()}, "OrderedDict subclass": StateDict(state),
           "code on unpickle": {**state, "x": Payload(tmp_path / "pwned")}}[content]
    torch.save(obj, tmp_path / "pytorch_model.bin")
    # (?s): the message quotes torch's own, which runs over several lines
    with pytest.raises(ValueError, match="(?s)" + at(tmp_path / "pytorch_model.bin") + " could not be loaded as "
                       "plain tensors.*does not unpickle arbitrary objects: convert it to safetensors"):
        Llama.from_pretrained(tmp_path)
    assert not (tmp_path / "pwned").exists()


@pytest.mark.xfail(strict=True, raises=AttributeError, reason="a .bin holding a bare tensor (or list) passes "
                   "weights_only and then fails with \"'Tensor' object has no attribute 'keys'\" (Checkpoint.__init__)")
def test_bin_that_is_not_a_dict_of_tensors(tmp_path):
    hf_llama(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    torch.save(torch.zeros(3), tmp_path / "pytorch_model.bin")
    with pytest.raises(ValueError, match=at(tmp_path / "pytorch_model.bin") + ".*dict"):
        Llama.from_pretrained(tmp_path)


@pytest.mark.xfail(strict=True, raises=AttributeError, reason="a weights file (no config) reaches llama_config(None) "
                   "and fails with \"'NoneType' object has no attribute 'get'\"")
def test_weights_file_instead_of_directory(tmp_path):
    hf_llama(tmp_path)
    with pytest.raises(ValueError, match=at(tmp_path / "model.safetensors") + ".*pass the checkpoint directory"):
        Llama.from_pretrained(tmp_path / "model.safetensors")


@pytest.mark.xfail(strict=True, raises=SafetensorError, reason="the index is not checked against the shards' own "
                   "keys: a key listed under the wrong shard surfaces as safetensors' bare 'File does not contain "
                   "tensor model.norm.weight', naming neither file")
def test_shard_index_disagrees_with_shard(tmp_path):
    hf_llama(tmp_path / "one").save_pretrained(tmp_path, max_shard_size="100KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.norm.weight"] = "model-00001-of-00004.safetensors"  # it is in shard 4
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(KeyError, match="model.norm.weight.*" + at(tmp_path / "model-00001-of-00004.safetensors")):
        Llama.from_pretrained(tmp_path)


@pytest.mark.xfail(strict=True, raises=pytest.fail.Exception, reason="a tensor in a shard but not in the index "
                   "is silently ignored, although checkpoint.py's docstring promises that every key on disk is "
                   "mapped or deliberately unused")
def test_shard_holds_tensor_missing_from_index(tmp_path):
    hf_llama(tmp_path / "one").save_pretrained(tmp_path, max_shard_size="100KB")
    edit_tensors(tmp_path / "model-00004-of-00004.safetensors", **{"model.extra.weight": torch.zeros(2)})
    with pytest.raises(KeyError, match="model.extra.weight"):
        Llama.from_pretrained(tmp_path)


# ----------------------------------------------------------------------------------------------------------------
# Keys and shapes that do not match the config

def test_missing_tensor(tmp_path):
    hf_llama(tmp_path)
    edit_tensors(tmp_path / "model.safetensors", drop=["model.layers.1.mlp.up_proj.weight"])
    with pytest.raises(KeyError, match=at(tmp_path) + r": 1 expected tensor\(s\) missing, e\.g\. "
                                        r"\['model\.layers\.1\.mlp\.up_proj\.weight'\].*config\.json"):
        Llama.from_pretrained(tmp_path)


def test_unexpected_tensor(tmp_path):
    hf_llama(tmp_path)
    edit_tensors(tmp_path / "model.safetensors", **{"model.extra.weight": torch.zeros(2)})
    with pytest.raises(KeyError, match=at(tmp_path) + r": 1 unexpected tensor\(s\), e\.g\. \['model\.extra\.weight'\]"):
        Llama.from_pretrained(tmp_path)


@pytest.mark.parametrize("field, value, key, on_disk, needed", [
    ("intermediate_size", 128, "model.layers.0.mlp.gate_proj.weight", (112, 64), (128, 64)),
    ("vocab_size", 200, "model.embed_tokens.weight", (160, 64), (200, 64)),
])
def test_config_does_not_fit_weights(tmp_path, field, value, key, on_disk, needed):
    hf_llama(tmp_path)
    edit_config(tmp_path, **{field: value})
    with pytest.raises(ValueError, match=at(tmp_path / "model.safetensors") + f": {re.escape(key)} has shape "
                       f"{re.escape(str(on_disk))}, but the config \\({at(tmp_path / 'config.json')}\\) needs "
                       f"{re.escape(str(needed))}"):
        Llama.from_pretrained(tmp_path)


def test_num_hidden_layers_larger_than_weights(tmp_path):
    hf_llama(tmp_path)
    edit_config(tmp_path, num_hidden_layers=3)
    with pytest.raises(KeyError, match=r"9 expected tensor\(s\) missing, e\.g\. \['model\.layers\.2\..*config\.json"):
        Llama.from_pretrained(tmp_path)


def test_num_hidden_layers_smaller_than_weights(tmp_path):
    hf_llama(tmp_path)
    edit_config(tmp_path, num_hidden_layers=1)
    with pytest.raises(KeyError, match=r"9 unexpected tensor\(s\), e\.g\. \['model\.layers\.1\..*num_hidden_layers "
                                       r"in config\.json wrong"):
        Llama.from_pretrained(tmp_path)


def test_stage1_projector_for_another_clip(tmp_path):
    """mm_projector.bin was trained on a 48-wide CLIP; a 64-wide one is passed."""
    projector = stage1(llava_original_dir(tmp_path), tmp_path / "vicuna")
    hf_clip(tmp_path / "clip64", hidden_size=64)
    with pytest.raises(ValueError, match=at(projector) + r": model\.mm_projector\.0\.weight has shape \(64, 48\)"):
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


@pytest.mark.xfail(strict=True, raises=AssertionError, reason="LlamaConfig.__post_init__ asserts 'query heads must "
                   "group over KV heads': no file, no values, and gone under python -O")
def test_kv_heads_do_not_divide_heads(tmp_path):
    hf_llama(tmp_path)
    edit_config(tmp_path, num_key_value_heads=3)
    with pytest.raises(ValueError, match=at(tmp_path / "config.json") + ".*num_key_value_heads=3"):
        Llama.from_pretrained(tmp_path)


def test_unsupported_clip_hidden_act(tmp_path):
    hf_clip(tmp_path)
    edit_config(tmp_path, hidden_act="gelu")
    with pytest.raises(ValueError, match=at(tmp_path / "config.json") + ": CLIP hidden_act='gelu' is not supported"):
        CLIPVisionTower.from_pretrained(tmp_path)


@pytest.mark.xfail(strict=True, raises=pytest.fail.Exception, reason="select_layer is taken modulo "
                   "num_hidden_layers + 1: select_layer=10 or -10 on a 3-layer CLIP silently reads hidden_states[2]")
@pytest.mark.parametrize("select_layer", [10, -10])
def test_clip_select_layer_out_of_range(tmp_path, select_layer):
    hf_clip(tmp_path)
    with pytest.raises(ValueError, match=f"select_layer={select_layer}"):
        CLIPVisionTower.from_pretrained(tmp_path, select_layer=select_layer)


def test_llava_original_unsupported_projector(tmp_path):
    original = llava_original_dir(tmp_path)
    edit_config(original, mm_projector_type="qformer")
    with pytest.raises(ValueError, match=at(original / "config.json") + ": mm_projector_type='qformer' is not "
                                                                        "supported: use 'linear' or 'mlp2x_gelu'"):
        VoCoLlama.from_pretrained(original)


@pytest.mark.xfail(strict=True, raises=pytest.fail.Exception, reason="mm_vision_select_feature is not validated: "
                   "'cls' is read as 'cls_patch' by the vision tower (17 features) but as 'patch' by "
                   "num_image_tokens (16), so images silently fill the wrong placeholders")
def test_llava_original_unsupported_select_feature(tmp_path):
    original = llava_original_dir(tmp_path)
    edit_config(original, mm_vision_select_feature="cls")
    with pytest.raises(ValueError, match=at(original / "config.json") + ".*'cls'"):
        VoCoLlama.from_pretrained(original)


def test_llava_hf_unsupported_projector_act(tmp_path):
    hf_llava(tmp_path)
    edit_config(tmp_path, projector_hidden_act="relu")
    with pytest.raises(ValueError, match=at(tmp_path / "config.json") + r": only LLaVA-1\.5's projector \(gelu\)"):
        VoCoLlama.from_pretrained(tmp_path)


@pytest.mark.xfail(strict=True, raises=KeyError, reason="an unknown vision_feature_select_strategy is a bare "
                   "KeyError: 'cls' from a dict lookup in vlm_parts, naming neither file nor allowed values")
def test_llava_hf_unsupported_select_strategy(tmp_path):
    hf_llava(tmp_path)
    edit_config(tmp_path, vision_feature_select_strategy="cls")
    with pytest.raises(ValueError, match=at(tmp_path / "config.json") + ".*'default' or 'full'"):
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


def test_clip_directory_as_llama(tmp_path):
    """Reported as an unsupported LLaMA activation rather than as the wrong kind of checkpoint."""
    hf_clip(tmp_path)
    with pytest.raises(ValueError, match=at(tmp_path / "config.json") + ": hidden_act='quick_gelu' is not supported "
                                                                        "by nanovoco's LLaMA"):
        Llama.from_pretrained(tmp_path)


def test_llama_directory_as_clip(tmp_path):
    """Reported as an unsupported CLIP activation rather than as the wrong kind of checkpoint."""
    hf_llama(tmp_path)
    with pytest.raises(ValueError, match=at(tmp_path / "config.json") + ": CLIP hidden_act='silu' is not supported"):
        CLIPVisionTower.from_pretrained(tmp_path)


def test_llava_directory_as_llama(tmp_path):
    original = llava_original_dir(tmp_path)
    with pytest.raises(KeyError, match=at(original) + r": 4 unexpected tensor\(s\), e\.g\. \['model\.mm_projector"):
        Llama.from_pretrained(original)


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
    with pytest.raises(ValueError, match=r"prompt of 200 tokens \+ max_new_tokens=57 exceeds the model's context of "
                                         r"256 positions: shorten the prompt or lower max_new_tokens"):
        generate(llm, prompt, max_new_tokens=57)


def test_generate_zero_new_tokens(tmp_path):
    hf_llama(tmp_path)
    llm = Llama.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="max_new_tokens must be at least 1, got 0"):
        generate(llm, torch.randint(3, 160, (1, 5)), max_new_tokens=0)


# ----------------------------------------------------------------------------------------------------------------
# Loses nothing

def test_failed_load_leaves_checkpoint_unchanged(tmp_path):
    hf_llama(tmp_path / "one").save_pretrained(tmp_path / "ckpt", max_shard_size="100KB")
    ckpt = tmp_path / "ckpt"
    edit_config(ckpt, num_hidden_layers=3)
    before = snapshot(ckpt)
    for load in (Llama.from_pretrained, CLIPVisionTower.from_pretrained, VoCoLlama.from_pretrained):
        with pytest.raises((KeyError, ValueError)):
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
