"""VoCo-LLaMA's one idea, the VoCo attention mask: the whole of its "attention distillation" (paper Sec. 3.2,
Fig. 2), and the sequence layout it reads. Read on in voco_cache.py: the two-stage inference it makes possible.

The layout of one image (or video frame) and its VoCo tokens, as the official code writes it:
    [BOS] [image x N] [\\n] [<voco> x K] [\\n] system USER: ... ASSISTANT: ...
`Layout` carries the four ids that spell it (from a model's config: Layout.of(config)); data.build_sample writes
whole samples with it and `compress_prefix` the part that stage 1 compresses.

Every token carries two absolute labels, set by whoever built the sequence (data.py, inference), never inferred
from distances to the end of the sequence (the official code does that, which breaks with right padding, truncation
and mixed batches):

- segment: VISION (what gets compressed: BOS, the image's vision tokens and the "\n" after them), VOCO (the VoCo
  tokens that compress it), TEXT (everything else), PAD.
- group: which compression a VISION/VOCO token belongs to (0, 1, ... for several images or video frames), -1 for
  TEXT/PAD.

The rule, for query q and key k (True = q may attend to k):
    causal (k <= q), k is not PAD, and
    - a VISION or VOCO query of group g sees only VISION and VOCO keys of the same group g: a VoCo token sees its
      image (and BOS) and the VoCo tokens before it, nothing of other groups, so each group can be compressed alone
      (stage 1 of inference) and its cache reused anywhere;
    - a TEXT query sees VOCO and TEXT keys, never VISION keys: the text can learn about the image only through the
      VoCo tokens' keys and values. That is what forces the LLM to distill the image into them.
Since BOS sits in the VISION segment in the official layout, text never sees BOS either; kept as trained.
An image (or frame) without VoCo tokens is not compressed: `uncompressed_as_text` relabels its VISION tokens TEXT
before the rule, so a sample without VoCo tokens (the `full` mode, LLaVA) gets a plain causal mask from voco_mask
itself, and no caller has to remember to switch masks for the text to see its image.
A PAD query also sees itself, so that no row is empty: SDPA returns NaN (CUDA) or zeros (CPU) for a query that
sees no key at all (a left-padded PAD query would otherwise see nothing). PAD rows are never read.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

TEXT, VISION, VOCO, PAD = 0, 1, 2, 3


def uncompressed_as_text(segments: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """Relabel TEXT the VISION tokens of every group that has no VoCo token: an image nothing compresses is read
    by the text directly, as in LLaVA."""
    same_group = groups[:, :, None] == groups[:, None, :]  # (B, L, L)
    compressed = (same_group & (segments[:, None, :] == VOCO)).any(-1)  # (B, L): its group has VoCo tokens
    return torch.where((segments == VISION) & ~compressed, TEXT, segments)


def voco_mask(segments: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """segments, groups: (B, L) integer labels -> (B, 1, L, L) bool mask for F.scaled_dot_product_attention."""
    L = segments.shape[1]
    segments = uncompressed_as_text(segments, groups)
    causal = torch.ones(L, L, dtype=torch.bool, device=segments.device).tril()
    q_seg, k_seg = segments[:, :, None], segments[:, None, :]  # (B, L, 1), (B, 1, L)
    q_compress = (q_seg == VISION) | (q_seg == VOCO)
    k_compress = (k_seg == VISION) | (k_seg == VOCO)
    same_group = groups[:, :, None] == groups[:, None, :]
    rule = torch.where(q_compress, k_compress & same_group,  # VISION/VOCO queries: their own group only
                       (k_seg == TEXT) | (k_seg == VOCO))  # TEXT queries: never VISION
    allowed = causal & rule & (k_seg != PAD)
    return (allowed | (q_seg == PAD) & torch.eye(L, dtype=torch.bool, device=segments.device))[:, None]


def without_compression(segments: torch.Tensor) -> torch.Tensor:
    """Relabel every real token TEXT: the same sequence seen without VoCo compression (plain causal attention)."""
    return torch.where(segments == PAD, PAD, TEXT)


def causal_pad_mask(segments: torch.Tensor) -> torch.Tensor:
    """The mask without VoCo compression (the `full` and `lower_bound` training modes): causal, PAD keys hidden."""
    return voco_mask(without_compression(segments), torch.full_like(segments, -1))


def render_mask(mask: torch.Tensor, segments: torch.Tensor) -> str:
    """One sample's (L, L) mask as text (rows: queries, columns: keys; '#' = may attend), with the segment of every
    token as the header."""
    mask, segments = mask.reshape(mask.shape[-2:]).cpu(), segments.reshape(-1).cpu().tolist()
    letters = "".join("tvcp"[s] for s in segments)  # t=text v=vision c=voco p=pad
    rows = [f"  {letters}"] + [f"{letters[q]} " + "".join("#" if a else "." for a in row)
                               for q, row in enumerate(mask.tolist())]
    return "\n".join(rows)


@dataclass(frozen=True)
class Layout:
    """The ids that lay out an image (or a video frame) and its VoCo tokens in a sequence, as one value rather than
    four loose ids: [BOS] [image_token_id x num_image_tokens] [\\n] [voco_token_id x num_voco]."""
    image_token_id: int  # the placeholder id that the image's features replace (LLaVA's -200)
    num_image_tokens: int  # N: vision tokens per image
    voco_token_id: int  # the <voco> token's id
    num_voco: int  # K: VoCo tokens per image (0: an image not compressed, the `full` mode)

    @classmethod
    def of(cls, config, num_voco: int | None = None) -> Layout:
        """The layout of a model's config (VoCoLlamaConfig), at its own K or at num_voco."""
        return cls(config.image_token_id, config.num_image_tokens, config.voco_token_id,
                   config.num_voco if num_voco is None else num_voco)

    def with_num_voco(self, num_voco: int) -> Layout:
        return dataclasses.replace(self, num_voco=num_voco)


def compress_prefix(tokenizer, layout: Layout) -> list[int]:
    """What stage 1 compresses, one image or video frame: [BOS] [image x N] [\\n] [<voco> x K] as ids."""
    return (tokenizer.bos_ids + [layout.image_token_id] * layout.num_image_tokens
            + tokenizer.encode("\n", bos=False) + [layout.voco_token_id] * layout.num_voco)
