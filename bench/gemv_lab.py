"""The GEMV experiment behind kernels/qlinear.py (H200, 2026-11-29; bench/RESULTS.md). Times, per Qwen3-32B decode
shape, the library kernel (3D tiles of whole groups, next tile prefetched; its configs, split-K 1-16 with the
fixed-order sum) against v3, one tile per program with fp32 atomics (46 vs 66 us on down_proj at split 1, but three
launches and a non-deterministic sum order).
GPU: python bench/gemv_lab.py [--json out.json]; CPU (interpreter, correctness only): --small."""

import argparse
import json
from functools import partial

import torch
import triton
import triton.language as tl
from openclaw.kernels import qlinear as ql


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
        part += ql._code_plus_one(b_q, i, BITS) * b_x[None]
        xs += b_x
    y = tl.sum(tl.sum(part, axis=2) * b_s + tl.sum(xs, axis=1)[None, :] * (b_o - b_s), axis=1)
    tl.atomic_add(y_ptr + o_n, y, mask=m_n)


def run_v3(x, qw, out, cfg, y32):
    qw32 = qw.qweight.view(torch.int32)
    n, w = qw.shape[0], qw32.shape[1]
    bw = cfg["G"] * qw.group * qw.bits // 32
    y32.zero_()
    gemv_v3[(triton.cdiv(n, cfg["BLOCK_N"]), triton.cdiv(w, bw))](
        x, qw32, qw.scales, qw.offsets, y32, n, w, qw32.stride(0), qw.scales.stride(0), BITS=qw.bits, GROUP=qw.group,
        **cfg)
    out.copy_(y32.view(1, -1))


def run_lib(x, qw, out, cfg, part):
    """The library kernel at one config (no autotuning), split-K summed like qgemv does."""
    qw32 = qw.qweight.view(torch.int32)
    n, split = qw.shape[0], cfg["SPLIT"]
    kw = {k: v for k, v in cfg.items() if k != "SPLIT"}
    ql._qgemv_kernel.fn[(triton.cdiv(n, cfg["BLOCK_N"]), split)](
        x, qw32, qw.scales, qw.offsets, qw.scales, qw.scales, out, part, n, qw32.shape[1], x.stride(0),
        qw32.stride(0), qw.scales.stride(0), out.stride(0), M=1, BITS=qw.bits, GROUP=qw.group, HAS_OFFSETS=True,
        HAS_LUT=False, HAS_BIAS=False, ZERO=0, M_PAD=1, SPLIT=split, **kw)
    if split > 1:
        ql._split_sum_kernel[(triton.cdiv(n, 1024), 1)](part, out, n, out.stride(0), M=1, SPLIT=split,
                                                        SPLIT_PAD=triton.next_power_of_2(split), BLOCK=1024)


LIB = [{"BLOCK_N": bn, "BLOCK_W": bw, "num_warps": nw, "SPLIT": sp}
       for bn, bw, nw in [(8, 64, 1), (4, 64, 1), (16, 64, 1), (16, 128, 2), (8, 128, 1), (8, 32, 1)]
       for sp in (1, 2, 4, 8, 16)]
V3 = [{"BLOCK_N": bn, "G": g, "num_warps": nw} for bn, g, nw in
      [(16, 4, 1), (8, 4, 1), (16, 8, 2), (32, 4, 1), (16, 2, 1)]]


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
        for kind, cfgs in (("lib", LIB), ("v3", V3)):
            for cfg in cfgs:
                fn = partial(run_lib, x, qw, out, cfg, part) if kind == "lib" else partial(run_v3, x, qw, out, cfg, y32)
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
        for kind in ("lib", "v3"):
            us, _, cfg, _ = next(r for r in rows if r[1] == kind)
            print(f"   best {kind}: {us:.1f} us {cfg}")
        res.append({"shape": name, "rows": [(r[0], r[1], r[2], r[3]) for r in rows]})
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f)


if __name__ == "__main__":
    main()
