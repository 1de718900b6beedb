"""Stage 0 of the reproduction: pretrain the tiny vision tower, as CLIP is pretrained before LLaVA and VoCo-LLaMA.

The paper's VLM reads images through a frozen CLIP that already knows what is in a picture. A tiny ViT with random
weights gives features that the LLM must learn to decode from scratch, and that plateau eats most of a CPU budget
at a step that depends on the seed. So the repro first trains the tower on the synthetic scenes with an objective
of its own, never the QA answers: for every patch, the colour and the shape of the object in the grid cell that the
patch belongs to (or "none"), and that cell's row and column. Scenes are drawn fresh (other seeds than the QA sets,
1 to 8 objects), rendered in memory. The tower is saved in CLIP's HF layout (CLIPVisionModel config.json +
model.safetensors), so that `CLIPVisionTower.from_pretrained` and `train.py --vision_path` load it, and every later
stage freezes it.

The per-patch heads read the last layer; the VLM reads the one before, as LLaVA reads CLIP's penultimate layer.

    python -m nanovoco.repro.vision_pretrain --out runs/vision --steps 300

writes the tower and eval.json, a probe of its features against the same tower untrained (`probe`).
"""
import json
import math
import random
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from nanovoco import checkpoint, cli, files, formats
from nanovoco.config import CLIPVisionConfig
from nanovoco.image import preprocess
from nanovoco.init import init_weights
from nanovoco.model import CLIPVisionTower
from nanovoco.repro import synthetic

# 64 x 64 images in 8 x 8 patches: 64 vision tokens, so that K = 1..16 VoCo tokens is 64x..4x compression.
# Every object sits in a 16 x 16 grid cell (synthetic.GRID = 4), 2 x 2 patches.
TOWER = CLIPVisionConfig(hidden_size=96, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
                         image_size=64, patch_size=8, select_layer=-1)


def scene_batch(n: int, seed: int, config: CLIPVisionConfig = TOWER):
    """n random scenes -> pixel values (n, 3, H, W) and the per-patch targets, each (n, patches): colour id and
    shape id of the object in the patch's grid cell (0 = no object), the cell's row and column. Scene i depends only
    on (seed, i)."""
    side, cell = config.image_size // config.patch_size, config.image_size / synthetic.GRID
    cell_of = ((torch.arange(side) + 0.5) * config.patch_size // cell).long()  # grid row (column) of a patch row
    rows, cols = cell_of[:, None].expand(side, side).flatten(), cell_of[None, :].expand(side, side).flatten()
    cells = rows * synthetic.GRID + cols  # (patches,) the grid cell of each patch, in reading order
    colours = list(synthetic.PALETTE)
    pixels, colour_ids, shape_ids = [], [], []
    for i in range(n):
        rng = random.Random(f"vision/{seed}/{i}")  # never the QA sets' scenes, which are seeded "{seed}/{i}"
        scene = synthetic.make_scene(rng, config.image_size, rng.randint(1, len(colours)))
        colour_of, shape_of = torch.zeros(2, synthetic.GRID ** 2, dtype=torch.long)  # per grid cell
        for o in scene:
            k = int(o["y"] // cell) * synthetic.GRID + int(o["x"] // cell)
            colour_of[k], shape_of[k] = colours.index(o["color"]) + 1, synthetic.SHAPES.index(o["shape"]) + 1
        pixels.append(preprocess(synthetic.draw(scene, config.image_size), config.image_size))
        colour_ids.append(colour_of[cells])
        shape_ids.append(shape_of[cells])
    return torch.stack(pixels), torch.stack(colour_ids), torch.stack(shape_ids), rows.expand(n, -1), \
        cols.expand(n, -1)


class PatchHeads(nn.Module):
    """Linear per-patch classifiers of colour, shape, grid row and grid column on the tower's features: the
    pretraining objective. Without the row and column the tower learns to drop where a patch is (nothing else in
    the objective needs it), and the VLM can no longer tell left from right."""

    def __init__(self, dim: int):
        super().__init__()
        self.colour = nn.Linear(dim, len(synthetic.PALETTE) + 1)
        self.shape = nn.Linear(dim, len(synthetic.SHAPES) + 1)
        self.row = nn.Linear(dim, synthetic.GRID)
        self.col = nn.Linear(dim, synthetic.GRID)

    def heads(self):
        return (self.colour, self.shape, self.row, self.col)

    def loss(self, features, *ids):  # features (B, N, D), ids (B, N)
        return sum(F.cross_entropy(h(features).flatten(0, 1), t.flatten()) for h, t in zip(self.heads(), ids))


def pretrain(steps: int = 300, n_images: int = 4000, batch_size: int = 64, lr: float = 1e-3, seed: int = 0,
             config: CLIPVisionConfig = TOWER, progress: bool = True) -> CLIPVisionTower:
    """Train a tower from scratch (init.init_weights) with the per-patch heads; return the tower."""
    torch.manual_seed(seed)
    tower, heads = CLIPVisionTower(config), PatchHeads(config.hidden_size)
    init_weights(tower)
    pixels, *ids = scene_batch(n_images, seed, config)
    params = [*tower.parameters(), *heads.parameters()]
    optim = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(seed)
    warmup = max(1, steps // 20)
    bar = tqdm(range(steps), desc="vision", disable=not progress)
    for step in bar:
        for group in optim.param_groups:  # linear warmup over 5% of the steps, then cosine to 0
            group["lr"] = lr * min((step + 1) / warmup, 0.5 * (1 + math.cos(math.pi * step / steps)))
        idx = torch.randint(n_images, (batch_size,), generator=generator)
        loss = heads.loss(tower(pixels[idx]), *(t[idx] for t in ids))
        optim.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optim.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    return tower.eval().requires_grad_(False)


def save(tower: CLIPVisionTower, path):
    """CLIPVisionModel layout (config.json + model.safetensors), as HF and LLaVA keep CLIP."""
    c = tower.config
    checkpoint.save(path, formats.clip_hf_config(c), tower.state_dict(), formats.clip_keys(c, "vision_model."))


@torch.no_grad()
def features(tower: CLIPVisionTower, pixels, batch_size: int = 256) -> torch.Tensor:
    return torch.cat([tower(pixels[i:i + batch_size]) for i in range(0, len(pixels), batch_size)])


TARGETS = ("colour", "shape", "row", "column")


def probe(tower: CLIPVisionTower, seed: int = 0, n_images: int = 300) -> dict:
    """How plainly a tower's patch features show the scene: for each per-patch target, the held-out balanced
    accuracy (mean recall over classes) of a nearest-class-mean classifier, fitted on n_images scenes and tested on
    as many others. It has nothing to learn, so it measures the features' geometry: a target that is only a small
    direction among others (as colour is in a random tower's features, next to position and pixel detail) is
    linearly decodable yet far from the nearest mean. That geometry is what attention's dot products see."""
    fit = scene_batch(n_images, seed + 1_000_000, tower.config)
    test = scene_batch(n_images, seed + 2_000_000, tower.config)
    f_fit, f_test = features(tower, fit[0]).flatten(0, 1), features(tower, test[0]).flatten(0, 1)  # (n N, D)
    result = {}
    for name, y_fit, y_test in zip(TARGETS, fit[1:], test[1:]):
        y_fit, y_test = y_fit.flatten(), y_test.flatten()
        classes = [c for c in range(int(y_fit.max()) + 1) if (y_fit == c).any() and (y_test == c).any()]
        means = torch.stack([f_fit[y_fit == c].mean(0) for c in classes])
        predicted = torch.tensor(classes)[torch.cdist(f_test, means).argmin(-1)]
        result[name] = sum((predicted[y_test == c] == c).float().mean().item() for c in classes) / len(classes)
    return result


def main(argv=None):
    p = cli.ArgumentParser(description="Pretrain the tiny vision tower on synthetic scenes (per-patch colour, "
                                            "shape and grid cell); save it in CLIP's HF layout.")
    p.add_argument("--out", required=True, type=Path, help="directory for config.json, model.safetensors, eval.json")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--images", type=int, default=4000)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    if a.steps < 1 or a.images < 1:
        p.exit(2, f"--steps {a.steps} --images {a.images}: both must be >= 1\n")
    tower = pretrain(a.steps, a.images, seed=a.seed)
    save(tower, a.out)
    # what the VLM will read (the layer before the heads', as LLaVA reads CLIP), against the same tower untrained
    read = CLIPVisionTower.from_pretrained(a.out)
    torch.manual_seed(a.seed)
    untrained = CLIPVisionTower(read.config)
    init_weights(untrained)
    result = {"pretrained": probe(read, a.seed), "random": probe(untrained, a.seed)}
    text = json.dumps(result, indent=1)
    files.atomic_write(a.out / "eval.json", lambda tmp: Path(tmp).write_text(text))  # last: the stage is done
    print(f"wrote {a.out}; nearest-class-mean balanced accuracy of the features the VLM reads, pretrained vs "
          f"random: " + ", ".join(f"{k} {result['pretrained'][k]:.3f} vs {result['random'][k]:.3f}" for k in TARGETS))


if __name__ == "__main__":
    main()
