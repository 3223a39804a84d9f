"""The `openclaw` command: run, chat, models. The only module that talks to the user (through rich).

Generated text goes to stdout, everything else (progress, stats, errors) to stderr. An OpenClawError becomes
one red line and exit code 2.
"""

import json
import sys
import time
from dataclasses import fields
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from openclaw.config import EngineConfig, SamplingParams, default_cache_dir
from openclaw.errors import OpenClawError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="OpenClaw: long-reasoning LLM inference on one GPU (or a CPU).")
err = Console(stderr=True, highlight=False)
out = Console(highlight=False, soft_wrap=True)

_E = EngineConfig()
DEFAULT_CACHE = default_cache_dir()
_S = SamplingParams()
Model = Annotated[str, typer.Option("--model", "-m", help="Manifest name, HF model directory, or .gguf file.")]
Device = Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")]
Dtype = Annotated[str, typer.Option(help="auto (bfloat16 on GPU, float16 on CPU), bfloat16, float16 or float32.")]
KvTokens = Annotated[int, typer.Option(help="KV pool size in tokens, all sequences together.")]
MaxSeqs = Annotated[int, typer.Option(help="Sequences decoded together at most.")]
Threads = Annotated[int | None, typer.Option(help="CPU threads (default: torch's choice).")]
CacheDir = Annotated[Path, typer.Option(envvar="OPENCLAW_CACHE", help="Where models and conversions are kept.")]
MaxTokens = Annotated[int, typer.Option(help="Tokens to generate at most.")]
Temperature = Annotated[float | None, typer.Option(help="0 = greedy. Default: the model's generation_config.")]
TopP = Annotated[float | None, typer.Option(help="Nucleus sampling mass.")]
TopK = Annotated[int | None, typer.Option(help="Keep the k most likely tokens (0 = off).")]
MinP = Annotated[float | None, typer.Option(help="Drop tokens below min_p x the top probability.")]
RepPenalty = Annotated[float | None, typer.Option("--repetition-penalty", help="1 = off.")]
Seed = Annotated[int | None, typer.Option(help="Sampling seed (reproducible output).")]
System = Annotated[str | None, typer.Option(help="System message.")]
Think = Annotated[bool | None, typer.Option("--think/--no-think", help="Qwen3 thinking (default: the template's).")]


def _engine_config(model, device, dtype, kv_tokens, max_seqs, threads, cache_dir) -> EngineConfig:
    return EngineConfig(model=model, device=device, dtype=dtype, kv_tokens=kv_tokens, max_seqs=max_seqs,
                        threads=threads, cache_dir=cache_dir)


def _load(config: EngineConfig):
    from openclaw.llm import LLM  # torch import deferred so `openclaw --help` and `models` stay instant

    with Progress(console=err, transient=True) as bar:
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


def _template_kwargs(think: bool | None) -> dict:
    return {} if think is None else {"enable_thinking": think}


@app.command()
def run(
    prompt_file: Annotated[Path | None, typer.Argument(help="Text file with the user's message.")] = None,
    model: Model = _E.model, max_tokens: MaxTokens = _S.max_tokens, temperature: Temperature = None,
    top_p: TopP = None, top_k: TopK = None, min_p: MinP = None, repetition_penalty: RepPenalty = None,
    seed: Seed = None, system: System = None, think: Think = None,
    jsonl: Annotated[Path | None, typer.Option(help="Answer every prompt of this JSONL file in one batch.")] = None,
    out_path: Annotated[Path | None, typer.Option("--out", help="Where --jsonl writes its answers.")] = None,
    device: Device = _E.device, dtype: Dtype = _E.dtype, kv_tokens: KvTokens = _E.kv_tokens,
    max_seqs: MaxSeqs = _E.max_seqs, threads: Threads = None, cache_dir: CacheDir = DEFAULT_CACHE,
):
    """Answer PROMPT_FILE (stdout: the answer only), or every line of --jsonl IN into --out OUT."""
    from openclaw.llm import Request

    params = SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p,
                            repetition_penalty=repetition_penalty, seed=seed, max_tokens=max_tokens)
    if jsonl is not None:
        if out_path is None:
            raise OpenClawError("--jsonl needs --out FILE for the answers")
        items = _read_jsonl(jsonl)
    elif prompt_file is None:
        raise OpenClawError("give a PROMPT_FILE, or --jsonl IN --out OUT")
    else:
        text = _read_text(prompt_file)
    config = _engine_config(model, device, dtype, kv_tokens, max_seqs, threads, cache_dir)
    llm = _load(config)
    if jsonl is not None:
        return _run_jsonl(llm, items, params, system, think, out_path)
    request = Request(llm.chat_ids(_messages(system, text), **_template_kwargs(think)), params)
    t0 = time.perf_counter()
    first = None
    n = 0
    reason = "?"
    for d in llm.stream([request]):
        if first is None:
            first = time.perf_counter()
        out.out(d.text, end="")
        sys.stdout.flush()
        n, reason = len(d.seq.output_ids), d.finish_reason or reason
    out.out("")
    end = time.perf_counter()
    decode = f"{(n - 1) / (end - first):.1f} tok/s decode" if first and n > 1 and end > first else ""
    err.print(f"[dim]{len(request.prompt_ids)} prompt tokens, {n} generated ({reason}); "
              f"first token {((first or end) - t0) * 1000:.0f} ms; {decode}[/dim]")


def _read_text(path: Path) -> str:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise OpenClawError(f"prompt file {path} does not exist")
    except (UnicodeDecodeError, IsADirectoryError) as e:
        raise OpenClawError(f"prompt file {path} is not UTF-8 text ({e})")
    if not text.strip():
        raise OpenClawError(f"prompt file {path} is empty: write the question in it")
    return text.strip()


_SAMPLING_FIELDS = {f.name for f in fields(SamplingParams)}


def _read_jsonl(path: Path) -> list[dict]:
    items = []
    for n, line in enumerate(_read_text(path).splitlines(), 1):
        if line.strip():
            try:
                item = json.loads(line)
            except json.JSONDecodeError as e:
                raise OpenClawError(f"{path}:{n} is not JSON ({e})")
            if not isinstance(item, dict) or not ("prompt" in item or "messages" in item):
                raise OpenClawError(f"{path}:{n}: each line needs an object with \"prompt\" or \"messages\"")
            items.append(item)
    return items


def _run_jsonl(llm, items: list[dict], defaults: SamplingParams, system, think, out_path: Path) -> None:
    from dataclasses import replace

    from openclaw.llm import Request

    requests, errors = [], {}
    for i, item in enumerate(items):
        try:
            msgs = item.get("messages") or _messages(item.get("system", system), item["prompt"])
            overrides = {k: v for k, v in item.items() if k in _SAMPLING_FIELDS}
            requests.append((i, Request(llm.chat_ids(msgs, **_template_kwargs(think)), replace(defaults, **overrides))))
        except (OpenClawError, TypeError, KeyError, ValueError) as e:
            errors[i] = str(e)
    t0 = time.perf_counter()
    results = llm.generate([r for _, r in requests]) if requests else []
    dt = time.perf_counter() - t0
    by_index = dict(zip([i for i, _ in requests], results))
    with out_path.open("w") as f:
        for i in range(len(items)):
            if i in errors:
                row = {"index": i, "error": errors[i]}
            else:
                c = by_index[i]
                row = {"index": i, "text": c.text, "prompt_tokens": c.prompt_tokens,
                       "completion_tokens": c.completion_tokens, "finish_reason": c.finish_reason}
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    total = sum(c.completion_tokens for c in results)
    err.print(f"[dim]{len(results)} answers, {total} tokens in {dt:.1f}s ({total / max(dt, 1e-9):.1f} tok/s); "
              f"wrote {out_path}[/dim]")
    if errors:
        raise OpenClawError(f"{len(errors)} of {len(items)} items failed (see \"error\" in {out_path})")


@app.command()
def chat(
    model_arg: Annotated[str | None, typer.Argument(metavar="[MODEL]", help="Manifest name, directory or .gguf.")] = None,
    model: Model = _E.model, max_tokens: MaxTokens = 2048, temperature: Temperature = None, top_p: TopP = None,
    top_k: TopK = None, min_p: MinP = None, seed: Seed = None, system: System = None, think: Think = None,
    device: Device = _E.device, dtype: Dtype = _E.dtype, kv_tokens: KvTokens = _E.kv_tokens,
    threads: Threads = None, cache_dir: CacheDir = DEFAULT_CACHE,
):
    """Talk with a model in the terminal. /reset clears the conversation, /exit (or Ctrl-D) leaves."""
    from openclaw.llm import Request

    config = _engine_config(model_arg or model, device, dtype, kv_tokens, 1, threads, cache_dir)
    llm = _load(config)
    params = SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p, seed=seed,
                            max_tokens=max_tokens)
    history = [{"role": "system", "content": system}] if system else []
    err.print("[dim]/reset clears the conversation; /exit or Ctrl-D leaves; Ctrl-C stops an answer.[/dim]")
    while True:
        try:
            user = out.input("[bold green]> [/bold green]")
        except EOFError:
            out.out("")
            return
        except KeyboardInterrupt:
            out.out("")
            continue
        if user.strip() in ("/exit", "/quit"):
            return
        if user.strip() == "/reset":
            history = history[:1] if system else []
            err.print("[dim]conversation cleared[/dim]")
            continue
        if not user.strip():
            continue
        history.append({"role": "user", "content": user})
        answer = ""
        stream = llm.stream([Request(llm.chat_ids(history, **_template_kwargs(think)), params)])
        try:
            for d in stream:
                out.out(d.text, end="")
                answer += d.text
        except KeyboardInterrupt:
            stream.close()
            err.print("\n[dim](stopped)[/dim]")
        out.out("")
        history.append({"role": "assistant", "content": answer})


@app.command()
def models(cache_dir: CacheDir = DEFAULT_CACHE):
    """List the models OpenClaw knows by name, and which are already on this machine."""
    from openclaw.hub import list_models

    table = Table("name", "architecture", "format", "params", "size", "local", "notes")
    for m in list_models(cache_dir):
        size = f"{m['size_bytes'] / 1e9:.1f} GB" if m.get("size_bytes") else "?"
        params = f"{m['params'] / 1e9:.2f}B" if m.get("params") else "?"
        notes = "" if m.get("supported", True) else "not supported yet"
        table.add_row(m["name"], m["architecture"], m["format"], params, size, "yes" if m["present"] else "",
                      notes)
    out.print(table)


def main() -> None:
    try:
        app()
    except OpenClawError as e:
        err.print(f"[bold red]error:[/bold red] {e}", soft_wrap=True)  # one line, even when piped
        sys.exit(2)
    except KeyboardInterrupt:
        err.print("[dim]interrupted[/dim]")
        sys.exit(130)
