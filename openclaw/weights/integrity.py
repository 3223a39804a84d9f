"""What a cached model directory must hold: a record written with it, checked whenever it is loaded.

A conversion writes RECORD (the size and sha256 of every file beside it) before the directory is renamed into place;
`openclaw pull` keeps MARKER (the size and hash of every file it verified). Loading checks the sizes always (a stat
per file) and the hashes when asked (--verify). It reports damage and does not repair it: the GGUF importer rebuilds
its directories, a pulled one names the file to delete before pulling again.
"""

import hashlib
import json
from collections.abc import Callable
from pathlib import Path

RECORD = ".openclaw-files.json"  # written by a conversion: {"files": {name: {"size", "sha256"}}}
MARKER = ".openclaw-pull.json"  # written by `openclaw pull`: {"commit", "files": {name: {"size", "sha256", "blob_id"}}}
_CHUNK = 1 << 20
Progress = Callable[[str, int, int], None]  # (what, done, total)


def sha256(path: Path, progress: Progress | None = None) -> str:
    h, total, done = hashlib.sha256(), path.stat().st_size, 0
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
            done += len(chunk)
            if progress:
                progress(f"verifying {path.name}", done, total)
    return h.hexdigest()


def git_blob_id(path: Path) -> str:
    """The git object id of a file (what the hub lists for files kept in git rather than LFS)."""
    h = hashlib.sha1(f"blob {path.stat().st_size}\0".encode())
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def write_record(directory: Path) -> None:
    """Record every regular file of directory (links are not the directory's own bytes)."""
    files = {p.name: {"size": p.stat().st_size, "sha256": sha256(p)} for p in sorted(Path(directory).iterdir())
             if p.is_file() and not p.is_symlink() and p.name != RECORD}
    (Path(directory) / RECORD).write_text(json.dumps({"files": files}, indent=1) + "\n", encoding="utf-8")


def read_files(directory: Path, name: str) -> dict[str, dict] | None:
    """The files a RECORD or MARKER lists, or None when there is none (or it is unreadable)."""
    try:
        files = json.loads((Path(directory) / name).read_text(encoding="utf-8")).get("files")
    except (OSError, ValueError, AttributeError):
        return None
    return files if isinstance(files, dict) else None


def damage(directory: Path, files: dict[str, dict], verify: bool = False,
           progress: Progress | None = None) -> tuple[str, str] | None:
    """(file, what is wrong with it) for the first listed file that is missing, of another size or, with verify,
    of another hash; None when the directory checks out."""
    for name, want in files.items():
        path = Path(directory) / name
        want = want if isinstance(want, dict) else {}
        if not path.is_file():
            return name, "missing"
        size = path.stat().st_size
        if size != want.get("size"):
            return name, f"{size} bytes where {want.get('size')} were written"
        if verify and want.get("sha256") and sha256(path, progress) != want["sha256"]:
            return name, "its bytes changed: it does not hash to the sha256 recorded when it was written"
        if verify and not want.get("sha256") and want.get("blob_id") and git_blob_id(path) != want["blob_id"]:
            return name, "its bytes changed: it does not hash to its git blob id"
    return None
