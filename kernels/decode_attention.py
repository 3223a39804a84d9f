"""Decode attention over the KV pool (one query token per sequence), flash-decoding style: the keys of a sequence are
cut into partitions, one program per (sequence, KV head, partition) computes a partial softmax for the whole query
group of that KV head, and a combine kernel merges the partitions. Plus the plain-PyTorch reference.

Optionally it also adds up the attention each key receives (`mass`: the softmax probabilities of the step's query,
summed over each KV head's query group, added at the key's slot): the realized-attention signal eviction policies use
(H2O, TriAttention's attention term), from a third kernel that recomputes the logits of its partition against the
combined max and sum, so the probabilities are never materialized.

The partition count depends only on the static length bound; the lengths are read from device tensors at run time
and each sequence's keys are split evenly over the partitions then, so a captured CUDA graph replays at any length up
to the bound with every partition busy (a graph bucket of 8192 keys at 4200 keys keeps all its programs working). It
does not do prefill (models/layers.py uses SDPA).
"""

from functools import lru_cache

import torch
import triton
import triton.language as tl

MIN_PARTITION = 64  # keys: shorter partitions cost more in the combine than they gain in parallelism
WAVES = 4  # programs per SM the partition count aims for, so the last wave's tail is a small part of the work
BLOCK_N, NUM_WARPS, NUM_STAGES = 64, 4, 2  # keys per loop step and the launch (bench/attn_lab.py sweeps them)


@lru_cache
def _num_sms(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


@triton.jit
def _partition(base_ptr, len_ptr, i_b, i_p, n_p, MIN_PART: tl.constexpr):
    """Row i_b's slot base and the keys [start, end) of its partition i_p of n_p: the row's length split into
    min(n_p, cdiv(n, MIN_PART)) runs of equal length (rounded up to 16 keys); the partitions past them are empty."""
    base = tl.load(base_ptr + i_b).to(tl.int64)
    n = tl.load(len_ptr + i_b).to(tl.int64)
    runs = tl.minimum(n_p, tl.cdiv(n, MIN_PART))
    part_len = tl.cdiv(tl.cdiv(n, runs), 16) * 16
    start = i_p * part_len
    return base, start, tl.minimum(start + part_len, n)


@triton.jit
def _decode_attention_kernel(q_ptr, k_ptr, v_ptr, base_ptr, len_ptr, acc_ptr, ml_ptr, scale,
                             stride_qb, stride_qh, stride_ks, stride_kh, stride_vs, stride_vh,
                             HKV: tl.constexpr, G: tl.constexpr, D: tl.constexpr, BLOCK_G: tl.constexpr,
                             BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, MIN_PART: tl.constexpr,
                             DOT_F32: tl.constexpr):
    """Grid (B * Hkv, P): partition p of sequence b's n keys against the G query heads of KV head g, so each key
    block is loaded once for the group (G padded to BLOCK_G >= 16 for tl.dot). The n keys are split into
    min(P, cdiv(n, MIN_PART)) runs of equal length (rounded up to 16 keys); the partitions past them are empty.
    Writes the unnormalized output acc [B, H, P, D] and the running max and sum ml [B, H, P, 2] (fp32, base-2
    logits); an empty partition leaves acc 0, max -inf and sum 0, which the combine weighs by zero. DOT_F32: fp32
    operands and IEEE products (an fp32 pool; and Triton's interpreter, whose tl.dot cannot multiply bf16)."""
    i_bg = tl.program_id(0).to(tl.int64)
    i_p = tl.program_id(1).to(tl.int64)
    n_p = tl.num_programs(1)
    i_b = i_bg // HKV
    i_g = i_bg % HKV
    base, start, end = _partition(base_ptr, len_ptr, i_b, i_p, n_p, MIN_PART)
    o_g = tl.arange(0, BLOCK_G)
    o_d = tl.arange(0, BLOCK_D)
    m_g = o_g < G
    m_d = o_d < D
    o_h = i_g * G + o_g
    p_q = q_ptr + i_b * stride_qb + o_h[:, None] * stride_qh + o_d[None, :]
    b_q = tl.load(p_q, mask=m_g[:, None] & m_d[None, :], other=0.0).to(k_ptr.dtype.element_ty)
    qk_scale = scale * 1.4426950408889634  # exp2 instead of exp
    b_m = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)
    b_l = tl.zeros([BLOCK_G], dtype=tl.float32)
    b_acc = tl.zeros([BLOCK_G, BLOCK_D], dtype=tl.float32)
    for j in range(start, end, BLOCK_N):
        o_n = j + tl.arange(0, BLOCK_N)
        m_n = o_n < end
        m_nd = m_n[:, None] & m_d[None, :]
        b_k = tl.load(k_ptr + (base + o_n)[:, None] * stride_ks + i_g * stride_kh + o_d[None, :], mask=m_nd, other=0.0)
        if DOT_F32:
            b_s = tl.dot(b_q.to(tl.float32), tl.trans(b_k.to(tl.float32)), input_precision="ieee")
        else:
            b_s = tl.dot(b_q, tl.trans(b_k))
        b_s = tl.where(m_n[None, :], b_s * qk_scale, float("-inf"))
        b_m_new = tl.maximum(b_m, tl.max(b_s, axis=1))
        b_alpha = tl.exp2(b_m - b_m_new)
        b_p = tl.exp2(b_s - b_m_new[:, None])
        b_l = b_l * b_alpha + tl.sum(b_p, axis=1)
        b_v = tl.load(v_ptr + (base + o_n)[:, None] * stride_vs + i_g * stride_vh + o_d[None, :], mask=m_nd, other=0.0)
        if DOT_F32:
            b_pv = tl.dot(b_p, b_v.to(tl.float32), input_precision="ieee")
        else:
            b_pv = tl.dot(b_p.to(v_ptr.dtype.element_ty), b_v)
        b_acc = b_acc * b_alpha[:, None] + b_pv
        b_m = b_m_new
    o_bhp = (i_b * HKV * G + o_h) * n_p + i_p  # row of (b, h, p) in [B, H, P]
    tl.store(acc_ptr + o_bhp[:, None] * D + o_d[None, :], b_acc, mask=m_g[:, None] & m_d[None, :])
    tl.store(ml_ptr + o_bhp * 2, b_m, mask=m_g)
    tl.store(ml_ptr + o_bhp * 2 + 1, b_l, mask=m_g)


@triton.jit(do_not_specialize=["num_parts"])
def _decode_combine_kernel(acc_ptr, ml_ptr, o_ptr, lse_ptr, num_parts, stride_ob, stride_oh, H: tl.constexpr,
                           D: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr, STORE_LSE: tl.constexpr):
    """Grid (B * H,): o[b, h] = sum_p 2^(m_p - M) acc_p / sum_p 2^(m_p - M) l_p over the P partitions. acc and ml are
    loaded at once (an empty partition's acc is zeros, so no load waits on another). STORE_LSE: also write the final
    max M and sum into lse [B, H, 2] (for the mass kernel)."""
    i_bh = tl.program_id(0).to(tl.int64)
    o_p = tl.arange(0, BLOCK_P)
    o_d = tl.arange(0, BLOCK_D)
    m_p = o_p < num_parts
    m_d = o_d < D
    o_row = i_bh * num_parts + o_p
    b_m = tl.load(ml_ptr + o_row * 2, mask=m_p, other=float("-inf"))
    b_l = tl.load(ml_ptr + o_row * 2 + 1, mask=m_p, other=0.0)
    b_acc = tl.load(acc_ptr + o_row[:, None] * D + o_d[None, :], mask=m_p[:, None] & m_d[None, :], other=0.0)
    b_w = tl.exp2(b_m - tl.max(b_m, axis=0))
    b_w = tl.where(m_p & (b_l > 0), b_w, 0.0)  # empty partitions: -inf - (-inf) would be NaN
    b_sum = tl.sum(b_l * b_w, axis=0)
    b_o = tl.sum(b_acc * b_w[:, None], axis=0) / b_sum
    i_b = i_bh // H
    i_h = i_bh % H
    tl.store(o_ptr + i_b * stride_ob + i_h * stride_oh + o_d, b_o.to(o_ptr.dtype.element_ty), mask=m_d)
    if STORE_LSE:
        tl.store(lse_ptr + i_bh * 2, tl.max(b_m, axis=0))
        tl.store(lse_ptr + i_bh * 2 + 1, b_sum)


@triton.jit
def _decode_mass_kernel(q_ptr, k_ptr, base_ptr, len_ptr, slot_ptr, lse_ptr, mass_ptr, scale, stride_qb, stride_qh,
                        stride_ks, stride_kh, stride_ms, HKV: tl.constexpr, G: tl.constexpr, D: tl.constexpr,
                        BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, MIN_PART: tl.constexpr,
                        DOT_F32: tl.constexpr, HAS_SLOTS: tl.constexpr):
    """Grid (B * Hkv, P), partitioned as _decode_attention_kernel: for each key of the partition, recompute the
    logits of the group's queries, turn them into probabilities with the combined max and sum (lse), sum them over
    the group and add them to mass[base + key, g]. Each key belongs to one program, so the adds need no atomics.
    HAS_SLOTS: rows whose slot (slot_ptr) is negative, a graph's padding, add nothing."""
    i_bg = tl.program_id(0).to(tl.int64)
    i_p = tl.program_id(1).to(tl.int64)
    n_p = tl.num_programs(1)
    i_b = i_bg // HKV
    i_g = i_bg % HKV
    base, start, end = _partition(base_ptr, len_ptr, i_b, i_p, n_p, MIN_PART)
    if HAS_SLOTS:
        end = tl.where(tl.load(slot_ptr + i_b) >= 0, end, start)
    o_g = tl.arange(0, BLOCK_G)
    o_d = tl.arange(0, BLOCK_D)
    m_g = o_g < G
    m_d = o_d < D
    o_h = i_g * G + o_g
    b_q = tl.load(q_ptr + i_b * stride_qb + o_h[:, None] * stride_qh + o_d[None, :], mask=m_g[:, None] & m_d[None, :],
                  other=0.0).to(k_ptr.dtype.element_ty)
    o_bh = i_b * HKV * G + o_h
    b_max = tl.load(lse_ptr + o_bh * 2, mask=m_g, other=0.0)
    b_sum = tl.load(lse_ptr + o_bh * 2 + 1, mask=m_g, other=1.0)
    qk_scale = scale * 1.4426950408889634
    for j in range(start, end, BLOCK_N):
        o_n = j + tl.arange(0, BLOCK_N)
        m_n = o_n < end
        b_k = tl.load(k_ptr + (base + o_n)[:, None] * stride_ks + i_g * stride_kh + o_d[None, :],
                      mask=m_n[:, None] & m_d[None, :], other=0.0)
        if DOT_F32:
            b_s = tl.dot(b_q.to(tl.float32), tl.trans(b_k.to(tl.float32)), input_precision="ieee")
        else:
            b_s = tl.dot(b_q, tl.trans(b_k))
        b_p = tl.exp2(b_s * qk_scale - b_max[:, None]) / b_sum[:, None]
        b_p = tl.where(m_g[:, None] & m_n[None, :], b_p, 0.0)
        p_m = mass_ptr + (base + o_n) * stride_ms + i_g
        tl.store(p_m, tl.load(p_m, mask=m_n, other=0.0) + tl.sum(b_p, axis=0), mask=m_n)


def num_partitions(max_len: int, batch_heads: int, device: torch.device) -> int:
    """Partitions of max_len keys so that batch_heads * P programs fill the GPU about WAVES times over; each at least
    MIN_PARTITION keys. Depends only on static sizes, so a CUDA graph captured at a length bound keeps it."""
    if device.type != "cuda":
        return max(1, min(4, triton.cdiv(max_len, MIN_PARTITION)))
    want = triton.cdiv(WAVES * _num_sms(device), batch_heads)
    return max(1, min(want, triton.cdiv(max_len, MIN_PARTITION)))


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_base: torch.Tensor,
                     kv_len: torch.Tensor, scale: float, max_len: int, out: torch.Tensor | None = None,
                     mass: torch.Tensor | None = None, slots: torch.Tensor | None = None) -> torch.Tensor:
    """q: [B, H, D] (one token per sequence); k_cache, v_cache: [S, Hkv, D] -> [B, H, D] (into out when given);
    mass: [S, Hkv] fp32, when given each key's attention (summed over its query group) is added at its slot;
    slots: [B] the step's slot mapping, rows with a negative slot (a graph's padding) add no mass (None: all add).
    Triton on CUDA tensors (decode_attention_triton), decode_attention_ref on CPU tensors."""
    if q.is_cuda:
        return decode_attention_triton(q, k_cache, v_cache, slot_base, kv_len, scale, max_len, out=out, mass=mass,
                                       slots=slots)
    y = decode_attention_ref(q, k_cache, v_cache, slot_base, kv_len, scale, mass=mass, slots=slots)
    return y if out is None else out.copy_(y)


def decode_attention_triton(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_base: torch.Tensor,
                            kv_len: torch.Tensor, scale: float, max_len: int, num_parts: int | None = None,
                            out: torch.Tensor | None = None, mass: torch.Tensor | None = None,
                            slots: torch.Tensor | None = None) -> torch.Tensor:
    """The split-K Triton kernel and its combine (CPU tensors run in Triton's interpreter).

    Sequence b attends to slots [slot_base[b], slot_base[b] + kv_len[b]) (slot_base, kv_len: [B] int device
    tensors, 1 <= kv_len[b] <= max_len); query head h reads KV head h // (H / Hkv); softmax in fp32.
    max_len: the static bound the partitioning is derived from; num_parts overrides the partition count (and then
    every partition gets keys whenever the length allows 16 each, instead of MIN_PARTITION); mass: [S, Hkv] fp32
    contiguous, the attention each key receives added at its slot (a third launch), except from rows whose slot in
    slots [B] is negative."""
    B, H, D = q.shape
    Hkv = k_cache.shape[1]
    assert H % Hkv == 0 and k_cache.shape[1:] == (Hkv, D) and v_cache.shape == k_cache.shape
    assert q.stride(-1) == 1 and k_cache.stride(-1) == 1 and v_cache.stride(-1) == 1
    assert k_cache.dtype == v_cache.dtype and slot_base.shape == (B,) and kv_len.shape == (B,) and max_len >= 1
    if out is None:
        out = torch.empty_like(q)
    assert out.shape == q.shape and out.stride(-1) == 1
    min_part = MIN_PARTITION if num_parts is None else 16
    if num_parts is None:
        num_parts = num_partitions(max_len, B * Hkv, q.device)
    num_parts = min(num_parts, triton.cdiv(max_len, 16))  # runs are at least 16 keys: more could never work
    acc = torch.empty(B, H, num_parts, D, dtype=torch.float32, device=q.device)
    ml = torch.empty(B, H, num_parts, 2, dtype=torch.float32, device=q.device)
    G = H // Hkv
    block_d = triton.next_power_of_2(D)
    block_g = max(16, triton.next_power_of_2(G))
    dot_f32 = k_cache.dtype == torch.float32 or not q.is_cuda
    _decode_attention_kernel[(B * Hkv, num_parts)](
        q, k_cache, v_cache, slot_base, kv_len, acc, ml, scale, q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), v_cache.stride(0), v_cache.stride(1), HKV=Hkv, G=G, D=D,
        BLOCK_G=block_g, BLOCK_D=block_d, BLOCK_N=BLOCK_N, MIN_PART=min_part,
        DOT_F32=dot_f32, num_warps=NUM_WARPS, num_stages=NUM_STAGES)
    lse = ml if mass is None else torch.empty(B, H, 2, dtype=torch.float32, device=q.device)
    _decode_combine_kernel[(B * H,)](acc, ml, out, lse, num_parts, out.stride(0), out.stride(1), H=H, D=D,
                                     BLOCK_P=triton.next_power_of_2(num_parts), BLOCK_D=block_d,
                                     STORE_LSE=mass is not None)
    if mass is not None:
        assert mass.dtype == torch.float32 and mass.is_contiguous() and mass.shape == k_cache.shape[:2]
        assert slots is None or slots.shape == (B,)
        _decode_mass_kernel[(B * Hkv, num_parts)](
            q, k_cache, slot_base, kv_len, kv_len if slots is None else slots, lse, mass, scale, q.stride(0), q.stride(1), k_cache.stride(0),
            k_cache.stride(1), mass.stride(0), HKV=Hkv, G=G, D=D, BLOCK_G=block_g, BLOCK_D=block_d, BLOCK_N=BLOCK_N,
            MIN_PART=min_part, DOT_F32=dot_f32, HAS_SLOTS=slots is not None, num_warps=NUM_WARPS)
    return out


def decode_attention_ref(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_base: torch.Tensor,
                         kv_len: torch.Tensor, scale: float, mass: torch.Tensor | None = None,
                         slots: torch.Tensor | None = None) -> torch.Tensor:
    """Plain PyTorch, fp32 scores, softmax and sums, one grouped matmul per KV head group: the oracle and the CPU
    path (mass: as decode_attention)."""
    H, D = q.shape[1:]
    Hkv = k_cache.shape[1]
    out = torch.empty_like(q)
    adds = [True] * q.shape[0] if slots is None else (slots >= 0).tolist()
    for b, (base, n) in enumerate(zip(slot_base.tolist(), kv_len.tolist())):
        k = k_cache[base:base + n].transpose(0, 1).float()  # [Hkv, n, D]
        v = v_cache[base:base + n].transpose(0, 1).float()
        qg = q[b].view(Hkv, H // Hkv, D).float()  # query head h reads KV head h // (H / Hkv)
        p = torch.softmax(torch.bmm(qg, k.transpose(1, 2)) * scale, dim=-1)  # [Hkv, G, n]
        out[b] = torch.bmm(p, v).view(H, D).to(q.dtype)
        if mass is not None and adds[b]:
            mass[base:base + n] += p.sum(1).transpose(0, 1)
    return out
