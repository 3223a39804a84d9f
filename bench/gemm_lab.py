"""Sweep of the 4-bit prefill GEMM's launch configurations (kernels/qgemm.py) on the Qwen3-32B shapes, against a bf16
cuBLAS GEMM of the same shape and the path the kernel replaced (dequantize to bf16, then cuBLAS).

    python bench/gemm_lab.py [--rows 16,128,512,4096] [--tiled]

Every config of the autotuner's list (and its pruning) is timed alone with triton.testing.do_bench (median, over
rotating weight copies larger than the L2), after a correctness check against the dequantized reference. Prints one
table per shape: ms per config and the ratio to bf16 cuBLAS; the best config is what the autotuner should pick.
"""

import argparse

import torch
import torch.nn.functional as F
import triton
from openclaw.kernels import qlinear as ql
from openclaw.kernels.qgemm import _configs, _qgemm_kernel
from triton.testing import do_bench

SHAPES = [("qkv", 10240, 5120), ("o_proj", 5120, 8192), ("gate_up", 51200, 5120), ("down", 5120, 25600)]


def run(x: torch.Tensor, qw: ql.QuantWeight, y: torch.Tensor, cfg: triton.Config) -> None:
    M, K = x.shape
    N = qw.shape[0]
    kw = dict(cfg.kwargs, BLOCK_K=min(cfg.kwargs["BLOCK_K"], qw.group))
    grid = (triton.cdiv(M, kw["BLOCK_M"]) * triton.cdiv(N, kw["BLOCK_N"]),)
    _qgemm_kernel.fn[grid](x, qw.qweight, qw.scales, qw.offsets, qw.scales, qw.scales, y, M, N, K, 0, x.stride(0),
                           qw.qweight.stride(0), qw.scales.stride(0), y.stride(0), BITS=4, GROUP=qw.group,
                           HAS_OFFSETS=True, HAS_LUT=False, HAS_BIAS=False, ZERO=0, TILED=qw.tiled, DOT_F32=False,
                           num_warps=cfg.num_warps, num_stages=cfg.num_stages, **kw)


def label(cfg: triton.Config) -> str:
    k = cfg.kwargs
    return f"{k['BLOCK_N']}x{k['BLOCK_M']}x{k['BLOCK_K']}/{cfg.num_warps}w{cfg.num_stages}s"


def sweep(name: str, n: int, k: int, rows: list[int], tiled: bool) -> None:
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k ** 0.5
    qw = ql.quantize_rtn(w, 4, 128)
    qw = ql.tile(qw) if tiled else qw
    copies = [qw] + [ql.QuantWeight(qw.qweight.clone(), qw.scales.clone(), qw.offsets.clone(), None, 4, 128,
                                    qw.shape, 0, qw.tiled) for _ in range(max(0, (200 << 20) // qw.nbytes))]
    ref_w = ql.dequantize(qw, torch.float32)
    print(f"\n{name} {k}->{n}" + (" (tiled)" if tiled else ""))
    print(f"{'rows':>6} {'bf16 cuBLAS':>12} {'dequant+cuBLAS':>15} " + " ".join(f"{label(c):>16}" for c in _configs()))
    for m in rows:
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        y = torch.empty(m, n, device="cuda", dtype=torch.bfloat16)
        ref = F.linear(x.float(), ref_w)
        bf16 = do_bench(lambda: F.linear(x, w), return_mode="median")  # noqa: B023 (timed within this iteration)
        deq = do_bench(lambda: F.linear(x, ql.dequantize(qw, torch.bfloat16)), return_mode="median")  # noqa: B023
        cells = []
        for cfg in _configs():
            if cfg.kwargs["BLOCK_M"] > max(16, triton.next_power_of_2(m)):
                cells.append("-")
                continue
            run(x, qw, y, cfg)
            err = ((y.float() - ref).norm() / ref.norm()).item()
            calls = iter(range(1 << 30))
            ms = do_bench(lambda: run(x, copies[next(calls) % len(copies)], y, cfg),  # noqa: B023
                          return_mode="median")
            cells.append(f"{ms:.3f} {ms / bf16:.2f}x" + ("!" if err > 1e-2 else ""))
        print(f"{m:>6} {bf16:12.3f} {deq:15.3f} " + " ".join(f"{c:>16}" for c in cells))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", default="16,128,512,4096")
    ap.add_argument("--tiled", action="store_true", help="the tile-major words the loader stores on a GPU")
    args = ap.parse_args()
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}")
    for name, n, k in SHAPES:
        sweep(name, n, k, [int(r) for r in args.rows.split(",")], args.tiled)
        torch.cuda.empty_cache()
    print("\nms per call (median); Nx: over bf16 cuBLAS; '!': relative error over 1e-2 against the reference")


if __name__ == "__main__":
    main()
