"""nanovoco.repro.paper_eval: LLaVA-1.5's question and answer files, two-stage answers equal to one masked pass, and
scores equal to those of LLaVA-1.5's evaluation scripts and the benchmarks' own tools. Fixtures are small excerpts in
the real releases' layouts (id schemes, prompt suffixes, shared ids); each scorer is checked against a literal
re-statement of the official script's rule, on answers that include malformed, empty, missing and multi-sentence
ones."""
import io
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from nanovoco.repro import paper_eval, paper_scores
from nanovoco.config import preset
from nanovoco.data import build_sample, pad_samples
from nanovoco.generate import generate
from nanovoco.image import preprocess
from nanovoco.model import VoCoLlama
from nanovoco.tokenizer import Tokenizer, train_tiny_tokenizer
from nanovoco.voco import Layout

ROOT = Path(__file__).resolve().parents[1]
SHORT = "\nAnswer the question using a single word or phrase."  # LLaVA's suffix of GQA, POPE and MME questions
# answers a model may give: right, wrong, empty, malformed, several sentences, a letter list
TRICKY = ["Yes", "No", "", "yes.", "No, there is not.", "Yes. No, not really.", "not sure", "Nope", "NO", "Yes,no",
          "There is no dog.", "I do not know", "A", "AB", "B. because", "The answer is C.", "The answer is C. The "
          "answer is D.", "E", "a", " A", "The answer is B", "Church"]


def lines(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def answer_rows(pairs):
    """LLaVA's answer records for (question_id, prompt, text) triples, in that order."""
    return [{"question_id": q, "prompt": p, "text": t, "answer_id": "x", "model_id": "llava-v1.5-13b", "metadata": {}}
            for q, p, t in pairs]


def run_cli(args, capsys):
    code = paper_eval.main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


# ----------------------------------------------------------------------------------------------------------------
# GQA: scripts/convert_gqa_for_eval.py, then GQA's eval.py

def official_gqa(answer_file_rows, questions):
    predictions = [{"questionId": r["question_id"], "prediction": r["text"].rstrip(".").lower()}
                   for r in answer_file_rows]
    predictions = {p["questionId"]: p["prediction"] for p in predictions}
    scores = [float(predictions[qid] == q["answer"]) for qid, q in questions.items() if q["isBalanced"]]
    return float(sum(scores)) / len(scores) * 100


def gqa_questions(answers):
    return {qid: {"imageId": "n161313", "question": "Is it overcast?", "answer": a, "isBalanced": True,
                  "types": {"structural": "verify", "semantic": "attr", "detailed": "weatherVerify"}}
            for qid, a in answers.items()}


def test_gqa_accuracy_as_llava_converts_and_gqa_scores():
    questions = gqa_questions({"201307251": "no", "201640614": "woman", "202225914": "no", "2062325": "yes"})
    rows = answer_rows([("201307251", "Is it overcast?" + SHORT, "No."), ("201640614", "Who?" + SHORT, "Woman"),
                        ("202225914", "Clean?" + SHORT, "Yes"), ("2062325", "Wetsuit?" + SHORT, "no"),
                        ("2062325", "Wetsuit?" + SHORT, "Yes...")])  # a question answered twice: the last counts
    got = paper_scores.score_gqa(rows, questions)
    assert got == {"accuracy": official_gqa(rows, questions), "n": 4, "missing": 0} and got["accuracy"] == 75.0
    # eval.py refuses a file with a balanced question unanswered; nanovoco scores the answered ones and says so
    partial = paper_scores.score_gqa(rows[:2], questions)
    assert partial["accuracy"] == 100.0 and partial["missing"] == 2 and "eval.py refuses" in partial["note"]


# ----------------------------------------------------------------------------------------------------------------
# POPE: llava/eval/eval_pope.py

def official_pope(answer_file_rows, question_rows, label_files: dict):
    questions = {q["question_id"]: q for q in question_rows}
    out = {}
    for name, label_text in label_files.items():
        category = name[10:-5]
        answers = [dict(a) for a in answer_file_rows if questions[a["question_id"]]["category"] == category]
        label_list = [json.loads(q)["label"] for q in io.StringIO(label_text)]
        for a in answers:
            text = a["text"]
            if text.find(".") != -1:
                text = text.split(".")[0]
            words = text.replace(",", "").split(" ")
            a["text"] = "no" if ("No" in words or "not" in words or "no" in words) else "yes"
        label_list = [0 if x == "no" else 1 for x in label_list]
        pred_list = [0 if a["text"] == "no" else 1 for a in answers]
        TP = TN = FP = FN = 0
        for pred, label in zip(pred_list, label_list):
            TP += pred == 1 and label == 1
            FP += pred == 1 and label == 0
            TN += pred == 0 and label == 0
            FN += pred == 0 and label == 1
        precision = float(TP) / float(TP + FP)
        recall = float(TP) / float(TP + FN)
        out[category] = {"accuracy": (TP + TN) / (TP + TN + FP + FN), "precision": precision, "recall": recall,
                         "f1": 2 * precision * recall / (precision + recall),
                         "yes_ratio": pred_list.count(1) / len(pred_list)}
    return out


def pope_fixture(tmp_path, n=(7, 6, 8)):
    """llava_pope_test.jsonl's id scheme (adversarial 1.., random 10000001.., popular 20000001..) and POPE's label
    files, each numbered from 1, in the same order."""
    questions, labels = [], {}
    (tmp_path / "coco").mkdir()
    for (category, base), count in zip((("adversarial", 0), ("random", 10000000), ("popular", 20000000)), n):
        labels[category] = ["yes" if (i * 7 + base // 10000000) % 3 else "no" for i in range(1, count + 1)]
        lines(tmp_path / "coco" / f"coco_pope_{category}.json",
              [{"question_id": i, "image": "COCO_val2014_000000310196.jpg", "text": f"Is there a thing {i} in the "
                "image?", "label": label} for i, label in enumerate(labels[category], 1)])
        questions += [{"question_id": base + i, "image": "COCO_val2014_000000310196.jpg",
                       "text": f"Is there a thing {i} in the image?" + SHORT, "category": category}
                      for i in range(1, count + 1)]
    lines(tmp_path / "llava_pope_test.jsonl", questions)
    return questions


def test_pope_pairs_answers_with_labels_by_order_as_eval_pope_does(tmp_path):
    questions = pope_fixture(tmp_path)
    rows = answer_rows([(q["question_id"], q["text"], TRICKY[i % 12]) for i, q in enumerate(questions)])
    label_files = {p.name: p.read_text() for p in (tmp_path / "coco").iterdir()}
    got = paper_scores.score_pope(rows, paper_eval.read_questions(tmp_path / "llava_pope_test.jsonl"),
                                paper_scores.read_pope_labels(tmp_path / "coco"))
    want = official_pope(rows, questions, label_files)
    assert {c: {k: got[c][k] for k in want[c]} for c in got} == want
    assert [got[c]["n"] for c in ("adversarial", "random", "popular")] == [7, 6, 8]
    # a partial run: the answers of a category are paired with its first labels, as eval_pope.py's zip pairs them
    partial = rows[:3] + rows[7:9]
    got = paper_scores.score_pope(partial, questions, paper_scores.read_pope_labels(tmp_path / "coco"))
    want = official_pope(partial, questions, {k: v for k, v in label_files.items() if "popular" not in k})
    assert {c: {k: got[c][k] for k in want[c]} for c in want} == want
    assert got["popular"]["n"] == 0 and got["popular"]["accuracy"] is None  # eval_pope.py divides by zero there


def test_pope_first_sentence_and_division_by_zero():
    assert paper_scores.pope_yes("Yes. There is no cat.") and not paper_scores.pope_yes("No, there is a cat.")
    assert paper_scores.pope_yes("Nope") and paper_scores.pope_yes("") and not paper_scores.pope_yes("I do not see one")
    # all answers "no": eval_pope.py stops at precision = 0 / 0; nanovoco reports null there, the rest as computed
    got = paper_scores.pope_metrics([False, False], ["yes", "no"])
    assert (got["precision"], got["f1"], got["recall"], got["accuracy"], got["yes_ratio"]) == (None, None, 0.0, 0.5,
                                                                                              0.0)
    assert paper_scores.pope_metrics([], ["yes"])["yes_ratio"] is None  # a category with no answers


# ----------------------------------------------------------------------------------------------------------------
# MME: LLaVA's convert_answer_to_mme.py, then MME's eval_tool/calculation.py

def official_mme(answer_file_rows, release: Path):
    gt = {}
    for category in release.iterdir():
        if not category.is_dir():
            continue
        qa = category / "questions_answers_YN" if (category / "images").exists() else category
        for file in qa.iterdir():
            if file.name.endswith(".txt"):
                for line in open(file):
                    question, answer = line.strip().split("\t")
                    gt[category.name, file.name, question] = answer
    results = {}
    for a in answer_file_rows:
        category = a["question_id"].split("/")[0]
        file = a["question_id"].split("/")[-1].split(".")[0] + ".txt"
        prompt = a["prompt"]
        if "Answer the question using a single word or phrase." in prompt:
            prompt = prompt.replace("Answer the question using a single word or phrase.", "").strip()
        if "Please answer yes or no." not in prompt:
            prompt = prompt + " Please answer yes or no."
            if (category, file, prompt) not in gt:
                prompt = prompt.replace(" Please answer yes or no.", "  Please answer yes or no.")
        results.setdefault(category, "")
        results[category] += "\t".join((file, prompt, gt[category, file, prompt], a["text"])) + "\n"
    scores = {}
    for group, tasks in (("perception", paper_scores.MME_PERCEPTION), ("cognition", paper_scores.MME_COGNITION)):
        total = 0
        for task in tasks:
            task_lines = io.StringIO(results[task], newline=None).readlines()
            gts, preds, plus = [], [], 0
            for i in range(0, len(task_lines), 2):
                assert len(task_lines[i:i + 2]) == 2
                correct = 0
                for item in task_lines[i:i + 2]:
                    _, _, gt_ans, pred_ans = item.split("\t")
                    gt_ans, pred_ans = gt_ans.lower(), pred_ans.lower()
                    if pred_ans not in ["yes", "no"]:
                        prefix = pred_ans[:4]
                        pred_ans = "yes" if "yes" in prefix else "no" if "no" in prefix else "other"
                    gts.append(gt_ans)
                    preds.append(pred_ans)
                    correct += gt_ans == pred_ans
                plus += correct == 2
            acc = sum(g == p for g, p in zip(gts, preds)) / len(gts)
            task_score = 0
            task_score += acc * 100
            task_score += plus / (len(task_lines) // 2) * 100
            scores[task] = task_score
            total += task_score
        scores[group] = total
    return scores


def mme_release(root: Path):
    """MME_Benchmark_release_version: a category with images/ keeps its .txt files in questions_answers_YN/, the
    others beside the images; each .txt is "question<TAB>Yes/No" lines, one of them with the two-space variant.
    Returns llava_mme.jsonl's records: the image path as question_id (shared by its two questions), LLaVA's suffix."""
    questions = []
    for t, task in enumerate(paper_scores.MME_PERCEPTION + paper_scores.MME_COGNITION):
        nested = task in ("posters", "celebrity", "scene", "landmark", "artwork")
        qa = root / task / ("questions_answers_YN" if nested else "")
        qa.mkdir(parents=True)
        if nested:
            (root / task / "images").mkdir()
        for i in range(2):
            image = f"{task}/images/tt{t}_{i}.jpg" if nested else f"{task}/{i:04d}.png"
            asked = [f"Is the {task} {i} red?", f"Is the {task} {i} blue?"]
            spaces = ["  " if task == "color" and i == 1 else " ", " "]
            qa.joinpath(f"{Path(image).stem}.txt").write_text(
                "".join(f"{q}{s}Please answer yes or no.\t{a}\n" for q, s, a in zip(asked, spaces, ["Yes", "No"])))
            questions += [{"question_id": image, "image": image, "text": q + SHORT, "category": task} for q in asked]
    return questions


def test_mme_scores_as_llava_converts_and_mme_calculates(tmp_path):
    questions = mme_release(tmp_path / "MME_Benchmark_release_version")
    yes_no = ["Yes", "No", "yes.", "No, there is not.", "Nope", "NO", "", "Yes,no", "There is no", "noyes", "Church"]
    rows = answer_rows([(q["question_id"], q["text"], yes_no[i * 5 % len(yes_no)]) for i, q in enumerate(questions)])
    release = tmp_path / "MME_Benchmark_release_version"
    got = paper_scores.score_mme(paper_scores.mme_result_files(rows, paper_scores.read_mme_truth(release)))
    want = official_mme(rows, release)
    assert {k: v["score"] if isinstance(v, dict) else v for k, v in got.items()} == want
    assert paper_scores.mme_label("yes, it is") == "yes" and paper_scores.mme_label("it is") == "other"


def test_mme_refuses_what_calculation_py_cannot_read(tmp_path):
    questions = mme_release(tmp_path / "MME_Benchmark_release_version")
    truth = paper_scores.read_mme_truth(tmp_path / "MME_Benchmark_release_version")
    for text in ("Yes\nthe cat is red", "Yes\tno"):  # a line break or a tab makes calculation.py stop
        rows = answer_rows([(q["question_id"], q["text"], text) for q in questions])
        with pytest.raises(ValueError, match="calculation.py stops there"):
            paper_scores.score_mme(paper_scores.mme_result_files(rows, truth))
    rows = answer_rows([(q["question_id"], q["text"], "Yes") for q in questions[1:]])  # one image half answered
    with pytest.raises(ValueError, match="not two per image"):
        paper_scores.score_mme(paper_scores.mme_result_files(rows, truth))
    rows = answer_rows([(q["question_id"], q["text"], "Yes") for q in questions if q["category"] != "OCR"])
    got = paper_scores.score_mme(paper_scores.mme_result_files(rows, truth))
    assert "OCR" not in got and "OCR" in got["note"]


# ----------------------------------------------------------------------------------------------------------------
# ScienceQA: llava/eval/eval_science_qa.py

def official_sqa(answer_file_rows, problems, split):
    options = ["A", "B", "C", "D", "E"]
    predictions = {pred["question_id"]: pred for pred in answer_file_rows}
    correct, incorrect = [], []
    for prob_id, prob in {idx: problems[idx] for idx in split}.items():
        pred = predictions.get(prob_id, {"text": "FAILED", "prompt": "Unknown"})
        pred_text = pred["text"]
        if pred_text in options:
            answer = pred_text
        elif len(pred_text) >= 3 and pred_text[0] in options and pred_text[1:3] == ". ":
            answer = pred_text[0]
        else:
            res = re.compile(r"The answer is ([A-Z]).").findall(pred_text)
            answer = res[0] if len(res) == 1 else "FAILED"
        pred_idx = options.index(answer) if answer in options[:len(prob["choices"])] else -1
        (correct if pred_idx == prob["answer"] else incorrect).append("<image>" in pred["prompt"])
    return {"accuracy": len(correct) / (len(correct) + len(incorrect)) * 100,
            "img_accuracy": sum(correct) / (sum(correct) + sum(incorrect)) * 100}


def test_scienceqa_as_eval_science_qa_parses_and_counts():
    problems = {str(i): {"choices": ["x"] * (2 + i % 3), "answer": i % 2, "image": "image.png" if i % 3 else None}
                for i in range(len(TRICKY) + 3)}
    split = list(problems)
    prompt = "Which is it?\nA. x\nB. y\nAnswer with the option's letter from the given choices directly."
    rows = answer_rows([(pid, ("<image>\n" if problems[pid]["image"] else "") + prompt, text)
                        for pid, text in zip(split, TRICKY)])  # the last three problems have no answer
    got = paper_scores.score_sqa(rows, problems, split)
    want = official_sqa(rows, problems, split)
    assert (got["accuracy"], got["img_accuracy"]) == (want["accuracy"], want["img_accuracy"])
    # a list of letters: "" and "AB" are no option (not "A"); an unanswered image problem is not in IMG accuracy
    assert paper_scores.sqa_letter("") == paper_scores.sqa_letter("AB") == "FAILED"
    assert paper_scores.sqa_letter("B. because") == "B" and paper_scores.sqa_letter("The answer is C.") == "C"
    assert got["n_img"] == sum(1 for pid, _ in zip(split, TRICKY) if problems[pid]["image"])


# ----------------------------------------------------------------------------------------------------------------
# SEED-Bench: scripts/convert_seed_for_submission.py

def official_seed(answer_file_rows, data, only=None):
    results = {row["question_id"]: row for row in answer_file_rows}
    counts, correct = {}, {}
    for q in data["questions"]:
        if only is not None and q["data_type"] != only:
            continue
        counts[q["question_type_id"]] = counts.get(q["question_type_id"], 0) + 1
        try:
            qid = int(q["question_id"])
        except ValueError:
            qid = q["question_id"]
        correct.setdefault(q["question_type_id"], 0)
        correct[q["question_type_id"]] += qid in results and results[qid]["text"] == q["answer"]
    names = {i: n for n, i in data["question_type"].items()}
    return ({names[t]: correct[t] / counts[t] * 100 for t in sorted(counts)},
            sum(correct.values()) / sum(counts.values()) * 100)


def test_seed_looks_string_ids_up_as_integers():
    data = {"question_type": {"Scene Understanding": 1, "Instance Counting": 3, "Action Recognition": 10},
            "questions": [{"question_id": str(101669 + i), "answer": "ABCD"[i % 4],
                           "question_type_id": (1, 3, 10)[i % 3], "data_type": "video" if i % 5 == 4 else "image"}
                          for i in range(12)]}
    # LLaVA's answer files carry integer ids; 101669 as a string is not found (convert_seed's int() lookup)
    rows = answer_rows([(101669 + i, "q", ["A", "B", "A", "D", "", "B.", " C", "D", "A", "B", "C", "D"][i])
                        for i in range(1, 12)] + [("101669", "q", "A")])
    got = paper_scores.score_seed(rows, data)
    by_type, total = official_seed(rows, data)
    assert got["by_type"] == by_type and got["accuracy"] == total
    assert got["image_accuracy"] == official_seed(rows, data, "image")[1]
    assert got["video_accuracy"] == official_seed(rows, data, "video")[1]


# ----------------------------------------------------------------------------------------------------------------
# Question files, answers, and the round trip to LLaVA's converters

@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("paper_eval")
    tok_path = train_tiny_tokenizer(["USER: Is there a red square? Answer the question using a single word or "
                                     "phrase. ASSISTANT: yes no red blue A B C"] * 40, root / "tokenizer.model")
    tok = Tokenizer(tok_path)
    torch.manual_seed(0)
    config = preset("tiny", tok.vocab_size)
    config.num_voco, config.voco_token_id = 2, tok.special_ids["<voco>"]
    VoCoLlama(config).save_pretrained(root / "model")
    (root / "model" / "tokenizer.model").write_bytes(Path(tok_path).read_bytes())
    (root / "model" / "prompt.json").write_text(json.dumps({"system": ""}))
    for i, colour in enumerate(["red", "blue"]):
        Image.new("RGB", (60, 40), colour).save(root / f"img{i}.png")
    return root


@pytest.fixture(scope="module")
def tiny(model_dir):
    return VoCoLlama.from_pretrained(model_dir / "model").eval(), Tokenizer(model_dir / "model" / "tokenizer.model")


def test_answers_equal_single_pass_masked_generation(model_dir, tiny, tmp_path):
    """Each image compressed once, its questions batched over the cache: the same texts as generating each question
    over the whole prompt under the VoCo mask; LLaVA's answer-file fields, in question order; a resumed run keeps the
    answers already written."""
    qs = lines(tmp_path / "q.jsonl", [
        {"question_id": "a", "image": "img0.png", "text": "Is there a red square?" + SHORT, "category": "random"},
        {"question_id": "b", "image": "img1.png", "text": "Is there a red square?"},
        {"question_id": "c", "image": "img0.png", "text": "What colour?"}])
    vlm, tok = tiny
    questions = paper_eval.read_questions(qs)
    out = paper_eval.answer(vlm, tok, questions, model_dir, tmp_path / "a.jsonl", system="", max_new_tokens=6,
                            progress=False)
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["question_id"] for r in rows] == ["a", "b", "c"]
    assert set(rows[0]) == {"question_id", "prompt", "text", "answer_id", "model_id", "metadata"}
    c = vlm.config
    for q, row in zip(questions, rows):
        s = build_sample(tok, [(q["text"], None)], Layout.of(c, 2), system="")
        b = pad_samples([s])
        pixels = preprocess(Image.open(model_dir / q["image"]), 56)[None]
        with torch.no_grad():
            ids = generate(vlm.llm, inputs_embeds=vlm.embed(b["input_ids"], pixels), segments=b["segments"],
                           groups=b["groups"], position_ids=b["positions"], max_new_tokens=6, eos_id=tok.eos_id)[0]
        assert row["text"] == tok.decode(ids).strip()
    # an interrupted run: the last answer lost, a half-written line left; the rerun answers only what is missing
    kept = out.read_text().splitlines()[:2]
    out.write_text("\n".join(kept) + '\n{"question_id": "c", "te')
    paper_eval.answer(vlm, tok, questions, model_dir, out, system="", max_new_tokens=6, progress=False)
    again = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["answer_id"] for r in again[:2]] == [r["answer_id"] for r in rows[:2]]
    assert [r["text"] for r in again] == [r["text"] for r in rows]


def test_a_question_without_an_image_is_asked_as_plain_text(tiny):
    """A ScienceQA question without an image: [BOS] + the conversation, no image prefix and no leading "\\n"."""
    vlm, tok = tiny
    question = {"question_id": "8", "image": None, "text": "Which word is a noun?", "prompt": "", "category": None}
    got = paper_eval.answer_group(vlm, tok, None, [question], system="", max_new_tokens=4)
    s = build_sample(tok, [(question["text"], None)], None, system="")
    assert s.input_ids[0] == tok.bos_id and tok.decode(s.input_ids[1:2]) != "\n"
    with torch.no_grad():
        ids = generate(vlm.llm, torch.tensor([s.input_ids]), max_new_tokens=4, eos_id=tok.eos_id)[0]
    assert got == [tok.decode(ids).strip()]


def test_mme_round_trip_two_questions_of_an_image_under_one_id(model_dir, tiny, tmp_path, capsys):
    """llava_mme.jsonl asks an image's two questions under one question_id: both are answered, each written once,
    in question order with its own prompt, which LLaVA's converter maps back to MME's question; then scored."""
    release = tmp_path / "MME_Benchmark_release_version"
    questions = mme_release(release)
    for q in questions:  # the images the question file names, under the release folder as LLaVA's --image-folder
        Image.open(model_dir / "img0.png").save(release / q["image"])
    lines(tmp_path / "llava_mme.jsonl", questions)
    vlm, tok = tiny
    out = paper_eval.answer(vlm, tok, paper_eval.read_questions(tmp_path / "llava_mme.jsonl"), release,
                            tmp_path / "mme.jsonl", system="", max_new_tokens=2, progress=False)
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert [(r["question_id"], r["prompt"]) for r in rows] == [(q["question_id"], q["text"]) for q in questions]
    code, printed, _ = run_cli(["score", "mme", "--answers", out, "--annotations", release], capsys)
    got = json.loads(printed)
    assert code == 0 and {k: v["score"] if isinstance(v, dict) else v for k, v in got.items()} \
        == official_mme(rows, release)


def test_scienceqa_question_file_and_round_trip(model_dir, tiny, tmp_path, capsys):
    """llava_test_CQM-A.json is asked as model_vqa_science.py asks it; the prompt written of an image question begins
    with "<image>\\n", which eval_science_qa.py counts for IMG accuracy."""
    path = tmp_path / "llava_test_CQM-A.json"
    path.write_text(json.dumps([{"id": "7", "image": "img0.png", "conversations": [
        {"from": "human", "value": "<image>\nContext: a map.\nWhich state is highlighted?\nA. Ohio\nB. Iowa"},
        {"from": "gpt", "value": "B"}]}, {"id": "8", "conversations": [
            {"from": "human", "value": "Which word is a noun?\nA. run\nB. dog"}, {"from": "gpt", "value": "B"}]}]))
    got = paper_eval.read_questions(path)
    asked = "Context: a map.\nWhich state is highlighted?\nA. Ohio\nB. Iowa\n" + paper_scores.SQA_PROMPT
    assert got[0] == {"question_id": "7", "image": "img0.png", "text": asked, "prompt": "<image>\n" + asked,
                      "category": None}
    assert got[1]["image"] is None and got[1]["prompt"] == got[1]["text"]
    vlm, tok = tiny
    out = paper_eval.answer(vlm, tok, got, model_dir, tmp_path / "sqa.jsonl", system="", max_new_tokens=2,
                            progress=False)
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    (tmp_path / "scienceqa").mkdir()
    problems = {"7": {"choices": ["Ohio", "Iowa"], "answer": 1, "image": "image.png"},
                "8": {"choices": ["run", "dog"], "answer": 1, "image": None}}
    (tmp_path / "scienceqa" / "problems.json").write_text(json.dumps(problems))
    (tmp_path / "scienceqa" / "pid_splits.json").write_text(json.dumps({"test": ["7", "8"], "val": []}))
    code, printed, _ = run_cli(["score", "sqa", "--answers", out, "--annotations", tmp_path / "scienceqa"], capsys)
    want = official_sqa(rows, problems, ["7", "8"])
    assert code == 0 and json.loads(printed) == {**want, "n": 2, "n_img": 1}


def test_seed_round_trip_keeps_integer_ids(model_dir, tiny, tmp_path, capsys):
    """llava-seed-bench.jsonl's integer ids stay integers in the answer file, which SEED's string ids find."""
    questions = lines(tmp_path / "llava-seed-bench.jsonl", [
        {"image": "img0.png", "text": "How many?\nA. One\nB. Two\nC. Three\nD. Four\n" + paper_scores.SQA_PROMPT,
         "category": "Instances Counting", "question_id": 101669}])
    vlm, tok = tiny
    out = paper_eval.answer(vlm, tok, paper_eval.read_questions(questions), model_dir, tmp_path / "seed.jsonl",
                            system="", max_new_tokens=2, progress=False)
    row = json.loads(out.read_text())
    assert row["question_id"] == 101669
    data = {"question_type": {"Instances Counting": 3}, "questions": [
        {"question_id": "101669", "answer": row["text"] or "A", "question_type_id": 3, "data_type": "image"}]}
    (tmp_path / "SEED-Bench.json").write_text(json.dumps(data))
    code, printed, _ = run_cli(["score", "seed", "--answers", out, "--annotations", tmp_path / "SEED-Bench.json"],
                               capsys)
    assert code == 0 and json.loads(printed)["image_accuracy"] == (100.0 if row["text"] else 0.0)


def test_command_line(model_dir, tmp_path):
    qs = lines(tmp_path / "q.jsonl", [{"question_id": 1, "image": "img0.png", "text": "Is there a red square?",
                                       "category": "adversarial"}])
    run = subprocess.run([sys.executable, "-m", "nanovoco.repro.paper_eval", "answer", "--model", model_dir / "model",
                          "--questions", qs, "--image_folder", model_dir, "--answers", tmp_path / "a.jsonl",
                          "--max_new_tokens", "3"], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert run.returncode == 0, run.stderr
    (tmp_path / "pope").mkdir()
    lines(tmp_path / "pope" / "coco_pope_adversarial.json", [{"question_id": 1, "label": "yes"}])
    scored = subprocess.run([sys.executable, "-m", "nanovoco.repro.paper_eval", "score", "pope", "--answers",
                             tmp_path / "a.jsonl", "--questions", qs, "--annotations", tmp_path / "pope"],
                            capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert scored.returncode == 0 and json.loads(scored.stdout)["adversarial"]["n"] == 1
    bad = subprocess.run([sys.executable, "-m", "nanovoco.repro.paper_eval", "answer", "--model", model_dir / "model",
                          "--questions", qs, "--image_folder", tmp_path, "--answers", tmp_path / "b.jsonl"],
                         capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert bad.returncode == 2 and "1 image(s) missing under" in bad.stderr and "Traceback" not in bad.stderr


def test_llava_max_new_tokens_by_question_file():
    assert paper_eval.llava_max_new_tokens("eval/scienceqa/llava_test_CQM-A.json") == 1024
    assert paper_eval.llava_max_new_tokens("eval/MME/llava_mme.jsonl") == 128


def test_bad_benchmark_files_are_one_line_and_exit_code_2(tmp_path, capsys):
    answers = lines(tmp_path / "a.jsonl", answer_rows([(1, "Is there a dog?" + SHORT, "Yes")]))
    questions = lines(tmp_path / "q.jsonl", [{"question_id": 1, "image": "x.jpg", "text": "Is there a dog?" + SHORT,
                                              "category": "adversarial"}])
    (tmp_path / "coco").mkdir()
    (tmp_path / "empty").mkdir()
    (tmp_path / "coco" / "coco_pope_adversarial.json").write_text('{"question_id": 1, "label": "yes"}\n')
    (tmp_path / "coco" / "README.md").write_text("stray")
    (tmp_path / "gqa.json").write_text("[]")
    (tmp_path / "seed.json").write_text(json.dumps({"questions": [{"question_id": "1"}]}))
    (tmp_path / "seed_ok.json").write_text(json.dumps({"question_type": {"Scene Understanding": 1}, "questions": [
        {"question_id": "1", "answer": "A", "question_type_id": 1, "data_type": "image"}]}))
    (tmp_path / "cut.jsonl").write_text('{"question_id": 1, "te')
    cases = [
        (["score", "mmbench", "--answers", answers, "--annotations", tmp_path], "unknown benchmark"),
        (["score", "pope", "--answers", answers, "--questions", questions, "--annotations", tmp_path / "empty"],
         "no coco_pope_<category>.json"),
        (["score", "pope", "--answers", answers, "--questions", questions, "--annotations", tmp_path / "coco"],
         "README.md: eval_pope.py reads every file"),
        (["score", "pope", "--answers", answers, "--annotations", tmp_path / "coco"], "pope needs --questions"),
        (["score", "mme", "--answers", answers, "--annotations", tmp_path / "empty"], "holds no MME questions"),
        (["score", "mme", "--answers", answers, "--annotations", tmp_path / "missing"], "is not a folder"),
        (["score", "gqa", "--answers", answers, "--annotations", tmp_path / "gqa.json"], "is not laid out as GQA"),
        (["score", "gqa", "--answers", answers, "--annotations", tmp_path / "coco"], "is not a file"),
        (["score", "sqa", "--answers", answers, "--annotations", tmp_path / "empty"], "problems.json"),
        (["score", "seed", "--answers", answers, "--annotations", tmp_path / "seed.json"], "SEED-Bench.json"),
        (["score", "seed", "--answers", tmp_path / "cut.jsonl", "--annotations", tmp_path / "seed_ok.json"],
         "line 1 is not JSON"),
    ]
    for args, message in cases:
        code, out, err = run_cli(args, capsys)
        assert (code, out) == (2, "") and message in err and err.count("\n") == 1, (args, err)
