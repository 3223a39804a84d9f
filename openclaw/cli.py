"""The `openclaw` command: run, chat, serve, plan (pull/models: cli_hub.py; calibrate/eval: cli_eval.py; bench:
cli_bench.py).
With chat.py and the server, the only modules that talk to the user (through rich).

Generated text goes to stdout, everything else (progress, stats, errors) to stderr. An OpenClawError becomes
one red line and exit code 2.
"""

import logging
import os
import sys
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from openclaw.cli_bench import bench
from openclaw.cli_eval import calibrate, eval_app, eviction_config
from openclaw.cli_hub import models, pull
from openclaw.cli_options import (
    _E,
    DEFAULT_CACHE,
    CacheDir,
    Device,
    Dtype,
    KvTokens,
    MaxSeqs,
    Model,
    ModelArg,
    Quantize,
    Threads,
    Verify,
    Vram,
    model_spec,
)
from openclaw.config import EngineConfig, EvictionConfig, SamplingParams, ServerConfig
from openclaw.errors import OpenClawError
from openclaw.weights.hub import check_spec

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="OpenClaw: long-reasoning LLM inference on one GPU (or a CPU).")
err = Console(stderr=True, highlight=False)
out = Console(highlight=False, soft_wrap=True)

_S = SamplingParams()
MaxTokens = Annotated[int, typer.Option(help="Tokens to generate at most.")]
Temperature = Annotated[float | None, typer.Option(help="0 = greedy. Default: the model's generation_config.")]
TopP = Annotated[float | None, typer.Option(help="Nucleus sampling mass.")]
TopK = Annotated[int | None, typer.Option(help="Keep the k most likely tokens (0 = off).")]
MinP = Annotated[float | None, typer.Option(help="Drop tokens below min_p x the top probability.")]
RepPenalty = Annotated[float | None, typer.Option("--repetition-penalty", help="1 = off.")]
Seed = Annotated[int | None, typer.Option(help="Sampling seed (reproducible output).")]
System = Annotated[str | None, typer.Option(help="System message.")]
Think = Annotated[bool | None, typer.Option("--think/--no-think", help="Qwen3 thinking (default: the template's).")]
_V = EvictionConfig()
Evict = Annotated[str, typer.Option(help="KV eviction: auto (full attention while a sequence fits the KV pool, "
                                         "then TriAttention), full (never evict), streaming, snapkv, rkv, h2o, "
                                         "triattention.")]
KvBudget = Annotated[int | None, typer.Option(help="KV entries kept per sequence when evicting (it owns budget + 128; "
                                                   "default: the pool less 128).")]
EvictStats = Annotated[str | None, typer.Option("--stats", help="TriAttention stats file (openclaw calibrate --out); "
                                                                "default: online statistics, kept in the cache.")]
ProtectRecent = Annotated[int, typer.Option(help="Most recent tokens never evicted.")]
PinPrompt = Annotated[bool, typer.Option("--pin-prompt/--no-pin-prompt", help="Never evict prompt tokens.")]
app.add_typer(eval_app, name="eval")
app.command()(calibrate)
app.command()(pull)
app.command()(models)
app.command()(bench)
ThinkBudget = Annotated[int | None, typer.Option(min=1, help="Close the thinking after N tokens (injects </think>).")]
_SV = ServerConfig()


def _engine_config(model, device, dtype, kv_tokens, max_seqs, threads, cache_dir, vram=None,
                   quantize=_E.quantize, verify=_E.verify) -> EngineConfig:
    return EngineConfig(model=model, device=device, dtype=dtype, kv_tokens=kv_tokens, max_seqs=max_seqs,
                        threads=threads, cache_dir=cache_dir, vram=vram, quantize=quantize, verify=verify)


def _load(config: EngineConfig):
    check_spec(config.model)  # an unknown name is refused before torch's import (seconds on a busy machine)
    from openclaw.llm import LLM  # torch import deferred so `openclaw --help` and `models` stay instant

    with Progress(console=err, transient=True, disable=not err.is_terminal) as bar:  # piped: no stray blank line
        tasks: dict[str, int] = {}

        def progress(what: str, done: int, total: int) -> None:
            if what not in tasks:
                tasks[what] = bar.add_task(what, total=total)
            bar.update(tasks[what], completed=done, total=total)

        t0 = time.perf_counter()
        llm = LLM(config, progress=progress)
    err.print(f"[dim]loaded {llm.model_dir.name} on {llm.engine.device} ({llm.engine.dtype}) "
              f"in {time.perf_counter() - t0:.1f}s[/dim]")
    return llm


def _messages(system: str | None, user: str) -> list[dict]:
    return ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]


@app.command()
def run(
    args: Annotated[list[str] | None, typer.Argument(
        metavar="[MODEL] PROMPT", show_default=False,
        help="PROMPT: a text file with the user's message, or - to read it from stdin (echo 'a question' | openclaw "
             "run -). MODEL before it, as chat and serve take it.")] = None,
    model: Model = None, max_tokens: MaxTokens = _S.max_tokens, temperature: Temperature = None,
    top_p: TopP = None, top_k: TopK = None, min_p: MinP = None, repetition_penalty: RepPenalty = None,
    seed: Seed = None, system: System = None, think: Think = None, think_budget: ThinkBudget = None,
    raw: Annotated[bool, typer.Option("--raw", help="Continue PROMPT as plain text, without the chat template (what "
                                                    "a model without a template always does).")] = False,
    jsonl: Annotated[Path | None, typer.Option(help="Answer every prompt of this JSONL file in one batch.")] = None,
    out_path: Annotated[Path | None, typer.Option("--out", help="Where --jsonl writes its answers.")] = None,
    device: Device = _E.device, dtype: Dtype = _E.dtype, kv_tokens: KvTokens = _E.kv_tokens,
    max_seqs: MaxSeqs = _E.max_seqs, threads: Threads = _E.threads, cache_dir: CacheDir = DEFAULT_CACHE,
    evict: Evict = _V.policy, kv_budget: KvBudget = _V.budget, stats: EvictStats = None,
    protect_recent: ProtectRecent = _V.protect_recent, pin_prompt: PinPrompt = _V.pin_prompt, vram: Vram = None,
    quantize: Quantize = _E.quantize, verify: Verify = _E.verify,
):
    """Answer PROMPT (stdout: the answer only), or every line of --jsonl IN into --out OUT."""
    args = args or []
    if len(args) > 2:
        raise OpenClawError(f"run takes [MODEL] PROMPT, not {len(args)} arguments; quote a question and pipe it: "
                            "echo 'a question' | openclaw run -")
    params = SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p,
                            repetition_penalty=repetition_penalty, seed=seed, max_tokens=max_tokens)
    if jsonl is not None:
        if len(args) > 1:
            raise OpenClawError("--jsonl answers the prompts of its file: give no PROMPT beside it")
        spec = model_spec(args[0] if args else None, model)
        if out_path is None:
            raise OpenClawError("--jsonl needs --out FILE for the answers")
        if out_path.is_dir() or not out_path.parent.is_dir():  # found now, not after the whole batch has run
            raise OpenClawError(f"--out {out_path}: {'is a directory' if out_path.is_dir() else 'no such directory'}")
        if out_path.exists() and jsonl.exists() and out_path.samefile(jsonl):
            raise OpenClawError(f"--out {out_path} is the input file: the answers would overwrite the prompts; "
                                "choose another --out")
        from openclaw.batch import read_items

        items = read_items(jsonl)
    elif not args:
        raise OpenClawError("give a PROMPT file (or - for stdin), or --jsonl IN --out OUT")
    else:
        if out_path is not None:
            raise OpenClawError("--out is where --jsonl writes its answers; a single PROMPT's answer goes to stdout")
        spec = model_spec(args[0] if len(args) == 2 else None, model)
        text = read_prompt(args[-1])
    if raw:
        _plain_text_only(system, think, think_budget)
    config = _engine_config(spec, device, dtype, kv_tokens, max_seqs, threads, cache_dir, vram, quantize, verify)
    config.evict = eviction_config(evict, kv_budget, stats, protect_recent, pin_prompt)
    llm = _load(config)
    if jsonl is not None:
        try:
            return _run_jsonl(llm, items, params, system, think, think_budget, out_path)
        finally:
            llm.close()
    if raw or llm.tokenizer.chat_template is None:
        err.print(f"[dim]{'--raw' if raw else f'{llm.model_dir.name} has no chat template'}: the prompt is continued "
                  "as plain text[/dim]", soft_wrap=True)
        _plain_text_only(system, think, think_budget)
        request = llm.text_request(text, params)
    else:
        request = llm.chat_request(_messages(system, text), params, think, think_budget)
    t0 = time.perf_counter()
    first = None
    n = evictions = kv_len = 0
    reason, error, eviction = "?", None, None
    try:
        for d in llm.stream([request]):
            if first is None:
                first = time.perf_counter()
            if d.reasoning:  # thinking is not the answer: stderr, dimmed
                err.print(d.reasoning, style="dim", end="", markup=False, highlight=False)
            out.out(d.text, end="")
            sys.stdout.flush()
            n, reason, error = d.completion_tokens, d.finish_reason or reason, d.error or error
            evictions, kv_len, eviction = d.evictions, d.kv_len, d.eviction or eviction
    finally:
        llm.close()
    out.out("")
    if error:
        raise OpenClawError(error)
    end = time.perf_counter()
    if eviction:
        err.print(f"[dim]{eviction}[/dim]", soft_wrap=True)
    decode = f"; {(n - 1) / (end - first):.1f} tok/s decode" if first and n > 1 and end > first else ""
    kv = eviction_summary(config.evict, evictions, kv_len, len(request.prompt_ids) + n)
    err.print(f"[dim]{len(request.prompt_ids)} prompt tokens, {n} generated ({reason}); "
              f"first token {((first or end) - t0) * 1000:.0f} ms{decode}{kv}[/dim]", soft_wrap=True)


def _plain_text_only(system: str | None, think: bool | None, think_budget: int | None) -> None:
    if system or think is not None or think_budget is not None:
        raise OpenClawError("--system, --think and --think-budget need the chat template; leave them out with a "
                            "plain-text prompt")


def eviction_summary(evict: EvictionConfig, evictions: int, kv_len: int, tokens: int) -> str:
    """'; KV: ...' for a stats line: how many evictions ran and the KV entries kept of the sequence's tokens ('' with
    full attention, and with auto while it has not needed to evict)."""
    if not evict.evicts or (evict.policy == "auto" and not evictions):
        return ""
    budget = "" if evict.budget is None else f", budget {evict.budget}"
    ran = f"{evictions} eviction{'' if evictions == 1 else 's'} ({evict.policy})" if evictions else \
        f"no eviction needed ({evict.policy}{budget})"
    return f"; KV: {ran}, {kv_len} of {tokens} tokens kept"


def read_prompt(name: str) -> str:
    """The prompt text of PROMPT: a UTF-8 file, or stdin for -."""
    if name == "-":
        if sys.stdin.isatty():
            err.print("[dim]reading the prompt from stdin; end it with Ctrl-D[/dim]")
        try:
            text = sys.stdin.buffer.read().decode("utf-8")
        except UnicodeDecodeError as e:
            raise OpenClawError(f"stdin is not UTF-8 text ({e.reason} at byte {e.start})")
        where = "stdin"
    else:
        path = Path(name)
        if path.is_dir():
            raise OpenClawError(f"prompt file {name} is a directory; give a text file, or - for stdin")
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise OpenClawError(f"prompt file {name!r} does not exist; PROMPT is a file, or - to read stdin: echo "
                                f"'a question' | openclaw run -")
        except UnicodeDecodeError as e:
            raise OpenClawError(f"prompt file {name} is not UTF-8 text ({e.reason} at byte {e.start})")
        except OSError as e:
            raise OpenClawError(f"prompt file {name} is unreadable: {e.strerror}")
        where = f"prompt file {name}"
    if not text.strip():
        raise OpenClawError(f"{where} is empty: write the question in it")
    return text.strip()


def _run_jsonl(llm, items: list, defaults: SamplingParams, system, think, think_budget, out_path: Path) -> None:
    from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn

    from openclaw.batch import run_batch, write_rows

    columns = (TextColumn("answering"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[tokens]} tokens"),
               TimeElapsedColumn())
    with Progress(*columns, console=err, transient=True) as bar:
        task = bar.add_task("answering", total=len(items), tokens=0)
        result = run_batch(llm, items, defaults, system, think, think_budget,
                           progress=lambda done, total, tokens: bar.update(task, completed=done, tokens=tokens))
    write_rows(result.rows, out_path)
    if result.missing:
        err.print(f"[dim]interrupted: wrote the {len(result.rows)} finished rows to {out_path}; {result.missing} of "
                  f"{len(items)} items are missing (their index is not in it)[/dim]", soft_wrap=True)
        sys.exit(130)
    answered = len(items) - result.failed
    err.print(f"[dim]{answered} answer{'' if answered == 1 else 's'}, {result.completion_tokens} tokens in {result.seconds:.1f}s "
              f"({result.completion_tokens / max(result.seconds, 1e-9):.1f} tok/s, {llm.config.max_seqs} at a time); "
              f"wrote {out_path}[/dim]", soft_wrap=True)
    if result.failed:
        raise OpenClawError(f"{result.failed} of {len(items)} items failed (see \"error\" in {out_path})")


@app.command()
def chat(
    model_arg: ModelArg = None, model: Model = None, max_tokens: MaxTokens = _S.max_tokens,
    temperature: Temperature = None, top_p: TopP = None, top_k: TopK = None, min_p: MinP = None,
    repetition_penalty: RepPenalty = None, seed: Seed = None, system: System = None, think: Think = None,
    think_budget: ThinkBudget = None, device: Device = _E.device, dtype: Dtype = _E.dtype,
    kv_tokens: KvTokens = _E.kv_tokens, threads: Threads = _E.threads, cache_dir: CacheDir = DEFAULT_CACHE,
    evict: Evict = _V.policy, kv_budget: KvBudget = _V.budget, stats: EvictStats = None,
    protect_recent: ProtectRecent = _V.protect_recent, pin_prompt: PinPrompt = _V.pin_prompt, vram: Vram = None,
    quantize: Quantize = _E.quantize, verify: Verify = _E.verify,
):
    """Talk with a model in the terminal: streamed answers, thinking shown dimmed, /help lists the commands."""
    from openclaw.chat import Chat

    params = SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p,
                            repetition_penalty=repetition_penalty, seed=seed, max_tokens=max_tokens)
    config = _engine_config(model_spec(model_arg, model), device, dtype, kv_tokens, 1, threads, cache_dir, vram,
                            quantize, verify)
    config.evict = eviction_config(evict, kv_budget, stats, protect_recent, pin_prompt)
    llm = _load(config)
    try:
        Chat(llm, params, out, err, system=system, think=think, think_budget=think_budget,
             history_file=config.cache_dir / "chat_history").run()
    finally:
        llm.close()


@app.command()
def serve(
    model_arg: ModelArg = None, model: Model = None,
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535, help="Port (0 = any free one).")] = 8000,
    name: Annotated[str | None, typer.Option(help="Model id clients ask for (default: the model's name).")] = None,
    max_tokens: Annotated[int, typer.Option(help="max_tokens of requests that give none.")] = _S.max_tokens,
    device: Device = _E.device, dtype: Dtype = _E.dtype, kv_tokens: KvTokens = _E.kv_tokens,
    max_seqs: MaxSeqs = _E.max_seqs, threads: Threads = _E.threads, cache_dir: CacheDir = DEFAULT_CACHE,
    vram: Vram = None, evict: Evict = _V.policy, kv_budget: KvBudget = _V.budget, stats: EvictStats = None,
    protect_recent: ProtectRecent = _V.protect_recent, pin_prompt: PinPrompt = _V.pin_prompt,
    quantize: Quantize = _E.quantize, verify: Verify = _E.verify,
    read_timeout: Annotated[float, typer.Option(help="Seconds a connection may stay silent (or leave a stream "
                                                     "unread) before it is closed.")] = _SV.read_timeout,
    max_connections: Annotated[int, typer.Option(help="Open connections at most; more get a 503 at once.")]
    = _SV.max_connections,
):
    """Serve the model over an OpenAI-compatible HTTP API; concurrent requests are decoded in one batch."""
    from openclaw.server.openai_api import Api
    from openclaw.server.server import Server, serve_until_interrupted

    spec = model_spec(model_arg, model)
    SamplingParams(max_tokens=max_tokens)  # validated now, not after the model has loaded
    limits = ServerConfig(read_timeout=read_timeout, max_connections=max_connections)
    config = _engine_config(spec, device, dtype, kv_tokens, max_seqs, threads, cache_dir, vram, quantize, verify)
    config.evict = eviction_config(evict, kv_budget, stats, protect_recent, pin_prompt)
    check_spec(spec)
    try:  # bound before the model loads: a busy port is said at once, not after minutes of loading
        server = Server((host, port), limits, log=lambda line: err.print(f"[dim]{line}[/dim]", soft_wrap=True))
    except OSError as e:
        raise OpenClawError(f"cannot listen on {host}:{port}: {e.strerror}")
    try:
        llm = _load(config)
        api = Api(llm, name or (Path(spec).stem if Path(spec).suffix == ".gguf" else Path(spec).name), max_tokens,
                  limits)
        server.start(llm, api)
    except BaseException:
        server.server_close()
        raise
    bound_host, bound_port = server.server_address[:2]
    err.print(f"serving [bold]{api.model_name}[/bold] at http://{bound_host}:{bound_port}/v1 (OpenAI-compatible, "
              f"up to {max_seqs} requests per batch); Ctrl-C stops", soft_wrap=True)
    serve_until_interrupted(server)


@app.command()
def plan(
    model_arg: ModelArg = None, model: Model = None, vram: Vram = None,
    kv_budget: Annotated[int | None, typer.Option(help="Eviction budget B: how many sequences of B fit.")] = None,
    max_seqs: MaxSeqs = _E.max_seqs, cache_dir: CacheDir = DEFAULT_CACHE, quantize: Quantize = _E.quantize,
):
    """Print the VRAM plan (weights, workspace, KV pool, KV tokens) without loading weights; exit 2 if it won't fit."""
    spec = model_spec(model_arg, model)
    config = EngineConfig(model=spec, vram=vram, max_seqs=max_seqs, cache_dir=cache_dir, quantize=quantize)
    check_spec(spec)
    from openclaw.engine.memory import plan_model  # torch: after the name is known to be one

    p, name, fitting = plan_model(spec, config.cache_dir, config.vram, kv_budget, max_seqs=config.max_seqs,
                                  max_batch_tokens=config.max_batch_tokens, divide_length=_V.divide_length,
                                  quantize=config.quantize)
    table = Table("", name, show_header=True)
    for label, value in p.rows():
        table.add_row(label, value)
    out.print(table)
    p.require(name, smaller=fitting)


def _version(show: bool) -> None:
    if show:
        try:
            out.print(f"openclaw {version('openclaw')}")
        except PackageNotFoundError:  # run from a source tree that was never installed
            out.print("openclaw (not installed)")
        raise typer.Exit()


@app.callback()
def _options(show_version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                                   help="Print OpenClaw's version and exit.")] = False) -> None:
    """OpenClaw: long-reasoning LLM inference on one GPU (or a CPU)."""


def main() -> None:
    # library warnings (a stats file of unknown origin, ignored online statistics) reach the user as one line each
    logging.basicConfig(level=logging.WARNING, format="warning: %(message)s")
    # OpenMP's worker threads spin while they wait for work by default: on a machine whose cores are busy with other
    # work the spinning threads and the busy ones take turns, and decode fell to under 1 tok/s (bench/RESULTS-cpu.md).
    # Passive waiting costs nothing on an idle machine. Set before torch loads (its OpenMP runtime reads it once); a
    # user's own setting wins.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    try:
        app()
    except OpenClawError as e:
        err.print(f"[bold red]error:[/bold red] {e}", soft_wrap=True)  # one line, even when piped
        sys.exit(2)
    except KeyboardInterrupt:
        err.print("[dim]interrupted[/dim]")
        sys.exit(130)
