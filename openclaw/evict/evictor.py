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
from openclaw.kernels.tri_score import tri_score


@dataclass
class TriStats:
    """Per (layer, query head) pre-RoPE query statistics: mu = E[q_f] (real, imag) and A = E[|q_f|], [L, H, F] fp32;
    omega: [F] the model's (scaled) RoPE inverse frequencies."""

    mu_re: torch.Tensor
    mu_im: torch.Tensor
    a_mean: torch.Tensor
    omega: torch.Tensor

    def to(self, device) -> "TriStats":
        return TriStats(*(x.to(device) for x in (self.mu_re, self.mu_im, self.a_mean, self.omega)))


@dataclass
class EvictInputs:
    """What one eviction of one sequence sees. keys: [L, n, Hkv, D] post-RoPE (may be a view of the pool);
    queries: [L, W, H, D] post-RoPE queries of the last W tokens (snapkv, rkv); attention: [L, Hkv, n] attention
    received so far (h2o); stats (triattention); t: the next token's absolute position; prompt_cached: how many
    prompt tokens sit at the front of the cache. scale: the model's softmax scale (None: D^-0.5); blocks: the RoPE
    blocks of a key (models/layers.BandLayout; None: one half-layout block), several for MLA's [latent | RoPE key]."""

    keys: torch.Tensor
    t: int
    prompt_cached: int = 0
    queries: torch.Tensor | None = None
    attention: torch.Tensor | None = None
    stats: TriStats | None = None
    scale: float | None = None
    blocks: Blocks | None = None


def kept_ends(cfg: EvictionConfig, n: int, prompt_cached: int) -> tuple[int, int]:
    """(front, back): how many of the oldest and of the newest cached tokens are always kept."""
    front = prompt_cached if cfg.pin_prompt else 0
    if cfg.policy == "streaming":
        front = max(front, cfg.sinks)
    back = cfg.protect_recent
    if cfg.policy in ("snapkv", "rkv"):
        back = max(back, cfg.window)
    if cfg.policy == "h2o":
        back = max(back, cfg.budget // 2)
    if front > cfg.budget:
        raise ValueError(f"{front} pinned tokens exceed the budget {cfg.budget}")
    back = cfg.budget - front if cfg.policy == "streaming" else min(back, cfg.budget - front)
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
    """Raw scores [L, H, n] of every cached key for every query head (post-RoPE form; Triton on the GPU)."""
    s = inp.stats
    if inp.blocks is not None and len(inp.blocks) > 1:  # MLA: openclaw/evict/bands.py
        return tri_score_blocks(inp.keys, s.mu_re, s.mu_im, s.a_mean, s.omega, inp.t, inp.blocks, cfg.tri_terms)
    return tri_score(inp.keys, s.mu_re, s.mu_im, s.a_mean, s.omega, inp.t, terms=cfg.tri_terms)


def triattention_aggregate(raw: torch.Tensor, num_kv_heads: int, seed: int) -> torch.Tensor:
    """raw: [L, H, m] candidates' scores -> [Hkv, m]: z-score each (layer, head) row, add seeded 1e-6 noise, max
    over the query heads of each KV head's group, mean over layers (one keep set per KV head, all layers)."""
    L, H, m = raw.shape
    z = (raw - raw.mean(-1, keepdim=True)) / raw.std(-1, keepdim=True, unbiased=False).clamp_min(1e-12)
    noise = torch.randn(L, H, m, generator=torch.Generator(z.device).manual_seed(seed), device=z.device)
    z = z + noise * 1e-6
    return z.view(L, num_kv_heads, H // num_kv_heads, m).amax(2).mean(0)


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
    front, back = kept_ends(cfg, n, inp.prompt_cached)
    mid = slice(front, n - back)
    if cfg.policy == "triattention":
        shared = triattention_aggregate(triattention_scores(inp, cfg)[..., mid], hkv, cfg.seed)
        keep = select(shared, n, front, back, cfg.budget)
        return keep[None].expand(L, -1, -1).contiguous()
    if cfg.policy == "streaming":
        scores = torch.zeros(L, hkv, n, device=inp.keys.device)
    elif cfg.policy == "snapkv":
        scores = snapkv_scores(inp, cfg)
    elif cfg.policy == "rkv":
        scores = rkv_scores(inp, cfg)
    elif cfg.policy == "h2o":
        scores = inp.attention
    else:
        raise ValueError(f"policy {cfg.policy!r} does not evict")
    return select(scores[..., mid], n, front, back, cfg.budget)
