"""nanovoco.repro.bench, the paper's Table 7: analytic 7B cache bytes against the paper, the tiny model's three methods
against each other (full caching computes what the baseline computes), and FlopCounterMode against the formula."""
import subprocess
import sys

import pytest
import torch

from nanovoco.repro.bench import PAPER, analytic_rows, configure, kv_bytes_per_token, markdown, measure, random_model, \
    report, stages
from nanovoco.voco_cache import compress

TEXT = 12  # question tokens: short, the tests need no timing precision


@pytest.fixture(scope="module")
def tiny_rows():
    return {r["method"]: r for r in report("tiny", text_tokens=TEXT, repeats=2)}


def tiny_model(num_voco=1, seed=0):
    torch.manual_seed(seed)
    return random_model(configure("tiny", num_voco))


def test_7b_cache_bytes_match_the_paper():
    config = configure("7b")
    per_token = kv_bytes_per_token(config.text, 2)  # fp16: 2 (k, v) x 32 layers x 32 KV heads x 128 x 2 bytes
    assert per_token == 524_288
    assert 576 * per_token == 301_989_888
    assert abs(576 * per_token / 1e6 / PAPER["full caching"][1] - 1) < 0.002  # 302.0 vs 302.4 MB: -0.14%
    assert abs(per_token / 1e6 / PAPER["VoCo cache"][1] - 1) < 0.002  # 0.524 vs 0.525 MB
    rows = {r["method"]: r for r in analytic_rows(config, 40, 1)}
    assert rows["full caching"]["cache_tokens"] == 578  # BOS + 576 vision + "\n"
    assert rows["full caching"]["cache_bytes"] == 578 * per_token
    assert rows["VoCo cache"]["cache_bytes"] == per_token
    assert rows["baseline"]["flops"] > rows["full caching"]["flops"] > rows["VoCo cache"]["flops"]


def test_cli_tiny_prints_the_three_methods(tmp_path):
    out = tmp_path / "table.md"
    run = subprocess.run([sys.executable, "-m", "nanovoco.repro.bench", "--size", "tiny", "--repeats", "2",
                          "--text_tokens", str(TEXT), "--out", str(out)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    for method in ("| baseline |", "| full caching |", "| VoCo cache |", "torch " + torch.__version__):
        assert method in run.stdout and method in out.read_text()


def test_cli_7b_analytic_prints_the_paper_comparison():
    run = subprocess.run([sys.executable, "-m", "nanovoco.repro.bench", "--size", "7b"], capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0, run.stderr
    assert "302.0 (301,989,888 B) | 302.4 | -0.14%" in run.stdout
    assert "0.524 (524,288 B) | 0.525 | -0.14%" in run.stdout


def test_counted_flops_equal_the_formula(tiny_rows):
    # tolerance: none. The formula counts exactly the matmuls FlopCounterMode counts (GQA included: tiny has 4 query
    # heads per 2 KV heads), so any difference is a term missing on one side.
    for row in tiny_rows.values():
        assert row["flops_counted"] == row["flops"], row


@pytest.mark.parametrize("num_voco, text_tokens", [(2, 5), (4, 1)])
def test_counted_flops_equal_the_formula_other_shapes(num_voco, text_tokens):
    for row in measure(tiny_model(num_voco), text_tokens, repeats=1):
        assert row["flops_counted"] == row["flops"], row


def test_flops_and_bytes_ordered(tiny_rows):
    assert tiny_rows["baseline"]["flops"] > tiny_rows["full caching"]["flops"] > tiny_rows["VoCo cache"]["flops"]
    assert tiny_rows["full caching"]["cache_bytes"] > tiny_rows["VoCo cache"]["cache_bytes"] > 0
    assert tiny_rows["baseline"]["cache_bytes"] == 0
    text = markdown(list(tiny_rows.values()))
    assert text.count("| baseline |") == 1 and "FLOPs counted (M)" in text


def test_full_caching_logits_equal_baseline():
    vlm = tiny_model()
    g = torch.Generator().manual_seed(1)
    pixels = torch.randn(1, 3, 56, 56, generator=g)
    text_ids = torch.randint(3, 500, (1, TEXT), generator=g)
    methods = stages(vlm, pixels, text_ids)
    with torch.no_grad():
        baseline = methods["baseline"][0]().logits  # (1, P + T, V)
        full = methods["full caching"][0]().logits  # (1, T, V)
    assert full.shape[1] == TEXT
    torch.testing.assert_close(full, baseline[:, -TEXT:], atol=1e-5, rtol=0)
    assert not torch.allclose(methods["VoCo cache"][0]().logits, full)  # the VoCo path sees a different context


def test_decoding_after_each_stage_2():
    """The timed decode loop continues each method's prefill correctly: after the baseline and after full caching
    it generates the same tokens (the two compute the same thing), and the VoCo cache's tokens equal
    generate_from_cache's."""
    from nanovoco.repro.bench import decode
    from nanovoco.voco_cache import generate_from_cache
    vlm = tiny_model(2)
    g = torch.Generator().manual_seed(2)
    pixels, text_ids = torch.randn(1, 3, 56, 56, generator=g), torch.randint(3, 500, (1, TEXT), generator=g)
    methods = stages(vlm, pixels, text_ids)
    with torch.no_grad():
        tokens = {m: decode(vlm.llm, call(), last, 8) for m, (call, _, last) in methods.items()}
        prefix = torch.tensor([1] + [vlm.config.image_token_id] * 16 + [13] + [vlm.config.voco_token_id] * 2)
        reference = generate_from_cache(vlm, compress(vlm, pixels, prefix), text_ids, max_new_tokens=8)[0]
    assert tokens["baseline"] == tokens["full caching"]
    assert tokens["VoCo cache"] == reference


def test_135m_shape():
    c = configure("135m")
    assert c.num_image_tokens == 576 and c.text.num_hidden_layers == 30 and c.text.head_dim == 64
    assert c.text.num_attention_heads // c.text.num_key_value_heads == 3  # GQA 9 / 3, as SmolLM2-135M
    assert kv_bytes_per_token(c.text, 2) == 2 * 30 * 3 * 64 * 2  # 23 kB per cached token in fp16


@pytest.mark.parametrize("K", [1, 3])
def test_voco_cache_holds_k_tokens_per_layer(K):
    vlm = tiny_model(K)
    rows = {r["method"]: r for r in measure(vlm, TEXT, repeats=1)}
    g = torch.Generator().manual_seed(0)
    kv = stages(vlm, torch.randn(1, 3, 56, 56, generator=g), torch.randint(3, 500, (1, TEXT), generator=g))[
        "VoCo cache"][1]
    assert len(kv) == vlm.config.text.num_hidden_layers
    assert all(k.shape[2] == v.shape[2] == K for k, v in kv)
    assert rows["VoCo cache"]["cache_tokens"] == K
    # the reported bytes are the sum of the cache tensors' bytes, and what the formula says for fp32
    assert rows["VoCo cache"]["cache_bytes"] == sum(t.nbytes for pair in kv for t in pair)
    # and they are all the memory it keeps: no view into the prefix's longer key/value tensors
    assert all(t.untyped_storage().nbytes() == t.nbytes for pair in kv for t in pair)
    analytic = {r["method"]: r for r in analytic_rows(vlm.config, TEXT, K, bytes_per_value=4)}
    for m in ("full caching", "VoCo cache"):
        assert rows[m]["cache_bytes"] == analytic[m]["cache_bytes"]


def test_gpu_check_refuses_a_machine_without_cuda():
    """benchmarks/gpu_check.py is for the GPU machine; here it says so in one line and exits 2."""
    run = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check"], capture_output=True, text=True, timeout=120,
                         env={**__import__("os").environ, "CUDA_VISIBLE_DEVICES": ""})
    assert run.returncode == 2 and run.stderr.strip() == "error: no CUDA device: this script is for the GPU machine"
