"""nanovoco.repro.scene_text: the scene written out, the answer's first word, the evaluation's shape, bad input."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nanovoco.repro import synthetic
from nanovoco.config import LlamaConfig
from nanovoco.model import Llama
from nanovoco.repro.scene_text import answer, describe
from nanovoco.tokenizer import Tokenizer, load_tokenizer, train_tiny_tokenizer
from tiny import bpe_tokenizer

ROOT = Path(__file__).resolve().parents[1]
SCENE = [{"color": "red", "shape": "circle", "x": 8, "y": 40}, {"color": "blue", "shape": "square", "x": 56, "y": 8}]


def test_describe_names_every_object_and_where_it_is():
    text = describe(SCENE, 64)
    assert "64 x 64 pixels" in text and "2 objects" in text
    assert "a red circle centred at x = 8, y = 40" in text and "a blue square centred at x = 56, y = 8" in text


def tiny_llm(vocab_size):
    torch.manual_seed(0)
    return Llama(LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                             num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512))


def test_answer_chooses_among_the_answers_of_the_type(tmp_path):
    synthetic.generate(tmp_path / "eval", n_images=2, seed=3, image_size=64, n_objects=3, question_set="objects")
    records = json.loads((tmp_path / "eval" / "data.json").read_text())
    words = " ".join(w for c in synthetic.PALETTE for w in [c] * 3) + " " + " ".join(synthetic.SHAPES * 3)
    tok = Tokenizer(train_tiny_tokenizer([f"The answer is {words} {' '.join(synthetic.NUMBERS)}"] * 30 +
                                         [describe(r["scene"], 64) for r in records] * 5, tmp_path / "t.model"))
    result = answer(tiny_llm(tok.vocab_size), tok, records, 64, batch_size=3, progress=False)
    assert result["n"] == len(records) == 8 and set(result["by_type"]) == {r["type"] for r in records}
    for r, a in zip(records, result["answers"]):  # a choice among the answers its type has in the set
        assert a in {q["conversations"][1]["value"] for q in records if q["type"] == r["type"]}


def test_answers_that_a_first_token_cannot_tell_apart_are_refused(tmp_path):
    """The tiny byte-level vocabulary spells " green" and " orange" from the same first token."""
    records = [{"type": "closest", "scene": SCENE, "conversations": [
        {"from": "human", "value": "<image>\nWhat colour?"}, {"from": "gpt", "value": a}]} for a in ("green", "orange")]
    tok = load_tokenizer(bpe_tokenizer(tmp_path))
    with pytest.raises(ValueError, match="the answers of type 'closest' share a first token"):
        answer(tiny_llm(tok.vocab_size), tok, records, 64, progress=False)


def test_records_without_a_scene_are_one_line_exit_2(tmp_path):
    (tmp_path / "data.json").write_text(json.dumps([{"id": "0", "conversations": []}]))
    r = subprocess.run([sys.executable, "-m", "nanovoco.repro.scene_text", "--llm", str(tmp_path), "--data",
                        str(tmp_path / "data.json"), "--out", str(tmp_path / "out")], cwd=ROOT, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "records need their 'scene'" in r.stderr
