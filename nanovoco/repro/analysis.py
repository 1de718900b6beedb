"""What the reproduction's tables are made of: each seed's evaluations gathered (with Table 4's runs at other K,
the shortcuts the answers follow, and the video stage seen in several views) into one summary per seed."""
import json
import math
import random
import re
import statistics
from pathlib import Path

from nanovoco import files
from nanovoco.repro import synthetic, synthetic_video
from nanovoco.repro.recipe import IMAGE_SIZE, ORDER, any_k_stage
from nanovoco.repro.stats import accuracy_se, paired_se, retention, retention_se


# Question types that a model can score on without finding what the question asks about (synthetic.ask: the object
# it names, or the middle of the image), and what such a model answers instead
SHORTCUTS = {"shape": "the most common shape in the image", "horizontal": "the side where most objects are",
             "vertical": "the side where most objects are", "closest": "the colour of another object",
             "farthest": "the shape of another object",
             # the graded and layout sets: the object count alone. With n objects in distinct cells of the 4 x 4
             # grid, the 2 x 2 cells in the middle are all empty with probability C(12, n) / C(16, n): 0.55 for two
             # objects, 0.39 for three, so the likelier answer is "no" below three objects and "yes" from three on
             "centre": "yes from three objects on (the likelier answer given the object count alone)"}


def shortcut_answers(scene: list[dict], qtype: str, named: str) -> list[str]:
    """The shortcut's answers to one question (several on a tie, one of which it picks at random): for "shape",
    left/right and top/bottom the most common shape or side among all of the scene's objects; for "closest" (a
    colour) and "farthest" (a shape) that attribute of each object other than the one named; for "centre" the
    likelier answer given the number of objects alone (both on an even chance)."""
    if qtype == "centre":
        cells, middle = synthetic.GRID ** 2, len(synthetic.MIDDLE) ** 2
        # the placements of len(scene) objects that leave the middle empty, against all of them, times two
        empty, total = 2 * math.comb(cells - middle, len(scene)), math.comb(cells, len(scene))
        return ["no", "yes"] if empty == total else ["no"] if empty > total else ["yes"]
    if qtype in ("closest", "farthest"):
        return [o["color" if qtype == "closest" else "shape"] for o in scene if o["color"] != named]
    half = IMAGE_SIZE / 2  # the halves of synthetic.ask
    values = [o["shape"] if qtype == "shape" else
              ("left" if o["x"] < half else "right") if qtype == "horizontal" else
              ("top" if o["y"] < half else "bottom") for o in scene]
    most = max(map(values.count, values))
    return sorted({v for v in values if values.count(v) == most})


def shortcuts(folder: Path, results: dict) -> dict | None:
    """Per SHORTCUTS type, on a seed's held-out questions: what the shortcut scores ("shortcut": the share of its
    answers that are right, averaged over questions), and for each stage its accuracy and how often its answer is
    one of the shortcut's ("follows"). A stage that follows the shortcut on every question while scoring what it
    scores has not found what the question asks about. None when an eval.json predates the stored answers."""
    if any("answers" not in r for r in results.values()):
        return None
    records = json.loads((folder / "data" / "eval" / "data.json").read_text())
    out = {}
    for qtype in SHORTCUTS:
        rows, guesses = [], []
        for i, r in enumerate(records):
            if r["type"] == qtype:
                question = r["conversations"][0]["value"]
                named = None if qtype == "centre" else re.search(r"the (\w+) object", question).group(1)
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
    from nanovoco.evaluate import vqa_accuracy  # the model's modules, only for this (the stages run in subprocesses)

    vlm, dataset = load_stage(stage, data)
    for path, lay in missing.items():
        text = json.dumps(vqa_accuracy(vlm, lay(dataset), compressed=compressed(stage)))
        files.atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def load_stage(stage: Path, data: Path):
    """A training stage's model (in eval mode) and the held-out set of data (a generated set's eval folder, or its
    data.json) laid out as the stage was trained: its tokenizer, its K and its system prompt."""
    from nanovoco.data import LlavaDataset
    from nanovoco.model import VoCoLlama
    from nanovoco.tokenizer import load_tokenizer, trained_system_prompt

    model = stage / "checkpoint" / "model"
    vlm = VoCoLlama.from_pretrained(model, vision_path=model / "vision_tower").eval()
    data = data if data.suffix == ".json" else data / "data.json"
    dataset = LlavaDataset(data, data.parent, load_tokenizer(model), vlm.config, num_voco=vlm.config.num_voco,
                           max_len=vlm.config.text.max_position_embeddings, system=trained_system_prompt(model))
    return vlm, dataset


def compressed(stage: Path) -> bool:
    """Whether a stage's model reads its questions under the VoCo mask (train.py's voco and lower_bound modes), as
    it is evaluated, or with plain causal attention (full, avgpool, qformer)."""
    mode = json.loads((stage / "checkpoint" / "state.json").read_text())["config"]["mode"]
    return mode in ("voco", "lower_bound")


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
    size = IMAGE_SIZE
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


def seed_summary(folder: Path, results: dict, stages=()) -> dict:
    """Every stage's accuracy, retention (each with its standard error) and KL from the upper bound for one seed's
    folder, from its evaluations (load_results); by content (objects per image), the per-image oracle of K, and the
    training curves of its stages (the names of its training stages' folders)."""
    upper, lower = results["full"], results["lower_bound_k1"]
    summary = {}
    for name, r in results.items():
        summary[name] = {"overall": r["overall"], "se": accuracy_se(r["overall"], r["n"]), "n": r["n"],
                         "by_type": r["by_type"], "retention": retention(r["overall"], lower["overall"],
                                                                         upper["overall"]),
                         "retention_se": retention_se(r["correct"], lower["correct"], upper["correct"]),
                         **kl_summary(r)}
    summary["full"].update(kl=0.0, kl_se=0.0)  # the teacher, from which every KL is measured
    records = json.loads((folder / "data" / "eval" / "data.json").read_text())[:upper["n"]]
    summary["content"] = content_summary(records, results)
    summary["oracle"] = {family: oracle(records, results, family) for family in ("voco_k", "voco_any_k")
                         if len(ks_of(results, family)) > 1}
    summary["curves"] = curves(folder, stages)
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


def kl_summary(result: dict) -> dict:
    """An evaluation's KL from the upper bound (train.py --teacher) and its standard error over the questions; None
    for a stage that was not measured."""
    if "kl" not in result:
        return {"kl": None, "kl_se": None}
    per_question = result["kl"]["per_question"]
    return {"kl": result["kl"]["overall"], "kl_se": statistics.stdev(per_question) / len(per_question) ** 0.5
            if len(per_question) > 1 else 0.0, "kl_by_type": result["kl"]["by_type"]}


# The content measure: objects per image. CROWDED splits the graded set's images (1 to 8 objects) into the sparse
# half and the crowded half, the images that may need more than one VoCo token.
CROWDED = 5


def content_summary(records: list[dict], results: dict) -> dict | None:
    """Each stage's accuracy (and KL from the upper bound) by objects per image, and its retention on the sparse
    (< CROWDED objects) and crowded images, with paired-bootstrap standard errors; None when every image holds as
    many objects."""
    counts = [len(r["scene"]) for r in records]
    if len(set(counts)) == 1:
        return None
    by_count = {n: [i for i, c in enumerate(counts) if c == n] for n in sorted(set(counts))}
    split = {"sparse": [i for i, c in enumerate(counts) if c < CROWDED],
             "crowded": [i for i, c in enumerate(counts) if c >= CROWDED]}
    upper, lower = results["full"]["correct"], results["lower_bound_k1"]["correct"]
    out = {"n_by_count": {n: len(rows) for n, rows in by_count.items()}, "crowded": CROWDED,
           "n_split": {part: len(rows) for part, rows in split.items()}, "stages": {}}
    for name, r in results.items():
        pick = lambda xs, rows: [xs[i] for i in rows]  # noqa: E731
        kl = r["kl"]["per_question"] if "kl" in r else None
        out["stages"][name] = {
            "by_count": {n: statistics.mean(pick(r["correct"], rows)) for n, rows in by_count.items()},
            "kl_by_count": {n: statistics.mean(pick(kl, rows)) for n, rows in by_count.items()} if kl else None,
            **{part: {"accuracy": statistics.mean(pick(r["correct"], rows)),
                      "retention": retention(*(statistics.mean(pick(x, rows)) for x in (r["correct"], lower, upper))),
                      "retention_se": retention_se(*(pick(x, rows) for x in (r["correct"], lower, upper)))}
               for part, rows in split.items() if rows}}
    return out


def ks_of(results: dict, family: str) -> list[int]:
    """The K at which a family of evaluations ("voco_k": the per-K models, "voco_any_k": the any-K model) ran."""
    return sorted(int(m.group(1)) for m in map(re.compile(re.escape(family) + r"(\d+)").fullmatch, results) if m)


def oracle(records: list[dict], results: dict, family: str) -> dict:
    """The per-image oracle of K: for each held-out image, the fewest tokens k whose answers to all of its questions
    are the largest K's answers (so it scores what the largest K scores). Returns the mean k, the histogram, and the
    mean k by objects per image."""
    ks = ks_of(results, family)
    images = {}
    for i, r in enumerate(records):
        images.setdefault(r["image"] if isinstance(r["image"], str) else tuple(r["image"]), []).append(i)
    answers = {k: results[f"{family}{k}"]["answers"] for k in ks}
    chosen, by_count = [], {}
    for rows in images.values():
        k = next(k for k in ks if all(answers[k][i] == answers[ks[-1]][i] for i in rows))
        chosen.append(k)
        by_count.setdefault(len(records[rows[0]]["scene"]), []).append(k)
    return {"ks": ks, "images": len(chosen), "mean_k": statistics.mean(chosen),
            "histogram": {k: chosen.count(k) for k in ks},
            "mean_k_by_count": {n: statistics.mean(v) for n, v in sorted(by_count.items())}}


def curves(folder: Path, stages) -> dict:
    """Each training stage's curves from its log.jsonl: the loss at every step, and the KL from the upper bound on
    the fixed held-out subset as [updates done, KL] pairs (train.py --kl_every; empty for a stage without it)."""
    out = {}
    for name in stages:
        log = folder / name / "log.jsonl"
        if log.exists():
            lines = [json.loads(line) for line in log.read_text().splitlines()]
            out[name] = {"loss": [r["loss"] for r in lines if "loss" in r],
                         "kl": [[r["step"] + 1, r["kl"]] for r in lines if "kl" in r]}
    return out
