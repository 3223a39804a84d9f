"""`openclaw pull`: a manifest model's files from the Hugging Face Hub into cache_dir/hub/<repo>.

huggingface_hub lists the files at one commit (model_info) and streams them (http_get, which also resumes
within a run after a dropped connection). This file picks the files, checks the disk first, resumes partial
files across runs (NAME.part, by HTTP Range), and verifies every file's size and hash (the manifest's values
where it lists them, else the hub's LFS sha256 or git blob id) before moving it in place. config.json lands
last, so a directory that has one is complete. It does not load or convert anything.
"""

import errno
import hashlib
import io
import json
import os
import shutil
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from fnmatch import fnmatch
from pathlib import Path

from openclaw.errors import OpenClawError
from openclaw.weights.hub import ManifestEntry, hub_dir
from openclaw.weights.integrity import MARKER

Progress = Callable[[str, int, int], None]  # (what, done, total)
PATTERNS = ("*.json", "*.safetensors", "*.jinja", "*.gguf")  # weights, config, tokenizer, template
DISK_MARGIN = 256 * 2**20
_CHUNK = 1 << 20


@dataclass(frozen=True)
class RemoteFile:
    name: str
    size: int
    sha256: str | None  # LFS files (weights): the content's sha256
    blob_id: str | None  # small files kept in git: the git blob sha1


def remote_files(entry: ManifestEntry, endpoint: str | None = None) -> tuple[str, list[RemoteFile]]:
    """(commit, files to fetch) of the entry's repo at its revision; manifest-listed files when it lists them."""
    from huggingface_hub import HfApi

    with _hub_errors(entry, endpoint):
        info = HfApi(endpoint=endpoint).model_info(entry.hub_repo, revision=entry.source.get("revision"),
                                                   files_metadata=True, timeout=30)
    listed = entry.source.get("files")
    files = []
    for s in info.siblings or []:
        wanted = s.rfilename in listed if listed else "/" not in s.rfilename and any(
            fnmatch(s.rfilename, p) for p in PATTERNS)
        if wanted:
            files.append(RemoteFile(s.rfilename, s.lfs.size if s.lfs else s.size, s.lfs.sha256 if s.lfs else None,
                                    s.blob_id))
    for f in files:  # the manifest pins what we expect: a repo that changed under it is refused
        want = (listed or {}).get(f.name, {})
        for key, got in (("size", f.size), ("sha256", f.sha256)):
            if want.get(key) is not None and want[key] != got:
                raise OpenClawError(f"{entry.hub_repo}/{f.name} on the hub has {key} {got}, but the manifest expects "
                                    f"{want[key]}: the repo changed; nothing was downloaded")
    missing = sorted(set(listed or ()) - {f.name for f in files})
    if missing or not any(f.name == "config.json" for f in files):
        raise OpenClawError(f"{entry.hub_repo} at {info.sha} lacks {', '.join(missing) or 'config.json'}; "
                            "is the manifest entry right?")
    return info.sha, sorted(files, key=lambda f: f.name == "config.json")  # config.json last: it marks "complete"


def pull(entry: ManifestEntry, cache_dir: Path, progress: Progress | None = None,
         endpoint: str | None = None) -> Path:
    """Download (or finish downloading) a hub entry; returns its model directory."""
    if not entry.hub_repo:
        raise ValueError(f"{entry.name} is not a hub model")
    target = hub_dir(Path(cache_dir).expanduser(), entry.hub_repo)
    commit, files = remote_files(entry, endpoint)
    target.mkdir(parents=True, exist_ok=True)
    verified = _read_marker(target, commit)
    todo = [f for f in files if not _is_done(target, f, verified)]
    need = sum(f.size - _part_size(target, f) for f in todo)
    free = shutil.disk_usage(target).free
    if need + DISK_MARGIN > free:
        raise OpenClawError(f"{entry.name} needs {need / 1e9:.1f} GB more but {target} has {free / 1e9:.1f} GB free; "
                            "free some space or pull into a bigger disk with --cache-dir")
    for f in todo:
        _fetch(entry.hub_repo, commit, f, target, progress, endpoint, entry)
        verified[f.name] = {"size": f.size, "sha256": f.sha256, "blob_id": f.blob_id}
        _write_marker(target, commit, verified)
    return target


def _fetch(repo: str, commit: str, f: RemoteFile, target: Path, progress: Progress | None, endpoint: str | None,
           entry: ManifestEntry) -> None:
    from huggingface_hub import hf_hub_url
    from huggingface_hub.file_download import http_get
    from huggingface_hub.utils import build_hf_headers

    final, part = target / f.name, target / f"{f.name}.part"
    final.parent.mkdir(parents=True, exist_ok=True)
    done = _part_size(target, f)
    if done > f.size:
        part.unlink()
        done = 0
    what = f"downloading {f.name}"
    if progress:
        progress(what, done, f.size)
    if done < f.size:
        with _hub_errors(entry, endpoint), part.open("ab") as out:
            http_get(hf_hub_url(repo, f.name, revision=commit, endpoint=endpoint), out, resume_size=done,
                     headers=build_hf_headers(), expected_size=f.size, tqdm_class=_bar_class(progress, what))
    _verify(part, f, progress)
    os.replace(part, final)


def _verify(path: Path, f: RemoteFile, progress: Progress | None) -> None:
    size = path.stat().st_size
    if size != f.size:
        path.unlink()
        raise OpenClawError(f"{f.name}: got {size} bytes, expected {f.size}; the partial file was deleted, run "
                            "`openclaw pull` again")
    if f.sha256:
        digest, expected, kind = hashlib.sha256(), f.sha256, "sha256"
    elif f.blob_id:
        digest, expected, kind = hashlib.sha1(f"blob {size}\0".encode()), f.blob_id, "git blob id"
    else:
        return
    with path.open("rb") as fh:
        done = 0
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
            done += len(chunk)
            if progress:
                progress(f"verifying {f.name}", done, size)
    if digest.hexdigest() != expected:
        path.unlink()
        raise OpenClawError(f"{f.name}: {kind} {digest.hexdigest()} does not match the expected {expected}; the file "
                            "was deleted, run `openclaw pull` again (if it persists, the server sends wrong data)")


def _part_size(target: Path, f: RemoteFile) -> int:
    part = target / f"{f.name}.part"
    return part.stat().st_size if part.is_file() else 0


def _is_done(target: Path, f: RemoteFile, verified: dict) -> bool:
    final = target / f.name
    record = verified.get(f.name)
    return (final.is_file() and final.stat().st_size == f.size and record is not None
            and record == {"size": f.size, "sha256": f.sha256, "blob_id": f.blob_id})


def _read_marker(target: Path, commit: str) -> dict:
    try:
        data = json.loads((target / MARKER).read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    return data.get("files", {}) if data.get("commit") == commit else {}


def _write_marker(target: Path, commit: str, verified: dict) -> None:
    tmp = target / f"{MARKER}.tmp"
    tmp.write_text(json.dumps({"commit": commit, "files": verified}, indent=1))
    os.replace(tmp, target / MARKER)


def _bar_class(progress: Progress | None, what: str):
    """A silent tqdm for http_get that reports bytes to our progress callback (the CLI draws the bar)."""
    from tqdm import tqdm

    class Bar(tqdm):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **{**kwargs, "disable": False, "file": io.StringIO()})

        def update(self, n=1):
            super().update(n)
            if progress:
                progress(what, self.n, self.total or 0)

    return Bar


@contextmanager
def _hub_errors(entry: ManifestEntry, endpoint: str | None):
    """Turns what huggingface_hub raises into one-line OpenClawErrors that say what to do."""
    from huggingface_hub import constants, errors

    repo, where = entry.hub_repo, endpoint or constants.ENDPOINT
    try:
        yield
    except errors.OfflineModeIsEnabled:
        raise OpenClawError(f"cannot download {entry.name}: HF_HUB_OFFLINE is set; unset it to download") from None
    except errors.GatedRepoError:
        raise OpenClawError(f"{repo} is gated: accept its license on the hub, then log in (`hf auth login` or "
                            "HF_TOKEN)") from None
    except (errors.RepositoryNotFoundError, errors.RevisionNotFoundError):
        raise OpenClawError(f"{repo} (revision {entry.source.get('revision')}) was not found on {where}: is the "
                            "manifest entry right, or the repo private (log in with `hf auth login`)?") from None
    except errors.HfHubHTTPError as e:
        raise OpenClawError(f"the hub at {where} answered {e.response.status_code} for {repo}; retry later (files "
                            "already downloaded are kept)") from None
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise OpenClawError(f"the disk filled up while downloading {entry.name}; free space and run "
                                "`openclaw pull` again: it resumes") from None
        raise OpenClawError(f"the download of {entry.name} broke off ({e}); `openclaw pull` again resumes it") from None
    except errors.HTTPError as e:  # connection refused, DNS, timeouts
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise OpenClawError(f"cannot reach the Hugging Face Hub at {where} ({first}): check the network (or "
                            "HF_ENDPOINT for a mirror); what was downloaded is kept and `openclaw pull` resumes "
                            "it") from None
