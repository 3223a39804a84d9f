"""TriAttention calibration: pre-RoPE query statistics of a model over text or over its own generated traces, and
the concentration report (TRIATTENTION.md sections 1 and 2).

Calibration runs the tokens through the engine's scheduler and runner in independent contexts and sums the queries
its taps see into a QueryStats (openclaw.evict.query_stats: fp64, device ops only, in the model's band layout). It
does not write files (stats_file.py, query_stats.py), generate traces (openclaw.eval.traces), score or evict
(openclaw.evict.evictor).
"""

from collections.abc import Callable
from dataclasses import dataclass

import torch

from openclaw.config import SamplingParams
from openclaw.engine.graphs import StepTap
from openclaw.engine.kv_pool import KVPool
from openclaw.engine.runner import Runner
from openclaw.engine.scheduler import Scheduler
from openclaw.engine.sequence import Sequence
from openclaw.evict.evictor import TriStats
from openclaw.evict.query_stats import QueryStats


class StatsTaps:
    """Runner taps (openclaw.engine.runner.Taps) that feed every layer's pre-RoPE queries to a QueryStats."""

    graphable = True

    def __init__(self, stats: QueryStats, num_layers: int):
        self.stats, self.num_layers = stats, num_layers

    def tap(self, batch: list[tuple[Sequence, int]]) -> StepTap:
        self.stats.tokens += sum(n for _, n in batch)
        return StepTap([], [], self._bind)

    def _bind(self, inputs: torch.Tensor, slots: torch.Tensor, positions: torch.Tensor):
        calls = iter(range(1 << 62))

        def record(q_pre: torch.Tensor, q_post: torch.Tensor) -> None:
            self.stats.add(next(calls) % self.num_layers, q_pre, slots)

        return record


@torch.inference_mode()
def calibrate(model: torch.nn.Module, ids: list[int], context: int = 4096, chunk: int = 512,
              progress: Callable[[str, int, int], None] | None = None) -> QueryStats:
    """Run ids through the model in independent contexts of `context` tokens, in chunks of `chunk` through the
    engine's scheduler and runner; accumulate pre-RoPE query stats. progress(what, tokens done, tokens) after each
    chunk."""
    cfg, bands = model.config, model.bands
    norm = model.model.norm.weight  # a plain parameter in the activation dtype, also when the embedding is quantized
    device, dtype = norm.device, norm.dtype
    stats = QueryStats(cfg.num_hidden_layers, cfg.num_attention_heads, bands.width, device, blocks=bands.blocks)
    taps = StatsTaps(stats, cfg.num_hidden_layers)
    pool = KVPool.for_config(cfg, context, dtype, device)
    runner = Runner(model, pool, device)
    for start in range(0, len(ids), context):
        window = ids[start:start + context]
        seq = Sequence(window, SamplingParams(max_tokens=1), max_len=len(window))
        scheduler = Scheduler(pool.allocator, max_seqs=1, max_batch_tokens=chunk)
        scheduler.add(seq)
        while seq.num_computed < len(window):
            batch = scheduler.schedule()
            runner.step(batch, taps, rows=[])
            scheduler.advance(batch)
            if progress:
                progress("calibrating", start + seq.num_computed, len(ids))
        scheduler.finish(seq, "length")
    return stats


@dataclass
class Concentration:
    """Per layer: the A-weighted mean R over heads and bands, and the share of heads whose dominant bands have
    R > 0.95 (dominant: the top eighth of bands by E|q_f|, at least one; R averaged over them, weighted by A)."""

    mean_r: list[float]
    share_concentrated: list[float]

    @property
    def overall_share(self) -> float:
        return sum(self.share_concentrated) / len(self.share_concentrated)


def concentration(stats: TriStats, threshold: float = 0.95) -> Concentration:
    a = stats.a_mean.clamp_min(1e-12)
    r = torch.sqrt(stats.mu_re ** 2 + stats.mu_im ** 2) / a  # [L, H, F]
    mean_r = ((r * a).sum((1, 2)) / a.sum((1, 2))).tolist()
    return Concentration(mean_r, (dominant_r(stats) > threshold).float().mean(-1).tolist())


def dominant_r(stats: TriStats) -> torch.Tensor:
    """[L, H] the A-weighted R of each head's dominant bands (as in the concentration report)."""
    a = stats.a_mean.clamp_min(1e-12)
    r = torch.sqrt(stats.mu_re ** 2 + stats.mu_im ** 2) / a
    idx = a.topk(max(1, a.shape[-1] // 8), dim=-1).indices
    return (r.gather(-1, idx) * a.gather(-1, idx)).sum(-1) / a.gather(-1, idx).sum(-1)
