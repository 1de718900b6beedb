"""Visual QA accuracy: greedy answers to held-out questions, exact match with the reference, per question type; and
how far a compressed model's answer distribution is from the uncompressed model's (the KL of attention distillation).

The prompt is run the way the model was trained to read it: under the VoCo mask (`compressed=True`, the voco and
lower_bound modes), so the answer can use the image only through the VoCo tokens, or with plain causal attention
(the full, avgpool and qformer modes). Generation is single-pass masked inference (generate.py).

The paper's section 3 writes VoCo-LLaMA's goal as distillation: the student p(y | VoCo(V), T) pulled toward the
teacher p(y | V, T), the same LLM reading the vision tokens V directly. Training never computes that KL (the loss is
the answers' cross-entropy; the mask alone makes the distillation), so here it is measured: `answer_kl` is
KL(teacher || student) at each token of the reference answers, teacher-forced, averaged over each answer's tokens.
"""
import torch
import torch.nn.functional as F
from tqdm import tqdm

from nanovoco.data import answer_positions, collate, pad_samples
from nanovoco.generate import generate
from nanovoco.voco import causal_pad_mask, voco_mask, without_compression


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


@torch.no_grad()
def answer_log_probs(vlm, dataset, compressed: bool, limit: int = 0, batch_size: int = 32) -> list[torch.Tensor]:
    """The model's next-token log-probabilities over the whole vocabulary at every token of each record's first
    reference answer (its words and its end token: where the training loss is), the answer fed in as it is
    (teacher forcing). Returns one (answer tokens, vocabulary) float32 tensor per record, on the CPU, for the first
    `limit` records when limit > 0. compressed: as in vqa_accuracy."""
    vlm.eval()
    device = next(vlm.parameters()).device
    n = min(limit, len(dataset)) if limit else len(dataset)
    out = []
    for start in range(0, n, batch_size):
        batch = collate([dataset.first_turn(i) for i in range(start, min(n, start + batch_size))])
        segments, groups = batch["segments"], batch["groups"]
        mask = voco_mask(segments, groups) if compressed else causal_pad_mask(segments)
        answered = answer_positions(batch["labels"])
        pixels = None if batch["pixel_values"] is None else batch["pixel_values"].to(device)
        logits = vlm(batch["input_ids"].to(device), pixels, attn_mask=mask.to(device),
                     position_ids=batch["positions"].to(device), use_cache=False,
                     logits_at=answered.to(device)).logits
        log_probs = F.log_softmax(logits.float(), dim=-1).cpu()
        out += list(log_probs.split(answered.sum(1).tolist()))
    return out


def kl_divergence(p_log: torch.Tensor, q_log: torch.Tensor) -> torch.Tensor:
    """KL(p || q) = sum_v p(v) (log p(v) - log q(v)) in nats, over the last dimension of two log-probability
    tensors of the same shape."""
    return (p_log.exp() * (p_log - q_log)).sum(-1)


def answer_kl(teacher: list[torch.Tensor], student: list[torch.Tensor], types: list) -> dict:
    """The KL from the teacher's answer distributions to the student's (answer_log_probs of each, on the same
    records): per record the mean over its answer's tokens, then {"overall": mean over records, "by_type",
    "per_question": the records' KLs, in order}. The two must have read the same answer tokens with the same
    tokenizer; a student whose vocabulary has one more token at its end (its <voco>) is compared on the teacher's."""
    per_question = []
    for i, (t, s) in enumerate(zip(teacher, student, strict=True)):
        if s.shape[-1] == t.shape[-1] + 1 and s.shape[:-1] == t.shape[:-1]:
            # the student's <voco>, appended after the teacher's vocabulary (a plain LLM's upper bound, e.g.
            # SmolLM2's, has none): both compared on the teacher's vocabulary, the student's renormalised on it
            s = s[..., :t.shape[-1]] - s[..., :t.shape[-1]].logsumexp(-1, keepdim=True)
        if t.shape != s.shape:
            raise ValueError(f"record {i}: the teacher's answer distributions have shape {tuple(t.shape)}, the "
                             f"student's {tuple(s.shape)}: they need the same tokenizer (the student trained from "
                             f"the teacher's checkpoint)")
        per_question.append(kl_divergence(t, s).mean().item())
    by_type = {}
    for kind, kl in zip(types, per_question, strict=True):
        by_type.setdefault(kind or "all", []).append(kl)
    return {"overall": sum(per_question) / max(1, len(per_question)),
            "by_type": {k: sum(v) / len(v) for k, v in sorted(by_type.items())}, "per_question": per_question}
