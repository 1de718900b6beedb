"""
The LLaMA tokenizer as LLaVA-1.5 and VoCo-LLaMA use it: sentencepiece ids with BOS prepended, plus special tokens
(`<image>`, `<voco>`) that are kept whole and, when the sentencepiece vocabulary lacks them, appended after it the way
HF's `tokenizer.add_tokens` does (VoCo-LLaMA's `<voco>` becomes id 32000 on Vicuna's 32,000 pieces).
Also here: the Vicuna v1 chat template (LLaVA's `conv_vicuna_v1`) and a tiny on-the-spot tokenizer for tests.
"""

import io
import os
import re
from pathlib import Path

import sentencepiece as spm

from nanovoco.files import atomic_write, read_json

# LLaVA's conv_vicuna_v1, the template behind `--version v1` (training) and `--conv-mode vicuna_v1` (evaluation).
VICUNA_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
                 "The assistant gives helpful, detailed, and polite answers to the user's questions.")
# VoCo-LLaMA trains and evaluates with its own variant of it (voco_conv_vicuna_v1): note "assistant of the image".
VOCO_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant of the image. "
               "The assistant gives helpful, detailed, and polite answers to the user's questions.")


class Tokenizer:
    """A sentencepiece `tokenizer.model` plus special tokens, encoded like the slow HF LlamaTokenizer."""

    def __init__(self, path, special_tokens=("<voco>",)):
        path = os.fspath(path)
        hint = "pass the tokenizer.model of the LLaMA/Vicuna checkpoint, or the directory that holds it"
        if os.path.isdir(path):
            if not os.path.isfile(os.path.join(path, "tokenizer.model")):
                raise FileNotFoundError(f"directory {path!r} has no tokenizer.model "
                                        f"(a tokenizer.json alone is not enough): {hint}")
            path = os.path.join(path, "tokenizer.model")
        elif not os.path.isfile(path):
            raise FileNotFoundError(f"no tokenizer at {path!r}: {hint}")
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
        ids = [self.bos_id] if bos else []
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
        """encode(), with every "<image>" expanded to num_image_tokens placeholder ids (LLaVA's
        tokenizer_image_token, expanded up front): the model replaces each placeholder by one projected vision
        feature. "<image>" is a marker in the text, not a vocabulary entry: nothing is added to the vocabulary for
        it, so on Vicuna the one added token is <voco>, id 32000, as in the official code."""
        chunks = text.split("<image>")
        ids = self.encode(chunks[0], bos=bos)
        for chunk in chunks[1:]:
            ids += [image_token_id] * num_image_tokens + self.encode(chunk, bos=False)
        return ids

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


def stream_text(tokens, tokenizer, eos_id=None):
    """Tokens as they are generated (ints, or one-element tensors) -> the new text after each one, to print as it
    comes. The whole answer is decoded every time, since a sentencepiece piece alone loses its leading space."""
    ids, shown = [], ""
    for token in tokens:
        if int(token) == eos_id:
            return
        ids.append(int(token))
        text = tokenizer.decode(ids)
        yield text[len(shown):]
        shown = text


def trained_system_prompt(model_dir) -> str:
    """The system prompt a checkpoint was trained with: its prompt.json, {"system": ...}, which train.py writes
    beside the weights; VoCo-LLaMA's for a checkpoint without one."""
    path = Path(model_dir) / "prompt.json"
    return read_json(path, "the system prompt")["system"] if path.is_file() else VOCO_SYSTEM


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
