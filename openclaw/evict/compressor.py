"""The eviction loop: when a sequence's cache reaches budget + divide_length, score it (openclaw.evict.evictor),
compact its pool slots (kernels/kv_compact) and carry per-sequence state across evictions.

It owns what the policies need from the forward: the attention each cached key has received (`mass`, pool-shaped,
added to by the attention itself through BatchMeta.key_mass: h2o, TriAttention's attention term), and the query tap
for the last W post-RoPE queries (snapkv, rkv) and online query statistics (TriAttention without a stats file).
Online statistics are fed by every step that runs eagerly anyway (a prefill chunk) and by every step of a sequence
that can outgrow its slots; a decode step of sequences that fit runs untapped (on a GPU: a CUDA graph).
It does not decide what runs or change a sequence (the scheduler does: Scheduler.compacted after each eviction)
and does not score (the evictor does).
"""

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from openclaw.config import EvictionConfig
from openclaw.engine.kv_pool import KVPool
from openclaw.engine.sequence import Sequence
from openclaw.evict.evictor import EvictInputs, TriStats, keep_indices
from openclaw.evict.query_stats import QueryStats
from openclaw.evict.stats_file import load_stats, model_metadata
from openclaw.kernels.kv_compact import kv_compact


@dataclass
class _SeqState:
    queries: torch.Tensor | None = None  # [L, W, H, D] post-RoPE queries of the last W tokens
    kept: torch.Tensor | None = None  # [L, Hkv, budget] absolute positions of the entries the last compaction kept


class Compressor:
    def __init__(self, cfg: EvictionConfig, pool: KVPool, num_heads: int, omega: torch.Tensor,
                 stats: TriStats | None = None, online: QueryStats | None = None):
        """cfg: a concrete setting (EvictionConfig.for_range); omega: [D/2] the model's RoPE inverse frequencies;
        stats: offline TriAttention statistics; online: the running sums online statistics continue (a warm start,
        updated in place), None to start from zero."""
        self.cfg, self.pool = cfg, pool
        self.L, _, self.hkv, self.D = pool.k.shape
        self.H = num_heads
        self.omega = omega.float().cpu()
        self.stats = stats.to(pool.k.device) if stats is not None else None
        self.online = None
        if cfg.evicts and cfg.online:
            self.online = online if online is not None else QueryStats(self.L, num_heads, self.D, pool.k.device)
        # [L, S, Hkv] attention each slot's key has received, carried through compactions (BatchMeta.key_mass)
        self.mass = torch.zeros(self.L, pool.num_slots, self.hkv, device=pool.k.device) if self.wants_attention \
            else None
        self.states: dict[int, _SeqState] = {}
        self.evictions = 0

    @classmethod
    def for_model(cls, cfg: EvictionConfig, model: torch.nn.Module, pool: KVPool,
                  online: QueryStats | None = None) -> "Compressor":
        stats = None
        if cfg.evicts and cfg.scorer == "triattention" and not cfg.online:
            stats = load_stats(Path(cfg.stats), model_metadata(model, ""), model.rope.inv_freq)
        return cls(cfg, pool, model.config.num_attention_heads, model.rope.inv_freq, stats, online)

    @property
    def wants_attention(self) -> bool:
        return self.cfg.evicts and (self.cfg.scorer == "h2o" or (self.cfg.scorer == "triattention" and
                                                                   self.cfg.tri_mass > 0))

    def tap(self, batch: list[tuple[Sequence, int]]) -> Callable | None:
        """A BatchMeta.query_tap for this step, or None when nothing needs the queries. (Also clears the attention
        mass of a sequence's slots before its first step: they held another sequence's.)"""
        wants = self.cfg.evicts and self.cfg.scorer in ("snapkv", "rkv")
        rows, t = [], 0
        for seq, n in batch:
            if self.mass is not None and seq.num_computed == 0:
                self.mass[:, seq.slot_base:seq.slot_base + seq.capacity] = 0
            if wants and seq.kv_budget is not None:
                rows.append((t, n, seq))
            t += n
        feed = self.online is not None and any(n > 1 or seq.bounded for seq, n in batch)
        if not (rows or feed):
            return None
        return _QueryTap(self, rows, feed)

    @staticmethod
    def due(seq: Sequence) -> bool:
        """Whether seq's cache has reached budget + divide_length and must be compressed before its next step."""
        return seq.kv_budget is not None and seq.kv_len >= seq.kv_budget + seq.divide_length

    def tri_stats(self) -> TriStats | None:
        if self.online is not None:
            return self.online.tri_stats(self.omega.to(self.pool.k.device))
        return self.stats

    @torch.inference_mode()
    def evict(self, seq: Sequence) -> torch.Tensor:
        """Compress seq's cache to its budget (its kept entries move to the front of its slots); returns the keep
        indices [L, Hkv, budget]. The caller tells the scheduler (Scheduler.compacted)."""
        n, base, budget = seq.kv_len, seq.slot_base, seq.kv_budget
        assert budget == self.cfg.budget, "every evicting sequence keeps the compressor's budget"
        st = self.states.get(seq.seq_id, _SeqState())
        attention = self.mass[:, base:base + n].transpose(1, 2) if self.mass is not None else None  # [L, Hkv, n]
        t = seq.num_computed
        dev = self.pool.k.device
        fresh = torch.arange(t - n + (0 if st.kept is None else budget), t, device=dev).expand(self.L, self.hkv, -1)
        positions = fresh if st.kept is None else torch.cat([st.kept, fresh], -1)  # [L, Hkv, n]
        inp = EvictInputs(keys=self.pool.k[:, base:base + n], t=t, pinned=min(seq.pinned, n),
                          queries=st.queries, attention=attention, positions=positions,
                          stats=self.tri_stats() if self.cfg.scorer == "triattention" else None)
        keep = keep_indices(self.cfg, inp)
        kv_compact(self.pool.k, self.pool.v, base, keep)
        st.kept = positions.gather(-1, keep.to(dev))
        self.states[seq.seq_id] = st
        if self.mass is not None:
            kept = attention.gather(-1, keep.to(attention.device))
            self.mass[:, base:base + seq.capacity] = 0
            self.mass[:, base:base + budget] = kept.transpose(1, 2)
        self.evictions += 1
        return keep

    def state(self, seq: Sequence) -> _SeqState:
        st = self.states.get(seq.seq_id)
        if st is None:
            dev = self.pool.k.device
            st = self.states[seq.seq_id] = _SeqState()
            if self.cfg.scorer in ("snapkv", "rkv"):
                st.queries = torch.zeros(self.L, self.cfg.window, self.H, self.D, device=dev)
        return st

    def release(self, seq: Sequence) -> None:
        self.states.pop(seq.seq_id, None)


class _QueryTap:
    """Called by each attention layer in order with (pre-RoPE, post-RoPE) queries [T, H, D] of the whole step."""

    def __init__(self, comp: Compressor, rows: list[tuple[int, int, Sequence]], feed: bool):
        self.comp, self.rows, self.feed, self.calls = comp, rows, feed, 0

    def __call__(self, q_pre: torch.Tensor, q_post: torch.Tensor) -> None:
        comp = self.comp
        layer = self.calls % comp.L
        self.calls += 1
        if self.feed:
            comp.online.update(layer, q_pre)
        for start, n, seq in self.rows:
            st = comp.state(seq)
            q = q_post[start:start + n].float()
            w = st.queries.shape[1]
            st.queries[layer] = q[-w:] if n >= w else torch.cat([st.queries[layer, n:], q])
