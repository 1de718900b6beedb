"""Inference speed: nanovoco's `Llama` vs transformers' `LlamaForCausalLM`, same weights and prompt, in one run.

    python -m benchmarks.infer_vs_transformers                       # fp32, CPU
    python -m benchmarks.infer_vs_transformers --bf16                # bf16 weights
    python -m benchmarks.infer_vs_transformers --device cuda --bf16  # on a GPU
    python -m benchmarks.infer_vs_transformers --fast                # + nanovoco's compiled static-cache decode
    add --out docs/benchmarks.md to append the result table there (run from the repository root)

One random transformers model (attn_implementation="sdpa") is saved with save_pretrained and loaded into nanovoco
with `Llama.from_pretrained`, so both hold identical weights (checked in fp32: equal logits, then equal greedy
tokens). Measured on one prompt of random ids:
(a) prefill: one forward over the prompt, logits of every prompt token and the KV cache (nanovoco `llm(ids)`,
    transformers `model(input_ids=ids)`);
(b) greedy generation with the KV cache: `nanovoco.generate.generate` vs `model.generate(do_sample=False,
    max_new_tokens=N, min_new_tokens=N, eos_token_id=None)`, for N new tokens and for 1 new token. A decode step's
    time is (t(N) - t(1)) / (N - 1), which leaves out the prefill of the prompt (the two prefill differently:
    transformers' generate computes the logits of the last prompt token only, nanovoco's of every prompt token).
With --fast, "nanovoco fast" is `generate(..., fast=True)`: the same prefill, then gpt-fast's decode (a static KV
cache and a torch.compile'd step, generate.static_decoder), checked to give the eager path's tokens. Each decode
time stands next to its memory-bandwidth limit on this machine: the bytes a decode step must read (all weights,
and the cache at mid-generation) over the bandwidth of a large copy measured in the same run.
The implementations are timed in alternating rounds (A B, B A, ...); the table reports medians over rounds.
"""
import statistics
import tempfile
import time

import torch
import transformers
from tqdm import tqdm

from nanovoco import cli
from nanovoco.repro.bench import machine, publish, sync
from nanovoco.generate import generate
from nanovoco.model import Llama

NAMES = ("transformers", "nanovoco")


def parse_args():
    p = cli.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=8, help="< --heads: grouped-query attention")
    p.add_argument("--intermediate", type=int, default=688)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--prompt", type=int, default=640, help="prompt tokens (batch 1)")
    p.add_argument("--new", type=int, default=64, help="new tokens generated greedily")
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--bf16", action="store_true", help="both models in bfloat16 (the parity checks run in fp32 first)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--fast", action="store_true", help="also time nanovoco's compiled static-cache decode")
    p.add_argument("--out", help="append the markdown section to this file")
    return p.parse_args()


def prefill(name, model, ids):
    return model(ids).logits if name.startswith("nanovoco") else model(input_ids=ids).logits


def bandwidth(device, n_bytes=512 * 2 ** 20, rounds=5) -> float:
    """Bytes per second a large copy moves (each byte read once and written once)."""
    src = torch.empty(n_bytes, dtype=torch.uint8, device=device).fill_(1)
    dst = torch.empty_like(src)
    return 2 * n_bytes / statistics.median(timed(device, lambda: dst.copy_(src)) / 1000 for _ in range(rounds))


def greedy(name, model, ids, new) -> list[int]:
    if name.startswith("nanovoco"):
        return generate(model, ids, max_new_tokens=new, fast=name == "nanovoco fast")[0]
    out = model.generate(ids, do_sample=False, max_new_tokens=new, min_new_tokens=new, eos_token_id=None)
    return out[0, ids.shape[1]:].tolist()


def timed(device, fn) -> float:
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return (time.perf_counter() - t0) * 1000


@torch.no_grad()
def main():
    args = parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    hf_config = transformers.LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
        max_position_embeddings=max(2048, args.prompt + args.new), attn_implementation="sdpa")
    hf = transformers.LlamaForCausalLM(hf_config).eval()
    with tempfile.TemporaryDirectory() as tmp:
        hf.save_pretrained(tmp)
        ours = Llama.from_pretrained(tmp, device=device).eval()
    names = NAMES + (("nanovoco fast",) if args.fast else ())
    models = {"transformers": hf.to(device), "nanovoco": ours, "nanovoco fast": ours}
    ids = torch.randint(0, args.vocab, (1, args.prompt), device=device)

    # parity in fp32: identical weights and prompt give the same logits and the same greedy tokens
    a, b = (prefill(n, models[n], ids) for n in NAMES)
    diff = (a - b).abs().max().item()
    assert diff < 1e-4, f"logits differ by {diff:.2e}: the two models do not compute the same function"
    tokens = {n: greedy(n, models[n], ids, args.new) for n in NAMES}
    assert tokens["nanovoco"] == tokens["transformers"], "greedy tokens differ in fp32"
    if args.fast:
        assert greedy("nanovoco fast", ours, ids, args.new) == tokens["nanovoco"], "the fast path's tokens differ"
    if args.bf16:
        models = {n: m.to(torch.bfloat16) for n, m in models.items()}
        tokens = {n: greedy(n, models[n], ids, args.new) for n in names}  # also the bf16 warm-up
    same = sum(x == y for x, y in zip(tokens["nanovoco"], tokens["transformers"]))

    med = measure(args, device, models, names, ids)
    lines = report(args, device, ours, names, med, diff, same)
    publish("\n".join(lines) + "\n", args.out)


def measure(args, device, models: dict, names, ids) -> dict:
    """Median milliseconds of prefill, one generated token, N tokens and a decode step, per implementation, over
    interleaved rounds after a warm-up."""
    for name in names:  # warm-up
        prefill(name, models[name], ids)
        greedy(name, models[name], ids, args.new)
    ms = {n: {"prefill": [], "generate 1": [], "generate N": []} for n in names}
    for r in tqdm(range(args.rounds), desc="rounds"):
        for name in (names if r % 2 == 0 else names[::-1]):  # alternate who goes first
            m = models[name]
            ms[name]["prefill"].append(timed(device, lambda: prefill(name, m, ids)))
            ms[name]["generate 1"].append(timed(device, lambda: greedy(name, m, ids, 1)))
            ms[name]["generate N"].append(timed(device, lambda: greedy(name, m, ids, args.new)))
    med = {n: {k: statistics.median(v) for k, v in t.items()} for n, t in ms.items()}
    for n in names:  # per round, so that the prefill of the same round is the one taken out
        med[n]["step"] = statistics.median((g - g1) / (args.new - 1) for g, g1 in
                                           zip(ms[n]["generate N"], ms[n]["generate 1"]))
    return med


def report(args, device, ours, names, med: dict, diff: float, same: int) -> list[str]:
    """The markdown table: times, throughputs, the bandwidth limit of a decode step, and ratios to transformers."""
    N = args.new
    lines = [
        f"### {'bf16' if args.bf16 else 'fp32'}, {'GQA' if args.kv_heads < args.heads else 'MHA'}: "
        f"d={args.hidden}, {args.layers} layers, {args.heads} heads / {args.kv_heads} KV heads, intermediate "
        f"{args.intermediate}, vocab {args.vocab}; prompt 1x{args.prompt}, {N} new tokens",
        "",
        f"{machine(device)}; transformers {transformers.__version__}; {args.rounds} interleaved rounds after 1 "
        f"warm-up; fp32 parity: max |logit diff| {diff:.1e}, {N}/{N} greedy tokens equal"
        + (f"; in bf16 {same}/{N} greedy tokens equal" if args.bf16 else ""),
        "",
        f"| implementation | prefill ms | prefill tokens/s | generate 1 ms | generate {N} ms | "
        f"decode ms/token | decode tokens/s | bandwidth limit ms/token | time ratio: prefill | generate {N} | decode |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    element = next(ours.parameters()).element_size()
    # a decode step reads every weight once, except the embedding table, of which it reads one row (its LM head
    # is a separate matrix here: transformers' default, untied)
    weights = (sum(p.numel() for p in ours.parameters()) - ours.embed_tokens.weight.numel()) * element
    cache = (args.prompt + N // 2) * 2 * args.layers * args.kv_heads * (args.hidden // args.heads) * element
    limit = (weights + cache) / bandwidth(device) * 1000
    for n in names:
        t, ref = med[n], med["transformers"]
        lines.append(f"| {n} | {t['prefill']:.1f} | {args.prompt / t['prefill'] * 1000:,.0f} | "
                     f"{t['generate 1']:.1f} | {t['generate N']:.1f} | "
                     f"{t['step']:.2f} | {1000 / t['step']:,.0f} | {limit:.2f} | "
                     f"{t['prefill'] / ref['prefill']:.3f} | {t['generate N'] / ref['generate N']:.3f} | "
                     f"{t['step'] / ref['step']:.3f} |")
    lines += ["", "time ratio = nanovoco / transformers, below 1 when nanovoco is faster; bandwidth limit = (the "
              f"weights a step reads, {weights / 1e6:.0f} MB + cache at mid-generation {cache / 1e6:.1f} MB) / the "
              "copy bandwidth measured here"]
    return lines


if __name__ == "__main__":
    main()
