"""The GEMV experiment behind kernels/gemv4.py and kernels/qlinear.py (H200; bench/RESULTS.md). Times in a CUDA graph
over rotating weight copies, per Qwen3-32B decode shape (one bf16 row), gemv4 (packed bf16x2) at each of its tile
shapes x register prefetch x register cap (maxnreg: occupancy against spills) x split-K against the fp32 kernel at
its configs, each with the fixed-order split sum, and checks every output against the fp32 reference. gemv4-prep:
the same kernel reading x already in pair order with its chunk sums (gemv4.prep_x, outside the timing): the most a
producer-side preparation of x (in add+RMSNorm / SiLU-mul) could gain.
GPU: python bench/gemv_lab.py [--json out.json]; CPU (interpreter, correctness only): --small."""

import argparse
import json
from functools import partial

import torch
import triton
import triton.language as tl
from openclaw.kernels import gemv4
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


def run_gemv4(x, qw, out, cfg, part, prep=None):
    """gemv4 at one config (prep: gemv4.prep_x(x), read with PREP); returns the compiled kernel."""
    qw32 = qw.qweight.view(torch.int32)
    n, split = qw.shape[0], cfg["SPLIT"]
    kw = {k: v for k, v in cfg.items() if k != "SPLIT"}
    xs = qw.scales if prep is None else prep[1]
    k = gemv4._q4gemv_kernel.fn[(triton.cdiv(n, cfg["BLOCK_N"]), split)](
        (x if prep is None else prep[0]).view(torch.int32), xs, qw32, qw.scales, qw.offsets, qw.scales, out, part, n,
        qw32.shape[1], qw32.stride(0), qw.scales.stride(0), GROUP=qw.group, HAS_OFFSETS=True, HAS_BIAS=False, ZERO=0,
        SPLIT=split, USE_ASM=x.is_cuda, PREP=prep is not None, **kw)
    _sum(part, out, n, split)
    return k


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
GEMV4 = [{"BLOCK_N": bn, "BLOCK_C": bc, "num_warps": 1, "PREFETCH": pf} | ({"maxnreg": r} if r else {})
         for bn, bc, pf in [(4, 32, 1), (8, 16, 0), (8, 16, 1), (8, 32, 0)] for r in (0, 128, 96, 80, 64)]


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
        prep_cfgs = [{**c, "SPLIT": sp} for c in GEMV4 if "maxnreg" not in c for sp in splits]
        kinds = [("fp32", FP32, run_fp32), ("gemv4", gemv4_cfgs, run_gemv4),
                 ("gemv4-prep", prep_cfgs, partial(run_gemv4, prep=gemv4.prep_x(x)))]
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
        for us, kind, cfg, err in rows[:10]:
            print(f"   {kind} {us:7.1f} us {qw.nbytes / max(us, 1e-9) / 1e3:6.0f} GB/s err {err:.1e} {cfg}")
        print(f"   worst err {max(r[3] for r in rows):.1e}")
        for kind in ("fp32", "gemv4", "gemv4-prep", "read")[:3 + args.read]:
            us, _, cfg, _ = next(r for r in rows if r[1] == kind)
            print(f"   best {kind}: {us:.1f} us {cfg}")
        for sp in splits:
            us, _, cfg, _ = next(r for r in rows if r[1] == "gemv4" and r[2]["SPLIT"] == sp)
            print(f"   best gemv4 split {sp}: {us:.1f} us {cfg}")
        for pf in (0, 1):
            us, _, cfg, _ = next(r for r in rows if r[1] == "gemv4" and r[2]["PREFETCH"] == pf)
            print(f"   best gemv4 prefetch {pf}: {us:.1f} us {cfg}")
        for cap in (0, 128, 96, 80, 64):
            us, _, cfg, _ = next(r for r in rows if r[1] == "gemv4" and r[2].get("maxnreg", 0) == cap)
            print(f"   best gemv4 maxnreg {cap or 'none'}: {us:.1f} us {cfg}")
        res.append({"shape": name, "rows": rows})
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f)


if __name__ == "__main__":
    main()
