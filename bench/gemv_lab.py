"""The GEMV experiment behind kernels/qlinear.py (H200, 2026-11-29; bench/RESULTS.md): v2 = 3D tiles of whole groups
with the next tile prefetched into registers (what the library kernel became), v3 = split-K, one tile per program,
fp32 atomics (faster on down_proj, 46 vs 66 us, but three launches and a non-deterministic sum order).
GPU: python bench/gemv_lab.py [--json out.json]; CPU (interpreter, correctness only): --small."""

import argparse
import json
from functools import partial

import torch
import triton
import triton.language as tl
from openclaw.kernels import qlinear as ql


@triton.jit
def _magic(b_q, i: tl.constexpr, BITS: tl.constexpr):
    POS: tl.constexpr = 23 - BITS
    MASK: tl.constexpr = ((1 << BITS) - 1) << POS
    if POS >= BITS * i:
        t = b_q << (POS - BITS * i)
    else:
        t = b_q >> (BITS * i - POS)
    return ((t & MASK) | 0x3F800000).to(tl.float32, bitcast=True)


@triton.jit
def gemv_v2(x_ptr, qw_ptr, s_ptr, o_ptr, y_ptr, N, W, stride_qn, stride_sn, BITS: tl.constexpr,
            GROUP: tl.constexpr, BLOCK_N: tl.constexpr, G: tl.constexpr, REDUCE: tl.constexpr,
            PREFETCH: tl.constexpr):
    CPW: tl.constexpr = 32 // BITS
    WPG: tl.constexpr = GROUP // CPW
    BW: tl.constexpr = G * WPG
    i_n = tl.program_id(0).to(tl.int64)
    o_n = i_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_n = o_n < N
    o_g = tl.arange(0, G)
    o_w = o_g[:, None] * WPG + tl.arange(0, WPG)[None, :]
    num_g = W // WPG
    p_q = qw_ptr + o_n[:, None, None] * stride_qn + o_w[None, :, :]
    p_s = o_n[:, None] * stride_sn + o_g[None, :]
    b_q = tl.load(p_q, mask=m_n[:, None, None] & (o_w < W)[None], other=0)
    b_s = tl.load(s_ptr + p_s, mask=m_n[:, None] & (o_g < num_g)[None, :], other=0.0)
    b_o = tl.load(o_ptr + p_s, mask=m_n[:, None] & (o_g < num_g)[None, :], other=0.0)
    acc3 = tl.zeros((BLOCK_N, G, WPG), dtype=tl.float32)
    acc2 = tl.zeros((BLOCK_N, G), dtype=tl.float32)
    for w0 in range(0, W, BW):
        if PREFETCH:
            nw = w0 + BW
            n_q = tl.load(p_q + nw, mask=m_n[:, None, None] & ((nw + o_w) < W)[None], other=0)
            m_ng = m_n[:, None] & ((nw // WPG + o_g) < num_g)[None, :]
            n_s = tl.load(s_ptr + p_s + nw // WPG, mask=m_ng, other=0.0)
            n_o = tl.load(o_ptr + p_s + nw // WPG, mask=m_ng, other=0.0)
        part = tl.zeros((BLOCK_N, G, WPG), dtype=tl.float32)
        xs = tl.zeros((G, WPG), dtype=tl.float32)
        for i in tl.static_range(CPW):
            b_x = tl.load(x_ptr + (w0 + o_w) * CPW + i, mask=(w0 + o_w) < W, other=0.0).to(tl.float32)
            part += _magic(b_q, i, BITS) * b_x[None]
            xs += b_x
        s16 = b_s.to(tl.float32) * (1 << BITS)
        d = b_o.to(tl.float32) - s16
        if REDUCE:
            acc2 += tl.sum(part, axis=2) * s16 + tl.sum(xs, axis=1)[None, :] * d
        else:
            acc3 += part * s16[:, :, None] + xs[None] * d[:, :, None]
        if PREFETCH:
            b_q, b_s, b_o = n_q, n_s, n_o
        else:
            nw = w0 + BW
            b_q = tl.load(p_q + nw, mask=m_n[:, None, None] & ((nw + o_w) < W)[None], other=0)
            m_ng = m_n[:, None] & ((nw // WPG + o_g) < num_g)[None, :]
            b_s = tl.load(s_ptr + p_s + nw // WPG, mask=m_ng, other=0.0)
            b_o = tl.load(o_ptr + p_s + nw // WPG, mask=m_ng, other=0.0)
    if REDUCE:
        y = tl.sum(acc2, axis=1)
    else:
        y = tl.sum(tl.sum(acc3, axis=2), axis=1)
    tl.store(y_ptr + o_n, y.to(y_ptr.dtype.element_ty), mask=m_n)


@triton.jit
def gemv_v3(x_ptr, qw_ptr, s_ptr, o_ptr, y_ptr, N, W, stride_qn, stride_sn, BITS: tl.constexpr,
            GROUP: tl.constexpr, BLOCK_N: tl.constexpr, G: tl.constexpr):
    """split-K: one tile per program, fp32 atomic add into y (zeroed before)."""
    CPW: tl.constexpr = 32 // BITS
    WPG: tl.constexpr = GROUP // CPW
    BW: tl.constexpr = G * WPG
    i_n = tl.program_id(0).to(tl.int64)
    w0 = tl.program_id(1) * BW
    o_n = i_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_n = o_n < N
    o_g = tl.arange(0, G)
    o_w = w0 + o_g[:, None] * WPG + tl.arange(0, WPG)[None, :]
    num_g = W // WPG
    b_q = tl.load(qw_ptr + o_n[:, None, None] * stride_qn + o_w[None, :, :], mask=m_n[:, None, None] & (o_w < W)[None],
                  other=0)
    p_s = o_n[:, None] * stride_sn + w0 // WPG + o_g[None, :]
    m_ng = m_n[:, None] & ((w0 // WPG + o_g) < num_g)[None, :]
    b_s = tl.load(s_ptr + p_s, mask=m_ng, other=0.0).to(tl.float32) * (1 << BITS)
    b_o = tl.load(o_ptr + p_s, mask=m_ng, other=0.0).to(tl.float32)
    part = tl.zeros((BLOCK_N, G, WPG), dtype=tl.float32)
    xs = tl.zeros((G, WPG), dtype=tl.float32)
    for i in tl.static_range(CPW):
        b_x = tl.load(x_ptr + o_w * CPW + i, mask=o_w < W, other=0.0).to(tl.float32)
        part += _magic(b_q, i, BITS) * b_x[None]
        xs += b_x
    y = tl.sum(tl.sum(part, axis=2) * b_s + tl.sum(xs, axis=1)[None, :] * (b_o - b_s), axis=1)
    tl.atomic_add(y_ptr + o_n, y, mask=m_n)


def run_v2(x, qw, out, cfg):
    qw32 = qw.qweight.view(torch.int32)
    n = qw.shape[0]
    gemv_v2[(triton.cdiv(n, cfg["BLOCK_N"]),)](x, qw32, qw.scales, qw.offsets, out, n, qw32.shape[1], qw32.stride(0),
                                               qw.scales.stride(0), BITS=qw.bits, GROUP=qw.group, **cfg)


def run_v3(x, qw, out, cfg, y32):
    qw32 = qw.qweight.view(torch.int32)
    n, w = qw.shape[0], qw32.shape[1]
    bw = cfg["G"] * qw.group * qw.bits // 32
    y32.zero_()
    gemv_v3[(triton.cdiv(n, cfg["BLOCK_N"]), triton.cdiv(w, bw))](
        x, qw32, qw.scales, qw.offsets, y32, n, w, qw32.stride(0), qw.scales.stride(0), BITS=qw.bits, GROUP=qw.group,
        **cfg)
    out.copy_(y32.view(1, -1))


@triton.jit
def gemv_v4(x_ptr, qw_ptr, s_ptr, o_ptr, p_ptr, N, W, WS, stride_qn, stride_sn, BITS: tl.constexpr,
            GROUP: tl.constexpr, BLOCK_N: tl.constexpr, G: tl.constexpr):
    """v2 (prefetch, per-group reduce) over words [pid1 * WS, pid1 * WS + WS): fp32 partial sums into p[pid1, n]."""
    CPW: tl.constexpr = 32 // BITS
    WPG: tl.constexpr = GROUP // CPW
    BW: tl.constexpr = G * WPG
    i_n = tl.program_id(0).to(tl.int64)
    i_k = tl.program_id(1)
    o_n = i_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_n = o_n < N
    o_g = tl.arange(0, G)
    o_w = o_g[:, None] * WPG + tl.arange(0, WPG)[None, :]
    start = i_k * WS
    stop = tl.minimum(start + WS, W)
    num_g = stop // WPG
    p_q = qw_ptr + o_n[:, None, None] * stride_qn + o_w[None, :, :]
    p_s = o_n[:, None] * stride_sn + o_g[None, :]
    b_q = tl.load(p_q + start, mask=m_n[:, None, None] & ((start + o_w) < stop)[None], other=0)
    m_ng = m_n[:, None] & ((start // WPG + o_g) < num_g)[None, :]
    b_s = tl.load(s_ptr + p_s + start // WPG, mask=m_ng, other=0.0)
    b_o = tl.load(o_ptr + p_s + start // WPG, mask=m_ng, other=0.0)
    acc2 = tl.zeros((BLOCK_N, G), dtype=tl.float32)
    for w0 in range(start, stop, BW):
        nw = w0 + BW
        n_q = tl.load(p_q + nw, mask=m_n[:, None, None] & ((nw + o_w) < stop)[None], other=0)
        m_ng = m_n[:, None] & ((nw // WPG + o_g) < num_g)[None, :]
        n_s = tl.load(s_ptr + p_s + nw // WPG, mask=m_ng, other=0.0)
        n_o = tl.load(o_ptr + p_s + nw // WPG, mask=m_ng, other=0.0)
        part = tl.zeros((BLOCK_N, G, WPG), dtype=tl.float32)
        xs = tl.zeros((G, WPG), dtype=tl.float32)
        for i in tl.static_range(CPW):
            b_x = tl.load(x_ptr + (w0 + o_w) * CPW + i, mask=(w0 + o_w) < stop, other=0.0).to(tl.float32)
            part += _magic(b_q, i, BITS) * b_x[None]
            xs += b_x
        s16 = b_s.to(tl.float32) * (1 << BITS)
        acc2 += tl.sum(part, axis=2) * s16 + tl.sum(xs, axis=1)[None, :] * (b_o.to(tl.float32) - s16)
        b_q, b_s, b_o = n_q, n_s, n_o
    tl.store(p_ptr + i_k * N + o_n, tl.sum(acc2, axis=1), mask=m_n)


@triton.jit
def sum_rows(p_ptr, y_ptr, N, SPLIT: tl.constexpr, BLOCK: tl.constexpr):
    o_n = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    b = tl.load(p_ptr + tl.arange(0, SPLIT)[:, None] * N + o_n[None, :], mask=(o_n < N)[None, :], other=0.0)
    tl.store(y_ptr + o_n, tl.sum(b, axis=0).to(y_ptr.dtype.element_ty), mask=o_n < N)


def run_v4(x, qw, out, cfg, part):
    qw32 = qw.qweight.view(torch.int32)
    n, w = qw.shape[0], qw32.shape[1]
    split = cfg["SPLIT"]
    bw = cfg["G"] * qw.group * qw.bits // 32
    ws = triton.cdiv(triton.cdiv(w, split), bw) * bw
    kw = {k: v for k, v in cfg.items() if k != "SPLIT"}
    gemv_v4[(triton.cdiv(n, cfg["BLOCK_N"]), split)](x, qw32, qw.scales, qw.offsets, part, n, w, ws, qw32.stride(0),
                                                      qw.scales.stride(0), BITS=qw.bits, GROUP=qw.group, **kw)
    sum_rows[(triton.cdiv(n, 1024),)](part, out, n, SPLIT=split, BLOCK=1024)


V2 = [{"BLOCK_N": bn, "G": g, "num_warps": nw, "REDUCE": 1, "PREFETCH": 1} for bn, g, nw in
      [(8, 4, 1), (4, 4, 1), (16, 8, 2), (8, 8, 1), (8, 2, 1), (16, 16, 4)]]
V3 = [{"BLOCK_N": bn, "G": g, "num_warps": nw} for bn, g, nw in
      [(16, 4, 1), (8, 4, 1), (16, 8, 2), (32, 4, 1), (16, 2, 1)]]
V4 = [{"BLOCK_N": bn, "G": g, "num_warps": nw, "SPLIT": sp} for bn, g, nw in [(8, 4, 1), (16, 4, 1), (8, 8, 1), (16, 8, 2)]
      for sp in (2, 4, 8, 16)]


def main():
    from triton.testing import do_bench

    ap = argparse.ArgumentParser()
    ap.add_argument("--json")
    ap.add_argument("--small", action="store_true")
    args = ap.parse_args()
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    shapes = [("qkv", 10240, 5120), ("o_proj", 5120, 8192), ("gate_up", 51200, 5120), ("down", 5120, 25600)]
    if args.small:
        shapes = [("odd", 37, 640), ("t", 64, 1024)]
    res = []
    for name, n, k in shapes:
        qw = ql.quantize_rtn(torch.randn(n, k, device=dev) * 0.02, 4, 128)
        x = torch.randn(1, k, device=dev, dtype=torch.bfloat16)
        ref = ql.qlinear_ref(x, qw)
        out = torch.empty(1, n, device=dev, dtype=torch.bfloat16)
        y32 = torch.empty(n, device=dev, dtype=torch.float32)
        rows = []
        part = torch.empty(16 * n, device=dev, dtype=torch.float32)
        for kind, cfgs in (("v2", V2), ("v3", V3), ("v4", V4)):
            for cfg in cfgs:
                extra = {"v2": (), "v3": (y32,), "v4": (part,)}[kind]
                fn = partial({"v2": run_v2, "v3": run_v3, "v4": run_v4}[kind], x, qw, out, cfg, *extra)
                out.fill_(float("nan"))
                fn()
                err = ((out.float() - ref).norm() / ref.norm()).item()
                us = do_bench(fn, warmup=25, rep=150, return_mode="median") * 1e3 if dev == "cuda" else 0.0
                rows.append((us, kind, cfg, err))
        rows.sort(key=lambda r: r[0])
        print(f"{name} {n}x{k} {qw.nbytes / 1e6:.1f} MB")
        for us, kind, cfg, err in rows[:12]:
            print(f"   {kind} {us:7.1f} us {qw.nbytes / max(us, 1e-9) / 1e3:6.0f} GB/s err {err:.1e} {cfg}")
        print(f"   worst err {max(r[3] for r in rows):.1e}")
        for kind in ("v2", "v3", "v4"):
            us, _, cfg, _ = next(r for r in rows if r[1] == kind)
            print(f"   best {kind}: {us:.1f} us {cfg}")
        res.append({"shape": name, "rows": [(r[0], r[1], r[2], r[3]) for r in rows]})
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f)


if __name__ == "__main__":
    main()
