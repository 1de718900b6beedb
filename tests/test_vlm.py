"""The CLIP vision tower and the whole VLM equal transformers' CLIPVisionModel / LlavaForConditionalGeneration,
from every checkpoint layout nanovoco loads."""
import dataclasses

import pytest
import torch

from nanovoco.model import CLIPVisionTower, VoCoLlama
from tiny import IMAGE_TOKEN, NUM_PATCHES, VISION_CONFIG, hf_clip, hf_llava, image_ids, llava_original, stage1
from nanovoco.voco_cache import compress


@pytest.mark.parametrize("select_layer", [-2, -1, 1])
@pytest.mark.parametrize("full", [False, True], ids=["CLIPVisionModel", "CLIPModel"])
def test_vision_features_match_hidden_states(tmp_path, full, select_layer):
    hf = hf_clip(tmp_path, full=full)
    ours = CLIPVisionTower.from_pretrained(tmp_path, select_layer=select_layer)
    size = VISION_CONFIG["image_size"]
    pixels = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = (hf.vision_model if full else hf)(pixels, output_hidden_states=True)
        feats = ours(pixels)
    assert feats.shape == (2, NUM_PATCHES, VISION_CONFIG["hidden_size"])  # CLS dropped, as LLaVA does
    torch.testing.assert_close(feats, out.hidden_states[select_layer][:, 1:], atol=1e-4, rtol=0)
    assert len(ours.layers) == select_layer % (VISION_CONFIG["num_hidden_layers"] + 1)  # later layers are never run


def test_cls_patch_keeps_cls(tmp_path):
    hf = hf_clip(tmp_path)
    ours = CLIPVisionTower.from_pretrained(tmp_path, select_feature="cls_patch")
    pixels = torch.randn(1, 3, 56, 56)
    with torch.no_grad():
        torch.testing.assert_close(ours(pixels), hf(pixels, output_hidden_states=True).hidden_states[-2],
                                   atol=1e-4, rtol=0)


@pytest.mark.parametrize("strategy", ["default", "full"])
def test_llava_hf_logits_match(tmp_path, strategy):
    hf = hf_llava(tmp_path, vision_feature_select_strategy=strategy)
    ours = VoCoLlama.from_pretrained(tmp_path)
    n = NUM_PATCHES + (strategy == "full")
    assert ours.config.num_image_tokens == n and ours.config.image_token_id == IMAGE_TOKEN
    ids, pixels = image_ids()
    ids = torch.cat([ids[:, :1], torch.full((2, n), IMAGE_TOKEN), ids[:, 1 + NUM_PATCHES:]], 1)
    with torch.no_grad():
        torch.testing.assert_close(ours(ids, pixels).logits, hf(input_ids=ids, pixel_values=pixels).logits,
                                   atol=1e-4, rtol=0)


def test_llava_original_layout_and_stage1_projector_match(tmp_path):
    """LLaVA-1.5's own layout (VoCo-LLaMA's training output) and Vicuna + CLIP + mm_projector.bin (the official
    recipe's starting point) give the same model as the llava-hf checkpoint they were cut from."""
    hf = hf_llava(tmp_path / "hf")
    original = llava_original(tmp_path / "hf", tmp_path / "original")
    projector = stage1(original, tmp_path / "vicuna")
    ids, pixels = image_ids()
    with torch.no_grad():
        ref = hf(input_ids=ids, pixel_values=pixels).logits
        ids = ids.masked_fill(ids == IMAGE_TOKEN, -200)  # LLaVA's IMAGE_TOKEN_INDEX placeholder
        for model in (VoCoLlama.from_pretrained(original),
                      VoCoLlama.from_pretrained(tmp_path / "vicuna", vision_path=original / "clip",
                                                projector_path=projector)):
            assert model.config.image_token_id == -200
            torch.testing.assert_close(model(ids, pixels).logits, ref, atol=1e-4, rtol=0)


def test_save_pretrained_round_trip(tmp_path):
    hf_llava(tmp_path / "hf")
    model = VoCoLlama.from_pretrained(tmp_path / "hf")
    model.save_pretrained(tmp_path / "saved")
    again = VoCoLlama.from_pretrained(tmp_path / "saved")  # finds saved/vision_tower through mm_vision_tower
    for (k, a), (k2, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert k == k2 and torch.equal(a, b), k
    ids, pixels = image_ids()
    with torch.no_grad():
        torch.testing.assert_close(again(ids, pixels).logits, model(ids, pixels).logits, atol=0, rtol=0)


def test_a_saved_model_reads_the_same_vision_layer_from_the_full_clip(tmp_path):
    """save_vlm keeps only the CLIP layers that run; its select layer must name the same layer in the full CLIP, so
    that `vision_path=<the CLIP it was trained from>` (infer.py --vision, the paper's recipe) is the same model."""
    hf_llava(tmp_path / "hf")
    original = llava_original(tmp_path / "hf", tmp_path / "original")
    model = VoCoLlama.from_pretrained(original)
    model.save_pretrained(tmp_path / "saved")
    with_full_clip = VoCoLlama.from_pretrained(tmp_path / "saved", vision_path=original / "clip")
    assert with_full_clip.config.vision.num_layers_run == model.config.vision.num_layers_run
    ids, pixels = image_ids()
    ids = ids.masked_fill(ids == IMAGE_TOKEN, -200)
    with torch.no_grad():
        torch.testing.assert_close(with_full_clip(ids, pixels).logits, model(ids, pixels).logits, atol=0, rtol=0)


def test_llava_hf_layout_keeps_its_voco_settings(tmp_path):
    """A VoCo model saved in llava-hf's layout keeps num_voco / voco_token_id from its config.json (it used to load
    with num_voco=0 and could not compress); from_pretrained's arguments override them."""
    voco_id = 151
    hf_llava(tmp_path / "voco", num_voco=2, voco_token_id=voco_id)
    hf_llava(tmp_path / "plain")  # the same weights, a config without VoCo settings
    vlm = VoCoLlama.from_pretrained(tmp_path / "voco")
    assert (vlm.config.num_voco, vlm.config.voco_token_id) == (2, voco_id)
    pixels = torch.randn(1, 3, 56, 56, generator=torch.Generator().manual_seed(0))
    prefix = torch.tensor([1] + [IMAGE_TOKEN] * NUM_PATCHES + [13, voco_id, voco_id])
    cache = compress(vlm, pixels, prefix)
    assert cache.positions.tolist() == [NUM_PATCHES + 2, NUM_PATCHES + 3]
    assert VoCoLlama.from_pretrained(tmp_path / "plain").config.num_voco == 0
    assert VoCoLlama.from_pretrained(tmp_path / "voco", num_voco=1).config.num_voco == 1
    overridden = VoCoLlama.from_pretrained(tmp_path / "plain", num_voco=2, voco_token_id=voco_id)
    again = compress(overridden, pixels, prefix)
    assert all(torch.equal(a, b) for x, y in zip(cache.kv, again.kv) for a, b in zip(x, y))
    with pytest.raises(ValueError, match=r"config\.json: num_voco=2 needs voco_token_id, the id of <voco> in the "
                                         r"vocabulary of 160, got -1"):
        VoCoLlama.from_pretrained(tmp_path / "plain", num_voco=2)


@pytest.mark.parametrize("kind", ["avgpool", "qformer"])
def test_baselines_compress_the_vision_features_before_the_projector(tmp_path, kind):
    """LLaMA-VID averages its vision encoder's tokens and BLIP-2's Q-Former reads its frozen encoder; the VLM's
    projector then maps the K compressed features into the LLM. At its identity init, average pooling + linear gives
    exactly the projector applied to the mean of the tower's features."""
    hf_llava(tmp_path)
    plain = VoCoLlama.from_pretrained(tmp_path)
    vlm = VoCoLlama(dataclasses.replace(plain.config, compressor=kind, compressor_tokens=1))
    missing, unexpected = vlm.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and missing and all(k.startswith("compressor.") for k in missing)
    ids, pixels = image_ids()
    ids = torch.cat([ids[:, :1], torch.full((2, 1), IMAGE_TOKEN), ids[:, 1 + NUM_PATCHES:]], 1)  # one image token
    with torch.no_grad():
        features = vlm.vision(pixels)
        x = vlm.embed(ids, pixels)[:, 1]
        compressed = features.mean(1) if kind == "avgpool" else vlm.compressor(features)[:, 0]
        torch.testing.assert_close(x, vlm.projector(compressed), atol=1e-6, rtol=0)
    assert vlm.compressor(features).shape == (2, 1, VISION_CONFIG["hidden_size"])  # in the tower's width
