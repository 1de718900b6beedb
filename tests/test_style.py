"""The code stays as readable as the style asks: no line over 120 columns (docs/usage.md says why not 100), and no
function over 60 lines outside the tests (a longer one is split by idea, as train.py's loop is)."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CODE = sorted(p for folder in ("nanovoco", "benchmarks", "tests", "notebooks") for p in (ROOT / folder).rglob("*.py"))
CODE += [ROOT / "train.py", ROOT / "infer.py"]


def test_the_tree_has_its_files():
    names = {p.relative_to(ROOT).as_posix() for p in CODE}
    assert {"train.py", "infer.py", "nanovoco/model.py", "nanovoco/repro/run.py", "tests/test_style.py"} <= names


def test_lines_fit_in_120_columns():
    long = [f"{p.relative_to(ROOT)}:{n}" for p in CODE for n, line in enumerate(p.read_text().splitlines(), 1)
            if len(line) > 120]
    assert not long, f"lines over 120 columns: {long}"


def test_functions_are_at_most_60_lines_outside_the_tests():
    long = []
    for p in CODE:
        if p.parts[-2] == "tests":
            continue
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 60:
                long.append(f"{p.relative_to(ROOT)}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1})")
    assert not long, f"functions over 60 lines: {long}"
