"""TriAttention's selection (TRIATTENTION.md section 4): from raw scores per (layer, query head) to keep sets.

The paper's per_head mode (one keep set per KV head, shared by all layers), and the reference's union (one keep set
for everything) and per_layer_perhead (one per layer and KV head) modes, each with the reference's fallback for
statistics that cover only some heads (`sampled_heads`). Raw scores come from kernels/tri_score.py; the always-kept
ends and the final top-k from openclaw.evict.evictor. Nothing here reads the pool.
"""

import torch


def zscore(x: torch.Tensor) -> torch.Tensor:
    """Standardize along the last dim (population std, floored so a constant row stays finite)."""
    return (x - x.mean(-1, keepdim=True)) / x.std(-1, keepdim=True, unbiased=False).clamp_min(1e-12)


def head_z(raw: torch.Tensor, seed: int) -> torch.Tensor:
    """raw: [L, H, m] candidates' scores -> z-scored per (layer, head) plus seeded 1e-6 tie-breaking noise."""
    noise = torch.randn(raw.shape, generator=torch.Generator(raw.device).manual_seed(seed), device=raw.device)
    return zscore(raw) + noise * 1e-6


def group_max(z: torch.Tensor, heads: torch.Tensor, num_kv_heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """z: [L, H, m], heads: [L, H] bool (which heads have statistics) -> (max of z over each KV head's sampled query
    heads [L, Hkv, m] (-inf where a group has none), which (layer, KV head) groups have any [L, Hkv])."""
    L, H, m = z.shape
    g = H // num_kv_heads
    zz = z.masked_fill(~heads[..., None], float("-inf")).view(L, num_kv_heads, g, m).amax(2)
    return zz, heads.view(L, num_kv_heads, g).any(-1)


def per_head(z: torch.Tensor, heads: torch.Tensor, num_kv_heads: int, extra: torch.Tensor | None = None) -> torch.Tensor:
    """-> [Hkv, m]: per KV head, the mean over layers of the max over its group (layers where the group has no sampled
    head do not count); a KV head with no sampled head in any layer takes the mean of every sampled head's z (the
    reference's fallback). extra: [L, Hkv, m] added to each group's score before the mean over layers."""
    zz, has = group_max(z, heads, num_kv_heads)
    if extra is not None:
        zz = zz + extra
    agg = torch.where(has[..., None], zz, 0.0).sum(0) / has.sum(0).clamp_min(1)[:, None]
    missing = ~has.any(0)
    if missing.any():
        agg[missing] = z[heads].mean(0)
    return agg


def per_layer(z: torch.Tensor, heads: torch.Tensor, num_kv_heads: int, extra: torch.Tensor | None = None) -> torch.Tensor:
    """-> [L, Hkv, m]: each (layer, KV head) scored by the max over its group; a group without sampled heads takes the
    mean of its layer's sampled heads, and a layer without any keeps its oldest candidates (the reference's
    fallbacks)."""
    zz, has = group_max(z, heads, num_kv_heads)
    if extra is not None:
        zz = zz + extra
    counts = heads.sum(1)
    layer_mean = (z.masked_fill(~heads[..., None], 0.0)).sum(1) / counts.clamp_min(1)[:, None]  # [L, m]
    out = torch.where(has[..., None], zz, layer_mean[:, None, :])
    m = z.shape[-1]
    oldest_first = -torch.arange(m, dtype=out.dtype, device=out.device)
    return torch.where((counts == 0)[:, None, None], oldest_first, out)


def union(z: torch.Tensor, heads: torch.Tensor, k: int) -> torch.Tensor:
    """-> [m]: every sampled head nominates its top k; the nominees rank first, by the max of z over all heads, and the
    rest follow by that max (the reference fills from them when fewer than k were nominated)."""
    zs = z[heads]  # [N, m]
    combined = zs.amax(0)
    if k <= 0:
        return combined
    nominated = torch.zeros_like(combined, dtype=torch.bool)
    nominated[zs.topk(min(k, zs.shape[-1]), dim=-1).indices.flatten()] = True
    lift = combined.max() - combined.min() + 1
    return torch.where(nominated, combined + lift, combined)
