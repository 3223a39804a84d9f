"""Multi-head Latent Attention over the KV pool (GLM-4.7-Flash; DeepSeek-V2/V3 lineage), in the absorbed form.

Per token the pool caches one key [c | k_rope] of R + E values: the normed latent c = kv_a_layernorm(kv_a(x)[:R])
and the shared RoPE key k_rope (one for all heads), never the expanded per-head K/V (17.8x larger for GLM-4.7-Flash).
Head h's nope key and value are W_UK_h c and W_UV_h c (kv_b_proj [H (Dn + Dv), R] holds [W_UK_h; W_UV_h] per head),
so q_nope_h . W_UK_h c = (W_UK_h^T q_nope_h) . c: each head attends with the absorbed query [W_UK_h^T q_nope_h |
q_rope_h] against the cached key and reads c as its value, then W_UV_h maps the weighted latent to its Dv outputs.
The softmax scale stays 1/sqrt(Dn + E). Decode uses kernels/mla_attention.py; prefill the same absorbed form in
PyTorch, query chunks sized so one chunk's scores stay within PREFILL_SCORE_BYTES. RoPE dims come in the half layout
(glm4_moe_lite.sanitize permutes the checkpoint's adjacent pairs at load). The query tap sees [W_UK^T q_nope | q_rope]
before and after RoPE, the vectors the attention uses, so every eviction policy scores what the model attends with.
"""

import torch
from openclaw.kernels.mla_attention import mla_decode_attention
from openclaw.models.layers import BatchMeta, RMSNorm, apply_rope, linear
from torch import nn

PREFILL_SCORE_BYTES = 256 << 20  # prefill scores (dtype and the fp32 softmax) per query chunk at most
LORA_EPS = 1e-6  # q_a_layernorm / kv_a_layernorm: transformers builds them without the config's eps


class MLAttention(nn.Module):
    def __init__(self, cfg, quantized: bool = False):
        super().__init__()
        self.h, self.dn, self.dr, self.dv = (cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim,
                                             cfg.v_head_dim)
        self.r = cfg.kv_lora_rank
        hidden, q_dim, bias = cfg.hidden_size, self.h * (self.dn + self.dr), cfg.attention_bias
        self.lora = cfg.q_lora_rank is not None
        if self.lora:
            self.q_a_proj = linear(hidden, cfg.q_lora_rank, bias, quantized)
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, LORA_EPS)
            self.q_b_proj = linear(cfg.q_lora_rank, q_dim, False, quantized)
        else:
            self.q_proj = linear(hidden, q_dim, False, quantized)
        self.kv_a_proj_with_mqa = linear(hidden, self.r + self.dr, bias, quantized)
        self.kv_a_layernorm = RMSNorm(self.r, LORA_EPS)
        # full precision whatever the format (Family.dense): absorbed into every query and output, per head
        self.kv_b_proj = nn.Linear(self.r, self.h * (self.dn + self.dv), bias=False)
        self.o_proj = linear(self.h * self.dv, hidden, bias, quantized)
        self.scale = cfg.softmax_scale

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, meta: BatchMeta,
                cache: torch.Tensor, mass: torch.Tensor | None = None) -> torch.Tensor:
        """x: [T, hidden]; cos, sin: [T, 1, E]; cache: [S, 1, R + E] (this layer's pool keys) -> [T, hidden]; mass:
        this layer's BatchMeta.key_mass [S, 1]."""
        T = x.shape[0]
        q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x))) if self.lora else self.q_proj(x)
        q = q.view(T, self.h, self.dn + self.dr)
        ckv = self.kv_a_proj_with_mqa(x)
        c = self.kv_a_layernorm(ckv[:, :self.r])
        k_rope = apply_rope(ckv[:, None, self.r:], cos, sin)[:, 0]
        write_latents(cache, meta.slot_mapping, torch.cat([c, k_rope], dim=-1)[:, None].to(cache.dtype))
        q_pre = q[..., self.dn:]
        w = self.kv_b_proj.weight.view(self.h, self.dn + self.dv, self.r)
        q_abs = torch.einsum("thd,hdr->thr", q[..., :self.dn], w[:, :self.dn].to(q.dtype))
        q_full = torch.cat([q_abs, apply_rope(q_pre, cos, sin)], dim=-1)  # [T, H, R + E]
        if meta.query_tap is not None:
            meta.query_tap(torch.cat([q_abs, q_pre], dim=-1), q_full)
        o_lat = latent_attention(q_full, cache, meta, self.scale, self.r)  # [T, H, R]
        if mass is not None:
            latent_mass(q_full, cache, meta, self.scale, mass)
        o = torch.einsum("thr,hvr->thv", o_lat, w[:, self.dn:].to(o_lat.dtype))
        return self.o_proj(o.reshape(T, self.h * self.dv))


def latent_attention(q: torch.Tensor, cache: torch.Tensor, meta: BatchMeta, scale: float,
                     value_dim: int) -> torch.Tensor:
    """q: [T, H, R + E] absorbed queries; cache: [S, 1, R + E] -> [T, H, R]; each sequence attends to its own slots,
    causally within this step (as layers.pool_attention): decode rows through the kernel, all at once when every
    sequence decodes; a prefill chunk through _prefill."""
    if all(q_len == 1 and q_start == i for i, (q_start, q_len, _, _) in enumerate(meta.seqs)):
        max_len = max(kv_len for _, _, _, kv_len in meta.seqs)
        return mla_decode_attention(q, cache, meta.slot_base, meta.kv_valid, scale, max_len, value_dim)
    out = q.new_empty(*q.shape[:2], value_dim)
    for i, (q_start, q_len, base, kv_len) in enumerate(meta.seqs):
        rows = slice(q_start, q_start + q_len)
        if q_len == 1:
            mla_decode_attention(q[rows], cache, meta.slot_base[i:i + 1], meta.kv_valid[i:i + 1], scale, kv_len,
                                 value_dim, out=out[rows])
        else:
            out[rows] = _prefill(q[rows], cache[base:base + kv_len, 0].to(q.dtype), scale, value_dim)
    return out


def latent_mass(q: torch.Tensor, cache: torch.Tensor, meta: BatchMeta, scale: float, mass: torch.Tensor) -> None:
    """Add to mass [S, 1] the attention each cached key receives from the step's queries q [T, H, R + E] (summed
    over heads and queries), for the eviction policies that read it. The MLA decode kernel has no mass output, so
    this recomputes the scores in PyTorch, one sequence at a time; decode rows with device ops only (over the
    static length bound, masked by the device length; padded rows, slot -1, add nothing), so a graph captures it."""
    cols = torch.arange(max(kv_len for *_, kv_len in meta.seqs), device=q.device)
    for i, (q_start, q_len, base, kv_len) in enumerate(meta.seqs):
        if q_len == 1:
            idx = (meta.slot_base[i] + cols[:kv_len]).clamp_max(cache.shape[0] - 1)
            visible = cols[:kv_len] < meta.kv_valid[i]  # never empty: a padded row reads one slot
            s = torch.einsum("hk,sk->hs", q[q_start], cache[idx, 0].to(q.dtype)).float() * scale
            p = torch.softmax(s.masked_fill(~visible, float("-inf")), dim=-1).sum(0)
            mass[:, 0].index_add_(0, idx, p * (visible & (meta.slot_mapping[q_start] >= 0)))
            continue
        keys = cache[base:base + kv_len, 0].to(q.dtype)
        s = torch.einsum("thk,sk->ths", q[q_start:q_start + q_len], keys).float() * scale
        visible = cols[None, :kv_len] <= torch.arange(kv_len - q_len, kv_len, device=q.device)[:, None]
        mass[base:base + kv_len, 0] += torch.softmax(s.masked_fill(~visible[:, None], float("-inf")), -1).sum((0, 1))


def _prefill(q: torch.Tensor, keys: torch.Tensor, scale: float, value_dim: int) -> torch.Tensor:
    """q: [t, H, K] the last t of the n tokens whose keys [n, K] are given (query i sees keys up to n - t + i) ->
    [t, H, R]: scores in the dtype, softmax in fp32 (as transformers' eager attention), query chunks bounded."""
    t, H, _ = q.shape
    n = keys.shape[0]
    out = q.new_empty(t, H, value_dim)
    rows = max(1, PREFILL_SCORE_BYTES // (H * n * (q.element_size() + 4)))
    cols = torch.arange(n, device=q.device)
    for i0 in range(0, t, rows):
        i1 = min(t, i0 + rows)
        s = torch.einsum("thk,sk->ths", q[i0:i1], keys).float() * scale
        visible = cols[None, :] <= torch.arange(n - t + i0, n - t + i1, device=q.device)[:, None]  # [rows, n]
        p = torch.softmax(s.masked_fill(~visible[:, None, :], float("-inf")), dim=-1)
        out[i0:i1] = torch.einsum("ths,sr->thr", p.to(q.dtype), keys[:, :value_dim])
    return out


def write_latents(cache: torch.Tensor, slots: torch.Tensor, rows: torch.Tensor) -> None:
    """cache[slots[i]] = rows[i], skipping rows whose slot is -1 (a captured batch's padding) without a host sync: a
    padded row rewrites row 0's slot with row 0's values (a step's first row is always a real one), so the duplicate
    index writes the same bytes whichever lands last. An index of -1 would be a device-side assert on CUDA."""
    real = slots >= 0
    cache.index_copy_(0, torch.where(real, slots, slots[:1]), torch.where(real[:, None, None], rows, rows[:1]))
