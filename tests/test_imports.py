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
            package = (ROOT / node.module.replace(".", "/")).is_dir()  # from a package import its modules
            names = [f"{node.module}.{a.name}" for a in node.names] if package else [node.module]
            found.update(n.removeprefix("nanovoco.") for n in names)
        elif isinstance(node, ast.Import):
            found.update(a.name.removeprefix("nanovoco.") for a in node.names if a.name.startswith("nanovoco."))
    return found


def module_name(path: Path) -> str:
    """nanovoco/model.py -> "model", nanovoco/repro/run.py -> "repro.run", nanovoco/repro/__init__.py -> "repro"."""
    parts = path.relative_to(ROOT / "nanovoco").with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def graph() -> dict[str, set[str]]:
    """Every nanovoco module (the experiments' as "repro.<name>") -> the nanovoco modules it imports."""
    paths = [p for p in (ROOT / "nanovoco").rglob("*.py") if p.name not in ("__init__.py", "__main__.py")]
    return {module_name(p): nanovoco_imports(p) - {module_name(p)} for p in paths}


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
    # VoCo sits on top of a plain LLaVA: the rule and the layout (voco.py) need nothing, the two stages
    # (voco_cache.py) the model and the decode loop, and neither the model nor generation needs them
    assert g["voco_cache"] <= {"model", "generate", "voco"}
    assert "voco_cache" not in g["model"] | g["generate"]
    for primitive in ("files", "config", "voco", "image", "baselines"):
        assert g[primitive] == set(), (primitive, g[primitive])
    assert not any("train" in deps or "infer" in deps for deps in g.values())


def is_experiment(module: str) -> bool:
    return module == "repro" or module.startswith("repro.")


def test_the_library_imports_nothing_from_the_experiments():
    """nanovoco/ holds what a user imports to build, train and run a VoCo model; the reproduction and the programs
    that measure (nanovoco/repro/) build on it, never the other way; train.py and infer.py take data, and need none
    of them either."""
    g = graph()
    library = {m for m in g if not is_experiment(m)}
    experiments = set(g) - library
    assert {"model", "voco", "data", "generate", "tokenizer", "parallel", "train_checkpoint"} <= library
    assert {"repro.run", "repro.recipe", "repro.synthetic", "repro.bench", "repro.paper_eval", "repro.demo"} <= \
        experiments  # the names are modules, so the test cannot pass by a typo
    for module in library:
        assert not any(map(is_experiment, g[module])), (module, g[module])
    for entry_point in ("train.py", "infer.py"):
        imported = nanovoco_imports(ROOT / entry_point)
        assert not any(map(is_experiment, imported)), (entry_point, imported)
