"""train.py end to end, in subprocesses as a user runs it: FSDP2 on 2 processes equals 1 process, an interrupted run
resumes onto the same loss curve, NaN stops the run before it corrupts the weights, training from pretrained
LLaVA-style weights, and clear errors for bad options."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from nanovoco.repro import synthetic_video
from nanovoco.model import CLIPVisionTower, VoCoLlama
from nanovoco.repro.synthetic import generate
from nanovoco.tokenizer import VOCO_SYSTEM, Tokenizer, load_tokenizer, train_tiny_tokenizer
from tiny import bpe_tokenizer, hf_clip, hf_llama, hf_llava, llava_original, stage1

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Synthetic train/eval sets shared by every run in this module (generated once)."""
    d = tmp_path_factory.mktemp("synthetic")
    generate(d / "train", n_images=64, seed=0)
    generate(d / "eval", n_images=8, seed=1)
    return d


def data_options(data: Path) -> list[str]:
    return [f"--data={data / 'train' / 'data.json'}", f"--eval_data={data / 'eval' / 'data.json'}"]


def args(data, out, *extra):
    return ["--preset=tiny-cpu", *data_options(data), f"--out_dir={out}", "--batch_size=8",
            "--micro_batch_size=2", "--max_steps=6", "--eval_limit=8", "--save_every=3", *extra]


def train(*argv, nproc=1, check=True):
    cmd = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
           if nproc > 1 else [sys.executable]) + [str(ROOT / "train.py"), *argv]
    result = subprocess.run(cmd, env=ENV, cwd=ROOT, capture_output=True, text=True, timeout=300)
    if check and result.returncode != 0:
        raise AssertionError(f"train.py failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result


def losses(out):
    return [json.loads(line)["loss"] for line in (Path(out) / "log.jsonl").read_text().splitlines()]


def test_fsdp_two_processes_match_one_and_resume(tmp_path, data):
    """FSDP2 on 2 gloo processes gives the single-process losses on the same global batches; its sharded
    checkpoint (stopped after 3 steps) resumes, on 2 processes, onto the same curve."""
    train(*args(data, tmp_path / "one"))
    train(*args(data, tmp_path / "two", "--stop_after=3"), nproc=2)
    assert len(losses(tmp_path / "two")) == 3
    assert json.loads((tmp_path / "two" / "checkpoint" / "state.json").read_text())["step"] == 3
    train(*args(data, tmp_path / "two", "--resume=true"), nproc=2)
    one, two = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert len(one) == len(two) == 6
    torch.testing.assert_close(torch.tensor(two), torch.tensor(one), atol=1e-5, rtol=1e-5)
    # the saved weights load with from_pretrained, and equal across the two runs
    a = VoCoLlama.from_pretrained(tmp_path / "one" / "checkpoint" / "model")
    b = VoCoLlama.from_pretrained(tmp_path / "two" / "checkpoint" / "model")
    assert a.config.num_voco == 2 and a.config.voco_token_id >= 0
    for (k, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-4, msg=k)


def test_ctrl_c_saves_and_resume_reproduces_the_loss_curve(tmp_path, data):
    train(*args(data, tmp_path / "straight", "--max_steps=10"))
    out = tmp_path / "interrupted"
    proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *args(data, out, "--max_steps=10")], env=ENV,
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    log = out / "log.jsonl"
    while not (log.exists() and len(log.read_text().splitlines()) >= 2):
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr
    assert "stopped: saved step" in stdout
    stopped_at = json.loads((out / "checkpoint" / "state.json").read_text())["step"]
    assert 2 <= stopped_at < 10
    result = train(*args(data, out, "--max_steps=10"), check=False)
    assert result.returncode != 0 and "--resume=true" in result.stderr  # never overwrites a run by accident
    train(*args(data, out, "--max_steps=10", "--resume=true"))
    assert losses(out) == losses(tmp_path / "straight")  # bit for bit: same weights, optimizer state, data, lr


def test_resume_refuses_changed_settings(tmp_path, data):
    train(*args(data, tmp_path, "--stop_after=1"))
    result = train(*args(data, tmp_path, "--resume=true", "--lr=0.5"), check=False)
    assert result.returncode != 0 and "trained with other settings {'lr': (0.001, 0.5)}" in result.stderr


def test_nan_stops_before_the_optimizer_step(tmp_path, data):
    train(*args(data, tmp_path / "first", "--mode=full", "--max_steps=1"))
    model = tmp_path / "first" / "checkpoint" / "model"
    state = load_file(model / "model.safetensors")
    state["model.norm.weight"] = torch.full_like(state["model.norm.weight"], float("nan"))
    save_file(state, model / "model.safetensors")
    before = (model / "model.safetensors").read_bytes()
    result = train(*args(data, tmp_path / "second", f"--init={model}", "--mode=full"), check=False)
    assert result.returncode != 0
    assert "FloatingPointError: step 0: loss nan" in result.stderr
    assert "stopping before the optimizer step, so the weights are not corrupted" in result.stderr
    assert (model / "model.safetensors").read_bytes() == before
    assert not (tmp_path / "second" / "checkpoint").exists()


@pytest.mark.parametrize("mode", ["full", "lower_bound", "avgpool", "qformer"])
def test_modes_train_and_save(tmp_path, data, mode):
    train(*args(data, tmp_path, f"--mode={mode}", "--max_steps=3", "--num_voco=1"))
    vlm = VoCoLlama.from_pretrained(tmp_path / "checkpoint" / "model")
    c = vlm.config
    assert (c.compressor, c.compressor_tokens) == ((mode, 1) if mode in ("avgpool", "qformer") else ("none", 0))
    assert c.num_voco == (1 if mode == "lower_bound" else 0)
    loss = losses(tmp_path)
    assert loss[-1] < loss[0]
    assert json.loads((tmp_path / "eval.json").read_text())["n"] == 8


def test_one_model_for_every_k(tmp_path, data):
    """--voco_ks: each sample is laid out with one of the K, and the one checkpoint is scored at each of them."""
    train(*args(data, tmp_path, "--mode=voco", "--voco_ks=1,2,4", "--num_voco=2", "--max_steps=3"))
    assert VoCoLlama.from_pretrained(tmp_path / "checkpoint" / "model").config.num_voco == 2  # the default K
    result = json.loads((tmp_path / "eval.json").read_text())
    assert set(result["by_num_voco"]) == {"1", "2", "4"} and all(r["n"] == 8 for r in result["by_num_voco"].values())
    assert result["by_num_voco"]["2"]["correct"] == result["correct"]  # the headline is the default K's


def test_teacher_kl_curve_and_eval(tmp_path, data):
    """--teacher: the KL from the uncompressed model's answer distributions, in log.jsonl every --kl_every steps
    (from before the first update) and in eval.json per question. A student that starts as its teacher, read the
    same way, is at exactly 0; a VoCo student of it, which reads the image through one VoCo token, is not."""
    train(*args(data, tmp_path / "full", "--mode=full", "--max_steps=2"))
    teacher = tmp_path / "full" / "checkpoint" / "model"
    curve = [f"--init={teacher}", f"--teacher={teacher}", "--kl_every=2", "--kl_limit=4", "--max_steps=3"]
    for name, mode in [("same", "--mode=full"), ("voco", "--mode=voco")]:
        train(*args(data, tmp_path / name, mode, "--num_voco=1", *curve))
    same, voco = ([json.loads(line) for line in (tmp_path / name / "log.jsonl").read_text().splitlines()]
                  for name in ("same", "voco"))
    assert same[0] == {"step": -1, "kl": 0.0} and voco[0]["step"] == -1 and voco[0]["kl"] > 0.01
    assert [r["step"] for r in voco if "kl" in r] == [-1, 1, 2]  # every 2 updates, and at the end
    assert [r["step"] for r in voco if "loss" in r] == [0, 1, 2]
    result = json.loads((tmp_path / "voco" / "eval.json").read_text())
    assert len(result["kl"]["per_question"]) == result["n"] == 8 and set(result["kl"]["by_type"]) == \
        set(result["by_type"])
    assert abs(result["kl"]["overall"] - sum(result["kl"]["per_question"]) / 8) < 1e-9
    # FSDP on 2 processes measures the same KLs (every process joins the student's gathers, rank 0 writes)
    train(*args(data, tmp_path / "voco2", "--mode=voco", "--num_voco=1", *curve), nproc=2)
    two = [json.loads(line) for line in (tmp_path / "voco2" / "log.jsonl").read_text().splitlines()]
    torch.testing.assert_close(torch.tensor([r["kl"] for r in two if "kl" in r]),
                               torch.tensor([r["kl"] for r in voco if "kl" in r]), atol=1e-4, rtol=1e-4)
    result2 = json.loads((tmp_path / "voco2" / "eval.json").read_text())
    torch.testing.assert_close(torch.tensor(result2["kl"]["per_question"]), torch.tensor(result["kl"]["per_question"]),
                               atol=1e-4, rtol=1e-4)


def test_a_stage_repeats_itself_bit_for_bit(tmp_path, data):
    """The same command and seed twice on one machine: the same losses, weights, answers, accuracies and KLs, bit
    for bit (data order, new weights, <voco>'s init and evaluation are seeded; the threads are the machine's)."""
    train(*args(data, tmp_path / "full", "--mode=full", "--max_steps=2"))
    teacher = tmp_path / "full" / "checkpoint" / "model"
    stage = [f"--init={teacher}", f"--teacher={teacher}", "--mode=voco", "--num_voco=1", "--voco_init=newline",
             "--kl_every=2", "--kl_limit=4", "--max_steps=4", "--seed=3"]
    for name in ("a", "b"):
        train(*args(data, tmp_path / name, *stage))
    a, b = tmp_path / "a", tmp_path / "b"
    assert (a / "eval.json").read_bytes() == (b / "eval.json").read_bytes()
    without_speed = lambda out: [{k: v for k, v in json.loads(line).items() if k != "tokens_per_s"}  # noqa: E731
                                 for line in (out / "log.jsonl").read_text().splitlines()]
    assert without_speed(a) == without_speed(b)
    weights = lambda out: (out / "checkpoint" / "model" / "model.safetensors").read_bytes()  # noqa: E731
    assert weights(a) == weights(b)


def test_output_folders_as_users_type_them(tmp_path, data):
    """--out_dir=~/run is the home's run (the shell leaves a ~ after = alone); a file, or a folder below one, is one
    line and exit code 2 before anything is built."""
    (tmp_path / "a_file").write_text("x")
    for where, said in [("a_file", "is a file, not a folder: choose another --out_dir"),
                        ("a_file/run", "a_file is a file, so nothing can be written below it")]:
        result = train(*args(data, tmp_path / where), check=False)
        assert result.returncode == 2 and said in one_line(result.stderr), result.stderr
    home = subprocess.run([sys.executable, str(ROOT / "train.py"), *args(data, "~/run", "--max_steps=1")],
                          env={**ENV, "HOME": str(tmp_path)}, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert home.returncode == 0 and (tmp_path / "run" / "checkpoint").is_dir() and not (ROOT / "~").exists()


def test_train_from_llava_style_weights(tmp_path, data):
    """The official recipe's start: a plain LLaMA directory (with its tokenizer.model) + CLIP + mm_projector.bin."""
    records = json.loads((data / "train" / "data.json").read_text())
    corpus = [VOCO_SYSTEM] + [turn["value"] for r in records for turn in r["conversations"]]
    vocab = Tokenizer(train_tiny_tokenizer(corpus, tmp_path / "tokenizer.model", vocab_size=300)).vocab_size
    hf_llava(tmp_path / "hf", text={"vocab_size": vocab, "max_position_embeddings": 512})
    original = llava_original(tmp_path / "hf", tmp_path / "original")
    projector = stage1(original, tmp_path / "vicuna")
    shutil.copy(tmp_path / "tokenizer.model", tmp_path / "vicuna" / "tokenizer.model")
    train(*args(data, tmp_path / "run", f"--init={tmp_path / 'vicuna'}", f"--vision_path={original / 'clip'}",
                f"--projector_path={projector}", "--max_steps=2"))
    vlm = VoCoLlama.from_pretrained(tmp_path / "run" / "checkpoint" / "model")
    assert vlm.config.vision.image_size == 56 and vlm.config.num_voco == 2
    assert (tmp_path / "run" / "checkpoint" / "model" / "tokenizer.model").exists()


def test_llm_from_scratch_on_a_pretrained_tower(tmp_path):
    """The repro's full stage: --init=tiny-mha builds a fresh LLM, --vision_path brings a pretrained tower, frozen:
    the tower saved with the model is the one given, bit for bit."""
    from nanovoco.repro import vision_pretrain
    tower = vision_pretrain.pretrain(steps=2, n_images=8, progress=False)
    vision_pretrain.save(tower, tmp_path / "tower")
    generate(tmp_path / "data" / "train", n_images=16, questions_per_image=8, image_size=64, n_objects=3,
             multi_turn=True)
    generate(tmp_path / "data" / "eval", n_images=3, seed=10_000, image_size=64, n_objects=3)
    train("--preset=tiny-cpu", "--init=tiny-mha", f"--vision_path={tmp_path / 'tower'}", "--mode=full",
          *data_options(tmp_path / "data"), f"--out_dir={tmp_path / 'run'}", "--batch_size=4",
          "--micro_batch_size=2", "--max_steps=2", "--eval_limit=4")
    vlm = VoCoLlama.from_pretrained(tmp_path / "run" / "checkpoint" / "model")
    assert vlm.config.num_image_tokens == 64 and vlm.config.text.num_key_value_heads == 4
    pixels = vision_pretrain.scene_batch(2, seed=1)[0]
    reference = CLIPVisionTower.from_pretrained(tmp_path / "tower")  # -2: the layer LLaVA reads
    assert torch.equal(vlm.vision(pixels), reference(pixels))
    assert json.loads((tmp_path / "run" / "eval.json").read_text())["n"] == 4
    # the tiny tokenizer knows the template: a turn's "USER: ... ASSISTANT:" is a few tokens, not 15 letters more
    tok = Tokenizer(tmp_path / "run" / "checkpoint" / "model" / "tokenizer.model")
    assert len(tok.encode("USER: How many objects are in the left half? ASSISTANT:", bos=False)) <= 13  # a word each


@pytest.mark.parametrize("argv, message", [
    (["--nope=1"], "unknown option --nope"),
    (["--max-stepz=3"], "unknown option --max-stepz, did you mean --max_steps?"),
    (["--lr"], "--lr needs a value: --lr=VALUE or --lr VALUE"),
    (["lr=1e-3"], "options are --name=value or --name value, got 'lr=1e-3'"),
    (["--lr=fast"], "--lr takes a float, got 'fast'"),
    (["--resume=maybe"], "--resume takes true or false"),
    (["--mode=magic"], "--mode must be one of full, voco, lower_bound, avgpool, qformer"),
    (["--preset=huge"], "unknown preset 'huge'"),
    (["--batch_size=7"], "batch_size=7 must be a multiple of processes x micro_batch_size = 1 x 2"),
    (["--data=missing.json"], "missing.json does not exist"),
    (["--voco_ks=0,2"], "--voco_ks=0,2: give distinct numbers of VoCo tokens >= 1"),
    (["--voco_ks=1,4"], "--num_voco=2 must be one of --voco_ks=1,4"),
    (["--voco_ks=1,2", "--mode=full"], "--voco_ks is for the modes with VoCo tokens (voco, lower_bound), not full"),
    (["--data="], "--data=<LLaVA-format JSON> is required"),
    (["--kl_every=5"], "--kl_every needs --teacher=<the uncompressed model's checkpoint>"),
    (["--teacher=nowhere"], "--teacher=nowhere: not a checkpoint directory (no config.json)"),
])
def test_bad_options(tmp_path, data, argv, message):
    result = train(*args(data, tmp_path), *argv, check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert one_line(result.stderr).startswith("error: ") and message in one_line(result.stderr)


def one_line(stderr: str) -> str:
    """The last line of stderr, after asserting that it is the only one that is not a progress bar."""
    lines = [line for line in stderr.splitlines() if line.strip() and "\r" not in line and "it/s" not in line]
    assert len(lines) == 1, stderr
    return lines[0]


CONVERSATION = [{"from": "human", "value": "<image>\nWhat shape is the red object?"},
                {"from": "gpt", "value": "circle"}]


@pytest.mark.parametrize("records, message", [
    ({"id": "x"}, "expected a JSON list of records, got a dict"),
    ([{"id": "a", "image": "a.png"}], "record 0 (id 'a') has no 'conversations' list"),
    ([{"id": "a", "image": "a.png", "conversations": CONVERSATION[::-1]}],
     "record 0 (id 'a'): turn 0 is from 'gpt', expected 'human'"),
    ([{"id": "a", "conversations": CONVERSATION}], "record 0 (id 'a') has an '<image>' tag but no 'image' key"),
    ([{"id": "a", "image": "gone.png", "conversations": CONVERSATION}],
     "1 image(s) missing under {folder}, e.g. record 0 (id 'a'): gone.png"),
    ([{"id": "a", "image": "../a.png", "conversations": CONVERSATION}],
     "record 0 (id 'a'): image '../a.png' is not a path inside the image folder {folder}"),
    ([{"id": "a", "image": "junk.png", "conversations": CONVERSATION}],
     "record 0 (id 'a'): image junk.png: {folder}/junk.png is not a readable image"),
])
def test_bad_data_is_one_line_before_the_model_is_built(tmp_path, records, message):
    """LLaVA-format data is checked whole, images included, before the model is built: exit 2 and one line naming
    the file and the record."""
    folder = tmp_path / "images"
    folder.mkdir()
    from PIL import Image
    Image.new("RGB", (56, 56)).save(folder / "a.png")
    (folder / "junk.png").write_text("not a png")
    (tmp_path / "data.json").write_text(json.dumps(records))
    result = train("--preset=tiny-cpu", f"--data={tmp_path / 'data.json'}", f"--image_folder={folder}",
                   f"--out_dir={tmp_path / 'run'}", check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert one_line(result.stderr).startswith(f"error: {tmp_path / 'data.json'}: " + message.format(folder=folder))
    assert "trainable parameters" not in result.stdout  # stopped before the model


def test_activation_checkpointing_gives_the_same_gradients():
    from nanovoco import parallel
    from nanovoco.config import preset
    from nanovoco.voco import TEXT, VISION, VOCO, voco_mask

    torch.manual_seed(0)
    vlm = VoCoLlama(preset("tiny", vocab_size=100))
    n = vlm.config.num_image_tokens
    ids = torch.cat([torch.ones(2, 1, dtype=torch.long), torch.full((2, n), vlm.config.image_token_id),
                     torch.randint(3, 100, (2, 12))], 1)
    segments = torch.tensor([[VISION] * (1 + n) + [VOCO] * 2 + [TEXT] * 10] * 2)
    mask = voco_mask(segments, torch.where(segments == TEXT, -1, 0))
    pixels = torch.randn(2, 3, 56, 56)

    def grads(model):
        model.zero_grad()
        model(ids, pixels, attn_mask=mask).logits.float().pow(2).mean().backward()
        return {k: p.grad.clone() for k, p in model.named_parameters()}

    calls = []
    vlm.llm.layers[0].input_layernorm.register_forward_pre_hook(lambda *_: calls.append(1))
    plain = grads(vlm)
    names = [k for k, _ in vlm.named_parameters()]
    checkpointed = grads(parallel.shard(vlm, torch.device("cpu"), 1, activation_checkpointing=True))
    assert len(calls) == 1 + 2  # once without checkpointing; with it, once forward and once recomputed in backward
    assert [k for k, _ in vlm.named_parameters()] == names  # parameter names (checkpoint keys) unchanged
    for k in plain:
        torch.testing.assert_close(checkpointed[k], plain[k], atol=1e-6, rtol=1e-5, msg=k)


def test_video_training_then_infer(tmp_path):
    """Moving-shapes videos: each frame its own group under the VoCo mask; the trained model answers from the
    concatenated per-frame caches (infer.py) with the system prompt it was trained with."""
    out, data = tmp_path / "video", tmp_path / "data"
    synthetic_video.generate(data / "train", n_videos=16, questions_per_video=3, multi_turn=True)
    synthetic_video.generate(data / "eval", n_videos=4, seed=10_000)
    train("--preset=tiny-cpu", *data_options(data), f"--out_dir={out}", "--batch_size=4", "--micro_batch_size=2",
          "--max_steps=3", "--eval_limit=4")
    assert len(losses(out)) == 3
    result = json.loads((out / "eval.json").read_text())
    assert result["n"] == 4 and set(result["by_type"]) <= set(synthetic_video.QUESTION_TYPES)
    model = out / "checkpoint" / "model"
    assert json.loads((model / "prompt.json").read_text()) == {"system": ""}
    record = json.loads((data / "eval" / "data.json").read_text())[0]
    frames = [str(data / "eval" / f) for f in record["image"]]
    done = subprocess.run([sys.executable, str(ROOT / "infer.py"), "--model", str(model), "--video", *frames,
                           "--question", record["conversations"][0]["value"].replace("<image>\n", ""),
                           "--max_new_tokens", "3"], env=ENV, cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert f"{len(frames)} frame(s) compressed): {2 * len(frames)} VoCo tokens" in done.stderr


def test_train_from_a_plain_llm_with_a_bpe_tokenizer_and_a_new_projector(tmp_path):
    """SmolLM2's path in miniature: a plain LLaMA directory with a ChatML tokenizer.json (from_gguf's kind) and a
    CLIP, no projector: a new one is trained with the LLM, on LLaVA-format JSON; the checkpoint keeps the tokenizer
    with <voco> appended, and an interrupted run resumes from it onto the same losses."""
    llm = bpe_tokenizer(tmp_path / "llm")
    vocab = load_tokenizer(llm).vocab_size - 1  # the file's vocabulary; <voco> is appended after it
    hf_llama(llm, vocab_size=vocab, max_position_embeddings=512)
    hf_clip(tmp_path / "clip")
    generate(tmp_path / "data" / "train", n_images=8, questions_per_image=2, seed=0, image_size=56, multi_turn=True)
    generate(tmp_path / "data" / "eval", n_images=2, seed=1, image_size=56)
    common = ["--preset=tiny-cpu", f"--init={llm}", f"--vision_path={tmp_path / 'clip'}", "--mode=voco",
              "--num_voco=1", f"--data={tmp_path / 'data' / 'train' / 'data.json'}", "--batch_size=4",
              f"--eval_data={tmp_path / 'data' / 'eval' / 'data.json'}", "--micro_batch_size=2", "--max_steps=2",
              "--eval_limit=8"]
    train(*common, f"--out_dir={tmp_path / 'whole'}")
    train(*common, f"--out_dir={tmp_path / 'cut'}", "--stop_after=1")
    train(*common, f"--out_dir={tmp_path / 'cut'}", "--resume=true")
    assert losses(tmp_path / "cut") == losses(tmp_path / "whole") and len(losses(tmp_path / "whole")) == 2
    model = tmp_path / "whole" / "checkpoint" / "model"
    tok = load_tokenizer(model)
    assert tok.template.name == "chatml" and tok.special_ids["<voco>"] == vocab and tok.bos_ids == []
    vlm = VoCoLlama.from_pretrained(model)
    assert (vlm.config.text.vocab_size, vlm.config.voco_token_id, vlm.config.num_voco) == (vocab + 1, vocab, 1)
    assert json.loads((tmp_path / "whole" / "eval.json").read_text())["n"] == 8
