"""Decode attention of Multi-head Latent Attention (GLM-4.7-Flash, DeepSeek-V2/V3) in its absorbed form, over the KV
pool: one query token per sequence, flash-decoding style, plus the plain-PyTorch reference.

The pool caches per token one key of R + E values, [c | k_rope]: the normed latent c (R = kv_lora_rank, 512) and the
shared post-RoPE key (E = qk_rope_head_dim, 64). Every query head h attends with its absorbed query [W_UK_h^T q_nope_h
| q_rope_h] and reads the latent c as its value, so this is MQA with a key of R + E dims and a value of the key's first R
dims: each program loads a block of latents once and uses it for the scores of all H heads and for their outputs. The
keys of a sequence are split into partitions as in kernels/decode_attention.py, whose combine kernel merges them;
lengths are read from device tensors, so a captured CUDA graph replays at any length up to its bound. It does not
project (models/mla.py applies W_UK before and W_UV after) and does not do prefill (models/mla.py).
"""

import torch
import triton
import triton.language as tl

from .decode_attention import MIN_PARTITION, _decode_combine_kernel, _partition, num_partitions

# keys per loop step and the launch, not yet tuned on a GPU: 8 warps share the [heads, 512] fp32 accumulator
BLOCK_N, NUM_WARPS, NUM_STAGES = 32, 8, 2


@triton.jit
def _mla_decode_kernel(q_ptr, c_ptr, base_ptr, len_ptr, acc_ptr, ml_ptr, scale, stride_qb, stride_qh, stride_cs,
                       H: tl.constexpr, R: tl.constexpr, E: tl.constexpr, BLOCK_H: tl.constexpr,
                       BLOCK_R: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_N: tl.constexpr, MIN_PART: tl.constexpr,
                       DOT_F32: tl.constexpr):
    """Grid (B, P): partition p of sequence b's n cached tokens against all H query heads (padded to BLOCK_H >= 16 for
    tl.dot). Partitioning as _decode_attention_kernel's: min(P, cdiv(n, MIN_PART)) equal runs rounded up to 16 keys.
    Writes the unnormalized output acc [B, H, P, R] and the running max and sum ml [B, H, P, 2] (fp32, base-2
    logits) that _decode_combine_kernel merges. DOT_F32: fp32 operands (an fp32 pool; Triton's interpreter)."""
    i_b = tl.program_id(0).to(tl.int64)
    i_p = tl.program_id(1).to(tl.int64)
    n_p = tl.num_programs(1)
    base, start, end = _partition(base_ptr, len_ptr, i_b, i_p, n_p, MIN_PART)
    o_h = tl.arange(0, BLOCK_H)
    o_r = tl.arange(0, BLOCK_R)
    o_e = tl.arange(0, BLOCK_E)
    m_h = o_h < H
    m_r = o_r < R
    m_e = o_e < E
    p_q = q_ptr + i_b * stride_qb + o_h[:, None] * stride_qh
    b_qc = tl.load(p_q + o_r[None, :], mask=m_h[:, None] & m_r[None, :], other=0.0).to(c_ptr.dtype.element_ty)
    b_qe = tl.load(p_q + R + o_e[None, :], mask=m_h[:, None] & m_e[None, :], other=0.0).to(c_ptr.dtype.element_ty)
    qk_scale = scale * 1.4426950408889634  # exp2 instead of exp
    b_m = tl.full([BLOCK_H], float("-inf"), dtype=tl.float32)
    b_l = tl.zeros([BLOCK_H], dtype=tl.float32)
    b_acc = tl.zeros([BLOCK_H, BLOCK_R], dtype=tl.float32)
    for j in range(start, end, BLOCK_N):
        o_n = j + tl.arange(0, BLOCK_N)
        m_n = o_n < end
        p_row = c_ptr + (base + o_n)[:, None] * stride_cs
        b_c = tl.load(p_row + o_r[None, :], mask=m_n[:, None] & m_r[None, :], other=0.0)  # latents: keys and values
        b_e = tl.load(p_row + R + o_e[None, :], mask=m_n[:, None] & m_e[None, :], other=0.0)  # shared RoPE keys
        if DOT_F32:
            b_s = tl.dot(b_qc.to(tl.float32), tl.trans(b_c.to(tl.float32)), input_precision="ieee")
            b_s += tl.dot(b_qe.to(tl.float32), tl.trans(b_e.to(tl.float32)), input_precision="ieee")
        else:
            b_s = tl.dot(b_qc, tl.trans(b_c)) + tl.dot(b_qe, tl.trans(b_e))
        b_s = tl.where(m_n[None, :], b_s * qk_scale, float("-inf"))
        b_m_new = tl.maximum(b_m, tl.max(b_s, axis=1))
        b_alpha = tl.exp2(b_m - b_m_new)
        b_p = tl.exp2(b_s - b_m_new[:, None])
        b_l = b_l * b_alpha + tl.sum(b_p, axis=1)
        if DOT_F32:
            b_pv = tl.dot(b_p, b_c.to(tl.float32), input_precision="ieee")
        else:
            b_pv = tl.dot(b_p.to(c_ptr.dtype.element_ty), b_c)
        b_acc = b_acc * b_alpha[:, None] + b_pv
        b_m = b_m_new
    o_bhp = (i_b * H + o_h) * n_p + i_p  # row of (b, h, p) in [B, H, P]
    tl.store(acc_ptr + o_bhp[:, None] * R + o_r[None, :], b_acc, mask=m_h[:, None] & m_r[None, :])
    tl.store(ml_ptr + o_bhp * 2, b_m, mask=m_h)
    tl.store(ml_ptr + o_bhp * 2 + 1, b_l, mask=m_h)


def mla_decode_attention(q: torch.Tensor, cache: torch.Tensor, slot_base: torch.Tensor, kv_len: torch.Tensor,
                         scale: float, max_len: int, value_dim: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """q: [B, H, R + E] absorbed queries (one token per sequence); cache: [S, 1, R + E] this layer's [latent | RoPE key]
    per slot -> [B, H, R] (R = value_dim) attention-weighted latents, into out when given. Sequence b attends to slots
    [slot_base[b], slot_base[b] + kv_len[b]). Triton on CUDA tensors, mla_decode_attention_ref on CPU tensors."""
    if q.is_cuda:
        return mla_decode_attention_triton(q, cache, slot_base, kv_len, scale, max_len, value_dim, out=out)
    y = mla_decode_attention_ref(q, cache, slot_base, kv_len, scale, value_dim)
    return y if out is None else out.copy_(y)


def mla_decode_attention_triton(q: torch.Tensor, cache: torch.Tensor, slot_base: torch.Tensor, kv_len: torch.Tensor,
                                scale: float, max_len: int, value_dim: int, num_parts: int | None = None,
                                out: torch.Tensor | None = None) -> torch.Tensor:
    """The split-K Triton kernel and decode_attention's combine (CPU tensors run in Triton's interpreter).
    max_len: the static bound the partitioning comes from (1 <= kv_len[b] <= max_len); num_parts overrides it (then
    every partition gets keys whenever the length allows 16 each); softmax in fp32."""
    B, H, K = q.shape
    R, E = value_dim, K - value_dim
    assert cache.dim() == 3 and cache.shape[1:] == (1, K), f"cache {tuple(cache.shape)} must be [S, 1, {K}]"
    assert 0 < R < K and q.stride(-1) == 1 and cache.stride(-1) == 1 and max_len >= 1
    assert slot_base.shape == (B,) and kv_len.shape == (B,)
    if out is None:
        out = torch.empty(B, H, R, dtype=q.dtype, device=q.device)
    assert out.shape == (B, H, R) and out.stride(-1) == 1
    min_part = MIN_PARTITION if num_parts is None else 16
    if num_parts is None:
        num_parts = num_partitions(max_len, B, q.device)
    num_parts = min(num_parts, triton.cdiv(max_len, 16))
    acc = torch.empty(B, H, num_parts, R, dtype=torch.float32, device=q.device)
    ml = torch.empty(B, H, num_parts, 2, dtype=torch.float32, device=q.device)
    block_r = triton.next_power_of_2(R)
    _mla_decode_kernel[(B, num_parts)](
        q, cache, slot_base, kv_len, acc, ml, scale, q.stride(0), q.stride(1), cache.stride(0), H=H, R=R, E=E,
        BLOCK_H=max(16, triton.next_power_of_2(H)), BLOCK_R=block_r, BLOCK_E=max(16, triton.next_power_of_2(E)),
        BLOCK_N=BLOCK_N, MIN_PART=min_part, DOT_F32=cache.dtype == torch.float32 or not q.is_cuda,
        num_warps=NUM_WARPS, num_stages=NUM_STAGES)
    _decode_combine_kernel[(B * H,)](acc, ml, out, ml, num_parts, out.stride(0), out.stride(1), H=H, D=R,
                                     BLOCK_P=triton.next_power_of_2(num_parts), BLOCK_D=block_r, STORE_LSE=False)
    return out


def mla_decode_attention_ref(q: torch.Tensor, cache: torch.Tensor, slot_base: torch.Tensor, kv_len: torch.Tensor,
                             scale: float, value_dim: int) -> torch.Tensor:
    """Plain PyTorch, fp32 scores, softmax and sums: the oracle and the CPU path."""
    out = q.new_empty(*q.shape[:2], value_dim)
    for b, (base, n) in enumerate(zip(slot_base.tolist(), kv_len.tolist())):
        k = cache[base:base + n, 0].float()  # [n, R + E]
        p = torch.softmax(q[b].float() @ k.T * scale, dim=-1)  # [H, n]
        out[b] = (p @ k[:, :value_dim]).to(q.dtype)
    return out
