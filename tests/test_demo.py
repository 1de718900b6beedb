"""`make demo`: the tiny random VLM is saved, loaded back, compresses its image once and answers two questions from
the cache."""
from nanovoco.repro import demo


def test_demo_compresses_once_and_answers_twice(tmp_path, capsys):
    demo.main(tmp_path, max_new_tokens=4, num_voco=2)
    out = capsys.readouterr().out
    assert "16 vision tokens per image, 2 VoCo tokens" in out
    assert "stage 1: 21 tokens -> a VoCo cache of 2 tokens" in out  # [BOS] + 16 + "\n" + 2 VoCo, then only 2 kept
    assert [line for line in out.splitlines() if line.startswith("Q: ")] == [f"Q: {q}" for q in demo.QUESTIONS]
    assert out.count("tokens in ") == 2 and (tmp_path / "model" / "config.json").exists()
