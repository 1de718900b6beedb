"""The paper's benchmarks: answer LLaVA-1.5's evaluation question files with two-stage inference, score them offline.

    python -m nanovoco.paper_eval answer --model DIR --questions llava_gqa_testdev_balanced.jsonl \
        --image_folder gqa/images --answers answers/gqa.jsonl
    python -m nanovoco.paper_eval score gqa --answers answers/gqa.jsonl --annotations testdev_balanced_questions.json
    python -m nanovoco.paper_eval score pope --answers A --questions llava_pope_test.jsonl --annotations pope/coco
    python -m nanovoco.paper_eval score mme --answers A --questions llava_mme.jsonl \
        --annotations MME_Benchmark_release_version
    python -m nanovoco.paper_eval score sqa --answers A --annotations scienceqa     # problems.json, pid_splits.json
    python -m nanovoco.paper_eval score seed --answers A --annotations SEED-Bench.json

`answer` reads LLaVA-1.5's question files as its eval scripts do (playground/data/eval in the LLaVA repository):
JSONL records {question_id, image, text, category?} for GQA, POPE, MME and SEED-Bench, and ScienceQA's JSON list of
{id, image?, conversations} (llava_test_CQM-A.json, asked with LLaVA's single-prediction prompt). Each image is
compressed once into its VoCo cache and all its questions are answered from it in one batch (a model without VoCo
tokens reads the image in the prompt); greedy decoding. It writes LLaVA's answer file, one JSON line per question
{question_id, prompt, text, answer_id, model_id, metadata}, in question order, and resumes an interrupted run
(the questions already answered are kept).

`score` reproduces what LLaVA's scripts compute from that file: GQA's accuracy after scripts/convert_gqa_for_eval.py
(answers lower-cased, a final "." removed, exact match with testdev_balanced_questions.json's answer); POPE's
accuracy, precision, recall, F1 and yes-ratio per category (llava/eval/eval_pope.py: the first sentence, "no"/"not"
/"No" among its words is a no; pairs by question_id, where LLaVA pairs by order); MME's score per category, accuracy +
accuracy+ (both questions of an image right) x 100, with MME's yes/no parsing, and the perception and cognition
totals; ScienceQA's accuracy and IMG accuracy (llava/eval/eval_science_qa.py's answer parsing); SEED-Bench's
accuracy per question type and over images (scripts/convert_seed_for_submission.py: exact match with the letter).
"""
import argparse
import json
import re
import sys
import uuid
from pathlib import Path

import torch
from tqdm import tqdm

from nanovoco.data import build_sample, compress_prefix, pad_samples
from nanovoco.files import read_json
from nanovoco.generate import generate, generate_from_cache
from nanovoco.image import load_image, preprocess
from nanovoco.model import VoCoLlama
from nanovoco.tokenizer import VOCO_SYSTEM, Tokenizer, trained_system_prompt

SQA_PROMPT = "Answer with the option's letter from the given choices directly."  # LLaVA's --single-pred-prompt
MME_PERCEPTION = ("existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark", "artwork",
                  "OCR")
MME_COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")


# ----------------------------------------------------------------------------------------------------------------
# Questions and answers

def read_questions(path) -> list[dict]:
    """LLaVA's question file as [{question_id, image (or None), text}]: a JSONL file of such records, or ScienceQA's
    JSON list of conversations, whose first turn is the question (the "<image>" tag removed, LLaVA's single-prediction
    prompt appended, as model_vqa_science.py asks it)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: pass one of LLaVA-1.5's evaluation question files")
    if path.suffix == ".json":
        records = read_json(path, "the ScienceQA question file")
        if not isinstance(records, list):
            raise ValueError(f"{path}: expected a JSON list of ScienceQA records (llava_test_CQM-A.json)")
        questions = []
        for i, r in enumerate(records):
            try:
                text = r["conversations"][0]["value"].replace("<image>", "").strip()
                questions.append({"question_id": r["id"], "image": r.get("image"), "text": text + "\n" + SQA_PROMPT})
            except (KeyError, IndexError, TypeError, AttributeError):
                raise ValueError(f"{path}: record {i} is not a ScienceQA record with 'id' and 'conversations'") \
                    from None
        return questions
    questions = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            q = json.loads(line)
            questions.append({"question_id": q["question_id"], "image": q.get("image"), "text": q["text"],
                              "category": q.get("category")})
        except (json.JSONDecodeError, KeyError, TypeError):
            raise ValueError(f"{path}: line {n} is not a question record {{question_id, image, text}}") from None
    return questions


def read_answers(path) -> dict:
    """question_id -> answer record of a LLaVA answer file; a line cut off by an interruption is skipped."""
    answers = {}
    for line in Path(path).read_text(encoding="utf-8").splitlines() if Path(path).exists() else []:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        answers[record["question_id"]] = record
    return answers


@torch.no_grad()
def answer(vlm: VoCoLlama, tokenizer: Tokenizer, questions: list[dict], image_folder, answers_path, *,
           system=VOCO_SYSTEM, max_new_tokens=16, model_id="nanovoco", progress=True) -> Path:
    """Answer `questions` (read_questions) into LLaVA's answer file at answers_path, resuming it."""
    answers_path, image_folder = Path(answers_path), Path(image_folder)
    done = read_answers(answers_path)
    by_image = {}
    for q in questions:
        if q["question_id"] not in done:
            by_image.setdefault(q["image"], []).append(q)
    answers_path.parent.mkdir(parents=True, exist_ok=True)
    with open(answers_path, "a", encoding="utf-8") as out:
        for image, group in tqdm(by_image.items(), desc="images", disable=not progress):
            texts = answer_group(vlm, tokenizer, image_folder / image if image else None, group, system,
                                 max_new_tokens)
            for q, text in zip(group, texts):
                done[q["question_id"]] = {"question_id": q["question_id"], "prompt": q["text"], "text": text,
                                          "answer_id": uuid.uuid4().hex, "model_id": model_id, "metadata": {}}
                out.write(json.dumps(done[q["question_id"]]) + "\n")
            out.flush()
    # in question order, as LLaVA writes it (a resumed run appended in another order)
    text = "".join(json.dumps(done[q["question_id"]]) + "\n" for q in questions)
    answers_path.write_text(text, encoding="utf-8")
    return answers_path


def answer_group(vlm, tokenizer, image_path, group, system, max_new_tokens) -> list[str]:
    """The greedy answers to the questions of one image (or of none): the image compressed once into its VoCo cache,
    the questions batched over it; without VoCo tokens, the image in every prompt."""
    c, device = vlm.config, next(vlm.parameters()).device
    frames = 1 if image_path else 0
    voco = c.num_voco if frames else 0
    samples = [build_sample(tokenizer, [(q["text"], None)], image_token_id=c.image_token_id,
                            num_image_tokens=c.num_image_tokens, voco_token_id=c.voco_token_id, num_voco=voco,
                            num_frames=frames, max_len=sys.maxsize, system=system) for q in group]
    pixels = preprocess(load_image(image_path), c.vision.image_size)[None].to(device) if frames else None
    if voco:  # stage 1 once, stage 2 for every question: the text after the VoCo tokens, left-padded
        prefix = torch.tensor(compress_prefix(tokenizer, c.image_token_id, c.num_image_tokens, c.voco_token_id,
                                              c.num_voco), device=device)
        cache = vlm.compress(pixels.to(next(vlm.parameters()).dtype), prefix)
        T = max(len(s.text_ids()) for s in samples)
        text = torch.tensor([[0] * (T - len(s.text_ids())) + s.text_ids() for s in samples], device=device)
        real = torch.tensor([[False] * (T - len(s.text_ids())) + [True] * len(s.text_ids()) for s in samples],
                            device=device)
        ids = generate_from_cache(vlm, cache, text, real, max_new_tokens=max_new_tokens, eos_id=tokenizer.eos_id)
    else:
        b = {k: v.to(device) for k, v in pad_samples(samples, left=True).items()}
        images = pixels.expand(len(samples), -1, -1, -1) if frames else None
        embeds = vlm.embed(b["input_ids"], None if images is None else images.to(next(vlm.parameters()).dtype))
        ids = generate(vlm.llm, inputs_embeds=embeds, segments=b["segments"], groups=b["groups"],
                       position_ids=b["positions"], max_new_tokens=max_new_tokens, eos_id=tokenizer.eos_id)
    return [tokenizer.decode(x).strip() for x in ids]


# ----------------------------------------------------------------------------------------------------------------
# Scores, as LLaVA's evaluation scripts compute them

def score_gqa(answers: dict, annotations: dict) -> dict:
    """annotations: GQA's testdev_balanced_questions.json, {question_id: {"answer": ...}}."""
    correct = [answers[qid]["text"].rstrip(".").lower() == gt["answer"] for qid, gt in annotations.items()
               if qid in answers]
    return {"accuracy": sum(correct) / len(correct), "n": len(correct), "missing": len(annotations) - len(correct)}


def pope_yes(text: str) -> bool:
    """eval_pope.py: the first sentence; commas out; "No", "not" or "no" among its words is a no, anything else yes."""
    words = text.split(".")[0].replace(",", "").split(" ")
    return not ("No" in words or "not" in words or "no" in words)


def score_pope(answers: dict, questions: list[dict], labels: dict) -> dict:
    """labels: category -> {question_id: "yes"/"no"} (the coco_pope_<category>.json files). Per category: accuracy,
    precision, recall, F1 (yes as the positive class) and the ratio of yes answers."""
    out = {}
    for category, truth in sorted(labels.items()):
        pairs = [(pope_yes(answers[q["question_id"]]["text"]), truth[q["question_id"]] == "yes") for q in questions
                 if q.get("category") == category and q["question_id"] in answers and q["question_id"] in truth]
        tp = sum(p and t for p, t in pairs)
        fp = sum(p and not t for p, t in pairs)
        tn = sum(not p and not t for p, t in pairs)
        fn = sum(not p and t for p, t in pairs)
        precision, recall = tp / max(1, tp + fp), tp / max(1, tp + fn)
        out[category] = {"accuracy": (tp + tn) / len(pairs), "precision": precision, "recall": recall,
                         "f1": 2 * precision * recall / max(1e-12, precision + recall),
                         "yes_ratio": sum(p for p, _ in pairs) / len(pairs), "n": len(pairs)}
    return out


def mme_label(text: str) -> str:
    """MME's calculation.py: "yes"/"no" as answered, else from the first four characters, else "other"."""
    text = text.lower()
    if text in ("yes", "no"):
        return text
    return "yes" if "yes" in text[:4] else "no" if "no" in text[:4] else "other"


def score_mme(answers: dict, questions: list[dict], truth: dict) -> dict:
    """truth: question_id -> "Yes"/"No" (read_mme_truth). Per category: accuracy and accuracy+ (every question of an
    image right), score = 100 * (accuracy + accuracy+); then the perception and cognition totals."""
    per_category = {}
    for q in questions:
        if q["question_id"] in answers and q["question_id"] in truth:
            right = mme_label(answers[q["question_id"]]["text"]) == truth[q["question_id"]].lower()
            per_category.setdefault(q["category"], {}).setdefault(q["image"], []).append(right)
    out = {}
    for category, images in sorted(per_category.items()):
        results = [r for rs in images.values() for r in rs]
        acc, acc_plus = sum(results) / len(results), sum(all(rs) for rs in images.values()) / len(images)
        out[category] = {"accuracy": acc, "accuracy_plus": acc_plus, "score": 100 * (acc + acc_plus),
                         "n": len(results)}
    out["perception"] = sum(out[c]["score"] for c in MME_PERCEPTION if c in out)
    out["cognition"] = sum(out[c]["score"] for c in MME_COGNITION if c in out)
    return out


def read_mme_truth(folder, questions: list[dict]) -> dict:
    """question_id -> answer, from the MME release folder: per image a .txt of "question<TAB>answer" lines, beside
    the image or in its category's questions_answers_YN/."""
    truth = {}
    for q in questions:
        image = Path(q["image"])
        stem = image.stem
        for candidate in (Path(folder) / image.parent / "questions_answers_YN" / f"{stem}.txt",
                          Path(folder) / image.parent.parent / "questions_answers_YN" / f"{stem}.txt",
                          Path(folder) / image.with_suffix(".txt")):
            if candidate.is_file():
                for line in candidate.read_text(encoding="utf-8").splitlines():
                    question, _, gt = line.partition("\t")
                    if question.strip() == q["text"].strip():
                        truth[q["question_id"]] = gt.strip()
                break
    return truth


def sqa_letter(text: str, n_choices: int) -> str:
    """eval_science_qa.py: the letter itself, "X. ...", or "The answer is X."; else FAILED."""
    options = "ABCDE"
    if text in options:
        letter = text
    elif len(text) >= 3 and text[0] in options and text[1:3] == ". ":
        letter = text[0]
    else:
        found = re.findall(r"The answer is ([A-Z]).", text)
        letter = found[0] if len(found) == 1 else "FAILED"
    return letter if letter in options[:n_choices] else "FAILED"


def score_sqa(answers: dict, problems: dict, split: list) -> dict:
    """problems: ScienceQA's problems.json; split: pid_splits.json's list for the split. Accuracy over the split and
    over its questions with an image (LLaVA's IMG accuracy, the paper's SQA-IMG)."""
    rows = []
    for pid in split:
        prob = problems[pid]
        text = answers[pid]["text"] if pid in answers else "FAILED"
        rows.append(("ABCDE".find(sqa_letter(text, len(prob["choices"]))) == prob["answer"],
                     bool(prob.get("image"))))
    img = [r for r, has_image in rows if has_image]
    return {"accuracy": sum(r for r, _ in rows) / len(rows), "img_accuracy": sum(img) / max(1, len(img)),
            "n": len(rows), "n_img": len(img)}


def score_seed(answers: dict, annotations: dict) -> dict:
    """annotations: SEED-Bench.json ({"questions": [...], "question_type": {name: id}}). Exact match of the answer
    text with the option letter, per question type, overall, and over the image questions."""
    names = {i: n for n, i in annotations["question_type"].items()}
    per_type, image = {}, []
    for q in annotations["questions"]:
        row = answers.get(q["question_id"], answers.get(str(q["question_id"])))
        right = row is not None and row["text"] == q["answer"]
        per_type.setdefault(names[q["question_type_id"]], []).append(right)
        if q.get("data_type", "image") == "image":
            image.append(right)
    total = [r for rs in per_type.values() for r in rs]
    return {"accuracy": sum(total) / len(total), "image_accuracy": sum(image) / max(1, len(image)),
            "by_type": {k: sum(v) / len(v) for k, v in sorted(per_type.items())}, "n": len(total)}


# ----------------------------------------------------------------------------------------------------------------
# Command line

def score(benchmark: str, answers_path, annotations, questions_path=None) -> dict:
    answers = read_answers(answers_path)
    if not answers:
        raise ValueError(f"{answers_path} holds no answers: run `python -m nanovoco.paper_eval answer` first")
    annotations = Path(annotations)
    if benchmark == "gqa":
        return score_gqa(answers, read_json(annotations, "GQA's testdev_balanced_questions.json"))
    if benchmark == "seed":
        return score_seed(answers, read_json(annotations, "SEED-Bench.json"))
    if benchmark == "sqa":
        problems = read_json(annotations / "problems.json", "ScienceQA's problems.json")
        split = read_json(annotations / "pid_splits.json", "ScienceQA's pid_splits.json")["test"]
        return score_sqa(answers, problems, split)
    if questions_path is None:
        raise ValueError(f"{benchmark} needs --questions (its categories are in the question file)")
    questions = read_questions(questions_path)
    if benchmark == "pope":
        files = sorted(annotations.glob("coco_pope_*.json"))
        if not files:
            raise FileNotFoundError(f"{annotations} holds no coco_pope_<category>.json files")
        labels = {f.stem.removeprefix("coco_pope_"): {json.loads(x)["question_id"]: json.loads(x)["label"]
                                                      for x in f.read_text().splitlines() if x.strip()} for f in files}
        return score_pope(answers, questions, labels)
    return score_mme(answers, questions, read_mme_truth(annotations, questions))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    a = sub.add_parser("answer", help="answer a question file into LLaVA's answer format")
    a.add_argument("--model", required=True)
    a.add_argument("--vision", help="CLIP directory, for a checkpoint that lacks its vision tower")
    a.add_argument("--questions", required=True)
    a.add_argument("--image_folder", required=True)
    a.add_argument("--answers", required=True)
    a.add_argument("--max_new_tokens", type=int, default=16)
    a.add_argument("--limit", type=int, default=0, help="only the first N questions (0: all)")
    a.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    s = sub.add_parser("score", help="score an answer file as LLaVA's scripts do")
    s.add_argument("benchmark", choices=("gqa", "pope", "mme", "sqa", "seed"))
    s.add_argument("--answers", required=True)
    s.add_argument("--annotations", required=True, help="the benchmark's ground truth (see the module docstring)")
    s.add_argument("--questions", help="the question file (POPE and MME: their categories)")
    args = p.parse_args(argv)
    try:
        if args.command == "score":
            print(json.dumps(score(args.benchmark, args.answers, args.annotations, args.questions), indent=2))
            return 0
        questions = read_questions(args.questions)[:args.limit or None]
        device = torch.device(args.device)
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        vlm = VoCoLlama.from_pretrained(args.model, vision_path=args.vision, dtype=dtype, device=device).eval()
        tokenizer = Tokenizer(Path(args.model) / "tokenizer.model")
        system = trained_system_prompt(args.model)
        missing = [q["image"] for q in questions if q["image"] and not (Path(args.image_folder) / q["image"]).is_file()]
        if missing:
            raise FileNotFoundError(f"{len(missing)} image(s) missing under {args.image_folder}, e.g. {missing[0]}")
        path = answer(vlm, tokenizer, questions, args.image_folder, args.answers, system=system,
                      max_new_tokens=args.max_new_tokens)
        print(f"wrote {path} ({len(questions)} answers)")
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyError as e:
        print(f"error: a record lacks the field {e}: pass the benchmark's own question, answer and annotation files",
              file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
