"""Online TriAttention statistics: one layer's pre-RoPE queries summed per (query head, RoPE band) into fp64 running
sums, a Triton kernel beside its plain-PyTorch reference.

Band f of a head pairs dims f and f + D/2 ("half" layout) as one complex number q_f; the sums are of Re q_f, Im q_f
and |q_f| over the step's tokens, skipping the padded rows of a captured batch (slot -1). The kernel adds into the
sums in place with no host value, so a CUDA graph replays it. It does not divide by the token count or keep it (the
caller counts tokens; openclaw.evict.calibrate.QueryStats turns the sums into means).
"""

import torch
import triton
import triton.language as tl


@triton.jit(do_not_specialize=["T"])
def _query_stats_kernel(q_ptr, slot_ptr, re_ptr, im_ptr, abs_ptr, T, stride_t, stride_h, stride_s, HALF: tl.constexpr,
                        HAS_SLOTS: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_F: tl.constexpr):
    """Grid (H,): head h's bands, summed over the T rows in blocks of BLOCK_T in fp64, then added to the sums."""
    i_h = tl.program_id(0).to(tl.int64)
    o_f = tl.arange(0, BLOCK_F)
    m_f = o_f < HALF
    acc_re = tl.zeros([BLOCK_F], dtype=tl.float64)
    acc_im = tl.zeros([BLOCK_F], dtype=tl.float64)
    acc_abs = tl.zeros([BLOCK_F], dtype=tl.float64)
    for t0 in range(0, T, BLOCK_T):
        o_t = t0 + tl.arange(0, BLOCK_T)
        m_t = o_t < T
        if HAS_SLOTS:
            m_t = m_t & (tl.load(slot_ptr + o_t, mask=m_t, other=-1) >= 0)
        m = m_t[:, None] & m_f[None, :]
        p = q_ptr + o_t.to(tl.int64)[:, None] * stride_t + i_h * stride_h + o_f[None, :]
        b_re = tl.load(p, mask=m, other=0.0).to(tl.float64)
        b_im = tl.load(p + HALF, mask=m, other=0.0).to(tl.float64)
        acc_re += tl.sum(b_re, axis=0)
        acc_im += tl.sum(b_im, axis=0)
        acc_abs += tl.sum(tl.sqrt(b_re * b_re + b_im * b_im), axis=0)
    o_s = i_h * stride_s + o_f
    tl.store(re_ptr + o_s, tl.load(re_ptr + o_s, mask=m_f) + acc_re, mask=m_f)
    tl.store(im_ptr + o_s, tl.load(im_ptr + o_s, mask=m_f) + acc_im, mask=m_f)
    tl.store(abs_ptr + o_s, tl.load(abs_ptr + o_s, mask=m_f) + acc_abs, mask=m_f)


def query_stats(q: torch.Tensor, slots: torch.Tensor | None, re: torch.Tensor, im: torch.Tensor,
                abs_: torch.Tensor) -> None:
    """q: [T, H, D] pre-RoPE queries of one layer; slots: [T] the step's slot mapping (rows with a negative slot are
    skipped) or None (every row counts); re, im, abs_: [H, D/2] fp64 sums with unit column stride and one row stride
    (column ranges of wider sums work), added to in place. Triton on CUDA tensors, query_stats_ref on CPU tensors."""
    (query_stats_triton if q.is_cuda else query_stats_ref)(q, slots, re, im, abs_)


def query_stats_triton(q: torch.Tensor, slots: torch.Tensor | None, re: torch.Tensor, im: torch.Tensor,
                       abs_: torch.Tensor) -> None:
    """query_stats as one Triton launch (CPU tensors run in Triton's interpreter)."""
    T, H, D = q.shape
    assert q.stride(-1) == 1 and D % 2 == 0 and (slots is None or slots.shape == (T,))
    for s in (re, im, abs_):
        assert s.shape == (H, D // 2) and s.dtype == torch.float64 and s.stride() == re.stride() and s.stride(1) == 1
    block_t = 64 if q.is_cuda else triton.next_power_of_2(max(T, 1))
    _query_stats_kernel[(H,)](q, re if slots is None else slots, re, im, abs_, T, q.stride(0), q.stride(1),
                              re.stride(0), HALF=D // 2, HAS_SLOTS=slots is not None, BLOCK_T=block_t,
                              BLOCK_F=triton.next_power_of_2(D // 2))


def query_stats_ref(q: torch.Tensor, slots: torch.Tensor | None, re: torch.Tensor, im: torch.Tensor,
                    abs_: torch.Tensor) -> None:
    """Plain PyTorch in fp64: the oracle and the CPU path."""
    half = q.shape[-1] // 2
    if slots is not None and not bool((slots >= 0).all()):
        q = q[slots >= 0]
    qr, qi = q[..., :half].double(), q[..., half:].double()
    re += qr.sum(0)
    im += qi.sum(0)
    abs_ += torch.sqrt(qr * qr + qi * qi).sum(0)
