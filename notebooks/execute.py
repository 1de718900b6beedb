"""Run every notebook top to bottom and store it with its outputs (figures included), so that they read on the web
without running: `make notebooks` (the tests run them again, and check that the stored ones hold their outputs)."""
import sys
from pathlib import Path

import nbclient
import nbformat

HERE = Path(__file__).resolve().parent


def execute(path: Path) -> nbformat.NotebookNode:
    """The notebook at path, executed in its folder (as a reader runs it); raises on any error or failed assert."""
    nb = nbformat.read(path, as_version=4)
    nbclient.NotebookClient(nb, timeout=900, kernel_name="python3",
                            resources={"metadata": {"path": str(path.parent)}}).execute()
    return nb


if __name__ == "__main__":
    for path in [Path(p) for p in sys.argv[1:]] or sorted(HERE.glob("*.ipynb")):
        print(f"running {path.name}", flush=True)
        nbformat.write(execute(path), path)
