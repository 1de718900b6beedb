"""The reproduction driver end to end at a toy scale: every stage trains from the `full` model, the tables, the
plot and the JSON come out, and a second invocation keeps the finished stages instead of retraining them."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from nanovoco.repro import KS, retention, run_stage, stages

ROOT = Path(__file__).resolve().parents[1]


def test_stages_start_from_the_full_model():
    runs = stages(1.0)
    assert list(runs)[0] == "full" and len(runs) == 1 + len(KS) + 3
    for name, options in list(runs.items())[1:]:
        assert "--init={out}/full/checkpoint/model" in options, name


def test_retention():
    assert retention(0.5, 0.4, 0.6) == pytest.approx(0.5) and retention(0.4, 0.4, 0.6) == 0
    assert retention(0.5, 0.4, 0.4) is None  # no gap between the bounds: undefined, not a division by zero


@pytest.mark.slow
def test_repro_runs_and_resumes(tmp_path):
    out = tmp_path / "repro"
    cmd = [sys.executable, "-m", "nanovoco.repro", "--out", str(out), "--scale", "0.01"]
    first = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-3000:]
    text = (out / "results.md").read_text()
    for heading in ("Table 1 in miniature", "Table 2 in miniature", "Table 7 in miniature"):
        assert heading in text
    summary = json.loads((out / "results.json").read_text())
    assert set(summary) == set(stages(1.0)) | {"no_image"}
    bounds = summary["full"]["retention"], summary["lower_bound_k1"]["retention"]
    assert bounds == (1.0, 0.0) or bounds == (None, None)  # None: no gap between the bounds in so short a run
    assert (out / "retention.png").stat().st_size > 1000
    for name in stages(1.0):  # each compressed stage started from the full model, and VoCo stages have K tokens
        state = json.loads((out / name / "checkpoint" / "state.json").read_text())["config"]
        assert state["init"] == ("tiny" if name == "full" else str(out / "full" / "checkpoint" / "model"))
        assert name == "full" or state["num_voco"] == int(name.split("_k")[1])
    second = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0 and second.stdout.count("done before, kept") == len(stages(1.0))
    other = subprocess.run(cmd[:-1] + ["0.02"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert other.returncode != 0 and "made with --scale 0.01" in other.stderr


@pytest.mark.slow
def test_an_interrupted_stage_is_not_taken_as_finished_and_resumes(tmp_path, capsys):
    options = stages(0.01)["full"]
    with pytest.raises(SystemExit, match="did not finish"):  # train.py exits 0 after saving, as on Ctrl-C
        run_stage("full", [*options, "--stop_after=4"], tmp_path)
    assert (tmp_path / "full" / "checkpoint").is_dir() and not (tmp_path / "full" / "eval.json").exists()
    run_stage("full", options, tmp_path)
    assert "--resume=true" in capsys.readouterr().out
    steps = [json.loads(line)["step"] for line in (tmp_path / "full" / "log.jsonl").read_text().splitlines()]
    assert steps == list(range(10)) and (tmp_path / "full" / "eval.json").exists()
