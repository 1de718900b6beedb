"""A pretrained LLM without vision: each held-out synthetic scene written out as text, answered zero-shot.

    python -m nanovoco.repro.scene_text --llm checkpoints/smollm2 --data runs/x/data/eval/data.json \
        --out runs/x/zero_shot

What the LLM can do with the questions before it has seen a single image: the scene's objects (colour, shape, centre
in pixels) in a sentence, the question, "Answer with one word.", the answer opened with "The answer is", and of the
answers the question's type has, the one whose first token the LLM ranks highest next (a zero-shot multiple choice).
It is scored as evaluate.score scores a VLM's answer, so the result sits in the repro's tables beside the trained
models (`repro --llm smollm2`, stage `zero_shot`). It is the answer to "does the LLM bring anything": a model that
names the shape of the red object from the text knows how to bind a colour to its object; a VLM must still learn to
read that binding from 64 vision tokens.
"""
import json
import sys
from pathlib import Path

import torch
from tqdm import tqdm

from nanovoco import cli
from nanovoco.data import build_sample, pad_samples, user_text
from nanovoco.evaluate import score
from nanovoco.files import atomic_write, read_json
from nanovoco.model import Llama
from nanovoco.tokenizer import load_tokenizer
from nanovoco.voco import TEXT, causal_pad_mask


def describe(scene: list[dict], image_size: int) -> str:
    """A scene (synthetic.make_scene's objects) as a sentence, with each object's centre in pixels."""
    objects = "; ".join(f"a {o['color']} {o['shape']} centred at x = {o['x']}, y = {o['y']}" for o in scene)
    return (f"A picture of {image_size} x {image_size} pixels (x grows to the right, y grows downwards) shows "
            f"{len(scene)} objects: {objects}.")


ONE_WORD, LEAD = "Answer with one word.", "The answer is"


@torch.no_grad()
def answer(llm: Llama, tokenizer, records: list[dict], image_size: int, batch_size: int = 16,
           progress: bool = True) -> dict:
    """The LLM's choice for each record's (first) question about its scene as text: of the answers that the
    question's type has in these records, the one whose first token it ranks highest after "The answer is:" (a
    zero-shot multiple choice, as evaluation harnesses score one), scored by evaluate.score."""
    llm.eval()
    options = {}
    for r in records:
        options.setdefault(r.get("type"), set()).add(r["conversations"][1]["value"])
    lead = tokenizer.encode(LEAD, bos=False)

    def first_token(answer):  # the answer's first token where it follows the lead, in any tokenizer's spacing
        ids = tokenizer.encode(f"{LEAD} {answer}", bos=False)
        return ids[len(lead)] if ids[:len(lead)] == lead and len(ids) > len(lead) else None

    first_tokens = {}
    for qtype, answers in options.items():
        first_tokens[qtype] = {a: first_token(a) for a in sorted(answers)}
        if None in first_tokens[qtype].values() or len(set(first_tokens[qtype].values())) < len(answers):
            raise ValueError(f"the answers of type {qtype!r} share a first token ({sorted(answers)}): a first-token "
                             f"choice cannot tell them apart")
    samples = []
    for r in records:
        question = f"{describe(r['scene'], image_size)}\n{user_text(r['conversations'][0]['value'])} {ONE_WORD}"
        # text only, with the model's own default system turn: the prompt its instruction tuning saw
        s = build_sample(tokenizer, [(question, None)], None)
        # the answer's first words written for it: the next token is the answer's own
        s.input_ids += lead
        s.segments += [TEXT] * len(lead)
        s.groups += [-1] * len(lead)
        s.positions += range(s.positions[-1] + 1, s.positions[-1] + 1 + len(lead))
        samples.append(s)
    chosen = []
    for start in tqdm(range(0, len(samples), batch_size), desc="scenes as text", disable=not progress,
                      leave=False):
        batch = pad_samples(samples[start:start + batch_size], left=True)  # the last position is every row's own
        logits = llm(batch["input_ids"], attn_mask=causal_pad_mask(batch["segments"]),
                     position_ids=batch["positions"], last_only=True).logits[:, -1]  # (B, vocab)
        for row, r in zip(logits, records[start:start + batch_size]):
            candidates = first_tokens[r.get("type")]
            chosen.append(max(candidates, key=lambda a: row[candidates[a]].item()))
    return score(chosen, [r["conversations"][1]["value"] for r in records], [r.get("type") for r in records])


def main(argv=None):
    p = cli.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--llm", required=True, help="an HF LLaMA directory with its tokenizer (nanovoco.from_gguf's)")
    p.add_argument("--data", required=True, type=Path, help="synthetic.py's data.json (records with their scene)")
    p.add_argument("--out", required=True, type=Path, help="folder for eval.json")
    p.add_argument("--image_size", type=int, default=64, help="the scenes' image size in pixels")
    p.add_argument("--limit", type=int, default=0, help="the first N records only (0: all)")
    args = p.parse_args(argv)
    try:
        records = read_json(args.data, "the held-out questions")
        if not isinstance(records, list) or not all(isinstance(r, dict) and "scene" in r for r in records):
            raise ValueError(f"{args.data}: records need their 'scene' (a synthetic.py set, not LLaVA data)")
        records = records[:args.limit] if args.limit else records
        llm, tokenizer = Llama.from_pretrained(args.llm), load_tokenizer(args.llm)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    result = answer(llm, tokenizer, records, args.image_size)
    args.out.mkdir(parents=True, exist_ok=True)
    text = json.dumps(result)
    atomic_write(args.out / "eval.json", lambda tmp: Path(tmp).write_text(text))
    print(f"zero-shot, scenes as text: {result['overall']:.3f} on {result['n']} questions: {result['by_type']}")


if __name__ == "__main__":
    main()
