"""infer.py: answers equal the library's two-stage (and single-pass) generation, caches go to files and back, videos
load from animations, folders and file lists, and every bad input ends in one clear line, not a traceback."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

import infer
from nanovoco.cache_file import save_cache
from nanovoco.config import preset
from nanovoco.data import build_sample
from nanovoco.image import load_video, preprocess
from nanovoco.model import VoCoLlama
from nanovoco.tokenizer import Tokenizer, train_tiny_tokenizer
from nanovoco.voco import Layout, compress_prefix
from nanovoco.voco_cache import compress, compress_video, generate_from_cache

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ["USER: What shape is the red object? ASSISTANT: circle square triangle left right red green blue</s>"] * 50


def write_model(path, tokenizer_path, num_voco, seed=0):
    tok = Tokenizer(tokenizer_path)
    torch.manual_seed(seed)
    config = preset("tiny", tok.vocab_size)
    config.num_voco, config.voco_token_id = num_voco, tok.special_ids["<voco>"] if num_voco else -1
    vlm = VoCoLlama(config).eval()
    vlm.save_pretrained(path)
    (path / "tokenizer.model").write_bytes(Path(tokenizer_path).read_bytes())
    (path / "prompt.json").write_text(json.dumps({"system": ""}))
    return vlm


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("infer")
    tok_path = train_tiny_tokenizer(CORPUS, root / "tokenizer.model")
    models = {name: write_model(root / name, tok_path, k, seed) for name, k, seed in
              [("voco", 2, 0), ("other", 2, 1), ("full", 0, 0)]}
    for i, color in enumerate(["red", "blue", "green"]):
        Image.new("RGB", (70, 50), color).save(root / f"frame{i + 1}.png")
    Image.new("RGB", (70, 50), "red").save(root / "frames.gif", save_all=True, duration=250, append_images=[
        Image.new("RGB", (70, 50), c) for c in ("blue", "green", "yellow", "white", "black", "gray", "cyan")])
    return root, Tokenizer(tok_path), models


def run(capsys, *argv):
    code = infer.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def expected_answer(setup, question, frames, mode="voco"):
    root, tok, models = setup
    vlm, c = models[mode], models[mode].config
    pixels = torch.stack([preprocess(Image.open(root / f), 56) for f in frames])
    s = build_sample(tok, [(question, None)], Layout.of(c), num_frames=len(frames), system="")
    prefix = torch.tensor(compress_prefix(tok, Layout.of(c)))
    cache = compress(vlm, pixels, prefix) if len(frames) == 1 else compress_video(vlm, pixels, prefix)
    ids = generate_from_cache(vlm, cache, torch.tensor([s.text_ids()]), max_new_tokens=10,
                       eos_id=tok.eos_id)[0]
    return tok.decode(ids)


def test_image_questions_and_cache_file(setup, capsys, tmp_path):
    root = setup[0]
    questions = ["What shape is the red object?", "left or right?"]
    code, out, err = run(capsys, "--model", root / "voco", "--image", root / "frame1.png", "--question", questions[0],
                         "--question", questions[1], "--max_new_tokens", 10, "--save_cache", tmp_path / "c.voco")
    assert code == 0 and "2 VoCo tokens" in err and (tmp_path / "c.voco").is_file()
    assert out == "".join(f"Q: {q}\nA: {expected_answer(setup, q, ['frame1.png'])}\n" for q in questions)
    code, again, err = run(capsys, "--model", root / "voco", "--cache", tmp_path / "c.voco", "--question",
                           questions[0], "--question", questions[1], "--max_new_tokens", 10)
    assert code == 0 and again == out and "loaded" in err
    code, fast, _ = run(capsys, "--model", root / "voco", "--cache", tmp_path / "c.voco", "--question",
                        questions[0], "--question", questions[1], "--max_new_tokens", 10, "--fast")
    assert code == 0 and fast == out  # the compiled static-cache decode: the same answers


def test_video_sources(setup, capsys):
    root = setup[0]
    q = "What shape is the red object?"
    code, out, _ = run(capsys, "--model", root / "voco", "--video", *(root / f"frame{i}.png" for i in (1, 2, 3)),
                       "--question", q, "--max_new_tokens", 10)
    assert code == 0 and out == f"Q: {q}\nA: {expected_answer(setup, q, ['frame1.png', 'frame2.png', 'frame3.png'])}\n"
    assert [im.getpixel((0, 0)) for im in load_video([str(root / "frames.gif")])][:3] == [
        (255, 0, 0), (0, 0, 255), (0, 128, 0)]
    assert len(load_video([str(root / "frames.gif")], fps=2)) == 4  # 8 frames of 0.25 s at 2 per second
    assert len(load_video([str(root / "frames.gif")], max_frames=3)) == 3
    (root / "folder").mkdir()
    for i in (10, 2, 1):  # natural order: 1, 2, 10
        Image.new("RGB", (8, 8), (i, 0, 0)).save(root / "folder" / f"f{i}.png")
    assert [im.getpixel((0, 0))[0] for im in load_video([str(root / "folder")])] == [1, 2, 10]


def test_full_mode_answers_from_the_whole_image(setup, capsys):
    root, tok, models = setup
    code, out, _ = run(capsys, "--model", root / "full", "--image", root / "frame2.png", "--question", "red?",
                       "--max_new_tokens", 6)
    vlm, c = models["full"], models["full"].config
    s = build_sample(tok, [("red?", None)], Layout(c.image_token_id, c.num_image_tokens, -1, 0), system="")
    from nanovoco.generate import generate
    with torch.no_grad():
        embeds = vlm.embed(torch.tensor([s.input_ids]), preprocess(Image.open(root / "frame2.png"), 56)[None])
    ids = generate(vlm.llm, inputs_embeds=embeds, max_new_tokens=6, eos_id=tok.eos_id)[0]
    assert code == 0 and out == f"Q: red?\nA: {tok.decode(ids)}\n"


@pytest.mark.parametrize("argv, message", [
    (["--image", "{root}/missing.png", "--question", "x"], "image {root}/missing.png does not exist"),
    (["--image", "{root}/voco/config.json", "--question", "x"], "is not a readable image"),
    (["--image", "{root}/frame1.png"], "nothing to do: pass --question"),
    (["--cache", "{root}/other.voco", "--question", "x"], "other.voco was made by another model"),
    (["--cache", "{root}/voco/config.json", "--question", "x"], "is not a readable VoCo cache"),
    (["--image", "{root}/frame1.png", "--question", "x " * 600], "exceeds the model's context of 512 positions"),
    (["--image", "{root}/frame1.png", "--question", "x", "--mode", "full", "--save_cache", "{root}/y"],
     "--cache and --save_cache hold VoCo caches: they need --mode voco"),
    (["--video", "{root}/frames.gif", "{root}/nope.png", "--question", "x"], "image {root}/nope.png does not exist"),
    (["--video", "{root}/frame1.png", "{root}/frame2.png", "--fps", "2", "--question", "x"],
     "--fps needs an animated file"),
    (["--video", "{root}/empty", "--question", "x"], "folder {root}/empty holds no frames"),
    (["--image", "{root}/frame1.png", "--save_cache", "{root}/frame2.png/x.voco"],
     "frame2.png is a file, so nothing can be written below it"),
    (["--image", "{root}/frame1.png", "--save_cache", "{root}/"], "is a folder: give a file name"),
    # sampling options out of range: refused before the model is loaded, as later they were after stage 1
    (["--image", "{root}/frame1.png", "--question", "x", "--temperature", "-1"], "temperature takes a number >= 0"),
    (["--image", "{root}/frame1.png", "--question", "x", "--top_p", "0"], "top_p takes a number in (0, 1]"),
    (["--image", "{root}/frame1.png", "--question", "x", "--top_p", "nan"], "top_p takes a number in (0, 1]"),
    (["--image", "{root}/frame1.png", "--question", "x", "--max_new_tokens", "0"], "max_new_tokens takes an int >= 1"),
    (["--image", "{root}/frame1.png", "--question", "x", "--num_voco", "0"], "--num_voco 0: give the number of VoCo"),
    (["--image", "{root}/frame1.png", "--question", "x", "--num_voco", "600"], "exceeds the model's context of 512"),
    # a byte that is not UTF-8 in the shell's argument reaches Python as a lone surrogate
    (["--image", "{root}/frame1.png", "--question", "red\udcff?"], "holds '\\udcff' at character 3, which is not "
     "valid Unicode (a lone surrogate): remove it"),
])
def test_bad_input_is_one_clear_line(setup, capsys, argv, message):
    root, _, models = setup
    (root / "empty").mkdir(exist_ok=True)
    other = models["other"]
    prefix = torch.tensor([1] + [-200] * 16 + [13] + [other.config.voco_token_id] * 2)
    save_cache(root / "other.voco", compress(other, torch.zeros(1, 3, 56, 56), prefix), other)
    code, out, err = run(capsys, "--model", root / "voco", *(a.format(root=root) for a in argv))
    assert code == 2 and err.startswith("error: ") and message.format(root=root) in err and "Traceback" not in err
    assert out == ""  # nothing was answered before the error


def damaged_copy(root, name, drop=(), extra=None, prompt=None):
    """A copy of the voco model's directory with a tensor dropped or added, or another prompt.json."""
    import shutil
    from safetensors.torch import load_file, save_file
    bad = root / name
    shutil.rmtree(bad, ignore_errors=True)
    shutil.copytree(root / "voco", bad)
    tensors = load_file(bad / "model.safetensors")
    for key in drop:
        del tensors[key]
    save_file({**tensors, **(extra or {})}, bad / "model.safetensors", metadata={"format": "pt"})
    if prompt is not None:
        (bad / "prompt.json").write_text(prompt)
    return bad


def bomb(path):
    """A PNG whose header declares 20000 x 20000 pixels."""
    import struct
    import zlib
    Image.new("RGB", (1, 1)).save(path)
    data = bytearray(path.read_bytes())
    ihdr = data[12:29]
    ihdr[4:12] = struct.pack(">II", 20000, 20000)
    data[12:33] = ihdr + struct.pack(">I", zlib.crc32(ihdr))
    path.write_bytes(data)


@pytest.mark.parametrize("case, message", [
    ("missing tensor", "{root}/lacks: 1 expected tensor(s) missing, e.g. ['model.norm.weight']"),
    ("extra tensor", "{root}/extra: 1 unexpected tensor(s), e.g. ['model.extra.weight']"),
    ("broken prompt.json", "{root}/prompt/prompt.json is not valid JSON"),
    ("bomb image", "{root}/bomb.png declares too many pixels to decode safely"),
    ("cache without positions", "{root}/nopos.voco lacks positions: the file is damaged"),
    ("cache without fingerprint", "{root}/nofp.voco lacks fingerprint: the file is damaged"),
])
def test_damaged_files_are_one_clear_line(setup, capsys, case, message):
    root, _, models = setup
    model, source = root / "voco", ["--image", root / "frame1.png"]
    if case == "missing tensor":
        model = damaged_copy(root, "lacks", drop=["model.norm.weight"])
    elif case == "extra tensor":
        model = damaged_copy(root, "extra", extra={"model.extra.weight": torch.zeros(2)})
    elif case == "broken prompt.json":
        model = damaged_copy(root, "prompt", prompt="{not json")
    elif case == "bomb image":
        bomb(root / "bomb.png")
        source = ["--image", root / "bomb.png"]
    else:
        from safetensors import safe_open
        from safetensors.torch import save_file
        vlm = models["voco"]
        prefix = torch.tensor([1] + [-200] * 16 + [13] + [vlm.config.voco_token_id] * 2)
        save_cache(root / "whole.voco", compress(vlm, torch.zeros(1, 3, 56, 56), prefix), vlm)
        with safe_open(root / "whole.voco", "pt") as f:
            tensors, meta = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
        name = "nopos" if case == "cache without positions" else "nofp"
        (tensors if name == "nopos" else meta).pop("positions" if name == "nopos" else "fingerprint")
        save_file(tensors, root / f"{name}.voco", metadata=meta)
        source = ["--cache", root / f"{name}.voco"]
    code, _, err = run(capsys, "--model", model, *source, "--question", "x")
    assert code == 2 and err.startswith("error: ") and "Traceback" not in err, err
    assert message.format(root=root) in err and len(err.strip().splitlines()) == 1, err


def test_voco_mode_on_a_model_without_voco_tokens(setup, capsys):
    root = setup[0]
    code, _, err = run(capsys, "--model", root / "full", "--image", root / "frame1.png", "--question", "x",
                       "--mode", "voco")
    assert code == 2 and "has no VoCo tokens (num_voco=0 in its config.json): use --mode full" in err


def test_command_line(setup):
    root = setup[0]
    done = subprocess.run([sys.executable, ROOT / "infer.py", "--model", root / "voco", "--image",
                           root / "frame1.png", "--question", "red?", "--max_new_tokens", "4"],
                          capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0 and done.stdout.startswith("Q: red?\nA: ") and "VoCo tokens" in done.stderr
    missing = subprocess.run([sys.executable, ROOT / "infer.py", "--model", root / "nothing", "--image", "x.png",
                              "--question", "x"], capture_output=True, text=True, cwd=ROOT)
    assert missing.returncode == 2 and "nothing" in missing.stderr and "Traceback" not in missing.stderr


def test_num_voco_override(setup, capsys, tmp_path):
    """--num_voco overrides the checkpoint's K: the cache holds that many VoCo tokens per image, and answering from a
    cache file with --num_voco checks that the cache holds that K."""
    root = setup[0]
    code, _, err = run(capsys, "--model", root / "voco", "--image", root / "frame1.png", "--num_voco", 3,
                       "--save_cache", tmp_path / "k3.voco")
    assert code == 0 and "3 VoCo tokens" in err, err
    code, _, err = run(capsys, "--model", root / "voco", "--cache", tmp_path / "k3.voco", "--num_voco", 3,
                       "--question", "x", "--max_new_tokens", 2)
    assert code == 0 and "3 VoCo tokens" in err, err
    code, _, err = run(capsys, "--model", root / "voco", "--cache", tmp_path / "k3.voco", "--num_voco", 2,
                       "--question", "x")  # a cache of 3 tokens, 2 asked: refused, not read as if it fitted
    assert code == 2 and "k3.voco holds 3 VoCo tokens per image or frame, but 2 were asked for" in err
    assert "Traceback" not in err and err.count("\n") == 1
    code, _, err = run(capsys, "--model", root / "voco", "--image", root / "frame1.png", "--num_voco", 0,
                       "--question", "x")
    assert code == 2 and "--num_voco 0: give the number of VoCo tokens per image, at least 1" in err
    code, _, err = run(capsys, "--model", root / "full", "--image", root / "frame1.png", "--num_voco", 2,
                       "--question", "x")
    assert code == 2 and "num_voco=2 needs voco_token_id" in err and "Traceback" not in err
