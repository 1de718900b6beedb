"""Text generation with a KV cache, as two named stages: `prefill` the prompt once, then `decode_one_token` per step.

Works on the bare decoder (`Llama`): a VLM's prompt goes in as embeddings, `vlm.embed(input_ids, pixel_values)`.
Batches are left-padded; `key_mask` says which prompt tokens are real.
"""
from __future__ import annotations

import torch

from nanovoco.model import KVCache, Llama, Output


def padded_causal_mask(key_mask):
    """(B, L) bool, False at padding -> (B, 1, L, L): causal, padding keys hidden. A pad query still sees itself,
    because SDPA returns NaN (CUDA) or zeros (CPU) for a row with no key; pad rows are never read."""
    L = key_mask.shape[1]
    causal = torch.ones(L, L, dtype=torch.bool, device=key_mask.device).tril()
    return (causal & (key_mask[:, None, :] | torch.eye(L, dtype=torch.bool, device=key_mask.device)))[:, None]


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


def prefill(llm: Llama, input_ids=None, inputs_embeds=None, key_mask=None) -> tuple[Output, torch.Tensor]:
    """Run the whole prompt once. Returns the output (logits, cache) and the position ids it used."""
    x = input_ids if inputs_embeds is None else inputs_embeds
    B, L = x.shape[:2]
    if key_mask is None:
        key_mask = torch.ones(B, L, dtype=torch.bool, device=x.device)
    # positions count real tokens only, so a left-padded row continues exactly as it would unpadded
    position_ids = (key_mask.long().cumsum(-1) - 1).clamp(min=0)
    out = llm(input_ids, inputs_embeds, attn_mask=padded_causal_mask(key_mask), position_ids=position_ids)
    return out, position_ids


def decode_one_token(llm: Llama, token, position, key_mask, cache: KVCache) -> Output:
    """token (B,), position (B,), key_mask (B, L_cached + 1) -> logits for the next token, cache grown by one."""
    return llm(token[:, None], attn_mask=key_mask[:, None, None, :], position_ids=position[:, None], cache=cache)


@torch.no_grad()
def stream(llm: Llama, input_ids=None, inputs_embeds=None, key_mask=None, max_new_tokens=32, temperature=0.0,
           top_p=1.0, eos_id=None, generator=None):
    """Yield the next token of every row, (B,), until max_new_tokens or every row has produced eos_id.
    A row that has finished keeps yielding eos_id."""
    x = input_ids if inputs_embeds is None else inputs_embeds
    B, L = x.shape[:2]
    limit = llm.config.max_position_embeddings
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    if L + max_new_tokens > limit:
        raise ValueError(f"prompt of {L} tokens + max_new_tokens={max_new_tokens} exceeds the model's context of "
                         f"{limit} positions: shorten the prompt or lower max_new_tokens")
    if key_mask is None:
        key_mask = torch.ones(B, L, dtype=torch.bool, device=x.device)
    out, position_ids = prefill(llm, input_ids, inputs_embeds, key_mask)
    position = position_ids[:, -1]
    done = torch.zeros(B, dtype=torch.bool, device=x.device)
    for step in range(max_new_tokens):
        token = sample(out.logits[:, -1], temperature, top_p, generator)
        if eos_id is not None:
            token = token.masked_fill(done, eos_id)
            done |= token == eos_id
        yield token
        if done.all() or step == max_new_tokens - 1:
            return
        key_mask = torch.cat([key_mask, torch.ones_like(key_mask[:, :1])], dim=1)
        position = position + 1
        out = decode_one_token(llm, token, position, key_mask, out.cache)


def generate(llm: Llama, input_ids=None, inputs_embeds=None, key_mask=None, max_new_tokens=32, temperature=0.0,
             top_p=1.0, eos_id=None, generator=None) -> list[list[int]]:
    """The generated tokens of every row, without the eos token (see `stream` for the arguments)."""
    steps = list(stream(llm, input_ids, inputs_embeds, key_mask, max_new_tokens, temperature, top_p, eos_id,
                        generator))
    rows = torch.stack(steps, dim=1).tolist()
    return [row[:row.index(eos_id)] if eos_id in row else row for row in rows]
