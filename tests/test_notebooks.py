"""Every notebook runs top to bottom (in notebooks/, as a reader runs it) with its claims asserted, and the stored
notebooks hold their outputs (figures included), from a run of the code as it is."""
import ast
import re
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


# ----------------------------------------------------------------------------------------------------------------
# A course, not four demos: read from the stored notebooks, without running them

LIBRARY = Path(__file__).resolve().parents[1]


def cells(path, kind):
    return [c.source for c in nbformat.read(path, as_version=4).cells if c.cell_type == kind]


def defined_names(path: Path, nested: bool = True) -> set[str]:
    """The names a Python file defines: its functions and classes (with nested: methods and inner functions too)
    and its module-level variables."""
    tree = ast.parse(path.read_text())
    names = {n.name for n in (ast.walk(tree) if nested else tree.body) if isinstance(n, (ast.FunctionDef,
                                                                                           ast.ClassDef))}
    for node in tree.body:
        targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(
            node, ast.AnnAssign) else []
        names |= {t.id for t in targets if isinstance(t, ast.Name)}
    return names


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_header_says_what_it_teaches_needs_and_costs(path):
    header = cells(path, "markdown")[0]
    for field in ("**You will learn**", "**Paper**", "**Runs in**", "**Opens**"):
        assert field in header, f"{path.name}: the header lacks {field}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_code_links_resolve_to_the_functions_they_name(path):
    """Links of the form [`name`](../nanovoco/file.py): the file exists and defines name (a.b: the last part)."""
    links = re.findall(r"\[`([\w.]+)(?:\(\))?`\]\(\.\./([\w/]+\.py)\)", "\n".join(cells(path, "markdown")))
    assert len(links) >= 4, f"{path.name} links to {len(links)} library functions"
    for name, file in links:
        assert (LIBRARY / file).is_file(), f"{path.name}: {file} does not exist"
        assert name.split(".")[-1] in defined_names(LIBRARY / file), f"{path.name}: {file} defines no {name}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_exercises_have_checked_answers(path):
    """At least two exercises, each with a checker that the notebook runs on the worked answer (asserting it right)
    and on a wrong one (showing that it can say no)."""
    headings = [m for s in cells(path, "markdown") for m in re.findall(r"^### Exercise \d+", s, flags=re.M)]
    assert len(headings) >= 2, f"{path.name} has {len(headings)} exercises"
    code = "\n".join(cells(path, "code"))
    for n in range(1, len(headings) + 1):
        assert re.search(rf"\bcheck_{n}\(", code), f"{path.name}: exercise {n} has no check_{n}"


def test_no_notebook_redefines_the_library():
    """A notebook calls the library's compress / answer / mask / loss, never a copy of its own: no function or
    class of a notebook (a lambda included) takes the name of a function, class or constant that nanovoco defines."""
    public = set()
    for file in (LIBRARY / "nanovoco").rglob("*.py"):
        public |= {n for n in defined_names(file, nested=False) if not n.startswith("_") and not n.isupper()}
    public |= {n for n in defined_names(LIBRARY / "train.py", nested=False) if not n.startswith("_")
               and not n.isupper()}
    for path in NOTEBOOKS:
        for source in cells(path, "code"):
            tree = ast.parse("\n".join(l for l in source.splitlines() if not l.startswith(("%", "!"))))
            mine = {n.name for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
            mine |= {t.id for n in ast.walk(tree) if isinstance(n, ast.Assign) and isinstance(n.value, ast.Lambda)
                     for t in n.targets if isinstance(t, ast.Name)}
            clash = sorted(mine & public - {"main", "run"})
            assert not clash, f"{path.name} defines {clash}, which nanovoco defines: call the library's"
