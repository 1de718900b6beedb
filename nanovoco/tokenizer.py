"""
Tokenizers, with one interface (bos_id, bos_ids, eos_id, special_ids, vocab_size, template, encode, decode, save):
- `Tokenizer`: LLaMA's, as LLaVA-1.5 and VoCo-LLaMA use it: sentencepiece ids with BOS prepended, plus special
  tokens (`<image>`, `<voco>`) that are kept whole and, when the sentencepiece vocabulary lacks them, appended after it
  the way HF's `tokenizer.add_tokens` does (VoCo-LLaMA's `<voco>` becomes id 32000 on Vicuna's 32,000 pieces).
- `BPETokenizer`: a byte-level BPE tokenizer.json (GPT-2's family: SmolLM2, from_gguf.py writes it), run by HF's
  `tokenizers` package, with `<voco>` appended the same way.
`load_tokenizer` picks by the file a checkpoint holds. Also here: the chat templates (LLaVA's Vicuna v1, which
VoCo-LLaMA trains with, and ChatML for an LLM instruction-tuned on it) and a tiny on-the-spot tokenizer for tests.
"""

import io
import json
import os
import re
import shutil
from dataclasses import dataclass, replace
from pathlib import Path

import sentencepiece as spm

from nanovoco.files import atomic_write, read_json

# LLaVA's conv_vicuna_v1, the template behind `--version v1` (training) and `--conv-mode vicuna_v1` (evaluation).
VICUNA_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
                 "The assistant gives helpful, detailed, and polite answers to the user's questions.")
# VoCo-LLaMA trains and evaluates with its own variant of it (voco_conv_vicuna_v1): note "assistant of the image".
VOCO_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant of the image. "
               "The assistant gives helpful, detailed, and polite answers to the user's questions.")


@dataclass(frozen=True)
class ChatTemplate:
    """How data.build_sample writes a conversation around its turns: `system` and `user` are formats of the system
    prompt and of a user text (ending where the answer starts); after each answer comes the tokenizer's eos_id (the
    end of a turn, trained on with the answer), then `between` before the next user turn. `default_system` is the
    system prompt of a conversation that names none ('' writes no system turn); `newlines` says whether the
    newlines inside the user's and the assistant's texts are kept."""
    name: str
    system: str
    user: str
    between: str
    default_system: str
    newlines: bool


# LLaVA's conv_vicuna_v1 (SeparatorStyle.TWO, sep=" ", sep2="</s>"): "S USER: u ASSISTANT: a</s>USER: ...", with
# VoCo-LLaMA's rules: its own system sentence, and every newline removed from the conversation
VICUNA = ChatTemplate("vicuna", system="{} ", user="USER: {} ASSISTANT:", between="", default_system=VOCO_SYSTEM,
                      newlines=False)
# ChatML, SmolLM2-Instruct's template: eos_id is <|im_end|>; texts as written. Its default system prompt is the
# model's own (chat_template_system): BPETokenizer fills it in from the checkpoint's chat template
CHATML = ChatTemplate("chatml", system="<|im_start|>system\n{}<|im_end|>\n",
                      user="<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n", between="\n",
                      default_system="", newlines=True)


def chat_template_system(chat_template) -> str:
    """The system prompt that a ChatML chat template (Jinja, tokenizer_config.json's "chat_template") writes into a
    conversation that has none, '' when it writes none. SmolLM2-Instruct's writes "<|im_start|>system\nYou are a
    helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n" before the first turn; Qwen2's writes
    "You are a helpful assistant." the same way. Read from the template's text, without running Jinja: the first
    system turn written as a literal (one that pastes in a message's content is the caller's own system prompt)."""
    if not isinstance(chat_template, str):
        return ""
    for m in re.finditer(r"<\|im_start\|>system(?:\n|\\n)(.*?)<\|im_end\|>", chat_template, re.S):
        if not re.search(r"['\"{}+]", m.group(1)):
            return m.group(1)
    return ""


def load_tokenizer(path):
    """The tokenizer of a checkpoint directory (its tokenizer.model, else its tokenizer.json), or of that file."""
    path = Path(path)
    if path.is_dir() and not (path / "tokenizer.model").is_file() and (path / "tokenizer.json").is_file():
        return BPETokenizer(path / "tokenizer.json")
    if path.suffix == ".json":
        return BPETokenizer(path)
    return Tokenizer(path)


class Tokenizer:
    """A sentencepiece `tokenizer.model` plus special tokens, encoded like the slow HF LlamaTokenizer."""

    def __init__(self, path, special_tokens=("<voco>",)):
        path = os.fspath(path)
        hint = "pass the tokenizer.model of the LLaMA/Vicuna checkpoint, or the directory that holds it"
        if os.path.isdir(path):
            if not os.path.isfile(os.path.join(path, "tokenizer.model")):
                raise FileNotFoundError(f"directory {path!r} has no tokenizer.model (nor "
                                        f"tokenizer.json): {hint}")
            path = os.path.join(path, "tokenizer.model")
        elif not os.path.isfile(path):
            raise FileNotFoundError(f"no tokenizer at {path!r}: {hint}")
        self.path = path
        try:
            self.sp = spm.SentencePieceProcessor(model_file=path)
        except (RuntimeError, OSError) as e:
            raise ValueError(f"{path!r} is not a sentencepiece model ({e}): {hint}") from e

        n_sp = self.sp.get_piece_size()
        self.bos_id, self.eos_id, self.pad_id = self.sp.bos_id(), self.sp.eos_id(), self.sp.pad_id()  # -1 if absent
        # a special token that is already a piece (e.g. a user_defined_symbol) keeps its id; the others are appended
        # after the vocabulary in order, as HF's add_tokens does
        self.special_ids, n_added = {}, 0
        for tok in dict.fromkeys(special_tokens):  # drop repeats, keep the order
            i = self.sp.piece_to_id(tok)  # <unk>'s id when tok is not a piece
            if self.sp.id_to_piece(i) != tok:
                i, n_added = n_sp + n_added, n_added + 1
            self.special_ids[tok] = i
        self.vocab_size = n_sp + n_added
        self.template = VICUNA
        self.bos_ids = [self.bos_id]  # what a sequence starts with: LLaMA's tokenizer adds BOS

        # sentencepiece would spell "</s>" out letter by letter; the slow LlamaTokenizer keeps <unk>, <s> and </s>
        # whole, and the Vicuna template writes "</s>" after every answer, so they are special strings here too
        self._str_to_id = {self.sp.id_to_piece(i): i for i in (self.sp.unk_id(), self.bos_id, self.eos_id) if i >= 0}
        self._str_to_id.update(self.special_ids)
        self._id_to_str = {i: s for s, i in self._str_to_id.items()}
        # longest first, so that a special string that contains another one wins
        alternatives = sorted(self._str_to_id, key=len, reverse=True)
        self._split = re.compile("(" + "|".join(map(re.escape, alternatives)) + ")")

    def encode(self, text, bos=True, eos=False):
        """Ids of `text`: special strings as their ids, each text chunk between them encoded on its own."""
        encodable(text)
        ids = list(self.bos_ids) if bos else []
        # re.split with one group alternates text chunk, special, text chunk, ...
        for i, chunk in enumerate(self._split.split(text)):
            if i % 2:
                ids.append(self._str_to_id[chunk])
            elif chunk:
                # each chunk gets sentencepiece's own dummy prefix, as in LLaVA's tokenizer_image_token. No whitespace
                # is stripped next to specials: old transformers versions stripped it around added tokens, nanovoco
                # keeps the text as written
                ids.extend(self.sp.encode(chunk))
        if eos:
            ids.append(self.eos_id)
        return ids

    def encode_with_images(self, text, image_token_id, num_image_tokens, bos=True):
        return encode_with_images(self, text, image_token_id, num_image_tokens, bos)

    def encode_chunks(self, chunks):
        """Ids of a conversation given as (text, loss) chunks, and whether each id is trained on: each chunk encoded
        on its own, as VoCo-LLaMA and LLaVA encode the rounds of a Vicuna conversation (preprocess_v1)."""
        ids, loss = [], []
        for chunk, trained in chunks:
            chunk_ids = self.encode(chunk, bos=False)
            ids += chunk_ids
            loss += [trained] * len(chunk_ids)
        return ids, loss

    def decode(self, ids):
        """Text of `ids` for display: special ids as their strings, runs of other ids through sentencepiece."""
        out, run = [], []
        for i in ids:
            i = int(i)
            if not 0 <= i < self.vocab_size:
                raise ValueError(f"token id {i} is outside the vocabulary (0..{self.vocab_size - 1})")
            if i in self._id_to_str:
                out.append(self.sp.decode(run))
                out.append(self._id_to_str[i])
                run = []
            else:
                run.append(i)
        out.append(self.sp.decode(run))
        return "".join(out)

    def save(self, directory):
        """Write tokenizer.model into `directory` (a checkpoint), where load_tokenizer finds it."""
        atomic_write(Path(directory) / "tokenizer.model", lambda tmp: shutil.copyfile(self.path, tmp))


class BPETokenizer:
    """A byte-level BPE tokenizer.json, encoded by HF's `tokenizers` (the library that defines that format; its
    pre-tokenizer needs Unicode classes that Python's `re` lacks), plus special tokens appended after the vocabulary.
    BOS and EOS are the tokens that tokenizer_config.json beside it names. The template is ChatML when the vocabulary
    has its markers, else Vicuna's."""

    def __init__(self, path, special_tokens=("<voco>",)):
        try:
            from tokenizers import AddedToken
            from tokenizers import Tokenizer as HFTokenizer
        except ImportError:
            raise ValueError(f"{path} needs the tokenizers package: pip install tokenizers") from None
        path = Path(path)
        config_path = path.parent / "tokenizer_config.json"
        if not path.is_file():
            raise FileNotFoundError(f"no tokenizer at {path}: pass a checkpoint with tokenizer.json")
        try:
            self.hf = HFTokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises its own Exception type on a malformed file
            raise ValueError(f"{path} is not a tokenizers tokenizer.json ({e}): write it again "
                             f"(python -m nanovoco.from_gguf)") from e
        self.config = config = read_json(config_path, "the tokenizer's special tokens (bos_token, eos_token)")
        # the file's special tokens keep their ids; the ones it lacks are appended after the vocabulary, in order
        for tok in dict.fromkeys(special_tokens):
            if self.hf.token_to_id(tok) is None:
                self.hf.add_special_tokens([AddedToken(tok, special=True, normalized=False)])
        self.special_ids = {t.content: i for i, t in self.hf.get_added_tokens_decoder().items() if t.special}
        self.vocab_size = self.hf.get_vocab_size(with_added_tokens=True)

        def token_id(key):
            name = config.get(key)
            name = name.get("content") if isinstance(name, dict) else name
            if self.hf.token_to_id(name or "") is None:
                raise ValueError(f"{config_path}: {key}={name!r} is not a token of {path}")
            return self.hf.token_to_id(name)

        self.bos_id, self.eos_id, self.pad_id = token_id("bos_token"), token_id("eos_token"), -1
        # what a sequence starts with: nothing where the tokenizer adds no BOS (SmolLM2's add_bos_token is false,
        # its bos_token <|im_start|> opens each ChatML turn instead)
        self.bos_ids = [self.bos_id] if config.get("add_bos_token") else []
        chatml = {"<|im_start|>", "<|im_end|>"} <= self.special_ids.keys()
        self.template = replace(CHATML, default_system=chat_template_system(config.get("chat_template"))) \
            if chatml else VICUNA

    def encode(self, text, bos=True, eos=False):
        """Ids of `text`: special strings as their ids, the rest byte-level BPE."""
        encodable(text)
        ids = self.hf.encode(text, add_special_tokens=False).ids
        return (self.bos_ids if bos else []) + ids + ([self.eos_id] if eos else [])

    def encode_chunks(self, chunks):
        """Ids of a conversation given as (text, loss) chunks, and whether each id is trained on: the joined text
        encoded in one pass, so that the ids are the tokenizer's encoding of the rendered conversation (HF's
        apply_chat_template then encode), whatever the texts hold. Where BPE merges across two chunks (the "\\n"
        ending "<|im_start|>assistant\\n" with the spaces that begin an answer), the token is trained on if any of
        its characters is."""
        text = "".join(chunk for chunk, _ in chunks)
        encodable(text)
        spans, start = [], 0
        for chunk, loss in chunks:
            if loss:
                spans.append((start, start + len(chunk)))
            start += len(chunk)
        encoding = self.hf.encode(text, add_special_tokens=False)
        loss = [any(a < end and b > begin for begin, end in spans) for a, b in encoding.offsets]
        return encoding.ids, loss

    def encode_with_images(self, text, image_token_id, num_image_tokens, bos=True):
        return encode_with_images(self, text, image_token_id, num_image_tokens, bos)

    def decode(self, ids):
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"token id {bad[0]} is outside the vocabulary (0..{self.vocab_size - 1})")
        return self.hf.decode(ids, skip_special_tokens=False)

    def save(self, directory):
        """Write tokenizer.json (with the appended special tokens, which keep their ids when read again) and
        tokenizer_config.json into `directory` (a checkpoint), where load_tokenizer finds them."""
        atomic_write(Path(directory) / "tokenizer.json", lambda tmp: self.hf.save(tmp))
        text = json.dumps(self.config, indent=2, ensure_ascii=False)
        atomic_write(Path(directory) / "tokenizer_config.json", lambda tmp: Path(tmp).write_text(text))


def encodable(text: str):
    """Refuse, in words about the text, what no tokenizer can encode: a str that is not Unicode text, such as a lone
    surrogate (which Python lets a string hold, e.g. from a bad JSON escape or a mis-decoded file). Without this,
    sentencepiece and tokenizers fail with errors about their C++ bindings."""
    if not isinstance(text, str):
        raise TypeError(f"the tokenizer encodes text (a str), not {type(text).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        around = text[max(0, e.start - 20):e.end + 20]
        raise ValueError(f"the text {around!r} holds {text[e.start:e.end]!r} at character {e.start}, which is not "
                         f"valid Unicode (a lone surrogate): remove it, or read the text with its right "
                         f"encoding") from None


def encode_with_images(tokenizer, text, image_token_id, num_image_tokens, bos=True):
    """tokenizer.encode(), with every "<image>" expanded to num_image_tokens placeholder ids (LLaVA's
    tokenizer_image_token, expanded up front): the model replaces each placeholder by one projected vision
    feature. "<image>" is a marker in the text, not a vocabulary entry: nothing is added to the vocabulary for
    it, so on Vicuna the one added token is <voco>, id 32000, as in the official code."""
    chunks = text.split("<image>")
    ids = tokenizer.encode(chunks[0], bos=bos)
    for chunk in chunks[1:]:
        ids += [image_token_id] * num_image_tokens + tokenizer.encode(chunk, bos=False)
    return ids


def stream_text(tokens, tokenizer, eos_id=None):
    """Tokens as they are generated (ints, or one-element tensors) -> the new text of each one, to print as it comes.
    The whole answer is decoded every time, since a sentencepiece piece alone loses its leading space. A byte-level
    token can end inside a UTF-8 character (decoded as "\ufffd" until a later token completes it): that part waits
    for a later piece, so each token gives one piece, one token late, and the last piece has whatever is left."""
    ids, text, shown, piece = [], "", "", None
    for token in tokens:
        if int(token) == eos_id:
            break
        if piece is not None:
            yield piece
        ids.append(int(token))
        text = tokenizer.decode(ids)
        stable = text.rstrip("\ufffd")
        piece, shown = stable[len(shown):], stable
    if piece is not None:
        yield piece + text[len(shown):]


def trained_system_prompt(model_dir) -> str | None:
    """The system prompt a checkpoint was trained with: its prompt.json, {"system": ...}, which train.py writes
    beside the weights; None (its template's default: data.build_sample) for a checkpoint without one."""
    path = Path(model_dir) / "prompt.json"
    return read_json(path, "the system prompt")["system"] if path.is_file() else None


def render_vicuna(turns, system=VICUNA_SYSTEM):
    """
    The Vicuna v1 prompt (LLaVA's SeparatorStyle.TWO, sep=" ", sep2="</s>") of `turns`, a list of
    (user_message, assistant_message) pairs. An assistant message of None, allowed in the last turn only, leaves the
    prompt open after "ASSISTANT:" for generation.
    """
    prompt = system + " "
    for k, (user, assistant) in enumerate(turns):
        prompt += "USER: " + user + " "
        if assistant is None:
            if k != len(turns) - 1:
                raise ValueError(f"turn {k} has no answer but is not the last turn: only the last turn can be open")
            prompt += "ASSISTANT:"
        else:
            prompt += "ASSISTANT: " + assistant + "</s>"
    return prompt


def train_tiny_tokenizer(texts, out_path, vocab_size=400):
    """Train a LLaMA-like byte-fallback BPE sentencepiece model on `texts`, write it to `out_path`, return the path."""
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_writer=model, model_type="bpe", vocab_size=vocab_size,
        # LLaMA's settings: ids 0/1/2 for <unk>/<s>/</s>, no pad piece, bytes for unseen characters, no normalization
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, byte_fallback=True, normalization_rule_name="identity",
        add_dummy_prefix=True, remove_extra_whitespaces=False, split_digits=True, allow_whitespace_only_pieces=True,
        character_coverage=1.0, user_defined_symbols=["<image>", "<voco>"],
        # a small corpus cannot fill the vocabulary: let it come out smaller instead of failing
        hard_vocab_limit=False,
        num_threads=1, minloglevel=2)  # one thread for byte-identical output; no training log
    Path(out_path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write(Path(out_path), lambda tmp: Path(tmp).write_bytes(model.getvalue()))
    return str(out_path)
