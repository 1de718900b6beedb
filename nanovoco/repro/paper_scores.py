"""The paper's benchmarks scored exactly as LLaVA-1.5's scripts and the benchmarks' own tools score them, rule for
rule (see each score_* function), from LLaVA's question and answer files; paper_eval.py answers the questions and is
the command line (`python -m nanovoco.repro.paper_eval score ...`). docs/paper_eval.md lists the files, the rules
and every difference from the official scripts.
"""
import io
import json
import re
from pathlib import Path

from nanovoco.files import read_json

BENCHMARKS = ("gqa", "pope", "mme", "sqa", "seed")
SQA_PROMPT = "Answer with the option's letter from the given choices directly."  # LLaVA's --single-pred-prompt
SHORT_ANSWER = "Answer the question using a single word or phrase."  # LLaVA's suffix of GQA, POPE and MME questions
MME_YES_NO = "Please answer yes or no."  # MME's own suffix, which LLaVA's question file replaces by SHORT_ANSWER
MME_PERCEPTION = ("existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark", "artwork",
                  "OCR")
MME_COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")
SQA_OPTIONS = ["A", "B", "C", "D", "E"]  # eval_science_qa.py's --options: a list, so "" or "AB" is no option


# ----------------------------------------------------------------------------------------------------------------
# LLaVA's files

def read_questions(path) -> list[dict]:
    """LLaVA's question file as [{question_id, image (or None), text, prompt, category}]: `text` is what the model is
    asked, `prompt` what LLaVA writes into the answer file. A JSONL file of {question_id, image, text, category}
    records (prompt = text, as model_vqa_loader.py writes it), or ScienceQA's JSON list of conversations, asked as
    model_vqa_science.py asks them: the first turn without its "<image>" tag, LLaVA's single-prediction prompt
    appended; the prompt of a question with an image begins with "<image>\\n", which eval_science_qa.py counts."""
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
                text = r["conversations"][0]["value"].replace("<image>", "").strip() + "\n" + SQA_PROMPT
                questions.append({"question_id": r["id"], "image": r.get("image"), "text": text,
                                  "prompt": "<image>\n" + text if "image" in r else text, "category": None})
            except (KeyError, IndexError, TypeError, AttributeError):
                raise ValueError(f"{path}: record {i} is not a ScienceQA record with 'id' and 'conversations'") \
                    from None
    else:
        questions = []
        for n, line in enumerate(text_lines(path), 1):
            if not line.strip():
                continue
            try:
                q = json.loads(line)
                questions.append({"question_id": q["question_id"], "image": q.get("image"), "text": q["text"],
                                  "prompt": q["text"], "category": q.get("category")})
            except (json.JSONDecodeError, KeyError, TypeError):
                raise ValueError(f"{path}: line {n} is not a question record {{question_id, image, text}}") from None
    for q in questions:
        if not isinstance(q["question_id"], (str, int)) or not isinstance(q["text"], str):
            raise ValueError(f"{path}: question {q['question_id']!r} needs a string or integer id and a string text")
    return questions


def text_lines(path) -> list[str]:
    """A text file's lines as Python's text mode reads them, which is how the official scripts read theirs."""
    try:
        with open(path, encoding="utf-8") as f:
            return f.readlines()
    except UnicodeDecodeError:
        raise ValueError(f"{path} is not UTF-8 text: pass the benchmark's own file") from None


def read_answers(path, fields=("question_id", "text")) -> list[dict]:
    """A LLaVA answer file's records in file order, as LLaVA's scripts read it (one JSON object a line)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: run `python -m nanovoco.repro.paper_eval answer` first")
    rows = []
    for n, line in enumerate(text_lines(path), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            raise ValueError(f"{path}: line {n} is not JSON (an interrupted run?): run `paper_eval answer` again, "
                             "it finishes the file") from None
        if not (isinstance(row, dict) and isinstance(row.get("question_id"), (str, int))
                and all(isinstance(row.get(k), str) for k in fields if k != "question_id")):
            raise ValueError(f"{path}: line {n} is not an answer record with {', '.join(fields)}: pass an answer file "
                             "of `paper_eval answer` or of LLaVA's scripts")
        rows.append(row)
    if not rows:
        raise ValueError(f"{path} holds no answers: run `python -m nanovoco.repro.paper_eval answer` first")
    return rows


# ----------------------------------------------------------------------------------------------------------------
# Scores

def ratio(part, whole):
    """part / whole, or None where the official script divides by zero (and stops)."""
    return part / whole if whole else None


def percent(part, whole):
    """part / whole * 100, in the official scripts' order of operations (the same float), or None over nothing."""
    return part / whole * 100 if whole else None


def score_gqa(answers: list[dict], questions: dict) -> dict:
    """LLaVA's convert_gqa_for_eval.py then GQA's eval.py (the edition LLaVA's docs point to): every answer lower-cased
    with its final dots stripped, the last answer of a question_id kept; accuracy = exact matches with "answer" over
    the balanced questions of testdev_balanced_questions.json (all of them are), in percent. eval.py refuses a file
    that misses a balanced question; here the answered ones are scored and "missing" counts the others."""
    predictions = {a["question_id"]: a["text"].rstrip(".").lower() for a in answers}
    balanced = [qid for qid, q in questions.items() if q.get("isBalanced", True)]
    correct = [predictions[qid] == questions[qid]["answer"] for qid in balanced if qid in predictions]
    out = {"accuracy": percent(sum(correct), len(correct)), "n": len(correct), "missing": len(balanced) - len(correct)}
    if out["missing"]:
        out["note"] = (f"{out['missing']} of {len(balanced)} balanced questions have no answer: GQA's eval.py refuses "
                       f"such a file; the accuracy is over the {len(correct)} answered")
    return out


def pope_yes(text: str) -> bool:
    """eval_pope.py: the first sentence; commas out; "No", "not" or "no" among its space-separated words is a no,
    anything else (an empty answer too) a yes."""
    words = text.split(".")[0].replace(",", "").split(" ")
    return not ("No" in words or "not" in words or "no" in words)


def pope_metrics(predictions: list[bool], labels: list) -> dict:
    """eval_pope.py for one category: its answers (in answer-file order) and its label file's lines paired by order,
    the shorter setting the length; a label other than "no" is a yes; yes is the positive class; the yes-ratio is
    over all the category's answers."""
    truth = [label != "no" for label in labels]
    pairs = list(zip(predictions, truth))
    tp = sum(p and t for p, t in pairs)
    fp = sum(p and not t for p, t in pairs)
    tn = sum(not p and not t for p, t in pairs)
    fn = sum(not p and t for p, t in pairs)
    precision, recall = ratio(tp, tp + fp), ratio(tp, tp + fn)
    f1 = 2 * precision * recall / (precision + recall) if precision and recall else None  # 0 + 0: divides by zero
    return {"accuracy": ratio(tp + tn, tp + tn + fp + fn), "precision": precision, "recall": recall, "f1": f1,
            "yes_ratio": ratio(sum(predictions), len(predictions)), "TP": tp, "FP": fp, "TN": tn, "FN": fn,
            "n": len(predictions)}


def score_pope(answers: list[dict], questions: list[dict], labels: dict) -> dict:
    """labels: category -> labels in file order (read_pope_labels). Each answer's category comes from the question
    file by question_id (llava_pope_test.jsonl numbers adversarial 1.., random 10000001.., popular 20000001.., while
    each label file numbers its lines from 1: the pairing is by order, never by id)."""
    category_of = {q["question_id"]: q["category"] for q in questions}
    for a in answers:
        if a["question_id"] not in category_of:
            raise ValueError(f"answer {a['question_id']!r} is not a question of the question file: pass the "
                             "llava_pope_test.jsonl the answers were made from")
    return {category: pope_metrics([pope_yes(a["text"]) for a in answers
                                    if category_of[a["question_id"]] == category], labels[category])
            for category in sorted(labels)}


def read_pope_labels(folder) -> dict:
    """category -> the "label" of each line of POPE's coco_pope_<category>.json (one JSON record a line), for every
    file of the folder: eval_pope.py takes each file there for a label file."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder: pass POPE's output/coco folder (coco_pope_*.json)")
    labels = {}
    for path in sorted(folder.iterdir()):
        if not (path.is_file() and path.name.startswith("coco_pope_") and path.name.endswith(".json")):
            raise ValueError(f"{path}: eval_pope.py reads every file of {folder} as a coco_pope_<category>.json "
                             "label file: move it out")
        file_labels = labels[path.name.removeprefix("coco_pope_").removesuffix(".json")] = []
        for n, line in enumerate(text_lines(path), 1):
            if not line.strip():
                continue
            try:
                file_labels.append(json.loads(line)["label"])
            except (json.JSONDecodeError, KeyError, TypeError):
                raise ValueError(f"{path}: line {n} is not a POPE record with a 'label': download POPE's "
                                 "output/coco files again") from None
    if not labels:
        raise FileNotFoundError(f"{folder} holds no coco_pope_<category>.json label files: pass POPE's output/coco")
    return labels


def read_mme_truth(folder) -> dict:
    """(category, .txt name, MME's question) -> "Yes"/"No", read as LLaVA's convert_answer_to_mme.py reads the MME
    release: in every category folder, questions_answers_YN/ when it has images/, else the folder itself; every
    line of every .txt there is "question<TAB>answer", stripped."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder: pass MME's MME_Benchmark_release_version")
    truth = {}
    for category in sorted(p for p in folder.iterdir() if p.is_dir()):
        qa = category / "questions_answers_YN" if (category / "images").exists() else category
        if not qa.is_dir():
            raise ValueError(f"{category} has images/ but no questions_answers_YN/: unpack MME's release again")
        for path in sorted(p for p in qa.iterdir() if p.is_file() and p.name.endswith(".txt")):
            for n, line in enumerate(text_lines(path), 1):
                fields = line.strip().split("\t")
                if len(fields) != 2:
                    raise ValueError(f"{path}: line {n} is not 'question<TAB>answer': unpack MME's release again")
                truth[category.name, path.name, fields[0]] = fields[1]
    if not truth:
        raise FileNotFoundError(f"{folder} holds no MME questions (<category>/[questions_answers_YN/]*.txt): pass "
                                "MME's MME_Benchmark_release_version")
    return truth


def mme_result_files(answers: list[dict], truth: dict) -> dict:
    """category -> the text of the file LLaVA's convert_answer_to_mme.py writes for it: per answer, in answer-file
    order, "<image>.txt<TAB>MME's question<TAB>ground truth<TAB>answer" and a newline. MME's question is LLaVA's
    prompt without its short-answer instruction, with " Please answer yes or no." put back (two spaces before it
    where MME's file has two). The category and .txt name come from the question_id ("artwork/images/14777.jpg")."""
    files = {}
    for a in answers:
        qid = a["question_id"]
        if not isinstance(qid, str):
            raise ValueError(f"answer {qid!r}: MME's question_ids are image paths: pass the answers to llava_mme.jsonl")
        category, name = qid.split("/")[0], qid.split("/")[-1].split(".")[0] + ".txt"
        question = a["prompt"]
        if SHORT_ANSWER in question:
            question = question.replace(SHORT_ANSWER, "").strip()
        if MME_YES_NO not in question:
            question += " " + MME_YES_NO
            if (category, name, question) not in truth:
                question = question.replace(" " + MME_YES_NO, "  " + MME_YES_NO)
        if (category, name, question) not in truth:
            raise ValueError(f"answer {qid!r} {a['prompt']!r}: MME has no such question in {category}/{name}: pass the "
                             "MME_Benchmark_release_version the question file llava_mme.jsonl was made from")
        files.setdefault(category, []).append("\t".join((name, question, truth[category, name, question],
                                                         a["text"])) + "\n")
    return {category: "".join(lines) for category, lines in files.items()}


def mme_label(answer: str) -> str:
    """calculation.py's parse_pred_ans (on the lower-cased answer): "yes" or "no" as it is, else "yes" or "no" found
    in its first four characters (yes first), else "other"."""
    if answer in ("yes", "no"):
        return answer
    return "yes" if "yes" in answer[:4] else "no" if "no" in answer[:4] else "other"


def score_mme(result_files: dict) -> dict:
    """MME's eval_tool/calculation.py on mme_result_files, each file read back as it reads it (text-mode lines: an
    answer holding a line break spans two lines there too). Its lines go in pairs, one image each, of four
    tab-separated fields; per subtask, accuracy = right answers over the lines, accuracy+ = pairs with both right
    over the pairs, score = 100 * accuracy + 100 * accuracy+; perception and cognition are the sums of their
    subtasks' scores, added in calculation.py's order."""
    out, missing = {}, []
    for group, tasks in (("perception", MME_PERCEPTION), ("cognition", MME_COGNITION)):
        total = 0
        for task in tasks:
            if task not in result_files:
                missing.append(task)
                continue
            lines = io.StringIO(result_files[task], newline=None).readlines()
            right = both = 0
            for pair in zip(lines[0::2], lines[1::2]):
                pair_right = 0
                for line in pair:
                    fields = line.split("\t")
                    if len(fields) != 4 or fields[2].lower() not in ("yes", "no"):
                        raise ValueError(f"MME {task}: {line.strip()!r} is not 'image<TAB>question<TAB>Yes or No<TAB>"
                                         "answer' (an answer holding a tab or a line break?): calculation.py stops "
                                         "there")
                    pair_right += fields[2].lower() == mme_label(fields[3].lower())
                right += pair_right
                both += pair_right == 2
            if len(lines) % 2:
                raise ValueError(f"MME {task}: {len(lines)} answer lines, not two per image (calculation.py asserts "
                                 "it): answer both questions of every image")
            accuracy, accuracy_plus = right / len(lines), both / (len(lines) // 2)
            out[task] = {"score": accuracy * 100 + accuracy_plus * 100, "accuracy": accuracy * 100,
                         "accuracy_plus": accuracy_plus * 100}
            total += out[task]["score"]  # one by one, in calculation.py's order: the same float
        out[group] = total
    if missing:
        out["note"] = (f"no answers for {', '.join(missing)}: calculation.py needs all 14 subtasks; the totals are "
                       "over the subtasks answered")
    return out


def sqa_letter(text: str) -> str:
    """eval_science_qa.py's parser: the answer itself one of the option letters, or "X. ..." with X one of them, or
    exactly one "The answer is X." in it; else FAILED."""
    if text in SQA_OPTIONS:
        return text
    if len(text) >= 3 and text[0] in SQA_OPTIONS and text[1:3] == ". ":
        return text[0]
    found = re.findall(r"The answer is ([A-Z]).", text)
    return found[0] if len(found) == 1 else "FAILED"


def score_sqa(answers: list[dict], problems: dict, split: list) -> dict:
    """eval_science_qa.py: problems.json's problems of the split (pid_splits.json), each with its last answer of
    that question_id; a missing answer is FAILED with the prompt 'Unknown'; right when the parsed letter is among the
    problem's first len(choices) options and its index is the answer. IMG accuracy is over the answers whose prompt
    holds "<image>" (model_vqa_science.py's mark of an image question). Both in percent."""
    predictions = {a["question_id"]: a for a in answers}
    right = image_right = images = 0
    pids = dict.fromkeys(split)  # the official split is a dict: a pid listed twice counts once
    for pid in pids:
        if pid not in problems:
            raise ValueError(f"pid_splits.json lists {pid!r}, which problems.json lacks: download both from ScienceQA "
                             "again")
        problem = problems[pid]
        row = predictions.get(pid, {"text": "FAILED", "prompt": "Unknown"})
        letter = sqa_letter(row["text"])
        correct = letter in SQA_OPTIONS[:len(problem["choices"])] and SQA_OPTIONS.index(letter) == problem["answer"]
        right += correct
        if "<image>" in row["prompt"]:
            images += 1
            image_right += correct
    return {"accuracy": percent(right, len(pids)), "img_accuracy": percent(image_right, images), "n": len(pids),
            "n_img": images}


def score_seed(answers: list[dict], annotations: dict) -> dict:
    """LLaVA's convert_seed_for_submission.py: the last answer of each question_id; SEED-Bench.json's string ids
    looked up as integers where they are ones (LLaVA's answer files carry integer ids); right when the answer is
    exactly the letter; a missing answer is wrong. Accuracy per question type (over all data types), over all, and
    over the image and the video questions, in percent."""
    results = {a["question_id"]: a["text"] for a in answers}
    names = {type_id: name for name, type_id in annotations["question_type"].items()}
    by_type, by_data = {}, {"all": [], "image": [], "video": []}
    for q in annotations["questions"]:
        try:
            qid = int(q["question_id"])
        except (ValueError, TypeError):
            qid = q["question_id"]
        correct = qid in results and results[qid] == q["answer"]
        by_type.setdefault(q["question_type_id"], []).append(correct)
        by_data["all"].append(correct)
        by_data.setdefault(q["data_type"], []).append(correct)
    unknown = [t for t in by_type if t not in names]
    if unknown:
        raise ValueError(f"SEED-Bench.json: question_type_id {unknown[0]!r} is not in its question_type table")
    return {"accuracy": percent(sum(by_data["all"]), len(by_data["all"])),
            "image_accuracy": percent(sum(by_data["image"]), len(by_data["image"])),
            "video_accuracy": percent(sum(by_data["video"]), len(by_data["video"])),
            "by_type": {names[t]: percent(sum(rs), len(rs)) for t, rs in sorted(by_type.items())},
            "n": len(by_data["all"]), "n_image": len(by_data["image"])}


# ----------------------------------------------------------------------------------------------------------------
# Each benchmark's files, checked, then scored

def load_json(path: Path, what: str, layout):
    """A benchmark's JSON file, checked against its layout (a predicate) before it is scored."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} is not a file: pass {what}")
    data = read_json(path, what)
    if not layout(data):
        raise ValueError(f"{path} is not laid out as {what}: pass the benchmark's own file")
    return data


def all_have(items, *fields) -> bool:
    """items (a list, or a dict's values) are all dicts that hold `fields`."""
    if isinstance(items, dict):
        items = list(items.values())
    return isinstance(items, list) and all(isinstance(i, dict) and all(f in i for f in fields) for i in items)


def score(benchmark: str, answers_path, annotations, questions_path=None) -> dict:
    if benchmark not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {benchmark!r}: one of {', '.join(BENCHMARKS)}")
    if benchmark == "pope" and questions_path is None:
        raise ValueError("pope needs --questions llava_pope_test.jsonl (the answers' categories are there)")
    annotations = Path(annotations)
    if benchmark == "gqa":
        truth = load_json(annotations, "GQA's testdev_balanced_questions.json {question_id: {answer, ...}}",
                          lambda d: isinstance(d, dict) and all_have(d, "answer"))
        return score_gqa(read_answers(answers_path), truth)
    if benchmark == "pope":
        labels, questions = read_pope_labels(annotations), read_questions(questions_path)
        return score_pope(read_answers(answers_path), questions, labels)
    if benchmark == "mme":
        truth = read_mme_truth(annotations)
        return score_mme(mme_result_files(read_answers(answers_path, ("question_id", "prompt", "text")), truth))
    if benchmark == "sqa":
        problems = load_json(annotations / "problems.json", "ScienceQA's problems.json {pid: {choices, answer}}",
                             lambda d: isinstance(d, dict) and all_have(d, "choices", "answer"))
        splits = load_json(annotations / "pid_splits.json", "ScienceQA's pid_splits.json {split: [pid]}",
                           lambda d: isinstance(d, dict) and isinstance(d.get("test"), list))
        return score_sqa(read_answers(answers_path, ("question_id", "prompt", "text")), problems, splits["test"])
    seed = load_json(annotations, "SEED-Bench.json {question_type: {name: id}, questions: [...]}",
                     lambda d: isinstance(d, dict) and isinstance(d.get("question_type"), dict)
                     and all_have(d.get("questions"), "question_id", "answer", "question_type_id", "data_type"))
    return score_seed(read_answers(answers_path), seed)
