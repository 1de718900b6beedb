"""LLaVA-format visual instruction data, laid out the way VoCo-LLaMA trains on it.

The JSON is LLaVA's (e.g. llava_v1_5_mix665k.json): a list of records {"id", "image"?, "conversations": [{"from":
"human", "value": "<image>\\n..."}, {"from": "gpt", "value": "..."}, ...]}. The token layout is VoCo-LLaMA's
(train_compress.py), which puts the image and the VoCo tokens before the Vicuna system prompt and removes every "\\n"
and "<image>" from the conversation:

    [BOS] [image x N] [\\n] [<voco> x num_voco] [\\n] system USER: u1 ASSISTANT: a1</s>USER: u2 ASSISTANT: a2</s>
    '------ VISION, group 0 ------' VOCO, group 0 '----------------------- TEXT, group -1 ---------------------'

A video is a list of frames behind one "<image>" tag (our extension; the official code has no video path): every
frame is laid out as an image of its own, [BOS] [frame x N] [\\n] [<voco> x K], in a group of its own, so that each
frame is compressed alone (the VoCo mask keeps groups apart) exactly as a single image is. Frame f's tokens take the
positions of a single image shifted by f*K: consecutive frames' VoCo tokens sit side by side in position, in time
order, and a video of F frames spends F*K positions, not F*(N + K), of the context on its frames. (Frames overlap in
the positions of their vision tokens, which is harmless: no frame sees another, and the text sees no vision token.)
Without VoCo tokens (the `full` mode) frames are not compressed and simply follow each other.

Labels are LLaVA's preprocess_v1: loss on each answer and its </s> only. Both codebases tokenize the whole prompt and
then find the answer spans again from the lengths of separately tokenized rounds (off by a token wherever the
tokenizer merges across a boundary: LLaVA's "tokenization mismatch" warning). Here the sequence is built chunk by
chunk, so labels and segments are right by construction. Text-only records (no "image" key) are plain Vicuna.
The template is the tokenizer's: with a ChatML LLM (SmolLM2-Instruct) the text after the VoCo tokens reads
"\\n<|im_start|>system\\n...<|im_end|>\\n<|im_start|>user\\nu1<|im_end|>\\n<|im_start|>assistant\\na1<|im_end|>", the
loss on each answer and its <|im_end|>.
A video record's "image" is the list of its frame files, in time order.
"""
from __future__ import annotations

import copy
import json
import os
import random
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from nanovoco.image import convertible, load_image, open_image, preprocess
from nanovoco.voco import PAD, TEXT, VISION, VOCO, Layout, compress_prefix

IGNORE_INDEX = -100  # label of tokens without loss (PyTorch cross_entropy's default ignore_index)


@dataclass
class Sample:
    input_ids: list[int]
    labels: list[int]  # the token itself where it is trained on (answers and their </s>), IGNORE_INDEX elsewhere
    segments: list[int]  # voco.TEXT / VISION / VOCO of each token
    groups: list[int]  # f for frame f (0 for an image) and its VoCo tokens, -1 for text
    positions: list[int]  # RoPE position ids: 0, 1, 2, ... except for the frames of a video (see above)

    def add(self, ids, segment, group=-1, loss=False, position=None):
        """Append tokens of one segment and group; by default each takes the position after the one before it."""
        if position is None:
            position = self.positions[-1] + 1 if self.positions else 0
        self.input_ids += ids
        self.labels += ids if loss else [IGNORE_INDEX] * len(ids)
        self.segments += [segment] * len(ids)
        self.groups += [group] * len(ids)
        self.positions += range(position, position + len(ids))

    def text_ids(self) -> list[int]:
        """The tokens from the first TEXT one on: what stage 2 of inference gets (the image is in the VoCo cache)."""
        return self.input_ids[self.segments.index(TEXT):]


def build_sample(tokenizer, turns, layout: Layout | None, *, num_frames: int = 1, max_len: int = 2048,
                 system: str | None = None) -> Sample:
    """One training sample (or, when the last turn's answer is None, an inference prompt) from turns, a list of
    (user_text, assistant_text) pairs. See the module docstring for the layout. layout: the ids of the image and its
    VoCo tokens (voco.Layout), None for a text-only sample; num_frames: 1 for an image, F > 1 for a video of F frames.
    system: the system prompt; None is the template's default (VoCo-LLaMA's sentence for Vicuna, the model's own
    default system turn for ChatML: tokenizer.ChatTemplate), '' writes no system turn.

    layout.num_voco=0 keeps the image but no VoCo tokens: the uncompressed `full` mode, where voco_mask lets the text
    see the image (voco.uncompressed_as_text). "<image>" is removed from user texts, as the official code does; any
    other special token written in a text ("<voco>", "<s>", "</s>", "<image>" in an answer) is a ValueError rather
    than silently stripped: it would otherwise be encoded as the control token itself. The Vicuna template follows
    VoCo-LLaMA (every newline removed, each chunk encoded on its own); ChatML keeps the texts as written, and the
    text after the image is then the tokenizer's encoding of what the model's chat template renders (without the
    "\\n" that the template writes after the last <|im_end|>, which nothing is trained on).
    A training sample longer than max_len loses the tail of its text; the image/VoCo prefix is never cut.
    """
    if not turns:
        raise ValueError("a sample needs at least one (user, assistant) turn")
    if layout is not None and num_frames < 1:
        raise ValueError(f"num_frames={num_frames}: a sample with an image has 1 (a video more); pass layout=None "
                         f"for a text-only sample")
    s = Sample([], [], [], [], [])
    if layout is None:
        s.add(tokenizer.bos_ids, TEXT)  # plain Vicuna: the conversation right after BOS
        lead, voco_id = "", -1
    else:
        add_frames(s, tokenizer, layout, num_frames)
        lead, voco_id = "\n", layout.voco_token_id  # the official prompt: "<image>\n" + "<voco>" * N + "\n" + ...
    if layout is not None and len(s.input_ids) > max_len:
        raise ValueError(f"the image/VoCo prefix alone is {len(s.input_ids)} tokens ({num_frames} x "
                         f"({layout.num_image_tokens} image + {layout.num_voco} VoCo)), more than max_len={max_len}: "
                         f"raise max_len")
    forbidden = {tokenizer.bos_id, tokenizer.eos_id, voco_id, *tokenizer.special_ids.values()}
    template = tokenizer.template  # Vicuna's for LLaMA's tokenizer, ChatML for SmolLM2's (tokenizer.ChatTemplate)
    system = template.default_system if system is None else system
    end_of_turn = tokenizer.decode([tokenizer.eos_id])  # "</s>", "<|im_end|>": encoded back to eos_id
    chunks = []  # (text, trained on): the conversation after the image, for tokenizer.encode_chunks
    for k, (user, assistant) in enumerate(turns):
        head = lead + (template.system.format(system) if system else "") if k == 0 else template.between
        question = checked(tokenizer, user_text(user, template.newlines), forbidden, f"turn {k}'s user text")
        chunks.append((head + template.user.format(question), False))
        if assistant is None:
            if k != len(turns) - 1:
                raise ValueError(f"turn {k} has no answer but is not the last turn: only the last turn can be open")
            break
        if "<image>" in assistant:
            raise ValueError(f"turn {k}'s assistant text contains '<image>': the tag belongs in a user text")
        answer = assistant if template.newlines else assistant.replace("\n", "")
        chunks += [(checked(tokenizer, answer, forbidden, f"turn {k}'s assistant text"), True), (end_of_turn, True)]
    ids, trained = tokenizer.encode_chunks(chunks)
    for i, loss in zip(ids, trained):
        s.add([i], TEXT, loss=loss)
    if turns[-1][1] is None and len(s.input_ids) > max_len:  # cutting a prompt would cut the question or its end
        raise ValueError(f"the prompt is {len(s.input_ids)} tokens, more than max_len={max_len}; prompts are not "
                         f"truncated: shorten the conversation or raise max_len")
    for field in (s.input_ids, s.labels, s.segments, s.groups, s.positions):  # LLaVA's model_max_length: cut the tail
        del field[max_len:]
    return s


def add_frames(s: Sample, tokenizer, layout: Layout, num_frames: int):
    """The image (num_frames=1) or a video's frames, each [BOS] [image x N] [\\n] [<voco> x K] in a group of its own;
    frames compressed to K tokens take K positions each (module docstring)."""
    frame, K = compress_prefix(tokenizer, layout), layout.num_voco
    stride = K or len(frame)
    for f in range(num_frames):
        # BOS is VISION on purpose: in the official mask it sits before the VoCo tokens, so text never sees it, and
        # a model trained without BOS in the text's view must be run that way. The "\n" after the image too.
        s.add(frame[:len(frame) - K], VISION, f, position=f * stride)
        s.add(frame[len(frame) - K:], VOCO, f)


def checked(tokenizer, text: str, forbidden: set, where: str) -> str:
    """The data's own text, encoded alone (the template's markers are special on purpose), must not spell out a
    special token."""
    bad = [i for i in tokenizer.encode(text, bos=False) if i in forbidden]
    if bad:
        raise ValueError(f"{where} contains the special token {tokenizer.decode(bad[:1])!r} as text: remove it "
                         f"from the data (only '<image>' in a user text is allowed, and removed)")
    return text


def user_text(text: str, newlines: bool = False) -> str:
    """A user turn as the official code feeds it: LLaVA's preprocess_multimodal strips the turn that held
    "<image>" once the tag is out ("What is this? <image>" -> "What is this?"), and VoCo-LLaMA removes every "\n"
    (newlines=False, its Vicuna layout; a ChatML template keeps them)."""
    if "<image>" in text:
        text = text.replace("<image>", "").strip()
    return text if newlines else text.replace("\n", "")


class LlavaDataset(torch.utils.data.Dataset):
    """A LLaVA-format JSON + image folder. Items: dict(sample=Sample, pixel_values=(F, 3, H, W) tensor or None
    (F = 1 for an image, the frames of a video), type=the record's "type" or None); prompt(i) gives the first
    question alone, for evaluation.

    config is the VoCoLlamaConfig (image_token_id, num_image_tokens, vision.image_size); the VoCo id is the
    tokenizer's "<voco>"; num_voco is K, or a tuple of K for any-K training (`num_voco_of`). The whole file is
    checked at construction, so that a bad record stops a run before training starts rather than hours into it: the
    schema, the roles, the tags, and every image's path (inside the image folder), existence and header (PIL opens
    it, its size is sane and its mode converts to RGB). An image whose pixel data is damaged behind a good header is
    found only when it is decoded, in __getitem__. Every error names the file and the record.
    """

    def __init__(self, json_path, image_folder, tokenizer, config, *, num_voco: int | tuple[int, ...] = 2,
                 max_len: int = 2048, system: str | None = None):
        self.json_path, self.image_folder = Path(json_path), Path(image_folder)
        self.tokenizer, self.num_voco, self.max_len, self.system = tokenizer, num_voco, max_len, system
        # the VoCo id is the tokenizer's: a model that is not trained for VoCo yet has none in its config
        self.layout = Layout(config.image_token_id, config.num_image_tokens, tokenizer.special_ids["<voco>"], 0)
        self.image_size = config.vision.image_size
        self.records = self._read()

    def num_voco_of(self, i) -> int:
        """K for record i: num_voco, or with several (any-K training, train.py --voco_ks) one of them drawn for this
        record, the same on every read, so that a resumed run and every process see the same samples."""
        if isinstance(self.num_voco, int):
            return self.num_voco
        return self.num_voco[random.Random(i).randrange(len(self.num_voco))]

    def with_num_voco(self, num_voco: int) -> LlavaDataset:
        """The same records laid out with num_voco VoCo tokens per image (an any-K model evaluated at each K),
        without checking the files again."""
        other = copy.copy(self)
        other.num_voco = num_voco
        return other

    def with_frames(self, pick) -> LlavaDataset:
        """The same records with each one's frames replaced by pick(i, frames) (a list of the same file names:
        a video model evaluated with its frames shuffled, or shown one of them), without checking the files again."""
        other = copy.copy(self)
        other.records = [{**r, "image": pick(i, frames(r))} for i, r in enumerate(self.records)]
        return other

    def where(self, i, record, file=True) -> str:
        """How errors name a record: "data.json: record 3 (id '000001_2')"."""
        name = f"record {i}" + (f" (id {record['id']!r})" if isinstance(record, dict) and "id" in record else "")
        return f"{self.json_path}: {name}" if file else name

    def _read(self) -> list:
        path = self.json_path
        if not path.is_file():
            raise FileNotFoundError(f"{path} does not exist: pass a LLaVA-format JSON file (a list of records)")
        try:
            records = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{path} is not valid JSON ({e})") from e
        if not isinstance(records, list):
            raise ValueError(f"{path}: expected a JSON list of records, got a {type(records).__name__}")
        # special tokens a text must not spell out ("<image>" is handled on its own)
        forbidden = [self.tokenizer.decode([i]) for i in (self.tokenizer.bos_id, self.tokenizer.eos_id,
                                                           self.layout.voco_token_id)]
        missing = []
        for i, record in enumerate(records):
            self._check(i, record, forbidden)
            missing += [f"{self.where(i, record, file=False)}: {name}" for name in frames(record)
                        if not (self.image_folder / name).is_file()]
        if missing:
            raise FileNotFoundError(f"{path}: {len(missing)} image(s) missing under {self.image_folder}, e.g. "
                                    + "; ".join(missing[:3]))
        images = [(i, record, name) for i, record in enumerate(records) for name in frames(record)]
        for i, record, name in tqdm(images, desc="checking images", disable=len(images) < 1000, leave=False):
            try:
                with open_image(self.image_folder / name) as img:
                    if not convertible(img.mode):
                        raise ValueError(f"has mode {img.mode!r}, which does not convert to RGB faithfully: save it "
                                         f"as an 8-bit RGB or grayscale image")
            except ValueError as e:
                raise ValueError(f"{self.where(i, record)}: image {name}: {e}") from None
        return records

    def _check(self, i, record, forbidden):
        where = self.where(i, record)
        if not isinstance(record, dict):
            raise ValueError(f"{where} is a {type(record).__name__}, not an object")
        turns = record.get("conversations")
        if not isinstance(turns, list) or not turns:
            raise ValueError(f"{where} has no 'conversations' list")
        for j, turn in enumerate(turns):
            expected = ("human", "gpt")[j % 2]
            if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
                raise ValueError(f"{where}: turn {j} is not an object with a string 'value'")
            if turn.get("from") != expected:
                raise ValueError(f"{where}: turn {j} is from {turn.get('from')!r}, expected {expected!r}: roles must "
                                 f"alternate human, gpt, human, ... starting with human")
            if expected == "gpt" and "<image>" in turn["value"]:
                raise ValueError(f"{where}: turn {j} (gpt) contains '<image>': the tag belongs in a human turn")
            for token in forbidden:
                if token in turn["value"]:
                    raise ValueError(f"{where}: turn {j} contains the special token {token!r} as text")
        if len(turns) % 2:
            raise ValueError(f"{where} ends with a human turn that has no gpt answer")
        n_tags = sum(turn["value"].count("<image>") for turn in turns)
        if n_tags > 1:
            raise ValueError(f"{where} has {n_tags} '<image>' tags: at most one image per record")
        if "image" not in record and n_tags:
            raise ValueError(f"{where} has an '<image>' tag but no 'image' key")
        image = record.get("image", "")
        if not (isinstance(image, str) or isinstance(image, list) and image and all(isinstance(f, str) for f in image)):
            raise ValueError(f"{where}: 'image' must be a file name relative to the image folder, or a non-empty list "
                             f"of them (the frames of a video, in time order), got {image!r}")
        for name in frames(record):  # a path that leaves the folder is a mistake in the data (or worse)
            if not name or Path(name).is_absolute() or os.path.normpath(name).split(os.sep)[0] == "..":
                raise ValueError(f"{where}: image {name!r} is not a path inside the image folder "
                                 f"{self.image_folder}: give it relative to that folder (--image_folder)")

    def __len__(self):
        return len(self.records)

    def __getitem__(self, i):
        c = self.records[i]["conversations"]
        return self._item(i, [(c[j]["value"], c[j + 1]["value"]) for j in range(0, len(c), 2)])

    def prompt(self, i):
        """The record's first question as an inference prompt (open after " ASSISTANT:"), for evaluation: the
        item of __getitem__ plus answer=the reference answer to that question."""
        question, answer = (turn["value"] for turn in self.records[i]["conversations"][:2])
        return {**self._item(i, [(question, None)]), "answer": answer}

    def first_turn(self, i):
        """The record's first question and its reference answer alone, laid out as for training (labels on the
        answer): what evaluate.answer_log_probs reads."""
        question, answer = (turn["value"] for turn in self.records[i]["conversations"][:2])
        return self._item(i, [(question, answer)])

    def _item(self, i, turns):
        record = self.records[i]
        try:
            n_frames = len(frames(record))  # 0: a text-only record, laid out without an image
            layout = self.layout.with_num_voco(self.num_voco_of(i)) if n_frames else None
            sample = build_sample(self.tokenizer, turns, layout, num_frames=n_frames or 1, max_len=self.max_len,
                                  system=self.system)
            # LLaVA-1.5's image_aspect_ratio="pad": the whole image, centred on a square
            images = [preprocess(load_image(self.image_folder / name), self.image_size) for name in frames(record)]
            pixel_values = torch.stack(images) if images else None
        except (ValueError, FileNotFoundError) as e:
            raise type(e)(f"{self.where(i, record)}: {e}") from e
        return dict(sample=sample, pixel_values=pixel_values, type=record.get("type"))


def frames(record) -> list[str]:
    """A record's image files: none (text only), one (an image) or a video's frames."""
    image = record.get("image", [])
    return [image] if isinstance(image, str) else image


def answer_positions(labels: torch.Tensor) -> torch.Tensor:
    """(B, L) labels -> (B, L) bool: the positions whose next token is an answer's (position t predicts token
    t + 1), where the loss is taken and where evaluate.answer_log_probs reads the model's distribution."""
    return torch.nn.functional.pad(labels[:, 1:] != IGNORE_INDEX, (0, 1))


def pad_samples(samples, pad_id: int = 0, left: bool = False) -> dict:
    """Samples -> (B, L) tensors input_ids (pad_id), labels (IGNORE_INDEX), segments (PAD), groups (-1 on pad) and
    positions (0 on pad).
    Training pads on the right; prompts for generation pad on the left, so that every row ends where it continues.
    pad_id 0 is LLaMA's <unk>, the pad LLaVA uses; no loss and no attention ever touch it."""
    L = max(len(s.input_ids) for s in samples)

    def pad(field, value):
        rows = [(getattr(s, field), [value] * (L - len(s.input_ids))) for s in samples]
        return torch.tensor([fill + row if left else row + fill for row, fill in rows])  # (B, L)

    return dict(input_ids=pad("input_ids", pad_id), labels=pad("labels", IGNORE_INDEX), segments=pad("segments", PAD),
                groups=pad("groups", -1), positions=pad("positions", 0))


def collate(batch, pad_id: int = 0) -> dict:
    """Items of LlavaDataset -> a right-padded batch (pad_samples) + pixel_values (n_images, 3, H, W) in batch
    order (a video's frames in time order), or None, + types, a list."""
    images = [item["pixel_values"] for item in batch if item["pixel_values"] is not None]
    return dict(**pad_samples([item["sample"] for item in batch], pad_id),
                pixel_values=torch.cat(images) if images else None, types=[item["type"] for item in batch])
