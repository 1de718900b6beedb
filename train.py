"""Train VoCo-LLaMA, or one of the paper's baselines, with a hand-written loop (no Trainer, Accelerate or DeepSpeed).

One process, on the CPU or one GPU: a tiny VLM on synthetic visual QA (~9 CPU minutes), then VoCo-LLaMA from it
(~3 minutes), the paper's recipe in miniature (VoCo from scratch does not learn at this scale, see README):
    python train.py --preset=tiny-cpu --mode=full --out_dir=runs/full
    python train.py --preset=tiny-cpu --init=runs/full/checkpoint/model --max_steps=300 --warmup_ratio=0.03 \
        --out_dir=runs/voco
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
import textwrap
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

from nanovoco import checkpoint, cli, files, formats, synthetic, synthetic_video
from nanovoco.data import IGNORE_INDEX, LlavaDataset, collate, user_text
from nanovoco.evaluate import blind_baseline, vqa_accuracy
from nanovoco.config import CLIPVisionConfig, VoCoLlamaConfig, preset
from nanovoco.init import init_weights
from nanovoco.model import CLIPVisionTower, Llama, Projector, VoCoLlama
from nanovoco.parallel import all_sum, barrier, place, setup_distributed
from nanovoco.tokenizer import VOCO_SYSTEM, BPETokenizer, Tokenizer, load_tokenizer, train_tiny_tokenizer
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
    # compresses to any of them (VoCoLlama.compress(num_voco=k), infer.py --num_voco k); num_voco must be one of
    # them: the K of inference by default, and of eval.json's headline (eval.json's by_num_voco has every K)
    init: str = "tiny"  # a model preset trained from scratch ("tiny", "tiny-mha"), or a checkpoint directory
    vision_path: str = ""  # CLIP directory, for a LLaVA or plain LLaMA checkpoint, or a pretrained tower (HF CLIP
    # layout, e.g. from nanovoco.vision_pretrain) for a model from scratch
    projector_path: str = ""  # LLaVA's stage-1 mm_projector.bin, for a plain LLaMA checkpoint; without it, a plain
    # LLM (e.g. SmolLM2 from nanovoco.from_gguf) gets a new projector, trained with it
    freeze_vision: bool = True  # the paper freezes CLIP; the repro freezes its pretrained tiny tower likewise
    voco_init: str = "random"  # the new <voco> embedding: "random" (N(0, 0.02), the official code's) or "newline":
    # a copy of the "\n" token that precedes the VoCo tokens (see build_model)
    tokenizer: str = ""  # tokenizer.model or tokenizer.json; default: the init checkpoint's, or a tiny one trained
    # on the data

    # data
    data: str = "synthetic"  # a LLaVA-format JSON, "synthetic" (Sort-of-CLEVR images) or "synthetic_video" (moving
    # shapes, 4 frames per video), generated into out_dir/data
    image_folder: str = ""  # default: the JSON's directory
    eval_data: str = ""  # held-out LLaVA-format JSON for VQA accuracy; synthetic: generated with another seed
    synthetic_images: int = 2000  # images (or videos)
    synthetic_questions: int = 8  # questions per synthetic training image (or video), all in one multi-turn record
    synthetic_eval_images: int = 500  # held-out images (or videos), 4 questions each, one per record
    synthetic_objects: int = 0  # shapes per synthetic image or video; 0: the generator's default (6 or 3)
    synthetic_set: str = "layout"  # the synthetic images' questions: "layout" (where things are) or "objects" (the
    # object named by its colour); synthetic.QUESTION_SETS
    synthetic_dir: str = ""  # where the synthetic data is generated (default out_dir/data); runs can share it
    max_len: int = 2048  # tokens per sample; a longer sample loses the tail of its text
    system_prompt: str = VOCO_SYSTEM  # VoCo-LLaMA's Vicuna system prompt; a tiny model from scratch does without

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
    out_dir: str = "runs/train"  # checkpoint/, log.jsonl, eval.json and the generated data go here
    log_every: int = 1  # steps between log.jsonl lines
    save_every: int = 200  # steps between checkpoints (also saved at the end and on Ctrl-C)
    eval_every: int = 0  # steps between VQA evaluations (0: at the end only)
    eval_limit: int = 500  # held-out questions per evaluation
    resume: bool = False  # continue out_dir's checkpoint
    stop_after: int = 0  # > 0: checkpoint and stop after this many steps of this invocation (time-limited jobs)
    seed: int = 0  # the data order, the new weights and the synthetic data


PRESETS = {
    "tiny-cpu": dict(init="tiny", data="synthetic", system_prompt="", synthetic_images=2000, max_len=256,
                     batch_size=32, micro_batch_size=16, lr=1e-3, warmup_ratio=0.05, epochs=16.0, save_every=100,
                     eval_every=250, eval_limit=400),
    "llava-7b": dict(init="", data="", batch_size=128, micro_batch_size=4, lr=2e-5, warmup_ratio=0.03, epochs=2.0,
                     max_len=2048, activation_checkpointing=True, save_every=500, log_every=10),
}


def parse_args(argv) -> TrainConfig:
    """--preset=name, then --field=value (or --field value) overrides, each converted to the type of the field's
    default; -h / --help prints every option and exits. Hyphens and underscores in a name are the same (cli.respell);
    an unknown name is an error naming the closest known one."""
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    known = {"preset", *fields}
    values, overrides, rest = {}, [], list(argv)
    while rest:
        arg = rest.pop(0)
        if arg in ("-h", "--help"):
            print(usage())
            sys.exit(0)
        if not arg.startswith("--"):
            raise ValueError(f"options are --name=value or --name value, got {arg!r} (python train.py --help lists "
                             f"them)")
        name, eq, value = arg[2:].partition("=")
        name = cli.respell(name, known)
        if name not in known:
            raise ValueError(f"unknown option --{name}{cli.closest(name, known)} (python train.py --help lists them)")
        if not eq:  # --name value; a boolean alone (--resume) means true
            if name in fields and type(fields[name].default) is bool and (not rest or rest[0].startswith("--")):
                value = "true"
            elif not rest or rest[0].startswith("--"):
                raise ValueError(f"--{name} needs a value: --{name}=VALUE or --{name} VALUE")
            else:
                value = rest.pop(0)
        if name == "preset":
            if value not in PRESETS:
                raise ValueError(f"unknown preset {value!r}: choose from {', '.join(PRESETS)}")
            values.update(PRESETS[value])
        else:
            overrides.append((name, value))
    for name, value in overrides:
        kind = type(fields[name].default)
        if kind is bool:
            if value.lower() not in ("true", "false", "1", "0"):
                raise ValueError(f"--{name} takes true or false, got {value!r}")
            values[name] = value.lower() in ("true", "1")
        else:
            try:
                values[name] = kind(value)
            except ValueError:
                raise ValueError(f"--{name} takes a {kind.__name__}, got {value!r}") from None
    cfg = TrainConfig(**values)
    if cfg.mode not in MODES:
        raise ValueError(f"--mode must be one of {', '.join(MODES)}, got {cfg.mode!r}")
    if cfg.voco_init not in ("random", "newline"):
        raise ValueError(f"--voco_init must be random or newline, got {cfg.voco_init!r}")
    if cfg.synthetic_set not in synthetic.QUESTION_SETS:
        raise ValueError(f"--synthetic_set must be one of {', '.join(synthetic.QUESTION_SETS)}, got "
                         f"{cfg.synthetic_set!r}")
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
    return cfg


def usage() -> str:
    """The --help text: the command lines, the presets, then every TrainConfig field by group, with its default and
    its comment (cli.dataclass_help)."""
    lines = ["usage: python train.py [--preset=NAME] [--name=value | --name value ...]", "",
             __doc__.split("\n")[0], "",
             "Names take underscores or hyphens (--max_steps, --max-steps); booleans take true/false.", "",
             "--preset=NAME sets these options first (the others override them):"]
    for preset_name, options in PRESETS.items():
        lines += textwrap.wrap(f"{preset_name}: " + ", ".join(f"{n}={v}" for n, v in options.items()), 100,
                               initial_indent="  ", subsequent_indent="    ")
    lines.append("")
    for group, items in cli.dataclass_help(TrainConfig):
        lines.append(f"{group}:")
        for name, default, text in items:
            option = f"  --{name}={str(default)[:40] + '...' if len(str(default)) > 40 else default}"
            lines += textwrap.wrap(text, 100, initial_indent=f"{option:<34}" if len(option) < 34 else
                                   option + "\n" + " " * 34, subsequent_indent=" " * 34) or [option]
        lines.append("")
    return "\n".join(lines)


def voco_ks(cfg) -> tuple[int, ...] | None:
    """The K of any-K training (--voco_ks), increasing; None if the option is not a list of distinct K >= 1."""
    try:
        ks = [int(k) for k in cfg.voco_ks.split(",")]
    except ValueError:
        return None
    return tuple(sorted(ks)) if len(set(ks)) == len(ks) and min(ks) >= 1 else None


# ----------------------------------------------------------------------------------------------------------------
# Data, tokenizer and model

def prepare_data(cfg, out: Path, rank: int, size: int):
    """The train and held-out LLaVA JSON files: the user's, or the synthetic sets of size x size images,
    generated once by rank 0."""
    if cfg.data not in ("synthetic", "synthetic_video"):
        if not cfg.data:
            raise ValueError("--data=<LLaVA-format JSON> is required by this preset")
        for path in (cfg.data, cfg.eval_data):
            if path and not Path(path).is_file():
                raise ValueError(f"{path} does not exist: --data and --eval_data take LLaVA-format JSON files")
        return Path(cfg.data), Path(cfg.eval_data) if cfg.eval_data else None
    data = Path(cfg.synthetic_dir) if cfg.synthetic_dir else out / "data"
    if rank == 0:
        options = {"n_objects": cfg.synthetic_objects} if cfg.synthetic_objects else {}
        if cfg.data == "synthetic":  # videos have one set of questions
            options["question_set"] = cfg.synthetic_set
        if not (data / "train" / "data.json").exists():
            if cfg.data == "synthetic":
                synthetic.generate(data / "train", n_images=cfg.synthetic_images, questions_per_image=
                                   cfg.synthetic_questions, seed=cfg.seed, image_size=size, multi_turn=True, **options)
            else:
                synthetic_video.generate(data / "train", n_videos=cfg.synthetic_images, questions_per_video=
                                         cfg.synthetic_questions, seed=cfg.seed, image_size=size, multi_turn=True,
                                         **options)
        if not (data / "eval" / "data.json").exists():  # held out: other images, one question per record
            generate = synthetic.generate if cfg.data == "synthetic" else synthetic_video.generate
            generate(data / "eval", cfg.synthetic_eval_images, seed=cfg.seed + 10_000, image_size=size, **options)
    barrier()
    return data / "train" / "data.json", data / "eval" / "data.json"


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


def model_config(cfg: TrainConfig, source) -> VoCoLlamaConfig:
    """The shape of the model to train, read without its weights: what the data is drawn and laid out for (image
    size, vision tokens), known before the model is built. From the checkpoint, else the preset with the
    --vision_path CLIP's vision part."""
    if new_projector(cfg, source):
        llm, clip = checkpoint.Checkpoint(source), checkpoint.Checkpoint(cfg.vision_path)
        formats.require_kind(clip, "clip")
        config = VoCoLlamaConfig.from_dicts(formats.llama_config(llm.config, llm.config_file),
                                            formats.clip_config(clip.config, clip.config_file))
    elif source is not None:
        config = formats.vlm_parts(source, cfg.vision_path or None, cfg.projector_path or None,
                                   VoCoLlamaConfig.from_dicts)[0]
    else:
        config = preset(cfg.init)
        if cfg.vision_path:
            clip = checkpoint.Checkpoint(cfg.vision_path)
            formats.require_kind(clip, "clip")
            config.vision = CLIPVisionConfig(**formats.clip_config(clip.config, clip.config_file))
    return with_compressor(config, cfg)


def new_projector(cfg: TrainConfig, source) -> bool:
    """Whether the VLM starts from a plain LLM checkpoint and a vision tower with a new projector (no
    --projector_path): a pretrained LLM without a LLaVA stage 1, like SmolLM2 with the repro's tiny tower."""
    if source is None or cfg.projector_path or formats.require_kind(
            checkpoint.Checkpoint(source), "llama", "llava", "llava-hf") != "llama":
        return False
    if not cfg.vision_path:
        raise ValueError(f"{source} is a plain LLM checkpoint: pass --vision_path=<CLIP directory> (and "
                         f"--projector_path=<LLaVA-1.5 mm_projector.bin>, or none for a new projector)")
    return True


def with_compressor(config: VoCoLlamaConfig, cfg: TrainConfig) -> VoCoLlamaConfig:
    """The baselines' config: an external compressor to --num_voco tokens, unless the checkpoint has one already."""
    if cfg.mode in ("avgpool", "qformer") and config.compressor == "none":
        return dataclasses.replace(config, compressor=cfg.mode, compressor_tokens=cfg.num_voco)
    return config


def build_model(cfg: TrainConfig, tokenizer, source) -> VoCoLlama:
    """The model to train: from a checkpoint (or a preset, from scratch), set up for the mode. VoCo modes add the
    <voco> token to the vocabulary; the baselines get a new compressor; nothing else changes."""
    if source is None:  # an LLM from scratch, with a vision tower from scratch or pretrained (--vision_path)
        torch.manual_seed(cfg.seed)
        config = preset(cfg.init, vocab_size=tokenizer.vocab_size)
        vision = CLIPVisionTower.from_pretrained(cfg.vision_path) if cfg.vision_path else None
        if vision is not None:
            config.vision = vision.config
        vlm = VoCoLlama(config)
        # The projector keeps PyTorch's default init (std ~ 1/sqrt(3 fan_in)): at 0.02 its two layers would shrink
        # the image features some 50x, and the LLM would never learn that the image is there.
        init_weights(vlm.llm)
        init_weights(vlm.vision)
        if vision is not None:
            vlm.vision = vision
    elif new_projector(cfg, source):  # a pretrained LLM and tower, joined by a projector trained from scratch
        llm, vision = Llama.from_pretrained(source), CLIPVisionTower.from_pretrained(cfg.vision_path)
        with torch.device("meta"):  # the parts are loaded: build the shell without allocating them again
            vlm = VoCoLlama(VoCoLlamaConfig(text=llm.config, vision=vision.config))  # their configs, the same objects
        torch.manual_seed(cfg.seed)
        vlm.llm, vlm.vision = llm, vision
        vlm.projector = Projector(vlm.config.projector_type, vision.config.hidden_size, llm.config.hidden_size)
    else:
        vlm = VoCoLlama.from_pretrained(source, vision_path=cfg.vision_path or None,
                                        projector_path=cfg.projector_path or None)
    c = vlm.config
    if cfg.mode in ("voco", "lower_bound") and c.num_voco == 0:
        if tokenizer.vocab_size > c.text.vocab_size:
            vlm.llm.resize_vocab(tokenizer.vocab_size)  # <voco> becomes id 32000 on Vicuna's vocabulary
        c.voco_token_id, c.num_voco = tokenizer.special_ids["<voco>"], cfg.num_voco
        if cfg.voco_init == "newline":
            # The "\n" after the image is, in the trained VLM, the token that has attended to the whole image at
            # every layer. A VoCo token that starts as its copy starts out gathering the image the same way, rather
            # than from a random embedding: on the repro's tiny model the VoCo stage then escapes its plateau of
            # answering from priors in ~60 steps instead of ~170 (docs/results.md).
            newline = tokenizer.encode("\n", bos=False)[-1]
            with torch.no_grad():
                vlm.llm.embed_tokens.weight[c.voco_token_id] = vlm.llm.embed_tokens.weight[newline]
    if cfg.mode in ("voco", "lower_bound"):
        c.num_voco = cfg.num_voco  # the K it trains on (of --voco_ks, the default one): inference's default K
    baseline = with_compressor(c, cfg)
    if baseline is not c:
        torch.manual_seed(cfg.seed)
        new = VoCoLlama(baseline)
        missing, unexpected = new.load_state_dict(vlm.state_dict(), strict=False)
        assert not unexpected and all(k.startswith("compressor.") for k in missing), (missing, unexpected)
        vlm = new
    vlm.vision.requires_grad_(not cfg.freeze_vision)  # the paper trains the LLM and the projector, not CLIP
    return vlm


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


def evaluate(vlm, eval_set, compressed: bool, limit: int, progress=False) -> dict:
    """VQA accuracy in the middle of training. Every process evaluates the same questions, so that FSDP's
    collectives line up; the root's own parameters (embeddings, projector, head) are gathered by hand because
    generation calls vlm.embed and vlm.llm rather than vlm.forward, which is what triggers FSDP's gathering."""
    if hasattr(vlm, "unshard"):
        vlm.unshard()
    result = vqa_accuracy(vlm, eval_set, compressed, limit=limit, progress=progress)
    if hasattr(vlm, "reshard"):
        vlm.reshard()
    vlm.train()
    return result


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
    rank, world, device = setup_distributed()
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
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
    config = model_config(build, source)
    train_json, eval_json = prepare_data(cfg, out, rank, config.vision.image_size)
    tokenizer = load_tokenizer(resume_from / "model" if resume_from else
                               cfg.tokenizer if cfg.tokenizer else
                               tiny_tokenizer(train_json, out, rank) if cfg.init in FROM_SCRATCH else cfg.init)
    num_voco = (voco_ks(cfg) if cfg.voco_ks else cfg.num_voco) if cfg.mode in ("voco", "lower_bound") else 0
    folder = lambda j: Path(cfg.image_folder) if cfg.image_folder else j.parent  # noqa: E731
    data_args = dict(num_voco=num_voco, max_len=cfg.max_len, system=cfg.system_prompt)
    train_set = LlavaDataset(train_json, folder(train_json), tokenizer, config, **data_args)
    eval_set = LlavaDataset(eval_json, folder(eval_json), tokenizer, config, **data_args) if eval_json else None
    if eval_set is not None and cfg.voco_ks:
        eval_set = eval_set.with_num_voco(cfg.num_voco)  # every question at the default K; the end: at each K

    # model
    vlm = place(lambda: build_model(build, tokenizer, source), device, rank, world, freeze_vision=cfg.freeze_vision,
                activation_checkpointing=cfg.activation_checkpointing)
    params = [p for p in vlm.parameters() if p.requires_grad]
    optim = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=device.type == "cuda")
    total_steps = cfg.max_steps or math.ceil(cfg.epochs * len(train_set) / cfg.batch_size)
    step = 0
    if resume_from:
        state = {"optimizer": get_optimizer_state_dict(vlm, optim)}
        dcp.load(state, checkpoint_id=str(resume_from / "optimizer"))
        set_optimizer_state_dict(vlm, optim, state["optimizer"])
        step = saved["step"]
    return Run(cfg, rank, world, device, out, vlm, optim, params, train_set, eval_set, tokenizer, total_steps,
               step)


def train_step(run: Run, micro: list[dict], train_mask, autocast, step: int) -> tuple[float, float]:
    """One optimizer step on a global batch, of which `micro` holds this process's micro-batches: the forward and
    backward of each, the loss normalised by the answer tokens of the whole batch, gradient clipping, and the update
    unless the loss or the gradient is not finite. Returns (loss, gradient norm)."""
    device, world = run.device, run.world
    # position t predicts token t + 1: the loss (and the head) only where that token is an answer's
    answers = [F.pad(b["labels"][:, 1:] != IGNORE_INDEX, (0, 1)) for b in micro]
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
    cfg, rank, world, device, out, vlm, optim, params = (run.cfg, run.rank, run.world, run.device, run.out, run.vlm,
                                                          run.optim, run.params)
    train_set, eval_set, total_steps, step = run.train_set, run.eval_set, run.total_steps, run.step
    train_mask, eval_compressed = mode_masks(cfg.mode)
    order = sample_order(len(train_set), total_steps, cfg.batch_size, cfg.seed)
    log_path = out / "log.jsonl"
    if rank == 0:  # a resumed run rewrites history from its checkpoint on: drop the lines of the lost steps
        lines = log_path.read_text().splitlines() if log_path.exists() else []  # fresh: step 0, none kept
        kept = [line for line in lines if line.endswith("}") and json.loads(line)["step"] < step]  # "}": whole
        log_path.write_text("".join(line + "\n" for line in kept))
    autocast = torch.autocast("cuda", torch.bfloat16, enabled=device.type == "cuda" and world == 1)

    stop = []  # Ctrl-C (or a scheduler's SIGTERM) asks for a checkpoint at the end of the step, not a dead run

    def request_stop(signum, frame):
        stop.append(signum)
        signal.signal(signum, signal.default_int_handler if signum == signal.SIGINT else signal.SIG_DFL)  # twice: now

    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)
    if rank == 0:
        n_train = sum(p.numel() for p in params)
        print(f"{cfg.mode}: {n_train / 1e6:.1f}M trainable parameters, {len(train_set)} samples, {total_steps} steps "
              f"of {cfg.batch_size} ({world} process(es) x {cfg.batch_size // (world * cfg.micro_batch_size)} x "
              f"{cfg.micro_batch_size}) on {device}")
    bar = tqdm(total=total_steps, initial=step, disable=rank != 0, desc=cfg.mode)
    first_step = step
    while step < total_steps:
        t0 = time.perf_counter()
        lr = schedule(step, total_steps, cfg)
        for group in optim.param_groups:
            group["lr"] = lr
        mine = order[step * cfg.batch_size:(step + 1) * cfg.batch_size][rank::world]
        micro = [collate([train_set[i] for i in mine[k:k + cfg.micro_batch_size]])
                 for k in range(0, len(mine), cfg.micro_batch_size)]
        loss, grad_norm = train_step(run, micro, train_mask, autocast, step)
        step += 1
        dt = time.perf_counter() - t0
        tokens = all_sum(torch.tensor(sum(int((b["segments"] != PAD).sum()) for b in micro), device=device)).item()
        record = {"step": step - 1, "loss": loss, "lr": lr, "grad_norm": grad_norm, "tokens_per_s": tokens / dt}
        if cfg.eval_every and step % cfg.eval_every == 0 and step < total_steps and eval_set is not None:
            record["eval"] = evaluate(vlm, eval_set, eval_compressed, cfg.eval_limit)
        if rank == 0:
            if step % cfg.log_every == 0 or "eval" in record:
                with open(log_path, "a") as f:
                    f.write(json.dumps(record) + "\n")
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.1e}")
        interrupted = all_sum(torch.tensor(float(bool(stop)), device=device)).item() > 0 \
            or step - first_step == cfg.stop_after
        if step % cfg.save_every == 0 or step == total_steps or interrupted:
            save_checkpoint(out, vlm, optim, step, dataclasses.asdict(cfg), run.tokenizer, cfg.system_prompt, rank)
        if interrupted:
            if rank == 0:
                print(f"\nstopped: saved step {step} to {out / 'checkpoint'}; continue with --resume=true")
            break
    bar.close()
    if step == total_steps and eval_set is not None:
        result = evaluate(vlm, eval_set, eval_compressed, cfg.eval_limit, progress=rank == 0)
        if cfg.voco_ks:  # the one any-K checkpoint, at each of its K (the default K's is the result above)
            result["by_num_voco"] = {k: dict(result) if k == cfg.num_voco else
                                     evaluate(vlm, eval_set.with_num_voco(k), eval_compressed, cfg.eval_limit)
                                     for k in voco_ks(cfg)}
        result["blind"] = blind_baseline(eval_set, cfg.eval_limit)  # chance: the best answers without the image
        if rank == 0:
            print(f"VQA accuracy {result['overall']:.3f} on {result['n']} held-out questions (without the image at "
                  f"best {result['blind']['overall']:.3f}): {result['by_type']}")
            (out / "eval.json").write_text(json.dumps(result, indent=2))
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
