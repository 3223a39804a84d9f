"""The KV compression loop: when a budgeted sequence's cache reaches budget + divide_length tokens, score it
(openclaw.evict.evictor), compact its pool slots (kernels/kv_compact) and carry per-sequence state across evictions.

It owns what the forward records for the policies, through the runner's taps (openclaw.engine.graphs.StepTap): the
last W post-RoPE queries of each sequence in a device ring buffer (snapkv, rkv) and online query statistics
(triattention with --stats auto, kernels/query_stats.py), both written by device ops only, so a captured decode step
records them as well; and the attention each cached token has received (h2o), recomputed from the queries by one
extra QK^T of the step in PyTorch per sequence, which needs host lengths: H2O steps run eagerly (graphable is
False). The queries and keys are the vectors the model attends with (MLA: absorbed queries against [latent | RoPE
key]), at its softmax scale (BandLayout.scale). Scoring, selection and compaction run between steps and keep a
sequence in its slot range, so no captured step is invalidated. It does not decide what runs or change a sequence
(the scheduler does: Scheduler.compacted after each eviction) and does not score (the evictor does).
"""

from dataclasses import dataclass
from pathlib import Path

import torch

from openclaw.config import EvictionConfig
from openclaw.engine.graphs import StepTap
from openclaw.engine.kv_pool import KVPool
from openclaw.engine.sequence import Sequence
from openclaw.evict.calibrate import QueryStats, load_stats
from openclaw.evict.evictor import EvictInputs, TriStats, keep_indices
from openclaw.kernels.kv_compact import kv_compact
from openclaw.models.layers import BandLayout

RING_POLICIES = ("snapkv", "rkv")  # the policies that read each sequence's last W queries


class Compressor:
    def __init__(self, cfg: EvictionConfig, pool: KVPool, num_heads: int, omega: torch.Tensor,
                 stats: TriStats | None = None, bands: BandLayout | None = None, max_seqs: int = 1):
        """omega: [D/2] the model's RoPE inverse frequencies; stats: offline TriAttention statistics; bands: the
        model's band layout (its blocks, and the softmax scale the attention-based policies use; None: one half
        block at D^-0.5); max_seqs: how many sequences hold a ring row at once (the engine's --max-seqs)."""
        self.cfg, self.pool = cfg, pool
        self.L, _, self.hkv, self.D = pool.k.shape
        self.H = num_heads
        self.omega = omega.float().cpu()
        self.blocks = None if bands is None else bands.blocks
        self.scale = self.D ** -0.5 if bands is None else bands.scale
        self.stats = stats.to(pool.k.device) if stats is not None else None
        online = cfg.policy == "triattention" and cfg.stats == "auto"
        self.online = QueryStats(self.L, num_heads, self.D, pool.k.device, self.blocks) if online else None
        # ring[r, l, p % W]: layer l's post-RoPE query of the sequence on row r at position p; row max_seqs is the
        # scratch row that tokens which record nothing (and padded rows) write to
        self.ring = None
        if cfg.policy in RING_POLICIES:
            self.ring = torch.zeros(max_seqs + 1, self.L, cfg.window, num_heads, self.D, dtype=pool.k.dtype,
                                    device=pool.k.device)
        self.scratch = max_seqs
        self.rows: dict[int, int] = {}  # seq_id -> ring row
        self.free_rows = list(range(max_seqs))
        self.attention: dict[int, torch.Tensor] = {}  # h2o: seq_id -> [L, Hkv, capacity] attention received
        self.evictions = 0

    @classmethod
    def for_model(cls, cfg: EvictionConfig, model: torch.nn.Module, pool: KVPool, max_seqs: int = 1) -> "Compressor":
        mc, bands = model.config, model.bands
        stats = None
        if cfg.policy == "triattention" and cfg.stats != "auto":
            stats = load_stats(Path(cfg.stats), mc.num_hidden_layers, mc.num_attention_heads, bands.width,
                               bands.omega, bands)
        return cls(cfg, pool, mc.num_attention_heads, bands.omega, stats, bands, max_seqs)

    @property
    def graphable(self) -> bool:
        """Whether a captured decode step may hold this compressor's taps (H2O's is eager)."""
        return self.cfg.policy != "h2o"

    def tap(self, batch: list[tuple[Sequence, int]]) -> StepTap | None:
        """What this step's forward must record (openclaw.engine.runner.Taps), or None when no policy needs the
        queries. The step's tokens count into the online statistics here."""
        h2o = self.cfg.policy == "h2o"
        if self.ring is None and self.online is None and not h2o:
            return None
        if self.online is not None:
            self.online.tokens += sum(n for _, n in batch)
        ring_rows, h2o_rows, t = [], [], 0
        for seq, n in batch:
            row = self._row(seq) if self.ring is not None and seq.kv_budget is not None else self.scratch
            # only the last W tokens of a chunk: two of a longer chunk would share a ring slot
            ring_rows += [self.scratch] * max(0, n - self.cfg.window) + [row] * min(n, self.cfg.window)
            if h2o and seq.kv_budget is not None:
                h2o_rows.append((t, n, seq))
            t += n
        if self.ring is None:
            return StepTap([], [], lambda inputs, slots, positions: _QueryTap(self, None, slots, positions, h2o_rows))
        return StepTap([ring_rows], [self.scratch],
                       lambda inputs, slots, positions: _QueryTap(self, inputs[0], slots, positions, h2o_rows))

    def _row(self, seq: Sequence) -> int:
        row = self.rows.get(seq.seq_id)
        if row is None:
            if not self.free_rows:
                raise RuntimeError(f"more sequences than the {self.scratch} ring rows (max_seqs) the compressor has")
            row = self.rows[seq.seq_id] = self.free_rows.pop()
            self.ring[row].zero_()
        return row

    @staticmethod
    def due(seq: Sequence) -> bool:
        """Whether seq's cache has reached budget + divide_length and must be compressed before its next step."""
        return seq.kv_budget is not None and seq.kv_len >= seq.kv_budget + seq.divide_length

    def tri_stats(self) -> TriStats | None:
        if self.online is not None:
            return self.online.tri_stats(self.omega.to(self.pool.k.device))
        return self.stats

    def queries(self, seq: Sequence) -> torch.Tensor:
        """[L, W, H, D] fp32: seq's last W post-RoPE queries, oldest first (the ring slot of position p is p % W)."""
        ring = self.ring[self.rows[seq.seq_id]]
        return ring.roll(-(seq.num_computed % self.cfg.window), dims=1).float()

    @torch.inference_mode()
    def evict(self, seq: Sequence) -> torch.Tensor:
        """Compress seq's cache to its budget (its kept entries move to the front of its slots); returns the keep
        indices [L, Hkv, budget]. The caller tells the scheduler (Scheduler.compacted)."""
        n, base, budget = seq.kv_len, seq.slot_base, seq.kv_budget
        attention = self.attention.get(seq.seq_id)
        inp = EvictInputs(keys=self.pool.k[:, base:base + n], t=seq.num_computed,
                          prompt_cached=min(seq.prompt_len, n),
                          queries=self.queries(seq) if self.ring is not None else None,
                          attention=None if attention is None else attention[..., :n],
                          stats=self.tri_stats() if self.cfg.policy == "triattention" else None, scale=self.scale,
                          blocks=self.blocks)
        keep = keep_indices(self.cfg, inp)
        kv_compact(self.pool.k, self.pool.v, base, keep)
        if attention is not None:
            kept = attention[..., :n].gather(-1, keep.to(attention.device))
            attention.zero_()
            attention[..., :budget] = kept
        self.evictions += 1
        return keep

    def received(self, seq: Sequence) -> torch.Tensor:
        """h2o: [L, Hkv, capacity] fp32 attention seq's cached tokens have received, created on first use."""
        att = self.attention.get(seq.seq_id)
        if att is None:
            att = self.attention[seq.seq_id] = torch.zeros(self.L, self.hkv, seq.capacity, device=self.pool.k.device)
        return att

    def release(self, seq: Sequence) -> None:
        self.attention.pop(seq.seq_id, None)
        row = self.rows.pop(seq.seq_id, None)
        if row is not None:
            self.free_rows.append(row)


@dataclass
class _QueryTap:
    """BatchMeta.query_tap: called by each attention layer in order with (pre-RoPE, post-RoPE) queries [T, H, D] of
    the whole step. ring_rows [T]: where each token's query goes (device); slots, positions: the step's [T]."""

    comp: Compressor
    ring_rows: torch.Tensor | None
    slots: torch.Tensor
    positions: torch.Tensor
    h2o: list[tuple[int, int, Sequence]]
    calls: int = 0

    def __call__(self, q_pre: torch.Tensor, q_post: torch.Tensor) -> None:
        comp = self.comp
        layer = self.calls % comp.L
        self.calls += 1
        if comp.online is not None:
            comp.online.add(layer, q_pre, self.slots)
        if self.ring_rows is not None:
            comp.ring[self.ring_rows, layer, self.positions % comp.cfg.window] = q_post.to(comp.ring.dtype)
        for start, n, seq in self.h2o:
            kv = seq.kv_len + n  # the scheduler counts this step's tokens after the forward
            keys = comp.pool.k[layer, seq.slot_base:seq.slot_base + kv].float()  # [kv, Hkv, D]
            comp.received(seq)[layer, :, :kv] += _received(q_post[start:start + n].float(), keys, comp.scale)


def _received(q: torch.Tensor, keys: torch.Tensor, scale: float) -> torch.Tensor:
    """Attention mass [Hkv, kv] each key receives from queries q [n, H, D] (the last n slots, causal) at the model's
    softmax scale, summed over the queries and over the query heads of each KV head's group."""
    n, H, D = q.shape
    kv, hkv = keys.shape[0], keys.shape[1]
    qg = q.view(n, hkv, H // hkv, D).permute(1, 2, 0, 3)  # [Hkv, G, n, D]
    logits = qg @ keys.permute(1, 2, 0)[:, None] * scale  # [Hkv, G, n, kv]
    future = torch.arange(kv, device=q.device)[None, :] > torch.arange(kv - n, kv, device=q.device)[:, None]
    return torch.softmax(logits.masked_fill(future, float("-inf")), dim=-1).sum((1, 2))
