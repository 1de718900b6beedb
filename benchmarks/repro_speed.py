"""Training speed of the repro's `full` stage, before and after this recipe, in one run on one machine.

    python -m benchmarks.repro_speed                         # prints the table
    python -m benchmarks.repro_speed --out docs/benchmarks.md
    python -m benchmarks.repro_speed --bf16                  # adds the current recipe under CPU bf16 autocast
    python -m benchmarks.repro_speed --answers_only          # adds the LM head on the answers' positions only

Three set-ups, each one `train.py` step as the loop does it (batch 32 in micro-batches of 16: forward, loss,
backward, clipping, AdamW), on synthetic records with 8 questions each:
- before: the earlier recipe's full stage: preset "tiny" (GQA), 56 px images in 16 patches, and the tiny tokenizer
  trained on the bare conversation texts, which spelled "USER:" and "ASSISTANT:" letter by letter;
- tokenizer only: the current recipe (preset "tiny-mha", 64 px images in 64 patches) with that old tokenizer;
- after: the current recipe with the tokenizer trained on the chunks build_sample encodes (train.tiny_tokenizer);
- after, bf16 autocast (with --bf16): the same step under torch.autocast("cpu", torch.bfloat16);
- after, answers' logits only (with --answers_only): the same step with the LM head run only where the next token is
  an answer's (`logits_at`), as train.py does since 2026-11-30; the loss is the same sum.
Timed in interleaved rounds (A B C, C B A, ...) so that machine noise hits all alike; medians over rounds.
Then, for "after", where a step's time goes: loading its batch (PNG decode, preprocessing, collation) and the frozen
tower's forward, the two parts that caching the tower's features would remove, against the whole step.
"""
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import train
from nanovoco import cli
from nanovoco.data import IGNORE_INDEX, LlavaDataset, collate
from nanovoco.init import build_model, init_weights
from nanovoco.model import CLIPVisionTower
from nanovoco.repro import synthetic, vision_pretrain
from nanovoco.repro.bench import machine, publish
from nanovoco.tokenizer import VOCO_SYSTEM, Tokenizer, train_tiny_tokenizer


def old_tokenizer(train_json: Path, path: Path) -> str:
    """The earlier train.tiny_tokenizer: trained on the bare texts of the conversations."""
    records = json.loads(train_json.read_text())
    texts = [t["value"].replace("<image>", "") for r in records for t in r["conversations"]]
    return train_tiny_tokenizer([VOCO_SYSTEM] + texts, path, vocab_size=512)


def model_and_data(name: str, root: Path):
    """(train.py's options, the model, the dataset) of one set-up, as train.py builds them."""
    new_recipe = name != "before"
    size = vision_pretrain.TOWER.image_size if new_recipe else 56
    data = root / f"data{size}"
    if not (data / "data.json").exists():
        synthetic.generate(data, n_images=256, questions_per_image=8, image_size=size, n_objects=3, multi_turn=True)
    argv = ["--preset=tiny-cpu", "--mode=full", f"--init={'tiny-mha' if new_recipe else 'tiny'}"]
    if new_recipe:  # the tower's weights do not change the speed: a random one in the pretrained tower's shape
        tower = CLIPVisionTower(vision_pretrain.TOWER)
        init_weights(tower)
        vision_pretrain.save(tower, root / "tower")
        argv.append(f"--vision_path={root / 'tower'}")
    cfg = train.parse_args(argv)
    tok_dir = root / name
    tokenizer = Tokenizer(train.tiny_tokenizer(data / "data.json", tok_dir, 0) if name == "after"
                          else old_tokenizer(data / "data.json", tok_dir / "tokenizer.model"))
    torch.manual_seed(0)
    vlm = build_model(cfg, tokenizer, None)
    dataset = LlavaDataset(data / "data.json", data, tokenizer, vlm.config, num_voco=0, max_len=cfg.max_len,
                           system=cfg.system_prompt)
    return cfg, vlm, dataset


def setup(name: str, root: Path, answers_only: bool = False):
    """(one training step as a function, the mean length of a training sample in tokens) for one set-up."""
    cfg, vlm, dataset = model_and_data(name, root)
    params = [p for p in vlm.parameters() if p.requires_grad]
    optim = torch.optim.AdamW(params, lr=cfg.lr)
    mask, _ = train.mode_masks("full")
    position = [0]

    def batch():
        start = position[0] % (len(dataset) - cfg.batch_size)
        position[0] += cfg.batch_size
        return [collate([dataset[i] for i in range(start + k, start + k + cfg.micro_batch_size)])
                for k in range(0, cfg.batch_size, cfg.micro_batch_size)]

    def step():
        micro = batch()
        n_tokens = sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in micro)
        for b in micro:
            labels = b["labels"][:, 1:]
            answered = F.pad(labels != IGNORE_INDEX, (0, 1)) if answers_only else None
            logits = vlm(b["input_ids"], b["pixel_values"], attn_mask=mask(b["segments"], b["groups"]),
                         position_ids=b["positions"], use_cache=False, logits_at=answered).logits
            if answers_only:
                loss = F.cross_entropy(logits, labels[answered[:, :-1]], reduction="sum")
            else:
                loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX,
                                       reduction="sum")
            (loss / n_tokens).backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        optim.step()
        optim.zero_grad(set_to_none=True)

    def frozen_part():  # what cached features would save: the batch's loading and the tower's forward
        t0 = time.perf_counter()
        micro = batch()
        t1 = time.perf_counter()
        with torch.no_grad():
            for b in micro:
                vlm.vision(b["pixel_values"])
        return t1 - t0, time.perf_counter() - t1

    step.frozen_part = frozen_part
    return step, statistics.mean(len(dataset[i]["sample"].input_ids) for i in range(64))


def autocast(step):
    def bf16_step():
        with torch.autocast("cpu", torch.bfloat16):
            step()
    return bf16_step


def main():
    p = cli.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=5, help="timed steps per set-up per round")
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--out", help="append the markdown section to this file")
    p.add_argument("--bf16", action="store_true", help="also time the current recipe under CPU bf16 autocast")
    p.add_argument("--answers_only", action="store_true", help="also time the LM head on the answers' positions only")
    args = p.parse_args()
    names = (("before", "tokenizer only", "after") + (("after, bf16 autocast",) if args.bf16 else ())
             + (("after, answers' logits only",) if args.answers_only else ()))
    with tempfile.TemporaryDirectory() as tmp:
        steps, lengths = {}, {}
        for name in names:
            if name == "after, bf16 autocast":
                steps[name], lengths[name] = autocast(steps["after"]), lengths["after"]
                continue
            steps[name], lengths[name] = (setup("after", Path(tmp), answers_only=True)
                                          if name == "after, answers' logits only" else setup(name, Path(tmp)))
            for _ in range(2):  # warm-up
                steps[name]()
        times = {name: [] for name in names}
        for r in range(args.rounds):
            for name in (names if r % 2 == 0 else names[::-1]):
                t0 = time.perf_counter()
                for _ in range(args.steps):
                    steps[name]()
                times[name].append((time.perf_counter() - t0) / args.steps)
        split = [steps["after"].frozen_part() for _ in range(args.rounds)]
    median = {name: statistics.median(t) for name, t in times.items()}
    load, tower = (statistics.median(part) for part in zip(*split))
    lines = [f"### The repro's full stage: training steps/s before and after ({machine('cpu')})", "",
             f"`python -m benchmarks.repro_speed` ({args.rounds} interleaved rounds of {args.steps} steps, medians; "
             "batch 32 in micro-batches of 16, 8 questions per image).", "",
             "| set-up | vision tokens | tokens per sample (mean) | s/step | steps/s | vs before |",
             "|---|---:|---:|---:|---:|---:|"]
    for name in names:
        vision = 16 if name == "before" else vision_pretrain.TOWER.num_patches
        lines.append(f"| {name} | {vision} | {lengths[name]:.0f} | {median[name]:.3f} | {1 / median[name]:.2f} | "
                     f"{median['before'] / median[name]:.2f}x |")
    lines += ["", f"Of an \"after\" step ({median['after'] * 1000:.0f} ms), loading the batch takes "
              f"{load * 1000:.0f} ms and the frozen tower's forward {tower * 1000:.0f} ms (medians of {args.rounds}): "
              f"caching the tower's features would save at most {(load + tower) / median['after']:.0%} of a step."]
    publish("\n".join(lines) + "\n", args.out)


if __name__ == "__main__":
    main()
