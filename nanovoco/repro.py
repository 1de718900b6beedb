"""The paper's tables in miniature, on synthetic visual QA, from scratch, on a CPU: the main job.

    python -m nanovoco.repro                      # ~15 minutes on a 2-core CPU; writes runs/repro/
    python -m nanovoco.repro --scale 8            # a larger run (8x the data and steps), for a GPU
    python -m nanovoco.repro --seed 1 --out runs/repro-seed1   # other data and init, to see what a seed moves

As the paper does (Sec. 4.1), a VLM is trained first without compression (`full`, the upper bound), and every
compressed model starts from it: VoCo-LLaMA with K VoCo tokens (`voco`), the same K tokens trained without the VoCo
mask and tested with it (`lower_bound`), and the external compressors average pooling + linear (`avgpool`, as in
LLaMA-VID) and a Q-Former (`qformer`, as in BLIP-2). Each stage is one `train.py` run in its own folder; a stage that
finished (its eval.json exists) is not run again, and an interrupted one resumes from its checkpoint, so the same
command picks up where it stopped. Then it writes, into the run folder:

- Table 1: held-out accuracy per question type for each method at K = 1, and the compression retention rate
  (result - lower bound) / (upper bound - lower bound);
- Table 2: VoCo-LLaMA's accuracy and retention for K = 1, 2, 4, 8, 16;
- Table 7: the inference-efficiency report of nanovoco.bench on the same tiny shape;
- results.md (the three tables), results.json and retention.png (retention against K).
"""
import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

from nanovoco import bench
from nanovoco.config import preset

TRAIN = Path(__file__).resolve().parents[1] / "train.py"

KS = (1, 2, 4, 8, 16)
VISION_TOKENS = preset("tiny").num_image_tokens  # what the full model sees of an image (train.py's tiny-cpu model)
BASELINES = ("lower_bound", "avgpool", "qformer")


def stages(scale: float, seed: int = 0) -> dict:
    """Stage name -> train.py options. The step counts are the default's time budget on a 2-core CPU: the full model
    takes most of it (learning to read the image is the slow part), each compressed model adapts from it briefly.
    Scenes have 3 shapes, not the generator's 6, which left the full model too small a lead over answering without
    the image in the first budget of 600 steps (0.42 vs 0.385; the runs behind the choice are in docs/results.md)."""
    full_steps, compress_steps = max(1, round(1000 * scale)), max(1, round(60 * scale))
    common = ["--preset=tiny-cpu", f"--synthetic_images={max(1, round(2000 * scale))}", "--synthetic_objects=3",
              "--eval_every=0", f"--eval_limit={max(20, round(2000 * min(scale, 1)))}", f"--seed={seed}"]
    runs = {"full": [*common, "--mode=full", f"--max_steps={full_steps}", "--lr=2e-3"]}
    compressed = [("voco", k) for k in KS] + [(mode, 1) for mode in BASELINES]
    for mode, k in compressed:
        runs[f"{mode}_k{k}"] = [*common, f"--mode={mode}", f"--num_voco={k}", f"--max_steps={compress_steps}",
                                "--warmup_ratio=0.03", "--init={out}/full/checkpoint/model"]
    return runs


def run_stage(name: str, options: list, out: Path):
    """Train one stage unless it already finished; resume it if it was interrupted."""
    folder = out / name
    if (folder / "eval.json").exists():
        print(f"{name}: done before, kept ({folder / 'eval.json'})")
        return
    argv = [o.format(out=out) for o in options] + [f"--out_dir={folder}", f"--synthetic_dir={out / 'data'}"]
    if (folder / "checkpoint").exists() or (folder / "checkpoint.old").exists():
        argv.append("--resume=true")
    print(f"\n== {name}: python train.py {' '.join(argv)}", flush=True)
    wall, t0 = folder / "wall_time.txt", time.perf_counter()
    before = float(wall.read_text()) if wall.exists() else 0.0  # a resumed stage adds to its earlier time
    proc = subprocess.Popen([sys.executable, str(TRAIN), *argv])
    try:
        code = proc.wait()
    except KeyboardInterrupt:  # Ctrl-C reaches train.py too, which saves a checkpoint: let it finish
        code = proc.wait()
    finally:
        folder.mkdir(parents=True, exist_ok=True)
        wall.write_text(f"{before + time.perf_counter() - t0:.1f}\n")
    if code != 0 or not (folder / "eval.json").exists():  # train.py exits 0 after saving on Ctrl-C, unevaluated
        raise SystemExit(f"stage {name} did not finish (its output is above); run the same command again to resume")


def retention(result: float, lower: float, upper: float) -> float | None:
    """The paper's compression retention rate: how much of the gap between the lower and upper bound is kept; None
    when there is no gap (a run too short for the full model to beat the lower bound)."""
    if upper == lower:
        return None
    return (result - lower) / (upper - lower)


def percent(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.1%}"


def tables(out: Path) -> tuple[str, dict]:
    results = {name: json.loads((out / name / "eval.json").read_text()) for name in stages(1.0)}
    upper, lower = results["full"]["overall"], results["lower_bound_k1"]["overall"]
    types = sorted(results["full"]["by_type"])
    lines = ["## Table 1 in miniature: methods at K = 1", "",
             "| method | tokens per image | " + " | ".join(types) + " | overall | retention |",
             "|---|---:|" + "---:|" * (len(types) + 2)]
    rows = [("full (upper bound)", "full", VISION_TOKENS), ("VoCo-LLaMA", "voco_k1", 1),
            ("avgpool + linear", "avgpool_k1", 1), ("Q-Former", "qformer_k1", 1), ("lower bound", "lower_bound_k1", 1)]
    for label, name, tokens in rows:
        r = results[name]
        cells = [f"{r['by_type'][t]:.3f}" for t in types]
        lines.append(f"| {label} | {tokens} | " + " | ".join(cells) + f" | {r['overall']:.3f} | "
                     f"{percent(retention(r['overall'], lower, upper))} |")
    # The lower bound can fall below answering from the priors alone, and then a model that ignored the image would
    # still score some retention: this row says how much.
    results["no_image"] = results["full"]["blind"]
    lines.append("| no image (each type's most common answer) | 0 | " + " | ".join(
        f"{results['no_image']['by_type'][t]:.3f}" for t in types) + f" | {results['no_image']['overall']:.3f} | "
        f"{percent(retention(results['no_image']['overall'], lower, upper))} |")
    lines += ["", f"Held-out questions: {results['full']['n']}.", "",
              "## Table 2 in miniature: VoCo-LLaMA with K VoCo tokens", "",
              "| K | overall | retention |", "|---:|---:|---:|"]
    for k in KS:
        acc = results[f"voco_k{k}"]["overall"]
        lines.append(f"| {k} | {acc:.3f} | {percent(retention(acc, lower, upper))} |")
    summary = {name: {"overall": r["overall"], "by_type": r["by_type"],
                      "retention": retention(r["overall"], lower, upper)} for name, r in results.items()}
    return "\n".join(lines) + "\n", summary


def plot(summary: dict, path: Path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def pct(name):  # an undefined retention is not drawn
        r = summary[name]["retention"]
        return float("nan") if r is None else 100 * r

    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    ax.plot(KS, [pct(f"voco_k{k}") for k in KS], "o-", label="VoCo-LLaMA")
    for mode, marker in (("avgpool", "s"), ("qformer", "^")):
        ax.plot([1], [pct(f"{mode}_k1")], marker, label=mode)
    ax.axhline(100, color="gray", lw=0.8, ls="--")
    ax.axhline(0, color="gray", lw=0.8, ls=":")
    ax.axhline(pct("no_image"), color="tab:red", lw=0.8, ls="-.", label="no image (priors)")
    ax.set_xscale("log", base=2)
    ax.set_xlim(0.8, 1.25 * KS[-1])  # explicit: with every retention undefined there would be no data to fit
    ax.set_xticks(KS, [str(k) for k in KS])
    ax.set_xlabel("compressed tokens per image (K)")
    ax.set_ylabel("compression retention (%)")
    ax.set_title(f"{VISION_TOKENS} vision tokens -> K tokens (synthetic VQA)")
    ax.legend()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="runs/repro", type=Path, help="run folder (stages, tables, plot)")
    p.add_argument("--scale", type=float, default=1.0, help="multiplies the data and the training steps")
    p.add_argument("--seed", type=int, default=0, help="seed of the synthetic data and of the full model's init")
    args = p.parse_args(argv)
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    if args.scale <= 0:
        raise SystemExit(f"--scale {args.scale}: give a positive number (1 is the 15-minute CPU run)")
    made = out / "repro.json"  # finished stages are kept, so they must come from the same recipe
    recipe = {"scale": args.scale, "seed": args.seed}
    before = json.loads(made.read_text()) if made.exists() else recipe
    if before != recipe:
        raise SystemExit(f"{out} holds a run made with --scale {before['scale']} --seed {before['seed']}: continue it "
                         f"with those, or give this one another --out")
    made.write_text(json.dumps(recipe))
    t0 = time.perf_counter()
    for name, options in stages(args.scale, args.seed).items():
        run_stage(name, options, out)
    table, summary = tables(out)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    efficiency = bench.markdown(bench.report("tiny", device=device, repeats=10))
    walls = {name: float((out / name / "wall_time.txt").read_text()) for name in stages(args.scale)}
    per_stage = ", ".join(f"{k} {v:.0f} s" for k, v in walls.items())
    text = (f"# nanovoco reproduction (scale {args.scale}, seed {args.seed})\n\n{bench.machine(device)}. Training "
            f"and evaluation took {sum(walls.values()):.0f} s ({per_stage}); this invocation "
            f"{time.perf_counter() - t0:.0f} s.\n\n{table}\n## Table 7 in miniature: inference efficiency\n\n"
            f"{efficiency}")
    (out / "results.md").write_text(text)
    (out / "results.json").write_text(json.dumps(summary, indent=2))
    plot(summary, out / "retention.png")
    print("\n" + text + f"\nwrote {out / 'results.md'}, {out / 'results.json'}, {out / 'retention.png'}")


if __name__ == "__main__":
    main()
