"""Eviction fidelity on real text: chunked teacher forcing against full attention (DESIGN.md, "How quality ...").

Each window of the text runs once with full attention and once per eviction setting, in chunks of divide_length
tokens at absolute positions, through the engine's own scheduler, runner and compressor (so on a GPU it measures the
attention path the engine runs), compressing after each chunk exactly as the engine does. On
the scored positions we compare next-token distributions: mean KL(full || evicted), top-1 agreement, and the
perplexity of both on the true next tokens. The text counts as a generated trace: nothing is pinned unless
prompt_len says so. It does not sample or detokenize; the CLI prints the rows.
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

    def as_dict(self) -> dict:
        return asdict(self)


def text_windows(ids: list[int], count: int, length: int) -> list[list[int]]:
    """count windows of length tokens, evenly spread over ids and not overlapping."""
    if count * length > len(ids):
        raise ValueError(f"{count} windows of {length} tokens need {count * length} tokens; the text has {len(ids)}")
    stride = (len(ids) - length) // max(count - 1, 1)
    return [ids[i * stride:i * stride + length] for i in range(count)]


@torch.inference_mode()
def forced_logprobs(model: torch.nn.Module, ids: list[int], cfg: EvictionConfig, stats: TriStats | None = None,
                    start: int = 0, prompt_len: int = 0, chunk: int = 128) -> tuple[torch.Tensor, int]:
    """Teacher-force ids in chunks (of chunk tokens, fewer when the slots run out), compressing after each chunk when
    cfg evicts. Full attention and budget >= length therefore run the very same forwards.

    Returns log-probs [len(ids) - 1 - start, V] (fp32) predicting tokens start+1 .. end, and the eviction count.
    """
    mc = model.config
    norm = model.model.norm.weight  # a plain parameter in the activation dtype, also when the embedding is quantized
    device, dtype = norm.device, norm.dtype
    seq = Sequence(list(ids), SamplingParams(max_tokens=1), max_len=len(ids), prompt_len=prompt_len,
                   kv_budget=cfg.budget if cfg.evicts else None, divide_length=cfg.divide_length)
    pool = KVPool.for_config(mc, seq.slots_needed(), dtype, device)
    comp = Compressor(cfg, pool, mc.num_attention_heads, model.bands.omega, stats, model.bands)
    runner = Runner(model, pool, device)
    scheduler = Scheduler(pool.allocator, max_seqs=1, max_batch_tokens=chunk)
    scheduler.add(seq)
    out = []
    while seq.num_computed < len(ids):
        batch = scheduler.schedule()
        s, n = seq.num_computed, batch[0][1]
        rows = [p - s for p in range(s, s + n) if start <= p < len(ids) - 1]
        logits, _ = runner.step(batch, comp, rows=rows)
        out.append(torch.log_softmax(logits.float(), dim=-1).cpu())
        scheduler.advance(batch)
        if comp.due(seq):
            comp.evict(seq)
            scheduler.compacted(seq, seq.kv_budget)
    return torch.cat(out), comp.evictions


def compare(full: torch.Tensor, ev: torch.Tensor, targets: torch.Tensor) -> dict:
    """Sums over tokens (so windows can be pooled): KL(full || ev), top-1 matches, NLL of both."""
    kl = (full.exp() * (full - ev)).sum(-1)
    return {"kl": kl.sum().item(), "top1": (full.argmax(-1) == ev.argmax(-1)).sum().item(),
            "nll": -ev.gather(1, targets[:, None]).sum().item(), "nll_full": -full.gather(1, targets[:, None]).sum().item(),
            "tokens": len(targets), "kl_mean": kl.mean().item()}


def evaluate(model: torch.nn.Module, windows: list[list[int]], runs: list[tuple[str, EvictionConfig]],
             stats: TriStats | None = None, start: int = 0, prompt_len: int = 0,
             progress: Callable[[str, int, int], None] | None = None) -> list[Row]:
    """One Row per (label, config) in runs, pooled over windows; full attention is the reference of each window.
    progress(what, tokens done, tokens) after each forced pass over a window."""
    totals = {label: {"kl": 0.0, "top1": 0, "nll": 0.0, "nll_full": 0.0, "tokens": 0, "ev": 0, "per": []}
              for label, _ in runs}
    passes = 1 + sum(cfg.evicts for _, cfg in runs)  # full attention once per window, then each evicting run
    total, done = passes * sum(map(len, windows)), 0
    for w, ids in enumerate(windows):
        full, _ = forced_logprobs(model, ids, EvictionConfig(), start=start)
        targets = torch.tensor(ids[start + 1:])
        done += len(ids)
        for label, cfg in runs:
            ev, count = (full, 0) if not cfg.evicts else forced_logprobs(model, ids, cfg, stats, start, prompt_len)
            if cfg.evicts:
                done += len(ids)
            if progress:
                progress(f"window {w + 1}/{len(windows)}: {label}", done, total)
            c = compare(full, ev, targets)
            t = totals[label]
            for key in ("kl", "top1", "nll", "nll_full", "tokens"):
                t[key] += c[key]
            t["ev"] += count
            t["per"].append(c["kl_mean"])
    rows = []
    for label, cfg in runs:
        t = totals[label]
        rows.append(Row(label, cfg.policy, cfg.budget if cfg.evicts else None, t["kl"] / t["tokens"],
                        t["top1"] / t["tokens"], math.exp(t["nll"] / t["tokens"]),
                        math.exp(t["nll_full"] / t["tokens"]), t["tokens"], t["ev"], t["per"]))
    return rows


def standard_runs(policies: list[str], budgets: list[int], base: EvictionConfig,
                  ablations: bool = False, online: bool = False) -> list[tuple[str, EvictionConfig]]:
    """(label, config) for every policy x budget, plus TriAttention's trig/norm-only and online-stats variants."""
    runs = [("full", replace(base, policy="full"))] if "full" in policies else []
    for b in budgets:
        for p in policies:
            if p == "full":
                continue
            runs.append((f"{p}@{b}", replace(base, policy=p, budget=b)))
            if p == "triattention":
                if ablations:
                    runs += [(f"triattention-{t}@{b}", replace(base, policy=p, budget=b, tri_terms=t))
                             for t in ("trig", "norm")]
                if online:
                    runs.append((f"triattention-online@{b}", replace(base, policy=p, budget=b, stats="auto")))
    return runs
