"""nanovoco's LLaMA decoder equals transformers' LlamaForCausalLM on the same weights."""
import json

import pytest
import torch
import transformers

from nanovoco.voco import PAD, TEXT, causal_pad_mask
from nanovoco.model import Llama
from tiny import TEXT_CONFIG, hf_llama

CONFIGS = {
    "gqa": {},
    "mha": dict(num_key_value_heads=4),
    "tied": dict(tie_word_embeddings=True),
    "rope_theta": dict(rope_theta=500000.0),
    "linear_rope_scaling": dict(rope_scaling={"rope_type": "linear", "factor": 4.0}),
}


@pytest.mark.parametrize("name", CONFIGS)
def test_logits_match_transformers(tmp_path, name):
    hf = hf_llama(tmp_path, **CONFIGS[name])
    ours = Llama.from_pretrained(tmp_path)
    ids = torch.randint(0, hf.config.vocab_size, (2, 33), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, hf(ids).logits, atol=1e-4, rtol=0)
    assert (ours.lm_head is None) == hf.config.tie_word_embeddings


@pytest.mark.parametrize("name", ["gqa", "tied"])
def test_logits_at_and_last_only_are_the_logits_of_those_positions(tmp_path, name):
    """Training asks for the answers' logits only, generation for the last position's: the same numbers as the
    whole (B, L, vocab) tensor at those positions."""
    hf_llama(tmp_path, **CONFIGS[name])
    ours = Llama.from_pretrained(tmp_path)
    ids = torch.randint(0, ours.config.vocab_size, (2, 17), generator=torch.Generator().manual_seed(3))
    at = torch.zeros(2, 17, dtype=torch.bool)
    at[0, [3, 4, 16]] = at[1, [0, 9]] = True
    with torch.no_grad():
        full = ours(ids).logits
        torch.testing.assert_close(ours(ids, logits_at=at).logits, full[at], atol=1e-5, rtol=0)
        torch.testing.assert_close(ours(ids, last_only=True).logits, full[:, -1:], atol=1e-5, rtol=0)


def test_left_padded_batch_matches_transformers(tmp_path):
    hf = hf_llama(tmp_path)
    ours = Llama.from_pretrained(tmp_path)
    ids = torch.randint(3, 160, (3, 12), generator=torch.Generator().manual_seed(2))
    key_mask = torch.ones(3, 12, dtype=torch.bool)
    key_mask[1, :4] = key_mask[2, :9] = False
    position_ids = (key_mask.long().cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        # transformers with the same 4D mask in float form (its sdpa path), and with its own 2D padding mask
        ref = hf(ids, attention_mask=key_mask.long(), position_ids=position_ids).logits
        mask = causal_pad_mask(torch.where(key_mask, TEXT, PAD))
        got = ours(ids, attn_mask=mask, position_ids=position_ids).logits
    torch.testing.assert_close(got[key_mask], ref[key_mask], atol=1e-4, rtol=0)
    # and a padded row equals the same row without its padding
    with torch.no_grad():
        alone = ours(ids[2:, 9:]).logits
    torch.testing.assert_close(got[2, 9:], alone[0], atol=1e-5, rtol=0)


def test_explicit_4d_bool_mask_matches_transformers(tmp_path):
    """An arbitrary (non-causal) boolean mask, as the VoCo mask will be: transformers' sdpa path takes it as is."""
    hf = hf_llama(tmp_path, attn_implementation="sdpa")
    ours = Llama.from_pretrained(tmp_path)
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 160, (2, 10), generator=g)
    mask = torch.rand(2, 1, 10, 10, generator=g) > 0.5
    mask |= torch.eye(10, dtype=torch.bool)  # every row sees at least one key
    with torch.no_grad():
        torch.testing.assert_close(ours(ids, attn_mask=mask).logits, hf(ids, attention_mask=mask).logits,
                                   atol=1e-4, rtol=0)


def test_sharded_checkpoint(tmp_path):
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**TEXT_CONFIG)).eval()
    hf.save_pretrained(tmp_path, max_shard_size="100KB")
    assert (tmp_path / "model.safetensors.index.json").exists() and len(list(tmp_path.glob("*.safetensors"))) > 2
    ours = Llama.from_pretrained(tmp_path)
    ids = torch.arange(20)[None]
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, hf(ids).logits, atol=1e-4, rtol=0)


def test_pytorch_bin_checkpoint(tmp_path):
    """Vicuna-7B-v1.5 ships .bin shards: read with torch.load(weights_only=True); old inv_freq buffers ignored."""
    hf = hf_llama(tmp_path / "st")
    state = {k: v.clone() for k, v in hf.state_dict().items()}
    state["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)
    (tmp_path / "bin").mkdir()
    torch.save(state, tmp_path / "bin" / "pytorch_model.bin")
    (tmp_path / "bin" / "config.json").write_text((tmp_path / "st" / "config.json").read_text())
    ours = Llama.from_pretrained(tmp_path / "bin")
    ids = torch.arange(20)[None]
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, hf(ids).logits, atol=1e-4, rtol=0)


def test_old_style_rope_config(tmp_path):
    """Released checkpoints spell rope as top-level rope_theta + rope_scaling {type, factor}: read that too."""
    hf = hf_llama(tmp_path, rope_theta=20000.0, rope_scaling={"rope_type": "linear", "factor": 2.0})
    config = json.loads((tmp_path / "config.json").read_text())
    del config["rope_parameters"]
    config |= {"rope_theta": 20000.0, "rope_scaling": {"type": "linear", "factor": 2.0}}
    (tmp_path / "config.json").write_text(json.dumps(config))
    ours = Llama.from_pretrained(tmp_path)
    assert (ours.config.rope_theta, ours.config.rope_linear_factor) == (20000.0, 2.0)
    ids = torch.arange(40)[None]
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, hf(ids).logits, atol=1e-4, rtol=0)


def test_kv_cache_equals_full_forward(tmp_path):
    hf_llama(tmp_path)
    ours = Llama.from_pretrained(tmp_path)
    ids = torch.randint(0, 160, (2, 16), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        full = ours(ids).logits
        first = ours(ids[:, :9])
        rest = ours(ids[:, 9:], cache=first.cache)
    torch.testing.assert_close(torch.cat([first.logits, rest.logits], 1), full, atol=1e-5, rtol=0)
    assert rest.cache[0][0].shape == (2, 2, 16, 16)  # (B, n_kv_heads, L, head_dim)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_load(tmp_path, dtype):
    hf = hf_llama(tmp_path)
    ours = Llama.from_pretrained(tmp_path, dtype=dtype, device="cpu")
    assert all(p.dtype == dtype and p.device.type == "cpu" for p in ours.parameters())
    ids = torch.arange(20)[None]
    with torch.no_grad():
        ref = hf(ids).logits
        torch.testing.assert_close(ours(ids).logits.float(), ref, atol=2e-2, rtol=0)


def test_save_pretrained_round_trip_and_transformers_reads_it(tmp_path):
    hf = hf_llama(tmp_path / "a", tie_word_embeddings=True, rope_scaling={"rope_type": "linear", "factor": 2.0})
    Llama.from_pretrained(tmp_path / "a").save_pretrained(tmp_path / "b")
    again = Llama.from_pretrained(tmp_path / "b")
    back = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "b").eval()
    ids = torch.arange(30)[None]
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, hf(ids).logits, atol=1e-5, rtol=0)
        torch.testing.assert_close(back(ids).logits, hf(ids).logits, atol=1e-5, rtol=0)
