"""The paper's benchmarks: answer LLaVA-1.5's evaluation question files with two-stage inference, score the answers
exactly as LLaVA-1.5's scripts and the benchmarks' own tools score them.

    python -m nanovoco.repro.paper_eval answer --model DIR --questions llava_gqa_testdev_balanced.jsonl \
        --image_folder gqa/data/images --answers answers/gqa.jsonl
    python -m nanovoco.repro.paper_eval score gqa --answers A --annotations testdev_balanced_questions.json
    python -m nanovoco.repro.paper_eval score pope --answers A --questions llava_pope_test.jsonl --annotations pope/coco
    python -m nanovoco.repro.paper_eval score mme --answers A --annotations MME_Benchmark_release_version
    python -m nanovoco.repro.paper_eval score sqa --answers A --annotations scienceqa  # problems.json, pid_splits.json
    python -m nanovoco.repro.paper_eval score seed --answers A --annotations SEED-Bench.json

`answer` reads LLaVA-1.5's question files (eval.zip, playground/data/eval in the LLaVA repository) as its
model_vqa_loader.py and model_vqa_science.py do: JSONL records {question_id, image, text, category} for GQA, POPE, MME
and SEED-Bench, and ScienceQA's JSON list of {id, image?, conversations} (llava_test_CQM-A.json, with LLaVA's
single-prediction prompt). Each image is compressed once into its VoCo cache and all its questions are answered from
it in one batch (a model without VoCo tokens reads the image in the prompt); greedy decoding, LLaVA's 128 new tokens
(1024 for ScienceQA). It writes LLaVA's answer file, one JSON line per question {question_id, prompt, text,
answer_id, model_id, metadata} in question order, with LLaVA's prompt field (ScienceQA's image questions begin with
"<image>\\n"), and resumes an interrupted run. A question is its (question_id, prompt): MME's two questions of an image
share one question_id.

`score` computes what LLaVA's scripts compute from that file, rule for rule (paper_scores.py's score_*), in their
units: GQA, ScienceQA and SEED-Bench in percent, POPE as fractions, MME as its scores. Where an official script stops
on a well-formed file, nanovoco prints null for a 0 / 0 (POPE's precision with no "yes" answer, IMG accuracy with no
image question answered) and the plain value otherwise (0 for a SEED-Bench question type with every answer wrong,
where convert_seed_for_submission.py stops with a KeyError; the score of an MME subtask whose answers are all neither
yes nor no, where calculation.py's scikit-learn stops on empty input); where it refuses a partial file (GQA, MME
without some subtask) the answered part is scored and a "note" in the output says so.
"""
import json
import sys
import uuid
from pathlib import Path

import torch
from tqdm import tqdm

from nanovoco import cli
from nanovoco.data import build_sample, pad_samples
from nanovoco.generate import generate
from nanovoco.image import load_image, preprocess
from nanovoco.model import VoCoLlama
from nanovoco.repro.paper_scores import BENCHMARKS, read_questions, score, text_lines
from nanovoco.tokenizer import load_tokenizer, trained_system_prompt
from nanovoco.voco import Layout, compress_prefix
from nanovoco.voco_cache import compress, generate_from_cache


def llava_max_new_tokens(questions_path) -> int:
    """LLaVA's limit for the file: model_vqa_science.py (ScienceQA's JSON) generates up to 1024 tokens,
    model_vqa_loader.py (the JSONL files) 128."""
    return 1024 if Path(questions_path).suffix == ".json" else 128


def answered_before(path) -> dict:
    """(question_id, prompt) -> answer record of an earlier, maybe interrupted run (a line cut off is skipped)."""
    done = {}
    for line in text_lines(path) if Path(path).is_file() else []:
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and isinstance(row.get("question_id"), (str, int)) \
                and isinstance(row.get("prompt"), str):
            done[row["question_id"], row["prompt"]] = row
    return done


@torch.no_grad()
def answer(vlm: VoCoLlama, tokenizer, questions: list[dict], image_folder, answers_path, *,
           system=None, max_new_tokens=128, model_id="nanovoco", progress=True) -> Path:
    """Answer `questions` (read_questions) into LLaVA's answer file at answers_path, resuming it. A question is its
    (question_id, prompt): MME asks two questions of an image under one question_id."""
    answers_path, image_folder = Path(answers_path), Path(image_folder)
    done = answered_before(answers_path)
    by_image = {}
    for q in questions:
        if (q["question_id"], q["prompt"]) not in done:
            by_image.setdefault(q["image"], []).append(q)
    answers_path.parent.mkdir(parents=True, exist_ok=True)
    with open(answers_path, "a", encoding="utf-8") as out:
        for image, group in tqdm(by_image.items(), desc="images", disable=not progress):
            texts = answer_group(vlm, tokenizer, image_folder / image if image else None, group, system,
                                 max_new_tokens)
            for q, text in zip(group, texts):
                row = {"question_id": q["question_id"], "prompt": q["prompt"], "text": text,
                       "answer_id": uuid.uuid4().hex, "model_id": model_id, "metadata": {}}
                done[q["question_id"], q["prompt"]] = row
                out.write(json.dumps(row) + "\n")
            out.flush()
    # in question order, as LLaVA writes it (a resumed run appended in another order)
    text = "".join(json.dumps(done[q["question_id"], q["prompt"]]) + "\n" for q in questions)
    answers_path.write_text(text, encoding="utf-8")
    return answers_path


def answer_group(vlm, tokenizer, image_path, group, system, max_new_tokens) -> list[str]:
    """The greedy answers to the questions of one image (or of none): the image compressed once into its VoCo cache,
    the questions batched over it; without VoCo tokens, the image in every prompt."""
    c, device = vlm.config, next(vlm.parameters()).device
    layout = Layout.of(c) if image_path else None  # a question without an image is plain text
    voco = layout.num_voco if layout else 0
    samples = [build_sample(tokenizer, [(q["text"], None)], layout, max_len=sys.maxsize, system=system)
               for q in group]
    pixels = preprocess(load_image(image_path), c.vision.image_size)[None].to(device) if image_path else None
    if voco:  # stage 1 once, stage 2 for every question: the text after the VoCo tokens, left-padded
        prefix = torch.tensor(compress_prefix(tokenizer, layout), device=device)
        cache = compress(vlm, pixels.to(next(vlm.parameters()).dtype), prefix)
        T = max(len(s.text_ids()) for s in samples)
        text = torch.tensor([[0] * (T - len(s.text_ids())) + s.text_ids() for s in samples], device=device)
        real = torch.tensor([[False] * (T - len(s.text_ids())) + [True] * len(s.text_ids()) for s in samples],
                            device=device)
        ids = generate_from_cache(vlm, cache, text, real, max_new_tokens=max_new_tokens, eos_id=tokenizer.eos_id)
    else:
        b = {k: v.to(device) for k, v in pad_samples(samples, left=True).items()}
        images = None if pixels is None else pixels.expand(len(samples), -1, -1, -1)
        embeds = vlm.embed(b["input_ids"], None if images is None else images.to(next(vlm.parameters()).dtype))
        ids = generate(vlm.llm, inputs_embeds=embeds, segments=b["segments"], groups=b["groups"],
                       position_ids=b["positions"], max_new_tokens=max_new_tokens, eos_id=tokenizer.eos_id)
    return [tokenizer.decode(x).strip() for x in ids]


def main(argv=None):
    p = cli.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    a = sub.add_parser("answer", help="answer a question file into LLaVA's answer format")
    a.add_argument("--model", required=True)
    a.add_argument("--vision", help="CLIP directory, for a checkpoint that lacks its vision tower")
    a.add_argument("--questions", required=True)
    a.add_argument("--image_folder", required=True)
    a.add_argument("--answers", required=True)
    a.add_argument("--max_new_tokens", type=int, help="default LLaVA's: 1024 for ScienceQA, 128 for the others")
    a.add_argument("--limit", type=int, default=0, help="only the first N questions (0: all)")
    a.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    s = sub.add_parser("score", help="score an answer file as LLaVA's scripts do")
    s.add_argument("benchmark", help=", ".join(BENCHMARKS))
    s.add_argument("--answers", required=True)
    s.add_argument("--annotations", required=True, help="the benchmark's ground truth (see the module docstring)")
    s.add_argument("--questions", help="pope: llava_pope_test.jsonl, where the answers' categories are (the other "
                   "benchmarks read none: LLaVA's scripts take all they need from the answers and annotations)")
    args = p.parse_args(argv)
    try:
        if args.command == "score":
            print(json.dumps(score(args.benchmark, args.answers, args.annotations, args.questions), indent=2))
            return 0
        questions = read_questions(args.questions)[:args.limit or None]
        missing = [q["image"] for q in questions if q["image"] and not (Path(args.image_folder) / q["image"]).is_file()]
        if missing:
            raise FileNotFoundError(f"{len(missing)} image(s) missing under {args.image_folder}, e.g. {missing[0]}")
        max_new_tokens = args.max_new_tokens or llava_max_new_tokens(args.questions)
        device = torch.device(args.device)
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        vlm = VoCoLlama.from_pretrained(args.model, vision_path=args.vision, dtype=dtype, device=device).eval()
        tokenizer = load_tokenizer(args.model)
        path = answer(vlm, tokenizer, questions, args.image_folder, args.answers,
                      system=trained_system_prompt(args.model), max_new_tokens=max_new_tokens)
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
