"""Every CUDA-only path in one run, for the rare session that is lent a GPU (<= 8 minutes on one H100/H200).

    python -m benchmarks.gpu_check --out $OUT/gpu_check.md      # on the GPU machine, from the repository root

Each part runs on its own (a failure is written into the report and the next part runs):
1. parity in bf16 on CUDA: nanovoco's Llama against transformers' LlamaForCausalLM on the same random weights and
   the same VoCo mask, and two-stage VoCo inference against one masked pass;
2. the SDPA kernel PyTorch actually runs for a bool mask with grouped-query attention (`enable_gqa=True`), at
   LLaMA-7B's head shape, from the profiler's kernel names;
3. train.py under torchrun on NCCL (one process: the CUDA path of the loop, bf16 autocast, fused AdamW) for a few
   steps of the synthetic task, its losses against the same run on the CPU;
4. Table 7 at 7B with random bf16 weights (`nanovoco.repro.bench --size 7b --device cuda`), next to the paper's times;
5. decoding against transformers (`benchmarks.infer_vs_transformers --device cuda --bf16`);
6. the training MFU of a ~1B LLaMA shape (bf16 autocast, fp32 weights, AdamW): model FLOPs per second over the
   GPU's dense bf16 peak (--peak_tflops, default 989: H100 SXM and H200).
The report is markdown with the device's name, torch's version and the date, for docs/benchmarks.md.
"""
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

from nanovoco import cli

ROOT = Path(__file__).resolve().parents[1]


def parity_bf16() -> str:
    import transformers

    from nanovoco.config import preset
    from nanovoco.model import Llama, VoCoLlama
    from nanovoco.repro.bench import SpecialIds
    from nanovoco.voco import TEXT, VISION, VOCO, Layout, compress_prefix, voco_mask
    from nanovoco.voco_cache import answer, compress

    lines = []
    torch.manual_seed(0)
    hf_config = transformers.LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                                         num_attention_heads=8, num_key_value_heads=2, attn_implementation="sdpa")
    with tempfile.TemporaryDirectory() as tmp:
        transformers.LlamaForCausalLM(hf_config).save_pretrained(tmp)
        hf = transformers.LlamaForCausalLM.from_pretrained(tmp, dtype=torch.bfloat16).cuda().eval()
        ours = Llama.from_pretrained(tmp, dtype=torch.bfloat16, device="cuda").eval()
    ids = torch.randint(3, 500, (2, 96), device="cuda")
    segments = torch.tensor([VISION] * 64 + [VOCO] * 2 + [TEXT] * 30, device="cuda").expand(2, -1)
    groups = torch.where(segments == TEXT, -1, 0)
    mask = voco_mask(segments, groups)
    with torch.no_grad():
        ref = hf(ids, attention_mask=mask.expand(-1, 1, -1, -1)).logits.float()  # a 4D bool mask, as HF takes it
        got = ours(ids, attn_mask=mask).logits.float()
    diff = (ref - got).abs().max().item()
    lines.append(f"- Llama vs transformers, bf16, VoCo mask, GQA 8/2: max |logit difference| {diff:.3g} "
                 f"(logits up to {ref.abs().max().item():.2f}); argmax agreement "
                 f"{(ref.argmax(-1) == got.argmax(-1)).float().mean().item():.4f}")
    config = preset("tiny", 512)
    config.num_voco, config.voco_token_id = 2, 511
    vlm = VoCoLlama(config).to("cuda", torch.bfloat16).eval()
    pixels = torch.randn(1, 3, 56, 56, device="cuda", dtype=torch.bfloat16)
    prefix = compress_prefix(SpecialIds(), Layout(config.image_token_id, config.num_image_tokens, 511, 2))
    text = torch.randint(3, 500, (1, 20), device="cuda")
    with torch.no_grad():
        two_stage = answer(vlm, compress(vlm, pixels, torch.tensor(prefix, device="cuda")), text).logits.float()
        full_ids = torch.cat([torch.tensor([prefix], device="cuda"), text], 1)
        seg = torch.tensor([[VISION] * (len(prefix) - 2) + [VOCO] * 2 + [TEXT] * 20], device="cuda")
        one_pass = vlm(full_ids, pixels, attn_mask=voco_mask(seg, torch.where(seg == TEXT, -1, 0))).logits.float()
    diff = (two_stage - one_pass[:, len(prefix):]).abs().max().item()
    lines.append(f"- two-stage VoCo inference vs one masked pass, bf16: max |logit difference| {diff:.3g}")
    return "\n".join(lines)


def sdpa_kernel() -> str:
    from torch.profiler import ProfilerActivity, profile
    B, H, KV, L, D = 1, 32, 8, 640, 128
    q = torch.randn(B, H, L, D, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(B, KV, L, D, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    mask = torch.ones(L, L, dtype=torch.bool, device="cuda").tril()[None, None]
    lines = []
    for name, kwargs in (("bool mask, GQA", dict(attn_mask=mask, enable_gqa=True)), ("is_causal, GQA",
                                                                                     dict(is_causal=True,
                                                                                          enable_gqa=True))):
        F.scaled_dot_product_attention(q, k, v, **kwargs)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            F.scaled_dot_product_attention(q, k, v, **kwargs)
            torch.cuda.synchronize()
        kernels = sorted({e.key for e in prof.key_averages() if e.device_type.name == "CUDA"})
        lines.append(f"- {name} ({H} query heads, {KV} KV heads, {L} tokens, head_dim {D}, bf16): "
                     + ", ".join(f"`{k[:80]}`" for k in kernels))
    return "\n".join(lines)


def run(cmd, timeout=240, env=None) -> str:
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})
    if done.returncode:
        raise RuntimeError(f"{' '.join(map(str, cmd))} exited {done.returncode}: {done.stderr[-1500:]}")
    return done.stdout


def train_nccl() -> str:
    import json
    with tempfile.TemporaryDirectory() as tmp:
        run([sys.executable, "-m", "nanovoco.repro.synthetic", "--out", f"{tmp}/data", "--n_images", "64",
             "--held_out", "2", "--image_size", "56"])
        args = ["--preset=tiny-cpu", f"--data={tmp}/data/train/data.json", f"--eval_data={tmp}/data/eval/data.json",
                "--batch_size=8", "--micro_batch_size=4", "--max_steps=6", "--eval_limit=8"]
        run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", "train.py", *args,
             f"--out_dir={tmp}/cuda"])
        run([sys.executable, "train.py", *args, f"--out_dir={tmp}/cpu"], env={"CUDA_VISIBLE_DEVICES": ""})
        losses = {where: [json.loads(x)["loss"] for x in Path(f"{tmp}/{where}/log.jsonl").read_text().splitlines()]
                  for where in ("cuda", "cpu")}
    runs = (("`torchrun --nproc_per_node=1 train.py`, NCCL, bf16 autocast", "cuda"),
            ("`train.py` on the CPU, fp32", "cpu"))
    return "\n".join(f"- {name}: losses " + ", ".join(f"{x:.4f}" for x in losses[where]) for name, where in runs)


def table7() -> str:
    return run([sys.executable, "-m", "nanovoco.repro.bench", "--size", "7b", "--device", "cuda", "--repeats", "20"])


def decode() -> str:
    return run([sys.executable, "-m", "benchmarks.infer_vs_transformers", "--device", "cuda", "--bf16"], 300)


def mfu(peak_tflops: float) -> str:
    from nanovoco.config import LlamaConfig
    from nanovoco.model import Llama
    c = LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5504, num_hidden_layers=16,
                    num_attention_heads=16, num_key_value_heads=16, max_position_embeddings=2048)
    llm = Llama(c).cuda()
    n_params = sum(p.numel() for p in llm.parameters())
    opt = torch.optim.AdamW(llm.parameters(), lr=1e-4, fused=True)
    B, L = 8, 1024
    ids = torch.randint(0, c.vocab_size, (B, L), device="cuda")

    def step():
        with torch.autocast("cuda", torch.bfloat16):
            logits = llm(ids, use_cache=False).logits
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    t0, n = time.perf_counter(), 10
    for _ in range(n):
        step()
    torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / n
    flops_per_token = 6 * n_params + 12 * c.num_hidden_layers * c.hidden_size * L  # weights + attention
    achieved = flops_per_token * B * L / dt / 1e12
    return (f"- LLaMA shape {n_params / 1e9:.2f}B (d=2048, 16 layers, batch {B}x{L}), bf16 autocast, fused AdamW: "
            f"{dt * 1000:.0f} ms/step, {B * L / dt:,.0f} tokens/s, {achieved:.0f} TFLOP/s = MFU "
            f"{achieved / peak_tflops:.1%} of {peak_tflops:.0f}")


def main():
    p = cli.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", help="write the markdown report here (it is printed too)")
    p.add_argument("--peak_tflops", type=float, default=989.0, help="the GPU's dense bf16 peak, for the MFU")
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("error: no CUDA device: this script is for the GPU machine", file=sys.stderr)
        return 2
    from nanovoco.repro.bench import machine
    parts = [("Parity in bf16", parity_bf16), ("SDPA kernels", sdpa_kernel), ("train.py on NCCL", train_nccl),
             ("Table 7 at 7B, random bf16 weights", table7), ("Decoding vs transformers", decode),
             ("Training MFU, ~1B", lambda: mfu(args.peak_tflops))]
    report = [f"## GPU check ({machine('cuda')})", "", "`python -m benchmarks.gpu_check`", ""]
    for title, part in parts:
        t0 = time.perf_counter()
        try:
            body = part()
        except Exception:  # a report of what failed, and the next part runs
            body = "FAILED:\n\n```\n" + traceback.format_exc()[-3000:] + "```"
        report += [f"### {title} ({time.perf_counter() - t0:.0f} s)", "", body.strip(), ""]
        print("\n".join(report[-4:]), flush=True)
        torch.cuda.empty_cache()
    if args.out:
        Path(args.out).write_text("\n".join(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
