"""Training throughput: nanovoco's `Llama` vs transformers' `LlamaForCausalLM`, same weights, batch and VoCo mask.

    python -m benchmarks.train_throughput                          # fp32, MHA (8 KV heads)
    python -m benchmarks.train_throughput --kv-heads 2             # fp32, GQA (4 query heads per KV head)
    python -m benchmarks.train_throughput --bf16                   # bf16 autocast, MHA
    python -m benchmarks.train_throughput --device cuda --bf16     # on a GPU
    add --out docs/benchmarks.md to append the result table there (run from the repository root: `-m` puts it on
    the import path, so nanovoco need not be installed)

One random transformers model (attn_implementation="sdpa") is saved with save_pretrained and loaded into nanovoco
with `Llama.from_pretrained`, so both hold identical weights (checked: equal logits). Both get the same random batch,
the same explicit (B, 1, L, L) boolean VoCo mask (voco.voco_mask: per row 64 vision, 2 VoCo, the rest text) and
explicit position ids. One training step = forward, cross-entropy on shifted labels (fp32 logits), backward, AdamW
step, zero_grad. The two implementations are timed in alternating rounds (A B, B A, ...), so that machine noise hits
both alike; the table reports the median per-step time over rounds.
"""
import platform
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

from nanovoco import cli
from nanovoco.repro.bench import publish
from nanovoco.model import Llama
from nanovoco.voco import TEXT, VISION, VOCO, voco_mask


def parse_args():
    p = cli.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=8, help="< --heads: grouped-query attention")
    p.add_argument("--intermediate", type=int, default=688)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--vision", type=int, default=64, help="VISION tokens at the start of each row")
    p.add_argument("--voco", type=int, default=2, help="VoCo tokens after them; the rest of the row is text")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per implementation")
    p.add_argument("--steps", type=int, default=5, help="timed steps per implementation per round")
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--bf16", action="store_true", help="torch.autocast to bfloat16 (weights and AdamW stay fp32)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", help="append the markdown section to this file")
    return p.parse_args()


def make_batch(args, device):
    """Random ids, the VoCo mask from segment labels and explicit position ids: (B, L), (B, 1, L, L), (B, L)."""
    B, L, n = args.batch, args.seq, args.vision + args.voco
    ids = torch.randint(0, args.vocab, (B, L), device=device)
    segments = torch.full((B, L), TEXT, device=device)
    segments[:, :args.vision], segments[:, args.vision:n] = VISION, VOCO
    groups = torch.full((B, L), -1, device=device)
    groups[:, :n] = 0  # one compression group: the image and its VoCo tokens
    mask = voco_mask(segments, groups)  # (B, 1, L, L) bool, True = may attend
    position_ids = torch.arange(L, device=device).expand(B, L)
    return ids, mask, position_ids


def logits_of(name, model, ids, mask, pos):
    if name == "nanovoco":
        return model(ids, attn_mask=mask, position_ids=pos).logits
    return model(input_ids=ids, attention_mask=mask, position_ids=pos).logits


def train_step(name, model, opt, ids, mask, pos, autocast):
    with autocast:
        logits = logits_of(name, model, ids, mask, pos)  # (B, L, vocab)
    # next-token loss in fp32, computed the same way for both (transformers' own `labels=` path is not used)
    loss = F.cross_entropy(logits[:, :-1].float().flatten(0, 1), ids[:, 1:].flatten())
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def main():
    args = parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    hf_config = transformers.LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
        max_position_embeddings=max(2048, args.seq), attn_implementation="sdpa")
    hf = transformers.LlamaForCausalLM(hf_config)
    with tempfile.TemporaryDirectory() as tmp:
        hf.save_pretrained(tmp)
        ours = Llama.from_pretrained(tmp, device=device)
    models = {"transformers": hf.to(device).train(), "nanovoco": ours.train()}
    ids, mask, pos = make_batch(args, device)

    with torch.no_grad():  # sanity: identical weights and inputs give the same logits (fp32)
        a, b = (logits_of(n, m, ids, mask, pos) for n, m in models.items())
        diff = (a - b).abs().max().item()
        assert diff < 1e-4, f"logits differ by {diff:.2e}: the two models do not compute the same function"

    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if args.bf16 else nullcontext()
    opts = {n: torch.optim.AdamW(m.parameters(), lr=1e-4) for n, m in models.items()}
    for name, model in models.items():
        for _ in range(args.warmup):
            train_step(name, model, opts[name], ids, mask, pos, autocast)
    sync(device)

    ms = {name: [] for name in models}  # per-step milliseconds, one entry per round
    for r in tqdm(range(args.rounds), desc="rounds"):
        order = list(models) if r % 2 == 0 else list(models)[::-1]  # alternate who goes first
        for name in order:
            sync(device)
            t0 = time.perf_counter()
            for _ in range(args.steps):
                train_step(name, models[name], opts[name], ids, mask, pos, autocast)
            sync(device)
            ms[name].append((time.perf_counter() - t0) * 1000 / args.steps)

    tokens = args.batch * args.seq
    median = {n: statistics.median(v) for n, v in ms.items()}
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"{cpu_model()}, {torch.get_num_threads()} threads"
    lines = [
        f"### {'bf16 autocast' if args.bf16 else 'fp32'}, {'GQA' if args.kv_heads < args.heads else 'MHA'}: "
        f"d={args.hidden}, {args.layers} layers, {args.heads} heads / {args.kv_heads} KV heads, "
        f"intermediate {args.intermediate}, vocab {args.vocab}, batch {args.batch}x{args.seq}",
        "",
        f"{where}; torch {torch.__version__}, transformers {transformers.__version__}; {date.today()}; "
        f"{args.rounds} interleaved rounds of {args.steps} steps after {args.warmup} warm-up steps; "
        f"max |logit diff| before training {diff:.1e}",
        "",
        "| implementation | ms/step (median) | min-max over rounds | tokens/s | nanovoco / transformers time |",
        "|---|---:|---:|---:|---:|",
    ]
    for name in ("transformers", "nanovoco"):
        ratio = median[name] / median["transformers"]
        lines.append(f"| {name} | {median[name]:.1f} | {min(ms[name]):.1f}-{max(ms[name]):.1f} | "
                     f"{tokens / median[name] * 1000:,.0f} | {ratio:.3f} |")
    text = "\n".join(lines) + "\n"
    publish(text, args.out)


if __name__ == "__main__":
    main()
