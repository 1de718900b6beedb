"""Stage 0 of the repro: the per-patch targets match the drawn pixels, pretraining makes the features show the scene
far more plainly than a random tower's (the probe the repro reports), and the tower round-trips through CLIP's
HF layout into a VLM."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nanovoco.repro import synthetic, vision_pretrain
from nanovoco.image import CLIP_MEAN, CLIP_STD
from nanovoco.init import init_weights
from nanovoco.model import CLIPVisionTower

ROOT = Path(__file__).resolve().parents[1]


def test_patch_targets_match_the_pixels():
    pixels, colours, shapes, rows, cols = vision_pretrain.scene_batch(8, seed=5)
    c = vision_pretrain.TOWER
    side = c.image_size // c.patch_size
    rgb = (pixels * torch.tensor(CLIP_STD)[:, None, None] + torch.tensor(CLIP_MEAN)[:, None, None]) * 255
    patches = rgb.unfold(2, c.patch_size, c.patch_size).unfold(3, c.patch_size, c.patch_size)  # (B, 3, s, s, p, p)
    palette = list(synthetic.PALETTE.values())
    for b in range(8):
        for k in range(side * side):
            patch = patches[b, :, k // side, k % side].flatten(1)  # (3, p * p)
            has = [bool(((patch - torch.tensor(rgb_)[:, None]).abs().amax(0) < 2).any()) for rgb_ in palette]
            if colours[b, k]:  # the object's colour is in the patch, and no other object's
                assert has[colours[b, k] - 1] and sum(has) == 1
            else:
                assert not any(has) and shapes[b, k] == 0
    assert rows[0].view(side, side)[:, 0].tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    assert cols[0].view(side, side)[0].tolist() == [0, 0, 1, 1, 2, 2, 3, 3]


@pytest.fixture(scope="module")
def towers():
    torch.manual_seed(0)
    random_tower = CLIPVisionTower(vision_pretrain.TOWER)
    init_weights(random_tower)
    return vision_pretrain.pretrain(steps=80, n_images=600, progress=False), random_tower


def test_pretraining_makes_the_scene_plain_in_the_features(towers):
    pretrained, random_tower = towers
    ours, theirs = vision_pretrain.probe(pretrained, n_images=100), vision_pretrain.probe(random_tower, n_images=100)
    # measured: random ~0.68 colour, ~0.75 shape; pretrained >= 0.97 after 80 steps
    assert ours["colour"] > theirs["colour"] + 0.15 and ours["shape"] > theirs["shape"] + 0.1
    assert ours["colour"] > 0.9 and ours["shape"] > 0.9 and ours["row"] > 0.9 and ours["column"] > 0.9


def test_saved_tower_loads_as_clip(towers, tmp_path):
    pretrained, _ = towers
    vision_pretrain.save(pretrained, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "clip_vision_model" and config["num_hidden_layers"] == 4
    loaded = CLIPVisionTower.from_pretrained(tmp_path, select_layer=-1)
    pixels = vision_pretrain.scene_batch(2, seed=9)[0]
    assert torch.equal(loaded(pixels), pretrained(pixels))


@pytest.mark.slow
def test_command_writes_the_tower_and_its_probe(tmp_path):
    out = tmp_path / "vision"
    run = subprocess.run([sys.executable, "-m", "nanovoco.repro.vision_pretrain", "--out", str(out), "--steps", "40",
                          "--images", "300"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    probe = json.loads((out / "eval.json").read_text())
    assert probe["pretrained"]["colour"] > probe["random"]["colour"]
    assert (out / "model.safetensors").exists()
    bad = subprocess.run([sys.executable, "-m", "nanovoco.repro.vision_pretrain", "--out", str(out), "--steps", "0"],
                         cwd=ROOT, capture_output=True, text=True)
    assert bad.returncode == 2 and "must be >= 1" in bad.stderr and "Traceback" not in bad.stderr
