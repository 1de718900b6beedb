"""nanovoco.paper_eval: LLaVA-1.5's question and answer formats, two-stage answers equal to one masked pass, and the
scores of LLaVA's evaluation scripts, on small hand-made fixtures with hand-computed results."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from nanovoco import paper_eval
from nanovoco.config import preset
from nanovoco.data import build_sample, pad_samples
from nanovoco.generate import generate
from nanovoco.image import preprocess
from nanovoco.model import VoCoLlama
from nanovoco.tokenizer import Tokenizer, train_tiny_tokenizer

ROOT = Path(__file__).resolve().parents[1]


def lines(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def answers(texts: dict) -> dict:
    return {qid: {"question_id": qid, "text": t} for qid, t in texts.items()}


# ----------------------------------------------------------------------------------------------------------------
# Scores

def test_gqa_accuracy_after_llava_conversion():
    gt = {"1": {"answer": "yes"}, "2": {"answer": "red"}, "3": {"answer": "table"}, "4": {"answer": "no"}}
    got = paper_eval.score_gqa(answers({"1": "Yes.", "2": "blue", "3": "Table"}), gt)
    assert got == {"accuracy": 2 / 3, "n": 3, "missing": 1}  # "Yes." -> "yes", "Table" -> "table"


def test_pope_metrics_per_category():
    questions = [{"question_id": i, "category": "random" if i < 6 else "popular"} for i in range(8)]
    texts = {0: "Yes, there is a dog.", 1: "No.", 2: "There is no cat in the image.", 3: "yes",
             4: "I do not see one", 5: "Yes", 6: "No", 7: "Yes"}
    labels = {"random": {0: "yes", 1: "no", 2: "yes", 3: "no", 4: "no", 5: "yes"}, "popular": {6: "no", 7: "no"}}
    got = paper_eval.score_pope(answers(texts), questions, labels)
    # random: predictions yes, no, no, yes, no (the first sentence has "not"), yes; TP 2 (0, 5), FP 1 (3),
    # TN 2 (1, 4), FN 1 (2)
    r = got["random"]
    assert (r["accuracy"], r["precision"], r["recall"], r["yes_ratio"], r["n"]) == (4 / 6, 2 / 3, 2 / 3, 3 / 6, 6)
    assert r["f1"] == pytest.approx(2 / 3)
    p = got["popular"]  # TN 1, FP 1: no positive label, precision 0
    assert (p["accuracy"], p["precision"], p["recall"], p["f1"], p["yes_ratio"]) == (0.5, 0.0, 0.0, 0.0, 0.5)


def test_pope_reads_only_the_first_sentence():
    assert paper_eval.pope_yes("Yes. There is no cat.") and not paper_eval.pope_yes("No, there is a cat.")
    assert paper_eval.pope_yes("Nope")  # "Nope" is not the word "No": LLaVA's rule, kept


def test_mme_scores_accuracy_plus_and_totals(tmp_path):
    # two images of "existence", one of "code_reasoning", two questions each, as MME has
    (tmp_path / "existence" / "questions_answers_YN").mkdir(parents=True)
    (tmp_path / "existence" / "questions_answers_YN" / "a.txt").write_text("Is there a cat? Please answer yes or "
                                                                          "no.\tYes\nIs there a dog? Please answer "
                                                                          "yes or no.\tNo\n")
    (tmp_path / "existence" / "questions_answers_YN" / "b.txt").write_text("Is there a car? Please answer yes or "
                                                                          "no.\tYes\nIs there a bus? Please answer "
                                                                          "yes or no.\tNo\n")
    (tmp_path / "code_reasoning").mkdir()
    (tmp_path / "code_reasoning" / "c.txt").write_text("Is the output 3? Please answer yes or no.\tNo\n"
                                                       "Is the output 4? Please answer yes or no.\tYes\n")
    qs = [("existence/a.jpg", "Is there a cat?"), ("existence/a.jpg", "Is there a dog?"),
          ("existence/b.jpg", "Is there a car?"), ("existence/b.jpg", "Is there a bus?"),
          ("code_reasoning/c.png", "Is the output 3?"), ("code_reasoning/c.png", "Is the output 4?")]
    questions = [{"question_id": i, "image": img, "text": f"{t} Please answer yes or no.",
                  "category": img.split("/")[0]} for i, (img, t) in enumerate(qs)]
    truth = paper_eval.read_mme_truth(tmp_path, questions)
    assert truth == {0: "Yes", 1: "No", 2: "Yes", 3: "No", 4: "No", 5: "Yes"}
    texts = {0: "Yes", 1: "No, there is not.", 2: "yes.", 3: "Yes", 4: "I think no", 5: "Yes"}
    got = paper_eval.score_mme(answers(texts), questions, truth)
    # existence: 3 of 4 right, 1 of 2 images wholly right -> 75 + 50; code_reasoning: "I think no" is "other",
    # 1 of 2 right, no image wholly right -> 50 + 0
    assert got["existence"]["score"] == pytest.approx(125.0) and got["code_reasoning"]["score"] == pytest.approx(50.0)
    assert got["perception"] == pytest.approx(125.0) and got["cognition"] == pytest.approx(50.0)
    assert paper_eval.mme_label("Yes, it is") == "yes" and paper_eval.mme_label("It is") == "other"


def test_scienceqa_accuracy_and_img_accuracy():
    problems = {"1": {"choices": ["a", "b"], "answer": 0, "image": "image.png"},
                "2": {"choices": ["a", "b", "c"], "answer": 2, "image": None},
                "3": {"choices": ["a", "b"], "answer": 1, "image": "image.png"},
                "4": {"choices": ["a", "b"], "answer": 1, "image": "image.png"}}
    texts = {"1": "A", "2": "The answer is C.", "3": "C"}  # "C" is not an option of 3; 4 is unanswered
    got = paper_eval.score_sqa(answers(texts), problems, ["1", "2", "3", "4"])
    assert got == {"accuracy": 0.5, "img_accuracy": 1 / 3, "n": 4, "n_img": 3}
    assert paper_eval.sqa_letter("B. because", 3) == "B" and paper_eval.sqa_letter("maybe", 3) == "FAILED"


def test_seed_accuracy_per_type():
    annotations = {"question_type": {"Scene Understanding": 1, "Instance Counting": 2},
                   "questions": [{"question_id": "10", "answer": "A", "question_type_id": 1, "data_type": "image"},
                                 {"question_id": "11", "answer": "B", "question_type_id": 1, "data_type": "image"},
                                 {"question_id": "12", "answer": "C", "question_type_id": 2, "data_type": "image"},
                                 {"question_id": "13", "answer": "D", "question_type_id": 2, "data_type": "video"}]}
    got = paper_eval.score_seed(answers({"10": "A", "11": "A", "12": "C", "13": "D"}), annotations)
    assert got == {"accuracy": 0.75, "image_accuracy": 2 / 3, "n": 4,
                   "by_type": {"Instance Counting": 1.0, "Scene Understanding": 0.5}}


# ----------------------------------------------------------------------------------------------------------------
# Question files and answers

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


def test_answers_equal_single_pass_masked_generation(model_dir, tmp_path):
    """Each image compressed once, its questions batched over the cache: the same texts as generating each question
    over the whole prompt under the VoCo mask; LLaVA's answer-file fields, in question order; a resumed run keeps the
    answers already written."""
    qs = lines(tmp_path / "q.jsonl", [
        {"question_id": "a", "image": "img0.png", "text": "Is there a red square?\nAnswer the question using a "
                                                          "single word or phrase.", "category": "random"},
        {"question_id": "b", "image": "img1.png", "text": "Is there a red square?"},
        {"question_id": "c", "image": "img0.png", "text": "What colour?"}])
    vlm = VoCoLlama.from_pretrained(model_dir / "model").eval()
    tok = Tokenizer(model_dir / "model" / "tokenizer.model")
    questions = paper_eval.read_questions(qs)
    out = paper_eval.answer(vlm, tok, questions, model_dir, tmp_path / "a.jsonl", system="", max_new_tokens=6,
                            progress=False)
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["question_id"] for r in rows] == ["a", "b", "c"]
    assert set(rows[0]) == {"question_id", "prompt", "text", "answer_id", "model_id", "metadata"}
    c = vlm.config
    for q, row in zip(questions, rows):
        s = build_sample(tok, [(q["text"], None)], image_token_id=c.image_token_id,
                         num_image_tokens=c.num_image_tokens, voco_token_id=c.voco_token_id, num_voco=2, system="")
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


def test_scienceqa_question_file(tmp_path):
    path = tmp_path / "llava_test_CQM-A.json"
    path.write_text(json.dumps([{"id": "7", "image": "test/7/image.png", "conversations": [
        {"from": "human", "value": "<image>\nContext: a map.\nWhich state is highlighted?\nA. Ohio\nB. Iowa"},
        {"from": "gpt", "value": "B"}]}, {"id": "8", "conversations": [
            {"from": "human", "value": "Which word is a noun?\nA. run\nB. dog"}, {"from": "gpt", "value": "B"}]}]))
    got = paper_eval.read_questions(path)
    assert got[0] == {"question_id": "7", "image": "test/7/image.png", "text": "Context: a map.\nWhich state is "
                      "highlighted?\nA. Ohio\nB. Iowa\nAnswer with the option's letter from the given choices "
                      "directly."}
    assert got[1]["image"] is None


def test_command_line(model_dir, tmp_path):
    qs = lines(tmp_path / "q.jsonl", [{"question_id": 1, "image": "img0.png", "text": "Is there a red square?",
                                       "category": "adversarial"}])
    run = subprocess.run([sys.executable, "-m", "nanovoco.paper_eval", "answer", "--model", model_dir / "model",
                          "--questions", qs, "--image_folder", model_dir, "--answers", tmp_path / "a.jsonl",
                          "--max_new_tokens", "3"], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert run.returncode == 0, run.stderr
    (tmp_path / "pope").mkdir()
    lines(tmp_path / "pope" / "coco_pope_adversarial.json", [{"question_id": 1, "label": "yes"}])
    scored = subprocess.run([sys.executable, "-m", "nanovoco.paper_eval", "score", "pope", "--answers",
                             tmp_path / "a.jsonl", "--questions", qs, "--annotations", tmp_path / "pope"],
                            capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert scored.returncode == 0 and json.loads(scored.stdout)["adversarial"]["n"] == 1
    bad = subprocess.run([sys.executable, "-m", "nanovoco.paper_eval", "answer", "--model", model_dir / "model",
                          "--questions", qs, "--image_folder", tmp_path, "--answers", tmp_path / "b.jsonl"],
                         capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert bad.returncode == 2 and "1 image(s) missing under" in bad.stderr and "Traceback" not in bad.stderr
