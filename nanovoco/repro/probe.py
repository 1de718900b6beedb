"""Which questions survive average pooling: linear probes on the frozen vision tower's features.

Average pooling + linear (LLaMA-VID's compressor) hands the LLM the mean of the image's patch features; VoCo-LLaMA's
tokens attend to every patch. A question type can separate the two only if its answer is lost in the mean. This
measures that for each question type of nanovoco.repro.synthetic whose wording is fixed (the layout set: the answer is a
function of the image alone): a linear classifier of the answer, fitted on the features the VLM reads (the tower's
penultimate layer, as LLaVA reads CLIP's), either mean-pooled over the patches or all patches side by side, and its
held-out accuracy next to the no-image answer (the type's most common answer). Two classifiers:
- a fitted one, multinomial logistic regression on standardised features (its L2 penalty chosen on a validation
  split): is the answer in the features at all, in any direction, however faint;
- a nearest-class-mean one, which has nothing to learn (as vision_pretrain.probe): is the answer a large direction of
  the features, one that dot products (attention, or a linear layer trained for a few hundred steps) see at once.
A type where the pooled features' nearest-class-mean probe stays near the no-image answer while the patches' reads
it is one whose answer the mean keeps only faintly.

    python -m nanovoco.repro.probe --vision runs/repro/seed0/vision --out runs/probe.json

(without --vision a tower is pretrained first, as the repro's stage 0 does, ~40 CPU seconds).
"""
import json
import random
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from nanovoco import cli, files
from nanovoco.image import preprocess
from nanovoco.model import CLIPVisionTower
from nanovoco.repro import synthetic, vision_pretrain

PENALTIES = (1e-4, 1e-3, 1e-2, 1e-1)  # L2 weights tried on the validation split


def scenes(n: int, seed: int, n_objects: int, image_size: int) -> tuple[list, torch.Tensor]:
    """n scenes as the repro's QA sets draw them (other seeds: "probe/{seed}/{i}"), and their pixel values."""
    out = [synthetic.make_scene(random.Random(f"probe/{seed}/{i}"), image_size, n_objects) for i in range(n)]
    return out, torch.stack([preprocess(synthetic.draw(s, image_size), image_size) for s in out])


def fit_predict(x_fit, y_fit, x_test, n_classes: int, penalty: float, steps: int = 100) -> torch.Tensor:
    """Multinomial logistic regression (full-batch L-BFGS) on x_fit; the predicted classes of x_test."""
    mean, std = x_fit.mean(0), x_fit.std(0) + 1e-6
    x_fit, x_test = (x_fit - mean) / std, (x_test - mean) / std
    w = torch.zeros(x_fit.shape[1], n_classes, requires_grad=True)
    b = torch.zeros(n_classes, requires_grad=True)
    optim = torch.optim.LBFGS([w, b], max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        optim.zero_grad()
        loss = F.cross_entropy(x_fit @ w + b, y_fit) + penalty * w.square().sum()
        loss.backward()
        return loss

    optim.step(closure)
    with torch.no_grad():
        return (x_test @ w + b).argmax(-1)


def nearest_mean(x_fit, y_fit, x_test, n_classes: int) -> torch.Tensor:
    """The predicted classes of x_test: the class whose mean over x_fit is closest (a class absent from x_fit is
    never predicted)."""
    absent = torch.full_like(x_fit[0], float("inf"))
    means = torch.stack([x_fit[y_fit == c].mean(0) if (y_fit == c).any() else absent for c in range(n_classes)])
    return torch.cdist(x_test, means).argmin(-1)


def probe_type(features: dict, answers: list, split: tuple[int, int]) -> dict:
    """Held-out accuracy of the no-image answer and of both classifiers on each kind of features, for one type:
    answers[i] is image i's answer (None: no fair question). The first split[0] images fit, the next split[1]
    choose the penalty, the rest test."""
    keep = [i for i, a in enumerate(answers) if a is not None]
    classes = sorted({answers[i] for i in keep})
    y = torch.tensor([classes.index(answers[i]) for i in keep])
    n_fit = sum(i < split[0] for i in keep)
    n_val = sum(split[0] <= i < split[0] + split[1] for i in keep)
    fit, val, test = slice(0, n_fit), slice(n_fit, n_fit + n_val), slice(n_fit + n_val, None)
    counts = torch.bincount(y[fit], minlength=len(classes))
    out = {"n_test": len(y[test]), "no_image": (y[test] == counts.argmax()).float().mean().item()}
    for name, x in features.items():
        x = x[keep]
        best = max(PENALTIES, key=lambda p: (fit_predict(x[fit], y[fit], x[val], len(classes), p) == y[val])
                   .float().mean().item())
        # refit on fit + validation with the chosen penalty, then test
        predicted = fit_predict(x[:n_fit + n_val], y[:n_fit + n_val], x[test], len(classes), best)
        out[name] = (predicted == y[test]).float().mean().item()
        predicted = nearest_mean(x[:n_fit + n_val], y[:n_fit + n_val], x[test], len(classes))
        out[f"{name}_nearest_mean"] = (predicted == y[test]).float().mean().item()
    return out


def run(tower: CLIPVisionTower, n_images: int = 6000, seed: int = 0, n_objects: int = 3,
        types=synthetic.QUESTION_SETS["layout"]) -> dict:
    """Probe every type of types on n_images fresh scenes (60% fit, 15% validation, 25% test)."""
    size = tower.config.image_size
    drawn, pixels = scenes(n_images, seed, n_objects, size)
    feats = vision_pretrain.features(tower, pixels)  # (n, patches, D)
    features = {"mean_pooled": feats.mean(1), "all_patches": feats.flatten(1)}
    split = (round(0.6 * n_images), round(0.15 * n_images))
    result = {}
    for qtype in tqdm(types, desc="probe", unit="type"):
        answers = [qa[1] if (qa := synthetic.ask_layout(s, qtype, size)) else None for s in drawn]
        result[qtype] = probe_type(features, answers, split)
    return result


def markdown(result: dict) -> str:
    """The table: held-out accuracy (%) per type, each kind of features with both classifiers."""
    lines = ["| question type | held-out | no image | mean of the patches: fitted | nearest class mean | "
             "all patches: fitted | nearest class mean |", "|---|" + "---:|" * 6]
    for qtype, r in result.items():
        cells = [r["n_test"], *(f"{100 * r[k]:.1f}" for k in ("no_image", "mean_pooled", "mean_pooled_nearest_mean",
                                                               "all_patches", "all_patches_nearest_mean"))]
        lines.append(f"| {qtype} | " + " | ".join(map(str, cells)) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = cli.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--vision", type=Path, help="a tower in CLIP's HF layout (default: pretrain one with --seed)")
    p.add_argument("--out", type=Path, help="write the result as JSON here too")
    p.add_argument("--images", type=int, default=6000)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    if a.images < 100:
        p.exit(2, f"--images {a.images}: give at least 100 (60% fit, 15% validation, 25% test)\n")
    if a.vision is not None and not (a.vision / "config.json").is_file():
        p.exit(2, f"--vision {a.vision}: no config.json there; give a folder written by "
                  f"nanovoco.repro.vision_pretrain\n")
    try:
        a.out = a.out and files.output_file(a.out, "--out")  # writable, before the probes' work
    except ValueError as e:
        p.exit(2, f"{e}\n")
    with tempfile.TemporaryDirectory() as tmp:
        if a.vision is None:
            a.vision = Path(tmp)
            vision_pretrain.save(vision_pretrain.pretrain(seed=a.seed), a.vision)
        tower = CLIPVisionTower.from_pretrained(a.vision).eval()  # the layer the VLM reads
    result = run(tower, a.images, a.seed)
    print(markdown(result))
    if a.out:
        text = json.dumps(result, indent=1)
        files.atomic_write(a.out, lambda tmp: Path(tmp).write_text(text))
        print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
