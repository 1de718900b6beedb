"""Checkpoint files: reading HF-format directories and weights files, strict loading through a key map, saving.

Loading is strict: every key of the map must be on disk with the right shape, and every key on disk must be mapped
or listed as deliberately unused (e.g. CLIP's text tower); anything else is an error naming the file and the fix.
Tensors are read with safetensors; `.bin` files only with `torch.load(weights_only=True)`, which refuses to unpickle
arbitrary objects. What the keys and configs of each layout are is formats.py.
"""
from __future__ import annotations

import json
import pickle
import re
import zipfile
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from nanovoco.files import atomic_write, read_json

WEIGHT_FILES = ("model.safetensors.index.json", "model.safetensors", "pytorch_model.bin.index.json",
                "pytorch_model.bin")


class Checkpoint:
    """The tensors of one checkpoint: a directory (config.json + weights, sharded or not), or with
    `weights_file=True` a single weights file (LLaVA's mm_projector.bin)."""

    def __init__(self, path, weights_file=False):
        self.path = Path(path)
        if not self.path.exists():
            what = "weights file (e.g. mm_projector.bin)" if weights_file else \
                "checkpoint directory (config.json + model.safetensors)"
            raise FileNotFoundError(f"{self.path} does not exist: pass a local {what}; nanovoco never downloads from "
                                    f"the Hugging Face hub")
        self.config, self.config_file = None, None
        if weights_file and self.path.is_dir():
            raise ValueError(f"{self.path} is a directory: pass the weights file itself (e.g. mm_projector.bin)")
        if self.path.is_dir():
            self.config_file = self.path / "config.json"
            self.config = read_json(self.config_file, "the checkpoint's config.json")
            found = [self.path / name for name in WEIGHT_FILES if (self.path / name).exists()]
            if not found:
                raise FileNotFoundError(f"{self.path} holds no weights: expected one of {', '.join(WEIGHT_FILES)}")
            weights = found[0]
        elif weights_file:
            weights = self.path
        else:
            raise ValueError(f"{self.path} is a file: pass the checkpoint directory (with config.json and weights)")
        self._open = {}  # file -> safe_open handle, or the dict of tensors of a .bin
        if weights.name.endswith(".index.json"):  # sharded: the index maps every key to its shard
            index = read_json(weights, "the shard index")
            self.files = {k: weights.parent / f for k, f in index.get("weight_map", {}).items()}
            for shard in sorted(set(self.files.values())):
                if not shard.exists():
                    raise FileNotFoundError(f"shard {shard} named in {weights} is missing: download every shard")
                # open every shard now: a corrupt one, or one that disagrees with the index, is reported up front
                listed = {k for k, f in self.files.items() if f == shard}
                if set(self._handle(shard).keys()) != listed:
                    raise ValueError(f"{shard} does not hold the tensors that {weights} lists for it: the index and "
                                     f"the shards come from different downloads; download them again together")
        else:
            self.files = {k: weights for k in self._handle(weights).keys()}

    def _handle(self, f: Path):
        if f not in self._open:
            self._open[f] = open_safetensors(f) if f.suffix == ".safetensors" else load_bin(f)
        return self._open[f]

    def get(self, key) -> torch.Tensor:
        h = self._handle(self.files[key])
        return h[key] if isinstance(h, dict) else h.get_tensor(key)

    def shape(self, key) -> tuple:
        h = self._handle(self.files[key])
        return tuple(h[key].shape) if isinstance(h, dict) else tuple(h.get_slice(key).get_shape())


def open_safetensors(f: Path):
    try:
        return safe_open(f, framework="pt")
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{f} is not a readable safetensors file ({e}): it is corrupt or truncated; "
                         f"download or save it again") from e


def load_bin(f: Path) -> dict:
    """A PyTorch pickle of tensors, read with weights_only=True: anything but tensors is refused, never executed."""
    if f.suffix not in (".bin", ".pt", ".pth"):
        raise ValueError(f"{f} is not a weights file: expected .safetensors or a PyTorch .bin")
    try:
        # memory-map the zip format of torch.save (PyTorch >= 1.6) so tensors are read on demand; older files whole
        state = torch.load(f, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(f))
    except pickle.UnpicklingError as e:
        # torch's message is long advice to turn weights_only off; keep only what was refused
        detail = re.search(r"WeightsUnpickler error:\s*(.+?)(?: was not an allowed|\n|$)", str(e))
        raise ValueError(f"{f} could not be read as plain tensors ({detail[1] if detail else 'not a weights file'}): "
                         f"it is corrupt, or holds objects other than tensors, which nanovoco does not unpickle; "
                         f"download it again, or convert it to safetensors where it was made") from e
    except (RuntimeError, EOFError, OSError) as e:
        raise ValueError(f"{f} is not a readable PyTorch file ({e}): it is corrupt or truncated; download it "
                         f"again") from e
    if not isinstance(state, dict) or not all(isinstance(t, torch.Tensor) for t in state.values()):
        raise ValueError(f"{f} is not a dict of tensors (a state dict): it is not a checkpoint nanovoco can read")
    return state


def load(cls, config, parts, dtype=None, device=None):
    """Build `cls(config)` on the meta device, then fill it from `parts`: a list of (Checkpoint, key map, unused
    key patterns), one per checkpoint. Strict: see the module docstring. dtype defaults to float32, whatever the
    checkpoint stores (pass torch.bfloat16 for a 7B model: 14 GB instead of 28 GB)."""
    with torch.device("meta"):
        model = cls(config)
    expected = model.state_dict()
    state = {}
    for ckpt, keys, unused in parts:
        where = ckpt.path
        missing = [k for k in keys.values() if k not in ckpt.files]
        if missing:
            raise ValueError(f"{where}: {len(missing)} expected tensor(s) missing, e.g. {missing[:3]}: the weights "
                             f"do not match {ckpt.config_file or 'the expected layout'} (wrong or incomplete "
                             f"checkpoint?)")
        mapped = set(keys.values())
        extra = [k for k in ckpt.files if k not in mapped and not any(re.fullmatch(u, k) for u in unused)]
        if extra:
            raise ValueError(f"{where}: {len(extra)} unexpected tensor(s), e.g. {extra[:3]}: the weights hold more "
                             f"than {ckpt.config_file or 'the model'} describes (num_hidden_layers or "
                             f"tie_word_embeddings wrong?), or this is another kind of checkpoint")
        for ours, theirs in keys.items():
            if ckpt.shape(theirs) != tuple(expected[ours].shape):
                raise ValueError(f"{ckpt.files[theirs]}: {theirs} has shape {ckpt.shape(theirs)}, but the model "
                                 f"built from {config_source(parts)} needs {tuple(expected[ours].shape)}: these "
                                 f"weights were saved for another configuration (or another vision tower)")
            state[ours] = ckpt.get(theirs).to(device=device, dtype=dtype or torch.float32)
    if state.keys() != expected.keys():
        missing, extra = sorted(expected.keys() - state.keys()), sorted(state.keys() - expected.keys())
        raise ValueError(f"{config_source(parts)}: the checkpoint has no tensors for {missing[:3]} (of "
                         f"{len(missing)}) and extra ones for {extra[:3]}: it was saved with another configuration "
                         f"(e.g. without the baseline compressor)")
    model.load_state_dict(state, strict=True, assign=True)
    return model


def config_source(parts) -> str:
    return " + ".join(str(ckpt.config_file) for ckpt, _, _ in parts if ckpt.config_file)


def save(path, hf_config: dict, state: dict, keys: dict, name="model.safetensors"):
    """Write config.json + safetensors under their on-disk names (the inverse of `keys`), each file atomically."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors = {theirs: state[ours].detach().contiguous().cpu() for ours, theirs in keys.items()}
    dtype = str(next(iter(tensors.values())).dtype).removeprefix("torch.")
    atomic_write(path / name, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    text = json.dumps({**hf_config, "torch_dtype": dtype}, indent=2)
    atomic_write(path / "config.json", lambda tmp: Path(tmp).write_text(text))
