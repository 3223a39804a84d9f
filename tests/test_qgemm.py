"""kernels/qgemm.py: the 4-bit prefill GEMM against the fp32 reference on the dequantized weight (Triton's interpreter
on the CPU, the real kernel on CUDA): tiny and odd shapes over every layout (4 / 8 bits, groups 16-256, offsets, zero
codes, a code table, tiled), rows that are not a multiple of the tile, and the Qwen3-32B shapes; plus qlinear's
choice of kernel by row count."""

import pytest
import torch
from conftest import assert_close
from openclaw.kernels import qlinear as ql
from openclaw.kernels.qgemm import qgemm, qgemm_ref
from test_qlinear import random_weight, tiled

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"
QWEN3_32B = [(8192, 5120), (25600, 5120), (5120, 25600)]  # (N, K): q_proj, gate / up, down_proj


def check(qw: ql.QuantWeight, m: int, dtype=torch.float32, bias: bool = False, as_tiled: bool = False) -> None:
    g = torch.Generator().manual_seed(m)
    x = torch.randn(m, qw.shape[1], generator=g).to(DEV, dtype)
    b = torch.randn(qw.shape[0], generator=g).to(DEV, dtype) if bias else None
    w = tiled(qw) if as_tiled else qw
    out = torch.full((m, qw.shape[0]), float("nan"), dtype=dtype, device=DEV)
    qgemm(x, w.qweight, w.scales, w.offsets, w.lut, w.bits, w.group, w.zero, w.tiled, b, out=out)
    assert_close(out, qgemm_ref(x, qw.dequantize(), b), dtype, matmul=True)


# (bits, group, offsets, lut, zero): AWQ / RTN (4-bit, offsets), GGUF Q4_0 (zero 8) and Q4_1 (group 32, offsets),
# Q6_K and Q8_0 (8-bit, zero 32 / 128), NF4 (a code table, group 64), group 256
LAYOUTS = [(4, 128, True, False, 0), (4, 32, False, False, 8), (4, 32, True, False, 0), (8, 16, False, False, 32),
           (8, 32, False, False, 128), (8, 64, True, False, 3), (4, 64, False, True, 0), (4, 16, True, True, 5),
           (4, 256, True, False, 0)]


@pytest.mark.parametrize("bits,group,offsets,lut,zero", LAYOUTS)
def test_tiny_and_odd_shapes(bits, group, offsets, lut, zero):
    """16 rows and one group; then 37 weight rows (partial tiles), 3 groups, and 17 / 40 rows of x (partial M
    blocks), with a bias."""
    check(random_weight(16, group, bits, group, offsets, lut, zero=zero), 16)
    qw = random_weight(37, 3 * group, bits, group, offsets, lut, seed=1, zero=zero)
    for m in (17, 40):
        check(qw, m, bias=True)


@pytest.mark.parametrize("n,groups,group,m", [(48, 3, 128, 17), (32, 2, 256, 16), (16, 5, 128, 33)])
def test_tiled_weights(n, groups, group, m):
    """The tile-major words the loader stores for the decode GEMV on a GPU: the GEMM reads the same codes."""
    qw = random_weight(n, groups * group, 4, group, True, False, seed=n)
    check(qw, m, bias=True, as_tiled=True)


@pytest.mark.parametrize("n,k", QWEN3_32B)
def test_qwen3_32b_shapes(n, k):
    """The real shapes at 17 rows (one partial M block), on the weight tiled as the loader stores it."""
    check(random_weight(n, k, 4, 128, True, False), 17, as_tiled=True)


def test_qlinear_picks_gemv_below_and_dequantized_blocks_from_the_threshold(monkeypatch):
    """qlinear_triton: up to 8 rows one GEMV, fewer than DEQUANT_MIN_ROWS several, from there the weight dequantized
    in row blocks (three blocks of 16 rows here, the block size shrunk to show it); all equal the reference."""
    calls, dq, gemv = [], ql.dequantize, ql.qgemv
    monkeypatch.setattr(ql, "dequantize", lambda *a, **k: calls.append("dequant") or dq(*a, **k))
    monkeypatch.setattr(ql, "qgemv", lambda *a, **k: calls.append("gemv") or gemv(*a, **k))
    monkeypatch.setattr(ql, "DEQUANT_BLOCK", 16 * 256 * 4)  # 16 fp32 rows of K = 256
    qw = random_weight(40, 256, 4, 128, True, False, seed=3)
    n = ql.DEQUANT_MIN_ROWS
    for m, want in [(8, ["gemv"]), (n - 1, ["gemv"] * (-(-(n - 1) // 8))), (n, ["dequant"] * 3)]:
        calls.clear()
        x = torch.randn(m, 256, generator=torch.Generator().manual_seed(m)).to(DEV)
        assert_close(ql.qlinear_triton(x, qw), ql.qlinear_ref(x, qw), torch.float32, matmul=True)
        assert calls == want, (m, calls)



@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("n,k", QWEN3_32B)
def test_gpu_qwen3_32b_shapes_bf16(n, k):
    """bf16 on the tensor cores, row-major and tiled, at a prefill chunk's 16 / 512 / 1000 rows; NF4 and 8-bit."""
    for bits, group, offsets, lut in [(4, 128, True, False), (4, 64, False, True), (8, 128, True, False)]:
        qw = random_weight(n, k, bits, group, offsets, lut)
        for m in (16, 512, 1000):
            check(qw, m, torch.bfloat16, bias=m == 16)
            if ql.tileable(qw):
                check(qw, m, torch.bfloat16, as_tiled=True)
