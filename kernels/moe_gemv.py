"""The selected experts' quantized GEMVs of an MoE layer for decode, reading the expert ids from the device: a Triton
kernel and its plain-PyTorch reference.

The experts of one projection are stacked into one QuantWeight [E * N, K] (expert e owns rows [e N, (e + 1) N),
row-major, any layout of kernels/qlinear.py: 4- or 8-bit codes, offsets, a code table, a zero code). Row r of the
output is x[r // X_DIV] times expert ids[r]'s rows: with X_DIV = top-k, one token's hidden state goes through each of
its k experts without being copied. The program reads its expert id from device memory, so no value comes back to
the host and the step can sit in a CUDA graph. Two options fuse the MoE's elementwise work: `up` (a second stacked
weight of the same layout: the output is silu(x W_gate) * (x W_up), the expert's gate/up with its SiLU) and `scale`
(one factor per row: the routing weight, applied to the down projection's output). It does not route (models/moe.py
picks ids and weights) and does not do prefill, where models/moe.py groups the tokens by expert instead.
"""

import torch
import triton
import triton.language as tl

from .qlinear import QuantWeight


@triton.jit
def _group_dot(q_ptr, s_ptr, o_ptr, lut_ptr, p_q, p_s, m_q, m_s, b_x, BITS: tl.constexpr, GROUP: tl.constexpr,
               HAS_OFFSETS: tl.constexpr, HAS_LUT: tl.constexpr, ZERO: tl.constexpr):
    """sum over the groups of a step of w[n, k] x[k] -> [BLOCK_N]: codes [BLOCK_N, G, GROUP] dequantized in fp32 as
    QuantWeight.dequantize does ((lut[c] or c) - zero) * scale + offset."""
    b_q = tl.load(q_ptr + p_q, mask=m_q, other=0)
    if BITS == 4:  # byte j of a group holds codes 2j (low nibble) and 2j + 1
        b_c = tl.reshape(tl.join(b_q & 0xF, b_q >> 4), (b_q.shape[0], b_q.shape[1], GROUP))
    else:
        b_c = b_q
    if HAS_LUT:
        b_w = tl.load(lut_ptr + b_c.to(tl.int32))
    else:
        b_w = b_c.to(tl.float32)
    if ZERO != 0:
        b_w -= ZERO
    b_w = b_w * tl.load(s_ptr + p_s, mask=m_s, other=0.0).to(tl.float32)[:, :, None]
    if HAS_OFFSETS:
        b_w += tl.load(o_ptr + p_s, mask=m_s, other=0.0).to(tl.float32)[:, :, None]
    return tl.sum(tl.sum(b_w * b_x[None, :, :], axis=2), axis=1)


@triton.jit
def _moe_gemv_kernel(x_ptr, ids_ptr, q_ptr, s_ptr, o_ptr, lut_ptr, uq_ptr, us_ptr, uo_ptr, w_ptr, y_ptr, N, K,
                     stride_x, stride_qn, stride_sn, stride_y, X_DIV: tl.constexpr, BITS: tl.constexpr,
                     GROUP: tl.constexpr, HAS_OFFSETS: tl.constexpr, HAS_LUT: tl.constexpr, ZERO: tl.constexpr,
                     GATED: tl.constexpr, SCALED: tl.constexpr, BLOCK_N: tl.constexpr, STEP_GROUPS: tl.constexpr):
    """Grid (rows, cdiv(N, BLOCK_N)): y[r, n] for BLOCK_N outputs of row r, looping over K in steps of STEP_GROUPS
    whole groups; fp32 accumulation."""
    GB: tl.constexpr = GROUP * BITS // 8  # bytes of one group of one row
    i_r = tl.program_id(0).to(tl.int64)
    o_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    m_n = o_n < N
    e = tl.load(ids_ptr + i_r).to(tl.int64)  # the expert, from device memory
    rows = e * N + o_n
    o_g = tl.arange(0, STEP_GROUPS)
    o_b = tl.arange(0, GB)
    o_k = tl.arange(0, GROUP)
    p_x = x_ptr + (i_r // X_DIV) * stride_x
    n_groups = K // GROUP
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    acc_u = tl.zeros([BLOCK_N], dtype=tl.float32)
    for g0 in range(0, n_groups, STEP_GROUPS):
        o_gs = g0 + o_g
        m_g = o_gs < n_groups
        b_x = tl.load(p_x + o_gs[:, None] * GROUP + o_k[None, :], mask=m_g[:, None], other=0.0).to(tl.float32)
        p_q = rows[:, None, None] * stride_qn + o_gs[None, :, None] * GB + o_b[None, None, :]
        m_q = m_n[:, None, None] & m_g[None, :, None]
        p_s = rows[:, None] * stride_sn + o_gs[None, :]
        m_s = m_n[:, None] & m_g[None, :]
        acc += _group_dot(q_ptr, s_ptr, o_ptr, lut_ptr, p_q, p_s, m_q, m_s, b_x, BITS, GROUP, HAS_OFFSETS, HAS_LUT,
                          ZERO)
        if GATED:
            acc_u += _group_dot(uq_ptr, us_ptr, uo_ptr, lut_ptr, p_q, p_s, m_q, m_s, b_x, BITS, GROUP, HAS_OFFSETS,
                                HAS_LUT, ZERO)
    if GATED:
        acc = acc / (1.0 + tl.exp(-acc)) * acc_u
    if SCALED:
        acc = acc * tl.load(w_ptr + i_r).to(tl.float32)
    tl.store(y_ptr + i_r * stride_y + o_n, acc.to(y_ptr.dtype.element_ty), mask=m_n)


def moe_gemv(x: torch.Tensor, qw: QuantWeight, ids: torch.Tensor, n: int, x_div: int = 1,
             up: QuantWeight | None = None, scale: torch.Tensor | None = None,
             out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """x: [M, K]; qw: experts stacked [E * n, K]; ids: [R] expert of each output row (R = M * x_div, on x's device)
    -> y: [R, n] in out_dtype (default x.dtype) with y[r] = W_ids[r] x[r // x_div], or silu(W x) * (U x) when `up`
    is given, times scale[r] when `scale` [R] is. Triton on CUDA tensors, moe_gemv_ref on CPU tensors."""
    if x.is_cuda:
        return moe_gemv_triton(x, qw, ids, n, x_div, up, scale, out_dtype)
    return moe_gemv_ref(x, qw, ids, n, x_div, up, scale, out_dtype)


def _kernel_layout(qw: QuantWeight) -> bool:
    return qw.group >= 16 and qw.group & (qw.group - 1) == 0


def moe_gemv_triton(x: torch.Tensor, qw: QuantWeight, ids: torch.Tensor, n: int, x_div: int = 1,
                    up: QuantWeight | None = None, scale: torch.Tensor | None = None,
                    out_dtype: torch.dtype | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """moe_gemv as one Triton launch (CPU tensors run in Triton's interpreter), into out when given."""
    M, K = x.shape
    R = ids.numel()
    assert qw.shape[1] == K and qw.shape[0] % n == 0 and not qw.tiled, f"x {tuple(x.shape)} vs experts {qw.shape}"
    assert R == M * x_div and x.stride(1) == 1 and ids.device == x.device == qw.device
    assert up is None or (up.shape == qw.shape and up.layout == qw.layout and not up.tiled), "up must match qw"
    assert scale is None or scale.shape == (R,)
    assert _kernel_layout(qw), f"group {qw.group} must be a power of two >= 16"
    y = torch.empty(R, n, dtype=out_dtype or x.dtype, device=x.device) if out is None else out
    assert y.shape == (R, n) and y.stride(1) == 1
    if R == 0:
        return y
    ids = ids.reshape(-1).contiguous()
    if x.is_cuda:  # a step of 256 codes per row (not yet tuned on a GPU)
        block_n, step = 32, max(1, 256 // qw.group)
    else:  # Triton's interpreter runs programs one by one: few large ones, within its 2^20 elements per block
        block_n = min(512, triton.next_power_of_2(n))
        step = max(1, min(triton.next_power_of_2(K // qw.group), (1 << 18) // (block_n * qw.group)))
    s = qw.scales
    o = s if qw.offsets is None else qw.offsets
    u = qw if up is None else up
    _moe_gemv_kernel[(R, triton.cdiv(n, block_n))](
        x, ids, qw.qweight, s, o, s if qw.lut is None else qw.lut, u.qweight, u.scales,
        u.scales if u.offsets is None else u.offsets, s if scale is None else scale, y, n, K, x.stride(0),
        qw.qweight.stride(0), s.stride(0), y.stride(0), X_DIV=x_div, BITS=qw.bits, GROUP=qw.group,
        HAS_OFFSETS=qw.offsets is not None, HAS_LUT=qw.lut is not None, ZERO=qw.zero, GATED=up is not None,
        SCALED=scale is not None, BLOCK_N=block_n, STEP_GROUPS=step)
    return y


def expert_rows(qw: QuantWeight, start: int, stop: int) -> QuantWeight:
    """Rows [start, stop) of a row-major stacked weight as a QuantWeight (views, no copy)."""
    return QuantWeight(qw.qweight[start:stop], qw.scales[start:stop],
                       None if qw.offsets is None else qw.offsets[start:stop], qw.lut, qw.bits, qw.group,
                       (stop - start, qw.shape[1]), qw.zero)


def moe_gemv_ref(x: torch.Tensor, qw: QuantWeight, ids: torch.Tensor, n: int, x_div: int = 1,
                 up: QuantWeight | None = None, scale: torch.Tensor | None = None,
                 out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """moe_gemv in plain PyTorch (fp32; each selected expert dequantized once): the oracle and the CPU path."""
    ids = ids.reshape(-1)
    xs = x.float()[torch.arange(ids.numel(), device=x.device) // x_div]
    y = torch.empty(ids.numel(), n, dtype=torch.float32, device=x.device)
    for e in ids.unique().tolist():
        sel = (ids == e).nonzero().squeeze(1)
        w = expert_rows(qw, e * n, (e + 1) * n).dequantize()
        y[sel] = xs[sel] @ w.T
        if up is not None:
            y[sel] = torch.nn.functional.silu(y[sel]) * (xs[sel] @ expert_rows(up, e * n, (e + 1) * n).dequantize().T)
    if scale is not None:
        y = y * scale.float()[:, None]
    return y.to(out_dtype or x.dtype)
