"""Small file utilities every layer uses: JSON read with an error that names the file, and atomic writes."""
import json
import os
from pathlib import Path


def read_json(path: Path, what: str) -> dict:
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: {what} must be there")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e}): it is corrupt; download or save it again") from e


def atomic_write(path: Path, write):
    """Write via a temporary file in the same directory, then rename: readers never see half a file."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(str(tmp))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
