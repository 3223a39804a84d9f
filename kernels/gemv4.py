"""The decode GEMV for 4-bit weights without a code table and bf16 activations (kernels/qlinear.py's layout: code i
of int32 word w of a row is k = 8 w + i), in packed bf16x2 arithmetic.

Why: at 4.3 TB/s an H200 SM must consume 33 codes per clock, and the fp32 GEMV (qlinear._qgemv_kernel) spends ~5.5
instructions per code (shift, mask, FMA, plus activation handling). Here one LOP3 turns two codes of a word (j and
j + 4) into the bf16 pair (128 + c_j, 128 + c_j+4) (the code or-ed under the exponent of 128), one bf16x2 FMA
subtracts 136 exactly, and one bf16x2 FMA multiplies by the matching pair of activations: ~3.4 SASS instructions per
code in all. Products and the four partial sums of a word round to bf16 (relative 2^-9 each, far below 4-bit
quantization error); everything after a word is fp32. Reference: qlinear.qlinear_ref. Measured (bench/RESULTS.md):
15-42% faster than the fp32 kernel per Qwen3-32B shape, most of it from loading each word's 8 activations at once.

The PTX leaves (_x_pairs, _dot8) have a plain-Triton twin with the same data flow, exact in fp32, which the CPU
interpreter (TRITON_INTERPRET=1) runs: the pairing, masking and indexing around them are the same code either way.
"""

import triton
import triton.language as tl

_PAIRS_ASM = tl.constexpr("""
prmt.b32 $0, $4, $6, 0x5410;
prmt.b32 $1, $4, $6, 0x7632;
prmt.b32 $2, $5, $7, 0x5410;
prmt.b32 $3, $5, $7, 0x7632;
""")

_DOT8_ASM = tl.constexpr("""
{
.reg .b32 t0, t1, t2, t3, s, a, k1, km, z;
.reg .b16 lo, hi;
.reg .f32 fl, fh;
mov.b32 k1, 0x3F803F80;
mov.b32 km, 0xC308C308;
mov.b32 z, 0;
lop3.b32 t0, $1, 0x000F000F, 0x43004300, 0xEA;
shr.u32 s, $1, 4;
lop3.b32 t1, s, 0x000F000F, 0x43004300, 0xEA;
shr.u32 s, $1, 8;
lop3.b32 t2, s, 0x000F000F, 0x43004300, 0xEA;
shr.u32 s, $1, 12;
lop3.b32 t3, s, 0x000F000F, 0x43004300, 0xEA;
fma.rn.bf16x2 t0, t0, k1, km;
fma.rn.bf16x2 t1, t1, k1, km;
fma.rn.bf16x2 t2, t2, k1, km;
fma.rn.bf16x2 t3, t3, k1, km;
fma.rn.bf16x2 a, t0, $2, z;
fma.rn.bf16x2 a, t1, $3, a;
fma.rn.bf16x2 a, t2, $4, a;
fma.rn.bf16x2 a, t3, $5, a;
mov.b32 {lo, hi}, a;
cvt.f32.bf16 fl, lo;
cvt.f32.bf16 fh, hi;
add.f32 $0, fl, fh;
}
""")


@triton.jit
def _lanes(p):
    """The two bf16 lanes of int32 p as fp32: (low, high)."""
    return (p << 16).to(tl.float32, bitcast=True), (p & -65536).to(tl.float32, bitcast=True)


@triton.jit
def _x_pairs(xw0, xw1, xw2, xw3, USE_ASM: tl.constexpr):
    """Words xw_e = bf16 (x[8w + 2e], x[8w + 2e + 1]) -> pairs (x[8w + j], x[8w + j + 4]) for j = 0..3."""
    if USE_ASM:
        return tl.inline_asm_elementwise(_PAIRS_ASM, "=r,=r,=r,=r,r,r,r,r", [xw0, xw1, xw2, xw3],
                                         dtype=(tl.int32, tl.int32, tl.int32, tl.int32), is_pure=True, pack=1)
    else:
        p0 = (xw0 & 0xFFFF) | (xw2 << 16)
        p1 = ((xw0 >> 16) & 0xFFFF) | (xw2 & -65536)
        p2 = (xw1 & 0xFFFF) | (xw3 << 16)
        p3 = ((xw1 >> 16) & 0xFFFF) | (xw3 & -65536)
        return p0, p1, p2, p3


@triton.jit
def _dot8(q, p0, p1, p2, p3, USE_ASM: tl.constexpr):
    """sum_i (c_i - 8) x_i over the 8 codes of word q, p_j = the activation pairs of codes (j, j + 4): fp32. Codes
    centred on 8 (exact in bf16) make smaller products, so less rounding and less cancellation against the offset
    term."""
    if USE_ASM:
        return tl.inline_asm_elementwise(_DOT8_ASM, "=f,r,r,r,r,r", [q, p0, p1, p2, p3], dtype=tl.float32,
                                         is_pure=True, pack=1)
    else:
        lo0, hi0 = _lanes(p0)
        lo1, hi1 = _lanes(p1)
        lo2, hi2 = _lanes(p2)
        lo3, hi3 = _lanes(p3)
        acc = ((q & 0xF) - 8).to(tl.float32) * lo0 + (((q >> 16) & 0xF) - 8).to(tl.float32) * hi0
        acc += (((q >> 4) & 0xF) - 8).to(tl.float32) * lo1 + (((q >> 20) & 0xF) - 8).to(tl.float32) * hi1
        acc += (((q >> 8) & 0xF) - 8).to(tl.float32) * lo2 + (((q >> 24) & 0xF) - 8).to(tl.float32) * hi2
        acc += (((q >> 12) & 0xF) - 8).to(tl.float32) * lo3 + (((q >> 28) & 0xF) - 8).to(tl.float32) * hi3
        return acc


def _configs() -> list[triton.Config]:
    # bench/gemv_lab.py on the H200 (2026-11-29, CUDA graphs over rotating weights; bench/RESULTS.md): the winners per
    # Qwen3-32B shape, all 1-warp programs. One 16-byte activation load per word beat four 4-byte ones by up to 15%;
    # Triton's shared-memory pipelining (tl.range num_stages 2-4) was slower on every shape
    shapes = [(4, 32, 1), (8, 32, 0), (8, 16, 0), (8, 16, 1)]  # (BLOCK_N, BLOCK_C, PREFETCH)
    return [triton.Config({"BLOCK_N": n, "BLOCK_C": c, "PREFETCH": p}, num_warps=1) for n, c, p in shapes]


def _prune(configs, named_args, **kwargs):
    if not named_args["x_ptr"].is_cuda:  # the interpreter runs programs one by one: few large tiles
        return [triton.Config({"BLOCK_N": 64, "BLOCK_C": 64, "PREFETCH": 1})]
    args = {**named_args, **kwargs}
    return configs if args["N"] * args["W"] >= 1 << 20 else configs[:1]


@triton.jit
def _load_tile(p_q, p_s, s_ptr, o_ptr, x_ptr, w0, stop, m_n, o_w, o_c, WPG: tl.constexpr, HAS_OFFSETS: tl.constexpr,
               EVEN: tl.constexpr):
    """Words, scales, offsets and activation words of the tile at word w0 (nothing past `stop`): a whole tile in
    EVEN mode is one predicate (w0 < stop), else masked per word and row."""
    p_x = x_ptr + (w0 + o_w) * 4
    if EVEN:
        m_w = (w0 + 0 * o_w) < stop
        m_s = ((w0 + 0 * o_c) < stop)[None, :]
        b_q = tl.load(p_q + w0, mask=m_w[None], other=0)
        b_s = tl.load(s_ptr + p_s + w0 // WPG, mask=m_s, other=0.0)
        b_o = tl.load(o_ptr + p_s + w0 // WPG, mask=m_s, other=0.0) if HAS_OFFSETS else b_s
    else:
        m_w = (w0 + o_w) < stop
        b_q = tl.load(p_q + w0, mask=m_n[:, None, None] & m_w[None], other=0)
        m_s = m_n[:, None] & ((w0 + o_c * 4) < stop)[None, :]
        b_s = tl.load(s_ptr + p_s + w0 // WPG, mask=m_s, other=0.0)
        b_o = tl.load(o_ptr + p_s + w0 // WPG, mask=m_s, other=0.0) if HAS_OFFSETS else b_s
    xv = tl.load(p_x[:, :, None] + tl.arange(0, 4)[None, None, :], mask=m_w[:, :, None], other=0)  # [C, 4, 4]
    xa, xb = tl.split(tl.reshape(xv, (xv.shape[0], 4, 2, 2)))  # one 16-byte load per word, split in registers
    xw0, xw2 = tl.split(xa)
    xw1, xw3 = tl.split(xb)
    return b_q, b_s, b_o, xw0, xw1, xw2, xw3


@triton.jit
def _tile_dot(acc, t, HAS_OFFSETS: tl.constexpr, ZERO: tl.constexpr, USE_ASM: tl.constexpr):
    """acc [BN, C] += each chunk's sum_k w_k x_k, t = _load_tile's tuple."""
    b_q, b_s, b_o, xw0, xw1, xw2, xw3 = t[0], t[1], t[2], t[3], t[4], t[5], t[6]
    b_s = b_s.to(tl.float32)
    b_o = b_o.to(tl.float32) if HAS_OFFSETS else tl.zeros_like(b_s)
    b_o -= (ZERO - 8) * b_s  # _dot8 sums (c - 8) x
    a0, b0 = _lanes(xw0)
    a1, b1 = _lanes(xw1)
    a2, b2 = _lanes(xw2)
    a3, b3 = _lanes(xw3)
    x_sum = tl.sum(((a0 + b0) + (a1 + b1)) + ((a2 + b2) + (a3 + b3)), axis=1)  # [C]
    p0, p1, p2, p3 = _x_pairs(xw0, xw1, xw2, xw3, USE_ASM)
    d = _dot8(b_q, p0[None], p1[None], p2[None], p3[None], USE_ASM)  # [BN, C, 4]
    return acc + b_s * tl.sum(d, axis=2) + b_o * x_sum[None, :]


@triton.autotune(configs=_configs(), key=["N", "W", "GROUP", "SPLIT", "HAS_OFFSETS", "ZERO"],
                 prune_configs_by={"early_config_prune": _prune})
@triton.heuristics({"EVEN": lambda a: a["N"] % a["BLOCK_N"] == 0 and a["W"] % (a["SPLIT"] * a["BLOCK_C"] * 4) == 0})
@triton.jit
def _q4gemv_kernel(x_ptr, qw_ptr, s_ptr, o_ptr, b_ptr, y_ptr, part_ptr, N, W, stride_qn, stride_sn,
                   GROUP: tl.constexpr, HAS_OFFSETS: tl.constexpr, HAS_BIAS: tl.constexpr, ZERO: tl.constexpr,
                   SPLIT: tl.constexpr, USE_ASM: tl.constexpr, EVEN: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_C: tl.constexpr, PREFETCH: tl.constexpr):
    """y[n] = sum_k x[k] w[n, k] (+ bias) for one row x (bf16, read as int32 words: x_ptr[4 w + e] holds x[8 w + 2e],
    x[8 w + 2e + 1]). Tiles of BLOCK_N rows x BLOCK_C chunks of 4 words (32 codes, within one group) (PREFETCH: the
    next tile loaded into registers before the current one is computed); per chunk sum_k w_k x_k =
    s * sum (c_k - 8) x_k + (offset - (ZERO - 8) * s) * sum x_k. Grid (cdiv(N, BLOCK_N), SPLIT): K-slice i_k writes
    fp32 partial sums part[i_k, n] when SPLIT > 1. EVEN: N and every K-slice are whole tiles (no masks)."""
    CPG: tl.constexpr = GROUP // 32  # chunks per group
    WPG: tl.constexpr = GROUP // 8  # words per group
    BLOCK_W: tl.constexpr = BLOCK_C * 4
    i_n = tl.program_id(0).to(tl.int64)
    i_k = tl.program_id(1)
    o_n = i_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_n = o_n < N
    o_c = tl.arange(0, BLOCK_C)
    o_w = o_c[:, None] * 4 + tl.arange(0, 4)[None, :]  # [C, 4]: word offsets within a tile
    slice_w = tl.cdiv(tl.cdiv(W, SPLIT), BLOCK_W) * BLOCK_W
    start = i_k * slice_w
    stop = tl.minimum(start + slice_w, W)
    p_q = qw_ptr + o_n[:, None, None] * stride_qn + o_w[None]
    p_s = o_n[:, None] * stride_sn + o_c[None, :] // CPG
    acc = tl.zeros((BLOCK_N, BLOCK_C), dtype=tl.float32)
    if PREFETCH:
        t = _load_tile(p_q, p_s, s_ptr, o_ptr, x_ptr, start, stop, m_n, o_w, o_c, WPG, HAS_OFFSETS, EVEN)
        for w0 in range(start, stop, BLOCK_W):
            n = _load_tile(p_q, p_s, s_ptr, o_ptr, x_ptr, w0 + BLOCK_W, stop, m_n, o_w, o_c, WPG, HAS_OFFSETS, EVEN)
            acc = _tile_dot(acc, t, HAS_OFFSETS, ZERO, USE_ASM)
            t = n
    else:
        for w0 in range(start, stop, BLOCK_W):
            t = _load_tile(p_q, p_s, s_ptr, o_ptr, x_ptr, w0, stop, m_n, o_w, o_c, WPG, HAS_OFFSETS, EVEN)
            acc = _tile_dot(acc, t, HAS_OFFSETS, ZERO, USE_ASM)
    y = tl.sum(acc, axis=1)
    if HAS_BIAS:
        y += tl.where(i_k == 0, tl.load(b_ptr + o_n, mask=m_n, other=0.0).to(tl.float32), 0.0)
    m_y = None if EVEN else m_n
    if SPLIT == 1:
        tl.store(y_ptr + o_n, y.to(y_ptr.dtype.element_ty), mask=m_y)
    else:
        tl.store(part_ptr + i_k * N + o_n, y, mask=m_y)

