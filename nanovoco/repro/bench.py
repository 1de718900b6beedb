"""The paper's Table 7 (inference efficiency): what one question about an already-seen image costs, three ways.

    python -m nanovoco.repro.bench                              # tiny random model, measured on the CPU
    python -m nanovoco.repro.bench --size 135m                  # SmolLM2-135M's LLM with 576 image tokens, on the CPU
    python -m nanovoco.repro.bench --size 7b                    # LLaMA-7B + CLIP-L/336 shapes: analytic bytes and FLOPs
    python -m nanovoco.repro.bench --size 7b --device cuda      # ... and measured with random bf16 weights
    add --out FILE to append the tables (with a machine line) to FILE

One image, one question of --text_tokens tokens, three methods:
- baseline: no cache; the question runs with the whole uncompressed LLaVA prompt [BOS] [vision x N] ["\\n"] [text]
  under a causal mask;
- full caching: the keys/values of [BOS] [vision x N] ["\\n"] at every layer are kept; the question runs only its
  text over them, at the positions after the prefix;
- VoCo cache: voco_cache.compress keeps the K VoCo tokens per layer; voco_cache.answer runs the text over them.
Stage 2 is one question's prefill: one forward over its tokens, up to the logits of its first answer token (and the
cache grown by the text, for decoding). Stage 1 (the vision tower, the caches) is done once and not timed; the
baseline gets the image's embeddings precomputed, so no method runs the vision tower in stage 2. Decoding after it
is timed on its own, per generated token (greedy, --decode_tokens of them): compressing the prefix makes the
question's prefill cheaper, but a decoded token reads the whole cache, and that saves per token only what reading
P - K fewer keys costs, which is little next to the weights unless the cache is long.
"""
from __future__ import annotations

import platform
import statistics
import time
from datetime import date
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count
from tqdm import tqdm

from nanovoco.config import CLIPVisionConfig, LlamaConfig, VoCoLlamaConfig, preset
from nanovoco import cli, generate
from nanovoco.init import init_weights
from nanovoco.model import VoCoLlama
from nanovoco.voco import Layout, compress_prefix
from nanovoco.voco_cache import answer, compress

METHODS = ("baseline", "full caching", "VoCo cache")
# Table 7 of the paper (LLaVA-1.5-7B, K=1): KV cache length, storage (MB), CUDA time (ms), FLOPs (T)
PAPER = {"baseline": (None, None, 440.5, 9.6), "full caching": (576, 302.4, 154.9, 1.2),
         "VoCo cache": (1, 0.525, 134.0, 0.5)}


class SpecialIds:
    """What voco.compress_prefix asks of a tokenizer: the BOS ids and the ids of "\n", here LLaMA's (1 and <0x0A>,
    13). The benchmark runs on random weights, where the ids change no timing, so it needs no tokenizer file."""
    bos_ids = [1]

    def encode(self, text: str, bos: bool = False) -> list[int]:
        assert text == "\n" and not bos, "only the prefix's newline is encoded here"
        return [13]


SIZES = ("tiny", "135m", "7b")


def configure(size: str, num_voco: int = 1) -> VoCoLlamaConfig:
    """tiny: preset("tiny") with a 512-token vocabulary; 135m: SmolLM2-135M's LLM (30 layers, width 576, 9 query
    and 3 KV heads, vocabulary 49,152 + <voco>) with 576 image tokens, as LLaVA-1.5's CLIP-L/336 gives, from a small
    tower (stage 2 never runs it); 7b: LLaVA-1.5-7B's shapes, Vicuna's 32,000 tokens + <voco>."""
    if size == "tiny":
        config = preset("tiny", 512)
    elif size == "135m":
        config = VoCoLlamaConfig(
            text=LlamaConfig(vocab_size=49153, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                             num_attention_heads=9, num_key_value_heads=3, rope_theta=100000.0,
                             max_position_embeddings=8192, tie_word_embeddings=True),
            vision=CLIPVisionConfig(hidden_size=64, intermediate_size=256, num_hidden_layers=1, num_attention_heads=4,
                                    image_size=336, patch_size=14))
    else:
        config = preset("llava-7b", 32001)
    config.num_voco, config.voco_token_id = num_voco, config.text.vocab_size - 1
    return config


def random_model(config: VoCoLlamaConfig, device="cpu", dtype=torch.float32) -> VoCoLlama:
    """Random weights, allocated once: built on `meta`, materialised on the device in dtype, then initialised as a
    model trained from scratch is (init.init_weights). A 7B model needs this on one GPU: an fp32 CPU copy first
    would need 28 GB."""
    with torch.device("meta"):
        vlm = VoCoLlama(config)
    vlm = vlm.to(dtype).to_empty(device=device).eval()
    init_weights(vlm)
    return vlm


def stages(vlm: VoCoLlama, pixels, text_ids) -> dict:
    """Run every method's stage 1 on pixels (1, 3, H, W); return {method: (stage 2 as a call -> Output, its cache,
    the question's last position)}. text_ids (1, T) is the question, the same for all three."""
    c = vlm.config
    prefix = compress_prefix(SpecialIds(), Layout.of(c))
    image_prefix = prefix[:len(prefix) - c.num_voco]  # [BOS] [image x N] [\n]: what the uncompressed methods keep
    llm = vlm.llm
    with torch.no_grad():
        image = vlm.embed(torch.tensor([image_prefix], device=pixels.device), pixels)  # (1, P, D): the tower, once
        full = llm(inputs_embeds=image).cache  # per layer (1, n_kv_heads, P, head_dim)
        voco = compress(vlm, pixels, torch.tensor(prefix))
    P, T = len(image_prefix), text_ids.shape[1]
    return {"baseline": (lambda: llm(inputs_embeds=torch.cat([image, llm.embed_tokens(text_ids)], 1)), None,
                         P + T - 1),
            "full caching": (lambda: llm(text_ids, cache=full), full, P + T - 1),  # causal, positions P, P+1, ...
            "VoCo cache": (lambda: answer(vlm, voco, text_ids), voco.kv, voco.next_position + T - 1)}


def decode(llm, out, last_position: int, n: int) -> list[int]:
    """n greedy tokens after a stage-2 prefill (out: its logits and cache), with n decode steps (generate.decode's
    loop, asked for one token more: it runs no step after the last token it yields), each seeing the whole cache:
    every cached key is visible to generated text in all three methods."""
    visible = torch.ones(1, out.cache[0][0].shape[2], dtype=torch.bool, device=out.logits.device)
    steps = generate.decode(llm, out, torch.tensor([last_position], device=out.logits.device), visible,
                            max_new_tokens=n + 1, temperature=0.0, top_p=1.0, eos_id=None, generator=None)
    return torch.cat(list(steps)).tolist()[:n]


def llm_flops(c: LlamaConfig, tokens: int, keys: int) -> int:
    """Matmul FLOPs (2 per multiply-add) of one LLM forward over `tokens` new tokens that attend to `keys` keys
    (cached + new). Counted: the q/k/v/o projections, the SwiGLU MLP (gate, up, down), the LM head (forward makes
    logits for every token) and attention's two matmuls, q k^T and probs v, over every (query, key) pair: SDPA with
    a mask computes the masked pairs too. Not counted, as FlopCounterMode does not count them: norms, RoPE, softmax,
    SiLU, residual adds, the embedding lookup."""
    d, hd = c.hidden_size, c.head_dim
    qkvo = 2 * tokens * d * hd * (2 * c.num_attention_heads + 2 * c.num_key_value_heads)  # q, o: all heads; k, v: KV
    mlp = 2 * tokens * 3 * d * c.intermediate_size
    attention = 2 * 2 * tokens * keys * hd * c.num_attention_heads  # GQA: every query head does its own products
    return c.num_hidden_layers * (qkvo + mlp + attention) + 2 * tokens * d * c.vocab_size


def kv_bytes_per_token(c: LlamaConfig, bytes_per_value: int = 2) -> int:
    return 2 * c.num_hidden_layers * c.num_key_value_heads * c.head_dim * bytes_per_value  # k and v, every layer


def analytic_rows(config: VoCoLlamaConfig, text_tokens: int = 40, num_voco: int = 1, bytes_per_value: int = 2):
    """Table 7 from the shapes alone: cache bytes (default fp16) and stage-2 FLOPs (llm_flops) of each method."""
    N, T, K = config.num_image_tokens, text_tokens, num_voco
    P = N + 2  # [BOS] [vision x N] ["\n"]
    shapes = {"baseline": (N, 0, P + T, P + T), "full caching": (N, P, T, P + T), "VoCo cache": (K, K, T, K + T)}
    return [dict(method=m, source="analytic", image_tokens=n, cache_tokens=cached,
                 cache_bytes=cached * kv_bytes_per_token(config.text, bytes_per_value),
                 flops=llm_flops(config.text, tokens, keys)) for m, (n, cached, tokens, keys) in shapes.items()]


def count_flops(call) -> int:
    """FlopCounterMode's count of one call. Its registry lacks the CPU SDPA kernel, so that one gets torch's own
    SDPA formula (the one it uses for the CUDA kernels)."""
    cpu_sdpa = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu:
                lambda q, k, v, *args, out_shape=None, **kwargs: sdpa_flop_count(q, k, v)}
    with FlopCounterMode(display=False, custom_mapping=cpu_sdpa) as counter:
        call()
    return counter.get_total_flops()


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(vlm: VoCoLlama, text_tokens: int = 40, repeats: int = 20, seed: int = 0, decode_tokens: int = 16,
            progress: bool = True) -> list[dict]:
    """Time and count every method's stage 2 (and, per token, decoding after it) on vlm's device: interleaved
    rounds (the order alternates, so machine noise hits all alike), median over rounds."""
    param = next(vlm.parameters())
    device, c = param.device, vlm.config
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randn(1, 3, c.vision.image_size, c.vision.image_size, generator=g).to(device)
    text_ids = torch.randint(3, c.text.vocab_size - 1, (1, text_tokens), generator=g).to(device)
    methods = stages(vlm, pixels, text_ids)
    ms, decode_ms = {m: [] for m in methods}, {m: [] for m in methods}
    with torch.no_grad():
        counted = {m: count_flops(call) for m, (call, _, _) in methods.items()}  # also the warm-up
        for r in tqdm(range(repeats), desc="timing rounds", disable=not progress):
            for m in (METHODS if r % 2 == 0 else METHODS[::-1]):
                call, _, last = methods[m]
                sync(device)
                t0 = time.perf_counter()
                out = call()
                sync(device)
                t1 = time.perf_counter()
                decode(vlm.llm, out, last, decode_tokens)
                sync(device)
                ms[m].append((t1 - t0) * 1000)
                decode_ms[m].append((time.perf_counter() - t1) * 1000 / decode_tokens)
    source = f"measured on {device.type}, {str(param.dtype).removeprefix('torch.')}, random weights"
    rows = analytic_rows(c, text_tokens, c.num_voco, param.element_size())
    for row in rows:
        kv = methods[row["method"]][1] or []
        row.update(source=source, cache_tokens=kv[0][0].shape[2] if kv else 0,
                   cache_bytes=sum(t.nbytes for pair in kv for t in pair),
                   time_ms=statistics.median(ms[row["method"]]), flops_counted=counted[row["method"]],
                   decode_ms=statistics.median(decode_ms[row["method"]]))
    return rows


def report(size="tiny", device="cpu", dtype=None, text_tokens=40, num_voco=1, repeats=20, decode_tokens=16,
           progress=True) -> list[dict]:
    """The rows of Table 7: analytic ones for 7b; measured ones for tiny and 135m (any device) and for 7b on CUDA."""
    config = configure(size, num_voco)
    rows = analytic_rows(config, text_tokens, num_voco) if size == "7b" else []
    if size != "7b" or torch.device(device).type == "cuda":
        torch.manual_seed(0)
        dtype = dtype or (torch.bfloat16 if size == "7b" else torch.float32)
        rows += measure(random_model(config, device, dtype), text_tokens, repeats, decode_tokens=decode_tokens,
                        progress=progress)
    return rows


def _less(x, ref) -> str:
    """The reduction from ref to x, as Table 7's Δ columns show it; "-" where there is nothing to compare."""
    return "-" if x is None or ref is None else f"{1 - x / ref:.1%}"


def markdown(rows: list[dict]) -> str:
    """One table per source (analytic, measured) with Table 7's columns, "-" where a method has no value."""
    out = []
    for source in dict.fromkeys(r["source"] for r in rows):
        t = {r["method"]: r for r in rows if r["source"] == source}
        base, full = t["baseline"], t["full caching"]
        unit, scale = next((u, s) for u, s in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1)) if base["flops"] >= s)
        out += [f"**{source}**", "", "| method | image tokens | KV cache length | cache storage (MB) | Δ vs full "
                f"caching | stage-2 time (ms) | Δ vs baseline | decode (ms/token) | FLOPs counted ({unit}) | FLOPs "
                f"analytic ({unit}) | Δ vs baseline |", "|---|" + "---:|" * 10]
        for m, r in t.items():
            cached, time_ms, counted = m != "baseline", r.get("time_ms"), r.get("flops_counted")
            cells = [m, r["image_tokens"], r["cache_tokens"] if cached else "-",
                     f"{r['cache_bytes'] / 1e6:.3f}" if cached else "-",
                     _less(r["cache_bytes"], full["cache_bytes"]) if m == "VoCo cache" else "-",
                     "-" if time_ms is None else f"{time_ms:.2f}",
                     _less(time_ms, base.get("time_ms")) if cached else "-",
                     "-" if r.get("decode_ms") is None else f"{r['decode_ms']:.2f}",
                     "-" if counted is None else f"{counted / scale:.3f}", f"{r['flops'] / scale:.3f}",
                     _less(r["flops"], base["flops"]) if cached else "-"]
            out.append("| " + " | ".join(map(str, cells)) + " |")
        out.append("")
    return "\n".join(out)


def paper_table(config: VoCoLlamaConfig, rows: list[dict]) -> str:
    """Ours next to Table 7's numbers. The paper counts the 576 vision tokens as full caching's cache (ours keeps
    BOS and "\\n" too: 578), so the storage lines compare like with like: 576 tokens and 1 token, fp16."""
    per_token = kv_bytes_per_token(config.text, 2)
    analytic = {r["method"]: r for r in rows if r["source"] == "analytic"}
    lines = ["| quantity | nanovoco | paper (Table 7) | difference |", "|---|---:|---:|---:|"]
    for m, tokens, what in (("full caching", 576, "576 vision tokens"), ("VoCo cache", 1, "1 VoCo token")):
        ours, paper = tokens * per_token / 1e6, PAPER[m][1]
        shown = f"{ours:.1f}" if ours >= 1 else f"{ours:.3f}"  # 302.0 MB, 0.524 MB
        lines.append(f"| KV cache of {what}, fp16 (MB) | {shown} ({tokens * per_token:,} B) | {paper} | "
                     f"{ours / paper - 1:+.2%} |")
    for m in METHODS:
        ours = analytic[m]["flops"] / 1e12
        lines.append(f"| stage-2 FLOPs (T), {m}, analytic | {ours:.3f} | {PAPER[m][3]} | "
                     f"{ours / PAPER[m][3] - 1:+.1%} |")
    for r in rows:
        if r["source"].startswith("measured on cuda"):
            lines.append(f"| stage-2 time (ms), {r['method']}, {r['source']} | {r['time_ms']:.2f} | "
                         f"{PAPER[r['method']][2]} | {r['time_ms'] / PAPER[r['method']][2] - 1:+.1%} |")
    return "\n".join(lines) + "\n"


def machine(device="cpu") -> str:
    """A line saying where numbers come from: the accelerator or CPU model and threads, torch, the date."""
    device = torch.device(device)
    if device.type == "cuda":
        where = torch.cuda.get_device_name(device)
    else:
        cpuinfo = Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []
        name = next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")),
                    platform.processor() or "unknown CPU")
        where = f"{name}, {torch.get_num_threads()} threads"
    return f"{where}; torch {torch.__version__}; {date.today()}"


def publish(text: str, out=None):
    """Print a benchmark's tables, and append them to the file `out` (e.g. docs/benchmarks.md) if given."""
    print("\n" + text)
    if out:
        with open(out, "a") as f:
            f.write("\n" + text)


def main():
    p = cli.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", choices=SIZES, default="tiny")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"),
                   help="measured runs; default float32 for tiny and 135m, bfloat16 for 7b")
    p.add_argument("--text_tokens", type=int, default=40, help="the question's length (the text after the image)")
    p.add_argument("--num_voco", type=int, default=1, help="K, VoCo tokens per image (Table 7: 1)")
    p.add_argument("--repeats", type=int, default=20, help="timing rounds; the median is reported")
    p.add_argument("--decode_tokens", type=int, default=16, help="greedy tokens decoded after each stage 2, timed "
                   "per token")
    p.add_argument("--out", help="append the tables to this file")
    args = p.parse_args()
    if min(args.text_tokens, args.num_voco, args.repeats, args.decode_tokens) < 1:
        p.error("--text_tokens, --num_voco, --repeats and --decode_tokens must be >= 1")
    rows = report(args.size, args.device, args.dtype and getattr(torch, args.dtype), args.text_tokens,
                  args.num_voco, args.repeats, args.decode_tokens)
    config = configure(args.size, args.num_voco)
    header = (f"{machine(args.device)}; {config.num_image_tokens} image tokens, {args.text_tokens} text tokens, "
              f"K = {args.num_voco}; " + (f"{args.repeats} interleaved timing rounds, median; decode: "
                                          f"{args.decode_tokens} greedy tokens" if any(
                  "time_ms" in r for r in rows) else "analytic only (measured with --device cuda)"))
    text = header + "\n\n" + markdown(rows) + ("\n" + paper_table(config, rows) if args.size == "7b" else "")
    publish(text, args.out)


if __name__ == "__main__":
    main()
