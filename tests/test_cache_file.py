"""VoCo cache files: bit-exact round trips, atomic writes, and a clear refusal of every cache that does not fit."""
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from nanovoco import cache_file
from nanovoco.cache_file import fingerprint, load_cache, save_cache
from nanovoco.config import preset
from nanovoco.model import VoCoLlama
from nanovoco.voco_cache import answer, compress, compress_video

VOCO, K = 99, 2
PREFIX = torch.tensor([1] + [-200] * 16 + [13] + [VOCO] * K)  # [BOS] [image x 16] [\n] [<voco> x K]


def model(seed=0, num_voco=K):
    torch.manual_seed(seed)
    config = preset("tiny", 100)
    config.num_voco, config.voco_token_id = num_voco, VOCO
    return VoCoLlama(config).eval()


def images(n):
    return torch.randn(n, 3, 56, 56, generator=torch.Generator().manual_seed(n))


@pytest.mark.parametrize("video", [False, True])
def test_round_trip_is_bit_exact(tmp_path, video):
    vlm = model()
    cache = compress_video(vlm, images(3), PREFIX) if video else compress(vlm, images(2), PREFIX)
    save_cache(tmp_path / "c.safetensors", cache, vlm)
    back = load_cache(tmp_path / "c.safetensors", vlm)
    assert back.next_position == cache.next_position and torch.equal(back.positions, cache.positions)
    assert back.num_voco == cache.num_voco == K
    assert all(torch.equal(a, b) for x, y in zip(cache.kv, back.kv) for a, b in zip(x, y))
    text = torch.randint(3, 90, (back.kv[0][0].shape[0], 7))
    with torch.no_grad():
        assert torch.equal(answer(vlm, back, text).logits, answer(vlm, cache, text).logits)
    with safe_open(tmp_path / "c.safetensors", "pt") as f:  # small: only the VoCo tokens
        assert f.get_tensor("layers.0.key").shape == (1 if video else 2, 2, 3 * K if video else K, 32)
        assert f.metadata()["fingerprint"] == fingerprint(vlm)


def test_fingerprint_follows_the_weights_not_the_dtype():
    vlm = model()
    assert fingerprint(vlm) == fingerprint(model())
    assert fingerprint(vlm) != fingerprint(model(seed=1))
    # num_voco is only the K used when none is asked (the cache records its own): the same model at any K
    assert fingerprint(vlm) == fingerprint(model(num_voco=4))
    other = model()
    other.config.voco_token_id = 98
    assert fingerprint(vlm) != fingerprint(other)  # same weights, another config
    tweaked = model()
    with torch.no_grad():
        tweaked.llm.layers[3].mlp.down_proj.weight[0, 0] += 1.0  # one weight of the last layer
    assert fingerprint(vlm) != fingerprint(tweaked)
    assert fingerprint(vlm) == fingerprint(model().to(torch.bfloat16))


def test_foreign_dtype_corrupt_and_missing_caches_are_refused(tmp_path):
    vlm, path = model(), tmp_path / "c.safetensors"
    save_cache(path, compress(vlm, images(1), PREFIX), vlm)
    with pytest.raises(ValueError, match=r"c\.safetensors was made by another model \(fingerprint [0-9a-f]{16}, this "
                                         r"model's is [0-9a-f]{16}\).*compute it again with this model"):
        load_cache(path, model(seed=1))
    with pytest.raises(ValueError, match="c.safetensors holds float32 keys and values, but the model runs in bfloat16: "
                                         "load the model in float32"):
        load_cache(path, model().to(torch.bfloat16))
    with pytest.raises(FileNotFoundError, match="missing.safetensors does not exist: compute it again"):
        load_cache(tmp_path / "missing.safetensors", vlm)

    data = path.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[:len(data) // 2])
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 64)
    for name in ("cut", "junk"):
        with pytest.raises(ValueError, match=rf"{name}\.safetensors is not a readable VoCo cache \(a corrupt or "
                                             rf"truncated safetensors file"):
            load_cache(tmp_path / f"{name}.safetensors", vlm)
    save_file({"x": torch.zeros(2)}, tmp_path / "weights.safetensors")
    with pytest.raises(ValueError, match=r"weights\.safetensors is not a nanovoco VoCo cache of format version 2 "
                                         r"\(its metadata says format=None"):
        load_cache(tmp_path / "weights.safetensors", vlm)

    with safe_open(path, "pt") as f:  # right metadata, a damaged tensor
        tensors, meta = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    tensors["layers.2.value"] = tensors["layers.2.value"][:, :, :1].contiguous()
    save_file(tensors, tmp_path / "damaged.safetensors", metadata=meta)
    with pytest.raises(ValueError, match=r"layers\.2\.value is \(1, 2, 1, 32\), expected \(rows, 2, 2, 32\): the "
                                         r"file is damaged"):
        load_cache(tmp_path / "damaged.safetensors", vlm)


@pytest.mark.parametrize("drop, lacks", [("positions", "positions"), ("layers.1.key", "layers.1.key"),
                                         ("meta:fingerprint", "fingerprint"), ("meta:next_position", "next_position"),
                                         ("meta:num_voco", "num_voco")])
def test_a_cache_that_lacks_a_tensor_or_its_metadata_is_refused(tmp_path, drop, lacks):
    vlm, path = model(), tmp_path / "c.safetensors"
    save_cache(path, compress(vlm, images(1), PREFIX), vlm)
    with safe_open(path, "pt") as f:
        tensors, meta = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    (meta if drop.startswith("meta:") else tensors).pop(drop.removeprefix("meta:"))
    save_file(tensors, path, metadata=meta)
    with pytest.raises(ValueError, match=rf"c\.safetensors lacks {lacks}: the file is damaged; compute it again"):
        load_cache(path, vlm)


def test_writes_are_atomic(tmp_path, monkeypatch):
    vlm, path = model(), tmp_path / "c.safetensors"
    cache = compress(vlm, images(1), PREFIX)
    save_cache(path, cache, vlm)
    before = path.read_bytes()

    def crash(tensors, filename, metadata):
        open(filename, "wb").write(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(cache_file, "save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        save_cache(path, compress(vlm, images(2), PREFIX), vlm)
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["c.safetensors"]


def test_a_cache_of_another_k_is_refused_when_a_k_is_asked(tmp_path):
    vlm, path = model(num_voco=4), tmp_path / "c.safetensors"
    prefix = torch.tensor([1] + [-200] * 16 + [13] + [VOCO] * 4)
    save_cache(path, compress(vlm, images(1), prefix), vlm)
    assert load_cache(path, vlm, num_voco=4).num_voco == 4
    assert load_cache(path, model(num_voco=2)).num_voco == 4  # no K asked: the cache's own
    with pytest.raises(ValueError, match=r"c\.safetensors holds 4 VoCo tokens per image or frame, but 2 were asked "
                                         r"for: answer from it with num_voco 4 \(infer\.py --num_voco 4\), or "
                                         r"compress the image again with 2"):
        load_cache(path, vlm, num_voco=2)
