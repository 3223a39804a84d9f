"""`openclaw bench`: prefill and decode speed of a model, as llama-bench and `vllm bench` report it, registered by
cli.py. Talks to the user (a rich table on stdout, progress on stderr; --json for scripts); the measuring is
openclaw/eval/speed.py's. Options shared with run / chat / serve keep their names and defaults.
"""

import gc
import json
import platform
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from openclaw.cli_eval import _csv, eviction_config
from openclaw.cli_options import (
    DEFAULT_CACHE,
    CacheDir,
    Device,
    Dtype,
    KvTokens,
    Model,
    ModelArg,
    Quantize,
    Threads,
    Verify,
    Vram,
    model_spec,
)
from openclaw.config import BenchConfig, EngineConfig, EvictionConfig
from openclaw.errors import OpenClawError
from openclaw.weights.hub import check_spec

err = Console(stderr=True, highlight=False)
out = Console(highlight=False, soft_wrap=True)
_E, _V, _B = EngineConfig(), EvictionConfig(), BenchConfig()


def _ints(values: str | None) -> list[int]:
    return [] if values is None else _csv(values, int)


def bench(
    model_arg: ModelArg = None, model: Model = None,
    random_weights: Annotated[bool, typer.Option(
        help="Random weights of a manifest model's real shapes in its format's layout: nothing is downloaded (speed "
             "does not depend on the values).")] = _B.random_weights,
    prompt_lengths: Annotated[str | None, typer.Option(
        help="Prefill: prompt lengths, comma-separated (default: 2048 on a CPU; 512,4096 on a GPU).")] = None,
    contexts: Annotated[str | None, typer.Option(
        help="Decode: tokens each sequence holds, comma-separated (default: 128 on a CPU; 128,4096 on a GPU).")] = None,
    batch_sizes: Annotated[str | None, typer.Option(
        help="Decode: sequences at once, comma-separated (default: 1,8 on a CPU; 1,2,4,8,16 on a GPU).")] = None,
    steps: Annotated[int, typer.Option(help="Timed decode steps per figure.")] = _B.steps,
    reps: Annotated[int, typer.Option(help="Best of this many runs (after a warm-up run).")] = _B.reps,
    json_path: Annotated[Path | None, typer.Option("--json", help="Also write the results as JSON here.")] = None,
    device: Device = _E.device, dtype: Dtype = _E.dtype, kv_tokens: KvTokens = _E.kv_tokens,
    max_seqs: Annotated[int | None, typer.Option(help="Sequences decoded together at most (default: the largest "
                                                      "batch size).")] = None,
    threads: Threads = _E.threads, cache_dir: CacheDir = DEFAULT_CACHE, vram: Vram = None,
    quantize: Quantize = _E.quantize, verify: Verify = _E.verify,
    evict: Annotated[str, typer.Option(
        help="KV eviction: auto, full, streaming, snapkv, rkv, h2o, triattention; comma-separated to compare several.")]
    = _V.policy,
    kv_budget: Annotated[int | None, typer.Option(help="KV entries kept per sequence when evicting (default: what the "
                                                    "pool gives each sequence).")] = _V.budget,
    stats: Annotated[str | None, typer.Option("--stats", help="TriAttention stats file or auto.")] = None,
    protect_recent: Annotated[int, typer.Option(help="Most recent tokens never evicted.")] = _V.protect_recent,
    pin_prompt: Annotated[bool, typer.Option("--pin-prompt/--no-pin-prompt", help="Never evict prompt tokens.")]
    = _V.pin_prompt,
):
    """Prefill and decode tokens/s (batch sizes, contexts, eviction settings) and peak GPU memory."""
    spec = model_spec(model_arg, model)
    if not random_weights:
        check_spec(spec)  # an unknown name is refused before torch's import
    import torch

    from openclaw.engine.engine import Engine, pick_device
    from openclaw.eval import speed
    from openclaw.weights.hub import load_quantize, manifest_entry, resolve_model
    from openclaw.weights.synthetic import loaded_format, synthetic_dir

    dev = pick_device(device)
    cfg = BenchConfig(_ints(prompt_lengths), _ints(contexts), _ints(batch_sizes), steps, reps,
                      random_weights).for_device(dev.type == "cuda")
    policies = [eviction_config(p, kv_budget, stats, protect_recent, pin_prompt) for p in _csv(evict)]
    base = EngineConfig(model=spec, device=device, dtype=dtype, kv_tokens=kv_tokens, vram=vram, quantize=quantize,
                        max_seqs=max_seqs or max(cfg.batch_sizes), threads=threads, cache_dir=cache_dir,
                        verify=verify)
    quantize = load_quantize(spec, base.quantize, dev.type == "cuda")
    base = replace(base, quantize=quantize)
    if random_weights:
        entry = manifest_entry(spec)
        if entry is None:
            raise OpenClawError(f"--random-weights takes a manifest model's name (`openclaw models`), not {spec!r}")
        fmt = loaded_format(entry.format, quantize)  # as the real checkpoint would load here (GGUF dequantized on a CPU)
        model_dir = synthetic_dir(base.cache_dir, f"{entry.name}-{fmt.replace('>', '')}", entry.raw_config, fmt)
        name = f"{entry.name} (random weights, {fmt})"
    else:
        model_dir = resolve_model(spec, base.cache_dir, quantized=quantize == "nf4", verify=base.verify)
        name = model_dir.name
    result = {"model": name, "date": time.strftime("%Y-%m-%d %H:%M"), "host": platform.node(),
              "torch": torch.__version__, "config": asdict(cfg), "runs": []}
    for ev in policies:
        t0 = time.perf_counter()
        engine = Engine(model_dir, replace(base, evict=ev))
        load_s = time.perf_counter() - t0
        card = torch.cuda.get_device_name(engine.device) if engine.device.type == "cuda" else platform.processor()
        result["device"] = f"{engine.device} ({card or platform.machine()}), {torch.get_num_threads()} threads"
        concrete = engine.evict  # auto and an unset budget made concrete for the pool
        label = ev.policy if not concrete.evicts else f"{ev.policy}@{concrete.budget}"
        err.print(f"[dim]{label}: loaded {name} on {engine.device} ({engine.dtype}) in {load_s:.1f}s; KV pool "
                  f"{engine.pool.num_slots} tokens[/dim]")
        with err.status("") as status:
            rows = speed.run(engine, cfg.prompt_lengths, cfg.contexts, cfg.batch_sizes, cfg.steps, cfg.reps,
                             progress=lambda what, label=label: status.update(f"[dim]{label}: {what}[/dim]"))
        run = {"evict": label, "dtype": str(engine.dtype).removeprefix("torch."), "load_s": load_s,
               "kv_tokens": engine.pool.num_slots, "rows": [asdict(r) for r in rows]}
        if engine.plan is not None:
            run["vram_cap_gib"] = engine.plan.cap / 2 ** 30
        if engine.runner.graphs is not None:
            run["graphs"] = len(engine.runner.graphs.steps)
        result["runs"].append(run)
        del engine
        gc.collect()
        if dev.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.set_per_process_memory_fraction(1.0)  # the next engine plans and caps again
    _print(result)
    if json_path is not None:
        json_path.write_text(json.dumps(result, indent=1))
        err.print(f"[dim]wrote {json_path}[/dim]")


def _print(result: dict) -> None:
    """One row per figure; columns that are empty in every row (peak memory on a CPU, evictions without eviction,
    notes) are left out."""
    rows = [(run["evict"], r) for run in result["runs"] for r in run["rows"]]
    cells = {"evict": [e for e, _ in rows], "test": [r["test"] for _, r in rows],
             "batch": [str(r["batch"]) for _, r in rows], "context": [str(r["context"]) for _, r in rows],
             "tok/s": ["-" if r["tok_s"] is None else f"{r['tok_s']:.1f}" for _, r in rows],
             "ms/step": ["" if r["ms_per_step"] is None else f"{r['ms_per_step']:.2f}" for _, r in rows],
             "peak GiB": ["" if r["peak_gib"] is None else f"{r['peak_gib']:.2f}" for _, r in rows],
             "evictions": [str(r["evictions"]) if r["evictions"] else "" for _, r in rows],
             "note": [r["note"] for _, r in rows]}
    cells = {k: v for k, v in cells.items() if any(v)}
    table = Table(title=f"{result['model']} on {result.get('device', '?')}", title_justify="left")
    for col in cells:
        table.add_column(col, justify="left" if col in ("evict", "test", "note") else "right",
                         no_wrap=col != "note")
    for i in range(len(rows)):
        table.add_row(*(v[i] for v in cells.values()))
    out.print(table)
