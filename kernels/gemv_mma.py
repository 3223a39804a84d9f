"""The decode GEMV for 1-8 bf16 rows against a 4-bit weight with groups of 128k codes and no code table
(kernels/qlinear.py's layout: code i of int32 word w of a row is k = 8 w + i), on the tensor cores.

Why: a CUDA-core GEMV spends instructions on every code (kernels/gemv4.py: ~3.4 SASS per code), and at 4.3 TB/s an
H200 SM can issue only ~4 instructions per 33 codes that arrive per clock. Here one warp-wide mma.sync m16n8k16
multiplies 256 codes: a lane turns two codes of a word into the exact bf16 pair (128 + c_j, 128 + c_j+4) with one
LOP3 (the code or-ed under the exponent of 128) and hands four such pairs, from rows g and g + 8 of a 16-row tile, to
the mma as its A fragment; B holds the activations (column n = x row n, so batched decode up to 8 rows costs the
same), accumulation is fp32 in the tensor core. Per 128-code step, sum_k w_k x_k = s * (sum (128 + c) x -
(128 + zero) sum x) + offset * sum x, the sums of x from a second mma with A = ones.

Fragment layout (PTX ISA, mma.m16n8k16 .bf16): lane = 4 g + t holds A rows g and g + 8 at k = 2t, 2t + 1, 2t + 8,
2t + 9; B column g at the same k; C rows g, g + 8 at columns 2t, 2t + 1. The k order inside an mma is free, so lane
t owns words 4t .. 4t + 3 of each 16-word step (one 16-byte load per row), the pair (c_j, c_j+4) in the place of
k (2t, 2t + 1), and B the matching activation pairs.

The tensors are 2-D, [8 S, 16] words and [8 S, 4] lanes, row r = 8 s + g for mma group s (a 16-row tile and a
K-slice, s = SLICES tile + slice): for such loads every Triton version (3.6 on the device, 3.9 here) lays element
(r, 4t + e) out on lane 4 (r % 8) + t, warp (r // 8) % num_warps (a leading slice axis gets lanes on 3.6). The
asm is marked impure so that no layout pass re-creates it in another layout. The GPU tests check the outputs, and so
the layout.

The PTX leaves (_mma_word, _mma_ones) have a plain-Triton twin that computes the same sums across the tile, which the
CPU interpreter (TRITON_INTERPRET=1) runs: the loads and epilogue around them are the same code either way.
"""

import torch
import triton
import triton.language as tl

from .gemv4 import _lanes, _x_pairs

_MMA = "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32"

# $0-$3 out (C[g, 2t], C[g, 2t+1], C[g+8, 2t], C[g+8, 2t+1]), $4-$7 C in, $8/$9 the words of rows g / g+8,
# $10-$13 activation pairs (x[8w + j], x[8w + j + 4]) of column g
_WORD_ASM = tl.constexpr("""
{
.reg .b32 a0, a1, a2, a3, s;
.reg .f32 e0, e1, e2, e3;
lop3.b32 a0, $8, 0x000F000F, 0x43004300, 0xEA;
lop3.b32 a1, $9, 0x000F000F, 0x43004300, 0xEA;
shr.u32 s, $8, 4;
lop3.b32 a2, s, 0x000F000F, 0x43004300, 0xEA;
shr.u32 s, $9, 4;
lop3.b32 a3, s, 0x000F000F, 0x43004300, 0xEA;
""" + _MMA + """ {e0, e1, e2, e3}, {a0, a1, a2, a3}, {$10, $11}, {$4, $5, $6, $7};
shr.u32 s, $8, 8;
lop3.b32 a0, s, 0x000F000F, 0x43004300, 0xEA;
shr.u32 s, $9, 8;
lop3.b32 a1, s, 0x000F000F, 0x43004300, 0xEA;
shr.u32 s, $8, 12;
lop3.b32 a2, s, 0x000F000F, 0x43004300, 0xEA;
shr.u32 s, $9, 12;
lop3.b32 a3, s, 0x000F000F, 0x43004300, 0xEA;
""" + _MMA + """ {$0, $1, $2, $3}, {a0, a1, a2, a3}, {$12, $13}, {e0, e1, e2, e3};
}
""")

# $0/$1 out (sum x of columns 2t / 2t+1), $2/$3 in, $4-$7 activation pairs of column g (A = ones)
_ONES_ASM = tl.constexpr("""
{
.reg .b32 k1;
.reg .f32 e0, e1, e2, e3, d2, d3;
mov.b32 k1, 0x3F803F80;
""" + _MMA + """ {e0, e1, e2, e3}, {k1, k1, k1, k1}, {$4, $5}, {$2, $3, $2, $3};
""" + _MMA + """ {$0, $1, d2, d3}, {k1, k1, k1, k1}, {$6, $7}, {e0, e1, e2, e3};
}
""")


@triton.jit
def _slices(v):
    """[8 S, 4] (row 8 s + g, lane t) -> [S, 8, 4]."""
    return tl.reshape(v, (v.shape[0] // 8, 8, 4))


@triton.jit
def _columns(c):
    """[S, 8, 8] sums C[s, m, n] -> what lane (g, t) holds: (C[s, g, 2t], C[s, g, 2t + 1]), [8 S, 4] each."""
    c0, c1 = tl.split(tl.reshape(c, (c.shape[0], 8, 4, 2)))
    return tl.reshape(c0, (c.shape[0] * 8, 4)), tl.reshape(c1, (c.shape[0] * 8, 4))


@triton.jit
def _mma_word(c00, c01, c10, c11, wa, wb, p0, p1, p2, p3, USE_ASM: tl.constexpr):
    """C += A B over one word per lane: A rows g / g + 8 = the codes of words wa / wb as 128 + c, B column g = the
    activation pairs p0..p3 (all [8 S, 4]); returns C as lane (g, t) holds it (see the module docstring)."""
    if USE_ASM:
        return tl.inline_asm_elementwise(_WORD_ASM, "=f,=f,=f,=f,f,f,f,f,r,r,r,r,r,r",
                                         [c00, c01, c10, c11, wa, wb, p0, p1, p2, p3],
                                         dtype=(tl.float32, tl.float32, tl.float32, tl.float32), is_pure=False, pack=1)
    else:  # C[s, m, n] = sum over lanes t and codes i of (128 + code i of row m, lane t) * x_i (column n, lane t)
        lo0, hi0 = _lanes(p0)
        lo1, hi1 = _lanes(p1)
        lo2, hi2 = _lanes(p2)
        lo3, hi3 = _lanes(p3)
        lo = tl.reshape(tl.join(tl.join(lo0, lo2), tl.join(lo1, lo3)), (wa.shape[0], 4, 4))  # x 0, 1, 2, 3
        hi = tl.reshape(tl.join(tl.join(hi0, hi2), tl.join(hi1, hi3)), (wa.shape[0], 4, 4))  # x 4, 5, 6, 7
        xs = tl.reshape(tl.join(lo, hi), (wa.shape[0] // 8, 1, 8, 32))  # x 0, 4, 1, 5, .. per lane t
        sh = tl.reshape(tl.join(tl.arange(0, 4) * 4, tl.arange(0, 4) * 4 + 16), (1, 1, 8))  # codes in that order
        ca = tl.sum(((((wa[:, :, None] >> sh) & 0xF) + 128).to(tl.float32).reshape(wa.shape[0] // 8, 8, 1, 32)) * xs, 3)
        cb = tl.sum(((((wb[:, :, None] >> sh) & 0xF) + 128).to(tl.float32).reshape(wa.shape[0] // 8, 8, 1, 32)) * xs, 3)
        a0, a1 = _columns(ca)
        b0, b1 = _columns(cb)
        return c00 + a0, c01 + a1, c10 + b0, c11 + b1


@triton.jit
def _mma_ones(s0, s1, p0, p1, p2, p3, USE_ASM: tl.constexpr):
    """(sum x of column 2t, of column 2t + 1) += over one word per lane, the activation pairs p0..p3 of column g
    ([8 S, 4])."""
    if USE_ASM:
        return tl.inline_asm_elementwise(_ONES_ASM, "=f,=f,f,f,r,r,r,r", [s0, s1, p0, p1, p2, p3],
                                         dtype=(tl.float32, tl.float32), is_pure=False, pack=1)
    else:
        a0, b0 = _lanes(_slices(p0))
        a1, b1 = _lanes(_slices(p1))
        a2, b2 = _lanes(_slices(p2))
        a3, b3 = _lanes(_slices(p3))
        col = tl.sum(((a0 + b0) + (a1 + b1)) + ((a2 + b2) + (a3 + b3)), axis=2)  # [S, 8 (n)]
        c0, c1 = tl.split(tl.reshape(col, (col.shape[0], 4, 2)))  # [S, 4 (t)]
        z = tl.zeros((col.shape[0], 8, 4), dtype=tl.float32)
        return (s0 + tl.reshape(z + c0[:, None, :], (s0.shape[0], 4)),
                s1 + tl.reshape(z + c1[:, None, :], (s0.shape[0], 4)))


@triton.jit
def _load_f16(p, USE_ASM: tl.constexpr):
    """tl.load(p) for an fp16 pointer tensor; on the GPU through inline PTX, which leaves the result in the layout of
    p (tl.load takes the one Triton's coalescing picks, which on 3.6 differs from the mma tiles' and costs a
    shared-memory round trip per step)."""
    if USE_ASM:
        return tl.inline_asm_elementwise("ld.global.nc.b16 $0, [$1];", "=h,l", [p], dtype=tl.float16, is_pure=True,
                                         pack=1)
    else:
        return tl.load(p)


@triton.jit
def _words(v):
    """[8 S, 16] (row, 4t + e) -> its elements e = 0..3 as [8 S, 4] each (registers of lane (g, t))."""
    a, b = tl.split(tl.reshape(v, (v.shape[0], 4, 2, 2)))
    v0, v2 = tl.split(a)
    v1, v3 = tl.split(b)
    return v0, v1, v2, v3


@triton.jit
def _load_step(p_wa, p_wb, p_x, p_sa, p_sb, s_ptr, o_ptr, first, i, n_steps, STRIDE, WSTEP: tl.constexpr,
               SPG: tl.constexpr, HAS_OFFSETS: tl.constexpr, EVEN: tl.constexpr, USE_ASM: tl.constexpr):
    """Step i of each slice (first [8 S, 1]: the slices' first steps, STRIDE apart): the 16 words of rows g and
    g + 8 ([8 S, 16] int32, lane t holding words 4t..4t+3: one 16-byte load; WSTEP words from one step to the
    next), the 4 words (8 bf16 each) of x row g that lane t owns (4 x [8 S, 16] int32, word w of lane t at
    4t..4t+3), and the scales and offsets of rows g and g + 8 ([8 S, 4]). Rows, x rows and steps are clamped in
    range, so nothing is masked; the scales of steps past the end (when not EVEN) are zeroed: those add 0."""
    gs = first + i * STRIDE
    gl = tl.minimum(gs, n_steps - 1)
    wa = tl.load(p_wa + gl * WSTEP)
    wb = tl.load(p_wb + gl * WSTEP)
    x0 = tl.load(p_x + gl * 64)
    x1 = tl.load(p_x + gl * 64 + 4)
    x2 = tl.load(p_x + gl * 64 + 8)
    x3 = tl.load(p_x + gl * 64 + 12)
    gi = gl // SPG
    sa = _load_f16(s_ptr + p_sa + gi, USE_ASM)
    sb = _load_f16(s_ptr + p_sb + gi, USE_ASM)
    if HAS_OFFSETS:
        oa = _load_f16(o_ptr + p_sa + gi, USE_ASM)
        ob = _load_f16(o_ptr + p_sb + gi, USE_ASM)
    else:
        oa, ob = sa, sb
    if not EVEN:  # a step past the end adds 0
        f = (gs < n_steps).to(tl.float16)
        sa, sb, oa, ob = sa * f, sb * f, oa * f, ob * f
    return wa, wb, x0, x1, x2, x3, sa, sb, oa, ob


@triton.jit
def _step(acc, t, HAS_OFFSETS: tl.constexpr, ZERO: tl.constexpr, USE_ASM: tl.constexpr):
    """acc (4 x [8 S, 4]: rows g / g + 8 x columns 2t / 2t + 1) += one step, t = _load_step's tuple."""
    sa, sb = t[6].to(tl.float32), t[7].to(tl.float32)
    if HAS_OFFSETS:
        oa, ob = t[8].to(tl.float32), t[9].to(tl.float32)
    else:
        oa, ob = tl.zeros_like(sa), tl.zeros_like(sb)
    a = _words(t[0])
    b = _words(t[1])
    z = tl.zeros_like(sa)
    c00, c01, c10, c11, s0, s1 = z, z, z, z, z, z
    for w in tl.static_range(4):
        xw0, xw1, xw2, xw3 = _words(t[2 + w])
        p0, p1, p2, p3 = _x_pairs(xw0, xw1, xw2, xw3, USE_ASM)
        s0, s1 = _mma_ones(s0, s1, p0, p1, p2, p3, USE_ASM)
        c00, c01, c10, c11 = _mma_word(c00, c01, c10, c11, a[w], b[w], p0, p1, p2, p3, USE_ASM)
    da = oa - (ZERO + 128) * sa  # w = s (128 + c) + offset - (128 + zero) s
    db = ob - (ZERO + 128) * sb
    return (acc[0] + sa * c00 + da * s0, acc[1] + sa * c01 + da * s1, acc[2] + sb * c10 + db * s0,
            acc[3] + sb * c11 + db * s1)


@triton.jit
def _rows(b_ptr, acc, r, N, TILES: tl.constexpr, HAS_BIAS: tl.constexpr):
    """acc summed over the slices (+ bias[r]): [TILES, 8, 4] fp32, r [TILES, 8, 1] the weight rows."""
    y = tl.sum(tl.reshape(acc, (TILES, acc.shape[0] // (8 * TILES), 8, 4)), axis=1)
    if HAS_BIAS:
        y += tl.load(b_ptr + r, mask=r < N, other=0.0).to(tl.float32)
    return y


@triton.jit
def _store(y_ptr, b_ptr, acc_a, acc_b, r, col, M, N, stride_ym, TILES: tl.constexpr, HAS_BIAS: tl.constexpr,
           SILU: tl.constexpr):
    """Rows r and r + 8 (r [TILES, 8, 1]) for x rows col ([1, 1, 4]; those past N / M are skipped): y[col, r],
    y[col, r + 8]; or with SILU (rows r gate, r + 8 up: qlinear.interleave_gate_up's order) y[col, r - 8 i] =
    silu(gate) * up, i the tile."""
    a = _rows(b_ptr, acc_a, r, N, TILES, HAS_BIAS)
    b = _rows(b_ptr, acc_b, r + 8, N, TILES, HAS_BIAS)
    m = (r < N) & (col < M)
    if SILU:
        out = r - (r // 16) * 8
        tl.store(y_ptr + col * stride_ym + out, (a / (1.0 + tl.exp(-a)) * b).to(y_ptr.dtype.element_ty), mask=m)
    else:
        tl.store(y_ptr + col * stride_ym + r, a.to(y_ptr.dtype.element_ty), mask=m)
        tl.store(y_ptr + col * stride_ym + r + 8, b.to(y_ptr.dtype.element_ty), mask=m & (r + 8 < N))


def _configs() -> list[triton.Config]:
    # bench/gemv_lab.py on the H200 (2026-11-29, tile-major words): 4 slices won qkv and gate_up, 8 o_proj and down;
    # loading two steps ahead or unrolling was slower everywhere
    return [triton.Config({"TILES": 1, "SLICES": s}, num_warps=s) for s in (4, 8, 2)]


def _prune(configs, named_args, **kwargs):
    if not named_args["x_ptr"].is_cuda:  # the interpreter runs programs one by one: few programs, few iterations
        tiles = min(32, triton.next_power_of_2(triton.cdiv(named_args["N"], 16)))
        return [triton.Config({"TILES": tiles, "SLICES": min(16, triton.next_power_of_2(named_args["W"] // 16))})]
    args = {**named_args, **kwargs}
    return configs if args["N"] * args["W"] >= 1 << 20 else configs[:1]


@triton.autotune(configs=_configs(), key=["N", "W", "M", "GROUP", "HAS_OFFSETS", "ZERO", "TILED", "SILU"],
                 prune_configs_by={"early_config_prune": _prune})
@triton.heuristics({"EVEN": lambda a: (a["W"] // 16) % a["SLICES"] == 0})
@triton.jit
def _q4mma_kernel(x_ptr, qw_ptr, s_ptr, o_ptr, b_ptr, y_ptr, M, N, W, stride_xm, stride_qn, stride_sn, stride_ym,
                  GROUP: tl.constexpr, HAS_OFFSETS: tl.constexpr, HAS_BIAS: tl.constexpr, ZERO: tl.constexpr,
                  TILED: tl.constexpr, SILU: tl.constexpr, USE_ASM: tl.constexpr, TILES: tl.constexpr,
                  SLICES: tl.constexpr, EVEN: tl.constexpr):
    """y[m, n] = sum_k x[m, k] w[n, k] (+ bias) for M <= 8 bf16 rows x (read as int32 words, stride_xm in words)
    against the 16-row tiles i TILES .. (i + 1) TILES - 1 of the weight (program i; one tile per program on the GPU,
    many in the interpreter), W words per row: row-major (stride_qn words), or TILED
    (tile_words' order: each 16-row tile's step is 1 KB contiguous); SILU: the rows interleaved gate / up in blocks
    of 8, y = silu(gate) * up [M, N / 2] (the MLP's gate_up and SiLU-mul in one kernel). Slice s sums the 128-code
    steps s, s + SLICES, ... (the warps of a program read neighbouring pieces), each loaded one step ahead of its
    sum. EVEN: every slice has the same number of steps."""
    SPG: tl.constexpr = GROUP // 128  # steps per group
    R: tl.constexpr = 8 * TILES * SLICES
    i_n = tl.program_id(0).to(tl.int64)
    o_r = tl.arange(0, R)[:, None]  # 8 (SLICES tile + s) + g
    o_j = tl.arange(0, 16)[None, :]  # 4 t + e
    g = o_r % 8
    n_steps = W // 16
    first = (o_r // 8) % SLICES  # [R, 1]
    tile = i_n * TILES + o_r // (8 * SLICES)
    row = tile * 16 + g
    ra, rb = tl.minimum(row, N - 1), tl.minimum(row + 8, N - 1)  # clamped: their sums are never stored
    if TILED:
        p_wa = qw_ptr + tl.minimum(tile, N // 16 - 1) * n_steps * 256 + g * 16 + o_j
        p_wb = p_wa + 128
        WSTEP: tl.constexpr = 256
    else:
        p_wa = qw_ptr + ra * stride_qn + o_j
        p_wb = qw_ptr + rb * stride_qn + o_j
        WSTEP: tl.constexpr = 16
    p_x = x_ptr + tl.minimum(g, M - 1) * stride_xm + (o_j // 4) * 16 + o_j % 4
    o_t = tl.arange(0, 4)[None, :]
    p_sa, p_sb = ra * stride_sn + 0 * o_t, rb * stride_sn + 0 * o_t  # [R, 4]: equal across t
    z = tl.zeros((R, 4), dtype=tl.float32)
    acc = (z, z, z, z)
    t = _load_step(p_wa, p_wb, p_x, p_sa, p_sb, s_ptr, o_ptr, first, 0, n_steps, SLICES, WSTEP, SPG, HAS_OFFSETS,
                   EVEN, USE_ASM)
    for i in range(tl.cdiv(n_steps, SLICES)):
        nxt = _load_step(p_wa, p_wb, p_x, p_sa, p_sb, s_ptr, o_ptr, first, i + 1, n_steps, SLICES, WSTEP, SPG,
                         HAS_OFFSETS, EVEN, USE_ASM)
        acc = _step(acc, t, HAS_OFFSETS, ZERO, USE_ASM)
        t = nxt
    r = (i_n * TILES + tl.arange(0, TILES)[:, None, None]) * 16 + tl.arange(0, 8)[None, :, None]
    col = 2 * tl.arange(0, 4)[None, None, :]
    _store(y_ptr, b_ptr, acc[0], acc[2], r, col, M, N, stride_ym, TILES, HAS_BIAS, SILU)
    _store(y_ptr, b_ptr, acc[1], acc[3], r, col + 1, M, N, stride_ym, TILES, HAS_BIAS, SILU)


def q4mma(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor | None, group: int,
          zero: int, tiled: bool, bias: torch.Tensor | None, y: torch.Tensor, silu: bool = False) -> torch.Tensor:
    """y [M, N] = x [M, K] (bf16, M <= 8) @ w.T (+ bias) through _q4mma_kernel; qweight uint8 [N, K / 2] (4-bit
    codes, row-major or tiled: tile_words), group a multiple of 128. silu: rows in interleave_gate_up's order,
    y [M, N / 2] = silu(gate) * up."""
    N = qweight.shape[0]
    assert x.dtype == torch.bfloat16 and 1 <= x.shape[0] <= 8 and group % 128 == 0
    assert x.stride(1) == 1 and x.stride(0) % 2 == 0 and y.stride(1) == 1 and qweight.is_contiguous()
    assert not (tiled or silu) or N % 16 == 0
    _q4mma_kernel[lambda meta: (triton.cdiv(N, 16 * meta["TILES"]),)](
        x.view(torch.int32), qweight.view(torch.int32), scales, scales if offsets is None else offsets,
        scales if bias is None else bias, y, x.shape[0], N, qweight.shape[1] // 4, x.stride(0) // 2,
        qweight.stride(0) // 4, scales.stride(0), y.stride(0), GROUP=group, HAS_OFFSETS=offsets is not None,
        HAS_BIAS=bias is not None, ZERO=zero, TILED=tiled, SILU=silu, USE_ASM=x.is_cuda)
    return y


def tile_words(qweight: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    """uint8 [N, K / 2] row-major (N % 16 == 0, K % 128 == 0) -> the same bytes tile-major (what _q4mma_kernel reads
    with TILED: [N / 16, K / 128, 16 rows, 16 int32 words], each 16-row tile's 128-code step 1 KB contiguous),
    returned as uint8 [N, K / 2]; inverse: back to row-major."""
    n, kb = qweight.shape
    w = qweight.view(torch.int32)
    if inverse:
        w = w.reshape(n // 16, kb // 64, 16, 16).permute(0, 2, 1, 3)
    else:
        w = w.reshape(n // 16, 16, kb // 64, 16).permute(0, 2, 1, 3)
    return w.contiguous().view(torch.uint8).reshape(n, kb)
