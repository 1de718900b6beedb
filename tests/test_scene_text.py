"""nanovoco.scene_text: the scene written out, the answer's first word, the evaluation's shape, bad input."""
import json
import subprocess
import sys
from pathlib import Path

import torch

from nanovoco import synthetic
from nanovoco.config import LlamaConfig
from nanovoco.model import Llama
from nanovoco.scene_text import answer, describe, first_word
from nanovoco.tokenizer import load_tokenizer
from tiny import bpe_tokenizer

ROOT = Path(__file__).resolve().parents[1]
SCENE = [{"color": "red", "shape": "circle", "x": 8, "y": 40}, {"color": "blue", "shape": "square", "x": 56, "y": 8}]


def test_describe_names_every_object_and_where_it_is():
    text = describe(SCENE, 64)
    assert "64 x 64 pixels" in text and "2 objects" in text
    assert "a red circle centred at x = 8, y = 40" in text and "a blue square centred at x = 56, y = 8" in text


def test_first_word_skips_articles_and_spells_digits():
    assert first_word(' "Blue".') == "Blue" and first_word(" a triangle, I think") == "triangle"
    assert first_word(" 2") == "two" and first_word(" **left**") == "left" and first_word("") == ""


def test_answer_scores_every_record_with_the_llm(tmp_path):
    synthetic.generate(tmp_path / "eval", n_images=2, seed=3, image_size=64, n_objects=3, question_set="objects")
    records = json.loads((tmp_path / "eval" / "data.json").read_text())
    tok = load_tokenizer(bpe_tokenizer(tmp_path / "tok"))
    torch.manual_seed(0)
    llm = Llama(LlamaConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                            num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512))
    result = answer(llm, tok, records, 64, batch_size=3, progress=False)
    assert result["n"] == len(records) == 8 and len(result["answers"]) == 8
    assert set(result["by_type"]) == {r["type"] for r in records}


def test_records_without_a_scene_are_one_line_exit_2(tmp_path):
    (tmp_path / "data.json").write_text(json.dumps([{"id": "0", "conversations": []}]))
    r = subprocess.run([sys.executable, "-m", "nanovoco.scene_text", "--llm", str(tmp_path), "--data",
                        str(tmp_path / "data.json"), "--out", str(tmp_path / "out")], cwd=ROOT, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "records need their 'scene'" in r.stderr
