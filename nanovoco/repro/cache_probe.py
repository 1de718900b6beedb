"""What the VoCo cache holds, and what the model reads from it: linear probes on the K tokens' keys and values.

VoCo-LLaMA's distillation has two halves. Stage 1 writes the image into the keys and values of K VoCo tokens; stage
2's text reads them. A model that answers a question type badly has lost it in one of the two: either the cache does
not hold the answer (the compression), or it holds it and the text does not read it (the reading). A linear probe
tells them apart: for each VoCo-LLaMA stage of a repro seed (each K, the lower bound, and the one model for every K
at each of its K) it compresses images with the stage's own weights (voco_cache.compress), flattens every layer's
cached keys and values, and fits a ridge classifier from them to each question type's answer (least squares to the
one-hot answer, the largest output wins; solved in its dual form, so that the 16 tokens' 16,384 numbers cost what
one token's 1,024 do). Fitted on N_FIT training images, its penalty chosen on the next N_VAL, refitted on both and
tested on the held-out images; each type's answer is computed from the scene (synthetic.ask_layout: the layout and
graded sets, whose answers are functions of the image alone). Beside it: what the stage answers to that type.

    python -m nanovoco.repro.cache_probe runs/repro/seed0 runs/repro/seed1 --out runs/repro/cache_probe.json
"""
import json
import re
import statistics
from pathlib import Path

import torch
from tqdm import tqdm

from nanovoco import cli, files
from nanovoco.repro import synthetic
from nanovoco.repro.analysis import load_stage
from nanovoco.repro.recipe import IMAGE_SIZE
from nanovoco.voco import Layout, compress_prefix
from nanovoco.voco_cache import compress

N_FIT, N_VAL = 1500, 500  # training images that fit the probe and choose its penalty (the held-out ones test it)
PENALTIES = (1e-8, 1e-7, 1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)  # ridge penalties tried, per standardised feature


def probed_stages(folder: Path) -> list[tuple[str, list[tuple[str, int]]]]:
    """(stage, [(label, K), ...]) for every finished VoCo-LLaMA stage of a seed's folder: the per-K models and the
    lower bound at their K, the one model for every K at each of its K."""
    out = []
    for stage in sorted((p.name for p in folder.iterdir() if (p / "eval.json").is_file()), key=stage_order):
        if m := re.fullmatch(r"(voco|lower_bound)_k(\d+)", stage):
            out.append((stage, [(stage, int(m.group(2)))]))
        elif m := re.fullmatch(r"voco_any_([\d-]+)", stage):
            out.append((stage, [(f"voco_any_k{k}", k) for k in map(int, m.group(1).split("-"))]))
    return out


def stage_order(name: str) -> tuple:
    """VoCo-LLaMA by K, then the lower bound, then the model for every K."""
    k = re.search(r"(\d+)$", name)
    return (name.startswith("lower_bound"), name.startswith("voco_any"), int(k.group(1)) if k else 0, name)


def images(data) -> list[int]:
    """The index of each image's first record in a LlavaDataset (a held-out image has one record per question)."""
    first = {}
    for i, r in enumerate(data.records):
        first.setdefault(r["image"], i)
    return list(first.values())


def pixel_values(data, index: list[int]) -> torch.Tensor:
    """The images of index in a LlavaDataset, preprocessed: (images, 3, H, W)."""
    return torch.stack([data[i]["pixel_values"][0] for i in index])


def cache_features(vlm, tokenizer, pixels: torch.Tensor, k: int, batch: int = 250) -> torch.Tensor:
    """The K VoCo tokens' cache of each image, every layer's keys and values flattened: (images, features)."""
    prefix = torch.tensor(compress_prefix(tokenizer, Layout.of(vlm.config, k)))
    out = []
    for start in range(0, len(pixels), batch):
        cache = compress(vlm, pixels[start:start + batch], prefix, num_voco=k)
        out.append(torch.cat([torch.cat([key, value], -1).flatten(1) for key, value in cache.kv], 1))
    return torch.cat(out)


def ridge_probe(kernel: torch.Tensor, answers: list, n_fit: int, n_val: int, n_features: int) -> dict | None:
    """Held-out accuracy of a ridge classifier and of the most common answer, for one question type. kernel is the
    Gram matrix x @ x.T of all images' standardised features (fit, then validation, then test images); answers[i]
    is image i's answer (None: no fair question). The penalty is chosen on the validation images, then the probe is
    refitted on fit + validation and tested. None when a part has no image with a fair question."""
    keep = torch.tensor([i for i, a in enumerate(answers) if a is not None], dtype=torch.long)
    part = torch.bucketize(keep, torch.tensor([n_fit, n_fit + n_val]), right=True)  # 0 fit, 1 validation, 2 test
    fit, val, test = part == 0, part == 1, part == 2
    if not (fit.any() and val.any() and test.any()):
        return None
    classes = sorted({answers[i] for i in keep.tolist()})
    y = torch.tensor([classes.index(answers[i]) for i in keep.tolist()])
    g = kernel[keep][:, keep]

    def predict(train, test, penalty):
        # the features centred on the fitted images, in the kernel: (x_i - m) . (x_j - m), m their mean. The
        # fitted images of a type are a subset of those the features were standardised on (empty_quarter is asked
        # of a third of the images), so the intercept is fitted here, unpenalised, as the targets' mean
        centred = g - g[:, train].mean(1, keepdim=True) - g[train].mean(0) + g[train][:, train].mean()
        target = torch.nn.functional.one_hot(y[train], len(classes)).double()
        mean = target.mean(0)
        ridge = penalty * n_features * torch.eye(int(train.sum()), dtype=g.dtype)
        dual = torch.linalg.solve(centred[train][:, train] + ridge, target - mean)
        return (centred[test][:, train] @ dual + mean).argmax(-1)

    best = max(PENALTIES, key=lambda pen: (predict(fit, val, pen) == y[val]).double().mean().item())
    majority = torch.bincount(y[fit | val], minlength=len(classes)).argmax()
    return {"cache": (predict(fit | val, test, best) == y[test]).double().mean().item(),
            "no_image": (y[test] == majority).double().mean().item(), "n_test": int(test.sum()), "penalty": best}


def probe_seed(folder: Path, types=None, stages=None) -> dict:
    """Every VoCo-LLaMA stage of one seed's folder (or those named in stages): per question type, the probe's
    held-out accuracy on the cache ("cache"), the most common answer's ("no_image"), and the stage's own accuracy
    ("answered"). A type left out of a stage had too few images with a fair question to fit, choose and test a
    probe."""
    probed = [(stage, labels) for stage, labels in probed_stages(folder) if stages is None or stage in stages]
    if not probed:
        raise ValueError(f"{folder}: no finished VoCo-LLaMA stage (voco_k<K>/eval.json); give a seed's folder of "
                         f"python -m nanovoco.repro, e.g. runs/repro/seed0")
    # the images, read once: every stage of a seed compresses the same ones (and shares its tokenizer)
    train = load_stage(folder / probed[0][0], folder / "data" / "train")[1]
    held_out = load_stage(folder / probed[0][0], folder / "data" / "eval")[1]
    train_index, test_index = images(train)[:N_FIT + N_VAL], images(held_out)
    n_fit = round(len(train_index) * N_FIT / (N_FIT + N_VAL))
    n_val = len(train_index) - n_fit
    pixels = torch.cat([pixel_values(train, train_index), pixel_values(held_out, test_index)])
    scenes = [train.records[i]["scene"] for i in train_index] + [held_out.records[i]["scene"] for i in test_index]
    result = {}
    for stage, labels in tqdm(probed, desc=f"cache probe {folder.name}", unit="stage"):
        vlm = load_stage(folder / stage, folder / "data" / "eval")[0]
        evaluation = json.loads((folder / stage / "eval.json").read_text())
        for label, k in labels:
            with torch.no_grad():
                x = cache_features(vlm, train.tokenizer, pixels, k).double()
            mean, std = x[:len(train_index)].mean(0), x[:len(train_index)].std(0) + 1e-6  # training images' only
            x = (x - mean) / std
            kernel = x @ x.T
            answered = evaluation["by_num_voco"][str(k)] if stage.startswith("voco_any") else evaluation
            result[label] = {"k": k, "n_fit": n_fit, "n_val": n_val, "by_type": {}}
            for qtype in types or [t for t in synthetic.QUESTION_SETS["graded"] if t in answered["by_type"]]:
                answers = [qa[1] if (qa := synthetic.ask_layout(s, qtype, IMAGE_SIZE)) else None for s in scenes]
                found = ridge_probe(kernel, answers, n_fit, n_val, x.shape[1])
                if found is not None:
                    result[label]["by_type"][qtype] = {**found, "answered": answered["by_type"][qtype]}
    return result


def markdown(per_seed: dict) -> str:
    """Per stage and question type, means over the seeds that probed it: the probe on the cache / the stage's
    answers (%), and the most common answer's accuracy."""
    stages = {label: row["k"] for result in per_seed.values() for label, row in result.items()}
    probed = {t for result in per_seed.values() for row in result.values() for t in row["by_type"]}
    types = [t for t in synthetic.QUESTION_SETS["graded"] if t in probed]

    def mean(label, qtype, key):
        values = [r[label]["by_type"][qtype][key] for r in per_seed.values()
                  if label in r and qtype in r[label]["by_type"]]
        return 100 * statistics.mean(values) if values else None

    def cell(label, qtype):
        held, read = mean(label, qtype, "cache"), mean(label, qtype, "answered")
        return "-" if held is None else f"{held:.1f} / {read:.1f}"

    lines = ["| stage | K | " + " | ".join(types) + " |", "|---|---:|" + "---:|" * len(types)]
    lines += [f"| {label} | {k} | " + " | ".join(cell(label, t) for t in types) + " |" for label, k in stages.items()]

    def no_image(qtype):  # a seed's stages share its images: one value per seed
        values = [next(row["by_type"][qtype]["no_image"] for row in r.values() if qtype in row["by_type"])
                  for r in per_seed.values() if any(qtype in row["by_type"] for row in r.values())]
        return f"{100 * statistics.mean(values):.1f}"

    lines.append("| no image (the probe's most common answer) | | " + " | ".join(map(no_image, types)) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = cli.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("folders", type=Path, nargs="+", help="seed folders of python -m nanovoco.repro (runs/repro/seed0)")
    p.add_argument("--out", type=Path, help="write the result as JSON here too")
    a = p.parse_args(argv)
    for folder in a.folders:  # checked before any model is loaded
        if not (folder / "data" / "train" / "data.json").is_file() or not (folder / "data" / "eval").is_dir():
            p.exit(2, f"{folder}: no data/train/data.json and data/eval there; give a seed's folder of "
                      f"python -m nanovoco.repro, e.g. runs/repro/seed0\n")
    try:
        a.out = a.out and files.output_file(a.out, "--out")  # writable, before minutes of work
        per_seed = {folder.name: probe_seed(folder) for folder in a.folders}
    except ValueError as e:
        p.exit(2, f"{e}\n")
    print(markdown(per_seed))
    if a.out:
        text = json.dumps(per_seed, indent=1)
        files.atomic_write(a.out, lambda tmp: Path(tmp).write_text(text))
        print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
