"""The eviction loop: when a sequence's cache reaches budget + divide_length, score it (openclaw.evict.evictor),
compact its pool slots (kernels/kv_compact) and carry per-sequence state across evictions.

It owns what the forward records for the policies, through the runner's taps (openclaw.engine.graphs.StepTap): the
last W post-RoPE queries of each sequence in a device ring buffer (snapkv, rkv), online query statistics
(TriAttention without a stats file, kernels/query_stats.py), and the attention each cached key has received (`mass`,
pool-shaped, added to by the attention kernels themselves through BatchMeta.key_mass: h2o, TriAttention's attention
term). All three are written by device ops only, so a captured decode step records them as well. The queries and
keys are the vectors the model attends with (MLA: absorbed queries against [latent | RoPE key]), at its softmax scale
(BandLayout.scale). Scoring, selection and compaction run between steps and keep a sequence in its slot range, so no
captured step is invalidated. It does not decide what runs or change a sequence (the scheduler does:
Scheduler.compacted after each eviction) and does not score (the evictor does).
"""

from dataclasses import dataclass
from pathlib import Path

import torch

from openclaw.config import EvictionConfig
from openclaw.engine.graphs import StepTap
from openclaw.engine.kv_pool import KVPool
from openclaw.engine.sequence import Sequence
from openclaw.evict.evictor import EvictInputs, TriStats, keep_indices
from openclaw.evict.query_stats import QueryStats
from openclaw.evict.stats_file import load_stats, model_metadata
from openclaw.kernels.kv_compact import kv_compact
from openclaw.models.layers import BandLayout

RING_POLICIES = ("snapkv", "rkv")  # the policies that read each sequence's last W queries


class Compressor:
    graphable = True  # every record is a device op, so a captured decode step may hold the taps

    def __init__(self, cfg: EvictionConfig, pool: KVPool, num_heads: int, omega: torch.Tensor,
                 stats: TriStats | None = None, bands: BandLayout | None = None, max_seqs: int = 1,
                 online: QueryStats | None = None):
        """cfg: a concrete setting (EvictionConfig.for_range); omega: [D/2] the model's RoPE inverse frequencies;
        stats: offline TriAttention statistics; bands: the model's band layout (its blocks, and the softmax scale
        the attention-based policies use; None: one half block at D^-0.5); max_seqs: how many sequences hold a ring
        row at once (the engine's --max-seqs); online: the running sums online statistics continue (a warm start,
        updated in place), None to start from zero."""
        self.cfg, self.pool = cfg, pool
        self.L, _, self.hkv, self.D = pool.k.shape
        self.H = num_heads
        self.omega = omega.float().cpu()
        self.blocks = None if bands is None else bands.blocks
        self.scale = self.D ** -0.5 if bands is None else bands.scale
        self.stats = stats.to(pool.k.device) if stats is not None else None
        self.online = None
        if cfg.evicts and cfg.online:
            self.online = online if online is not None else QueryStats(self.L, num_heads, self.D, pool.k.device,
                                                                       self.blocks)
        # [L, S, Hkv] attention each slot's key has received, carried through compactions (BatchMeta.key_mass)
        self.mass = None
        if self.wants_attention:
            self.mass = torch.zeros(self.L, pool.num_slots, self.hkv, device=pool.k.device)
        # ring[r, l, p % W]: layer l's post-RoPE query of the sequence on row r at position p; row max_seqs is the
        # scratch row that tokens which record nothing (and padded rows) write to
        self.ring = None
        if cfg.evicts and cfg.scorer in RING_POLICIES:
            self.ring = torch.zeros(max_seqs + 1, self.L, cfg.window, num_heads, self.D, dtype=pool.k.dtype,
                                    device=pool.k.device)
        self.scratch = max_seqs
        self.rows: dict[int, int] = {}  # seq_id -> ring row
        self.free_rows = list(range(max_seqs))
        self.kept: dict[int, torch.Tensor] = {}  # seq_id -> [L, Hkv, budget] absolute positions the last eviction kept
        self.evictions = 0

    @classmethod
    def for_model(cls, cfg: EvictionConfig, model: torch.nn.Module, pool: KVPool, max_seqs: int = 1,
                  online: QueryStats | None = None) -> "Compressor":
        mc, bands = model.config, model.bands
        stats = None
        if cfg.evicts and cfg.scorer == "triattention" and not cfg.online:
            stats = load_stats(Path(cfg.stats), model_metadata(model, ""), bands.omega)
        return cls(cfg, pool, mc.num_attention_heads, bands.omega, stats, bands, max_seqs, online)

    @property
    def wants_attention(self) -> bool:
        return self.cfg.evicts and (self.cfg.scorer == "h2o" or (self.cfg.scorer == "triattention" and
                                                                   self.cfg.tri_mass > 0))

    def tap(self, batch: list[tuple[Sequence, int]]) -> StepTap | None:
        """What this step's forward must record (openclaw.engine.runner.Taps), or None when no policy needs it. The
        step's tokens count into the online statistics here, and a sequence's first step clears the attention mass
        of its slots (they held another sequence's)."""
        if self.ring is None and self.online is None and self.mass is None:
            return None
        if self.online is not None:
            self.online.tokens += sum(n for _, n in batch)
        ring_rows = []
        for seq, n in batch:
            if self.mass is not None and seq.num_computed == 0:
                self.mass[:, seq.slot_base:seq.slot_base + seq.capacity] = 0
            row = self._row(seq) if self.ring is not None and seq.kv_budget is not None else self.scratch
            # only the last W tokens of a chunk: two of a longer chunk would share a ring slot
            ring_rows += [self.scratch] * max(0, n - self.cfg.window) + [row] * min(n, self.cfg.window)
        if self.ring is None:  # no query tap at all when only the attention mass is wanted (h2o)
            return StepTap([], [], lambda inputs, slots, positions: None if self.online is None else
                           _QueryTap(self, None, slots, positions), key_mass=self.mass)
        return StepTap([ring_rows], [self.scratch],
                       lambda inputs, slots, positions: _QueryTap(self, inputs[0], slots, positions),
                       key_mass=self.mass)

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
        assert budget == self.cfg.budget, "every evicting sequence keeps the compressor's budget"
        attention = self.mass[:, base:base + n].transpose(1, 2) if self.mass is not None else None  # [L, Hkv, n]
        t = seq.num_computed
        dev = self.pool.k.device
        kept = self.kept.get(seq.seq_id)
        fresh = torch.arange(t - n + (0 if kept is None else budget), t, device=dev).expand(self.L, self.hkv, -1)
        positions = fresh if kept is None else torch.cat([kept, fresh], -1)  # [L, Hkv, n]
        inp = EvictInputs(keys=self.pool.k[:, base:base + n], t=t, pinned=min(seq.pinned, n),
                          queries=self.queries(seq) if self.ring is not None else None, attention=attention,
                          positions=positions, stats=self.tri_stats() if self.cfg.scorer == "triattention" else None,
                          scale=self.scale, blocks=self.blocks)
        keep = keep_indices(self.cfg, inp)
        kv_compact(self.pool.k, self.pool.v, base, keep)
        self.kept[seq.seq_id] = positions.gather(-1, keep.to(dev))
        if self.mass is not None:
            moved = attention.gather(-1, keep.to(attention.device))
            self.mass[:, base:base + seq.capacity] = 0
            self.mass[:, base:base + budget] = moved.transpose(1, 2)
        self.evictions += 1
        return keep

    def release(self, seq: Sequence) -> None:
        self.kept.pop(seq.seq_id, None)
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
    calls: int = 0

    def __call__(self, q_pre: torch.Tensor, q_post: torch.Tensor) -> None:
        comp = self.comp
        layer = self.calls % comp.L
        self.calls += 1
        if comp.online is not None:
            comp.online.add(layer, q_pre, self.slots)
        if self.ring_rows is not None:
            comp.ring[self.ring_rows, layer, self.positions % comp.cfg.window] = q_post.to(comp.ring.dtype)
