"""Eviction policies: score a sequence's cached tokens and pick the ones to keep (TRIATTENTION.md 3, 4 and 7).

Inputs are tensors the caller gathers (the sequence's post-RoPE keys, its recent post-RoPE queries, accumulated
attention, calibration statistics); the output is keep indices [L, Hkv, budget] per (layer, KV head), sorted, so
kept tokens stay in temporal order. Every policy keeps the same always-kept ends: the pinned prompt (and streaming's
sinks) at the front, the protected recent tokens (and each policy's own recent window) at the back; only the
tokens between compete. Nothing here reads or writes the KV pool's storage (openclaw.evict.compressor does).
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from openclaw.config import EvictionConfig
from openclaw.evict.bands import Blocks, tri_score_blocks
from openclaw.evict.triattention import head_z, per_head, per_layer, union, zscore
from openclaw.kernels.tri_score import tri_score


@dataclass
class TriStats:
    """Per (layer, query head) pre-RoPE query statistics: mu = E[q_f] (real, imag) and A = E[|q_f|], [L, H, F] fp32;
    omega: [F] the model's (scaled) RoPE inverse frequencies; heads: [L, H] bool, which heads have statistics (a
    reference file may cover a subset, `sampled_heads`; None: all)."""

    mu_re: torch.Tensor
    mu_im: torch.Tensor
    a_mean: torch.Tensor
    omega: torch.Tensor
    heads: torch.Tensor | None = None

    def to(self, device) -> "TriStats":
        heads = None if self.heads is None else self.heads.to(device)
        return TriStats(*(x.to(device) for x in (self.mu_re, self.mu_im, self.a_mean, self.omega)), heads)

    def sampled(self) -> torch.Tensor:
        """[L, H] bool: the heads that have statistics."""
        if self.heads is not None:
            return self.heads
        return torch.ones(self.mu_re.shape[:2], dtype=torch.bool, device=self.mu_re.device)


@dataclass
class EvictInputs:
    """What one eviction of one sequence sees. keys: [L, n, Hkv, D] post-RoPE (may be a view of the pool);
    queries: [L, W, H, D] post-RoPE queries of the last W tokens (snapkv, rkv); attention: [L, Hkv, n] attention
    received so far (h2o, TriAttention's attention term); stats (triattention); t: the next token's absolute position;
    pinned: how many tokens at the front of the cache are never evicted (the pinned prompt); positions: [L, Hkv, n]
    the absolute position of each cached entry. scale: the model's softmax scale (None: D^-0.5); blocks: the RoPE
    blocks of a key (models/layers.BandLayout; None: one half-layout block), several for MLA's [latent | RoPE key]."""

    keys: torch.Tensor
    t: int
    pinned: int = 0
    queries: torch.Tensor | None = None
    attention: torch.Tensor | None = None
    stats: TriStats | None = None
    positions: torch.Tensor | None = None
    scale: float | None = None
    blocks: Blocks | None = None


def kept_ends(cfg: EvictionConfig, n: int, pinned: int) -> tuple[int, int]:
    """(front, back): how many of the oldest and of the newest cached tokens are always kept."""
    policy = cfg.scorer
    front = pinned
    if policy == "streaming":
        front = max(front, cfg.sinks)
    back = cfg.protect_recent
    if policy in ("snapkv", "rkv"):
        back = max(back, cfg.window)
    if policy == "h2o":
        back = max(back, cfg.budget // 2)
    if policy == "triattention":
        back = max(back, int(cfg.budget * cfg.recent_share))
    if front > cfg.budget:
        raise ValueError(f"{front} pinned tokens exceed the budget {cfg.budget}")
    back = cfg.budget - front if policy == "streaming" else min(back, cfg.budget - front)
    return min(front, n), min(back, n - front)


def select(scores: torch.Tensor, n: int, front: int, back: int, budget: int) -> torch.Tensor:
    """scores: [L, Hkv, m] or [Hkv, m] over the m = n - front - back candidates (higher keeps); returns keep
    [..., budget] sorted. Ties go to the older token (a stable sort), so the result is deterministic."""
    k = budget - front - back
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices[..., :k] + front
    lead = scores.shape[:-1]
    dev = scores.device
    ends = (torch.arange(front, device=dev).expand(*lead, front), torch.arange(n - back, n, device=dev).expand(*lead, back))
    return torch.cat([ends[0], order.sort(dim=-1).values, ends[1]], dim=-1)


def triattention_scores(inp: EvictInputs, cfg: EvictionConfig) -> torch.Tensor:
    """Raw scores [L, H, n] of every cached key for every query head (post-RoPE form; Triton on the GPU).
    disable_mlr (the reference's ablation) weighs the norm term by A_f instead of A_f - |mu_f|: the same kernel with
    A_f + |mu_f| passed as A_f."""
    s = inp.stats
    a_mean = s.a_mean + torch.sqrt(s.mu_re ** 2 + s.mu_im ** 2) if cfg.disable_mlr else s.a_mean
    if inp.blocks is not None and len(inp.blocks) > 1:  # MLA: openclaw/evict/bands.py
        return tri_score_blocks(inp.keys, s.mu_re, s.mu_im, a_mean, s.omega, inp.t, inp.blocks, cfg.tri_terms)
    return tri_score(inp.keys, s.mu_re, s.mu_im, a_mean, s.omega, inp.t, terms=cfg.tri_terms)


def triattention_keep(cfg: EvictionConfig, inp: EvictInputs, front: int, back: int) -> torch.Tensor:
    """Keep indices [L, Hkv, budget] in cfg.tri_select's mode (openclaw.evict.triattention)."""
    L, n, hkv, _ = inp.keys.shape
    z = head_z(triattention_scores(inp, cfg)[..., front:n - back], cfg.seed)
    heads = inp.stats.sampled()
    extra = None
    if cfg.tri_mass and inp.attention is not None:
        mass = inp.attention[..., front:n - back]
        if cfg.mass_per_query:  # mean attention per query that has seen the key: no bias toward old keys
            mass = mass / (inp.t - inp.positions[..., front:n - back]).clamp_min(1)
        extra = cfg.tri_mass * zscore(torch.log(mass + 1e-6))
    if cfg.tri_select == "per_layer_perhead":
        return select(per_layer(z, heads, hkv, extra), n, front, back, cfg.budget)
    if cfg.tri_select == "union":
        shared = union(z, heads, cfg.budget - front - back).expand(hkv, -1)
    else:
        shared = per_head(z, heads, hkv, extra)
    return select(shared, n, front, back, cfg.budget)[None].expand(L, -1, -1).contiguous()


def window_attention(queries: torch.Tensor, keys: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """Softmax attention [L, Hkv, G, W, n] (fp32) of the last W queries [L, W, H, D] to keys [L, n, Hkv, D] at the
    model's scale (default D^-0.5); query w sits at slot n - W + w and sees slots up to itself, as in the forward."""
    L, W, H, D = queries.shape
    n, hkv = keys.shape[1], keys.shape[2]
    q = queries.float().view(L, W, hkv, H // hkv, D).permute(0, 2, 3, 1, 4)  # [L, Hkv, G, W, D]
    k = keys.float().permute(0, 2, 1, 3)[:, :, None]  # [L, Hkv, 1, n, D]
    logits = (q @ k.transpose(-1, -2)) * (D ** -0.5 if scale is None else scale)
    future = torch.arange(n, device=keys.device)[None, :] > torch.arange(n - W, n, device=keys.device)[:, None]
    return torch.softmax(logits.masked_fill(future, float("-inf")), dim=-1)


def _pool(x: torch.Tensor, kernel: int) -> torch.Tensor:
    """Max-pool [L, Hkv, n] along tokens with stride 1 (so a kept token brings its neighbours)."""
    L, hkv, n = x.shape
    return F.max_pool1d(x.reshape(L * hkv, 1, n), kernel, stride=1, padding=kernel // 2).view(L, hkv, n)


def snapkv_scores(inp: EvictInputs, cfg: EvictionConfig) -> torch.Tensor:
    """Attention of the last W queries summed over the window, max over the GQA group, max-pooled: [L, Hkv, n]."""
    return _pool(window_attention(inp.queries, inp.keys, inp.scale).sum(3).amax(2), cfg.pool_kernel)


def redundancy(keys: torch.Tensor, threshold: float) -> torch.Tensor:
    """R-KV redundancy [Hkv, n] of one layer's keys [n, Hkv, D]: mean over other tokens of the key cosine similarity
    where it exceeds threshold, with each token's most recent similar copy exempt; softmaxed over tokens."""
    k = F.normalize(keys.float().transpose(0, 1), dim=-1)  # [Hkv, n, D]
    n = k.shape[1]
    sim = k @ k.transpose(1, 2)
    sim.diagonal(dim1=1, dim2=2).zero_()
    similar = sim > threshold
    cols = torch.arange(n, device=k.device).expand_as(sim)
    latest = torch.where(similar, cols, -1).amax(-1)  # [Hkv, n]; -1 when a token has no copy
    sim = sim * similar
    rows = latest >= 0
    h_idx, r_idx = rows.nonzero(as_tuple=True)
    sim[h_idx, r_idx, latest[rows]] = 0
    return (sim.sum(-1) / n).softmax(-1)


def rkv_scores(inp: EvictInputs, cfg: EvictionConfig) -> torch.Tensor:
    """lambda * importance (window attention averaged over the window, max over the group, pooled)
    - (1 - lambda) * redundancy: [L, Hkv, n]."""
    importance = _pool(window_attention(inp.queries, inp.keys, inp.scale).mean(3).amax(2), cfg.pool_kernel)
    red = torch.stack([redundancy(inp.keys[layer], cfg.rkv_threshold) for layer in range(inp.keys.shape[0])])
    return cfg.rkv_lambda * importance - (1 - cfg.rkv_lambda) * red


def keep_indices(cfg: EvictionConfig, inp: EvictInputs) -> torch.Tensor:
    """Keep indices [L, Hkv, budget] (sorted offsets into the sequence's cached tokens) for one eviction."""
    L, n, hkv, _ = inp.keys.shape
    if n <= cfg.budget:
        raise ValueError(f"nothing to evict: {n} cached tokens, budget {cfg.budget}")
    front, back = kept_ends(cfg, n, inp.pinned)
    mid = slice(front, n - back)
    policy = cfg.scorer
    if policy == "triattention":
        return triattention_keep(cfg, inp, front, back)
    if policy == "streaming":
        scores = torch.zeros(L, hkv, n, device=inp.keys.device)
    elif policy == "snapkv":
        scores = snapkv_scores(inp, cfg)
    elif policy == "rkv":
        scores = rkv_scores(inp, cfg)
    elif policy == "h2o":
        scores = inp.attention
    else:
        raise ValueError(f"policy {cfg.policy!r} does not evict")
    return select(scores[..., mid], n, front, back, cfg.budget)
