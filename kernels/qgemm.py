"""A 4-bit GEMM: y [M, N] = x [M, K] @ w.T for many rows against a group-quantized weight in
kernels/qlinear.py's layout (4 or 8 bits, row-major or tiled), dequantized in registers and multiplied on the tensor
cores with fp32 accumulation; no bf16 copy of the weight is ever written.

Why it is cheap: the weight is the A operand of each tl.dot (a [BLOCK_N, BLOCK_K] tile in registers, where Hopper's
wgmma takes it from, so no shared-memory round trip for it) and x^T the B operand. A k-step spans at most one
quantization group, so without a code table the tile holds the raw integer codes (exact in bf16 / fp16) and the
group's scale and offset apply once per output after the dot: sum_k w_k x_k = s * sum_k c_k x_k + (o - z s) sum_k x_k.
Per weight element that is a nibble unpack and one int -> float conversion, shared by all BLOCK_M rows of x. A code
table (NF4) instead dequantizes each element to x's dtype before the dot. Plus qgemm_ref, the test oracle.

Not in qlinear's dispatch: on an H100 (bench/RESULTS.md, 2026-12-05) it took about 5x a bf16 cuBLAS GEMM of the same
shape, where dequantizing the weight in blocks and calling cuBLAS took 1.1-2x. Kept, tested, for tuning
(bench/gemm_lab.py).
"""

import torch
import triton
import triton.language as tl


def _configs() -> list[triton.Config]:
    # (BLOCK_N, BLOCK_M, BLOCK_K, warps, stages): leads for Hopper / Ada to be swept on the GPU (bench/gemm_lab.py);
    # the M bucket prunes those whose BLOCK_M would mostly be padding
    shapes = [(128, 16, 128, 4, 4), (128, 32, 128, 4, 4), (128, 64, 128, 4, 3), (128, 128, 64, 8, 3),
              (256, 64, 64, 8, 3), (256, 128, 64, 8, 3), (64, 64, 128, 4, 4)]
    return [triton.Config({"BLOCK_N": n, "BLOCK_M": m, "BLOCK_K": k}, num_warps=w, num_stages=s)
            for n, m, k, w, s in shapes]


def _prune(configs, named_args, **kwargs):
    args = {**named_args, **kwargs}
    group, m_bucket = args["GROUP"], args["M_BUCKET"]
    if not named_args["x_ptr"].is_cuda:  # the interpreter runs programs one by one: few, large ones
        block_n = min(4096, triton.next_power_of_2(args["N"]))
        return [triton.Config({"BLOCK_N": block_n, "BLOCK_M": min(64, m_bucket), "BLOCK_K": min(128, group)})]
    fit = []
    for c in configs:
        kw = dict(c.kwargs, BLOCK_K=min(c.kwargs["BLOCK_K"], group))  # a k-step never spans two groups
        if kw["BLOCK_M"] <= max(16, m_bucket):
            fit.append(triton.Config(kw, num_warps=c.num_warps, num_stages=c.num_stages))
    return fit


@triton.autotune(configs=_configs(), key=["M_BUCKET", "N", "K", "GROUP", "BITS", "HAS_LUT", "TILED"],
                 prune_configs_by={"early_config_prune": _prune})
@triton.jit(do_not_specialize=["M"])
def _qgemm_kernel(x_ptr, qw_ptr, s_ptr, o_ptr, lut_ptr, b_ptr, y_ptr, M, N, K, M_BUCKET, stride_xm, stride_qn,
                  stride_sn, stride_ym, BITS: tl.constexpr, GROUP: tl.constexpr, HAS_OFFSETS: tl.constexpr,
                  HAS_LUT: tl.constexpr, HAS_BIAS: tl.constexpr, ZERO: tl.constexpr, TILED: tl.constexpr,
                  DOT_F32: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """Grid (cdiv(M, BLOCK_M) * cdiv(N, BLOCK_N),): program i computes y^T for BLOCK_N weight rows x BLOCK_M rows of
    x, the M blocks of one weight block in consecutive programs (so the weight block is read from L2 after the
    first). TILED: qweight in gemv_mma.tile_words' order (byte b of row n in the 1 KB step b // 64 of tile n // 16).
    DOT_F32: fp32 operands and IEEE products (fp32 x; Triton's interpreter, whose tl.dot cannot multiply bf16)."""
    i_p = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    i_m = i_p % num_m
    i_n = (i_p // num_m).to(tl.int64)
    o_m = i_m * BLOCK_M + tl.arange(0, BLOCK_M)
    o_n = i_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_m = o_m < M
    r_n = tl.minimum(o_n, N - 1)  # weight rows clamped in range: rows past N are computed and never stored
    o_k = tl.arange(0, BLOCK_K)
    CPB: tl.constexpr = 8 // BITS  # codes per byte
    o_b = tl.arange(0, BLOCK_K // CPB)
    p_x = x_ptr + o_m.to(tl.int64)[None, :] * stride_xm + o_k[:, None]  # x^T block [BLOCK_K, BLOCK_M]
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        b = k0 // CPB + o_b  # this step's bytes of each row
        if TILED:
            p_q = ((r_n[:, None] // 16) * (K // 128) + b[None, :] // 64) * 1024 + (r_n[:, None] % 16) * 64 + b % 64
        else:
            p_q = r_n[:, None] * stride_qn + b[None, :]
        b_q = tl.load(qw_ptr + p_q)
        if BITS == 4:  # [n, 2 j + h] = nibble h of byte j: code k0 + 2 j + h
            c = tl.reshape(tl.join(b_q & 0xF, b_q >> 4), (BLOCK_N, BLOCK_K))
        else:
            c = b_q
        b_x = tl.load(p_x + k0, mask=m_m[None, :], other=0.0)
        g = k0 // GROUP
        b_s = tl.load(s_ptr + r_n * stride_sn + g).to(tl.float32)
        if HAS_OFFSETS:
            b_o = tl.load(o_ptr + r_n * stride_sn + g).to(tl.float32)
        else:
            b_o = tl.zeros_like(b_s)
        if HAS_LUT:  # dequantize each element, then one dot
            w = (tl.load(lut_ptr + c.to(tl.int32)) - ZERO) * b_s[:, None] + b_o[:, None]
            if DOT_F32:
                acc += tl.dot(w, b_x.to(tl.float32), input_precision="ieee")
            else:
                acc += tl.dot(w.to(x_ptr.dtype.element_ty), b_x)
        else:  # the codes themselves (exact), the group's scale and offset after the dot
            if DOT_F32:
                part = tl.dot(c.to(tl.float32), b_x.to(tl.float32), input_precision="ieee")
            else:
                part = tl.dot(c.to(x_ptr.dtype.element_ty), b_x)
            x_sum = tl.sum(b_x.to(tl.float32), axis=0)
            acc += part * b_s[:, None] + (b_o - ZERO * b_s)[:, None] * x_sum[None, :]
    if HAS_BIAS:
        acc += tl.load(b_ptr + r_n).to(tl.float32)[:, None]
    p_y = y_ptr + o_m.to(tl.int64)[None, :] * stride_ym + o_n[:, None]
    tl.store(p_y, acc.to(y_ptr.dtype.element_ty), mask=m_m[None, :] & (o_n < N)[:, None])


def qgemm(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor | None,
          lut: torch.Tensor | None, bits: int, group: int, zero: int, tiled: bool, bias: torch.Tensor | None = None,
          out: torch.Tensor | None = None) -> torch.Tensor:
    """y [M, N] = x [M, K] @ w.T (+ bias) in x.dtype, w [N, K] stored as kernels/qlinear.py's QuantWeight fields
    (qweight uint8 [N, K * bits / 8], row-major or tiled; scales / offsets fp16 [N, K / group]; lut fp32 [16]; zero
    code); group a power of two in [16, 1024]. CUDA tensors run the kernel; CPU tensors run it in Triton's
    interpreter (the CPU path is qgemm_ref)."""
    M, K = x.shape
    N = qweight.shape[0]
    assert bits in (4, 8) and qweight.shape == (N, K * bits // 8) and qweight.dtype == torch.uint8
    assert 16 <= group <= 1024 and group & (group - 1) == 0 and K % group == 0 and scales.shape == (N, K // group)
    assert not tiled or (bits == 4 and group % 128 == 0 and N % 16 == 0), "a tiled weight is 4-bit, group 128k"
    assert x.stride(1) == 1 and qweight.is_contiguous() and scales.is_contiguous()
    assert (offsets is None or offsets.is_contiguous()) and (bias is None or bias.shape == (N,))
    y = torch.empty(M, N, dtype=x.dtype, device=x.device) if out is None else out
    assert y.shape == (M, N) and y.stride(1) == 1
    if M == 0:
        return y
    m_bucket = min(128, triton.next_power_of_2(max(M, 16)))
    _qgemm_kernel[lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)](
        x, qweight, scales, scales if offsets is None else offsets, scales if lut is None else lut,
        scales if bias is None else bias, y, M, N, K, m_bucket, x.stride(0), qweight.stride(0), scales.stride(0),
        y.stride(0), BITS=bits, GROUP=group, HAS_OFFSETS=offsets is not None, HAS_LUT=lut is not None,
        HAS_BIAS=bias is not None, ZERO=zero, TILED=tiled, DOT_F32=x.dtype == torch.float32 or not x.is_cuda)
    return y


def qgemm_ref(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """The oracle: x [M, K] @ w.T in fp32, w [N, K] the dequantized weight (QuantWeight.dequantize) -> [M, N] fp32."""
    y = x.float() @ w.float().T
    return y if bias is None else y + bias.float()
