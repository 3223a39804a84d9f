"""`openclaw calibrate` and `openclaw eval fidelity|needle`: the TriAttention commands, registered by cli.py.

Like cli.py this talks to the user (rich, stderr for progress); the work is in openclaw/evict/calibrate.py and
openclaw/eval/ (fidelity.py, needle.py).
"""

import json
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn, TimeRemainingColumn
from rich.table import Table
from rich.text import Text

from openclaw.cli_options import (
    DEFAULT_CACHE,
    CacheDir,
    Device,
    Dtype,
    Model,
    ModelArg,
    Quantize,
    Verify,
    Vram,
    model_spec,
)
from openclaw.config import EngineConfig, EvictionConfig
from openclaw.errors import OpenClawError
from openclaw.weights.hub import check_spec

eval_app = typer.Typer(no_args_is_help=True, help="Measure eviction quality against full attention.")
err = Console(stderr=True, highlight=False)
out = Console(highlight=False, soft_wrap=True)
_E, _V = EngineConfig(), EvictionConfig()
Stats = Annotated[str | None, typer.Option(help="TriAttention stats file (openclaw calibrate), or auto.")]
Protect = Annotated[int, typer.Option(help="Most recent tokens never evicted.")]
CALIBRATION_CONTEXT = 4096  # tokens per independent calibration context (the KV pool calibrate allocates)
JsonOut = Annotated[Path | None, typer.Option("--json", help="Also write the rows as JSON here.")]



def _load(model: str, device: str, dtype: str, cache_dir: Path, vram: float | None, quantize: str, kv_tokens: int,
          verify: bool = _E.verify):
    """(model, tokenizer, name), loaded as the engine loads it: under the VRAM plan for kv_tokens on a GPU."""
    check_spec(model)  # an unknown name is refused before torch's import
    import torch

    from openclaw.engine.engine import pick_device, plan_and_load, resolve_dtype
    from openclaw.tokenizer import Tokenizer
    from openclaw.weights.hub import load_quantize, resolve_model

    config = EngineConfig(model=model, device=device, dtype=dtype, cache_dir=cache_dir, vram=vram, quantize=quantize,
                          kv_tokens=kv_tokens, verify=verify)  # validates the options as run, chat and serve do
    dev = pick_device(config.device)
    quantize = load_quantize(model, config.quantize, dev.type == "cuda")
    model_dir = resolve_model(model, config.cache_dir, quantized=quantize == "nf4", verify=config.verify)
    torch.manual_seed(0)
    m, _ = plan_and_load(model_dir, dev, resolve_dtype(config.dtype, dev), quantize, vram, kv_tokens=kv_tokens)
    return m, Tokenizer.from_dir(model_dir), model_dir.name


def _llm(model: str, device: str, dtype: str, cache_dir: Path, vram: float | None, quantize: str, kv_tokens: int,
         verify: bool = _E.verify):
    """An LLM with full attention and a pool of kv_tokens, for generating traces (openclaw.eval.traces)."""
    from openclaw.llm import LLM

    return LLM(EngineConfig(model=model, device=device, dtype=dtype, cache_dir=cache_dir, vram=vram,
                            quantize=quantize, kv_tokens=kv_tokens, evict=EvictionConfig(policy="full"), verify=verify))


def _text_ids(tokenizer, paths: list[Path]) -> list[int]:
    ids = []
    for p in paths:
        try:
            ids += tokenizer.encode(p.read_text(encoding="utf-8"))
        except (FileNotFoundError, IsADirectoryError, UnicodeDecodeError) as e:
            raise OpenClawError(f"text file {p} is unreadable ({e})")
    return ids


def _stats(stats: str | None, model):
    from openclaw.evict.stats_file import load_stats, model_metadata

    if stats is None or stats == "auto":
        return None
    return load_stats(Path(stats), model_metadata(model, ""), model.bands.omega)


def _warm(model, name: str, cache_dir: Path):
    """The online statistics the engine would warm-start from (the cache's, for this model), or None."""
    from openclaw.evict.query_stats import load_sums, running_path
    from openclaw.evict.stats_file import model_metadata

    return load_sums(running_path(cache_dir, name), model_metadata(model, name))


def _csv(values: str, kind=str) -> list:
    try:
        return [kind(v.strip()) for v in values.split(",") if v.strip()]
    except ValueError:
        raise OpenClawError(f"{values!r} is not a comma-separated list of {kind.__name__}")


Generate = Annotated[int | None, typer.Option(help="Generate this many tokens per prompt with full attention and use "
                                                   "those traces (the model's own output).")]
Prompts = Annotated[Path | None, typer.Option(help="Prompts for --generate, one per line (default: built-in "
                                                   "reasoning prompts).")]


def _traces(model: str, device: str, dtype: str, cache_dir: Path, vram, quantize, texts: list[str], tokens: int,
            verify: bool = _E.verify):
    """(llm, traces): one trace of `tokens` generated tokens per prompt text, with full attention."""
    from openclaw.eval.traces import generate_traces

    llm = _llm(model, device, dtype, cache_dir, vram, quantize, len(texts) * (tokens + 1024), verify)
    with err.status(f"generating {len(texts)} traces of {tokens} tokens"):
        traces = generate_traces(llm, texts, tokens)
    return llm, traces


def calibrate(
    model_arg: ModelArg = None,
    text: Annotated[list[Path] | None, typer.Option(help="Calibration text file(s); repeat the option.")] = None,
    generate: Annotated[int | None, typer.Option(help="Calibrate on the model's own generations: this many tokens "
                                                      "in all, spread over the prompts.")] = None,
    prompts: Prompts = None,
    out_path: Annotated[Path | None, typer.Option("--out", help="Write a stats file here (reference format) instead "
                                                               "of adding to the model's online statistics in the "
                                                               "cache (what --evict auto warm-starts from).")] = None,
    tokens: Annotated[int, typer.Option(help="Calibration tokens of --text at most (about 32K is enough).")] = 32768,
    model: Model = None, dtype: Dtype = _E.dtype, device: Device = _E.device, cache_dir: CacheDir = DEFAULT_CACHE,
    vram: Vram = _E.vram,
    quantize: Quantize = _E.quantize, verify: Verify = _E.verify,
):
    """Capture pre-RoPE query statistics of MODEL over TEXT or its own generations, for TriAttention."""
    import math

    from openclaw.eval.traces import read_prompts
    from openclaw.evict.calibrate import calibrate as run_calibration
    from openclaw.evict.calibrate import concentration
    from openclaw.evict.query_stats import QueryStats, load_sums, running_path, save_sums
    from openclaw.evict.stats_file import model_metadata, save_stats

    if bool(text) == (generate is not None):
        raise OpenClawError("give --text FILE (repeatable) or --generate N, one of them")
    if generate is not None and generate < 1:
        raise OpenClawError(f"--generate {generate} must be >= 1")
    spec = model_spec(model_arg, model)
    t0 = time.perf_counter()
    if generate is not None:
        texts = read_prompts(prompts)
        llm, traces = _traces(spec, device, dtype, cache_dir, vram, quantize, texts,
                              math.ceil(generate / len(texts)), verify)
        model, name = llm.engine.model, llm.model_dir.name
    else:
        model, tokenizer, name = _load(spec, device, dtype, cache_dir, vram, quantize, CALIBRATION_CONTEXT,
                                       verify)
        traces = [_text_ids(tokenizer, text)[:tokens]]
        if len(traces[0]) < 1024:
            raise OpenClawError(f"the calibration text has {len(traces[0])} tokens; give at least 1024 (about 32K is "
                                "best)")
    mc = model.config
    qs = QueryStats(mc.num_hidden_layers, mc.num_attention_heads, model.bands.width, blocks=model.bands.blocks)
    total, before = sum(map(len, traces)), 0
    with token_progress("calibrating") as progress:
        for ids in traces:
            qs.merge(run_calibration(model, ids, CALIBRATION_CONTEXT,
                                     progress=lambda what, done, _, b=before: progress(what, b + done, total)))
            before += len(ids)
    meta = model_metadata(model, name)
    if out_path is not None:
        save_stats(out_path, qs.tri_stats(model.bands.omega), meta, qs.tokens)
        where = str(out_path)
    else:
        path = running_path(cache_dir, name)
        if (before := load_sums(path, meta)) is not None:
            qs.merge(before)
        save_sums(path, qs, meta)
        where = f"{path} (online statistics, {qs.tokens:,} tokens in all)"
    report = concentration(qs.tri_stats(model.bands.omega))
    table = Table("layer", "mean R", "heads with dominant-band R > 0.95")
    for layer, (r, share) in enumerate(zip(report.mean_r, report.share_concentrated)):
        table.add_row(str(layer), f"{r:.3f}", f"{share:.0%}")
    out.print(table)
    err.print(f"[dim]{sum(map(len, traces)):,} tokens in {time.perf_counter() - t0:.0f}s; "
              f"{report.overall_share:.0%} of heads concentrated; wrote {where}[/dim]", soft_wrap=True)


POLICY_LIST = "full,streaming,snapkv,rkv,h2o,triattention,auto"
# the evals compare policies at budgets down to 128: the serving default window (128 recent tokens) would leave them
# nothing to choose (docs/triattention.md)
EVAL_PROTECT_RECENT = 8


@eval_app.command()
def fidelity(
    text: Annotated[Path | None, typer.Option(help="Long evaluation text (disjoint from the calibration text).")] = None,
    generate: Generate = None, prompts: Prompts = None, model: Model = None,
    budgets: Annotated[str, typer.Option(help="Comma-separated KV budgets.")] = "128,256,512",
    policies: Annotated[str, typer.Option(help="Comma-separated policies (auto: as run/chat/serve ship it, "
                                               "warm-started from the cache's statistics).")] = POLICY_LIST,
    stats: Stats = None, windows: Annotated[int, typer.Option(help="Windows of the text.")] = 8,
    window_len: Annotated[int, typer.Option(help="Tokens per window.")] = 2048,
    score_from: Annotated[int | None, typer.Option(help="First scored position (default: largest budget + "
                                                         "divide_length, where every budget has evicted).")] = None,
    protect_recent: Protect = EVAL_PROTECT_RECENT,
    ablations: Annotated[bool, typer.Option(help="Add TriAttention's ablations: trig-only, norm-only, union and "
                                                 "per-layer selection, disable_mlr.")] = False,
    online: Annotated[bool, typer.Option(help="Add TriAttention with cold online statistics.")] = False,
    json_out: JsonOut = None, dtype: Dtype = _E.dtype, device: Device = _E.device,
    cache_dir: CacheDir = DEFAULT_CACHE, vram: Vram = _E.vram, quantize: Quantize = _E.quantize,
    verify: Verify = _E.verify,
):
    """Chunked teacher forcing of TEXT (or of the model's own traces) against full attention: KL, top-1 agreement,
    perplexity per policy/budget; with --generate also how long greedy decoding stays identical to full attention."""
    from openclaw.eval.fidelity import evaluate, standard_runs, text_windows
    from openclaw.eval.traces import greedy_agreement, read_prompts, trace_prompt

    model = model_spec(None, model)
    budget_list, policy_list = _csv(budgets, int), _csv(policies)
    if (text is None) == (generate is None):
        raise OpenClawError("give --text FILE or --generate N (the model's own traces), one of them")
    if generate is not None and generate < 1:
        raise OpenClawError(f"--generate {generate} must be >= 1")
    base = EvictionConfig(policy="full", budget=min(budget_list), protect_recent=protect_recent, pin_prompt=False,
                          stats=stats)
    runs = standard_runs(policy_list, budget_list, base, ablations, online)
    start = score_from if score_from is not None else max(budget_list) + base.divide_length
    if text is not None:
        # the runs advance in lockstep, each on its own pool of window_len slots
        m, tokenizer, name = _load(model, device, dtype, cache_dir, vram, quantize, window_len * (len(runs) + 1),
                                   verify)
        try:
            wins = text_windows(_text_ids(tokenizer, [text]), windows, window_len)
        except ValueError as e:
            raise OpenClawError(str(e))
    else:
        texts = read_prompts(prompts)
        llm, wins = _traces(model, device, dtype, cache_dir, vram, quantize, texts, generate, verify)
        m, name = llm.engine.model, llm.model_dir.name
    shortest = min(len(w) for w in wins)
    if start >= shortest - 1:
        raise OpenClawError(f"scoring from position {start} leaves nothing to score in {shortest}-token windows; "
                            "use longer windows (--window-len, --generate) or a smaller --score-from")
    tri, warm = _stats(stats, m), _warm(m, name, cache_dir)
    t0 = time.perf_counter()
    with token_progress("full attention") as progress:
        rows = evaluate(m, wins, runs, tri, start=start, progress=progress, online=warm)
    agree = {}
    with err.status("") as status:
        if generate is not None:
            evicting = [(label, cfg) for label, cfg in runs if cfg.evicts]
            for i, prompt in enumerate(texts):
                status.update(f"greedy decoding: prompt {i + 1}/{len(texts)}")
                for label, n in greedy_agreement(m, trace_prompt(llm, prompt), generate, evicting, tri, warm).items():
                    agree[label] = agree.get(label, 0) + n / len(texts)
    columns = ["setting", "KL(full||ev)", "top-1", "ppl", "ppl full", "evictions"] + (["greedy agree"] if agree else [])
    table = Table(*columns)
    for r in rows:
        table.add_row(r.label, f"{r.kl:.4f}", f"{r.top1:.3f}", f"{r.ppl:.2f}", f"{r.ppl_full:.2f}", str(r.evictions),
                      *([f"{agree.get(r.label, generate):.0f}"] if agree else []))
    out.print(table)
    err.print(f"[dim]{len(wins)} windows of {shortest}+ tokens, scored from position {start} ({rows[0].tokens} tokens "
              f"per row); {time.perf_counter() - t0:.0f}s[/dim]")
    if json_out:
        meta = {"text": str(text) if text else None, "generate": generate, "prompts": str(prompts) if prompts else None,
                "windows": len(wins), "window_len": shortest, "score_from": start, "protect_recent": protect_recent,
                "stats": stats, "warm_tokens": warm.tokens if warm else 0, "dtype": dtype, "model": model}
        json_out.write_text(json.dumps({"meta": meta, "rows": [r.as_dict() | ({"greedy_agree": agree.get(r.label)}
                                                                              if agree else {}) for r in rows]},
                                       indent=1))


@eval_app.command()
def needle(
    filler: Annotated[Path, typer.Option(help="Filler text for the haystacks.")],
    model: Model = None,
    budgets: Annotated[str, typer.Option(help="Comma-separated KV budgets.")] = "256,512",
    policies: Annotated[str, typer.Option(help="Comma-separated policies.")] = POLICY_LIST,
    stats: Stats = None, cases: Annotated[int, typer.Option(help="Haystacks (names, codes, filler offsets).")] = 8,
    dormancy: Annotated[int, typer.Option(help="Filler tokens between the needle and the question.")] = 1024,
    protect_recent: Protect = EVAL_PROTECT_RECENT, json_out: JsonOut = None, dtype: Dtype = _E.dtype,
    device: Device = _E.device, cache_dir: CacheDir = DEFAULT_CACHE, vram: Vram = _E.vram,
    quantize: Quantize = _E.quantize, verify: Verify = _E.verify,
):
    """Plant a fact early, ask for it DORMANCY tokens later: exact match and answer log-prob, with controls."""
    from openclaw.eval.fidelity import standard_runs
    from openclaw.eval.needle import build_cases, run_needles

    model = model_spec(None, model)
    budget_list, policy_list = _csv(budgets, int), _csv(policies)
    base = EvictionConfig(policy="full", budget=min(budget_list), protect_recent=protect_recent, pin_prompt=False,
                          stats=stats)
    runs = standard_runs(policy_list, budget_list, base)
    m, tokenizer, name = _load(model, device, dtype, cache_dir, vram, quantize, dormancy + 1024, verify)
    case_list = build_cases(tokenizer, _text_ids(tokenizer, [filler]), cases, dormancy=dormancy)
    t0 = time.perf_counter()
    with token_progress("no-needle control") as progress:
        rows = run_needles(m, case_list, runs, _stats(stats, m), progress=progress, online=_warm(m, name, cache_dir))
    table = Table("setting", "exact", "log p(answer)", "wrong name: exact", "wrong name: log p", "no needle: log p")
    for r in rows:
        table.add_row(r["label"], f"{r['exact']:.2f}", f"{r['logp']:.2f}", f"{r['wrong_name_exact']:.2f}",
                      f"{r['wrong_name_logp']:.2f}", f"{r['no_needle_logp']:.2f}")
    out.print(table)
    err.print(f"[dim]{len(case_list)} cases, ~{rows[0]['context_tokens']} context tokens, needle at token ~64; "
              f"{time.perf_counter() - t0:.0f}s[/dim]")
    if json_out:
        json_out.write_text(json.dumps({"meta": {"filler": str(filler), "dormancy": dormancy, "cases": cases,
                                                 "protect_recent": protect_recent, "stats": stats, "dtype": dtype},
                                        "rows": rows}, indent=1))


def eviction_config(evict: str, kv_budget: int, stats: str | None, protect_recent: int, pin_prompt: bool):
    """The EvictionConfig behind run/chat's --evict flags (validated there, so a bad value is one clear line)."""
    return replace(_V, policy=evict, budget=kv_budget, stats=stats, protect_recent=protect_recent,
                   pin_prompt=pin_prompt)


class _TokenRate(ProgressColumn):
    def render(self, task) -> Text:
        return Text(f"{task.speed:,.0f} tok/s" if task.speed else "", style="progress.data.speed")


@contextmanager
def token_progress(what: str) -> Iterator[Callable[[str, int, int], None]]:
    """A progress bar on stderr for a long pass over text: tokens done of all, tokens/s and the time left. Yields the
    progress(what, tokens done, tokens) callback the harnesses call."""
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("tokens"), _TokenRate(),
               TimeRemainingColumn())
    with Progress(*columns, console=err, transient=True) as bar:
        task = bar.add_task(what, total=None)
        yield lambda text, done, total: bar.update(task, description=text, completed=done, total=total)
