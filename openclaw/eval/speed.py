"""Speed of an engine on synthetic requests: prefill and decode tokens per second at given prompt lengths, contexts
and batch sizes, with peak GPU memory and evictions; what `openclaw bench` prints and the GPU scripts in bench/ log.

Requests are random token ids, decoded greedily with eos ignored, through Engine.step as a user's would be: prefill
tok/s is a prompt's tokens over the time to its first token (chunked by max_batch_tokens), decode tok/s the tokens
of `steps` timed steps of a batch of sequences that all hold `context` cached tokens when timing starts. Each figure
is the best of `reps` runs after a warm-up run (compilation, autotuning, graph capture). It does not print.
"""

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from openclaw.config import SamplingParams
from openclaw.engine.engine import Engine
from openclaw.engine.sequence import Sequence
from openclaw.errors import OpenClawError


@dataclass
class Row:
    test: str  # "prefill" or "decode"
    batch: int  # sequences at once
    context: int  # prefill: prompt tokens; decode: tokens each sequence holds when timing starts
    tok_s: float | None  # tokens per second, all sequences together (None: skipped, see note)
    ms_per_step: float | None = None  # decode: one engine step (one token of every sequence)
    peak_gib: float | None = None  # peak GPU memory allocated during the runs (None on a CPU)
    evictions: int = 0  # evictions during the timed runs
    note: str = ""


def _sync(engine: Engine) -> None:
    if engine.device.type == "cuda":
        torch.cuda.synchronize(engine.device)


def _ids(n: int, vocab: int, seed: int) -> list[int]:
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _peak(engine: Engine, reset: bool = False) -> float | None:
    if engine.device.type != "cuda":
        return None
    if reset:
        torch.cuda.reset_peak_memory_stats(engine.device)
    return torch.cuda.max_memory_allocated(engine.device) / 2 ** 30


def _finish_all(engine: Engine, seqs: list[Sequence]) -> None:
    for s in seqs:
        engine.finish(s, "abort")


def prefill(engine: Engine, prompt_len: int, reps: int = 1) -> Row:
    """Tokens per second of one prompt of prompt_len tokens up to its first token."""
    why = _refusal(engine, prompt_len, 1, 1)
    if why:
        return Row("prefill", 1, prompt_len, None, note=why)
    vocab = engine.model.config.vocab_size
    best, evictions = None, 0
    _peak(engine, reset=True)
    for rep in range(reps + 1):  # the first run warms up
        seq = engine.add_request(_ids(prompt_len, vocab, rep), SamplingParams(temperature=0, max_tokens=1,
                                                                               ignore_eos=True))
        before = engine.compressor.evictions
        _sync(engine)
        t0 = time.perf_counter()
        while not seq.finished:
            engine.step()
        _sync(engine)
        dt = time.perf_counter() - t0
        if rep:
            best = dt if best is None else min(best, dt)
            evictions += engine.compressor.evictions - before
    return Row("prefill", 1, prompt_len, prompt_len / best, peak_gib=_peak(engine), evictions=evictions)


def decode(engine: Engine, batch: int, context: int, steps: int = 32, reps: int = 1) -> Row:
    """Tokens per second of `batch` sequences decoding together, each holding `context` tokens when the timed
    `steps` steps start."""
    why = _refusal(engine, context, batch, steps + 4)
    if why:
        return Row("decode", batch, context, None, note=why)
    vocab = engine.model.config.vocab_size
    best, evictions = None, 0
    _peak(engine, reset=True)
    for rep in range(reps + 1):
        params = SamplingParams(temperature=0, max_tokens=steps + 4, ignore_eos=True)
        seqs = [engine.add_request(_ids(context, vocab, 100 * rep + i), params) for i in range(batch)]
        while not all(s.output_ids for s in seqs):  # prefill every prompt (and sample its first token)
            engine.step()
        if len(engine.scheduler.running) < batch:
            _finish_all(engine, seqs)
            return Row("decode", batch, context, None, note=f"only {len(engine.scheduler.running)} sequences fit")
        engine.step()  # one untimed decode step: the graph of this (batch, length) bucket is captured here
        before = engine.compressor.evictions
        _sync(engine)
        t0 = time.perf_counter()
        for _ in range(steps):
            engine.step()
        _sync(engine)
        dt = time.perf_counter() - t0
        _finish_all(engine, seqs)
        if rep:
            best = dt if best is None else min(best, dt)
            evictions += engine.compressor.evictions - before
    return Row("decode", batch, context, batch * steps / best, 1e3 * best / steps, _peak(engine), evictions)


def _refusal(engine: Engine, context: int, batch: int, new_tokens: int) -> str:
    """Why `batch` sequences of `context` prompt tokens (and new_tokens more) cannot run at once, or ''."""
    if engine.max_new_tokens(context) < new_tokens:
        ev = engine.evict
        if ev.evicts and ev.policy != "auto" and ev.pin_prompt and context + ev.protect_recent >= ev.budget:
            return f"a pinned prompt of {context} tokens is over the budget {ev.budget}: use --no-pin-prompt"
        return f"{context} + {new_tokens} tokens exceed the context ({engine.max_model_len}) or the KV pool"
    if batch > engine.config.max_seqs:
        return f"batch {batch} is over --max-seqs {engine.config.max_seqs}"
    ev = engine.evict
    per_seq = min(context + new_tokens, ev.budget + ev.divide_length) if ev.evicts else context + new_tokens
    if batch * per_seq > engine.pool.num_slots:
        return f"{batch} x {per_seq} KV slots are more than the pool's {engine.pool.num_slots}"
    return ""


def run(engine: Engine, prompt_lengths: list[int], contexts: list[int], batch_sizes: list[int], steps: int = 32,
        reps: int = 1, progress: Callable[[str], None] | None = None) -> list[Row]:
    """Prefill at each prompt length, then decode at each (context, batch size)."""
    if engine.scheduler.has_work():
        raise OpenClawError("the engine has requests in flight; benchmark an idle engine")
    rows = []
    for n in prompt_lengths:
        if progress:
            progress(f"prefill {n} tokens")
        rows.append(prefill(engine, n, reps))
    for c in contexts:
        for b in batch_sizes:
            if progress:
                progress(f"decode batch {b}, context {c}")
            rows.append(decode(engine, b, c, steps, reps))
    return rows


@dataclass
class Trace:
    """One long generation, step by step (each step synchronized)."""

    prompt: int
    tokens: int  # generated
    finish_reason: str
    seconds: float  # decode steps only
    first_tok_s: float  # over the first `window` generated tokens (steps that captured a graph left out)
    last_tok_s: float  # over the last `window`
    evictions: int
    eviction_share: float  # what the steps that evicted took beyond a median step, over all decode time
    peak_gib: float | None
    capture_seconds: float = 0.0  # steps that captured a CUDA graph (the first of each length bucket)


def trace(engine: Engine, tokens: int, prompt_len: int = 128, window: int = 1024) -> Trace:
    """Generate `tokens` tokens of one sequence after a random prompt (OpenClawError when the engine refuses it:
    with full attention, a pool too small for it), timing every step."""
    vocab = engine.model.config.vocab_size
    _peak(engine, reset=True)
    seq = engine.add_request(_ids(prompt_len, vocab, 7), SamplingParams(temperature=0, max_tokens=tokens,
                                                                         ignore_eos=True))
    while not seq.output_ids and not seq.finished:
        engine.step()
    first = engine.compressor.evictions
    times, evicted, capture = [], [], 0.0
    graphs = engine.runner.graphs
    _sync(engine)
    last = time.perf_counter()
    while not seq.finished:
        before, steps = engine.compressor.evictions, 0 if graphs is None else len(graphs.steps)
        engine.step()
        _sync(engine)
        now = time.perf_counter()
        if graphs is not None and len(graphs.steps) > steps:
            capture += now - last
        else:
            times.append(now - last)
            evicted.append(engine.compressor.evictions > before)
        last = now
    w = max(1, min(window, len(times)))
    plain = sorted(t for t, e in zip(times, evicted) if not e)
    median = plain[len(plain) // 2] if plain else 0.0
    extra = max(0.0, sum(t - median for t, e in zip(times, evicted) if e))  # noise can make it negative
    total = sum(times) or 1e-9
    return Trace(prompt_len, len(seq.output_ids), seq.finish_reason, sum(times) + capture,
                 w / (sum(times[:w]) or 1e-9), w / (sum(times[-w:]) or 1e-9), engine.compressor.evictions - first,
                 extra / total, _peak(engine), capture)


@dataclass
class Throughput:
    """Many sequences generating together until all are done."""

    seqs: int  # requested
    most_at_once: int  # running together at the peak (the pool and --max-seqs bound it)
    tokens: int  # generated, all sequences
    seconds: float
    tok_s: float
    evictions: int
    peak_gib: float | None


def throughput(engine: Engine, seqs: int, tokens: int, prompt_len: int = 128) -> Throughput:
    """Submit `seqs` requests of `tokens` new tokens each after random prompts and run until all finish: aggregate
    tokens per second (prefill included), and how many ran at once."""
    vocab = engine.model.config.vocab_size
    params = SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True)
    _peak(engine, reset=True)
    before = engine.compressor.evictions
    t0 = time.perf_counter()
    reqs = [engine.add_request(_ids(prompt_len, vocab, 1000 + i), params) for i in range(seqs)]
    most = 0
    while engine.has_work():
        engine.step()
        most = max(most, len(engine.scheduler.running))
    _sync(engine)
    dt = time.perf_counter() - t0
    generated = sum(len(s.output_ids) for s in reqs)
    return Throughput(seqs, most, generated, dt, generated / dt, engine.compressor.evictions - before, _peak(engine))
