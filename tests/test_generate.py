"""Generation with the KV cache: equal to transformers' greedy generate and to decoding without a cache."""
import torch

from nanovoco.generate import generate, sample, stream
from nanovoco.model import Llama, VoCoLlama
from nanovoco.voco import PAD, TEXT, VISION, VOCO
from tiny import hf_llama, hf_llava, image_ids
from nanovoco.voco_cache import compress


def greedy_without_cache(model, ids, n):
    for _ in range(n):
        ids = torch.cat([ids, model(ids).logits[:, -1].argmax(-1, keepdim=True)], 1)
    return ids


def test_greedy_matches_transformers_and_no_cache(tmp_path):
    hf = hf_llama(tmp_path)
    ours = Llama.from_pretrained(tmp_path)
    ids = torch.randint(3, 160, (3, 9), generator=torch.Generator().manual_seed(0))
    key_mask = torch.ones(3, 9, dtype=torch.bool)
    key_mask[1, :2] = key_mask[2, :5] = False  # left padding
    ids = ids.masked_fill(~key_mask, 0)
    got = generate(ours, ids, segments=torch.where(key_mask, TEXT, PAD), max_new_tokens=20)
    ref = hf.generate(ids, attention_mask=key_mask.long(), max_new_tokens=20, do_sample=False, eos_token_id=None,
                      pad_token_id=0)[:, 9:]
    assert got == ref.tolist()
    with torch.no_grad():
        for row in range(3):  # the uncached reference on the unpadded prompt
            prompt = ids[row:row + 1, key_mask[row]]
            assert got[row] == greedy_without_cache(ours, prompt, 20)[0, prompt.shape[1]:].tolist()


def test_stops_at_eos(tmp_path):
    hf_llama(tmp_path)
    ours = Llama.from_pretrained(tmp_path)
    ids = torch.randint(3, 160, (1, 6), generator=torch.Generator().manual_seed(1))
    free = generate(ours, ids, max_new_tokens=12)[0]
    eos = free[4]
    cut = generate(ours, ids, max_new_tokens=12, eos_id=eos)[0]
    assert cut == free[:free.index(eos)]
    steps = list(stream(ours, ids, max_new_tokens=12, eos_id=eos))
    assert len(steps) == free.index(eos) + 1  # stops right after the eos token


def test_vlm_greedy_matches_llava(tmp_path):
    hf = hf_llava(tmp_path)
    vlm = VoCoLlama.from_pretrained(tmp_path)
    ids, pixels = image_ids()
    with torch.no_grad():
        got = generate(vlm.llm, inputs_embeds=vlm.embed(ids, pixels), max_new_tokens=10)
    ref = hf.generate(input_ids=ids, pixel_values=pixels, max_new_tokens=10, do_sample=False, eos_token_id=None,
                      pad_token_id=0)[:, ids.shape[1]:]
    assert got == ref.tolist()


def test_sampling_is_seeded_and_top_p_truncates(tmp_path):
    hf_llama(tmp_path)
    ours = Llama.from_pretrained(tmp_path)
    ids = torch.randint(3, 160, (2, 6), generator=torch.Generator().manual_seed(2))
    runs = [generate(ours, ids, max_new_tokens=8, temperature=1.0, generator=torch.Generator().manual_seed(7))
            for _ in range(2)]
    assert runs[0] == runs[1]
    assert generate(ours, ids, max_new_tokens=8, temperature=1.0, top_p=1e-6) == generate(ours, ids, max_new_tokens=8)

    logits = torch.tensor([[0.6, 0.3, 0.1]]).log().expand(2000, 3)
    g = torch.Generator().manual_seed(0)
    assert set(sample(logits, 1.0, top_p=0.5, generator=g).tolist()) == {0}
    drawn = sample(logits, 1.0, top_p=0.8, generator=g)
    assert set(drawn.tolist()) == {0, 1}  # the 0.1 token is outside the 0.8 nucleus
    assert abs((drawn == 0).float().mean().item() - 2 / 3) < 0.05  # renormalised 0.6 / 0.9


def test_an_image_without_voco_tokens_is_read_by_every_generated_token(tmp_path):
    """A `full`-mode prompt keeps its image labelled VISION (no VoCo tokens): generation sees it at the prefill and
    at every decoded token, exactly as with the whole prompt relabelled TEXT; relabelled as compressed (a VoCo
    token appended to its group) the answer changes."""
    hf_llama(tmp_path)
    llm = Llama.from_pretrained(tmp_path)
    x = torch.randn(1, 9, llm.config.hidden_size, generator=torch.Generator().manual_seed(0))
    segments = torch.tensor([[VISION] * 5 + [TEXT] * 4])
    groups = torch.tensor([[0] * 5 + [-1] * 4])
    as_text = generate(llm, inputs_embeds=x, segments=torch.full_like(segments, TEXT), max_new_tokens=12)
    assert generate(llm, inputs_embeds=x, segments=segments, groups=groups, max_new_tokens=12) == as_text
    hidden = segments.clone()
    hidden[0, 4] = VOCO  # now the image is compressed by one VoCo token: the text no longer sees it directly
    assert generate(llm, inputs_embeds=x, segments=hidden, groups=groups, max_new_tokens=12) != as_text


def test_fast_decode_gives_the_eager_tokens(tmp_path):
    """generate(..., fast=True): a static KV cache and a torch.compile'd step (generate.static_decoder) decode the
    same tokens as the eager loop, for a left-padded batch under the VoCo mask and from a VoCo cache (stage 2)."""
    from nanovoco.config import preset
    from nanovoco.voco_cache import generate_from_cache
    torch.manual_seed(0)
    config = preset("tiny", 200)
    config.num_voco, config.voco_token_id = 2, 199
    vlm = VoCoLlama(config).eval()
    ids = torch.randint(3, 190, (2, 12), generator=torch.Generator().manual_seed(1))
    segments = torch.tensor([[PAD] * 3 + [TEXT] * 9, [TEXT] * 12])
    eager = generate(vlm.llm, ids, segments=segments, max_new_tokens=20)
    assert generate(vlm.llm, ids, segments=segments, max_new_tokens=20, fast=True) == eager
    prefix = torch.tensor([1] + [vlm.config.image_token_id] * 16 + [13, 199, 199])
    cache = compress(vlm, torch.randn(1, 3, 56, 56, generator=torch.Generator().manual_seed(2)), prefix)
    text = torch.randint(3, 190, (3, 6), generator=torch.Generator().manual_seed(3))
    assert generate_from_cache(vlm, cache, text, max_new_tokens=20, fast=True) == \
        generate_from_cache(vlm, cache, text, max_new_tokens=20)
