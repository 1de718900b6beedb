"""Property tests of the VoCo mask on random layouts, and the gradient proof that text learns about the image only
through the VoCo tokens."""
import random

import pytest
import torch

from nanovoco.config import LlamaConfig
from nanovoco.model import Llama
from nanovoco.voco import PAD, TEXT, VISION, VOCO, causal_pad_mask, render_mask, voco_mask


def random_layout(rng: random.Random, L: int):
    """One sample: text runs and (vision, VoCo) groups in random order, padded left or right to L."""
    segments, groups, g = [], [], 0
    while len(segments) < L - 10:  # a step adds at most 10 tokens
        if rng.random() < 0.4:
            n_vision, n_voco = rng.randint(1, 6), rng.randint(1, 4)
            segments += [VISION] * n_vision + [VOCO] * n_voco
            groups += [g] * (n_vision + n_voco)
            g += 1
        else:
            n = rng.randint(1, 5)
            segments += [TEXT] * n
            groups += [-1] * n
    pad = L - len(segments)
    if rng.random() < 0.5:
        return [PAD] * pad + segments, [-1] * pad + groups
    return segments + [PAD] * pad, groups + [-1] * pad


def reference(segments, groups):
    """The rule written out per (query, key), independently of the vectorised implementation."""
    L = len(segments)
    m = torch.zeros(L, L, dtype=torch.bool)
    for q in range(L):
        for k in range(q + 1):
            if segments[q] == PAD or segments[k] == PAD:  # PAD rows are never read: not compared
                continue
            elif segments[q] in (VISION, VOCO):
                m[q, k] = segments[k] in (VISION, VOCO) and groups[k] == groups[q]
            else:
                m[q, k] = segments[k] != VISION
    return m


@pytest.fixture(scope="module")
def batch():
    rng = random.Random(0)
    layouts = [random_layout(rng, 40) for _ in range(64)]
    segments = torch.tensor([s for s, _ in layouts])
    groups = torch.tensor([g for _, g in layouts])
    return segments, groups, voco_mask(segments, groups)[:, 0]


def test_equals_the_rule_written_out(batch):
    segments, groups, mask = batch
    for b in range(len(segments)):
        seg, grp = segments[b].tolist(), groups[b].tolist()
        ref = reference(seg, grp)
        real = torch.tensor([s != PAD for s in seg])
        # rows of real queries must match exactly; PAD rows only need to be non-empty and never read
        assert torch.equal(mask[b][real], ref[real]), b


def test_properties(batch):
    segments, groups, mask = batch
    L = segments.shape[1]
    assert mask.shape == (64, L, L) and mask.dtype == torch.bool
    assert not (mask & ~torch.ones(L, L, dtype=torch.bool).tril()).any(), "causal"
    assert mask.any(-1).all(), "every row sees at least one key (SDPA gives NaN for empty rows)"
    q, k = segments[:, :, None], segments[:, None, :]
    off_diag = ~torch.eye(L, dtype=torch.bool)
    assert not (mask & (k == PAD) & off_diag).any(), "padding is never seen"
    assert not (mask & (q == TEXT) & (k == VISION)).any(), "text never sees vision tokens"
    same = groups[:, :, None] == groups[:, None, :]
    compress = lambda s: (s == VISION) | (s == VOCO)  # noqa: E731
    assert not (mask & compress(q) & ~(compress(k) & same)).any(), "a group sees nothing outside itself"
    before = torch.ones(L, L, dtype=torch.bool).tril()
    assert ((q == VOCO) & compress(k) & same & before <= mask).all(), "VoCo sees its whole group so far"
    assert ((q == TEXT) & ((k == VOCO) | (k == TEXT)) & before <= mask).all(), "text sees all VoCo and text"


def test_text_only_is_plain_causal():
    segments = torch.tensor([[TEXT] * 7 + [PAD] * 2])
    groups = torch.full_like(segments, -1)
    mask = voco_mask(segments, groups)[0, 0]
    assert torch.equal(mask[:7, :7], torch.ones(7, 7, dtype=torch.bool).tril())
    assert torch.equal(causal_pad_mask(segments), mask[None, None])


def test_an_image_without_voco_tokens_is_seen_by_the_text():
    """The num_voco=0 trap, closed: a sample whose image has no VoCo tokens (the `full` mode) keeps its VISION labels,
    and voco_mask itself gives it the plain causal mask, also row by row in a batch that mixes it with a compressed
    sample, and for a video whose uncompressed frames follow each other."""
    full = torch.tensor([VISION] * 4 + [TEXT] * 3 + [PAD])
    voco = torch.tensor([VISION] * 3 + [VOCO] + [TEXT] * 4)
    segments = torch.stack([full, voco])
    groups = torch.where((segments == VISION) | (segments == VOCO), 0, -1)
    mask = voco_mask(segments, groups)
    assert torch.equal(mask[0], causal_pad_mask(segments[:1])[0])
    assert torch.equal(mask[1], voco_mask(segments[1:], groups[1:])[0]) and not mask[1, 0, 5, :3].any()
    video = torch.tensor([[VISION] * 6 + [TEXT] * 2])
    frames = torch.tensor([[0, 0, 0, 1, 1, 1, -1, -1]])
    assert torch.equal(voco_mask(video, frames), causal_pad_mask(video))


def test_causal_pad_mask_ignores_voco():
    segments = torch.tensor([[VISION, VISION, VOCO, TEXT, TEXT, PAD]])
    mask = causal_pad_mask(segments)[0, 0]
    assert torch.equal(mask[:5, :5], torch.ones(5, 5, dtype=torch.bool).tril())
    assert not mask[:5, 5].any()


def test_render_mask():
    segments = torch.tensor([[VISION] * 3 + [VOCO] * 2 + [TEXT] * 3])
    mask = voco_mask(segments, torch.where(segments == TEXT, -1, 0))
    text = render_mask(mask[0], segments[0])
    assert text.splitlines()[0] == "  vvvccttt"
    assert text.splitlines()[-1] == "t ...#####"  # the last text token: VoCo + text, no vision


def test_text_gradient_reaches_vision_only_through_voco():
    """Loss on text tokens, gradient w.r.t. the vision embeddings. Under the VoCo mask it is non-zero, and becomes
    exactly zero when the VoCo tokens' hidden states are detached at every layer; under a causal mask the text
    reads the vision tokens directly, so detaching VoCo does not stop the gradient."""
    torch.manual_seed(0)
    llm = Llama(LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2))
    segments = torch.tensor([[VISION] * 6 + [VOCO] * 2 + [TEXT] * 5])
    groups = torch.where(segments == TEXT, -1, 0)
    is_voco, is_vision = segments[0] == VOCO, segments[0] == VISION

    def vision_grad(mask, detach_voco):
        x = torch.randn(1, 13, 32, generator=torch.Generator().manual_seed(1), requires_grad=True)
        hooks = [layer.register_forward_pre_hook(
            lambda _, args: (torch.where(is_voco[None, :, None], args[0].detach(), args[0]), *args[1:]))
            for layer in llm.layers] if detach_voco else []
        logits = llm(inputs_embeds=x, attn_mask=mask).logits
        for h in hooks:
            h.remove()
        logits[0, segments[0] == TEXT].sum().backward()
        return x.grad[0, is_vision]

    voco, causal = voco_mask(segments, groups), causal_pad_mask(segments)
    assert vision_grad(voco, detach_voco=False).abs().max() > 1e-4
    assert torch.equal(vision_grad(voco, detach_voco=True), torch.zeros(6, 32))
    assert vision_grad(causal, detach_voco=True).abs().max() > 1e-4
