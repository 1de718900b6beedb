"""The command line: train.py's help and option spellings, and the one rule for every script's option names."""
import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

import infer
import train
from nanovoco import cli

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_train_help_lists_every_option_with_its_default_and_help(flag):
    r = subprocess.run([sys.executable, "train.py", flag], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stderr == ""
    groups = dict(cli.dataclass_help(train.TrainConfig))
    assert list(groups) == ["model", "data", "optimisation (official recipe: AdamW, lr 2e-5, cosine, 3% warmup, no "
                                              "weight decay, global batch 128)", "run"]
    listed = [name for items in groups.values() for name, _, _ in items]
    assert listed == [f.name for f in dataclasses.fields(train.TrainConfig)]  # every field, in order, once
    for items in groups.values():
        for name, default, text in items:
            assert f"--{name}=" in r.stdout and text, name  # each has its help
    assert "--lr=2e-05" in r.stdout and "peak learning rate" in r.stdout
    assert "now: the K of inference by default" not in r.stdout  # continuation lines joined, not the next field's
    assert "compresses to any of them" in " ".join(r.stdout.split())  # a field's help goes on below its line
    assert all(preset in r.stdout for preset in train.PRESETS)


def test_train_option_spellings_parse_alike():
    want = train.parse_args(["--preset=tiny-cpu", "--lr=0.003", "--max_steps=7", "--resume=true", "--mode=full"])
    for argv in (["--preset", "tiny-cpu", "--lr", "0.003", "--max-steps", "7", "--resume", "--mode", "full"],
                 ["--preset=tiny-cpu", "--lr", "3e-3", "--max-steps=7", "--resume", "true", "--mode=full"]):
        assert train.parse_args(argv) == want


def test_every_script_takes_hyphens_and_underscores():
    a = infer.parse_args(["--model", "m", "--image", "x.png", "--question", "q", "--max-new-tokens", "5",
                          "--save-cache", "c.safetensors", "--num-voco=2"])
    b = infer.parse_args(["--model", "m", "--image", "x.png", "--question", "q", "--max_new_tokens", "5",
                          "--save_cache", "c.safetensors", "--num_voco=2"])
    assert a == b and a.max_new_tokens == 5 and a.save_cache == "c.safetensors"
    p = cli.ArgumentParser()
    p.add_argument("--kv-heads", type=int)  # a name written with hyphens takes underscores too
    assert p.parse_args(["--kv_heads", "2"]).kv_heads == p.parse_args(["--kv-heads=2"]).kv_heads == 2
    assert "underscores or hyphens" in p.format_help()
    # only the name is respelled, never the value after "="
    assert infer.parse_args(["--model", "m", "--image", "x", "--question=--max-new-tokens"]).question == [\
        "--max-new-tokens"]  # --question takes one or more


def test_respell_and_closest():
    known = {"--max_steps", "--lr", "--kv-heads"}
    assert cli.respell("--max-steps", known) == "--max_steps" and cli.respell("--kv_heads", known) == "--kv-heads"
    assert cli.respell("--nope", known) == "--nope" and cli.respell("max-steps", {"max_steps"}) == "max_steps"
    assert cli.closest("max_stpes", known) == ", did you mean --max_steps?" and cli.closest("zzz", known) == ""
