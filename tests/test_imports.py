"""Imports go one way: entry points -> library -> primitives, with no circle among nanovoco's modules (model.py, for
one, imports nothing that generates, trains or evaluates)."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def nanovoco_imports(path: Path) -> set[str]:
    """The nanovoco modules a file imports, at any depth of the file (function-level imports count too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("nanovoco"):
            names = [node.module] if node.module != "nanovoco" else [f"nanovoco.{a.name}" for a in node.names]
            found.update(n.removeprefix("nanovoco.") for n in names)
        elif isinstance(node, ast.Import):
            found.update(a.name.removeprefix("nanovoco.") for a in node.names if a.name.startswith("nanovoco."))
    return found


def graph() -> dict[str, set[str]]:
    return {p.stem: nanovoco_imports(p) - {p.stem} for p in (ROOT / "nanovoco").glob("*.py") if p.stem != "__init__"}


def test_no_import_circle():
    g = graph()
    done, on_path = set(), []

    def visit(module):
        assert module not in on_path, f"import circle: {' -> '.join(on_path[on_path.index(module):] + [module])}"
        if module in done:
            return
        on_path.append(module)
        for dependency in g.get(module, ()):
            visit(dependency)
        on_path.pop()
        done.add(module)

    for module in g:
        visit(module)


def test_the_model_and_the_primitives_import_nothing_above_them():
    g = graph()
    assert g["model"] <= {"checkpoint", "formats", "config", "baselines"}
    for primitive in ("files", "config", "voco", "image", "baselines"):
        assert g[primitive] == set(), (primitive, g[primitive])
    assert not any("train" in deps or "infer" in deps for deps in g.values())


# The programs that reproduce and measure (each with a `main`), apart from the library a user imports to build,
# train and run a VoCo model
EXPERIMENTS = {"repro", "synthetic", "synthetic_video", "probe", "vision_pretrain", "scene_text", "bench",
               "paper_eval", "demo"}


def test_the_library_imports_nothing_from_the_experiments():
    g = graph()
    library = set(g) - EXPERIMENTS
    assert {"model", "voco", "data", "generate", "tokenizer", "parallel", "train_checkpoint"} <= library
    for module in library:
        assert not g[module] & EXPERIMENTS, (module, g[module] & EXPERIMENTS)
    assert EXPERIMENTS <= set(g)  # every name above is a module, so the test cannot pass by a typo
