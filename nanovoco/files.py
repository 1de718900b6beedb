"""Small file utilities every layer uses: JSON read with an error that names the file, atomic writes, and the
folders and files that options name for writing, checked before any work."""
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


def output_dir(path, option: str) -> Path:
    """The folder an option names for writing, as the user meant it (~ expanded, a trailing / ignored), created
    if need be. One clear error naming the option, before any work, when nothing can be written there: the path
    is a file, a file sits above it, or the nearest existing folder above it is not writable."""
    out = Path(path).expanduser()
    if out.exists() and not out.is_dir():
        raise ValueError(f"{option} {path}: {out} is a file, not a folder: choose another {option}")
    writable_above(out, path, option)
    out.mkdir(parents=True, exist_ok=True)
    return out


def output_file(path, option: str) -> Path:
    """The file an option names for writing (~ expanded), its folder checked and created as output_dir does."""
    out = Path(path).expanduser()
    if out.is_dir() or str(path).endswith(("/", os.sep)):
        raise ValueError(f"{option} {path} is a folder: give a file name, e.g. {Path(path) / 'image.voco'}")
    writable_above(out.parent, path, option)
    out.parent.mkdir(parents=True, exist_ok=True)
    return out


def writable_above(out: Path, path, option: str):
    """The nearest existing folder at or above out must be a writable folder (not a file)."""
    above = next(p for p in (out.absolute(), *out.absolute().parents) if p.exists())
    if not above.is_dir():
        raise ValueError(f"{option} {path}: {above} is a file, so nothing can be written below it: choose another "
                         f"{option}")
    if not os.access(above, os.W_OK | os.X_OK):
        raise ValueError(f"{option} {path}: cannot write in {above} (permission denied): choose a folder you can "
                         f"write to")
