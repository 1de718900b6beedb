"""The values behind Tables 1 and 2: VQA scoring on hand-made answers, and the mask each training mode trains and is
evaluated under (the bounds of Table 1 differ by the mask alone, so swapping them must fail a test)."""
import json

import pytest
import torch

import train
from nanovoco import evaluate
from nanovoco.init import build_model
from nanovoco.repro import synthetic
from nanovoco.config import preset
from nanovoco.data import LlavaDataset, build_sample, pad_samples
from nanovoco.model import VoCoLlama
from nanovoco.tokenizer import VICUNA, Tokenizer, train_tiny_tokenizer
from nanovoco.voco import Layout, TEXT, VISION, VOCO, voco_mask


def test_score_on_hand_made_answers():
    answers = ["Blue.", "two", " LEFT ", "square", "three"]
    references = ["blue", "three", "left", "circle", "three"]
    types = ["closest", "count", "horizontal", "shape", "count"]
    result = evaluate.score(answers, references, types)
    assert result["correct"] == [1, 0, 1, 0, 1]
    assert result["answers"] == ["blue", "two", "left", "square", "three"]  # normalised, in order
    assert result["overall"] == pytest.approx(3 / 5) and result["n"] == 5
    assert result["by_type"] == {"closest": 1.0, "count": 0.5, "horizontal": 1.0, "shape": 0.0}
    assert evaluate.score(["a"], ["a"], [None])["by_type"] == {"all": 1.0}
    with pytest.raises(ValueError):  # an answer without its reference is a bug, not a shorter list
        evaluate.score(["a", "b"], ["a"], [None, None])


@pytest.fixture(scope="module")
def held_out(tmp_path_factory):
    d = tmp_path_factory.mktemp("scoring")
    path = synthetic.generate(d, n_images=6, questions_per_image=2, seed=3, image_size=56, n_objects=3)
    texts = [t["value"] for r in json.loads(path.read_text()) for t in r["conversations"]]
    tok = Tokenizer(train_tiny_tokenizer(texts * 10, d / "tokenizer.model"))
    config = preset("tiny", tok.vocab_size)
    return LlavaDataset(path, d, tok, config, num_voco=2, max_len=256, system=""), config


@pytest.mark.parametrize("compressed", [True, False])
def test_vqa_accuracy_scores_what_the_model_answers(held_out, monkeypatch, compressed):
    """A stand-in for generation answers every other question right: the accuracy is exactly that, per type, and
    generation runs under the VoCo mask exactly when asked to (the text sees no vision token then), and otherwise
    with every real token labelled TEXT (plain causal attention)."""
    dataset, config = held_out
    torch.manual_seed(0)
    vlm = VoCoLlama(config)
    references = [r["conversations"][1]["value"] for r in dataset.records]
    calls = iter(range(len(references)))
    under_voco_mask = []

    def fake_generate(llm, inputs_embeds, segments, groups, position_ids, max_new_tokens, eos_id):
        mask = voco_mask(segments, groups)[:, 0]  # what the prompt's text may attend to
        text_rows, vision_cols = segments == TEXT, segments == VISION
        assert not (mask & text_rows[:, :, None] & vision_cols[:, None, :]).any()
        under_voco_mask.append(bool(vision_cols.any()))  # else every real token is TEXT: plain causal
        answers = []
        for _ in range(segments.shape[0]):
            i = next(calls)
            answers.append(dataset.tokenizer.encode(references[i] if i % 2 == 0 else "purple", bos=False))
        return answers

    monkeypatch.setattr(evaluate, "generate", fake_generate)
    result = evaluate.vqa_accuracy(vlm, dataset, compressed=compressed, batch_size=5)
    wrong_anyway = [i for i, r in enumerate(references) if i % 2 and r == "purple"]  # "purple" can be right
    assert result["correct"] == [int(i % 2 == 0 or i in wrong_anyway) for i in range(len(references))]
    assert result["n"] == len(references) and result["overall"] == pytest.approx(sum(result["correct"]) / 12)
    assert under_voco_mask == [compressed] * 3


def sample_with_voco(num_voco=2):
    ids = {"<voco>": 7}

    class Tok:  # build_sample needs encode(_chunks), decode, bos/eos ids and the special ids: a character-level
        # stand-in, "</s>" its EOS
        bos_id, bos_ids, eos_id, special_ids, template = 1, [1], 2, ids, VICUNA

        def encode(self, text, bos=False):
            return [2] if text == "</s>" else [10 + ord(c) % 50 for c in text]

        def encode_chunks(self, chunks):
            ids = [self.encode(text) for text, _ in chunks]
            return sum(ids, []), [loss for chunk, (_, loss) in zip(ids, chunks) for _ in chunk]

        def decode(self, ids):
            return "</s>" if ids == [2] else "".join(chr(i) for i in ids)

    return build_sample(Tok(), [("<image>\nWhat?", "Red.")], Layout(-200, 4, 7, num_voco), system="")


@pytest.mark.parametrize("mode", train.MODES)
def test_each_mode_trains_and_is_evaluated_under_its_mask(mode):
    train_mask, eval_compressed = train.mode_masks(mode)
    batch = pad_samples([sample_with_voco()])
    segments, groups = batch["segments"], batch["groups"]
    mask = train_mask(segments, groups)[0, 0]
    text, vision, voco = (segments[0] == s for s in (TEXT, VISION, VOCO))
    text_sees_vision = bool(mask[text][:, vision].any())
    text_sees_voco = bool(mask[text][:, voco].all())
    # only VoCo-LLaMA trains with the text cut off from the image; the lower bound trains like the upper bound
    assert text_sees_vision == (mode != "voco") and text_sees_voco
    # the lower bound is evaluated like VoCo-LLaMA: through its VoCo tokens only
    assert eval_compressed == (mode in ("voco", "lower_bound"))


@pytest.mark.parametrize("init", ["random", "newline"])
def test_voco_token_init(tmp_path, init):
    """--voco_init=newline starts <voco> as a copy of the "\\n" before it; random leaves the official N(0, 0.02)."""
    tok = Tokenizer(train_tiny_tokenizer(["USER: What is it? ASSISTANT:", "a\nb", "circle"] * 20,
                                         tmp_path / "tokenizer.model"))
    vlm = build_model(train.parse_args(["--preset=tiny-cpu", "--mode=voco", f"--voco_init={init}"]), tok, None)
    weight = vlm.llm.embed_tokens.weight
    voco, newline = weight[tok.special_ids["<voco>"]], weight[tok.encode("\n", bos=False)[-1]]
    assert torch.equal(voco, newline) == (init == "newline")
    assert vlm.config.num_voco == 2 and vlm.config.voco_token_id == tok.special_ids["<voco>"]
