"""A VoCo cache as a file: compress an image (or a video) once, answer questions about it later, elsewhere.

One safetensors file: per decoder layer `layers.{i}.key` and `layers.{i}.value`, (rows, n_kv_heads, n_voco,
head_dim), the keys already rotated at their positions; `positions` (n_voco,); and string metadata: the format and
its version, next_position, num_voco (K per image or frame), the dtype, and the fingerprint of the model that made
it. A cache is only meaningful to the very weights that computed it (another checkpoint reads the same numbers as
noise, without any error), so loading checks the fingerprint and refuses a cache from another model; and a model
asked for K VoCo tokens refuses a cache of another K, which it would read without an error too. Writes are atomic
(a temporary file, then a rename).
"""
import hashlib
import json
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from nanovoco.files import atomic_write
from nanovoco.model import VoCoLlama
from nanovoco.voco_cache import VoCoCache

FORMAT, VERSION = "nanovoco-voco-cache", "2"  # 2: num_voco recorded, the fingerprint without it


def fingerprint(vlm: VoCoLlama) -> str:
    """A short hash of the model's config and of a strided sample of every parameter (256 values each), so that any
    retraining or other checkpoint changes it. The values are hashed in bf16, so that the same checkpoint loaded in
    fp32, bf16 or fp16 gives one fingerprint (the dtype is checked on its own). The config's num_voco is left out:
    it is only the K used when none is asked, and the cache records its own K (checked on its own)."""
    config = {k: v for k, v in asdict(vlm.config).items() if k != "num_voco"}
    h = hashlib.sha256(json.dumps(config, sort_keys=True).encode())
    for name, p in sorted(vlm.state_dict().items()):
        flat = p.detach().flatten()
        sample = flat[::max(1, flat.numel() // 256)].to("cpu", torch.bfloat16).contiguous()
        h.update(f"{name}{tuple(p.shape)}".encode())
        h.update(sample.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def save_cache(path, cache: VoCoCache, vlm: VoCoLlama):
    """Write `cache`, made by `vlm`, to path (a .safetensors file), atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {"positions": cache.positions.cpu()}
    for i, (k, v) in enumerate(cache.kv):
        tensors[f"layers.{i}.key"], tensors[f"layers.{i}.value"] = k.contiguous().cpu(), v.contiguous().cpu()
    metadata = {"format": FORMAT, "version": VERSION, "next_position": str(cache.next_position),
                "num_voco": str(cache.num_voco),
                "dtype": str(cache.kv[0][0].dtype).removeprefix("torch."), "fingerprint": fingerprint(vlm)}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def load_cache(path, vlm: VoCoLlama, num_voco: int | None = None) -> VoCoCache:
    """Read a cache written by save_cache for `vlm`, onto the model's device. Refuses, naming the file and the fix:
    a missing or corrupt file, another format, a cache from another model or config, another dtype, and, when
    num_voco is given, a cache of another K."""
    path = Path(path)
    redo = "compute it again with this model (infer.py --save_cache)"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: {redo}")
    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {name: f.get_tensor(name) for name in f.keys()} if meta.get("format") == FORMAT else {}
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{path} is not a readable VoCo cache (a corrupt or truncated safetensors file: {e}): "
                         f"{redo}") from e
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise ValueError(f"{path} is not a nanovoco VoCo cache of format version {VERSION} (its metadata says "
                         f"format={meta.get('format')!r}, version={meta.get('version')!r}): {redo}")
    lacking = [k for k in ("fingerprint", "dtype", "next_position", "num_voco") if k not in meta] + \
        (["positions"] if "positions" not in tensors else [])
    if (lacking or not meta["next_position"].isdigit() or not meta["num_voco"].isdigit()
            or tensors["positions"].ndim != 1 or int(meta["num_voco"]) < 1
            or tensors["positions"].shape[0] % int(meta["num_voco"])):
        raise ValueError(f"{path} lacks {', '.join(lacking) or 'a valid next_position, num_voco or positions'}: the "
                         f"file is damaged; {redo}")
    if num_voco is not None and int(meta["num_voco"]) != num_voco:
        raise ValueError(f"{path} holds {meta['num_voco']} VoCo tokens per image or frame, but {num_voco} were asked "
                         f"for: answer from it with num_voco {meta['num_voco']} (infer.py --num_voco "
                         f"{meta['num_voco']}), or compress the image again with {num_voco}")
    if meta["fingerprint"] != fingerprint(vlm):
        raise ValueError(f"{path} was made by another model (fingerprint {meta['fingerprint']}, this model's is "
                         f"{fingerprint(vlm)}): a VoCo cache is only valid for the weights that computed it; {redo}")
    param = next(vlm.parameters())
    if meta["dtype"] != str(param.dtype).removeprefix("torch."):
        raise ValueError(f"{path} holds {meta['dtype']} keys and values, but the model runs in "
                         f"{str(param.dtype).removeprefix('torch.')}: load the model in {meta['dtype']}, or {redo}")
    c = vlm.config.text
    n_voco = tensors["positions"].shape[0]
    kv = []
    for i in range(c.num_hidden_layers):
        k, v = tensors.get(f"layers.{i}.key"), tensors.get(f"layers.{i}.value")
        for name, t in (("key", k), ("value", v)):
            if t is None:
                raise ValueError(f"{path} lacks layers.{i}.{name}: the file is damaged; {redo}")
            if t.ndim != 4 or t.shape[1:] != (c.num_key_value_heads, n_voco, c.head_dim):
                raise ValueError(f"{path}: layers.{i}.{name} is {tuple(t.shape)}, expected (rows, "
                                 f"{c.num_key_value_heads}, {n_voco}, {c.head_dim}): the file is damaged; {redo}")
        kv.append((k.to(param.device), v.to(param.device)))
    return VoCoCache(kv=kv, positions=tensors["positions"].to(param.device), next_position=int(meta["next_position"]),
                     num_voco=int(meta["num_voco"]))
