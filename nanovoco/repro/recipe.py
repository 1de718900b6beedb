"""The reproduction's recipe as data: the stages every seed runs, and the step counts behind them.

`stages` gives each stage's command; run.py runs them in order and skips those that finished. The choices behind
the numbers are measured in docs/results.md ("How the recipe was chosen").
"""
from pathlib import Path

from nanovoco.repro import vision_pretrain

ROOT = Path(__file__).resolve().parents[2]  # the repository, where train.py is
KS = (1, 4, 16)  # the default's Table 2: what the 15-minute budget holds (a K is a stage of ~2 minutes)
BASELINES = ("lower_bound", "avgpool", "qformer")
VISION_TOKENS = 64  # 64 x 64 images in 8 x 8 patches (vision_pretrain.TOWER)
IMAGE_SIZE = vision_pretrain.TOWER.image_size  # the synthetic images are drawn at the tower's size
TABLE1 = (("full (upper bound)", "full"), ("VoCo-LLaMA", "voco_k1"), ("avgpool + linear", "avgpool_k1"),
          ("Q-Former", "qformer_k1"), ("lower bound", "lower_bound_k1"))
ORDER = ("voco_k1", "avgpool_k1", "qformer_k1", "lower_bound_k1")  # the paper's Table 1, best first
# The images' question sets (--questions): (synthetic.py's question set, objects per image). "graded" (the
# default) asks the layout questions and two about the quarters of scenes whose content grows, from 1 to 8
# objects: the measure of content by which the report splits retention; "layout" is the earlier headline, the
# layout questions of 3 objects per image; "objects" the questions about an object named by its colour
# (docs/results.md).
QUESTIONS = {"graded": ("graded", "1-8"), "layout": ("layout", "3"), "objects": ("objects", "3")}
# Every compressed stage measures the distillation (train.py --teacher, the full stage's model): the KL on all the
# held-out answers at the end, and its curve every KL_EVERY steps on the first KL_SUBSET held-out questions
KL_EVERY, KL_SUBSET = 50, 200
# 750 held-out images x 4 questions: 3,000 questions, so that one standard error of a retention is ~2-3 points
HELD_OUT_IMAGES = 750
BATCH = 32  # images per step of the full stage (train.py's tiny-cpu preset)
FULL_STEPS = 700
COMPRESSED_STEPS = 600  # every compressed stage alike, so that Table 1 compares methods trained equally
# a quarter of the full stage's batch: the same images and compute as 300 steps of 16, in twice the updates, which
# the compressed stages need more than larger batches (K = 16: 94.6% mean of seeds 0-2, against 85.4%)
COMPRESSED_BATCH = 8
# --video: VIDEO_STEPS steps of 32 moving-shapes videos (~8 CPU minutes, + ~1 of evaluation), each seen once, and
# 250 held-out videos x 4 questions. VIDEO_OBJECTS: the questions that need the order must not hinge on finding an
# object by its colour, which no model of this miniature learns: with one object, every question about it is about
# the whole frame. Why these numbers: docs/results.md, "How the recipe was chosen"
VIDEO_STEPS, VIDEO_OBJECTS, HELD_OUT_VIDEOS = 450, 1, 250
# --llm smollm2: a training step of the 30-layer SmolLM2 costs ~20x the tiny LLM's on a CPU (~12 s at batch 16), so
# its scale 1 is short: SMOLLM2_STEPS (full, compressed) at batch 16, each image seen once, 250 held-out images.
# lr 1e-4: a pretrained LLM is fine-tuned, not trained from scratch (1e-3 is the tiny LLM's). --scale multiplies the
# steps (the GPU recipe, benchmarks/gpu_smollm2.sh, runs --scale 20).
LLMS = ("tiny", "smollm2")
SMOLLM2_STEPS, SMOLLM2_BATCH, SMOLLM2_HELD_OUT, SMOLLM2_LR = (100, 50), 16, 250, "1e-4"


def stages(scale: float, seed: int = 0, ks=KS, any_k: bool = False, video: bool = False,
           questions: str = "graded", llm: str = "tiny", longer=()) -> dict:
    """Stage name -> the command that makes it (run from the repository root; {out} is the seed's folder, {run} the
    run's). The step counts are the default's time budget on a 2-core CPU; the choices behind them are measured in
    docs/results.md. any_k adds `voco_any_<ks>`: one VoCo-LLaMA model for every K of ks (train.py --voco_ks),
    trained as long as two per-K stages. video adds `video_data` and `video`: the K = 1 VoCo-LLaMA model trained
    on moving-shapes videos, a VoCo token per frame. questions is the images' question set (QUESTIONS). llm
    "smollm2" starts the full stage from SmolLM2 ({run}/smollm2) and adds
    `zero_shot`, its answers to scenes as text. longer (factors, e.g. (2, 4)) adds `voco_k<K>_x<f>`: VoCo-LLaMA at
    each K trained f times as long, which tells whether Table 2's curve is what K tokens can hold (its gaps stay) or
    how fast they learn it (its gaps close)."""
    steps = lambda n: scaled(n, scale)  # noqa: E731
    runs = {"vision": ["-m", "nanovoco.repro.vision_pretrain", "--out", "{out}/vision", "--steps", steps(300),
                       "--images", steps(4000), "--seed", str(seed)]}
    full_steps, compressed_steps, batch, held_out = (
        (FULL_STEPS, COMPRESSED_STEPS, BATCH, HELD_OUT_IMAGES) if llm == "tiny" else
        (*SMOLLM2_STEPS, SMOLLM2_BATCH, SMOLLM2_HELD_OUT))
    held_out = max(1, round(held_out * min(scale, 1)))  # a larger run is not scored on more questions
    # as many training images as the full stage reads, so that it never sees one twice (read many times, they are
    # memorised: docs/results.md, "How the recipe was chosen")
    question_set, n_objects = QUESTIONS[questions]
    runs["data"] = ["-m", "nanovoco.repro.synthetic", "--out", "{out}/data", "--n_images", steps(full_steps * batch),
                    "--questions_per_image", "8", "--multi_turn", "--held_out", str(held_out), "--n_objects",
                    n_objects, "--questions", question_set, "--image_size", str(IMAGE_SIZE), "--seed", str(seed)]
    common = ["train.py", "--preset=tiny-cpu", "--data={out}/data/train/data.json",
              "--eval_data={out}/data/eval/data.json", "--eval_every=0", "--eval_limit=0", f"--seed={seed}"]
    if llm == "tiny":
        runs["full"] = [*common, "--mode=full", "--init=tiny-mha", "--vision_path={out}/vision",
                        f"--max_steps={steps(full_steps)}", "--lr=1e-3"]
    else:  # a new projector joins SmolLM2 to the tower (train.py: a plain LLM without --projector_path); its
        # conversations keep the default system turn of SmolLM2's chat template, which its instruction tuning saw
        common += [f"--batch_size={batch}", f"--micro_batch_size={batch}", f"--lr={SMOLLM2_LR}",
                   "--system_prompt=default"]
        runs["full"] = [*common, "--mode=full", "--init={run}/smollm2", "--vision_path={out}/vision",
                        f"--max_steps={steps(full_steps)}"]
        runs["zero_shot"] = ["-m", "nanovoco.repro.scene_text", "--llm", "{run}/smollm2", "--data",
                             "{out}/data/eval/data.json", "--out", "{out}/zero_shot",
                             "--image_size", str(IMAGE_SIZE)]
    distill = ["--teacher={out}/full/checkpoint/model", f"--kl_every={KL_EVERY}", f"--kl_limit={KL_SUBSET}"]

    def compressed(mode: str, k: int, n_steps: int) -> list:
        # <voco> starts as a copy of the "\n" that precedes it (train.py --voco_init), for VoCo-LLaMA and its lower
        # bound alike: its plateau of answering from the priors is shorter than from the official random init
        voco_init = ["--voco_init=newline"] if mode in ("voco", "lower_bound") else []
        batch = [f"--batch_size={COMPRESSED_BATCH}", f"--micro_batch_size={COMPRESSED_BATCH}"] if llm == "tiny" else []
        return [*common, f"--mode={mode}", f"--num_voco={k}", *voco_init, *batch, f"--max_steps={steps(n_steps)}",
                "--warmup_ratio=0.03", "--init={out}/full/checkpoint/model", *distill]

    for mode, k in [("voco", k) for k in ks] + [(mode, 1) for mode in BASELINES]:
        runs[f"{mode}_k{k}"] = compressed(mode, k, compressed_steps)
    for f, k in [(f, k) for f in longer for k in ks]:
        runs[f"voco_k{k}_x{f}"] = compressed("voco", k, f * compressed_steps)
    if any_k:
        runs[any_k_stage(ks)] = [*compressed("voco", 1, 2 * compressed_steps), f"--voco_ks={','.join(map(str, ks))}"]
    if video:
        runs.update(video_stages(scale, seed))
    return runs


def video_stages(scale: float, seed: int) -> dict:
    """--video's stages: the moving-shapes data, and the K = 1 VoCo-LLaMA model trained on it."""
    steps = lambda n: scaled(n, scale)  # noqa: E731
    videos = max(1, round(HELD_OUT_VIDEOS * min(scale, 1)))
    return {"video_data": ["-m", "nanovoco.repro.synthetic_video", "--out", "{out}/video_data", "--n_videos",
                           steps(VIDEO_STEPS * BATCH), "--questions_per_video", "8", "--multi_turn", "--held_out",
                           str(videos), "--n_objects", str(VIDEO_OBJECTS), "--image_size", str(IMAGE_SIZE),
                           "--seed", str(seed)],
            "video": ["train.py", "--preset=tiny-cpu", "--data={out}/video_data/train/data.json",
                      "--eval_data={out}/video_data/eval/data.json", "--eval_every=0", "--eval_limit=0",
                      f"--seed={seed}", "--mode=voco", "--num_voco=1", "--max_len=512",
                      f"--max_steps={steps(VIDEO_STEPS)}", "--warmup_ratio=0.03",
                      "--init={out}/voco_k1/checkpoint/model"]}


def scaled(n: int, scale: float) -> str:
    """A step or item count of the recipe at --scale, as a command-line value (at least 1)."""
    return str(max(1, round(n * scale)))


def finished(name: str, folder: Path) -> Path:
    """The file that a finished stage leaves in its folder: a data stage's held-out set, the others' eval.json."""
    return folder / "eval" / "data.json" if name in ("data", "video_data") else folder / "eval.json"


def any_k_stage(ks) -> str:
    """The any-K stage's name, which holds its K: a run for another set of K is a stage of its own."""
    return "voco_any_" + "-".join(map(str, ks))
