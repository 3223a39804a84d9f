"""Fused elementwise ops of a decoder layer, each one Triton launch: residual add + RMSNorm, q/k RMSNorm + RoPE + KV
write, and SiLU-and-multiply; each beside its plain-PyTorch reference (fp32 math).

Each public op dispatches itself: the Triton kernel (`<op>_triton`) for CUDA tensors, the reference (`<op>_ref`) for
CPU tensors, so the reference is both the test oracle and the CPU path. Kernel and reference keep the same rounding
points (the activation dtype before a norm's weight multiply, as Hugging Face's RMSNorm). Attention is kernels/
decode_attention.py.
"""

import torch
import triton
import triton.language as tl


def _interpreted(x: torch.Tensor) -> bool:
    """Triton's interpreter (CPU tensors) runs programs one by one: callers then prefer few large programs."""
    return not x.is_cuda


@triton.jit
def _add_rmsnorm_kernel(x_ptr, r_ptr, w_ptr, y_ptr, r_out_ptr, N, eps, stride_x, stride_r, stride_y, stride_ro,
                        HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr):
    """One program per row: s = x (+ r), rounded to x's dtype; y = w * dtype(s * rsqrt(mean(s^2) + eps))."""
    i_t = tl.program_id(0).to(tl.int64)
    o_n = tl.arange(0, BLOCK)
    m_n = o_n < N
    b_x = tl.load(x_ptr + i_t * stride_x + o_n, mask=m_n, other=0.0)
    if HAS_RESIDUAL:
        b_r = tl.load(r_ptr + i_t * stride_r + o_n, mask=m_n, other=0.0)
        b_x = (b_x.to(tl.float32) + b_r.to(tl.float32)).to(x_ptr.dtype.element_ty)
        tl.store(r_out_ptr + i_t * stride_ro + o_n, b_x, mask=m_n)
    b_s = b_x.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(b_s * b_s, axis=0) / N + eps)
    b_n = (b_s * rstd).to(x_ptr.dtype.element_ty).to(tl.float32)
    b_w = tl.load(w_ptr + o_n, mask=m_n, other=0.0).to(tl.float32)
    tl.store(y_ptr + i_t * stride_y + o_n, (b_n * b_w).to(y_ptr.dtype.element_ty), mask=m_n)


def add_rmsnorm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
                eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """x, residual: [T, N] (residual None: x alone); weight: [N] -> (rmsnorm(x + residual) * weight, x + residual).

    The sum is rounded to x.dtype (it is the next layer's residual); without a residual the second result is x.
    Triton on CUDA tensors, add_rmsnorm_ref on CPU tensors."""
    if x.is_cuda:
        return add_rmsnorm_triton(x, residual, weight, eps)
    return add_rmsnorm_ref(x, residual, weight, eps)


def add_rmsnorm_triton(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float,
                       out: torch.Tensor | None = None,
                       residual_out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """add_rmsnorm as one Triton launch (any device: CPU tensors run in Triton's interpreter), into out and
    residual_out when given."""
    T, N = x.shape
    assert x.stride(-1) == 1 and weight.shape == (N,) and weight.is_contiguous(), "rows must be contiguous"
    assert residual is None or (residual.shape == x.shape and residual.dtype == x.dtype and residual.stride(-1) == 1)
    y = torch.empty(T, N, dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device) if out is None else out
    r_out = x if residual is None else torch.empty_like(x) if residual_out is None else residual_out
    assert y.shape == x.shape and y.stride(-1) == 1 and r_out.shape == x.shape and r_out.stride(-1) == 1
    r = x if residual is None else residual
    if T:
        _add_rmsnorm_kernel[(T,)](x, r, weight, y, r_out, N, eps, x.stride(0), r.stride(0), y.stride(0),
                                  r_out.stride(0), HAS_RESIDUAL=residual is not None,
                                  BLOCK=triton.next_power_of_2(N), num_warps=8 if N >= 4096 else 4)
    return y, r_out


def add_rmsnorm_ref(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
                    eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """add_rmsnorm in plain PyTorch (fp32 statistics, the same rounding points): the oracle and the CPU path."""
    if residual is not None:
        x = (x.float() + residual.float()).to(x.dtype)
    xf = x.float()
    normed = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    y = normed.float() * weight.float()
    return y.to(torch.promote_types(x.dtype, weight.dtype)), x


@triton.jit
def _qk_norm_rope_kv_kernel(qkv_ptr, qw_ptr, kw_ptr, cos_ptr, sin_ptr, slot_ptr, q_ptr, k_ptr, v_ptr, qp_ptr, eps,
                            stride_t, stride_ct, stride_qt, stride_qh, stride_ks, stride_kh, stride_vs, stride_vh,
                            H: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr, QK_NORM: tl.constexpr,
                            Q_PRE: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    """Grid (T, cdiv(H + 2 Hkv, BLOCK_H)): BLOCK_H heads of one token's qkv row, each as two halves [BLOCK_D] (the
    RoPE pairs j, j + D/2). Heads [0, H) are queries, [H, H + Hkv) keys, the rest values; only q and k are normed and
    rotated. Each head is stored to exactly one of q_out, k_cache, v_cache (masked stores, no branches); with Q_PRE the
    normed queries before RoPE also go to qp (laid out as q_out). A token whose slot is negative (a padded row of a
    captured batch) writes no K/V; its q is still computed."""
    HALF: tl.constexpr = D // 2
    i_t = tl.program_id(0).to(tl.int64)
    i_h = tl.program_id(1)
    o_h = i_h * BLOCK_H + tl.arange(0, BLOCK_H)
    o_d = tl.arange(0, BLOCK_D)
    m_d = o_d < HALF
    m_h = o_h < H + 2 * HKV
    m_q = o_h < H
    m_k = (o_h >= H) & (o_h < H + HKV)
    m_v = (o_h >= H + HKV) & m_h
    m_hd = m_h[:, None] & m_d[None, :]
    p_x = qkv_ptr + i_t * stride_t + o_h[:, None] * D + o_d[None, :]
    b_lo = tl.load(p_x, mask=m_hd, other=0.0)
    b_hi = tl.load(p_x + HALF, mask=m_hd, other=0.0)
    slot = tl.load(slot_ptr + i_t).to(tl.int64)
    m_slot = (tl.zeros_like(o_h) + slot) >= 0  # [BLOCK_H]: a padded row (slot -1) stores no K/V
    o_v = (o_h - H - HKV).to(tl.int64)
    p_v = v_ptr + slot * stride_vs + o_v[:, None] * stride_vh + o_d[None, :]
    m_vd = (m_v & m_slot)[:, None] & m_d[None, :]
    tl.store(p_v, b_lo.to(v_ptr.dtype.element_ty), mask=m_vd)
    tl.store(p_v + HALF, b_hi.to(v_ptr.dtype.element_ty), mask=m_vd)
    x_lo = b_lo.to(tl.float32)
    x_hi = b_hi.to(tl.float32)
    if QK_NORM:
        rstd = 1.0 / tl.sqrt((tl.sum(x_lo * x_lo, axis=1) + tl.sum(x_hi * x_hi, axis=1)) / D + eps)
        qw_lo = tl.load(qw_ptr + o_d, mask=m_d, other=0.0).to(tl.float32)[None, :]
        qw_hi = tl.load(qw_ptr + HALF + o_d, mask=m_d, other=0.0).to(tl.float32)[None, :]
        kw_lo = tl.load(kw_ptr + o_d, mask=m_d, other=0.0).to(tl.float32)[None, :]
        kw_hi = tl.load(kw_ptr + HALF + o_d, mask=m_d, other=0.0).to(tl.float32)[None, :]
        w_lo = tl.where(m_q[:, None], qw_lo, kw_lo)
        w_hi = tl.where(m_q[:, None], qw_hi, kw_hi)
        # as the torch path: the normed head rounded to the activation dtype, times the weight, rounded again
        x_lo = ((x_lo * rstd[:, None]).to(qkv_ptr.dtype.element_ty).to(tl.float32) * w_lo)
        x_hi = ((x_hi * rstd[:, None]).to(qkv_ptr.dtype.element_ty).to(tl.float32) * w_hi)
        x_lo = x_lo.to(qkv_ptr.dtype.element_ty).to(tl.float32)
        x_hi = x_hi.to(qkv_ptr.dtype.element_ty).to(tl.float32)
    m_qd = m_q[:, None] & m_d[None, :]
    p_qh = o_h[:, None].to(tl.int64) * stride_qh + o_d[None, :]
    if Q_PRE:
        tl.store(qp_ptr + i_t * stride_qt + p_qh, x_lo.to(qp_ptr.dtype.element_ty), mask=m_qd)
        tl.store(qp_ptr + i_t * stride_qt + p_qh + HALF, x_hi.to(qp_ptr.dtype.element_ty), mask=m_qd)
    cos_lo = tl.load(cos_ptr + i_t * stride_ct + o_d, mask=m_d, other=0.0).to(tl.float32)[None, :]
    cos_hi = tl.load(cos_ptr + i_t * stride_ct + HALF + o_d, mask=m_d, other=0.0).to(tl.float32)[None, :]
    sin_lo = tl.load(sin_ptr + i_t * stride_ct + o_d, mask=m_d, other=0.0).to(tl.float32)[None, :]
    sin_hi = tl.load(sin_ptr + i_t * stride_ct + HALF + o_d, mask=m_d, other=0.0).to(tl.float32)[None, :]
    r_lo = x_lo * cos_lo - x_hi * sin_lo
    r_hi = x_hi * cos_hi + x_lo * sin_hi
    p_q = q_ptr + i_t * stride_qt + p_qh
    tl.store(p_q, r_lo.to(q_ptr.dtype.element_ty), mask=m_qd)
    tl.store(p_q + HALF, r_hi.to(q_ptr.dtype.element_ty), mask=m_qd)
    p_k = k_ptr + slot * stride_ks + (o_h - H).to(tl.int64)[:, None] * stride_kh + o_d[None, :]
    m_kd = (m_k & m_slot)[:, None] & m_d[None, :]
    tl.store(p_k, r_lo.to(k_ptr.dtype.element_ty), mask=m_kd)
    tl.store(p_k + HALF, r_hi.to(k_ptr.dtype.element_ty), mask=m_kd)


def qk_norm_rope_kv(qkv: torch.Tensor, q_norm_w: torch.Tensor | None, k_norm_w: torch.Tensor | None, eps: float,
                    cos: torch.Tensor, sin: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    slot_mapping: torch.Tensor, H: int, Hkv: int, D: int,
                    q_pre: torch.Tensor | None = None) -> torch.Tensor:
    """qkv: [T, (H + 2 Hkv) D] (the fused projection) -> rotated q [T, H, D]; writes rotated k and raw v to
    k_cache, v_cache [S, Hkv, D] at slot_mapping [T] (a negative slot: a padded row, whose K/V go nowhere).
    q_norm_w, k_norm_w: [D] per-head RMSNorm weights (Qwen3) or
    both None; cos, sin: [T, 1, D] or [T, D] from Rope.cos_sin (HF "half" layout, scale included). q_pre: [T, H, D],
    filled with the queries RoPE rotates (after the norm) when given. Triton on CUDA tensors, the reference on CPU."""
    if qkv.is_cuda:
        return qk_norm_rope_kv_triton(qkv, q_norm_w, k_norm_w, eps, cos, sin, k_cache, v_cache, slot_mapping, H, Hkv,
                                      D, q_pre=q_pre)
    return qk_norm_rope_kv_ref(qkv, q_norm_w, k_norm_w, eps, cos, sin, k_cache, v_cache, slot_mapping, H, Hkv, D,
                               q_pre=q_pre)


def qk_norm_rope_kv_triton(qkv: torch.Tensor, q_norm_w: torch.Tensor | None, k_norm_w: torch.Tensor | None,
                           eps: float, cos: torch.Tensor, sin: torch.Tensor, k_cache: torch.Tensor,
                           v_cache: torch.Tensor, slot_mapping: torch.Tensor, H: int, Hkv: int, D: int,
                           out: torch.Tensor | None = None, q_pre: torch.Tensor | None = None) -> torch.Tensor:
    """qk_norm_rope_kv as one Triton launch (CPU tensors run in Triton's interpreter), into out when given."""
    T = qkv.shape[0]
    qk_norm = q_norm_w is not None
    assert qkv.shape == (T, (H + 2 * Hkv) * D) and qkv.stride(-1) == 1 and D % 2 == 0
    assert qk_norm == (k_norm_w is not None) and (not qk_norm or (q_norm_w.shape == (D,) and k_norm_w.shape == (D,)))
    cos, sin = cos.reshape(T, D), sin.reshape(T, D)
    assert cos.stride() == sin.stride() and cos.stride(-1) == 1, "cos and sin must share a row-contiguous layout"
    assert k_cache.shape[1:] == (Hkv, D) and v_cache.shape[1:] == (Hkv, D), "caches must be [S, Hkv, D]"
    assert k_cache.stride(-1) == 1 and v_cache.stride(-1) == 1 and slot_mapping.shape == (T,)
    q = torch.empty(T, H, D, dtype=qkv.dtype, device=qkv.device) if out is None else out
    assert q.shape == (T, H, D) and q.stride(-1) == 1
    assert q_pre is None or q_pre.stride() == q.stride(), "q_pre must be laid out as the output"
    if T == 0:
        return q
    heads = H + 2 * Hkv
    block_h = triton.next_power_of_2(heads) if _interpreted(qkv) else 8
    grid = (T, triton.cdiv(heads, block_h))
    dummy = cos  # never read without q/k-norm
    _qk_norm_rope_kv_kernel[grid](qkv, q_norm_w if qk_norm else dummy, k_norm_w if qk_norm else dummy, cos, sin,
                                  slot_mapping, q, k_cache, v_cache, q if q_pre is None else q_pre, eps,
                                  qkv.stride(0), cos.stride(0), q.stride(0), q.stride(1), k_cache.stride(0),
                                  k_cache.stride(1), v_cache.stride(0), v_cache.stride(1), H=H, HKV=Hkv, D=D,
                                  QK_NORM=qk_norm, Q_PRE=q_pre is not None, BLOCK_H=block_h,
                                  BLOCK_D=triton.next_power_of_2(D // 2))
    return q


def qk_norm_rope_kv_ref(qkv: torch.Tensor, q_norm_w: torch.Tensor | None, k_norm_w: torch.Tensor | None, eps: float,
                        cos: torch.Tensor, sin: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                        slot_mapping: torch.Tensor, H: int, Hkv: int, D: int,
                        q_pre: torch.Tensor | None = None) -> torch.Tensor:
    """qk_norm_rope_kv in plain PyTorch (fp32 math, the same rounding points): the oracle and the CPU path."""
    T = qkv.shape[0]
    q, k, v = qkv.view(T, H + 2 * Hkv, D).split([H, Hkv, Hkv], dim=1)

    def norm(x: torch.Tensor, w: torch.Tensor | None) -> torch.Tensor:
        if w is None:
            return x.float()
        xf = x.float()
        normed = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
        return (normed.float() * w.float()).to(x.dtype).float()

    c, s = cos.reshape(T, 1, D).float(), sin.reshape(T, 1, D).float()

    def rope(x: torch.Tensor, c: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        return x * c + torch.cat((-x[..., D // 2:], x[..., :D // 2]), dim=-1) * s

    kc, vc, slots = (c, s), v, slot_mapping
    if not bool((slot_mapping >= 0).all()):  # padded rows of a captured batch (slot -1) write nowhere
        rows = slot_mapping >= 0
        k, vc, kc, slots = k[rows], v[rows], (c[rows], s[rows]), slot_mapping[rows]
    k_cache.index_copy_(0, slots, rope(norm(k, k_norm_w), *kc).to(k_cache.dtype))
    v_cache.index_copy_(0, slots, vc.to(v_cache.dtype))
    qn = norm(q, q_norm_w)
    if q_pre is not None:
        q_pre.copy_(qn)
    return rope(qn, c, s).to(qkv.dtype)


@triton.jit
def _silu_mul_kernel(x_ptr, y_ptr, N, stride_x, stride_y, BLOCK: tl.constexpr):
    """Grid (T, cdiv(I, BLOCK)): y[t, i] = dtype(silu(gate)) * up with gate = x[t, i], up = x[t, I + i]."""
    i_t = tl.program_id(0).to(tl.int64)
    o_n = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    m_n = o_n < N
    b_g = tl.load(x_ptr + i_t * stride_x + o_n, mask=m_n, other=0.0).to(tl.float32)
    b_u = tl.load(x_ptr + i_t * stride_x + N + o_n, mask=m_n, other=0.0).to(tl.float32)
    b_a = (b_g / (1.0 + tl.exp(-b_g))).to(y_ptr.dtype.element_ty).to(tl.float32)
    tl.store(y_ptr + i_t * stride_y + o_n, (b_a * b_u).to(y_ptr.dtype.element_ty), mask=m_n)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up: [T, 2I] (gate then up, the fused projection) -> silu(gate) * up: [T, I]. Triton on CUDA tensors, the
    reference on CPU tensors."""
    return silu_mul_triton(gate_up) if gate_up.is_cuda else silu_mul_ref(gate_up)


def silu_mul_triton(gate_up: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """silu_mul as one Triton launch (CPU tensors run in Triton's interpreter), into out when given."""
    T, two_i = gate_up.shape
    assert two_i % 2 == 0 and gate_up.stride(-1) == 1
    n = two_i // 2
    y = torch.empty(T, n, dtype=gate_up.dtype, device=gate_up.device) if out is None else out
    assert y.shape == (T, n) and y.stride(-1) == 1
    block = triton.next_power_of_2(n) if _interpreted(gate_up) else min(1024, triton.next_power_of_2(n))
    if T:
        _silu_mul_kernel[(T, triton.cdiv(n, block))](gate_up, y, n, gate_up.stride(0), y.stride(0), BLOCK=block)
    return y


def silu_mul_ref(gate_up: torch.Tensor) -> torch.Tensor:
    """silu_mul in plain PyTorch (fp32, SiLU rounded to the dtype as the kernel does): the oracle and the CPU path."""
    gate, up = gate_up.float().chunk(2, dim=-1)
    return (torch.nn.functional.silu(gate).to(gate_up.dtype).float() * up).to(gate_up.dtype)
