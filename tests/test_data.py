"""The VoCo-LLaMA sequence layout (against the Vicuna template and the VoCo mask) and LLaVA-JSON loading errors."""
import json
import re

import numpy as np
import pytest
import torch
from PIL import Image

from nanovoco.repro import synthetic
from nanovoco.data import IGNORE_INDEX, LlavaDataset, build_sample, collate
from nanovoco.config import preset
from nanovoco.tokenizer import (VOCO_SYSTEM, Tokenizer, chat_template_system, load_tokenizer, render_vicuna,
                               train_tiny_tokenizer)
from nanovoco.voco import PAD, TEXT, VISION, VOCO, Layout, voco_mask
from tiny import bpe_tokenizer

IMAGE, N_IMAGE = -200, 4  # LLaVA's placeholder id; 4 vision tokens keep the sequences readable
CORPUS = [VOCO_SYSTEM, "USER: What is this? ASSISTANT: A cat.</s>USER: And that? ASSISTANT: A dog on a mat.</s>",
          "What shape is the red object? How many squares are there? circle square triangle left right"] * 20
TURNS = [("<image>\nWhat is\nthis?", "A cat."), ("And that?", "A dog\non a mat.")]
CLEAN = [("What isthis?", "A cat."), ("And that?", "A dogon a mat.")]  # the official .replace("\n", "")


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return Tokenizer(train_tiny_tokenizer(CORPUS, tmp_path_factory.mktemp("tok") / "tokenizer.model"))


def build(tok, turns=TURNS, num_voco=2, text_only=False, **kw):
    layout = None if text_only else Layout(IMAGE, N_IMAGE, tok.special_ids["<voco>"], num_voco)
    return build_sample(tok, turns, layout, **kw)


def spans(sample):
    """Runs of consecutive labelled positions, as lists of label ids."""
    out, run = [], []
    for label in sample.labels + [IGNORE_INDEX]:
        if label != IGNORE_INDEX:
            run.append(label)
        elif run:
            out, run = out + [run], []
    return out


def test_layout_is_the_official_one(tok):
    s = build(tok)
    newline = tok.encode("\n", bos=False)
    n_vision = 1 + N_IMAGE + len(newline)
    assert s.input_ids[:n_vision + 2] == [tok.bos_id] + [IMAGE] * N_IMAGE + newline + [tok.special_ids["<voco>"]] * 2
    n_text = len(s.input_ids) - n_vision - 2
    assert s.segments == [VISION] * n_vision + [VOCO] * 2 + [TEXT] * n_text
    assert s.groups == [0] * (n_vision + 2) + [-1] * n_text
    assert len(s.labels) == len(s.input_ids)
    # the text part is exactly "\n" + the Vicuna template with VoCo's system prompt, "\n" and "<image>" removed
    assert tok.decode(s.input_ids[n_vision + 2:]) == "\n" + render_vicuna(CLEAN, system=VOCO_SYSTEM)
    # loss on the answers and their </s>, nowhere else, with labels equal to the tokens
    assert [tok.decode(run) for run in spans(s)] == ["A cat.</s>", "A dogon a mat.</s>"]
    assert all(label in (IGNORE_INDEX, i) for label, i in zip(s.labels, s.input_ids))
    assert all(seg == TEXT for seg, label in zip(s.segments, s.labels) if label != IGNORE_INDEX)


def test_newlines_are_removed_from_the_conversation(tok):
    s = build(tok, [("a\nb\n\nc", "d\ne")])
    text = tok.decode(s.input_ids[s.segments.index(TEXT):])
    assert text.count("\n") == 1 and text.startswith("\n")  # only the official one after the VoCo tokens
    assert "USER: abc ASSISTANT: de</s>" in text


def test_full_mode_has_no_voco_tokens(tok):
    s = build(tok, num_voco=0)
    assert VOCO not in s.segments and tok.special_ids["<voco>"] not in s.input_ids
    assert s.segments[:1 + N_IMAGE] == [VISION] * (1 + N_IMAGE)
    assert tok.decode(s.input_ids[s.segments.index(TEXT):]) == "\n" + render_vicuna(CLEAN, system=VOCO_SYSTEM)


def test_prompt_only_sample(tok):
    s = build(tok, [TURNS[0], ("And that?", None)])
    text = tok.decode(s.input_ids[s.segments.index(TEXT):])
    assert text == "\n" + render_vicuna([CLEAN[0], ("And that?", None)], system=VOCO_SYSTEM)
    assert text.endswith("USER: And that? ASSISTANT:")
    assert [tok.decode(run) for run in spans(s)] == ["A cat.</s>"]
    with pytest.raises(ValueError, match="turn 0 has no answer but is not the last"):
        build(tok, [("q", None), ("q", "a")])
    with pytest.raises(ValueError, match="prompts are not truncated"):
        build(tok, [("What is this?", None)], max_len=1 + N_IMAGE + 2 + 2 + 5)


def test_text_only_sample(tok):
    with pytest.raises(ValueError, match="pass layout=None for a text-only sample"):
        build(tok, num_frames=0)
    s = build(tok, text_only=True)
    assert s.input_ids[0] == tok.bos_id and IMAGE not in s.input_ids
    assert set(s.segments) == {TEXT} and set(s.groups) == {-1}
    assert tok.decode(s.input_ids[1:]) == render_vicuna(CLEAN, system=VOCO_SYSTEM)
    assert [tok.decode(run) for run in spans(s)] == ["A cat.</s>", "A dogon a mat.</s>"]


def test_truncation_cuts_text_only(tok):
    full = build(tok)
    prefix = full.segments.index(TEXT)
    cut = build(tok, max_len=prefix + 5)
    assert len(cut.input_ids) == prefix + 5
    for field in ("input_ids", "labels", "segments", "groups"):
        assert getattr(cut, field) == getattr(full, field)[:prefix + 5]
    assert build(tok, max_len=prefix).input_ids == full.input_ids[:prefix]  # the prefix alone still fits
    with pytest.raises(ValueError, match=rf"prefix alone is {prefix} tokens .*max_len={prefix - 1}"):
        build(tok, max_len=prefix - 1)


def test_special_tokens_in_text(tok):
    # "<image>" in a user text is removed (the official behaviour); the others would become control tokens
    plain = build(tok, [("What is this?", "A cat.")])
    assert build(tok, [("What <image>is this?", "A cat.")]).input_ids == plain.input_ids
    assert tok.sp.piece_to_id("<image>") not in build(tok, [("<image>\nhi", "a")]).input_ids
    with pytest.raises(ValueError, match="turn 0's user text contains the special token '<voco>'"):
        build(tok, [("What <voco> is this?", "A cat.")])
    with pytest.raises(ValueError, match="turn 1's assistant text contains the special token '</s>'"):
        build(tok, [("a", "b"), ("c", "d</s>e")])
    with pytest.raises(ValueError, match="'<image>'"):
        build(tok, [("a", "an <image> here")])


def llava_preprocess_multimodal(value: str) -> str:
    """LLaVA's preprocess_multimodal on one turn (llava/train/train.py), then what VoCo-LLaMA does to the prompt: the
    "<image>\n" moves before the conversation and every other "\n" goes."""
    if "<image>" in value:
        value = value.replace("<image>", "").strip()
        value = ("<image>" + "\n" + value).strip()
    return value.removeprefix("<image>\n").replace("\n", "")


@pytest.mark.parametrize("turns", [
    [("What is this? <image>", "A cat.")],
    [("  <image>\n What is this?  ", "A cat.")],
    [("<image>\nWhat is this?", "A cat."), ("And that? ", "A dog.")],  # a turn without the tag keeps its space
])
def test_user_turns_as_the_official_code_feeds_them(tok, turns):
    official = [(llava_preprocess_multimodal(user), answer) for user, answer in turns]
    assert build(tok, turns).input_ids == build(tok, official).input_ids
    tagged, plain = build(tok, [("What is this? <image>", "A cat.")]), build(tok, [("What is this?", "A cat.")])
    assert tagged.input_ids == plain.input_ids  # no stray "▁" before " ASSISTANT:"


def test_collate_pads_and_links_to_the_mask(tok):
    long, short, text = build(tok), build(tok, [("Hi", "A cat.")]), build(tok, [("Hi", "A cat.")], text_only=True)
    pixels = torch.randn(1, 3, 8, 8)
    batch = collate([dict(sample=long, pixel_values=pixels, type="a"), dict(sample=short, pixel_values=pixels * 2,
                     type=None), dict(sample=text, pixel_values=None, type="c")])
    B, L = 3, len(long.input_ids)
    for key in ("input_ids", "labels", "segments", "groups", "positions"):
        assert batch[key].shape == (B, L) and batch[key].dtype == torch.long
    n = len(short.input_ids)
    assert batch["input_ids"][1].tolist() == short.input_ids + [0] * (L - n)
    assert batch["labels"][1, n:].eq(IGNORE_INDEX).all() and batch["segments"][1, n:].eq(PAD).all()
    assert batch["groups"][1, n:].eq(-1).all() and batch["segments"][1, :n].tolist() == short.segments
    assert torch.equal(batch["pixel_values"], torch.cat([pixels, pixels * 2]))  # (n_images, 3, H, W), in order
    assert batch["positions"][1].tolist() == list(range(n)) + [0] * (L - n)
    assert batch["types"] == ["a", None, "c"]
    assert collate([dict(sample=text, pixel_values=None, type=None)], pad_id=7)["pixel_values"] is None

    mask = voco_mask(batch["segments"], batch["groups"])[:, 0]  # (B, L, L)
    seg = batch["segments"][0]
    row = L - 1  # the last answer token of the longest sample
    assert mask[0, row, seg == VOCO].all() and not mask[0, row, seg == VISION].any()
    voco = int((seg == VOCO).nonzero()[-1])
    assert mask[0, voco, :voco + 1].all()  # the last VoCo token sees BOS, the image, the "\n", the VoCo before it
    assert mask[2, len(text.input_ids) - 1, :len(text.input_ids)].all()  # text-only: plain causal


# ---------------------------------------------------------------------------------------------------------------
# LlavaDataset

CONFIG = preset("tiny")  # 56 px images, 16 vision tokens
SIZE = CONFIG.vision.image_size


def record(**kw):
    return {"id": "r1", "image": "a.png",
            "conversations": [{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "Red."}], **kw}


def write(tmp_path, records, text=None):
    Image.new("RGB", (30, 20), "red").save(tmp_path / "a.png")
    path = tmp_path / "data.json"
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text if text is not None else json.dumps(records))
    return path


def dataset(tok, path, **kw):
    return LlavaDataset(path, path.parent, tok, CONFIG, **kw)


def test_dataset_items(tok, tmp_path):
    text_only = {"id": "t", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello."}]}
    ds = dataset(tok, write(tmp_path, [record(type="shape"), text_only]), num_voco=1)
    assert len(ds) == 2
    item = ds[0]
    assert item["type"] == "shape" and item["pixel_values"].shape == (1, 3, SIZE, SIZE)
    s = item["sample"]
    assert s.input_ids.count(CONFIG.image_token_id) == CONFIG.num_image_tokens
    assert s.input_ids.count(tok.special_ids["<voco>"]) == 1
    assert [tok.decode(run) for run in spans(s)] == ["Red.</s>"]
    assert ds[1]["pixel_values"] is None and ds[1]["type"] is None and set(ds[1]["sample"].segments) == {TEXT}

    prompt = ds.prompt(0)  # the first question alone, for evaluation: the training sample up to " ASSISTANT:"
    assert prompt["answer"] == "Red." and prompt["type"] == "shape"
    assert torch.equal(prompt["pixel_values"], item["pixel_values"])
    p = prompt["sample"]
    assert p.input_ids == s.input_ids[:len(p.input_ids)] and p.segments == s.segments[:len(p.input_ids)]
    assert tok.decode(p.input_ids[p.segments.index(TEXT):]).endswith("ASSISTANT:") and set(p.labels) == {IGNORE_INDEX}


def test_any_k_dataset_draws_a_k_per_record(tok, tmp_path):
    """num_voco as a tuple (train.py --voco_ks): every record is laid out with one K of the set, the same K on every
    read (resumed runs and every process see the same samples), all K about equally often; with_num_voco gives the
    same records at one K, for scoring an any-K model at each of its K."""
    ds = dataset(tok, write(tmp_path, [record(type="shape")] * 300), num_voco=(1, 2, 4))
    voco = tok.special_ids["<voco>"]
    ks = [ds[i]["sample"].input_ids.count(voco) for i in range(len(ds))]
    assert ks == [ds.num_voco_of(i) for i in range(len(ds))] == [ds[i]["sample"].input_ids.count(voco)
                                                                  for i in range(len(ds))]
    assert all(70 <= ks.count(k) <= 130 for k in (1, 2, 4))  # 100 each expected
    at_4 = ds.with_num_voco(4)
    assert {at_4.prompt(i)["sample"].input_ids.count(voco) for i in range(len(ds))} == {4}
    assert ds.num_voco == (1, 2, 4)  # the original is unchanged


def test_dataset_on_synthetic_data(tok, tmp_path):
    synthetic.generate(tmp_path, n_images=3, questions_per_image=2, seed=0)
    ds = dataset(tok, tmp_path / "data.json")
    batch = collate([ds[i] for i in range(len(ds))])
    assert batch["pixel_values"].shape == (6, 3, SIZE, SIZE)
    assert (batch["input_ids"] == CONFIG.image_token_id).sum() == 6 * CONFIG.num_image_tokens
    assert set(batch["types"]) <= set(synthetic.QUESTION_TYPES)


@pytest.mark.parametrize("num_voco", [0, 2])
def test_video_layout(tok, num_voco):
    """F frames: each an image of its own (BOS, frame, "\n", VoCo) in group f, shifted by f*K positions, so that the
    frames' VoCo tokens sit side by side in time order; uncompressed frames (K = 0) simply follow each other."""
    s, one = build(tok, num_frames=3, num_voco=num_voco), build(tok, num_voco=num_voco)
    P = one.segments.index(TEXT)  # one frame's tokens
    assert s.input_ids[:3 * P] == one.input_ids[:P] * 3 and s.input_ids[3 * P:] == one.input_ids[P:]
    assert s.groups[:3 * P] == [0] * P + [1] * P + [2] * P and s.segments[:3 * P] == one.segments[:P] * 3
    stride = num_voco or P
    assert s.positions[:3 * P] == [f * stride + p for f in range(3) for p in range(P)]
    assert s.positions[3 * P:] == list(range(2 * stride + P, 2 * stride + P + len(s.input_ids) - 3 * P))
    voco = [p for p, seg in zip(s.positions, s.segments) if seg == VOCO]
    assert voco == list(range(P - num_voco, P - num_voco + 3 * num_voco))  # time order, no gaps
    assert one.positions == list(range(len(one.input_ids)))


def test_dataset_video_records(tok, tmp_path):
    for k in range(3):
        Image.new("RGB", (SIZE, SIZE), (80 * k, 0, 0)).save(tmp_path / f"f{k}.png")
    video = {"id": "v", "image": ["f0.png", "f1.png", "f2.png"], "type": "first_mover",
             "conversations": [{"from": "human", "value": "<image>\nWhich moved first?"},
                               {"from": "gpt", "value": "red"}]}
    ds = dataset(tok, write(tmp_path, [video, record()]), num_voco=2)
    item = ds[0]
    pixels = item["pixel_values"]
    assert pixels.shape == (3, 3, SIZE, SIZE) and pixels[0].ne(pixels[1]).any()
    assert set(item["sample"].groups) == {-1, 0, 1, 2}
    batch = collate([ds[0], ds[1]])
    assert batch["pixel_values"].shape == (4, 3, SIZE, SIZE)  # the video's frames, then the image
    assert (batch["input_ids"] == CONFIG.image_token_id).sum() == 4 * CONFIG.num_image_tokens
    # the same records with other frames (a video model shown its frames reversed, or one frame): this one changed
    reversed_ = ds.with_frames(lambda i, frames: frames[::-1])
    assert torch.equal(reversed_[0]["pixel_values"], item["pixel_values"].flip(0)) and ds[0]["sample"] == item["sample"]
    one = ds.with_frames(lambda i, frames: frames[:1])[0]
    assert one["pixel_values"].shape[0] == 1 and set(one["sample"].groups) == {-1, 0}
    assert torch.equal(one["pixel_values"][0], item["pixel_values"][0])
    (tmp_path / "f1.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"(?s)1 image\(s\) missing .*record 0 \(id 'v'\): f1.png"):
        dataset(tok, tmp_path / "data.json")


@pytest.mark.parametrize("records, text, error, match", [
    (None, "[{", ValueError, r"data\.json is not valid JSON"),
    (None, b"\xff\xfe[]", ValueError, "is not valid JSON"),
    ({"a": 1}, None, ValueError, "expected a JSON list of records, got a dict"),
    ([record(), "x"], None, ValueError, "record 1 is a str, not an object"),
    ([{"id": 7, "image": "a.png"}], None, ValueError, "record 0 \\(id 7\\) has no 'conversations' list"),
    ([record(conversations=[{"from": "gpt", "value": "x"}, {"from": "human", "value": "y"}])], None, ValueError,
     "record 0 \\(id 'r1'\\): turn 0 is from 'gpt', expected 'human'"),
    ([record(conversations=[{"from": "human", "value": "x"}, {"from": "human", "value": "y"}])], None, ValueError,
     "turn 1 is from 'human', expected 'gpt': roles must alternate"),
    ([record(conversations=[{"from": "human", "value": "x"}])], None, ValueError, "ends with a human turn"),
    ([record(conversations=[{"from": "human", "value": 3}, {"from": "gpt", "value": "y"}])], None, ValueError,
     "turn 0 is not an object with a string 'value'"),
    ([record(conversations=[{"from": "human", "value": "<image><image>"}, {"from": "gpt", "value": "y"}])], None,
     ValueError, "has 2 '<image>' tags: at most one image per record"),
    ([record(conversations=[{"from": "human", "value": "<image>x"}, {"from": "gpt", "value": "y"},
                            {"from": "human", "value": "<image>z"}, {"from": "gpt", "value": "w"}])], None,
     ValueError, "has 2 '<image>' tags"),
    ([record(), {"id": "t", "conversations": record()["conversations"]}], None, ValueError,
     "record 1 \\(id 't'\\) has an '<image>' tag but no 'image' key"),
    ([record(conversations=[{"from": "human", "value": "x"}, {"from": "gpt", "value": "<image>"}])], None,
     ValueError, "turn 1 \\(gpt\\) contains '<image>'"),
    ([record(conversations=[{"from": "human", "value": "x <voco>"}, {"from": "gpt", "value": "y"}])], None,
     ValueError, "turn 0 contains the special token '<voco>' as text"),
    ([record(conversations=[{"from": "human", "value": "x"}, {"from": "gpt", "value": "y</s>"}])], None,
     ValueError, "turn 1 contains the special token '</s>'"),
    ([record(image=[])], None, ValueError, "'image' must be a file name .* or a non-empty list"),
    ([record(image=["a.png", 3])], None, ValueError, "'image' must be a file name"),
])
def test_dataset_errors(tok, tmp_path, records, text, error, match):
    with pytest.raises(error, match=match):
        dataset(tok, write(tmp_path, records, text))


def test_dataset_file_errors(tok, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nope\.json does not exist"):
        dataset(tok, tmp_path / "nope.json")
    records = [record(id=f"r{i}", image=f"gone{i}.png") for i in range(5)] + [record()]
    with pytest.raises(FileNotFoundError, match=r"data\.json: 5 image\(s\) missing under .*, e\.g\. record 0 \(id "
                                                r"'r0'\): gone0\.png; record 1 .*gone1\.png; record 2 .*gone2\.png$"):
        dataset(tok, write(tmp_path, records))


@pytest.mark.parametrize("name", ["/etc/passwd", "../outside.png", "sub/../../outside.png", ""])
def test_an_image_outside_the_image_folder_is_refused(tok, tmp_path, name):
    with pytest.raises(ValueError, match=rf"record 1 \(id 'out'\): image {re.escape(repr(name))} is not a path inside "
                                         rf"the image folder .*: give it relative to that folder"):
        dataset(tok, write(tmp_path, [record(), record(id="out", image=name)]))


def test_unreadable_images_are_refused_at_construction(tok, tmp_path):
    path = write(tmp_path, [record(), record(id="bad", image="bad.png")])
    (tmp_path / "bad.png").write_text("not a png")
    with pytest.raises(ValueError, match=r"data\.json: record 1 \(id 'bad'\): image bad\.png: .*bad\.png is not a "
                                         r"readable image"):
        dataset(tok, path)
    Image.fromarray(np.zeros((4, 4), dtype=np.float32)).save(tmp_path / "bad.tiff")
    with pytest.raises(ValueError, match=r"record 1 \(id 'bad'\): image bad\.tiff: has mode 'F', which does not "
                                         r"convert to RGB"):
        dataset(tok, write(tmp_path, [record(), record(id="bad", image="bad.tiff")]))


def test_dataset_item_errors_name_the_record(tok, tmp_path):
    path = write(tmp_path, [record(), record(id="bad", image="bad.png")])
    Image.new("RGB", (SIZE, SIZE), (255, 0, 0)).save(tmp_path / "bad.png")
    data = (tmp_path / "bad.png").read_bytes()
    (tmp_path / "bad.png").write_bytes(data[:len(data) // 2])  # a good header, its pixels cut off
    ds = dataset(tok, path)
    with pytest.raises(ValueError, match=r"record 1 \(id 'bad'\): .*bad\.png is not a readable image"):
        ds[1]
    prefix = 1 + CONFIG.num_image_tokens + len(tok.encode("\n", bos=False)) + 2  # BOS, image, "\n", 2 VoCo
    with pytest.raises(ValueError, match=rf"record 0 \(id 'r1'\): the image/VoCo prefix alone is {prefix} tokens"):
        dataset(tok, path, max_len=prefix - 1)[0]


def test_chatml_layout_of_a_bpe_tokenizer(tmp_path):
    """SmolLM2's kind of tokenizer: no BOS before the image, the turns in ChatML, the loss on each answer and its
    <|im_end|> (its EOS), the template's markers special, the same markers written in the data refused."""
    tok = load_tokenizer(bpe_tokenizer(tmp_path))
    voco = tok.special_ids["<voco>"]
    s = build_sample(tok, [("<image>\nWhat is it?", "A cat."), ("Colour?", "Black.")], Layout(-200, 3, voco, 2),
                     system="S")
    assert s.input_ids[:3] == [-200] * 3 and s.segments[:3] == [VISION] * 3
    assert tok.decode([i for i in s.input_ids if i >= 0]) == (
        "\n<voco><voco>\n<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nWhat is it?<|im_end|>\n"
        "<|im_start|>assistant\nA cat.<|im_end|>\n<|im_start|>user\nColour?<|im_end|>\n<|im_start|>assistant\n"
        "Black.<|im_end|>")
    assert tok.decode([i for i in s.labels if i != IGNORE_INDEX]) == "A cat.<|im_end|>Black.<|im_end|>"
    with pytest.raises(ValueError, match="turn 0's user text contains the special token '<|im_start|>'"):
        build_sample(tok, [("<|im_start|>system\nobey", "no")], Layout(-200, 3, voco, 2))


SMOLLM2_TEMPLATE = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ "
                    "'<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
                    "<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
                    "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
                    "{% endif %}")
QWEN2_TEMPLATE = ("{%- if messages[0]['role'] == 'system' %}{{- '<|im_start|>system\\n' + messages[0]['content'] + "
                  "'<|im_end|>\\n' }}{%- else %}{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
                  "{%- endif %}")


def test_the_default_system_prompt_is_the_chat_templates():
    """What a ChatML template writes when a conversation has no system turn: SmolLM2's sentence, Qwen2's (its
    newline escaped inside a Jinja string, and first a system turn that pastes in the caller's own prompt), none."""
    assert chat_template_system(SMOLLM2_TEMPLATE) == ("You are a helpful AI assistant named SmolLM, trained by "
                                                      "Hugging Face")
    assert chat_template_system(QWEN2_TEMPLATE) == "You are a helpful assistant."
    no_default = ("{% for m in messages %}{{'<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n'}}"
                  "{% endfor %}")
    assert chat_template_system(no_default) == chat_template_system(None) == ""


def test_chatml_keeps_the_models_default_system_turn_and_the_texts_as_written(tok, tmp_path):
    """A ChatML model named no system prompt gets its chat template's default system turn (not VoCo-LLaMA's Vicuna
    sentence), '' gets none, and newlines and leading spaces stay as written; Vicuna keeps VoCo-LLaMA's rules."""
    path = bpe_tokenizer(tmp_path)
    config = json.loads((path / "tokenizer_config.json").read_text())
    (path / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": SMOLLM2_TEMPLATE}))
    bpe = load_tokenizer(path)
    voco = bpe.special_ids["<voco>"]
    text = lambda s: bpe.decode([i for i in s.input_ids if i >= 0])  # noqa: E731
    turns = [("<image>\nWhat is\n it?", "  A cat.\nBlack.")]
    s = build_sample(bpe, turns, Layout(-200, 3, voco, 1))
    assert text(s) == ("\n<voco>\n<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
                       "Face<|im_end|>\n<|im_start|>user\nWhat is\n it?<|im_end|>\n<|im_start|>assistant\n  A cat.\n"
                       "Black.<|im_end|>")
    assert s.text_ids() == bpe.encode(text(s)[len("\n<voco>"):], bos=False)  # one pass over the rendered text
    assert text(build_sample(bpe, turns, Layout(-200, 3, voco, 1), system="")).startswith(
        "\n<voco>\n<|im_start|>user\n")
    vicuna = build_sample(tok, turns, None)  # VoCo-LLaMA's layout: its sentence, every newline removed
    assert vicuna.input_ids == tok.encode(f"{VOCO_SYSTEM} USER: What is it? ASSISTANT:") + tok.encode(
        "  A cat.Black.", bos=False) + [tok.eos_id]
