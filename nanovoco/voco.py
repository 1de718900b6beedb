"""The VoCo attention mask: the whole of VoCo-LLaMA's "attention distillation" (paper Sec. 3.2, Fig. 2).

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


def render_mask(mask: torch.Tensor, segments: torch.Tensor, path=None) -> str:
    """One sample's (L, L) mask as text (rows: queries, columns: keys; '#' = may attend), with the segment of every
    token as the header. With `path`, also draws it as a PNG (needs matplotlib)."""
    mask, segments = mask.reshape(mask.shape[-2:]).cpu(), segments.reshape(-1).cpu().tolist()
    letters = "".join("tvcp"[s] for s in segments)  # t=text v=vision c=voco p=pad
    rows = [f"  {letters}"] + [f"{letters[q]} " + "".join("#" if a else "." for a in row)
                               for q, row in enumerate(mask.tolist())]
    if path is not None:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        colors = torch.tensor([[.55, .75, .95], [.95, .6, .5], [.5, .8, .5], [.85, .85, .85]])
        seg = torch.tensor(segments)
        # a key's colour where attention is allowed (the segment it reads from), white where it is blocked
        image = torch.where(mask[..., None], colors[seg][None, :, :].expand(len(seg), -1, -1), torch.ones(3))
        fig, ax = plt.subplots(figsize=(6, 6))
        ax.imshow(image.numpy(), interpolation="nearest")
        ax.set_xlabel("key (blue text, red vision, green VoCo, grey pad)")
        ax.set_ylabel("query")
        ax.set_title("VoCo attention mask: coloured = may attend")
        fig.savefig(path, dpi=120, bbox_inches="tight")
        plt.close(fig)
    return "\n".join(rows)
