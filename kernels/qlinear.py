"""Group-quantized linear layers: the one internal 4/8-bit weight layout (QuantWeight), its Triton kernels and the
plain-PyTorch reference.

Layout of a weight W [N, K] (out, in): qweight uint8, bits=4: [N, K // 2] (low nibble = even k, high nibble = odd
k), bits=8: [N, K]; scales fp16 [N, K // group]; offsets fp16 [N, K // group] or None; lut fp32 [16] or None; zero
an integer code (default 0). w[n, k] = (c(q[n, k]) - zero) * scales[n, k // group] + offsets[n, k // group],
c(q) = lut[q] if lut is not None else q: symmetric formats (GGUF Q4_0, Q5_0, Q6_K, Q8_0: w = d * (q - z)) need no
offsets tensor, an implicit offset -zero * scale per group.
tiled: the same bytes of a 4-bit weight (groups of 128k, N % 16 == 0) stored tile-major for the tensor-core decode
GEMV (kernels/gemv_mma.py: tile_words), which reads each 16-row tile's 128-code step as 1 KB contiguous; the loader
tiles the weights of bf16 models so on sm_80+ GPUs (tile()). Only the Triton kernels read them; the torch helpers
untile first.
It does not read source formats (openclaw.weights.formats converts AWQ / bnb / GGUF into this layout).
"""

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .gemv4 import _q4gemv_kernel
from .gemv_mma import q4mma, tile_words

GEMV_MAX_ROWS = 8  # rows one GEMV launch handles; fewer than DEQUANT_MIN_ROWS run as several launches
# From this many rows qlinear dequantizes the weight, DEQUANT_BLOCK bytes of it at a time, and multiplies with cuBLAS.
# Measured on an H100 (bench/RESULTS.md, 2026-12-05): at 512 and 4096 rows of every Qwen3-32B shape that path took
# 0.23-0.50x the time of kernels/qgemm.py's in-register GEMM, which stays out of the dispatch until it is tuned;
# below it, GEMV launches of 8 rows each read the weight once per launch (batch 16 decode: 2 launches, not the GEMM's
# 3.5x slower step).
DEQUANT_MIN_ROWS = 64
DEQUANT_BLOCK = 128 << 20
GEMV_KERNELS = ("mma", "gemv4")  # the few-row GEMVs qgemv may use, besides the fp32 kernel (benchmarks narrow it)


@dataclass
class QuantWeight:
    """A group-quantized weight [N, K] = shape; see the module docstring for the layout."""

    qweight: torch.Tensor
    scales: torch.Tensor
    offsets: torch.Tensor | None
    lut: torch.Tensor | None
    bits: int
    group: int
    shape: tuple[int, int]
    zero: int = 0
    tiled: bool = False

    def __post_init__(self) -> None:
        n, k = self.shape = tuple(self.shape)
        assert self.bits in (4, 8), f"bits {self.bits} must be 4 or 8"
        assert self.group > 0 and k % self.group == 0, f"group {self.group} must divide K={k}"
        assert self.qweight.dtype == torch.uint8 and tuple(self.qweight.shape) == (n, k * self.bits // 8), \
            f"qweight {self.qweight.dtype} {tuple(self.qweight.shape)} must be uint8 [{n}, {k * self.bits // 8}]"
        assert self.scales.dtype == torch.float16 and tuple(self.scales.shape) == (n, k // self.group), \
            f"scales {self.scales.dtype} {tuple(self.scales.shape)} must be float16 [{n}, {k // self.group}]"
        assert self.offsets is None or (self.offsets.dtype == torch.float16 and self.offsets.shape == self.scales.shape)
        assert self.lut is None or (self.lut.dtype == torch.float32 and tuple(self.lut.shape) == (16,) and self.bits == 4)
        assert 0 <= self.zero < 1 << self.bits, f"zero {self.zero} must be a {self.bits}-bit code"
        assert not self.tiled or tileable(self), "only 4-bit weights without a lut in groups of 128k, N % 16 == 0"

    @property
    def layout(self) -> tuple[int, int, bool, bool, int]:
        """(bits, group, has offsets, has lut, zero): openclaw.weights.sizes.Layout's fields. Weights of one layout
        stack into one (concat_rows) without widening."""
        return self.bits, self.group, self.offsets is not None, self.lut is not None, self.zero

    @property
    def device(self) -> torch.device:
        return self.qweight.device

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.qweight, self.scales, self.offsets, self.lut)
                   if t is not None)

    def to(self, device: torch.device | str) -> "QuantWeight":
        def move(t):
            return None if t is None else t.to(device)

        return QuantWeight(move(self.qweight), move(self.scales), move(self.offsets), move(self.lut), self.bits,
                           self.group, self.shape, self.zero, self.tiled)

    @property
    def rowmajor(self) -> torch.Tensor:
        """qweight in row-major order (a copy when tiled)."""
        return tile_words(self.qweight, inverse=True) if self.tiled else self.qweight

    def codes(self) -> torch.Tensor:
        """The integer codes [N, K] (uint8)."""
        if self.bits == 8:
            return self.qweight
        q = self.rowmajor
        return torch.stack((q & 0xF, q >> 4), dim=-1).view(q.shape[0], -1)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight [N, K] in dtype, computed in fp32 (the reference)."""
        c = self.codes()
        c = self.lut.to(c.device)[c.long()] if self.lut is not None else c.float()
        if self.zero:
            c = c - self.zero
        n, k = self.shape
        w = c.view(n, k // self.group, self.group) * self.scales.float()[..., None]
        if self.offsets is not None:
            w = w + self.offsets.float()[..., None]
        return w.view(n, k).to(dtype)

    def rows(self, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Dequantized rows W[ids] -> [len(ids), K] (an embedding lookup that never dequantizes the whole table)."""
        sub = QuantWeight(self.rowmajor[ids], self.scales[ids], None if self.offsets is None else self.offsets[ids],
                          self.lut, self.bits, self.group, (ids.numel(), self.shape[1]), self.zero)
        return sub.dequantize(dtype)


def _gemv_configs() -> list[triton.Config]:
    # small tiles and one warp won on the H200 (bench/gemv_lab.py, 2026-11-29): many programs in flight, each
    # prefetching its next tile, hide memory latency better than wide tiles
    shapes = [(8, 64, 1), (16, 128, 2), (8, 128, 1), (4, 64, 1), (16, 256, 4), (16, 64, 1)]
    return [triton.Config({"BLOCK_N": n, "BLOCK_W": w}, num_warps=nw) for n, w, nw in shapes]


def _prune_gemv_configs(configs, named_args, **kwargs):
    args = {**named_args, **kwargs}  # where constexprs arrive differs between Triton versions
    wpg = args["GROUP"] * args["BITS"] // 32  # words per group: a tile holds whole groups
    if not named_args["x_ptr"].is_cuda:
        # Triton's interpreter (CPU tensors) runs programs one by one: few large tiles keep real shapes fast there
        # (tiles no longer than a K-slice, so that each slice gets work)
        slice_w = triton.next_power_of_2(triton.cdiv(args["W"], args["SPLIT"]))
        return [triton.Config({"BLOCK_N": 64, "BLOCK_W": max(wpg, min(512, slice_w))})]
    fit = [c for c in configs if c.kwargs["BLOCK_W"] >= wpg] or [triton.Config({"BLOCK_N": 8, "BLOCK_W": wpg})]
    # batched decode (M > 1) and weights under 4 MiB: not worth compiling and timing every config
    return fit if args["M"] == 1 and args["N"] * args["W"] >= 1 << 20 else fit[:1]


@triton.jit
def _code_plus_one(b_q, i: tl.constexpr, BITS: tl.constexpr):
    """Code i of each int32 word as the fp32 number 1 + c / 2^BITS, without an int -> float conversion (I2F runs
    at a quarter of the FMA rate, enough to cap a GEMV under half the memory bandwidth): the code is shifted to the
    top of the mantissa under the exponent of 1.0. One shift and one and-or per code."""
    POS: tl.constexpr = 23 - BITS
    MASK: tl.constexpr = ((1 << BITS) - 1) << POS
    if POS >= BITS * i:
        t = b_q << (POS - BITS * i)
    else:
        t = b_q >> (BITS * i - POS)
    return ((t & MASK) | 0x3F800000).to(tl.float32, bitcast=True)


@triton.autotune(configs=_gemv_configs(), key=["N", "W", "M", "BITS", "GROUP", "SPLIT"],
                 prune_configs_by={"early_config_prune": _prune_gemv_configs})
@triton.jit
def _qgemv_kernel(x_ptr, qw_ptr, s_ptr, o_ptr, lut_ptr, b_ptr, y_ptr, part_ptr, N, W, stride_xm, stride_qn,
                  stride_sn, stride_ym, M: tl.constexpr, BITS: tl.constexpr, GROUP: tl.constexpr,
                  HAS_OFFSETS: tl.constexpr, HAS_LUT: tl.constexpr, HAS_BIAS: tl.constexpr, ZERO: tl.constexpr,
                  M_PAD: tl.constexpr, SPLIT: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr):
    """y[m, n] = sum_k x[m, k] * w[n, k] (+ bias) for m < M <= 8, reading the codes as int32 words (W per row; code
    i of word w is k = w * CPW + i): one program per BLOCK_N rows, looping over tiles of G whole groups, the next
    tile's words, scales and offsets loaded before the current one is computed.

    Per group: sum_k c_k x_k comes from f_k = 1 + c_k / 2^BITS as 2^BITS * (sum f_k x_k - sum x_k), so
    sum_k w_k x_k = s * 2^BITS * sum f_k x_k + (o - s * 2^BITS) * sum x_k: one FMA per code, two per group. The
    zero code folds into the group's offset: o = offset - ZERO * s."""
    CPW: tl.constexpr = 32 // BITS  # codes per word
    WPG: tl.constexpr = GROUP // CPW  # words per group
    G: tl.constexpr = BLOCK_W // WPG  # groups per tile
    i_n = tl.program_id(0).to(tl.int64)
    i_k = tl.program_id(1)  # K-slice: words [start, stop) (all of them when SPLIT == 1)
    o_n = i_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_n = o_n < N
    o_g = tl.arange(0, G)
    o_w = o_g[:, None] * WPG + tl.arange(0, WPG)[None, :]  # [G, WPG]: word offsets within a tile
    o_m = tl.arange(0, M_PAD)
    start = i_k * (tl.cdiv(tl.cdiv(W, SPLIT), BLOCK_W) * BLOCK_W)
    stop = tl.minimum(start + tl.cdiv(tl.cdiv(W, SPLIT), BLOCK_W) * BLOCK_W, W)
    num_groups = stop // WPG
    p_q = qw_ptr + o_n[:, None, None] * stride_qn + o_w[None, :, :]
    p_s = o_n[:, None] * stride_sn + o_g[None, :]
    b_q = tl.load(p_q + start, mask=m_n[:, None, None] & ((start + o_w) < stop)[None], other=0)
    m_ng = m_n[:, None] & ((start // WPG + o_g) < num_groups)[None, :]
    b_s = tl.load(s_ptr + p_s + start // WPG, mask=m_ng, other=0.0)
    b_o = tl.load(o_ptr + p_s + start // WPG, mask=m_ng, other=0.0) if HAS_OFFSETS else b_s
    acc1 = tl.zeros((BLOCK_N, G), dtype=tl.float32)  # M == 1: reduced over the groups once, after the loop
    acc = tl.zeros((M_PAD, BLOCK_N), dtype=tl.float32)  # M > 1
    for w0 in range(start, stop, BLOCK_W):
        w1 = w0 + BLOCK_W
        n_q = tl.load(p_q + w1, mask=m_n[:, None, None] & ((w1 + o_w) < stop)[None], other=0)
        m_ng = m_n[:, None] & ((w1 // WPG + o_g) < num_groups)[None, :]
        n_s = tl.load(s_ptr + p_s + w1 // WPG, mask=m_ng, other=0.0)
        n_o = tl.load(o_ptr + p_s + w1 // WPG, mask=m_ng, other=0.0) if HAS_OFFSETS else n_s
        b_s = b_s.to(tl.float32)
        b_o = b_o.to(tl.float32) if HAS_OFFSETS else tl.zeros_like(b_s)
        if ZERO != 0:
            b_o -= ZERO * b_s
        m_w = (w0 + o_w) < stop
        for m in tl.static_range(M):
            part = tl.zeros((BLOCK_N, G, WPG), dtype=tl.float32)
            x_sum = tl.zeros((G, WPG), dtype=tl.float32)
            for i in tl.static_range(CPW):
                b_x = tl.load(x_ptr + m * stride_xm + (w0 + o_w) * CPW + i, mask=m_w, other=0.0).to(tl.float32)
                if HAS_LUT:
                    part += tl.load(lut_ptr + ((b_q >> (BITS * i)) & 0xF)) * b_x[None]
                else:
                    part += _code_plus_one(b_q, i, BITS) * b_x[None]
                x_sum += b_x
            x_g = tl.sum(x_sum, axis=1)[None, :]
            if HAS_LUT:
                y_g = tl.sum(part, axis=2) * b_s + x_g * b_o
            else:
                s_top = b_s * (1 << BITS)
                y_g = tl.sum(part, axis=2) * s_top + x_g * (b_o - s_top)
            if M == 1:
                acc1 += y_g
            else:
                acc += tl.where(o_m[:, None] == m, tl.sum(y_g, axis=1)[None, :], 0.0)
        b_q, b_s, b_o = n_q, n_s, n_o
    if M == 1:
        acc += tl.sum(acc1, axis=1)[None, :]
    if HAS_BIAS:
        b_b = tl.load(b_ptr + o_n, mask=m_n, other=0.0).to(tl.float32)[None, :]
        acc += tl.where(i_k == 0, b_b, 0.0)
    m_y = (o_m[:, None] < M) & m_n[None, :]
    if SPLIT == 1:
        tl.store(y_ptr + o_m[:, None] * stride_ym + o_n[None, :], acc.to(y_ptr.dtype.element_ty), mask=m_y)
    else:  # fp32 partial sums part[i_k, m, n], added up in a fixed order by _split_sum_kernel (deterministic)
        tl.store(part_ptr + (i_k * M + o_m[:, None]) * N + o_n[None, :], acc, mask=m_y)


@triton.jit
def _split_sum_kernel(part_ptr, y_ptr, N, stride_ym, M: tl.constexpr, SPLIT: tl.constexpr, SPLIT_PAD: tl.constexpr,
                      BLOCK: tl.constexpr):
    """y[m, n] = sum over the SPLIT partial sums part[:, m, n]: grid (cdiv(N, BLOCK), M)."""
    i_m = tl.program_id(1)
    o_n = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    o_k = tl.arange(0, SPLIT_PAD)
    p = part_ptr + (o_k[:, None] * M + i_m) * N + o_n[None, :]
    b = tl.load(p, mask=(o_k < SPLIT)[:, None] & (o_n < N)[None, :], other=0.0)
    tl.store(y_ptr + i_m * stride_ym + o_n, tl.sum(b, axis=0).to(y_ptr.dtype.element_ty), mask=o_n < N)


@triton.jit
def _dequant_kernel(qw_ptr, s_ptr, o_ptr, lut_ptr, w_ptr, N, K, stride_qn, stride_sn, stride_wn,
                    BITS: tl.constexpr, GROUP: tl.constexpr, HAS_OFFSETS: tl.constexpr, HAS_LUT: tl.constexpr,
                    ZERO: tl.constexpr, TILED: tl.constexpr, BLOCK_N: tl.constexpr):
    """w[n, k] for one group column and BLOCK_N rows per program: grid (cdiv(N, BLOCK_N), K // GROUP). 4-bit: the
    two nibbles of a byte are joined in registers, so each row's GROUP outputs are one contiguous store. TILED:
    qweight in gemv_mma.tile_words' order (byte b of row n in word b // 4 of step b // 64 of tile n // 16)."""
    CPB: tl.constexpr = 8 // BITS
    GB: tl.constexpr = GROUP // CPB
    i_n = tl.program_id(0).to(tl.int64)
    i_g = tl.program_id(1).to(tl.int64)
    o_n = i_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_n = o_n < N
    o_b = tl.arange(0, GB)
    if TILED:
        b = i_g * GB + o_b[None, :]
        n = o_n[:, None]
        p_q = (((n // 16) * (K // 128) + b // 64) * 256 + (n % 16) * 16 + (b % 64) // 4) * 4 + b % 4
    else:
        p_q = o_n[:, None] * stride_qn + i_g * GB + o_b[None, :]
    b_q = tl.load(qw_ptr + p_q, mask=m_n[:, None], other=0)
    b_s = tl.load(s_ptr + o_n * stride_sn + i_g, mask=m_n, other=0.0).to(tl.float32)[:, None]
    b_o = 0.0
    if HAS_OFFSETS:
        b_o = tl.load(o_ptr + o_n * stride_sn + i_g, mask=m_n, other=0.0).to(tl.float32)[:, None]
    if BITS == 4:
        c = tl.reshape(tl.join(b_q & 0xF, b_q >> 4), (BLOCK_N, GROUP))  # [n, 2 j + h] = nibble h of byte j
        c = tl.load(lut_ptr + c.to(tl.int32)) if HAS_LUT else c.to(tl.float32)
    else:
        c = b_q.to(tl.float32)
    p_w = w_ptr + o_n[:, None] * stride_wn + i_g * GROUP + tl.arange(0, GROUP)[None, :]
    tl.store(p_w, ((c - ZERO) * b_s + b_o).to(w_ptr.dtype.element_ty), mask=m_n[:, None])


def _kernel_ok(qw: QuantWeight) -> bool:
    g = qw.group
    return 16 <= g <= 1024 and g & (g - 1) == 0


@functools.cache
def _bf16x2_arith(device: torch.device) -> bool:
    """Whether the GPU has packed bf16 FMA and bf16 mma.sync (sm_80+: A100, RTX 30xx/40xx, H100): kernels/gemv4.py
    and kernels/gemv_mma.py need it."""
    return torch.cuda.get_device_capability(device)[0] >= 8


def tileable(qw: QuantWeight) -> bool:
    """Whether the weight's layout has a tiled form (and so the tensor-core GEMV)."""
    return qw.bits == 4 and qw.lut is None and qw.group % 128 == 0 and qw.shape[0] % 16 == 0


def tiles(qw: QuantWeight) -> bool:
    """Whether tile() tiles qw: a tileable row-major weight on an sm_80+ GPU."""
    return not qw.tiled and tileable(qw) and qw.device.type == "cuda" and _bf16x2_arith(qw.device)


def tile(qw: QuantWeight) -> QuantWeight:
    """The weight as decode reads it fastest: tiled on an sm_80+ GPU when tileable (the same bytes, reordered; the
    loader calls this), else unchanged."""
    if not tiles(qw):
        return qw
    return QuantWeight(tile_words(qw.qweight), qw.scales, qw.offsets, None, 4, qw.group, qw.shape, qw.zero, True)


def gate_up_order(n: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """The rows of a fused [gate; up] projection (n = 2I, I % 8 == 0) in the order gate 0-7, up 0-7, gate 8-15, up
    8-15, ...: each 16-row tile of the tensor-core GEMV then holds the gate and up rows its SiLU epilogue pairs."""
    return torch.arange(n, device=device).view(2, n // 16, 8).transpose(0, 1).reshape(n)


def interleave_gate_up(qw: QuantWeight) -> QuantWeight:
    """A row-major fused [gate; up] weight with its rows in gate_up_order (a bias must be reordered the same way).
    silu_mul_interleaved undoes the order on a full output."""
    assert not qw.tiled and qw.shape[0] % 16 == 0
    idx = gate_up_order(qw.shape[0], qw.device)
    return QuantWeight(qw.qweight[idx], qw.scales[idx], None if qw.offsets is None else qw.offsets[idx], qw.lut,
                       qw.bits, qw.group, qw.shape, qw.zero)


def silu_mul_interleaved(y: torch.Tensor) -> torch.Tensor:
    """[..., 2I] in interleave_gate_up's row order -> silu(gate) * up [..., I] (in fp32, rounded once)."""
    v = y.float().unflatten(-1, (-1, 2, 8))
    return (F.silu(v[..., 0, :]) * v[..., 1, :]).flatten(-2).to(y.dtype)


def _mma_ok(x: torch.Tensor, qw: QuantWeight) -> bool:
    return ("mma" in GEMV_KERNELS and x.dtype == torch.bfloat16 and qw.bits == 4 and qw.lut is None
            and qw.group % 128 == 0 and (not x.is_cuda or _bf16x2_arith(x.device)))


def _gemv4_ok(x: torch.Tensor, qw: QuantWeight) -> bool:
    return ("gemv4" in GEMV_KERNELS and x.shape[0] == 1 and x.dtype == torch.bfloat16 and qw.bits == 4
            and qw.lut is None and qw.group % 32 == 0 and not qw.tiled and (not x.is_cuda or _bf16x2_arith(x.device)))


def qgemv(x: torch.Tensor, qw: QuantWeight, bias: torch.Tensor | None = None, out: torch.Tensor | None = None,
          split: int = 1, silu: bool = False) -> torch.Tensor:
    """x: [M, K] with M <= GEMV_MAX_ROWS -> [M, N] in x.dtype (fused dequantize + GEMV), into `out` if given.
    bf16 rows against a 4-bit weight without a code table in groups of 128k run kernels/gemv_mma.py (tensor cores;
    the only kernel for a tiled weight, which other rows dequantize for); one bf16 row against other 4-bit groups
    kernels/gemv4.py (packed bf16x2 arithmetic); the rest the fp32 kernel above. split (gemv4 and the fp32 kernel):
    K-slices run as separate programs, then summed in a fixed order (on the H200 gemv4 ran down_proj in 36 us
    unsplit, 40 us at split 4: bench/RESULTS.md). silu: qw's rows in interleave_gate_up's order, -> silu(gate) * up
    [M, N / 2] (tensor-core kernel only)."""
    M, K = x.shape
    N = qw.shape[0]
    assert 1 <= M <= GEMV_MAX_ROWS and K == qw.shape[1], f"x {tuple(x.shape)} vs weight {qw.shape}"
    assert _kernel_ok(qw), f"group {qw.group} must be a power of two in [16, 1024]"
    assert x.stride(1) == 1 and qw.qweight.is_contiguous() and qw.scales.is_contiguous()
    assert x.device == qw.device and (bias is None or bias.shape == (N,))
    if silu:  # the tensor-core kernel's epilogue; else the full output, then the SiLU
        if not _mma_ok(x, qw):
            y = silu_mul_interleaved(qgemv(x, qw, bias))
            return y if out is None else out.copy_(y)
        y = torch.empty(M, N // 2, dtype=x.dtype, device=x.device) if out is None else out
        return q4mma(x, qw.qweight, qw.scales, qw.offsets, qw.group, qw.zero, qw.tiled, bias, y, silu=True)
    y = torch.empty(M, N, dtype=x.dtype, device=x.device) if out is None else out
    assert y.shape == (M, N) and y.stride(1) == 1
    if _mma_ok(x, qw):
        return q4mma(x, qw.qweight, qw.scales, qw.offsets, qw.group, qw.zero, qw.tiled, bias, y)
    if qw.tiled:  # rows the tensor-core kernel does not take (fp32 ones)
        y.copy_(F.linear(x, dequantize(qw, x.dtype), bias))
        return y
    s = qw.scales
    o = s if qw.offsets is None else qw.offsets
    b = s if bias is None else bias
    qw32 = qw.qweight.view(torch.int32)  # little-endian: byte j of a word holds codes 4j.. of the word, in k order
    W = qw32.shape[1]
    four = _gemv4_ok(x, qw)
    part = torch.empty(split, M, N, dtype=torch.float32, device=x.device) if split > 1 else y
    if four:
        _q4gemv_kernel[lambda meta: (triton.cdiv(N, meta["BLOCK_N"]), split)](
            x.view(torch.int32), qw32, s, o, b, y, part, N, W, qw32.stride(0), s.stride(0), GROUP=qw.group,
            HAS_OFFSETS=qw.offsets is not None, HAS_BIAS=bias is not None, ZERO=qw.zero, SPLIT=split,
            USE_ASM=x.is_cuda)
    else:
        _qgemv_kernel[lambda meta: (triton.cdiv(N, meta["BLOCK_N"]), split)](
            x, qw32, s, o, s if qw.lut is None else qw.lut, b, y, part, N, W, x.stride(0), qw32.stride(0),
            s.stride(0), y.stride(0), M=M, BITS=qw.bits, GROUP=qw.group, HAS_OFFSETS=qw.offsets is not None,
            HAS_LUT=qw.lut is not None, HAS_BIAS=bias is not None, ZERO=qw.zero, M_PAD=triton.next_power_of_2(M),
            SPLIT=split)
    if split > 1:
        _split_sum_kernel[(triton.cdiv(N, 1024), M)](part, y, N, y.stride(0), M=M, SPLIT=split,
                                                     SPLIT_PAD=triton.next_power_of_2(split), BLOCK=1024)
    return y


def dequantize(qw: QuantWeight, dtype: torch.dtype, rows: tuple[int, int] | None = None,
               out: torch.Tensor | None = None) -> torch.Tensor:
    """Rows [start, stop) of the weight (all by default) dequantized by the Triton kernel -> [stop - start, K]."""
    start, stop = rows or (0, qw.shape[0])
    assert 0 <= start < stop <= qw.shape[0] and _kernel_ok(qw)
    assert not qw.tiled or start % 16 == stop % 16 == 0, "a tiled weight's rows come in whole 16-row tiles"
    N, K = stop - start, qw.shape[1]
    w = torch.empty(N, K, dtype=dtype, device=qw.device) if out is None else out
    assert w.shape == (N, K) and w.stride(1) == 1
    s = qw.scales[start:stop]
    block_n = 32
    _dequant_kernel[(triton.cdiv(N, block_n), K // qw.group)](
        qw.qweight[start:stop], s, s if qw.offsets is None else qw.offsets[start:stop],
        s if qw.lut is None else qw.lut, w, N, K, qw.qweight.stride(0), s.stride(0), w.stride(0), BITS=qw.bits,
        GROUP=qw.group, HAS_OFFSETS=qw.offsets is not None, HAS_LUT=qw.lut is not None, ZERO=qw.zero,
        TILED=qw.tiled, BLOCK_N=block_n)
    return w


def qlinear(x: torch.Tensor, weight: QuantWeight | list[QuantWeight], bias: torch.Tensor | None = None) -> torch.Tensor:
    """x: [..., K] -> [..., N] in x.dtype through one weight, or a list of weights stacked along N that keep their own
    layouts (QuantLinear's parts). Triton on CUDA tensors (qlinear_triton, qlinear_parts_triton); on CPU tensors
    qlinear_ref, rounded to x.dtype."""
    if x.is_cuda:
        if isinstance(weight, list):
            return qlinear_parts_triton(x, weight, bias)
        return qlinear_triton(x, weight, bias)
    return qlinear_ref(x, weight, bias).to(x.dtype)


def qlinear_triton(x: torch.Tensor, qw: QuantWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x: [..., K] -> [..., N] in x.dtype. Fewer than DEQUANT_MIN_ROWS rows: the fused GEMV (8 rows per launch); more
    (prefill): the weight dequantized to x.dtype in row blocks of DEQUANT_BLOCK bytes, each through cuBLAS."""
    K = qw.shape[1]
    assert x.shape[-1] == K, f"x has {x.shape[-1]} features, the weight {K}"
    x2 = x.reshape(-1, K)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    M, N = x2.shape[0], qw.shape[0]
    if M == 0:  # a prefill chunk that samples no row asks lm_head for nothing
        return x.new_empty(*x.shape[:-1], N)
    if not _kernel_ok(qw):
        return qlinear_ref(x, qw, bias).to(x.dtype)
    if M < DEQUANT_MIN_ROWS:
        y = torch.cat([qgemv(x2[i:i + GEMV_MAX_ROWS], qw, bias) for i in range(0, M, GEMV_MAX_ROWS)]) \
            if M > GEMV_MAX_ROWS else qgemv(x2, qw, bias)
    else:
        y = dequant_matmul(x2, qw, bias)
    return y.view(*x.shape[:-1], N)


def dequant_matmul(x: torch.Tensor, qw: QuantWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, K] @ weight.T -> [M, N] in x.dtype: the weight dequantized DEQUANT_BLOCK bytes of rows at a time (whole
    16-row tiles), each block one cuBLAS GEMM; nothing weight-sized is allocated."""
    (N, K), M = qw.shape, x.shape[0]
    step = max(16, DEQUANT_BLOCK // (K * x.element_size()) // 16 * 16)
    if step >= N:
        return F.linear(x, dequantize(qw, x.dtype), bias)
    y = torch.empty(M, N, dtype=x.dtype, device=x.device)
    for start in range(0, N, step):
        stop = min(N, start + step)
        y[:, start:stop] = F.linear(x, dequantize(qw, x.dtype, (start, stop)),
                                    None if bias is None else bias[start:stop])
    return y


def qlinear_parts_triton(x: torch.Tensor, parts: list[QuantWeight],
                         bias: torch.Tensor | None = None) -> torch.Tensor:
    """x: [..., K] -> [..., N] in x.dtype through weights stacked along N that keep their own layouts (q/k/v of
    different GGUF types, where one concat_rows would widen all of them to the widest): up to GEMV_MAX_ROWS rows, one
    fused GEMV per part into its columns of one output; more, one qlinear per part. bias: [N], split likewise."""
    K = x.shape[-1]
    x2 = x.reshape(-1, K)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    sizes = [p.shape[0] for p in parts]
    biases = [None] * len(parts) if bias is None else bias.split(sizes)
    M, N = x2.shape[0], sum(sizes)
    if 1 <= M <= GEMV_MAX_ROWS and all(_kernel_ok(p) for p in parts):
        y = torch.empty(M, N, dtype=x.dtype, device=x.device)
        start = 0
        for p, b in zip(parts, biases, strict=True):
            qgemv(x2, p, b, out=y[:, start:start + p.shape[0]])
            start += p.shape[0]
    else:
        y = torch.cat([qlinear_triton(x2, p, b) for p, b in zip(parts, biases, strict=True)], dim=1)
    return y.view(*x.shape[:-1], N)


def qlinear_ref(x: torch.Tensor, weight: QuantWeight | list[QuantWeight],
                bias: torch.Tensor | None = None) -> torch.Tensor:
    """The oracle and the CPU path: dequantize in fp32 (parts stacked along N) and matmul in fp32 -> [..., N] fp32."""
    parts = weight if isinstance(weight, list) else [weight]
    w = torch.cat([p.dequantize(torch.float32) for p in parts]) if len(parts) > 1 else parts[0].dequantize()
    y = x.float() @ w.T
    return y if bias is None else y + bias.float()


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Integer codes [N, K] (0..2^bits-1) -> qweight uint8 in the internal layout."""
    codes = codes.to(torch.uint8)
    if bits == 8:
        return codes.contiguous()
    return (codes[:, 0::2] | (codes[:, 1::2] << 4)).contiguous()


def concat_rows(parts: list[QuantWeight]) -> QuantWeight:
    """Stack weights along N (q/k/v into qkv): exact, and no larger than the parts, when they share one layout (the
    loader fuses only those). Parts of different layouts meet in the widest one: 8-bit codes if any part has them,
    the smallest group (scales repeated), offsets where any part has them (zeros elsewhere); parts of different zero
    codes get offsets -zero * scale (+ their own offsets, rounded to float16 once) and zero 0."""
    if len({None if p.lut is None else tuple(p.lut.tolist()) for p in parts}) > 1:
        raise ValueError("cannot fuse weights with different code tables (lut)")
    k = parts[0].shape[1]
    assert all(p.shape[1] == k for p in parts), f"parts disagree on K: {[p.shape for p in parts]}"
    bits = max(p.bits for p in parts)
    group = min(p.group for p in parts)
    zero = parts[0].zero if len({p.zero for p in parts}) == 1 else 0
    any_offsets = any(p.offsets is not None or p.zero != zero for p in parts)
    assert not any(p.tiled for p in parts), "concat_rows takes row-major parts (tile the result)"
    qweights, scales, offsets = [], [], []
    for p in parts:
        qweights.append(p.qweight if p.bits == bits else pack_codes(p.codes(), bits))
        scales.append(p.scales.repeat_interleave(p.group // group, dim=1))
        if any_offsets:
            o = p.offsets if p.offsets is not None else torch.zeros_like(p.scales)
            if p.zero != zero:
                o = (o.float() - p.zero * p.scales.float()).half()
            offsets.append(o.repeat_interleave(p.group // group, dim=1))
    n = sum(p.shape[0] for p in parts)
    return QuantWeight(torch.cat(qweights), torch.cat(scales), torch.cat(offsets) if any_offsets else None,
                       parts[0].lut, bits, group, (n, k), zero)


def quantize_rtn(w: torch.Tensor, bits: int = 4, group: int = 128, device: torch.device | str | None = None,
                 chunk_rows: int = 4096) -> QuantWeight:
    """Round-to-nearest asymmetric group quantization of w [N, K] (min/max per group -> scales and offsets), for
    8-bit embeddings / lm_head, tests and the benchmark. Works chunk_rows rows at a time on `device` (default:
    w's), so a large bf16 host tensor never exists there in fp32 at once."""
    n, k = w.shape
    assert k % group == 0, f"group {group} must divide K={k}"
    device = w.device if device is None else device
    qweight = torch.empty(n, k * bits // 8, dtype=torch.uint8, device=device)
    scales = torch.empty(n, k // group, dtype=torch.float16, device=device)
    offsets = torch.empty_like(scales)
    qmax = 2 ** bits - 1
    for start in range(0, n, chunk_rows):
        wg = w[start:start + chunk_rows].to(device).float().view(-1, k // group, group)
        lo, hi = wg.amin(-1), wg.amax(-1)
        scale = ((hi - lo) / qmax).clamp_min(1e-8).half()
        offset = lo.half()
        codes = ((wg - offset.float()[..., None]) / scale.float()[..., None]).round_().clamp_(0, qmax)
        qweight[start:start + chunk_rows] = pack_codes(codes.view(-1, k), bits)
        scales[start:start + chunk_rows], offsets[start:start + chunk_rows] = scale, offset
    return QuantWeight(qweight, scales, offsets, None, bits, group, (n, k))
