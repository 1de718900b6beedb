"""Text generation with a KV cache, as two named stages: `prefill` the prompt once, then `decode_one_token` per step.

Works on the bare decoder (`Llama`): a VLM's prompt goes in as embeddings, `vlm.embed(input_ids, pixel_values)`.
The prompt is described by the segment labels of voco.py, so a VoCo prompt is generated from under exactly the mask
it was trained with: the prompt runs under `voco_mask`, and every generated token sees the TEXT and VOCO keys but
never the VISION ones. Plain text is all TEXT; a left-padded batch marks its padding PAD.
"""
from __future__ import annotations

import torch

from nanovoco.model import KVCache, Llama, Output
from nanovoco.voco import PAD, TEXT, VOCO, voco_mask


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


def prefill(llm: Llama, input_ids=None, inputs_embeds=None, segments=None, groups=None) -> tuple[Output, torch.Tensor]:
    """Run the whole prompt once under the VoCo mask of its labels. Returns the output and the position ids used."""
    # positions count real tokens only, so a left-padded row continues exactly as it would unpadded
    position_ids = ((segments != PAD).long().cumsum(-1) - 1).clamp(min=0)
    out = llm(input_ids, inputs_embeds, attn_mask=voco_mask(segments, groups), position_ids=position_ids)
    return out, position_ids


def decode_one_token(llm: Llama, token, position, visible, cache: KVCache) -> Output:
    """token (B,), position (B,), visible (B, L_cached + 1) keys it may see -> next logits, cache grown by one."""
    return llm(token[:, None], attn_mask=visible[:, None, None, :], position_ids=position[:, None], cache=cache)


@torch.no_grad()
def stream(llm: Llama, input_ids=None, inputs_embeds=None, segments=None, groups=None, max_new_tokens=32,
           temperature=0.0, top_p=1.0, eos_id=None, generator=None):
    """Yield the next token of every row, (B,), until max_new_tokens or every row has produced eos_id (a finished
    row keeps yielding eos_id). segments/groups: (B, L) labels of the prompt (voco.py); default: all TEXT."""
    x = input_ids if inputs_embeds is None else inputs_embeds
    B, L = x.shape[:2]
    limit = llm.config.max_position_embeddings
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    if L + max_new_tokens > limit:
        raise ValueError(f"prompt of {L} tokens + max_new_tokens={max_new_tokens} exceeds the model's context of "
                         f"{limit} positions: shorten the prompt or lower max_new_tokens")
    if segments is None:
        segments = torch.full((B, L), TEXT, device=x.device)
    if groups is None:
        groups = torch.full_like(segments, -1)
    out, position_ids = prefill(llm, input_ids, inputs_embeds, segments, groups)
    position = position_ids[:, -1]
    visible = (segments == TEXT) | (segments == VOCO)  # what generated text may see: never VISION, never PAD
    done = torch.zeros(B, dtype=torch.bool, device=x.device)
    for step in range(max_new_tokens):
        token = sample(out.logits[:, -1], temperature, top_p, generator)
        if eos_id is not None:
            token = token.masked_fill(done, eos_id)
            done |= token == eos_id
        yield token
        if done.all() or step == max_new_tokens - 1:
            return
        visible = torch.cat([visible, torch.ones_like(visible[:, :1])], dim=1)
        position = position + 1
        out = decode_one_token(llm, token, position, visible, out.cache)


def generate(llm: Llama, input_ids=None, inputs_embeds=None, segments=None, groups=None, max_new_tokens=32,
             temperature=0.0, top_p=1.0, eos_id=None, generator=None) -> list[list[int]]:
    """The generated tokens of every row, without the eos token (see `stream` for the arguments)."""
    steps = list(stream(llm, input_ids, inputs_embeds, segments, groups, max_new_tokens, temperature, top_p, eos_id,
                        generator))
    rows = torch.stack(steps, dim=1).tolist()
    return [row[:row.index(eos_id)] if eos_id in row else row for row in rows]
