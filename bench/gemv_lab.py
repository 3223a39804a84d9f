"""The GEMV experiment behind kernels/gemv_mma.py, kernels/gemv4.py and kernels/qlinear.py (H200; bench/RESULTS.md).
Per Qwen3-32B decode shape (bf16 rows), timed in a CUDA graph over rotating weight copies: the tensor-core kernel
(gemv_mma) at each slice count, on row-major and tiled words, and at 2-8 x rows against the fp32 kernel; gemv4
(packed bf16x2) at each tile shape x register prefetch x split-K; the fp32 kernel at its configs (split sums in a
fixed order); with --read, the read pattern alone. Every output is checked against the fp32 reference.
GPU: python bench/gemv_lab.py [--json out.json] [--read] [--only qkv,down]; CPU (interpreter, correctness only):
--small."""

import argparse
import json
from functools import partial

import torch
import triton
import triton.language as tl
from openclaw.kernels import gemv4, gemv_mma
from openclaw.kernels import qlinear as ql


def _sum(part, out, n, split):
    if split > 1:
        ql._split_sum_kernel[(triton.cdiv(n, 1024), 1)](part, out, n, out.stride(0), M=1, SPLIT=split,
                                                        SPLIT_PAD=triton.next_power_of_2(split), BLOCK=1024)


def run_fp32(x, qw, out, cfg, part):
    """The fp32 kernel at one config (no autotuning)."""
    qw32 = qw.qweight.view(torch.int32)
    n, split = qw.shape[0], cfg["SPLIT"]
    kw = {k: v for k, v in cfg.items() if k != "SPLIT"}
    ql._qgemv_kernel.fn[(triton.cdiv(n, cfg["BLOCK_N"]), split)](
        x, qw32, qw.scales, qw.offsets, qw.scales, qw.scales, out, part, n, qw32.shape[1], x.stride(0),
        qw32.stride(0), qw.scales.stride(0), out.stride(0), M=1, BITS=qw.bits, GROUP=qw.group, HAS_OFFSETS=True,
        HAS_LUT=False, HAS_BIAS=False, ZERO=0, M_PAD=1, SPLIT=split, **kw)
    _sum(part, out, n, split)


def run_gemv4(x, qw, out, cfg, part):
    """gemv4 at one config; returns the compiled kernel."""
    qw32 = qw.qweight.view(torch.int32)
    n, split = qw.shape[0], cfg["SPLIT"]
    kw = {k: v for k, v in cfg.items() if k != "SPLIT"}
    k = gemv4._q4gemv_kernel.fn[(triton.cdiv(n, cfg["BLOCK_N"]), split)](
        x.view(torch.int32), qw32, qw.scales, qw.offsets, qw.scales, out, part, n, qw32.shape[1], qw32.stride(0),
        qw.scales.stride(0), GROUP=qw.group, HAS_OFFSETS=True, HAS_BIAS=False, ZERO=0, SPLIT=split,
        USE_ASM=x.is_cuda, **kw)
    _sum(part, out, n, split)
    return k


_TILED = {}


def run_mma(x, qw, out, cfg, part, tiled=False):
    """kernels/gemv_mma.py at one config (x: up to 8 rows; tiled: the words tile-major, gemv_mma.tile_words, made
    once per copy outside the timing); returns the compiled kernel."""
    w = qw.qweight
    if tiled:
        if id(w) not in _TILED:
            _TILED[id(w)] = (w, gemv_mma.tile_words(w))  # keeps the key's tensor alive
        w = _TILED[id(w)][1]
    s, n = qw.scales, qw.shape[0]
    return gemv_mma._q4mma_kernel.fn[(triton.cdiv(n, 16),)](
        x.view(torch.int32), w.view(torch.int32), s, qw.offsets, s, out, x.shape[0], n, w.shape[1] // 4,
        x.stride(0) // 2, w.stride(0) // 4, s.stride(0), out.stride(0), GROUP=qw.group, HAS_OFFSETS=True,
        HAS_BIAS=False, ZERO=0, TILED=tiled, SILU=False, USE_ASM=x.is_cuda, TILES=1, SLICES=cfg["SLICES"],
        num_warps=cfg["num_warps"])


@triton.jit
def _read_kernel(qw_ptr, y_ptr, W, stride_qn, BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr):
    """The read pattern alone: BLOCK_N rows x BLOCK_W words per tile, an int32 sum per row (the DRAM ceiling of a
    tile shape, without the GEMV's arithmetic)."""
    o_n = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    p = qw_ptr + o_n[:, None] * stride_qn + tl.arange(0, BLOCK_W)[None, :]
    acc = tl.zeros((BLOCK_N, BLOCK_W), dtype=tl.int32)
    for w0 in range(0, W, BLOCK_W):
        acc ^= tl.load(p + w0)
    tl.store(y_ptr + o_n, tl.sum(acc, axis=1))


def run_read(x, qw, out, cfg, part):
    qw32 = qw.qweight.view(torch.int32)
    n = qw.shape[0]
    _read_kernel[(n // cfg["BLOCK_N"],)](qw32, part, qw32.shape[1], qw32.stride(0), BLOCK_N=cfg["BLOCK_N"],
                                         BLOCK_W=cfg["BLOCK_W"], num_warps=cfg["num_warps"])


READ = [{"BLOCK_N": bn, "BLOCK_W": bw, "num_warps": nw} for bn, bw, nw in
        [(8, 64, 1), (16, 64, 1), (4, 128, 1), (2, 256, 1), (1, 512, 1), (8, 128, 2), (4, 512, 4), (16, 32, 1)]]


def _call(run, x, out, cfg, part, qw):
    run(x, qw, out, cfg, part)


FP32 = [{"BLOCK_N": bn, "BLOCK_W": bw, "num_warps": nw, "SPLIT": sp}
        for bn, bw, nw in [(8, 64, 1), (16, 128, 2)] for sp in (1, 4)]
GEMV4 = [{"BLOCK_N": bn, "BLOCK_C": bc, "num_warps": 1, "PREFETCH": pf}
         for bn, bc, pf in [(4, 32, 1), (8, 16, 0), (8, 16, 1), (8, 32, 0)]]
MMA = [{"SLICES": s, "num_warps": w, "SPLIT": 1} for s, w in [(2, 2), (4, 4), (8, 8), (8, 4), (16, 8)]]


def main():
    from gpu_decode import graph_us

    ap = argparse.ArgumentParser()
    ap.add_argument("--json")
    ap.add_argument("--small", action="store_true")
    ap.add_argument("--read", action="store_true", help="also time the read pattern alone (_read_kernel)")
    ap.add_argument("--only", default="", help="comma-separated shape names")
    args = ap.parse_args()
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    shapes = [("qkv", 10240, 5120, (1,)), ("o_proj", 5120, 8192, (1,)), ("gate_up", 51200, 5120, (1,)),
              ("down", 5120, 25600, (1, 4))]  # with the split-K values tried
    if args.small:
        shapes = [("t", 64, 4096, (1, 2))]
    if args.only:
        shapes = [s for s in shapes if s[0] in args.only.split(",")]
    res = []
    for name, n, k, splits in shapes:
        qw = ql.quantize_rtn(torch.randn(n, k, device=dev) * 0.02, 4, 128)
        x = torch.randn(1, k, device=dev, dtype=torch.bfloat16)
        ref = ql.qlinear_ref(x, qw)
        out = torch.empty(1, n, device=dev, dtype=torch.bfloat16)
        part = torch.empty(8 * n, device=dev, dtype=torch.float32)
        rows = []
        n_copies = max(1, (200 << 20) // qw.nbytes) if dev == "cuda" else 0
        copies = [qw] + [ql.QuantWeight(qw.qweight.clone(), qw.scales.clone(), qw.offsets.clone(), None, 4, 128,
                                        qw.shape) for _ in range(n_copies)]
        gemv4_cfgs = [{**c, "SPLIT": sp} for c in GEMV4 for sp in splits]
        kinds = [("fp32", FP32, run_fp32), ("gemv4", gemv4_cfgs, run_gemv4), ("mma", MMA, run_mma),
                 ("mma-tiled", MMA, partial(run_mma, tiled=True))]
        for kind, cfgs, run in kinds + [("read", READ, run_read)] * args.read:
            for cfg in cfgs:
                out.fill_(float("nan"))
                kern = run(x, qw, out, cfg, part)
                err = ((out.float() - ref).norm() / ref.norm()).item() if kind != "read" else 0.0
                us = graph_us(partial(_call, run, x, out, cfg, part), copies) if dev == "cuda" else 0.0
                if kern is not None and dev == "cuda":  # registers, and whether Triton pipelined through cp.async
                    cfg = {**cfg, "regs": kern.n_regs, "cp_async": kern.asm["ptx"].count("cp.async")}
                rows.append((us, kind, cfg, err))
        rows.sort(key=lambda r: r[0])
        print(f"{name} {n}x{k} {qw.nbytes / 1e6:.1f} MB")
        for us, kind, cfg, err in rows[:14]:
            print(f"   {kind} {us:7.1f} us {qw.nbytes / max(us, 1e-9) / 1e3:6.0f} GB/s err {err:.1e} {cfg}")
        print(f"   worst err {max(r[3] for r in rows):.1e}")
        for us, kind, cfg, err in rows:
            if err > 1e-2:
                print(f"   WRONG {kind} err {err:.1e} {cfg}")
        for kind in ("fp32", "gemv4", "mma", "mma-tiled", "read")[:4 + args.read]:
            us, _, cfg, _ = next(r for r in rows if r[1] == kind)
            print(f"   best {kind}: {us:.1f} us {cfg}")
        for sp in splits:
            us, _, cfg, _ = next(r for r in rows if r[1] == "gemv4" and r[2]["SPLIT"] == sp)
            print(f"   best gemv4 split {sp}: {us:.1f} us {cfg}")
        for pf in (0, 1):
            us, _, cfg, _ = next(r for r in rows if r[1] == "gemv4" and r[2]["PREFETCH"] == pf)
            print(f"   best gemv4 prefetch {pf}: {us:.1f} us {cfg}")
        if dev == "cuda":  # batched decode: the tiled mma kernel's best config at M rows against the fp32 kernel
            cfg = next(r for r in rows if r[1] == "mma-tiled")[2]
            for m in (2, 4, 8):
                xm = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
                om = torch.empty(m, n, device=dev, dtype=torch.bfloat16)
                ref_m = ql.qlinear_ref(xm, qw)
                run_mma(xm, qw, om, cfg, part, tiled=True)
                err = ((om.float() - ref_m).norm() / ref_m.norm()).item()
                us = graph_us(partial(_call, partial(run_mma, tiled=True), xm, om, cfg, part), copies)
                ql.GEMV_KERNELS, kernels = (), ql.GEMV_KERNELS  # qgemv's fp32 kernel
                try:
                    us32 = graph_us(lambda c, xm=xm, om=om: ql.qgemv(xm, c, out=om), copies)
                finally:
                    ql.GEMV_KERNELS = kernels
                print(f"   M={m}: mma {us:.1f} us, qgemv (fp32 kernel) {us32:.1f} us, mma rel err {err:.1e}")
        res.append({"shape": name, "rows": rows})
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f)


if __name__ == "__main__":
    main()
