"""The KV compression loop: when a budgeted sequence's cache reaches budget + divide_length tokens, score it
(openclaw.evict.evictor), compact its pool slots (kernels/kv_compact) and carry per-sequence state across evictions.

It owns the query tap that collects what the policies need from the forward: the last W post-RoPE queries
(snapkv, rkv), the attention each cached token has received (h2o: recomputed from the queries, one extra QK^T of
the step), and online query statistics (triattention with --stats auto). The queries and keys are the vectors the
model attends with (MLA: absorbed queries against [latent | RoPE key]), at its softmax scale (BandLayout.scale). It does not decide what runs or change a
sequence (the scheduler does: Scheduler.compacted after each eviction) and does not score (the evictor does).
"""

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from openclaw.config import EvictionConfig
from openclaw.engine.kv_pool import KVPool
from openclaw.engine.sequence import Sequence
from openclaw.evict.calibrate import QueryStats, load_stats
from openclaw.evict.evictor import EvictInputs, TriStats, keep_indices
from openclaw.kernels.kv_compact import kv_compact
from openclaw.models.layers import BandLayout


@dataclass
class _SeqState:
    queries: torch.Tensor | None = None  # [L, W, H, D] post-RoPE queries of the last W tokens
    attention: torch.Tensor | None = None  # [L, Hkv, capacity] attention received, carried through evictions


class Compressor:
    def __init__(self, cfg: EvictionConfig, pool: KVPool, num_heads: int, omega: torch.Tensor,
                 stats: TriStats | None = None, bands: BandLayout | None = None):
        """omega: [D/2] the model's RoPE inverse frequencies; stats: offline TriAttention statistics; bands: the
        model's band layout (its blocks, and the softmax scale the attention-based policies use; None: one half
        block at D^-0.5)."""
        self.cfg, self.pool = cfg, pool
        self.L, _, self.hkv, self.D = pool.k.shape
        self.H = num_heads
        self.omega = omega.float().cpu()
        self.blocks = None if bands is None else bands.blocks
        self.scale = self.D ** -0.5 if bands is None else bands.scale
        self.stats = stats.to(pool.k.device) if stats is not None else None
        online = cfg.policy == "triattention" and cfg.stats == "auto"
        self.online = QueryStats(self.L, num_heads, self.D, pool.k.device, self.blocks) if online else None
        self.states: dict[int, _SeqState] = {}
        self.evictions = 0

    @classmethod
    def for_model(cls, cfg: EvictionConfig, model: torch.nn.Module, pool: KVPool) -> "Compressor":
        mc, bands = model.config, model.bands
        stats = None
        if cfg.policy == "triattention" and cfg.stats != "auto":
            stats = load_stats(Path(cfg.stats), mc.num_hidden_layers, mc.num_attention_heads, bands.width,
                               bands.omega, bands)
        return cls(cfg, pool, mc.num_attention_heads, bands.omega, stats, bands)

    def tap(self, batch: list[tuple[Sequence, int]]) -> Callable | None:
        """A BatchMeta.query_tap for this step, or None when no policy needs the queries."""
        wants = self.cfg.policy in ("snapkv", "rkv", "h2o")
        if not (wants or self.online):
            return None
        rows, t = [], 0
        for seq, n in batch:
            if wants and seq.kv_budget is not None:
                rows.append((t, n, seq))
            t += n
        return _QueryTap(self, rows)

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
        st = self.states.get(seq.seq_id, _SeqState())
        attention = st.attention[..., :n] if st.attention is not None else None
        inp = EvictInputs(keys=self.pool.k[:, base:base + n], t=seq.num_computed,
                          prompt_cached=min(seq.prompt_len, n), queries=st.queries, attention=attention,
                          stats=self.tri_stats() if self.cfg.policy == "triattention" else None, scale=self.scale,
                          blocks=self.blocks)
        keep = keep_indices(self.cfg, inp)
        kv_compact(self.pool.k, self.pool.v, base, keep)
        if st.attention is not None:
            kept = st.attention[..., :n].gather(-1, keep.to(st.attention.device))
            st.attention.zero_()
            st.attention[..., :budget] = kept
        self.evictions += 1
        return keep

    def state(self, seq: Sequence) -> _SeqState:
        st = self.states.get(seq.seq_id)
        if st is None:
            dev = self.pool.k.device
            st = self.states[seq.seq_id] = _SeqState()
            if self.cfg.policy in ("snapkv", "rkv"):
                st.queries = torch.zeros(self.L, self.cfg.window, self.H, self.D, device=dev)
            if self.cfg.policy == "h2o":
                st.attention = torch.zeros(self.L, self.hkv, seq.capacity, device=dev)
        return st

    def release(self, seq: Sequence) -> None:
        self.states.pop(seq.seq_id, None)


class _QueryTap:
    """Called by each attention layer in order with (pre-RoPE, post-RoPE) queries [T, H, D] of the whole step."""

    def __init__(self, comp: Compressor, rows: list[tuple[int, int, Sequence]]):
        self.comp, self.rows, self.calls = comp, rows, 0

    def __call__(self, q_pre: torch.Tensor, q_post: torch.Tensor) -> None:
        comp = self.comp
        layer = self.calls % comp.L
        self.calls += 1
        if comp.online is not None:
            comp.online.update(layer, q_pre)
        for start, n, seq in self.rows:
            st = comp.state(seq)
            q = q_post[start:start + n].float()
            if st.queries is not None:
                w = st.queries.shape[1]
                st.queries[layer] = q[-w:] if n >= w else torch.cat([st.queries[layer, n:], q])
            if st.attention is not None:
                kv = seq.kv_len + n  # the runner counts this step's tokens after the forward
                keys = comp.pool.k[layer, seq.slot_base:seq.slot_base + kv].float()  # [kv, Hkv, D]
                st.attention[layer, :, :kv] += _received(q, keys, comp.scale)


def _received(q: torch.Tensor, keys: torch.Tensor, scale: float) -> torch.Tensor:
    """Attention mass [Hkv, kv] each key receives from queries q [n, H, D] (the last n slots, causal) at the model's
    softmax scale, summed over the queries and over the query heads of each KV head's group."""
    n, H, D = q.shape
    kv, hkv = keys.shape[0], keys.shape[1]
    qg = q.view(n, hkv, H // hkv, D).permute(1, 2, 0, 3)  # [Hkv, G, n, D]
    logits = qg @ keys.permute(1, 2, 0)[:, None] * scale  # [Hkv, G, n, kv]
    future = torch.arange(kv, device=q.device)[None, :] > torch.arange(kv - n, kv, device=q.device)[:, None]
    return torch.softmax(logits.masked_fill(future, float("-inf")), dim=-1).sum((1, 2))
