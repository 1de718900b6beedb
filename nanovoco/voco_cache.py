"""VoCo-LLaMA's two-stage inference (paper Sec. 3.3, which the official code does not implement), read after
voco.py: stage 1 runs an image's [BOS] [image x N] [\\n] [<voco> x K] once and keeps only the VoCo tokens' keys and
values, a `VoCoCache`; stage 2 answers any number of questions from that cache, never seeing the image again.

    prefix = torch.tensor(compress_prefix(tokenizer, Layout.of(vlm.config)))
    cache = compress(vlm, pixel_values, prefix)                              # stage 1
    logits = answer(vlm, cache, text_ids).logits                             # stage 2, one pass
    tokens = generate_from_cache(vlm, cache, text_ids, max_new_tokens=32)    # stage 2, decoding

A video is compressed frame by frame (`compress_video`) into one cache. Both stages equal one pass over the whole
sequence under the VoCo mask (generate.py, tests/test_two_stage.py); cache_file.py keeps caches on disk.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from einops import rearrange

from nanovoco.generate import check_sampling, decode, until_eos
from nanovoco.model import KVCache, Output, VoCoLlama, apply_rope, check_length, check_token_ids, rope_cos_sin


@dataclass
class VoCoCache:
    """Stage 1's result, all that stage 2 may see of an image (or a video): the keys and values of its VoCo tokens
    at every layer. Under the training mask a text token sees VoCo and text keys only, never BOS or the vision
    tokens, so dropping those loses nothing: 576 vision tokens + BOS + "\n" become K VoCo tokens (paper Table 7)."""
    kv: KVCache  # per layer (k, v), each (B, n_kv_heads, n_voco, head_dim); keys rotated at `positions`
    positions: torch.Tensor  # (n_voco,) the VoCo tokens' original positions, the same for every row
    next_position: int  # where the text goes on: right after the last VoCo token, as in training
    num_voco: int  # K, VoCo tokens per image or frame (n_voco = frames x K)

    def first(self, k: int) -> VoCoCache:
        """The cache of the same image compressed to k <= K VoCo tokens, without running the model again. VoCo
        tokens are causal and share one embedding, so the first k of a K-token compression see, and compute,
        exactly what a k-token compression does: the layout is nested, and one stage-1 pass at the largest K
        serves every smaller budget (tests/test_two_stage.py). Images only: a video's frames sit K positions
        apart, and would have to be moved."""
        check_count("first(k)", k)
        if not 1 <= k <= self.num_voco:
            raise ValueError(f"this cache holds {self.num_voco} VoCo tokens per image: it can give the first 1 to "
                             f"{self.num_voco}, not {k}")
        if self.positions.numel() != self.num_voco:
            raise ValueError("first(k) takes an image's cache; a video's frames are compressed again at k instead")
        return VoCoCache(kv=[(key[:, :, :k].clone(), value[:, :, :k].clone()) for key, value in self.kv],
                         positions=self.positions[:k].clone(), next_position=int(self.positions[k - 1]) + 1,
                         num_voco=k)


def check_images(pixel_values, argument: str):
    """Images as an API argument: a float tensor (n, 3, H, W), at least one image."""
    if not (isinstance(pixel_values, torch.Tensor) and pixel_values.dtype.is_floating_point):
        raise TypeError(f"{argument} takes a float tensor (n, 3, H, W), as image.preprocess makes it, not "
                        f"{getattr(pixel_values, 'dtype', type(pixel_values).__name__)}")
    if pixel_values.ndim != 4 or pixel_values.shape[0] == 0:
        raise ValueError(f"{argument} must be (n, 3, H, W) with n >= 1, got {tuple(pixel_values.shape)}"
                         + (": a single one is x[None]" if pixel_values.ndim == 3 else ""))


def check_count(argument: str, value) -> int:
    """A number of VoCo tokens as an API argument: an int (not a bool, a float or a string, which would otherwise
    fail deep inside or be taken for 1), returned as such."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{argument} takes a number of VoCo tokens, an int >= 1, not {value!r} "
                        f"({type(value).__name__})")
    return value


@torch.no_grad()
def compress(vlm: VoCoLlama, pixel_values, prefix_ids, num_voco: int | None = None) -> VoCoCache:
    """Stage 1. pixel_values (n, 3, H, W), prefix_ids (P,): what one image is in a training sample,
    [BOS] [image x N] [\\n] [<voco> x K] (voco.compress_prefix) -> a VoCoCache with one row per image.
    K is num_voco, by default the config's: a model trained with several K (train.py --voco_ks) compresses
    to any of them, and any model can be run at a K it was not trained for (the paper's Table 4).

    The prefix is one compression group, where the VoCo mask is plain causal attention (a VISION or VOCO token
    sees the earlier tokens of its own group), so no mask is needed. The positions are those of training,
    0..P-1, so the cached keys are rotated (RoPE) exactly as the text saw them in training."""
    K = vlm.config.num_voco if num_voco is None else check_count("compress(num_voco=...)", num_voco)
    check_images(pixel_values, "compress(pixel_values)")
    check_token_ids(prefix_ids, vlm.config.text.vocab_size, "compress(prefix_ids)", ndim=1,
                    allowed=(vlm.config.image_token_id,))
    voco = vlm.config.voco_token_id
    if (vlm.config.num_voco == 0 or K < 1 or prefix_ids.shape[0] <= K
            or prefix_ids[-K:].ne(voco).any() or prefix_ids[-K - 1] == voco):
        raise ValueError(f"compress needs a model with VoCo tokens (this one has num_voco="
                         f"{vlm.config.num_voco}) and a prefix that ends with exactly {K} <voco> tokens: build "
                         f"it with voco.compress_prefix(tokenizer, Layout.of(config, {K}))")
    context = vlm.config.text.max_position_embeddings
    if prefix_ids.shape[0] >= context:  # the question needs at least one position after the VoCo tokens
        raise ValueError(f"compress: the prefix holds {prefix_ids.shape[0]} tokens ({K} of them <voco>), and the "
                         f"model's context is {context} positions, with the question still to come: give num_voco "
                         f"<= {context - 1 - (prefix_ids.shape[0] - K)}")
    ids = prefix_ids.to(pixel_values.device).expand(pixel_values.shape[0], -1)  # (n, P)
    out = vlm.llm(inputs_embeds=vlm.embed(ids, pixel_values))  # positions 0..P-1, causal
    P = ids.shape[1]
    # clone: a slice would keep the whole prefix's keys and values alive, ~576x what the cache needs
    return VoCoCache(kv=[(k[:, :, P - K:].clone(), v[:, :, P - K:].clone()) for k, v in out.cache],
                     positions=torch.arange(P - K, P, device=ids.device), next_position=P, num_voco=K)


def compress_video(vlm: VoCoLlama, frames, prefix_ids, batch_size: int = 16,
                   num_voco: int | None = None) -> VoCoCache:
    """Stage 1 for a video: frames (F, 3, H, W) in time order -> one cache row with the F*K VoCo tokens.

    Every frame is compressed alone, like an image (its own BOS, positions 0..P-1), then moved to its place in
    the video, f*K positions later (data.py's video layout): consecutive frames' VoCo tokens side by side, in
    time order. Moving a cached key is exact because RoPE is relative: rotating a key made at position p by d
    more gives the key made at p + d, R(d) R(p) = R(p + d), and the values do not depend on absolute positions
    when a frame sees nothing outside itself (the VoCo mask's groups). frames are compressed batch_size at a
    time, so a long video needs the memory of batch_size frames, and its cache F*K tokens."""
    check_images(frames, "compress_video(frames)")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"compress_video(batch_size) takes the frames compressed at once, an int >= 1, not "
                         f"{batch_size!r}")
    K = vlm.config.num_voco if num_voco is None else check_count("compress_video(num_voco=...)", num_voco)
    check_token_ids(prefix_ids, vlm.config.text.vocab_size, "compress_video(prefix_ids)", ndim=1,
                    allowed=(vlm.config.image_token_id,))
    F, P, context = frames.shape[0], prefix_ids.shape[0], vlm.config.text.max_position_embeddings
    if P + (F - 1) * K >= context:  # the text goes on after the last frame's VoCo tokens
        raise ValueError(f"compress_video: {F} frames of {K} VoCo tokens take positions up to {P + (F - 1) * K - 1},"
                         f" and the model's context is {context} positions, with the question still to come: give "
                         f"at most {max(0, (context - 1 - P) // K + 1)} frames (sample the video more sparsely) or "
                         f"fewer VoCo tokens")
    parts = [compress(vlm, frames[i:i + batch_size], prefix_ids, num_voco)
             for i in range(0, F, batch_size)]
    kv = [(torch.cat([c.kv[i][0] for c in parts]), torch.cat([c.kv[i][1] for c in parts]))
          for i in range(len(parts[0].kv))]  # per layer (F, n_kv_heads, K, head_dim)
    shift = torch.arange(F, device=frames.device)[:, None].expand(F, K) * K  # (F, K): frame f moves by f*K
    cos, sin = rope_cos_sin(shift, vlm.config.text, torch.float32)  # rotate in fp32, even for bf16 keys
    kv = [(apply_rope(k.float(), cos, sin).to(k.dtype), v) for k, v in kv]
    return VoCoCache(kv=[(rearrange(k, "f h k d -> 1 h (f k) d"), rearrange(v, "f h k d -> 1 h (f k) d"))
                         for k, v in kv],  # the frames side by side, in time order
                     positions=(parts[0].positions + shift).flatten(),
                     next_position=parts[0].next_position + (F - 1) * K, num_voco=K)


def answer(vlm: VoCoLlama, cache: VoCoCache, text_ids, text_mask=None, last_only=False) -> Output:
    """Stage 2. text_ids (B, T): the text after the VoCo tokens (from the "\\n" that follows them, data.py),
    with text_mask (B, T) False on padding (default all real). Returns the logits (of the last token only with
    last_only) and the cache grown by the text.

    The text takes the positions it had in training: after the last VoCo token (cache.next_position), not
    after the cache's length, which would close the gap left by the dropped vision tokens and shift every
    relative distance the model learned. Every text token sees all cached VoCo tokens and the real text before
    it. A cache of one row serves a batch of questions; a cache of B rows, one question each."""
    if not isinstance(cache, VoCoCache):
        raise TypeError(f"answer takes a VoCoCache (stage 1's: compress, compress_video or cache_file.load), not a "
                        f"{type(cache).__name__}")
    check_token_ids(text_ids, vlm.config.text.vocab_size, "text_ids", allowed=(vlm.config.image_token_id,))
    if (text_ids == vlm.config.image_token_id).any():
        raise ValueError("text_ids hold image placeholders: the image is in the cache, pass only the text")
    B, T = text_ids.shape
    if text_mask is not None and getattr(text_mask, "shape", None) != text_ids.shape:
        raise ValueError(f"text_mask must have text_ids' shape {tuple(text_ids.shape)}, got "
                         f"{tuple(getattr(text_mask, 'shape', ())) or type(text_mask).__name__}")
    rows = cache.kv[0][0].shape[0]
    if rows not in (1, B):
        raise ValueError(f"a cache of {rows} rows cannot answer {B} questions: use a cache of one row (one image, "
                         f"many questions) or one row per question")
    real = torch.ones_like(text_ids, dtype=torch.bool) if text_mask is None else text_mask.bool()
    check_length(cache.next_position + T - 1, 0, vlm.config.text.max_position_embeddings)
    positions = cache.next_position + (real.long().cumsum(-1) - 1).clamp(min=0)  # padding: any position
    n_voco = cache.positions.shape[0]
    text_part = torch.ones(T, T, dtype=torch.bool, device=text_ids.device).tril() & real[:, None, :]
    mask = torch.cat([real.new_ones(B, T, n_voco), text_part], dim=-1)[:, None]  # (B, 1, T, n_voco + T)
    kv = [(k.expand(B, -1, -1, -1), v.expand(B, -1, -1, -1)) for k, v in cache.kv]
    return vlm.llm(text_ids, attn_mask=mask, position_ids=positions, cache=kv, last_only=last_only)


@torch.no_grad()
def stream_from_cache(vlm: VoCoLlama, cache: VoCoCache, text_ids, text_mask=None, max_new_tokens=32, **sampling):
    """Stage 2 generation: the questions text_ids (B, T) answered from a VoCo cache (compress), yielding the next
    token of every row, (B,), as `generate.stream` does. Batched questions must be left-padded (text_mask False on
    the padding), so that every row goes on from its last column. sampling: generate.decode's options."""
    check_sampling(vlm.config.text.vocab_size, max_new_tokens, **sampling)
    check_token_ids(text_ids, vlm.config.text.vocab_size, "text_ids")
    B, T = text_ids.shape
    check_length(cache.next_position + T - 1, max_new_tokens, vlm.config.text.max_position_embeddings)
    real = torch.ones_like(text_ids, dtype=torch.bool) if text_mask is None else text_mask.bool()
    out = answer(vlm, cache, text_ids, real, last_only=True)
    visible = torch.cat([real.new_ones(B, cache.positions.shape[0]), real], dim=1)  # the VoCo tokens + text
    last = cache.next_position + real.long().sum(-1) - 1
    yield from decode(vlm.llm, out, last, visible, max_new_tokens=max_new_tokens, **sampling)


def generate_from_cache(vlm: VoCoLlama, cache: VoCoCache, text_ids, text_mask=None, **options) -> list[list[int]]:
    """Stage 2: every row's generated tokens, without the eos token (options: see `stream_from_cache`)."""
    return until_eos(stream_from_cache(vlm, cache, text_ids, text_mask, **options), options.get("eos_id"))
