"""Train VoCo-LLaMA, or one of the paper's baselines, with a hand-written loop (no Trainer, Accelerate or DeepSpeed).

One process, on the CPU or one GPU: a tiny VLM on synthetic visual QA (~9 CPU minutes), then VoCo-LLaMA from it
(~3 minutes), the paper's recipe in miniature (VoCo from scratch does not learn at this scale, see README):
    python -m nanovoco.repro.synthetic --out runs/data --n_images 2000 --questions_per_image 8 --multi_turn \
        --held_out 500 --image_size 56
    python train.py --preset=tiny-cpu --data=runs/data/train/data.json --eval_data=runs/data/eval/data.json \
        --mode=full --out_dir=runs/full
    python train.py --preset=tiny-cpu --data=runs/data/train/data.json --eval_data=runs/data/eval/data.json \
        --init=runs/full/checkpoint/model --max_steps=300 --warmup_ratio=0.03 --out_dir=runs/voco
Several GPUs with FSDP2, one process per GPU (the official recipe, from Vicuna + CLIP + LLaVA's stage-1 projector):
    torchrun --standalone --nproc_per_node=8 train.py --preset=llava-7b --init=vicuna-7b-v1.5 \
        --vision_path=clip-vit-large-patch14-336 --projector_path=llava-v1.5-7b-pretrain/mm_projector.bin \
        --data=llava_v1_5_mix665k.json --image_folder=data
An interrupted run (Ctrl-C, a crash) goes on from its last checkpoint: the same command with --resume=true.
Every field of TrainConfig can be set as --name=value, on top of a --preset.

Modes (Table 1 of the paper): full (no compression, the upper bound), voco (K VoCo tokens under the VoCo mask),
lower_bound (K VoCo tokens trained without the VoCo mask, evaluated with it), avgpool and qformer (external
compressors to K tokens). The loss is plain next-token cross-entropy on the answers: VoCo-LLaMA's "attention
distillation" is the mask alone. --voco_ks=1,2,4,8,16 trains one model for every K of the set (K drawn per sample;
eval.json then scores it at each K).
"""
import dataclasses
import json
import math
import signal
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn.functional as F
from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict
from tqdm import tqdm

from nanovoco import cli, files, init
from nanovoco.data import LlavaDataset, answer_positions, collate, user_text
from nanovoco.evaluate import answer_kl, answer_log_probs, blind_baseline, vqa_accuracy
from nanovoco.model import VoCoLlama
from nanovoco.parallel import all_sum, barrier, place, setup_distributed
from nanovoco.tokenizer import (VOCO_SYSTEM, BPETokenizer, Tokenizer, load_tokenizer, train_tiny_tokenizer,
                               trained_system_prompt)
from nanovoco.train_checkpoint import check_resumable, find_checkpoint, save_checkpoint
from nanovoco.voco import PAD, causal_pad_mask, voco_mask

MODES = ("full", "voco", "lower_bound", "avgpool", "qformer")
FROM_SCRATCH = ("tiny", "tiny-mha")  # --init values that build a model preset (config.py) with fresh weights
# DCP warns on every save/load in a single process that it is not distributed; that is the intended use here
warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")


@dataclass
class TrainConfig:
    """Every option of train.py (--name=value or --name value); `python train.py --help` lists them with these
    comments, by group."""

    # model
    mode: str = "voco"  # what to train: one of full, voco, lower_bound, avgpool, qformer (MODES)
    num_voco: int = 2  # K: VoCo tokens per image (voco, lower_bound) or compressed tokens (avgpool, qformer)
    voco_ks: str = ""  # any-K training, e.g. "1,2,4,8,16": each sample gets one of these K, and the one checkpoint
    # compresses to any of them (voco_cache.compress(num_voco=k), infer.py --num_voco k); num_voco must be one of
    # them: the K of inference by default, and of eval.json's headline (eval.json's by_num_voco has every K)
    init: str = "tiny"  # a model preset trained from scratch ("tiny", "tiny-mha"), or a checkpoint directory
    vision_path: str = ""  # CLIP directory, for a LLaVA or plain LLaMA checkpoint, or a pretrained tower (HF CLIP
    # layout, e.g. from nanovoco.repro.vision_pretrain) for a model from scratch
    projector_path: str = ""  # LLaVA's stage-1 mm_projector.bin, for a plain LLaMA checkpoint; without it, a plain
    # LLM (e.g. SmolLM2 from nanovoco.from_gguf) gets a new projector, trained with it
    freeze_vision: bool = True  # the paper freezes CLIP; the repro freezes its pretrained tiny tower likewise
    voco_init: str = "random"  # the new <voco> embedding: "random" (N(0, 0.02), the official code's) or "newline":
    # a copy of the "\n" token that precedes the VoCo tokens (see init.build_model)
    tokenizer: str = ""  # tokenizer.model or tokenizer.json; default: the init checkpoint's, or a tiny one trained
    # on the data

    # data
    data: str = ""  # a LLaVA-format JSON (python -m nanovoco.repro.synthetic makes one from Sort-of-CLEVR scenes)
    image_folder: str = ""  # default: the JSON's directory
    eval_data: str = ""  # held-out LLaVA-format JSON for VQA accuracy (one question per record)
    max_len: int = 2048  # tokens per sample; a longer sample loses the tail of its text
    system_prompt: str = "default"  # "default": the template's own (VoCo-LLaMA's Vicuna sentence, a ChatML model's
    # default system turn); '' for none (a tiny model from scratch does without)

    # optimisation (official recipe: AdamW, lr 2e-5, cosine, 3% warmup, no weight decay, global batch 128)
    batch_size: int = 128  # samples per optimizer step, over all processes
    micro_batch_size: int = 4  # samples per forward/backward in each process
    lr: float = 2e-5  # peak learning rate
    warmup_ratio: float = 0.03  # share of the steps with a linear warmup, before the cosine decay
    weight_decay: float = 0.0  # AdamW's
    grad_clip: float = 1.0  # the gradient's largest norm
    epochs: float = 1.0  # passes over the data, when max_steps is 0
    max_steps: int = 0  # > 0: stop after this many optimizer steps
    activation_checkpointing: bool = False  # recompute each decoder block in the backward: less memory, more time

    # run
    out_dir: str = "runs/train"  # checkpoint/, log.jsonl and eval.json go here
    log_every: int = 1  # steps between log.jsonl lines
    save_every: int = 200  # steps between checkpoints (also saved at the end and on Ctrl-C)
    eval_every: int = 0  # steps between VQA evaluations (0: at the end only)
    eval_limit: int = 500  # held-out questions per evaluation
    teacher: str = ""  # the uncompressed model (the upper bound's checkpoint): eval.json then holds the KL from its
    # answer distributions to this model's on the held-out answers (evaluate.answer_kl), the distillation measured
    kl_every: int = 0  # with --teacher: steps between KLs on the first kl_limit held-out questions, in log.jsonl
    # (from step 0 on): the distillation's curve
    kl_limit: int = 200  # held-out questions of that curve (a fixed subset, so that its points compare)
    resume: bool = False  # continue out_dir's checkpoint
    stop_after: int = 0  # > 0: checkpoint and stop after this many steps of this invocation (time-limited jobs)
    seed: int = 0  # the data order and the new weights


PRESETS = {
    "tiny-cpu": dict(init="tiny", system_prompt="", max_len=256, batch_size=32, micro_batch_size=16, lr=1e-3,
                     warmup_ratio=0.05, epochs=16.0, save_every=100, eval_every=250, eval_limit=400),
    "llava-7b": dict(init="", batch_size=128, micro_batch_size=4, lr=2e-5, warmup_ratio=0.03, epochs=2.0,
                     max_len=2048, activation_checkpointing=True, save_every=500, log_every=10),
}


def parse_args(argv) -> TrainConfig:
    """--preset=name, then --field=value (or --field value) overrides (cli.parse_dataclass), then the checks that
    involve several fields; -h / --help prints every option and exits."""
    cfg = cli.parse_dataclass(argv, TrainConfig, PRESETS, "python train.py", __doc__.split("\n")[0])
    if cfg.mode not in MODES:
        raise ValueError(f"--mode must be one of {', '.join(MODES)}, got {cfg.mode!r}")
    if cfg.voco_init not in ("random", "newline"):
        raise ValueError(f"--voco_init must be random or newline, got {cfg.voco_init!r}")
    if cfg.voco_ks:
        ks = voco_ks(cfg)
        if ks is None:
            raise ValueError(f"--voco_ks={cfg.voco_ks}: give distinct numbers of VoCo tokens >= 1 separated by "
                             f"commas, e.g. 1,2,4,8,16")
        if cfg.mode not in ("voco", "lower_bound"):
            raise ValueError(f"--voco_ks is for the modes with VoCo tokens (voco, lower_bound), not {cfg.mode}")
        if cfg.num_voco not in ks:
            raise ValueError(f"--num_voco={cfg.num_voco} must be one of --voco_ks={cfg.voco_ks}: it is the K used "
                             f"when none is asked")
    if cfg.teacher and not cfg.eval_data:
        raise ValueError("--teacher measures the KL on the held-out answers: give --eval_data too")
    if cfg.kl_every and not cfg.teacher:
        raise ValueError("--kl_every needs --teacher=<the uncompressed model's checkpoint>, which the KL is from")
    if cfg.kl_every < 0 or cfg.kl_limit < 1:
        raise ValueError(f"--kl_every={cfg.kl_every}, --kl_limit={cfg.kl_limit}: give kl_every >= 0 and kl_limit >= 1")
    return cfg


def voco_ks(cfg) -> tuple[int, ...] | None:
    """The K of any-K training (--voco_ks), increasing; None if the option is not a list of distinct K >= 1."""
    try:
        ks = [int(k) for k in cfg.voco_ks.split(",")]
    except ValueError:
        return None
    return tuple(sorted(ks)) if len(set(ks)) == len(ks) and min(ks) >= 1 else None


# ----------------------------------------------------------------------------------------------------------------
# Data and tokenizer (the model to train: init.build_model)

def data_files(cfg) -> tuple[Path, Path | None]:
    """The training and held-out LLaVA-format JSON files, checked to exist."""
    if not cfg.data:
        raise ValueError("--data=<LLaVA-format JSON> is required (python -m nanovoco.repro.synthetic makes a "
                         "synthetic set)")
    for path in (cfg.data, cfg.eval_data):
        if path and not Path(path).is_file():
            raise ValueError(f"{path} does not exist: --data and --eval_data take LLaVA-format JSON files")
    return Path(cfg.data), Path(cfg.eval_data) if cfg.eval_data else None


def system_prompt(cfg: TrainConfig, tokenizer) -> str:
    """--system_prompt as the text it stands for: "default" is the template's own (tokenizer.ChatTemplate)."""
    return tokenizer.template.default_system if cfg.system_prompt == "default" else cfg.system_prompt


def tiny_tokenizer(train_json: Path, out: Path, rank: int) -> Path:
    """A model trained from scratch gets a small tokenizer trained on its own training texts (by rank 0), cut
    into the chunks that data.build_sample encodes: "USER: <question> ASSISTANT:" and the answer. Trained on the
    bare texts, it spelled "USER:" and "ASSISTANT:" letter by letter, 15 tokens a turn: half of every sequence.
    Trained again by every fresh run (a second, not a cost), so that one left by a run that stopped on bad data is
    never reused for other data; a resumed run takes its checkpoint's."""
    path = out / "tokenizer.model"
    if rank == 0:
        records = files.read_json(train_json, "the training data")  # checked later, by LlavaDataset
        texts = [VOCO_SYSTEM]
        for r in records if isinstance(records, list) else []:
            turns = r.get("conversations", []) if isinstance(r, dict) else []
            values = [t.get("value") for t in turns if isinstance(t, dict) and isinstance(t.get("value"), str)]
            for user, answer in zip(values[0::2], values[1::2]):
                texts += ["USER: " + user_text(user) + " ASSISTANT:", answer]
        train_tiny_tokenizer(texts, path, vocab_size=512)
    barrier()
    return path


# ----------------------------------------------------------------------------------------------------------------
# The loop

def mode_masks(mode: str):
    """(the training mask function of (segments, groups), whether evaluation runs under the VoCo mask) of a mode.
    Table 1's bounds differ by the mask alone: voco trains and is evaluated under the VoCo mask; lower_bound trains
    its VoCo tokens with plain causal attention (the text sees the image directly) and is evaluated under the VoCo
    mask, where they never learned to carry it; full and the external compressors are causal throughout."""
    causal = lambda segments, groups: causal_pad_mask(segments)  # noqa: E731
    return (voco_mask if mode == "voco" else causal), mode in ("voco", "lower_bound")


def schedule(step: int, total: int, cfg: TrainConfig) -> float:
    """Linear warmup over warmup_ratio of the steps, then cosine decay to 0 (transformers' cosine schedule)."""
    warmup = max(1, math.ceil(cfg.warmup_ratio * total))
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def sample_order(n: int, total_steps: int, batch_size: int, seed: int) -> list[int]:
    """The dataset indices of every global batch, epoch after epoch in a seeded random order: the same for any
    number of processes, and a resumed run picks it up at its step."""
    order, epoch = [], 0
    while len(order) < total_steps * batch_size:
        order += torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch)).tolist()
        epoch += 1
    return order


def evaluate(vlm, eval_set, compressed: bool, limit: int, progress=False, teacher=None) -> dict:
    """VQA accuracy in the middle of training, and with the teacher's answer distributions (teacher_log_probs) the
    KL from them to this model's on the same questions. Every process evaluates the same questions, so that FSDP's
    collectives line up; the root's own parameters (embeddings, projector, head) are gathered by hand because
    generation calls vlm.embed and vlm.llm rather than vlm.forward, which is what triggers FSDP's gathering."""
    if hasattr(vlm, "unshard"):
        vlm.unshard()
    result = vqa_accuracy(vlm, eval_set, compressed, limit=limit, progress=progress)
    if teacher is not None:
        result["kl"] = distillation_kl(vlm, eval_set, compressed, teacher[:result["n"]])
    if hasattr(vlm, "reshard"):
        vlm.reshard()
    vlm.train()
    return result


def distillation_kl(vlm, eval_set, compressed: bool, teacher: list) -> dict:
    """evaluate.answer_kl from the teacher's answer distributions (on the first len(teacher) held-out questions) to
    the model's, which is left in the mode (train or eval) it was in."""
    was_training = vlm.training
    student = answer_log_probs(vlm, eval_set, compressed, limit=len(teacher))
    vlm.train(was_training)
    return answer_kl(teacher, student, [eval_set.records[i].get("type") for i in range(len(teacher))])


def teacher_log_probs(cfg, eval_json: Path, folder: Path, device, limit: int) -> list:
    """The teacher's (--teacher, an uncompressed model) answer distributions on the first `limit` held-out
    questions (all when 0), read once: the teacher reads every vision token, under the causal mask. Only these
    stay in memory, not the teacher."""
    path = Path(cfg.teacher)
    if not (path / "config.json").is_file():
        raise ValueError(f"--teacher={cfg.teacher}: not a checkpoint directory (no config.json); give the upper "
                         f"bound's, e.g. runs/full/checkpoint/model")
    teacher = VoCoLlama.from_pretrained(path, device=device)
    tokenizer = load_tokenizer(path)
    held_out = LlavaDataset(eval_json, folder, tokenizer, teacher.config, num_voco=0, max_len=cfg.max_len,
                            system=trained_system_prompt(path))  # the prompt it was trained with
    return answer_log_probs(teacher, held_out, compressed=False, limit=limit)


@dataclass
class Run:
    """What prepare() sets up for the loop."""
    cfg: TrainConfig
    rank: int
    world: int
    device: torch.device
    out: Path
    vlm: VoCoLlama
    optim: torch.optim.Optimizer
    params: list
    train_set: LlavaDataset
    eval_set: LlavaDataset | None
    teacher: list | None  # the teacher's answer distributions on the held-out questions (--teacher), or None
    tokenizer: Tokenizer | BPETokenizer
    total_steps: int
    step: int


def main(argv=None):
    try:  # every mistake a user can make is found here, before the first step, and said in one line
        run = prepare(parse_args(sys.argv[1:] if argv is None else argv))
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        if dist.is_initialized():
            dist.destroy_process_group()
        sys.exit(2)
    fit(run)


def prepare(cfg: TrainConfig) -> Run:
    """Options, data (validated whole, images included) and only then the model, sharded, with its optimizer."""
    train_json, eval_json = data_files(cfg)
    rank, world, device = setup_distributed()
    out = files.output_dir(cfg.out_dir, "--out_dir")
    if cfg.batch_size % (world * cfg.micro_batch_size):
        raise ValueError(f"batch_size={cfg.batch_size} must be a multiple of processes x micro_batch_size = "
                         f"{world} x {cfg.micro_batch_size}")

    resume_from = find_checkpoint(out) if cfg.resume else None
    if resume_from:
        saved = json.loads((resume_from / "state.json").read_text())
        check_resumable(saved["config"], dataclasses.asdict(cfg), resume_from)
    elif (out / "checkpoint").exists():
        raise ValueError(f"{out} already holds a checkpoint: pass --resume=true to continue it, or another --out_dir")

    if not cfg.init:
        raise ValueError("--init=<checkpoint directory> is required by this preset (e.g. vicuna-7b-v1.5 with "
                         "--vision_path and --projector_path, or a LLaVA-1.5 checkpoint)")

    # data and tokenizer, checked whole before the model is built
    source = resume_from / "model" if resume_from else (None if cfg.init in FROM_SCRATCH else cfg.init)
    # a resumed run's model is its checkpoint's alone, vision tower included: with --freeze_vision=false the tower
    # trained too, and the --vision_path of the start is no longer it
    build = dataclasses.replace(cfg, vision_path="", projector_path="") if resume_from else cfg
    config = init.model_config(build, source)
    tokenizer = load_tokenizer(resume_from / "model" if resume_from else
                               cfg.tokenizer if cfg.tokenizer else
                               tiny_tokenizer(train_json, out, rank) if cfg.init in FROM_SCRATCH else cfg.init)
    num_voco = (voco_ks(cfg) if cfg.voco_ks else cfg.num_voco) if cfg.mode in ("voco", "lower_bound") else 0
    folder = lambda j: Path(cfg.image_folder) if cfg.image_folder else j.parent  # noqa: E731
    data_args = dict(num_voco=num_voco, max_len=cfg.max_len, system=system_prompt(cfg, tokenizer))
    train_set = LlavaDataset(train_json, folder(train_json), tokenizer, config, **data_args)
    eval_set = LlavaDataset(eval_json, folder(eval_json), tokenizer, config, **data_args) if eval_json else None
    if eval_set is not None and cfg.voco_ks:
        eval_set = eval_set.with_num_voco(cfg.num_voco)  # every question at the default K; the end: at each K
    teacher = teacher_log_probs(cfg, eval_json, folder(eval_json), device, cfg.eval_limit) if cfg.teacher else None

    # model
    vlm = place(lambda: init.build_model(build, tokenizer, source), device, rank, world,
                freeze_vision=cfg.freeze_vision, activation_checkpointing=cfg.activation_checkpointing)
    params = [p for p in vlm.parameters() if p.requires_grad]
    optim = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=device.type == "cuda")
    total_steps = cfg.max_steps or math.ceil(cfg.epochs * len(train_set) / cfg.batch_size)
    step = 0
    if resume_from:
        state = {"optimizer": get_optimizer_state_dict(vlm, optim)}
        dcp.load(state, checkpoint_id=str(resume_from / "optimizer"))
        set_optimizer_state_dict(vlm, optim, state["optimizer"])
        step = saved["step"]
    return Run(cfg, rank, world, device, out, vlm, optim, params, train_set, eval_set, teacher, tokenizer,
               total_steps, step)


def train_step(run: Run, micro: list[dict], train_mask, autocast, step: int) -> tuple[float, float]:
    """One optimizer step on a global batch, of which `micro` holds this process's micro-batches: the forward and
    backward of each, the loss normalised by the answer tokens of the whole batch, gradient clipping, and the update
    unless the loss or the gradient is not finite. Returns (loss, gradient norm)."""
    device, world = run.device, run.world
    # the loss (and the head) only where the next token is an answer's
    answers = [answer_positions(b["labels"]) for b in micro]
    # normalise by the answer tokens of the whole global batch, so that any split over processes and
    # micro-batches gives the same gradient; FSDP averages over processes, hence the factor `world`
    n_tokens = all_sum(torch.tensor(sum(int(a.sum()) for a in answers), dtype=torch.float64, device=device)).item()
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    for b, answered in zip(micro, answers):  # FSDP reduce-scatters after every micro-batch: ZeRO-3's sharding
        ids, labels, answered = b["input_ids"].to(device), b["labels"].to(device), answered.to(device)
        pixels = None if b["pixel_values"] is None else b["pixel_values"].to(device)
        with autocast:
            logits = run.vlm(ids, pixels, attn_mask=train_mask(b["segments"], b["groups"]).to(device),
                             position_ids=b["positions"].to(device), use_cache=False, logits_at=answered).logits
        loss = F.cross_entropy(logits.float(), labels[:, 1:][answered[:, :-1]], reduction="sum")
        (loss * world / max(n_tokens, 1)).backward()
        loss_sum += loss.detach()
    loss = all_sum(loss_sum).item() / max(n_tokens, 1)
    grad_norm = torch.nn.utils.clip_grad_norm_(run.params, run.cfg.grad_clip)
    grad_norm = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)
    if not (math.isfinite(loss) and math.isfinite(grad_norm)):
        raise FloatingPointError(f"step {step}: loss {loss}, gradient norm {grad_norm}: stopping before the "
                                 f"optimizer step, so the weights are not corrupted. The last good checkpoint is "
                                 f"{find_checkpoint(run.out) or 'none'}; lower --lr or check the data of this step")
    run.optim.step()
    run.optim.zero_grad(set_to_none=True)
    return loss, grad_norm


def fit(run: Run):
    """The training loop: steps, logs, checkpoints (also on Ctrl-C), the final held-out evaluation."""
    cfg, rank, world, device, out = run.cfg, run.rank, run.world, run.device, run.out
    train_set, total_steps, step = run.train_set, run.total_steps, run.step
    train_mask, eval_compressed = mode_masks(cfg.mode)
    order = sample_order(len(train_set), total_steps, cfg.batch_size, cfg.seed)
    log_path = start_log(out / "log.jsonl", step, rank)
    autocast = torch.autocast("cuda", torch.bfloat16, enabled=device.type == "cuda" and world == 1)
    stop = stop_on_signals()
    if rank == 0:
        n_train = sum(p.numel() for p in run.params)
        print(f"{cfg.mode}: {n_train / 1e6:.1f}M trainable parameters, {len(train_set)} samples, {total_steps} steps "
              f"of {cfg.batch_size} ({world} process(es) x {cfg.batch_size // (world * cfg.micro_batch_size)} x "
              f"{cfg.micro_batch_size}) on {device}")
    bar = tqdm(total=total_steps, initial=step, disable=rank != 0, desc=cfg.mode)
    first_step = step
    curve = start_curve(run, log_path, eval_compressed)
    while step < total_steps:
        t0 = time.perf_counter()
        lr = schedule(step, total_steps, cfg)
        for group in run.optim.param_groups:
            group["lr"] = lr
        mine = order[step * cfg.batch_size:(step + 1) * cfg.batch_size][rank::world]
        micro = [collate([train_set[i] for i in mine[k:k + cfg.micro_batch_size]])
                 for k in range(0, len(mine), cfg.micro_batch_size)]
        loss, grad_norm = train_step(run, micro, train_mask, autocast, step)
        step += 1
        dt = time.perf_counter() - t0
        tokens = all_sum(torch.tensor(sum(int((b["segments"] != PAD).sum()) for b in micro), device=device)).item()
        record = {"step": step - 1, "loss": loss, "lr": lr, "grad_norm": grad_norm, "tokens_per_s": tokens / dt}
        if cfg.eval_every and step % cfg.eval_every == 0 and step < total_steps and run.eval_set is not None:
            record["eval"] = evaluate(run.vlm, run.eval_set, eval_compressed, cfg.eval_limit)
        if curve is not None and (step % cfg.kl_every == 0 or step == total_steps):
            record["kl"] = distillation_kl(run.vlm, run.eval_set, eval_compressed, curve)["overall"]
        if rank == 0:
            if step % cfg.log_every == 0 or "eval" in record or "kl" in record:
                with open(log_path, "a") as f:
                    f.write(json.dumps(record) + "\n")
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.1e}")
        interrupted = all_sum(torch.tensor(float(bool(stop)), device=device)).item() > 0 \
            or step - first_step == cfg.stop_after
        if step % cfg.save_every == 0 or step == total_steps or interrupted:
            save_checkpoint(out, run.vlm, run.optim, step, dataclasses.asdict(cfg), run.tokenizer,
                            system_prompt(cfg, run.tokenizer), rank)
        if interrupted:
            if rank == 0:
                print(f"\nstopped: saved step {step} to {out / 'checkpoint'}; continue with --resume=true")
            break
    bar.close()
    if step == total_steps and run.eval_set is not None:
        final_evaluation(run, eval_compressed)
    if dist.is_initialized():
        dist.destroy_process_group()


def start_log(log_path: Path, step: int, rank: int) -> Path:
    """log.jsonl from the run's start to `step`: a resumed run rewrites history from its checkpoint on, so the lines
    of the steps it lost are dropped (a fresh run, at step 0, keeps none)."""
    if rank == 0:
        lines = log_path.read_text().splitlines() if log_path.exists() else []
        kept = [line for line in lines if line.endswith("}") and json.loads(line)["step"] < step]  # "}": whole
        log_path.write_text("".join(line + "\n" for line in kept))
    return log_path


def start_curve(run: Run, log_path: Path, compressed: bool) -> list | None:
    """The distillation's curve (--kl_every): the teacher's answer distributions on its fixed subset of the
    held-out questions, or None without it. A run at its start logs the KL before any update first ("step": -1);
    every process computes it, joining FSDP's gathers, and rank 0 writes it."""
    if not run.cfg.kl_every:
        return None
    curve = run.teacher[:run.cfg.kl_limit]
    if run.step == 0:
        kl = distillation_kl(run.vlm, run.eval_set, compressed, curve)["overall"]
        if run.rank == 0:
            with open(log_path, "a") as f:
                f.write(json.dumps({"step": -1, "kl": kl}) + "\n")
    return curve


def stop_on_signals() -> list:
    """Ctrl-C (or a scheduler's SIGTERM) asks for a checkpoint at the end of the step, not a dead run: the returned
    list is non-empty once asked. A second signal stops at once."""
    stop = []

    def request_stop(signum, frame):
        stop.append(signum)
        signal.signal(signum, signal.default_int_handler if signum == signal.SIGINT else signal.SIG_DFL)

    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)
    return stop


def final_evaluation(run: Run, compressed: bool):
    """VQA accuracy on the held-out set into eval.json, with the best score without the image beside it; an any-K
    model is scored at each of its K."""
    cfg, rank = run.cfg, run.rank
    result = evaluate(run.vlm, run.eval_set, compressed, cfg.eval_limit, progress=rank == 0, teacher=run.teacher)
    if cfg.voco_ks:  # the one any-K checkpoint, at each of its K (the default K's is the result above)
        result["by_num_voco"] = {k: dict(result) if k == cfg.num_voco else
                                 evaluate(run.vlm, run.eval_set.with_num_voco(k), compressed, cfg.eval_limit,
                                          teacher=run.teacher)
                                 for k in voco_ks(cfg)}
    result["blind"] = blind_baseline(run.eval_set, cfg.eval_limit)  # chance: the best answers without the image
    if rank == 0:
        kl = f", KL from the teacher {result['kl']['overall']:.4f} nats per answer token" if "kl" in result else ""
        print(f"VQA accuracy {result['overall']:.3f} on {result['n']} held-out questions (without the image at "
              f"best {result['blind']['overall']:.3f}{kl}): {result['by_type']}")
        (run.out / "eval.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
