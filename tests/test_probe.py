"""The probes that choose the layout questions: on features where position and content add up, the mean of the
patches keeps no position and all the patches keep it; end to end on a tower, and its command's bad input."""
import json
import random

import pytest
import torch

from nanovoco.repro import cache_probe, probe, synthetic, vision_pretrain
from nanovoco.config import CLIPVisionConfig
from nanovoco.model import CLIPVisionTower


def test_additive_position_cancels_in_the_mean():
    """One object in one of 8 patches; a patch's feature is its position's vector plus, where the object is, the
    object's: averaged, every position is there once whatever the layout, so "is the object on the left?" is lost,
    while the patches side by side answer it."""
    rng = random.Random(0)
    n, patches, dim = 1200, 8, 6
    position = torch.randn(patches, dim, generator=torch.Generator().manual_seed(0))
    thing = torch.randn(dim, generator=torch.Generator().manual_seed(1))
    where = [rng.randrange(patches) for _ in range(n)]
    feats = position.expand(n, patches, dim).clone()
    feats[torch.arange(n), torch.tensor(where)] += thing
    feats += 0.01 * torch.randn(feats.shape, generator=torch.Generator().manual_seed(2))
    answers = ["left" if p < patches // 2 else "right" for p in where]
    r = probe.probe_type({"mean_pooled": feats.mean(1), "all_patches": feats.flatten(1)}, answers, (700, 200))
    assert r["n_test"] == 300 and abs(r["no_image"] - 0.5) < 0.1
    assert r["mean_pooled"] < r["no_image"] + 0.1 and r["mean_pooled_nearest_mean"] < r["no_image"] + 0.1
    assert r["all_patches"] > 0.95 and r["all_patches_nearest_mean"] > 0.95


def test_unasked_questions_are_left_out():
    feats = torch.randn(200, 3)
    answers = [None if i % 4 == 0 else ("a" if feats[i, 0] > 0 else "b") for i in range(200)]
    r = probe.probe_type({"f": feats}, answers, (100, 40))
    assert r["n_test"] == sum(a is not None for a in answers[140:]) and r["f"] > 0.9


def test_run_on_a_tower_probes_every_layout_type(monkeypatch):
    monkeypatch.setattr(probe, "PENALTIES", (1e-2,))
    tower = CLIPVisionTower(CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                             num_attention_heads=2, image_size=32, patch_size=8)).eval()
    result = probe.run(tower, n_images=120, seed=0)
    assert list(result) == list(synthetic.QUESTION_SETS["layout"])
    for r in result.values():
        assert 0 < r["n_test"] <= 30 and all(0 <= r[k] <= 1 for k in r if k != "n_test")
    text = probe.markdown(result)
    assert text.count("\n") == 2 + len(result) and "| count_left | 30 |" in text


def test_command_writes_json_and_refuses_bad_input(tmp_path, capsys, monkeypatch):
    tower = vision_pretrain.pretrain(steps=2, n_images=8, progress=False,
                                     config=CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                                             num_attention_heads=2, image_size=64, patch_size=8))
    vision_pretrain.save(tower, tmp_path / "vision")
    monkeypatch.setattr(probe, "PENALTIES", (1e-2,))  # one fit per features and type: the choice is tested above
    probe.main(["--vision", str(tmp_path / "vision"), "--images", "100", "--out", str(tmp_path / "probe.json")])
    assert set(json.loads((tmp_path / "probe.json").read_text())) == set(synthetic.QUESTION_SETS["layout"])
    for argv, said in [(["--images", "10"], "--images 10: give at least 100"),
                       (["--vision", str(tmp_path / "nothing")], "no config.json there"),
                       (["--vision", str(tmp_path / "vision"), "--out", str(tmp_path)], "is a folder")]:
        with pytest.raises(SystemExit) as e:
            probe.main(argv)
        assert e.value.code == 2 and said in capsys.readouterr().err


def test_cache_probe_reads_a_planted_answer_and_only_that():
    """The ridge probe on a Gram matrix: an answer that is a direction of the features (plus noise) is read on the
    held-out images; an answer that is not there (random labels) stays near the most common answer; images without
    a fair question are left out of every split."""
    g = torch.Generator().manual_seed(0)
    n, dim = 1000, 64
    x = torch.randn(n, dim, generator=g, dtype=torch.float64)
    direction = x @ torch.randn(dim, generator=g, dtype=torch.float64)
    # yes / no on either side of the direction's median, with a margin (images inside it have no fair question)
    margin = direction.abs().median().item() / 2
    planted = ["yes" if v > margin else "no" if v < -margin else None for v in direction.tolist()]
    rng = random.Random(0)
    noise = [rng.choice(("a", "b", "c")) for _ in range(n)]
    kernel = x @ x.T
    read = cache_probe.ridge_probe(kernel, planted, 600, 200, dim)
    assert read["n_test"] == sum(a is not None for a in planted[800:]) and read["n_test"] > 120
    assert read["cache"] > 0.97 and read["penalty"] in cache_probe.PENALTIES
    unread = cache_probe.ridge_probe(kernel, noise, 600, 200, dim)
    assert read["n_test"] < unread["n_test"] == 200 and unread["cache"] < 0.45  # three answers: chance is a third
    assert cache_probe.ridge_probe(kernel, planted[:800] + [None] * 200, 600, 200, dim) is None  # nothing to test


def test_cache_probe_table_averages_the_seeds_that_probed_a_type():
    row = lambda held, read: {"cache": held, "answered": read, "no_image": 0.5}  # noqa: E731
    per_seed = {"seed0": {"voco_k1": {"k": 1, "by_type": {"centre": row(0.9, 0.8), "empty_quarter": row(1.0, 0.3)}}},
                "seed1": {"voco_k1": {"k": 1, "by_type": {"centre": row(0.8, 0.6)}}}}  # too few to probe the other
    table = cache_probe.markdown(per_seed).splitlines()
    assert table[0] == "| stage | K | centre | empty_quarter |"
    assert table[2] == "| voco_k1 | 1 | 85.0 / 70.0 | 100.0 / 30.0 |"
    assert table[3] == "| no image (the probe's most common answer) | | 50.0 | 50.0 |"


def test_cache_probe_command_refuses_a_folder_that_is_not_a_seed(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        cache_probe.main([str(tmp_path)])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(tmp_path) in err and "runs/repro/seed0" in err
    (tmp_path / "data" / "train").mkdir(parents=True)
    (tmp_path / "data" / "eval").mkdir()
    (tmp_path / "data" / "train" / "data.json").write_text("[]")
    with pytest.raises(SystemExit) as e:  # the data is there, no stage finished
        cache_probe.main([str(tmp_path)])
    assert e.value.code == 2 and "no finished VoCo-LLaMA stage" in capsys.readouterr().err
    (tmp_path / "file").write_text("")
    with pytest.raises(SystemExit) as e:  # --out below a file: refused before any model is loaded
        cache_probe.main([str(tmp_path), "--out", str(tmp_path / "file" / "probe.json")])
    assert e.value.code == 2 and "--out" in capsys.readouterr().err
