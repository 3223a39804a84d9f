"""TriAttention key scores from post-RoPE keys (TRIATTENTION.md section 3), a Triton kernel and its references.

score_h(key) = mean_d sum_f |mu_f| |k_f| cos(omega_f (t - p + d) + arg mu_f - arg k_f) + sum_f (A_f - |mu_f|) |k_f|.
With the cached key already rotated (k_rot_f = k_f e^{i omega_f p}) the position drops out, and the mean over the
offsets d folds into one complex factor per band, E_f = mean_d e^{i omega_f (t + d)}, so the trig term is the dot
product of the key with an "expected query" mu_f E_f: the kernel reads each key once and does one FMA pass.
Pairing is the "half" layout (band f = dims f and f + D/2). It does not aggregate or select (openclaw.evict.evictor does).
"""

import torch
import triton
import triton.language as tl

OFFSETS = tuple(2 ** i for i in range(17))  # 1, 2, 4, ..., 65536


@triton.jit(do_not_specialize=["n"])
def _tri_score_kernel(k_ptr, qr_ptr, qi_ptr, w_ptr, out_ptr, n, stride_kl, stride_kn, stride_kh,
                      H: tl.constexpr, HKV: tl.constexpr, F: tl.constexpr, G: tl.constexpr,
                      BLOCK_N: tl.constexpr, BLOCK_F: tl.constexpr):
    i_lg = tl.program_id(0).to(tl.int64)
    i_n = tl.program_id(1).to(tl.int64)
    i_l = i_lg // HKV
    i_g = i_lg % HKV
    o_n = i_n * BLOCK_N + tl.arange(0, BLOCK_N)
    o_f = tl.arange(0, BLOCK_F)
    m_n = o_n < n
    m_f = o_f < F
    m_k = m_n[:, None] & m_f[None, :]
    p_k = k_ptr + i_l * stride_kl + o_n[:, None] * stride_kn + i_g * stride_kh + o_f[None, :]
    b_re = tl.load(p_k, mask=m_k, other=0.0).to(tl.float32)
    b_im = tl.load(p_k + F, mask=m_k, other=0.0).to(tl.float32)
    b_abs = tl.sqrt(b_re * b_re + b_im * b_im)
    for j in tl.static_range(G):
        o_q = (i_l * H + i_g * G + j) * F + o_f
        b_qr = tl.load(qr_ptr + o_q, mask=m_f, other=0.0)
        b_qi = tl.load(qi_ptr + o_q, mask=m_f, other=0.0)
        b_w = tl.load(w_ptr + o_q, mask=m_f, other=0.0)
        b_s = tl.sum(b_re * b_qr[None, :] + b_im * b_qi[None, :] + b_abs * b_w[None, :], axis=1)
        tl.store(out_ptr + (i_l * H + i_g * G + j) * n + o_n, b_s, mask=m_n)


def expected_query(mu_re: torch.Tensor, mu_im: torch.Tensor, a_mean: torch.Tensor, omega: torch.Tensor, t: int,
                   offsets=OFFSETS, terms: str = "both") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-head factors of the score: (Re, Im) of mu_f E_f and the norm weight A_f - |mu_f|, each [L, H, F] fp32.

    mu_re, mu_im, a_mean: [L, H, F]; omega: [F]; t: the next query's absolute position. Phases in fp64 because
    omega (t + d) reaches ~1e5 radians.
    """
    phase = omega.double()[None, :] * (t + torch.tensor(offsets, dtype=torch.float64, device=omega.device))[:, None]  # [O, F]
    er, ei = phase.cos().mean(0).float().to(mu_re.device), phase.sin().mean(0).float().to(mu_re.device)
    qr, qi = mu_re * er - mu_im * ei, mu_re * ei + mu_im * er
    w = a_mean - torch.sqrt(mu_re ** 2 + mu_im ** 2)
    if terms == "norm":
        qr, qi = torch.zeros_like(qr), torch.zeros_like(qi)
    if terms == "trig":
        w = torch.zeros_like(w)
    return qr.float().contiguous(), qi.float().contiguous(), w.float().contiguous()


def tri_score(keys: torch.Tensor, mu_re: torch.Tensor, mu_im: torch.Tensor, a_mean: torch.Tensor,
              omega: torch.Tensor, t: int, offsets=OFFSETS, terms: str = "both") -> torch.Tensor:
    """keys: [L, n, Hkv, D] post-RoPE (a view of the pool is fine); stats [L, H, F] -> scores [L, H, n] fp32.
    Triton on CUDA tensors, tri_score_ref on CPU tensors."""
    score = tri_score_triton if keys.is_cuda else tri_score_ref
    return score(keys, mu_re, mu_im, a_mean, omega, t, offsets, terms)


def tri_score_triton(keys: torch.Tensor, mu_re: torch.Tensor, mu_im: torch.Tensor, a_mean: torch.Tensor,
                     omega: torch.Tensor, t: int, offsets=OFFSETS, terms: str = "both",
                     out: torch.Tensor | None = None) -> torch.Tensor:
    """tri_score as one Triton launch (CPU tensors run in Triton's interpreter), into out when given."""
    L, n, hkv, D = keys.shape
    H, F = mu_re.shape[1], D // 2
    assert keys.stride(-1) == 1 and D % 2 == 0 and mu_re.shape == (L, H, F) and H % hkv == 0
    qr, qi, w = expected_query(mu_re, mu_im, a_mean, omega, t, offsets, terms)
    if out is None:
        out = torch.empty(L, H, n, dtype=torch.float32, device=keys.device)
    assert out.shape == (L, H, n) and out.dtype == torch.float32 and out.is_contiguous()
    block_n = 64
    grid = (L * hkv, triton.cdiv(n, block_n))
    _tri_score_kernel[grid](keys, qr, qi, w, out, n, keys.stride(0), keys.stride(1), keys.stride(2),
                            H=H, HKV=hkv, F=F, G=H // hkv, BLOCK_N=block_n, BLOCK_F=triton.next_power_of_2(F))
    return out


def _bands(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    half = x.shape[-1] // 2
    return x[..., :half].float(), x[..., half:].float()


def _series(k_re, k_im, mu_re, mu_im, a_mean, phase, terms) -> torch.Tensor:
    """k_*: [L, n, Hkv, F]; mu_*, a_mean: [L, H, F]; phase: [O, n, F] fp64 -> [L, H, n], the literal formula."""
    L, n, hkv, _ = k_re.shape
    G = mu_re.shape[1] // hkv
    k_abs = torch.sqrt(k_re ** 2 + k_im ** 2).repeat_interleave(G, dim=2).permute(0, 2, 1, 3)  # [L, H, n, F]
    k_arg = torch.atan2(k_im, k_re).repeat_interleave(G, dim=2).permute(0, 2, 1, 3).double()
    mu_abs, mu_arg = torch.sqrt(mu_re ** 2 + mu_im ** 2), torch.atan2(mu_im, mu_re).double()
    trig = torch.zeros(L, mu_re.shape[1], n, dtype=torch.float32, device=k_re.device)
    for ph in phase:  # one offset d at a time: [n, F]
        cos = torch.cos(ph[None, None] + mu_arg[:, :, None] - k_arg).float()
        trig += (mu_abs[:, :, None] * k_abs * cos).sum(-1)
    trig /= len(phase)
    norm = ((a_mean - mu_abs)[:, :, None] * k_abs).sum(-1)
    return {"both": trig + norm, "trig": trig, "norm": norm}[terms]


def tri_score_ref(keys: torch.Tensor, mu_re: torch.Tensor, mu_im: torch.Tensor, a_mean: torch.Tensor,
                  omega: torch.Tensor, t: int, offsets=OFFSETS, terms: str = "both") -> torch.Tensor:
    """Plain-PyTorch tri_score (same folded math, fp32): the oracle and the CPU path."""
    L, n, hkv, D = keys.shape
    G = mu_re.shape[1] // hkv
    qr, qi, w = expected_query(mu_re, mu_im, a_mean, omega, t, offsets, terms)
    k_re, k_im = _bands(keys)
    k_abs = torch.sqrt(k_re ** 2 + k_im ** 2)
    qr, qi, w = (x.view(L, hkv, G, D // 2) for x in (qr, qi, w))
    out = torch.einsum("lngf,lgjf->lgjn", k_re, qr) + torch.einsum("lngf,lgjf->lgjn", k_im, qi)
    out = out + torch.einsum("lngf,lgjf->lgjn", k_abs, w)
    return out.reshape(L, hkv * G, n)


def tri_score_series(keys: torch.Tensor, mu_re: torch.Tensor, mu_im: torch.Tensor, a_mean: torch.Tensor,
                     omega: torch.Tensor, t: int, offsets=OFFSETS, terms: str = "both") -> torch.Tensor:
    """The post-RoPE form written out term by term (one cosine per band and offset): checks the folding."""
    k_re, k_im = _bands(keys)
    n = keys.shape[1]
    phase = (omega.double()[None, :] * (t + torch.tensor(offsets, dtype=torch.float64, device=omega.device))[:, None])[:, None, :]
    return _series(k_re, k_im, mu_re, mu_im, a_mean, phase.expand(-1, n, -1).to(keys.device), terms)


def tri_score_prerope_series(keys_pre: torch.Tensor, positions: torch.Tensor, mu_re: torch.Tensor, mu_im: torch.Tensor,
                          a_mean: torch.Tensor, omega: torch.Tensor, t: int, offsets=OFFSETS,
                          terms: str = "both") -> torch.Tensor:
    """The paper's pre-RoPE form: keys before rotation plus their positions [n]; phase omega (t - p + d)."""
    k_re, k_im = _bands(keys_pre)
    d = torch.tensor(offsets, dtype=torch.float64, device=omega.device)
    dist = t - positions.double().cpu()[None, :] + d[:, None]  # [O, n]
    phase = dist[:, :, None] * omega.double()[None, None, :]
    return _series(k_re, k_im, mu_re, mu_im, a_mean, phase.to(keys_pre.device), terms)
