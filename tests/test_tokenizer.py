"""nanovoco.tokenizer against sentencepiece itself, the reference the slow LlamaTokenizer of LLaVA-1.5 wraps."""

import os

import pytest
import sentencepiece as spm

from nanovoco.tokenizer import VICUNA_SYSTEM, Tokenizer, load_tokenizer, render_vicuna, train_tiny_tokenizer
from tiny import awkward_strings, bpe_tokenizer

CORPUS = [
    "A chat between a curious user and an artificial intelligence assistant.",
    "USER: What is shown in the image? ASSISTANT: A small cat sitting on a red mat.",
    "USER: How many dogs are there? ASSISTANT: There are 3 dogs playing in the park.",
    "The quick brown fox jumps over the lazy dog.\nThen it runs away.",
    "Describe the picture in detail, please. The sky is blue and the grass is green.",
] * 10

PLAIN_TEXTS = [
    "hello world",
    "What is shown in the image?",
    "  two leading spaces and trailing ",
    "line one\nline two\n\n",
    "digits 1234567890 and 3.14",
    "unicode café naïve 東京 ☃ 👩‍💻",  # mostly unseen characters: byte fallback
    "\ttab",
    "",
]


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    return train_tiny_tokenizer(CORPUS, tmp_path_factory.mktemp("tok") / "tokenizer.model")


@pytest.fixture(scope="module")
def tok(tiny_path):
    return Tokenizer(tiny_path, special_tokens=("<image>", "<voco>"))


@pytest.fixture(scope="module")
def sp(tiny_path):
    return spm.SentencePieceProcessor(model_file=tiny_path)


@pytest.fixture(scope="module")
def plain_path(tmp_path_factory):
    """A tiny model trained without user_defined_symbols: <image> and <voco> are not pieces of it."""
    prefix = tmp_path_factory.mktemp("plain") / "tokenizer"
    spm.SentencePieceTrainer.train(sentence_iterator=iter(CORPUS), model_prefix=str(prefix), model_type="bpe",
                                   vocab_size=400, byte_fallback=True, hard_vocab_limit=False, minloglevel=2)
    return str(prefix) + ".model"


@pytest.mark.parametrize("text", PLAIN_TEXTS)
def test_plain_text_is_sentencepiece_with_bos(tok, sp, text):
    assert tok.encode(text) == [sp.bos_id()] + sp.encode(text)
    assert tok.encode(text, bos=False, eos=True) == sp.encode(text) + [sp.eos_id()]


def test_byte_fallback_is_exercised(tok, sp):
    assert any(sp.is_byte(i) for i in tok.encode("☃ 👩‍💻", bos=False))


def test_tiny_tokenizer_ids_are_llama_like(tok, sp):
    assert (sp.unk_id(), tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, 2, -1)
    assert tok.vocab_size == sp.get_piece_size() <= 400


def test_specials_in_vocab_keep_their_ids(tok, sp):
    assert tok.special_ids == {"<image>": sp.piece_to_id("<image>"), "<voco>": sp.piece_to_id("<voco>")}
    assert all(sp.id_to_piece(i) == s for s, i in tok.special_ids.items())


def test_specials_whole_and_chunks_encoded_independently(tok, sp):
    img, voco, eos = tok.special_ids["<image>"], tok.special_ids["<voco>"], tok.eos_id
    text = "<image>\nDescribe it.<voco><voco> ASSISTANT: A cat.</s>USER: more"
    want = ([tok.bos_id, img] + sp.encode("\nDescribe it.") + [voco, voco] + sp.encode(" ASSISTANT: A cat.")
            + [eos] + sp.encode("USER: more"))
    assert tok.encode(text) == want
    # each chunk gets its own dummy prefix, so this differs from sentencepiece on the whole string
    assert tok.encode(text, bos=False) != sp.encode(text)


def test_encode_with_images_expands_each_image(tok, sp):
    ids = tok.encode_with_images("<image>\nA<image>", image_token_id=-200, num_image_tokens=3)
    assert ids == [tok.bos_id, -200, -200, -200] + sp.encode("\nA") + [-200, -200, -200]


def test_eos_and_bos_strings(tok):
    assert tok.encode("</s>", bos=False) == [tok.eos_id]
    assert tok.encode("<s>hi</s>", bos=False) == [tok.bos_id] + tok.encode("hi", bos=False) + [tok.eos_id]


def test_appended_specials_follow_the_vocab(plain_path):
    sp = spm.SentencePieceProcessor(model_file=plain_path)
    n = sp.get_piece_size()
    assert sp.id_to_piece(sp.piece_to_id("<voco>")) != "<voco>"  # really not in this vocabulary

    tok = Tokenizer(plain_path)  # the default adds <voco> alone: "<image>" is a marker, expanded to placeholders
    assert tok.special_ids == {"<voco>": n} and tok.vocab_size == n + 1  # like <voco> = 32000 on Vicuna
    assert tok.encode_with_images("<image>x", -200, 2) == [tok.bos_id, -200, -200] + sp.encode("x")

    # in order, like HF's add_tokens: a string that is already a piece keeps its id and takes no new slot
    piece = sp.id_to_piece(sp.encode("the")[0])
    tok = Tokenizer(plain_path, special_tokens=("<image>", piece, "<voco>", "<image>"))
    assert tok.special_ids == {"<image>": n, piece: sp.piece_to_id(piece), "<voco>": n + 1}
    assert tok.vocab_size == n + 2
    assert tok.encode("a<voco>b", bos=False) == sp.encode("a") + [n + 1] + sp.encode("b")
    assert tok.decode([n, n + 1]) == "<image><voco>"


@pytest.mark.parametrize("text", PLAIN_TEXTS + [
    "<image>\nWhat is this?<voco><voco>",
    render_vicuna([("<image>\nWhat is it?", "A cat."), ("Color?", None)]),
])
def test_decode_inverts_encode(tok, text):
    assert tok.decode(tok.encode(text, bos=False)) == text
    assert tok.decode(tok.encode(text)) == "<s>" + text


def test_text_that_is_not_unicode_is_refused_in_words_about_the_text(tok, tmp_path):
    """A lone surrogate (a bad JSON escape, a mis-decoded file) is named with its place, by both kinds of
    tokenizer, not left to their C++ bindings' errors."""
    bpe = load_tokenizer(bpe_tokenizer(tmp_path))
    for t in (tok, bpe):
        with pytest.raises(ValueError, match=r"the text 'What \\ud800 is it\?' holds '\\ud800' at character 5, "
                                             r"which is not valid Unicode \(a lone surrogate\)"):
            t.encode("What \ud800 is it?")
        with pytest.raises(TypeError, match="encodes text \\(a str\\), not bytes"):
            t.encode(b"What")


def test_decode_rejects_unknown_ids(tok):
    with pytest.raises(ValueError, match=f"token id {tok.vocab_size} is outside the vocabulary"):
        tok.decode([5, tok.vocab_size])
    with pytest.raises(ValueError, match="token id -1 is outside"):
        tok.decode([tok.pad_id])


def test_render_vicuna():
    system = ("A chat between a curious user and an artificial intelligence assistant. "
              "The assistant gives helpful, detailed, and polite answers to the user's questions.")
    assert VICUNA_SYSTEM == system
    assert render_vicuna([("<image>\nWhat is it?", "A cat.")]) == (
        system + " USER: <image>\nWhat is it? ASSISTANT: A cat.</s>")
    assert render_vicuna([("<image>\nWhat is it?", "A cat."), ("Its color?", "Black.")]) == (
        system + " USER: <image>\nWhat is it? ASSISTANT: A cat.</s>USER: Its color? ASSISTANT: Black.</s>")
    assert render_vicuna([("Hi", "Hello."), ("Its color?", None)], system="S") == (
        "S USER: Hi ASSISTANT: Hello.</s>USER: Its color? ASSISTANT:")
    with pytest.raises(ValueError, match="turn 0 has no answer but is not the last turn"):
        render_vicuna([("Hi", None), ("Its color?", None)])


def test_path_may_be_the_directory(tiny_path, tok):
    assert Tokenizer(os.path.dirname(tiny_path)).encode("hello world") == tok.encode("hello world")


def test_missing_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="no tokenizer at .*nope.*the tokenizer.model of the LLaMA/Vicuna"):
        Tokenizer(tmp_path / "nope")


def test_directory_without_tokenizer_model(tmp_path):
    with pytest.raises(FileNotFoundError, match="has no tokenizer.model.*tokenizer.model of the LLaMA/Vicuna"):
        Tokenizer(tmp_path)


def test_corrupt_file(tmp_path):
    bad = tmp_path / "tokenizer.model"
    bad.write_bytes(b"\x00not a sentencepiece model\xff" * 8)
    with pytest.raises(ValueError, match="is not a sentencepiece model.*tokenizer.model of the LLaMA/Vicuna"):
        Tokenizer(bad)


def test_train_tiny_tokenizer_is_deterministic_and_atomic(tmp_path, tiny_path):
    out = train_tiny_tokenizer(CORPUS, tmp_path / "tokenizer.model")
    assert out == str(tmp_path / "tokenizer.model")
    assert os.listdir(tmp_path) == ["tokenizer.model"]  # no temporary file left behind
    with open(out, "rb") as a, open(tiny_path, "rb") as b:
        assert a.read() == b.read()


def test_awkward_strings_are_sentencepiece_and_decode_back(tok, sp):
    """Generated strings (every Unicode category, whitespace and newline runs, a long input) encode as sentencepiece
    does, byte fallback included, and decode back to themselves; a lone surrogate in any of them is refused in
    words about the text."""
    strings = awkward_strings(60)
    assert len(strings[-1]) > 5000
    for text in strings:
        assert tok.encode(text) == [sp.bos_id()] + sp.encode(text), repr(text[:80])
        assert tok.decode(tok.encode(text, bos=False)) == text, repr(text[:80])
        broken = text[:len(text) // 2] + "\ud83d" + text[len(text) // 2:]
        with pytest.raises(ValueError, match=r"not valid Unicode \(a lone surrogate\): remove it"):
            tok.encode(broken)
