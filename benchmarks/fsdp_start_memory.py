"""Peak host memory per process of train.py's FSDP2 start, before and after the start that fits a node.

    python -m benchmarks.fsdp_start_memory                   # a random 0.56B VLM, 2 gloo processes on the CPU
    python -m benchmarks.fsdp_start_memory --processes 4     # more processes
    python -m benchmarks.fsdp_start_memory --out docs/benchmarks.md

A random VLM (LLaMA shape: width 1280, 24 layers, intermediate 3456, vocabulary 32,000; a small CLIP) is saved in
LLaVA's layout in bf16, as released checkpoints are stored, and started from under `torch.distributed` with 2 (or
--processes) gloo processes, both ways:
- every rank (before): each process builds the whole model from the checkpoint in host memory
  (init.build_model), then FSDP2 shards it (parallel.shard), as train.py did;
- rank 0 (after): parallel.place: only rank 0 builds the whole model; every rank builds it on the meta device,
  shards it, allocates its own shards and receives their values from rank 0.
Each way runs in fresh processes; each process reports its peak resident memory during the start (Linux's VmHWM,
reset when the process begins: ru_maxrss would count the memory of the parent it was forked from) and the bytes of
its parameter shards. Both ways end with the same shards (checked: equal parameters).
"""
import os
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import train
from nanovoco import cli, parallel
from nanovoco.config import CLIPVisionConfig, LlamaConfig, VoCoLlamaConfig
from nanovoco.init import build_model, init_weights
from nanovoco.model import VoCoLlama
from nanovoco.repro.bench import machine, publish
from nanovoco.tokenizer import Tokenizer, train_tiny_tokenizer

SHAPE = dict(vocab_size=32000, hidden_size=1280, intermediate_size=3456, num_hidden_layers=24, num_attention_heads=16,
             num_key_value_heads=16)


def write_checkpoint(path: Path) -> int:
    """The random VLM in LLaVA's layout + a tokenizer; returns its parameter count."""
    torch.manual_seed(0)
    vlm = VoCoLlama(VoCoLlamaConfig(text=LlamaConfig(**SHAPE), vision=CLIPVisionConfig(
        hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4, image_size=56,
        patch_size=14)))
    init_weights(vlm)
    vlm.to(torch.bfloat16).save_pretrained(path)  # loaded back in fp32, train.py's dtype: a real copy in memory
    train_tiny_tokenizer(["USER: What shape is the red object? ASSISTANT: circle"] * 50, path / "tokenizer.model")
    return sum(p.numel() for p in vlm.parameters())


def peak_rss() -> int:
    """Bytes: the process's peak resident memory since the last reset_peak_rss."""
    line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024


def reset_peak_rss():
    Path("/proc/self/clear_refs").write_text("5")  # Linux >= 4.0: VmHWM starts again from the current RSS


def start(rank: int, world: int, how: str, path: str, port: int, results):
    reset_peak_rss()
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    cfg = train.parse_args([f"--init={path}", "--mode=full"])
    tokenizer = Tokenizer(Path(path) / "tokenizer.model")
    device = torch.device("cpu")
    if how == "every rank":
        vlm = parallel.shard(build_model(cfg, tokenizer, path), device, world, False)
    else:
        vlm = parallel.place(lambda: build_model(cfg, tokenizer, path), device, rank, world,
                             freeze_vision=cfg.freeze_vision, activation_checkpointing=False)
    peak = peak_rss()
    shards = sum(p.to_local().nbytes for p in vlm.parameters())
    checksum = float(sum(p.to_local().double().sum() for p in vlm.parameters()))
    results[(how, rank)] = (peak, shards, checksum)
    dist.barrier()
    dist.destroy_process_group()


def main():
    p = cli.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--processes", type=int, default=2)
    p.add_argument("--out", help="append the table to this file")
    args = p.parse_args()
    world, results = args.processes, mp.Manager().dict()
    with tempfile.TemporaryDirectory() as tmp:
        n_params = write_checkpoint(Path(tmp) / "model")
        for i, how in enumerate(("every rank", "rank 0")):
            mp.start_processes(start, args=(world, how, str(Path(tmp) / "model"), 29511 + i, results), nprocs=world,
                               join=True, start_method="spawn")
    for rank in range(world):
        assert results[("every rank", rank)][2] == results[("rank 0", rank)][2], "the two starts differ"
    lines = [f"### FSDP2 start: peak host memory per process ({machine('cpu')})", "",
             f"`python -m benchmarks.fsdp_start_memory --processes {world}`: a random {n_params / 1e9:.2f}B-parameter "
             f"VLM (bf16 on disk, fp32 in memory: {4 * n_params / 1e9:.2f} GB) started by {world} gloo processes; "
             "peak resident memory of each process during the start (VmHWM). Both ways end with the same shards "
             "(checked).", "",
             "| start | rank | peak host memory (GB) | its parameter shards (GB) |", "|---|---:|---:|---:|"]
    for how in ("every rank", "rank 0"):
        for rank in range(world):
            peak, shards, _ = results[(how, rank)]
            name = "every rank builds the whole model (before)" if how == "every rank" else \
                "rank 0 builds it, the others receive their shards (parallel.place)"
            lines.append(f"| {name} | {rank} | {peak / 1e9:.2f} | {shards / 1e9:.2f} |")
    total = {how: sum(results[(how, r)][0] for r in range(world)) / 1e9 for how in ("every rank", "rank 0")}
    lines += ["", f"Sum over the {world} processes: {total['every rank']:.2f} GB before, {total['rank 0']:.2f} GB "
                  f"after."]
    publish("\n".join(lines) + "\n", args.out)


if __name__ == "__main__":
    main()
