"""Visual QA accuracy: greedy answers to held-out questions, exact match with the reference, per question type.

The prompt is run the way the model was trained to read it: under the VoCo mask (`compressed=True`, the voco and
lower_bound modes), so the answer can use the image only through the VoCo tokens, or with plain causal attention
(the full, avgpool and qformer modes). Generation is single-pass masked inference (generate.py).
"""
import torch
from tqdm import tqdm

from nanovoco.data import pad_samples
from nanovoco.generate import generate
from nanovoco.voco import without_compression


def blind_baseline(dataset, limit: int = 0) -> dict:
    """The accuracy of answering every question with its type's most common answer in these very records: the best
    that a model ignoring the image can do here (question types are told apart by their wording). Chance level."""
    n = min(limit, len(dataset.records)) if limit else len(dataset.records)
    answers = {}
    for record in dataset.records[:n]:
        answers.setdefault(record.get("type") or "all", []).append(normalise(record["conversations"][1]["value"]))
    by_type = {k: max(map(v.count, set(v))) / len(v) for k, v in sorted(answers.items())}
    return {"overall": sum(by_type[k] * len(v) for k, v in answers.items()) / n, "by_type": by_type, "n": n}


def normalise(text: str) -> str:
    return " ".join(text.lower().strip().rstrip(".").split())


def score(answers: list[str], references: list[str], types: list) -> dict:
    """Exact match after `normalise`, overall and per question type (None: "all"). Returns {"overall", "by_type",
    "n", "correct", "answers"}: correct is 0/1 per question, in order, so that methods scored on the same questions
    can be compared question by question (repro's paired standard errors); answers are the normalised answers, so
    that what a model says when it is wrong can be read afterwards (repro's answer table)."""
    answers = [normalise(a) for a in answers]
    correct = [int(a == normalise(r)) for a, r in zip(answers, references, strict=True)]
    by_type = {}
    for kind, c in zip(types, correct, strict=True):
        by_type.setdefault(kind or "all", []).append(c)
    return {"overall": sum(correct) / max(1, len(correct)),
            "by_type": {k: sum(v) / len(v) for k, v in sorted(by_type.items())}, "n": len(correct), "correct": correct,
            "answers": answers}


@torch.no_grad()
def vqa_accuracy(vlm, dataset, compressed: bool, limit: int = 0, batch_size: int = 32, max_new_tokens: int = 8,
                 progress: bool = False) -> dict:
    """Accuracy on the first question of each record of `dataset` (a data.LlavaDataset), the first `limit` records
    when limit > 0: greedy answers, scored by `score`."""
    vlm.eval()
    tokenizer = dataset.tokenizer
    device = next(vlm.parameters()).device
    n = min(limit, len(dataset)) if limit else len(dataset)
    answers, references, types = [], [], []
    for start in tqdm(range(0, n, batch_size), desc="eval", disable=not progress, leave=False):
        items = [dataset.prompt(i) for i in range(start, min(n, start + batch_size))]
        batch = pad_samples([it["sample"] for it in items], left=True)
        ids, segments, groups, positions = (batch[k].to(device) for k in ("input_ids", "segments", "groups",
                                                                           "positions"))
        images = [it["pixel_values"] for it in items if it["pixel_values"] is not None]
        pixels = torch.cat(images).to(device) if images else None
        generated = generate(vlm.llm, inputs_embeds=vlm.embed(ids, pixels),
                             segments=segments if compressed else without_compression(segments), groups=groups,
                             position_ids=positions, max_new_tokens=max_new_tokens, eos_id=tokenizer.eos_id)
        answers += [tokenizer.decode(a) for a in generated]
        references += [it["answer"] for it in items]
        types += [it["type"] for it in items]
    return score(answers, references, types)
