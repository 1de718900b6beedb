"""Text generation with a KV cache, as two named stages: `prefill` the prompt once, then `decode_one_token` per step.

Works on the bare decoder (`Llama`): a VLM's prompt goes in as embeddings, `vlm.embed(input_ids, pixel_values)`.
This is single-pass masked inference (the whole prompt, vision tokens included, in one forward), the reference that
two-stage VoCo inference (voco_cache.py: `compress`, then `stream_from_cache` / `generate_from_cache` over this
module's `decode`) must equal.
The prompt is described by the segment labels of voco.py, so a VoCo prompt is generated from under exactly the mask
it was trained with: the prompt runs under `voco_mask`, and every generated token sees the TEXT and VOCO keys but
never the VISION ones. Plain text is all TEXT; a left-padded batch marks its padding PAD.
"""
from __future__ import annotations

import functools

import torch

from nanovoco.model import KVCache, Llama, Output, StaticKV, check_length, check_token_ids
from nanovoco.voco import PAD, TEXT, VOCO, uncompressed_as_text, voco_mask


def sample(logits, temperature=0.0, top_p=1.0, generator=None):
    """(B, V) logits -> (B,) next tokens: argmax at temperature 0, else nucleus sampling."""
    if temperature == 0.0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    # keep the smallest set of most likely tokens whose mass reaches top_p (the first token is always kept)
    outside = sorted_probs.cumsum(-1) - sorted_probs >= top_p
    sorted_probs = sorted_probs.masked_fill(outside, 0.0)
    choice = torch.multinomial(sorted_probs, 1, generator=generator)  # renormalises internally
    return order.gather(-1, choice)[:, 0]


def prefill(llm: Llama, input_ids=None, inputs_embeds=None, segments=None, groups=None, position_ids=None) -> Output:
    """Run the whole prompt once under the VoCo mask of its labels (logits of the last position only, the next
    token's). position_ids (B, L): data.Sample's positions;
    default 0, 1, 2, ... over the real tokens, so that a left-padded row goes on exactly as it would unpadded."""
    if position_ids is None:
        position_ids = ((segments != PAD).long().cumsum(-1) - 1).clamp(min=0)
    return llm(input_ids, inputs_embeds, attn_mask=voco_mask(segments, groups), position_ids=position_ids,
               last_only=True)


def decode_one_token(llm: Llama, token, position, visible, cache: KVCache) -> Output:
    """token (B,), position (B,), visible (B, L_cached + 1) keys it may see -> next logits, cache grown by one."""
    return llm(token[:, None], attn_mask=visible[:, None, None, :], position_ids=position[:, None], cache=cache)


@torch.no_grad()
def stream(llm: Llama, input_ids=None, inputs_embeds=None, segments=None, groups=None, position_ids=None,
           max_new_tokens=32, **sampling):
    """Yield the next token of every row, (B,), until max_new_tokens or every row has produced eos_id (a finished
    row keeps yielding eos_id). segments/groups: (B, L) labels of the prompt (voco.py), default all TEXT;
    position_ids: see prefill. sampling: decode's options (temperature, top_p, eos_id, generator, fast), passed on
    as they are, as gpt-fast passes its sampling_kwargs."""
    check_sampling(llm.config.vocab_size, max_new_tokens, **sampling)
    if inputs_embeds is None:
        check_token_ids(input_ids, llm.config.vocab_size, "input_ids")
    x = input_ids if inputs_embeds is None else inputs_embeds
    B, L = x.shape[:2]
    if segments is None:
        segments = torch.full((B, L), TEXT, device=x.device)
    if groups is None:
        groups = torch.full_like(segments, -1)
    if position_ids is None:
        position_ids = ((segments != PAD).long().cumsum(-1) - 1).clamp(min=0)
    check_length(int(position_ids[:, -1].max()), max_new_tokens, llm.config.max_position_embeddings)
    out = prefill(llm, input_ids, inputs_embeds, segments, groups, position_ids)
    seen = uncompressed_as_text(segments, groups)  # an image without VoCo tokens is seen directly, as TEXT
    visible = (seen == TEXT) | (seen == VOCO)  # what generated text may see: never compressed VISION, never PAD
    yield from decode(llm, out, position_ids[:, -1], visible, max_new_tokens=max_new_tokens, **sampling)


def check_sampling(vocab_size: int, max_new_tokens, temperature=0.0, top_p=1.0, eos_id=None, generator=None,
                   fast=False):
    """decode's options, checked where a user passes them (stream, voco_cache.stream_from_cache) before any work:
    an unknown name is a TypeError naming the known ones (Python's own), a wrong type or range one line naming the
    option and what it takes."""
    number = lambda x: isinstance(x, (int, float)) and not isinstance(x, bool)  # noqa: E731
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens takes an int >= 1, not {max_new_tokens!r}")
    if not number(temperature) or not 0 <= temperature < float("inf"):
        raise ValueError(f"temperature takes a number >= 0 (0: greedy), not {temperature!r}")
    if not number(top_p) or not 0 < top_p <= 1:
        raise ValueError(f"top_p takes a number in (0, 1] (1: the whole distribution), not {top_p!r}")
    if eos_id is not None and (isinstance(eos_id, bool) or not isinstance(eos_id, int)
                               or not 0 <= eos_id < vocab_size):
        raise ValueError(f"eos_id takes a token id in 0..{vocab_size - 1} (tokenizer.eos_id) or None, not {eos_id!r}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator takes a torch.Generator or None, not a {type(generator).__name__}")
    if not isinstance(fast, bool):
        raise TypeError(f"fast takes True or False, not {fast!r}")


def decode(llm: Llama, out: Output, position, visible, *, max_new_tokens, temperature=0.0, top_p=1.0, eos_id=None,
           generator=None, fast=False):
    """The decode loop after a prefill, and the one place that defines the sampling options: out holds the prompt's
    last logits and the cache, position (B,) the last prompt position, visible (B, L_cached) the cached keys that
    generated tokens may see. temperature 0 is greedy; top_p: nucleus sampling; eos_id ends a row; generator: the
    sampling's random numbers; fast: decode through static_decoder (compiled; the same tokens, tested against this
    loop; the first call per shape compiles)."""
    B = visible.shape[0]
    done = torch.zeros(B, dtype=torch.bool, device=visible.device)
    step_fast = static_decoder(llm, out.cache, visible, max_new_tokens) if fast else None
    logits = out.logits[:, -1]
    for step in range(max_new_tokens):
        token = sample(logits, temperature, top_p, generator)
        if eos_id is not None:
            token = token.masked_fill(done, eos_id)
            done |= token == eos_id
        yield token
        if done.all() or step == max_new_tokens - 1:
            return
        position = position + 1
        if fast:
            logits = step_fast(token, position)
        else:
            visible = torch.cat([visible, torch.ones_like(visible[:, :1])], dim=1)
            out = decode_one_token(llm, token, position, visible, out.cache)
            logits = out.logits[:, -1]


BUCKET = 256  # static caches are sized in multiples of this, so that prompts of similar length share a compilation


def static_decoder(llm: Llama, cache, visible, max_new_tokens: int):
    """gpt-fast's decode step: the prompt's cache copied into preallocated buffers of a fixed size (model.StaticKV),
    and one torch.compile'd forward per token that writes its key and value in place and attends over every slot
    under a mask, so that all steps have the same shapes and compile once per (batch, size). Returns
    step(token (B,), position (B,)) -> the next logits (B, V). The eager loop of `decode` is the reference."""
    B, n_cached = visible.shape
    size = -(-(n_cached + max_new_tokens) // BUCKET) * BUCKET
    buffers = []
    for k, v in cache:
        kb, vb = (t.new_zeros(B, t.shape[1], size, t.shape[3]) for t in (k, v))
        kb[:, :, :n_cached], vb[:, :, :n_cached] = k.expand(B, -1, -1, -1), v.expand(B, -1, -1, -1)
        buffers.append((kb, vb))
    mask = torch.zeros(B, 1, 1, size, dtype=torch.bool, device=visible.device)
    mask[:, 0, 0, :n_cached] = visible
    slot = torch.tensor([n_cached - 1], device=visible.device)

    def step(token, position):
        slot.add_(1)
        mask[:, :, :, slot] = True
        return compiled_step()(llm, token[:, None], position[:, None], mask,
                               [StaticKV(k, v, slot) for k, v in buffers])

    return step


def _step(llm, token, position, mask, cache):
    return llm(token, attn_mask=mask, position_ids=position, cache=cache, use_cache=False).logits[:, -1]


@functools.cache
def compiled_step():
    """torch.compile(_step), made on first use: importing torch's compiler costs ~2 s that eager runs never need."""
    return torch.compile(_step, dynamic=False)


def generate(llm: Llama, input_ids=None, inputs_embeds=None, segments=None, groups=None, position_ids=None,
             **options) -> list[list[int]]:
    """The generated tokens of every row, without the eos token (options: max_new_tokens and the sampling options
    of `stream`)."""
    return until_eos(stream(llm, input_ids, inputs_embeds, segments, groups, position_ids, **options),
                     options.get("eos_id"))


def until_eos(steps, eos_id) -> list[list[int]]:
    """Tokens yielded step by step, (B,) each -> every row's tokens, cut before its first eos_id."""
    rows = torch.stack(list(steps), dim=1).tolist()
    return [row[:row.index(eos_id)] if eos_id in row else row for row in rows]
