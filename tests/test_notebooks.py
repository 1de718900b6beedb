"""Every notebook runs top to bottom (in notebooks/, as a reader runs it) with its claims asserted, and the stored
notebooks hold their outputs (figures included), from a run of the code as it is."""
import sys
from pathlib import Path

import nbformat
import pytest

NOTEBOOK_DIR = Path(__file__).resolve().parents[1] / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
sys.path.insert(0, str(NOTEBOOK_DIR))
from execute import execute  # noqa: E402


def test_there_are_notebooks():
    assert [p.stem for p in NOTEBOOKS] == ["01_voco_mask", "02_attention_distillation", "03_two_stage_inference",
                                           "04_video"]


def outputs(cell) -> tuple[bool, int, bool]:
    """What a code cell shows: any output, how many figures, an error. (Not the text itself: timings and progress
    bars differ from run to run.)"""
    out = cell.get("outputs", [])
    return bool(out), sum("image/png" in o.get("data", {}) for o in out), any(o.output_type == "error" for o in out)


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs_and_is_stored_with_its_outputs(path):
    fresh = execute(path)  # raises on any error, including a claim whose assert fails
    stored = nbformat.read(path, as_version=4)
    code = [(s, f) for s, f in zip(stored.cells, fresh.cells) if f.cell_type == "code"]
    assert [s.source for s, _ in code] == [f.source for _, f in code]
    for s, f in code:  # same code, executed, with the same outputs and figures: `make notebooks` after an edit
        assert s.get("execution_count") is not None and outputs(s) == outputs(f), \
            f"{path.name} is stored without the outputs of its current code: run `make notebooks`"
    assert sum("assert " in s.source for s, _ in code) >= 2, "a notebook states its claims as assertions"
