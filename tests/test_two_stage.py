"""Two-stage inference (compress once, answer from the VoCo cache) equals single-pass masked inference: the whole
sequence, vision tokens included, in one forward under the VoCo mask, with the positions of data.build_sample."""
import re

import pytest
import torch

from nanovoco.config import preset
from nanovoco.data import build_sample, pad_samples
from nanovoco.generate import generate
from nanovoco.model import VoCoLlama
from nanovoco.tokenizer import Tokenizer, load_tokenizer, train_tiny_tokenizer
from nanovoco.voco import Layout, compress_prefix, voco_mask
from tiny import bpe_tokenizer
from nanovoco.voco_cache import answer, compress, compress_video, generate_from_cache

QUESTIONS = ["What shape is the red object?", "How many squares?", "Is the blue circle left of the green one or not?"]
CORPUS = QUESTIONS + ["USER: ASSISTANT: circle square triangle left right red green blue"] * 20


@pytest.fixture(scope="module", params=["sentencepiece", "bpe"])
def tok(request, tmp_path_factory):
    """LLaMA's kind of tokenizer (Vicuna's template, BOS first) and SmolLM2's (ChatML, no BOS): the layouts differ,
    the equalities below hold for both."""
    if request.param == "bpe":
        return load_tokenizer(bpe_tokenizer(tmp_path_factory.mktemp("bpe")))
    return Tokenizer(train_tiny_tokenizer(CORPUS * 5, tmp_path_factory.mktemp("tok") / "tokenizer.model"))


def model(tok, num_voco):
    torch.manual_seed(num_voco)
    config = preset("tiny", tok.vocab_size)
    config.num_voco, config.voco_token_id = num_voco, tok.special_ids["<voco>"]
    return VoCoLlama(config).eval()


def sample(tok, vlm, question, num_frames=1, num_voco=None):
    c = vlm.config
    return build_sample(tok, [(question, None)], Layout.of(c, num_voco or c.num_voco), num_frames=num_frames)


def prefix(tok, vlm, num_voco=None):
    c = vlm.config
    return torch.tensor(compress_prefix(tok, Layout.of(c, num_voco or c.num_voco)))


def single_pass(vlm, samples, pixels):
    """The reference: one forward over the whole left-padded batch under the VoCo mask -> (B, L, V) logits."""
    b = pad_samples(samples, left=True)
    with torch.no_grad():
        return vlm(b["input_ids"], pixels, attn_mask=voco_mask(b["segments"], b["groups"]),
                   position_ids=b["positions"]).logits


def images(n, seed=0):
    return torch.randn(n, 3, 56, 56, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("K", [1, 2, 8])
def test_answer_equals_single_pass(tok, K):
    vlm = model(tok, K)
    pixels = images(1)
    cache = compress(vlm, pixels, prefix(tok, vlm))
    assert [k.shape for k, _ in cache.kv] == [(1, 2, K, 32)] * 4  # only the K VoCo tokens of every layer
    P = len(prefix(tok, vlm))
    assert cache.positions.tolist() == list(range(P - K, P)) and cache.next_position == P
    for q in QUESTIONS:  # many questions from one cache, which stays as it was
        s = sample(tok, vlm, q)
        ref = single_pass(vlm, [s], pixels)[:, P:]
        with torch.no_grad():
            got = answer(vlm, cache, torch.tensor([s.text_ids()])).logits
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("K", [1, 2, 8])
def test_batched_questions_and_generation_equal_single_pass(tok, K):
    vlm = model(tok, K)
    pixels = images(1, seed=1)
    cache = compress(vlm, pixels, prefix(tok, vlm))
    samples = [sample(tok, vlm, q) for q in QUESTIONS]
    T = max(len(s.text_ids()) for s in samples)
    ids = torch.tensor([[0] * (T - len(s.text_ids())) + s.text_ids() for s in samples])  # left-padded questions
    real = torch.tensor([[False] * (T - len(s.text_ids())) + [True] * len(s.text_ids()) for s in samples])
    ref = single_pass(vlm, samples, pixels.expand(3, -1, -1, -1))[:, -T:]
    with torch.no_grad():
        got = answer(vlm, cache, ids, real).logits
    torch.testing.assert_close(got[real], ref[real], atol=1e-5, rtol=0)

    b = pad_samples(samples, left=True)
    with torch.no_grad():
        embeds = vlm.embed(b["input_ids"], pixels.expand(3, -1, -1, -1))
    expected = generate(vlm.llm, inputs_embeds=embeds, segments=b["segments"], groups=b["groups"],
                        position_ids=b["positions"], max_new_tokens=12)
    assert generate_from_cache(vlm, cache, ids, real, max_new_tokens=12) == expected
    # one cache row per question works too (a batch of images, one question each)
    many = compress(vlm, images(3, seed=2), prefix(tok, vlm))
    ref = single_pass(vlm, samples, images(3, seed=2))[:, -T:]
    with torch.no_grad():
        torch.testing.assert_close(answer(vlm, many, ids, real).logits[real], ref[real], atol=1e-5, rtol=0)


def test_one_model_at_every_k_equals_single_pass_and_its_first_k_tokens_are_a_k_compression(tok):
    """One set of weights at several K (an any-K model, train.py --voco_ks; or a per-K model run at another K, the
    paper's Table 4): compress(num_voco=k) and answer equal the masked single pass over the sample laid out with k
    VoCo tokens, for each k. And the layout is nested: the first k VoCo tokens of an 8-token compression are the
    k-token compression, so one stage-1 pass serves every smaller budget (VoCoCache.first)."""
    vlm = model(tok, 4)  # its config's K, the default; asked for others
    pixels = images(1, seed=2)
    largest = compress(vlm, pixels, prefix(tok, vlm, 8), num_voco=8)
    assert not any(t.requires_grad for kv in largest.kv for t in kv)  # stage 1 keeps no autograd graph
    for k in (1, 2, 4, 8):
        P = len(prefix(tok, vlm, k))
        cache = compress(vlm, pixels, prefix(tok, vlm, k), num_voco=k)
        assert cache.num_voco == k and cache.positions.tolist() == list(range(P - k, P)) and cache.next_position == P
        nested = largest.first(k)
        assert nested.num_voco == k and torch.equal(nested.positions, cache.positions)
        assert nested.next_position == cache.next_position
        for (a, b), (c, d) in zip(nested.kv, cache.kv):
            torch.testing.assert_close((a, b), (c, d), atol=1e-5, rtol=0)
        s = sample(tok, vlm, QUESTIONS[0], num_voco=k)
        ref = single_pass(vlm, [s], pixels)[:, P:]
        with torch.no_grad():
            got, from_nested = (answer(vlm, x, torch.tensor([s.text_ids()])).logits for x in (cache, nested))
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)
        torch.testing.assert_close(from_nested, ref, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match=r"ends with exactly 2 <voco> tokens: build it with "
                                         r"voco.compress_prefix\(tokenizer, Layout.of\(config, 2\)\)"):
        compress(vlm, pixels, prefix(tok, vlm, 4), num_voco=2)  # a prefix of 4 VoCo tokens, 2 asked
    with pytest.raises(ValueError, match="holds 8 VoCo tokens per image: it can give the first 1 to 8, not 9"):
        largest.first(9)
    with pytest.raises(ValueError, match="first\\(k\\) takes an image's cache"):
        compress_video(vlm, images(2), prefix(tok, vlm)).first(1)
    # what a user may type instead of an int is refused at the call, naming the argument
    for bad in (2.5, "3", True, None):
        with pytest.raises(TypeError, match=r"first\(k\) takes a number of VoCo tokens, an int >= 1, not "):
            largest.first(bad)
        with pytest.raises(TypeError, match=r"compress\(num_voco=...\) takes a number of VoCo tokens"):
            compress(vlm, pixels, prefix(tok, vlm, 2), num_voco=bad if bad is not None else 2.0)
    # a K whose prefix leaves no room for the question in the context: refused at stage 1, not at stage 2
    too_many = vlm.config.text.max_position_embeddings
    with pytest.raises(ValueError, match=r"and the model's context is 512 positions, with the question still to "
                                         r"come: give num_voco <= "):
        compress(vlm, pixels, prefix(tok, vlm, too_many), num_voco=too_many)


def test_text_positions_continue_after_the_voco_tokens(tok):
    """Why answer() does not simply continue after the cache's length: that would close the gap of the dropped vision
    tokens, and every relative distance the model saw in training would change."""
    vlm = model(tok, 2)
    cache = compress(vlm, images(1), prefix(tok, vlm))
    text = torch.tensor([sample(tok, vlm, QUESTIONS[0]).text_ids()])
    with torch.no_grad():
        right = answer(vlm, cache, text).logits
        cache.next_position = cache.positions.shape[0]  # as if the VoCo tokens were at 0..K-1
        compacted = answer(vlm, cache, text).logits
    assert (right - compacted).abs().max() > 1e-3


@pytest.mark.parametrize("K", [1, 2, 8])
def test_video_caches_equal_single_pass_over_all_frames(tok, K):
    vlm = model(tok, K)
    frames = images(5, seed=3)
    P = len(prefix(tok, vlm))
    cache = compress_video(vlm, frames, prefix(tok, vlm), batch_size=2)  # frames compressed 2 at a time
    assert cache.kv[0][0].shape == (1, 2, 5 * K, 32)
    assert cache.positions.tolist() == list(range(P - K, P - K + 5 * K)) and cache.next_position == P + 4 * K
    for q in QUESTIONS[:2]:
        s = sample(tok, vlm, q, num_frames=5)
        ref = single_pass(vlm, [s], frames)[:, 5 * P:]  # every frame in its own group, shifted by f*K positions
        with torch.no_grad():
            got = answer(vlm, cache, torch.tensor([s.text_ids()])).logits
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)
        b = pad_samples([s])
        with torch.no_grad():
            expected = generate(vlm.llm, inputs_embeds=vlm.embed(b["input_ids"], frames), segments=b["segments"],
                                groups=b["groups"], position_ids=b["positions"], max_new_tokens=8)
        assert generate_from_cache(vlm, cache, torch.tensor([s.text_ids()]), max_new_tokens=8) == expected
    # the positions keep the frames' order: the same frames reversed are another video
    reverse = compress_video(vlm, frames.flip(0), prefix(tok, vlm))
    text = torch.tensor([sample(tok, vlm, QUESTIONS[0], num_frames=5).text_ids()])
    with torch.no_grad():
        assert (answer(vlm, cache, text).logits - answer(vlm, reverse, text).logits).abs().max() > 1e-3


def test_stage_errors(tok):
    vlm = model(tok, 2)
    cache = compress(vlm, images(2), prefix(tok, vlm))
    text = torch.tensor([sample(tok, vlm, q).text_ids()[:5] for q in QUESTIONS])
    with pytest.raises(ValueError, match="a cache of 2 rows cannot answer 3 questions"):
        answer(vlm, cache, text)
    with pytest.raises(ValueError, match="text_ids hold image placeholders: the image is in the cache"):
        answer(vlm, cache, torch.full((2, 3), vlm.config.image_token_id))
    with pytest.raises(ValueError, match="exceeds the model's context of 512 positions"):
        generate_from_cache(vlm, cache, text[:2], max_new_tokens=512 - cache.next_position - 4)
    full = 512 - cache.next_position - 5  # exactly the context
    assert len(generate_from_cache(vlm, cache, text[:2], max_new_tokens=full)[0]) > 0
    with pytest.raises(ValueError, match=r"needs a model with VoCo tokens \(this one has num_voco=0\)"):
        compress(model(tok, 0), images(1), prefix(tok, vlm)[:-2])
    with pytest.raises(ValueError, match="a prefix that ends with exactly 2 <voco> tokens: build it with "
                                         "voco.compress_prefix"):
        compress(vlm, images(1), prefix(tok, vlm)[:-1])


def test_what_a_user_may_pass_instead_is_refused_at_the_call(tok):
    """The public API's edge (compress, compress_video, answer, generate_from_cache, generate): wrong types,
    shapes, ids outside the vocabulary, options out of range and a video past the context are refused before any
    work, each in one message naming the argument and what it takes."""
    vlm = model(tok, 2)
    pixels, p = images(1), prefix(tok, vlm)
    cache = compress(vlm, pixels, p)
    text = torch.tensor([sample(tok, vlm, QUESTIONS[0]).text_ids()])
    V = vlm.config.text.vocab_size
    refused = [
        (lambda: compress(vlm, pixels[0], p), ValueError, r"compress\(pixel_values\) must be \(n, 3, H, W\) with n >= "
                                                          r"1, got \(3, 56, 56\): a single one is x\[None\]"),
        (lambda: compress(vlm, pixels.tolist(), p), TypeError, r"compress\(pixel_values\) takes a float tensor"),
        (lambda: compress(vlm, pixels.to(torch.uint8), p), TypeError, r"takes a float tensor .* not torch.uint8"),
        (lambda: compress(vlm, pixels, p.tolist()), TypeError, r"compress\(prefix_ids\) takes a tensor of token ids"),
        (lambda: compress(vlm, pixels, p[None]), ValueError, r"compress\(prefix_ids\) must be \(length,\)"),
        (lambda: answer(vlm, cache, text[0]), ValueError, r"text_ids must be \(batch, length\), got shape .*: one "
                                                          r"question is ids\[None\]"),
        (lambda: answer(vlm, cache, text.tolist()), TypeError, r"text_ids takes a tensor of token ids"),
        (lambda: answer(vlm, cache, text.float()), TypeError, r"text_ids takes integer token ids, not torch.float32"),
        (lambda: answer(vlm, cache, text + V), ValueError, rf"text_ids holds the id {int(text[0, 0]) + V}, outside "
                                                           rf"the model's vocabulary \(0..{V - 1}\)"),
        (lambda: answer(vlm, cache, -text), ValueError, r"outside the model's vocabulary"),
        (lambda: answer(vlm, cache, text[:, :0]), ValueError, r"text_ids holds no tokens"),
        (lambda: answer(vlm, cache, text, text_mask=torch.ones(1, 2)), ValueError, r"text_mask must have text_ids' "
                                                                                  r"shape"),
        (lambda: answer(vlm, {"kv": cache.kv}, text), TypeError, r"answer takes a VoCoCache .* not a dict"),
        (lambda: compress_video(vlm, images(3), p, batch_size=0), ValueError, r"compress_video\(batch_size\) takes"),
        (lambda: compress_video(vlm, images(3), p, batch_size=1.5), ValueError, r"compress_video\(batch_size\)"),
        (lambda: compress_video(vlm, images(1)[:0], p), ValueError, r"compress_video\(frames\) must be \(n, 3, H, "
                                                                    r"W\) with n >= 1"),
        (lambda: compress_video(vlm, images(1).expand(300, -1, -1, -1), p), ValueError,
         r"compress_video: 300 frames of 2 VoCo tokens take positions up to \d+, and the model's context is 512 "
         r"positions, with the question still to come: give at most \d+ frames"),
    ]
    for bad in (0, -1, 2.5, "3", True):
        refused.append((lambda bad=bad: generate_from_cache(vlm, cache, text, max_new_tokens=bad), ValueError,
                        rf"max_new_tokens takes an int >= 1, not {bad!r}"))
        refused.append((lambda bad=bad: generate(vlm.llm, text, max_new_tokens=bad), ValueError,
                        "max_new_tokens takes"))
    for option, bad, message in [("temperature", -0.5, r"temperature takes a number >= 0"),
                                 ("temperature", "0.7", r"temperature takes a number >= 0"),
                                 ("top_p", 0.0, r"top_p takes a number in \(0, 1\]"),
                                 ("top_p", 1.5, r"top_p takes a number in \(0, 1\]"),
                                 ("eos_id", V, rf"eos_id takes a token id in 0..{V - 1}"),
                                 ("eos_id", "2", r"eos_id takes a token id"),
                                 ("generator", 0, r"generator takes a torch.Generator or None, not a int")]:
        refused.append((lambda option=option, bad=bad: generate_from_cache(vlm, cache, text, max_new_tokens=2,
                                                                           **{option: bad}),
                        (ValueError, TypeError), message))
    refused.append((lambda: generate(vlm.llm, [[1, 2]], max_new_tokens=2), TypeError, "input_ids takes a tensor"))
    for call, error, message in refused:
        with pytest.raises(error, match=message):
            call()
    # the largest video that fits answers, as the message says
    fits = int(re.search(r"give at most (\d+) frames", str(pytest.raises(
        ValueError, compress_video, vlm, images(1).expand(300, -1, -1, -1), p).value)).group(1))
    video = compress_video(vlm, images(1).expand(fits, -1, -1, -1), p)
    assert answer(vlm, video, text[:, :1]).logits.shape == (1, 1, V)
