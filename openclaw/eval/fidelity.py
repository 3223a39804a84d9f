"""Eviction fidelity on real text: chunked teacher forcing against full attention (DESIGN.md, "How quality ...").

Each window of the text runs once with full attention (the reference) and once per setting, every run in chunks of
divide_length tokens at absolute positions through the engine's own scheduler, runner and compressor (so on a GPU it
measures the attention path the engine runs), compressing after each chunk exactly as the engine does. The runs
advance in lockstep and the metrics are summed chunk by chunk: mean KL(full || evicted), top-1 agreement, the
perplexity of both on the true next tokens, and how far the run's argmax agrees with the reference's from the first
scored token. Only about two chunks of reference log-probabilities are held at a time, never the whole window's. A
`full` setting is a real second full-attention run (KL 0 exactly on a CPU: the harness's own zero). The text counts
as a generated trace: nothing is pinned unless prompt_len says so. It does not sample or detokenize.
"""

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace

import torch

from openclaw.config import EvictionConfig, SamplingParams
from openclaw.engine.kv_pool import KVPool
from openclaw.engine.runner import Runner
from openclaw.engine.scheduler import Scheduler
from openclaw.engine.sequence import Sequence
from openclaw.evict.compressor import Compressor
from openclaw.evict.evictor import TriStats
from openclaw.evict.query_stats import QueryStats

FULL = EvictionConfig(policy="full")

@dataclass
class Row:
    label: str
    policy: str
    budget: int | None
    kl: float  # mean KL(full || evicted) per scored token, nats
    top1: float  # share of scored tokens whose argmax matches full attention's
    ppl: float
    ppl_full: float
    tokens: int
    evictions: int
    kl_per_window: list[float] = field(default_factory=list)
    agree: float = 0.0  # mean over windows: scored tokens before the first argmax that differs from full attention's

    def as_dict(self) -> dict:
        return asdict(self)


def text_windows(ids: list[int], count: int, length: int) -> list[list[int]]:
    """count windows of length tokens, evenly spread over ids and not overlapping."""
    if count * length > len(ids):
        raise ValueError(f"{count} windows of {length} tokens need {count * length} tokens; the text has {len(ids)}")
    stride = (len(ids) - length) // max(count - 1, 1)
    return [ids[i * stride:i * stride + length] for i in range(count)]


class ForcedRun:
    """One teacher-forced pass over ids under one eviction setting, chunk by chunk: its own sequence, pool, compressor
    and runner. step() runs one chunk and returns the log-probs of its scored positions."""

    def __init__(self, model: torch.nn.Module, ids: list[int], cfg: EvictionConfig, stats: TriStats | None = None,
                 start: int = 0, prompt_len: int = 0, chunk: int = 128, online: QueryStats | None = None):
        """start: the first scored position (its log-probs predict token start + 1); online: the running statistics
        --stats auto starts from (a warm start; copied, never changed); None starts cold."""
        mc = model.config
        norm = model.model.norm.weight  # a plain parameter in the activation dtype, also when the embedding is quantized
        device, dtype = norm.device, norm.dtype
        self.ids, self.start = ids, start
        # the run's KV range: budget + divide_length, or (auto without a budget) the whole run, as in the engine
        cfg = cfg.for_range(len(ids) if cfg.budget is None else cfg.budget + cfg.divide_length) if cfg.evicts else cfg
        self.seq = Sequence(list(ids), SamplingParams(max_tokens=1), max_len=len(ids), prompt_len=prompt_len,
                            kv_budget=cfg.budget if cfg.evicts else None, divide_length=cfg.divide_length,
                            pinned=prompt_len if cfg.evicts and cfg.pin_prompt else 0)
        pool = KVPool.for_config(mc, self.seq.slots_needed(), dtype, device)
        self.compressor = Compressor(cfg, pool, mc.num_attention_heads, model.bands.omega, stats, model.bands,
                                     online=online.copy() if online is not None else None)
        self.runner = Runner(model, pool, device)
        self.scheduler = Scheduler(pool.allocator, max_seqs=1, max_batch_tokens=chunk)
        self.scheduler.add(self.seq)

    @property
    def done(self) -> bool:
        return self.seq.num_computed >= len(self.ids)

    @property
    def evictions(self) -> int:
        return self.compressor.evictions

    @torch.inference_mode()
    def step(self) -> tuple[int, torch.Tensor]:
        """Run the next chunk (fewer tokens when the slots run out first); returns (p, log-probs [n, V] fp32 on the
        CPU) for the scored positions p .. p + n - 1 of the chunk (n may be 0)."""
        seq = self.seq
        batch = self.scheduler.schedule()
        s, n = seq.num_computed, batch[0][1]
        first = max(s, self.start)
        rows = list(range(first - s, max(first - s, min(s + n, len(self.ids) - 1) - s)))
        logits, _ = self.runner.step(batch, self.compressor, rows=rows)
        self.scheduler.advance(batch)
        if self.compressor.due(seq):
            self.compressor.evict(seq)
            self.scheduler.compacted(seq, seq.kv_budget)
        return first, torch.log_softmax(logits.float(), dim=-1).cpu()


def warm_start(cfg: EvictionConfig, online: QueryStats | None) -> QueryStats | None:
    """What a run of cfg starts its online statistics from: `auto` runs continue the given (persisted) statistics,
    as the engine does; an explicit triattention with online statistics starts cold (the harness's worst case)."""
    return online if cfg.policy == "auto" else None


def forced_logprobs(model: torch.nn.Module, ids: list[int], cfg: EvictionConfig, stats: TriStats | None = None,
                    start: int = 0, prompt_len: int = 0, chunk: int = 128,
                    online: QueryStats | None = None) -> tuple[torch.Tensor, int]:
    """All scored log-probs [len(ids) - 1 - start, V] of one run at once (predicting tokens start + 1 .. end) and its
    eviction count. For short spans (the needle's answer, tests): evaluate() never holds a whole window's."""
    run = ForcedRun(model, ids, cfg, stats, start, prompt_len, chunk, warm_start(cfg, online))
    out = []
    while not run.done:
        out.append(run.step()[1])
    return torch.cat(out), run.evictions


class _Totals:
    """Sums over scored tokens of one setting (pooled over windows) and the current window's agreement."""

    def __init__(self):
        self.kl = self.nll = self.nll_full = 0.0
        self.top1 = self.tokens = self.evictions = 0
        self.per_window: list[float] = []
        self.agree: list[int] = []
        self._window_kl = 0.0
        self._window_tokens = 0
        self._diverged = False

    def add(self, full: torch.Tensor, ev: torch.Tensor, targets: torch.Tensor) -> None:
        kl = (full.exp() * (full - ev)).sum(-1)
        same = full.argmax(-1) == ev.argmax(-1)
        self.kl += kl.sum().item()
        self._window_kl += kl.sum().item()
        self.top1 += int(same.sum())
        self.nll -= ev.gather(1, targets[:, None]).sum().item()
        self.nll_full -= full.gather(1, targets[:, None]).sum().item()
        self.tokens += len(targets)
        self._window_tokens += len(targets)
        if not self._diverged:
            miss = (~same).nonzero()
            self._diverged = len(miss) > 0
            self.agree[-1] += int(miss[0]) if self._diverged else len(same)

    def open_window(self) -> None:
        self._window_kl, self._window_tokens, self._diverged = 0.0, 0, False
        self.agree.append(0)

    def close_window(self, evictions: int) -> None:
        self.evictions += evictions
        self.per_window.append(self._window_kl / max(self._window_tokens, 1))


def evaluate(model: torch.nn.Module, windows: list[list[int]], runs: list[tuple[str, EvictionConfig]],
             stats: TriStats | None = None, start: int = 0, prompt_len: int = 0,
             progress: Callable[[str, int, int], None] | None = None, online: QueryStats | None = None) -> list[Row]:
    """One Row per (label, config) in runs, pooled over windows; full attention is the reference of each window.
    online: the running statistics `auto` runs warm-start from, as the engine's do (warm_start). progress(what,
    tokens done, tokens) after each chunk: tokens the reference and every run have forced."""
    totals = {label: _Totals() for label, _ in runs}
    total, before = (1 + len(runs)) * sum(map(len, windows)), 0
    for w, ids in enumerate(windows):
        if start >= len(ids) - 1:
            raise ValueError(f"scoring from position {start} leaves nothing to score in a window of {len(ids)} tokens")
        targets = torch.tensor(ids)
        ref = ForcedRun(model, ids, FULL, start=start)
        held: list[tuple[int, torch.Tensor]] = []  # reference log-probs not yet consumed by every run: (p, rows)
        live = [(label, ForcedRun(model, ids, cfg, stats, start, prompt_len, online=warm_start(cfg, online)))
                for label, cfg in runs]
        for label, _ in live:
            totals[label].open_window()
        done_to = {label: start for label, _ in live}  # every run has scored positions < done_to[label]
        while any(not r.done for _, r in live):
            for label, run in live:
                if run.done:
                    continue
                p, lp = run.step()
                if progress:
                    done = before + ref.seq.num_computed + sum(r.seq.num_computed for _, r in live)
                    progress(f"window {w + 1}/{len(windows)}: {label}", min(done, total), total)
                end = p + len(lp)
                while not ref.done and (not held or held[-1][0] + len(held[-1][1]) < end):
                    held.append(ref.step())
                full = torch.cat([rows for _, rows in held])[p - held[0][0]:end - held[0][0]]
                if len(lp):
                    totals[label].add(full, lp, targets[p + 1:end + 1])
                done_to[label] = max(done_to[label], end)
            low = min(done_to.values())
            while held and held[0][0] + len(held[0][1]) <= low:
                held.pop(0)
        for label, run in live:
            totals[label].close_window(run.evictions)
        before += (1 + len(runs)) * len(ids)
        if progress:
            progress(f"window {w + 1}/{len(windows)}", before, total)
    rows = []
    for label, cfg in runs:
        t = totals[label]
        rows.append(Row(label, cfg.policy, cfg.budget if cfg.evicts else None, t.kl / t.tokens, t.top1 / t.tokens,
                        math.exp(t.nll / t.tokens), math.exp(t.nll_full / t.tokens), t.tokens, t.evictions,
                        t.per_window, sum(t.agree) / len(t.agree)))
    return rows


def standard_runs(policies: list[str], budgets: list[int], base: EvictionConfig, ablations: bool = False,
                  online: bool = False) -> list[tuple[str, EvictionConfig]]:
    """(label, config) for every policy x budget, plus TriAttention's ablations (trig / norm term only, the reference's
    union and per-layer selection, disable_mlr) and its online-statistics variant."""
    runs = [("full", replace(base, policy="full"))] if "full" in policies else []
    for b in budgets:
        for p in policies:
            if p == "full":
                continue
            runs.append((f"{p}@{b}", replace(base, policy=p, budget=b)))
            if p == "triattention":
                if ablations:
                    variants = [(f"-{t}", {"tri_terms": t}) for t in ("trig", "norm")] + [
                        ("-union", {"tri_select": "union"}), ("-layer", {"tri_select": "per_layer_perhead"}),
                        ("-nomlr", {"disable_mlr": True})]
                    runs += [(f"triattention{name}@{b}", replace(base, policy=p, budget=b, **kw)) for name, kw in variants]
                if online:
                    runs.append((f"triattention-online@{b}", replace(base, policy=p, budget=b, stats="auto")))
    return runs
