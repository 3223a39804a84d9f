"""TriAttention scoring: the Triton kernel against the literal series, and the pre-RoPE vs post-RoPE forms."""

import os

import pytest
import torch
from openclaw.kernels.tri_score import (
    expected_query,
    tri_score_prerope_series,
    tri_score_ref,
    tri_score_series,
    tri_score_triton,
)
from openclaw.models.layers import Rope, apply_rope

needs_triton = pytest.mark.skipif(not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1",
                                  reason="Triton needs CUDA or TRITON_INTERPRET=1")

# (L, n, Hkv, H, D): tiny, odd, and Qwen3-32B heads (64 q / 8 KV, head_dim 128) on two layers
SHAPES = [(1, 3, 1, 2, 8), (3, 123, 5, 15, 24), (2, 130, 8, 64, 128)]


def make(L, n, hkv, H, D, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    keys = torch.randn(L, n, hkv, D, generator=g)
    mu_re, mu_im = torch.randn(L, H, D // 2, generator=g), torch.randn(L, H, D // 2, generator=g)
    a = torch.sqrt(mu_re ** 2 + mu_im ** 2) + torch.rand(L, H, D // 2, generator=g)  # A >= |mu|, as for real stats
    omega = Rope(D, {"rope_theta": 1e6, "rope_type": "default"}, 4096).inv_freq
    return [x.to(device) for x in (keys, mu_re, mu_im, a, omega)]


@needs_triton
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("terms", ["both", "trig", "norm"])
def test_kernel_matches_reference(shape, terms):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    keys, mu_re, mu_im, a, omega = make(*shape, device=device)
    L, n, _, H, _ = shape
    out = torch.full((L, H, n), float("nan"), device=device)  # lanes the kernel misses stay NaN and fail
    got = tri_score_triton(keys, mu_re, mu_im, a, omega, t=777, terms=terms, out=out)
    ref = tri_score_ref(keys, mu_re, mu_im, a, omega, t=777, terms=terms)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())


@needs_triton
def test_kernel_reads_half_precision_pool_views():
    """The kernel scores a strided bf16 view of the pool ([L, S, Hkv, D] sliced to one sequence's slots)."""
    keys, mu_re, mu_im, a, omega = make(2, 200, 2, 6, 64)
    pool = torch.zeros(2, 300, 2, 64, dtype=torch.bfloat16)
    pool[:, 40:240] = keys.bfloat16()
    view = pool[:, 40:240]
    ref = tri_score_ref(view.float(), mu_re, mu_im, a, omega, t=5000)
    torch.testing.assert_close(tri_score_triton(view, mu_re, mu_im, a, omega, t=5000), ref, rtol=1e-5, atol=1e-3)


@pytest.mark.parametrize("D", [8, 64, 128])
def test_pre_and_post_rope_forms_agree(D):
    """Scoring rotated keys with phase omega (t + d) equals the paper's pre-RoPE form with omega (t - p + d)."""
    keys_pre, mu_re, mu_im, a, _ = make(2, 50, 2, 4, D, seed=D)
    rope = Rope(D, {"rope_theta": 1e6, "rope_type": "default"}, 4096)
    positions = torch.randperm(3000, generator=torch.Generator().manual_seed(1))[:50].sort().values
    cos, sin = rope.cos_sin(positions, torch.float64)
    keys_post = torch.stack([apply_rope(keys_pre[layer].double(), cos, sin) for layer in range(2)]).float()
    t = 3100
    post = tri_score_series(keys_post, mu_re, mu_im, a, rope.inv_freq, t)
    pre = tri_score_prerope_series(keys_pre, positions, mu_re, mu_im, a, rope.inv_freq, t)
    assert ((post - pre).abs().max() / pre.abs().max()).item() < 2e-5


@pytest.mark.parametrize("terms", ["both", "trig", "norm"])
def test_folded_offsets_equal_the_literal_series(terms):
    """The reference folds the 17 offsets into one complex factor per band; it must equal the series written out."""
    keys, mu_re, mu_im, a, omega = make(2, 40, 2, 6, 16, seed=4)
    folded = tri_score_ref(keys, mu_re, mu_im, a, omega, t=12345, terms=terms)
    literal = tri_score_series(keys, mu_re, mu_im, a, omega, t=12345, terms=terms)
    torch.testing.assert_close(folded, literal, rtol=1e-5, atol=1e-5 * literal.abs().max().item())
    _, _, w = expected_query(mu_re, mu_im, a, omega, t=12345)
    assert torch.equal(w, a - torch.sqrt(mu_re ** 2 + mu_im ** 2))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_kernel_on_gpu_at_qwen3_32b_shapes():
    keys, mu_re, mu_im, a, omega = make(64, 2176, 8, 64, 128, device="cuda")
    pool = keys.bfloat16()
    out = torch.full((64, 64, 2176), float("nan"), device="cuda")
    got = tri_score_triton(pool, mu_re, mu_im, a, omega, t=30000, out=out)
    ref = tri_score_series(pool[:4].float(), mu_re[:4], mu_im[:4], a[:4], omega, t=30000)
    assert not got.isnan().any()
    torch.testing.assert_close(got[:4], ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())
