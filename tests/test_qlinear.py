"""kernels/qlinear.py: the fused dequantize + GEMV and the prefill path against the fp32 reference (Triton's
interpreter on the CPU, the real kernels on CUDA), on tiny, odd and real Qwen3-32B shapes, 4 and 8 bits, with and
without offsets, a zero code and a code table; weights kept in parts of different layouts; plus the layout helpers
(packing, fusing, RTN)."""

import pytest
import torch
import triton
from conftest import assert_close
from openclaw.kernels import qlinear as ql
from openclaw.kernels.gemv4 import _q4gemv_kernel
from openclaw.kernels.gemv_mma import tile_words
from openclaw.kernels.qlinear import (
    QuantWeight,
    concat_rows,
    dequantize,
    pack_codes,
    qgemv,
    qlinear_parts_triton,
    qlinear_ref,
    qlinear_triton,
    quantize_rtn,
)
from openclaw.models.layers import QuantLinear

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"
NF4 = torch.tensor([-1.0, -0.6962, -0.5251, -0.3949, -0.2844, -0.1848, -0.0911, 0.0, 0.0796, 0.1609, 0.2461,
                    0.3379, 0.4407, 0.5626, 0.7230, 1.0])
QWEN3_32B = [(8192, 5120), (25600, 5120), (5120, 25600)]  # (N, K): q_proj, gate/up, down_proj


def random_weight(n: int, k: int, bits: int, group: int, offsets: bool, lut: bool, seed: int = 0,
                  zero: int = 0) -> QuantWeight:
    """Random codes and scales in the layout (not a quantized matrix: the kernel must not care)."""
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 2 ** bits, (n, k), generator=g)
    scales = (torch.rand(n, k // group, generator=g) * 0.02 + 0.001).half()
    offs = (torch.randn(n, k // group, generator=g) * 0.05).half() if offsets else None
    return QuantWeight(pack_codes(codes, bits), scales, offs, NF4.clone() if lut else None, bits, group,
                       (n, k), zero).to(DEV)


def tiled(qw: QuantWeight) -> QuantWeight:
    """qw with its words tile-major (as the loader stores 4-bit weights for the tensor-core GEMV on a GPU)."""
    return QuantWeight(tile_words(qw.qweight), qw.scales, qw.offsets, None, 4, qw.group, qw.shape, qw.zero, True)


def check(qw: QuantWeight, m: int, dtype=torch.float32, bias: bool = False) -> None:
    g = torch.Generator().manual_seed(m)
    x = torch.randn(m, qw.shape[1], generator=g).to(DEV, dtype)
    b = torch.randn(qw.shape[0], generator=g).to(DEV, dtype) if bias else None
    ref = qlinear_ref(x, qw, b)
    if m <= 8:
        out = torch.full((m, qw.shape[0]), float("nan"), dtype=dtype, device=DEV)
        qgemv(x, qw, b, out=out)
        assert_close(out, ref, dtype, matmul=True)
    assert_close(qlinear_triton(x, qw, b), ref, dtype, matmul=True)


# (bits, group, offsets, lut, zero): zero codes as the symmetric GGUF types have them (Q4_0 8, Q6_K 32, Q8_0 128),
# and with offsets or a lut too
LAYOUTS = [(4, 16, True, False, 0), (4, 32, False, True, 0), (4, 64, True, False, 0), (4, 128, False, False, 0),
           (8, 16, True, False, 0), (8, 32, False, False, 0), (8, 128, True, False, 0), (4, 32, False, False, 8),
           (4, 16, True, True, 5), (8, 16, False, False, 32), (8, 32, False, False, 128), (8, 64, True, False, 16)]


@pytest.mark.parametrize("bits,group,offsets,lut,zero", LAYOUTS)
def test_tiny(bits, group, offsets, lut, zero):
    qw = random_weight(8, 2 * group, bits, group, offsets, lut, zero=zero)
    for m in (1, 2, 8):
        check(qw, m)


@pytest.mark.parametrize("bits,group,offsets,lut,zero", LAYOUTS)
def test_odd_shapes(bits, group, offsets, lut, zero):
    """5 rows and 3 groups: every tile is partial; M = 3, 8, 13 (two launches) and 40 (the prefill path)."""
    qw = random_weight(5, 3 * group, bits, group, offsets, lut, seed=1, zero=zero)
    for m in (3, 8, 13, 40):
        check(qw, m, bias=True)


def test_zero_code_is_an_implicit_offset():
    """The reference: zero z without offsets is the layout with offsets -z * scale (GGUF's w = d * (q - z))."""
    qw = random_weight(6, 64, 8, 16, False, False, zero=32).to("cpu")
    explicit = QuantWeight(qw.qweight, qw.scales, (-32 * qw.scales.float()).half(), None, 8, 16, qw.shape)
    assert torch.equal(qw.dequantize(), explicit.dequantize())
    assert torch.equal(qw.rows(torch.tensor([4, 1]), torch.float32), explicit.dequantize()[[4, 1]])
    with pytest.raises(AssertionError, match="zero 16 must be a 4-bit code"):
        QuantWeight(qw.qweight[:, :32], qw.scales, None, None, 4, 16, qw.shape, 16)


@pytest.mark.parametrize("split", [2, 3, 8])
@pytest.mark.parametrize("bits,group,offsets,lut", [(4, 32, True, False), (4, 16, False, True), (8, 32, True, False)])
def test_split_k_slices_sum_to_the_reference(bits, group, offsets, lut, split):
    """K cut into slices run as separate programs, partial sums added in a fixed order: uneven slices, slices past
    the end of K (split 8 of 5 groups), bias added once, M = 1 and 3."""
    qw = random_weight(37, 5 * group, bits, group, offsets, lut, seed=2)
    for m in (1, 3):
        g = torch.Generator().manual_seed(m)
        x = torch.randn(m, qw.shape[1], generator=g).to(DEV)
        b = torch.randn(qw.shape[0], generator=g).to(DEV)
        out = torch.full((m, qw.shape[0]), float("nan"), device=DEV)
        qgemv(x, qw, b, out=out, split=split)
        assert_close(out, qlinear_ref(x, qw, b), torch.float32, matmul=True)


def test_split_k_at_the_down_proj_shape():
    qw = random_weight(5120, 25600, 4, 128, True, False)
    x = torch.randn(1, 25600, generator=torch.Generator().manual_seed(0)).to(DEV)
    assert_close(qgemv(x, qw, split=8), qlinear_ref(x, qw), torch.float32, matmul=True)


@pytest.mark.parametrize("bits,offsets,zero", [(4, True, 0), (4, False, 8), (8, False, 128), (8, True, 32)])
def test_dequantize_kernel_writes_every_element(bits, offsets, zero):
    qw = random_weight(37, 5 * 32, bits, 32, offsets, False, zero=zero)
    out = torch.full((20, 160), float("nan"), device=DEV)
    dequantize(qw, torch.float32, rows=(10, 30), out=out)
    assert_close(out, qw.dequantize()[10:30], torch.float32)


@pytest.mark.parametrize("n,k", QWEN3_32B)
def test_real_shapes_awq_layout(n, k, monkeypatch):
    """One fp32 row: the fp32 kernel (which also serves 8-bit and NF4 weights); bf16 rows: the tensor-core kernel on
    the weight tiled as the loader stores it (1 and 8 rows) and row-major, and kernels/gemv4.py (PTX leaves on CUDA,
    their plain-Triton twins in the interpreter)."""
    qw = random_weight(n, k, 4, 128, True, False)
    check(qw, 1)
    for w, m, kernels in [(tiled(qw), 1, ("mma",)), (tiled(qw), 8, ("mma",)), (qw, 1, ("mma",)), (qw, 1, ("gemv4",))]:
        monkeypatch.setattr(ql, "GEMV_KERNELS", kernels)
        x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)).to(DEV, torch.bfloat16)
        assert_close(qgemv(x, w), qlinear_ref(x, qw), torch.bfloat16, matmul=True)


# kernels/gemv_mma.py's cases: (rows, groups, group, offsets, zero, x rows, tiled): partial 16-row tiles (5, 37 rows,
# row-major), step counts the interpreter's slices do not divide (3, 5, 9), group 256, a zero code without offsets,
# 1-8 x rows
MMA = [(5, 3, 128, True, 0, 1, False), (37, 5, 128, False, 8, 3, False), (48, 9, 128, True, 0, 8, True),
       (32, 4, 256, True, 3, 2, True), (64, 16, 128, False, 0, 1, True), (16, 2, 128, True, 15, 5, True)]


@pytest.mark.parametrize("n,groups,group,offsets,zero,m,is_tiled", MMA)
def test_mma_bf16_rows(n, groups, group, offsets, zero, m, is_tiled):
    qw = random_weight(n, groups * group, 4, group, offsets, False, seed=n, zero=zero)
    w = tiled(qw) if is_tiled else qw
    g = torch.Generator().manual_seed(m)
    x = (torch.randn(m, qw.shape[1], generator=g) * 4).to(DEV, torch.bfloat16)
    for b in (None, torch.randn(n, generator=g).to(DEV, torch.bfloat16)):
        out = torch.full((m, n), float("nan"), dtype=torch.bfloat16, device=DEV)
        qgemv(x, w, b, out=out)
        assert_close(out, qlinear_ref(x, qw, b), torch.bfloat16, matmul=True)


@pytest.mark.parametrize("m,bias", [(1, False), (3, True), (8, False)])
def test_gate_up_with_silu_in_the_epilogue(m, bias):
    """gate_up interleaved (gate rows 0-7, up rows 0-7, ...) and tiled, the SiLU-mul in the GEMV's epilogue (from the
    fp32 sums): equals silu(gate) * up of the row-major weight at a GEMV's tolerance; prefill reorders the full bf16
    output instead, whose gate and up are rounded to bf16 before their product (as in the unfused MLP): relative RMS
    within 1e-2 there (three roundings of up to 2^-8)."""
    from openclaw.models.layers import QuantLinear

    def silu_mul(x):
        gate, up = qlinear_ref(x, qw, b).chunk(2, dim=-1)
        return torch.nn.functional.silu(gate) * up

    def close_after_rounding(actual, ref):
        assert ((actual.float().cpu() - ref.cpu()).norm() / ref.cpu().norm()).item() <= 1e-2

    qw = random_weight(96, 384, 4, 128, True, False, seed=m)  # I = 48: gate rows 0-47, up rows 48-95
    g = torch.Generator().manual_seed(m)
    b = torch.randn(96, generator=g).to(DEV, torch.bfloat16) if bias else None
    x = torch.randn(m, 384, generator=g).to(DEV, torch.bfloat16)
    w = tiled(ql.interleave_gate_up(qw))
    bi = None if b is None else b[ql.gate_up_order(96, DEV)]  # the bias in the weight's row order
    assert_close(qgemv(x, w, bi, silu=True), silu_mul(x), torch.bfloat16, matmul=True)
    close_after_rounding(ql.silu_mul_interleaved(qlinear_triton(x, w, bi)), silu_mul(x))
    lin = QuantLinear(384, 96, bias)
    lin.qweight, lin.interleaved = w, True
    if bias:
        lin.bias.data = bi
    assert_close(lin.silu_mul(x), silu_mul(x), torch.bfloat16, matmul=True)
    xs = torch.randn(2, 20, 384, generator=g).to(DEV, torch.bfloat16)  # 40 rows: the prefill path
    close_after_rounding(lin.silu_mul(xs), silu_mul(xs))


def test_tiled_weight_round_trips_and_serves_every_path():
    """A tiled weight holds the same codes; prefill (dequantize by whole tiles, then a matmul), fp32 rows (which the
    tensor-core kernel does not take) and lookups all read it right; only tileable layouts tile, and never on the
    CPU."""
    qw = random_weight(48, 384, 4, 128, True, False, seed=5)
    t = tiled(qw)
    assert not torch.equal(t.qweight, qw.qweight) and torch.equal(tile_words(t.qweight, inverse=True), qw.qweight)
    assert torch.equal(t.codes(), qw.codes())
    assert_close(dequantize(t, torch.float32, rows=(16, 48)), qw.dequantize()[16:48], torch.float32)
    x = torch.randn(2, 384, generator=torch.Generator().manual_seed(0)).to(DEV)
    assert_close(qgemv(x, t), qlinear_ref(x, qw), torch.float32, matmul=True)
    xp = torch.randn(40, 384, generator=torch.Generator().manual_seed(1)).to(DEV, torch.bfloat16)
    assert_close(qlinear_triton(xp, t), qlinear_ref(xp, qw), torch.bfloat16, matmul=True)
    assert torch.equal(t.rows(torch.tensor([3, 40], device=DEV), torch.float32), qw.dequantize()[[3, 40]])
    assert ql.tile(random_weight(48, 384, 8, 128, True, False)).tiled is False
    assert ql.tile(random_weight(40, 384, 4, 128, True, False)).tiled is False  # N % 16 != 0
    assert ql.tile(qw).tiled is CUDA


# kernels/gemv4.py's cases: (rows, groups, group, offsets, zero, split): partial row tiles and K-slices (5 / 37 rows,
# 3 groups, split 3 of 5 groups), whole tiles without masks (64 x 2048, split 1 and 2), GGUF-like group 32 layouts
GEMV4 = [(5, 3, 128, True, 0, 1), (37, 5, 32, True, 0, 3), (64, 16, 128, True, 0, 1), (64, 16, 128, False, 0, 2),
         (37, 12, 32, False, 8, 2), (16, 4, 64, True, 3, 1), (96, 64, 32, True, 0, 8)]


@pytest.mark.parametrize("n,groups,group,offsets,zero,split", GEMV4)
def test_gemv4_bf16_row(n, groups, group, offsets, zero, split, monkeypatch):
    monkeypatch.setattr(ql, "GEMV_KERNELS", ("gemv4",))  # group 128 would go to the tensor-core kernel
    qw = random_weight(n, groups * group, 4, group, offsets, False, seed=n, zero=zero)
    g = torch.Generator().manual_seed(groups)
    x = (torch.randn(1, qw.shape[1], generator=g) * 4).to(DEV, torch.bfloat16)
    for b in (None, torch.randn(n, generator=g).to(DEV, torch.bfloat16)):
        out = torch.full((1, n), float("nan"), dtype=torch.bfloat16, device=DEV)
        qgemv(x, qw, b, out=out, split=split)
        assert_close(out, qlinear_ref(x, qw, b), torch.bfloat16, matmul=True)


@pytest.mark.parametrize("prefetch", [0, 1])
@pytest.mark.parametrize("n,groups,split", [(64, 16, 1), (40, 9, 2)])
def test_gemv4_every_config_path(n, groups, split, prefetch):
    """The autotuner's choices the interpreter never picks: each tile shape of the H200 configs, with and without the
    register prefetch, on whole tiles (64 x 2048: no masks) and partial ones."""
    qw = random_weight(n, groups * 128, 4, 128, True, False, seed=3)
    x = torch.randn(1, qw.shape[1], generator=torch.Generator().manual_seed(4)).to(DEV, torch.bfloat16)
    ref = qlinear_ref(x, qw)
    qw32, s = qw.qweight.view(torch.int32), qw.scales
    for bn, bc in [(4, 32), (8, 16), (8, 32)]:
        out = torch.full((1, n), float("nan"), dtype=torch.bfloat16, device=DEV)
        part = torch.empty(split, n, device=DEV)
        _q4gemv_kernel.fn[(triton.cdiv(n, bn), split)](
            x.view(torch.int32), qw32, s, qw.offsets, s, out if split == 1 else part, part, n, qw32.shape[1],
            qw32.stride(0), s.stride(0), GROUP=128, HAS_OFFSETS=True, HAS_BIAS=False, ZERO=0, SPLIT=split,
            USE_ASM=CUDA, BLOCK_N=bn, BLOCK_C=bc, PREFETCH=prefetch, num_warps=1)
        if split > 1:
            out = part.sum(0, keepdim=True)
        assert_close(out, ref, torch.bfloat16, matmul=True)


@pytest.mark.parametrize("bits,group,offsets,lut", [(4, 64, False, True), (8, 32, True, False)])
def test_real_shape_nf4_and_8bit(bits, group, offsets, lut):
    check(random_weight(8192, 5120, bits, group, offsets, lut), 1)


def test_pack_codes_layout():
    """Low nibble = even k, high nibble = odd k."""
    codes = torch.tensor([[1, 2, 3, 4]])
    assert pack_codes(codes, 4).tolist() == [[0x21, 0x43]]
    qw = QuantWeight(pack_codes(codes, 4), torch.ones(1, 1).half(), None, None, 4, 4, (1, 4))
    assert qw.dequantize().tolist() == [[1.0, 2.0, 3.0, 4.0]]


def test_concat_rows_widens_mixed_layouts():
    """q (4-bit, group 32) and v (8-bit, group 16, no offsets) fuse into one 8-bit group-16 weight, same values."""
    a = random_weight(3, 64, 4, 32, True, False).to("cpu")
    b = random_weight(2, 64, 8, 16, False, False).to("cpu")
    fused = concat_rows([a, b])
    assert (fused.bits, fused.group, fused.shape) == (8, 16, (5, 64))
    assert torch.equal(fused.dequantize(), torch.cat([a.dequantize(), b.dequantize()]))


def test_concat_rows_of_one_layout_keeps_it_and_materializes_different_zeros():
    """Q4_K-like q and k stack as they are; a Q4_0-like part (zero 8) with a zero-0 part gets offsets -8 * scale."""
    a = random_weight(3, 64, 4, 32, True, False).to("cpu")
    b = random_weight(2, 64, 4, 32, True, False, seed=1).to("cpu")
    fused = concat_rows([a, b])
    assert fused.layout == a.layout and fused.nbytes == a.nbytes + b.nbytes
    assert torch.equal(fused.dequantize(), torch.cat([a.dequantize(), b.dequantize()]))
    c = random_weight(2, 64, 4, 32, False, False, seed=2, zero=8).to("cpu")
    d = random_weight(2, 64, 4, 32, False, False, seed=3).to("cpu")
    for parts in ([c, d], [c, a], [c, c]):
        fused = concat_rows(parts)
        assert fused.zero == (8 if parts[1] is c else 0) and (fused.offsets is None) == (parts[1] is c)
        assert torch.equal(fused.dequantize(), torch.cat([p.dequantize() for p in parts]))


def mixed_parts() -> list[QuantWeight]:
    """q/k/v of a GGUF Q4_K_M layer in miniature: Q4_K-like q and k, a Q6_K-like v (8-bit, group 16, zero 32)."""
    return [random_weight(7, 96, 4, 32, True, False, seed=4), random_weight(3, 96, 4, 32, True, False, seed=5),
            random_weight(5, 96, 8, 16, False, False, seed=6, zero=32)]


def test_weights_kept_in_parts_equal_their_stack():
    """One GEMV per part into its columns of one output (M = 1, 3, 2 x 4), one qlinear per part beyond (13, 40)."""
    parts = mixed_parts()
    w = torch.cat([p.dequantize() for p in parts])
    for shape in [(1,), (3,), (2, 4), (13,), (40,)]:
        g = torch.Generator().manual_seed(len(shape) + shape[0])
        x = torch.randn(*shape, 96, generator=g).to(DEV)
        b = torch.randn(15, generator=g).to(DEV)
        assert_close(qlinear_parts_triton(x, parts, b), x @ w.T + b, torch.float32, matmul=True)
    layer = QuantLinear(96, 15, bias=True)
    layer.qweight, layer.bias = [p.to("cpu") for p in parts], torch.nn.Parameter(b.cpu())
    assert [p.layout for p in layer.parts] == [p.layout for p in parts]
    x = torch.randn(4, 96)
    assert_close(layer(x), x @ w.cpu().T + b.cpu(), torch.float32)


@pytest.mark.parametrize("bits", [4, 8])
def test_quantize_rtn_error_bound(bits):
    w = torch.randn(64, 256)
    qw = quantize_rtn(w, bits, 64, chunk_rows=16)
    step = qw.scales.float().repeat_interleave(64, dim=1)
    assert ((qw.dequantize() - w).abs() <= step * 0.5 + 1e-3).all()


def test_quant_linear_on_cpu_is_the_reference():
    layer = QuantLinear(96, 5, bias=True)
    layer.qweight = random_weight(5, 96, 4, 32, True, False).to("cpu")
    layer.bias = torch.nn.Parameter(torch.randn(5))
    x = torch.randn(4, 96)
    assert_close(layer(x), qlinear_ref(x, layer.qweight, layer.bias), torch.float32)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("n,k", QWEN3_32B + [(151936, 5120)])
def test_gpu_real_shapes_bf16(n, k):
    """Every kernel on the real shapes in bf16: 4-bit group 128 row-major and tiled (the tensor-core GEMV up to 16
    rows, dequantize + cuBLAS at 512), NF4, 8-bit."""
    for bits, group, offsets, lut in [(4, 128, True, False), (4, 64, False, True), (8, 128, True, False)]:
        qw = random_weight(n, k, bits, group, offsets, lut)
        for w in [qw] + ([tiled(qw)] if ql.tileable(qw) else []):
            for m in (1, 5, 8, 16, 512):
                check(w, m, torch.bfloat16, bias=m == 5)
