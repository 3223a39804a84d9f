"""Pool compaction: the Triton kernel against the reference, in place, on tiny, odd and Qwen3-32B head shapes."""

import os

import pytest
import torch
from openclaw.kernels.kv_compact import kv_compact_ref, kv_compact_triton

needs_triton = pytest.mark.skipif(not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1",
                                  reason="Triton needs CUDA or TRITON_INTERPRET=1")

# (L, S, Hkv, D, base, n, budget)
SHAPES = [(1, 8, 1, 4, 0, 6, 3), (3, 300, 5, 24, 37, 123, 61), (2, 2300, 8, 128, 100, 2176, 2048)]


def case(L, S, hkv, D, base, n, budget, seed=0, dtype=torch.float32, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(L, S, hkv, D, generator=g).to(dtype)
    v = torch.randn(L, S, hkv, D, generator=g).to(dtype)
    keep = torch.stack([torch.stack([torch.randperm(n, generator=g)[:budget].sort().values for _ in range(hkv)])
                        for _ in range(L)])
    return k.to(device), v.to(device), keep.to(device)


def expected(k, base, keep):
    """What slot base + j of (l, h) must hold: the old entry base + keep[l, h, j]; everything else unchanged."""
    out = k.clone()
    for layer in range(k.shape[0]):
        for h in range(k.shape[2]):
            out[layer, base:base + keep.shape[2], h] = k[layer, base + keep[layer, h], h]
    return out


@pytest.mark.parametrize("shape", SHAPES)
def test_reference_moves_kept_entries_to_the_front(shape):
    k, v, keep = case(*shape)
    want_k, want_v = expected(k, shape[4], keep), expected(v, shape[4], keep)
    kv_compact_ref(k, v, shape[4], keep)
    assert torch.equal(k, want_k) and torch.equal(v, want_v)


@needs_triton
@pytest.mark.parametrize("shape", SHAPES[:2] + ([SHAPES[2]] if torch.cuda.is_available() else []))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_matches_reference(shape, dtype):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    k, v, keep = case(*shape, dtype=dtype, device=device)
    want_k, want_v = expected(k, shape[4], keep), expected(v, shape[4], keep)
    kv_compact_triton(k, v, shape[4], keep)
    assert torch.equal(k, want_k) and torch.equal(v, want_v)  # a copy: bit-exact, and nothing else touched


@needs_triton
def test_kernel_handles_keep_everything_and_keep_the_tail():
    """keep[j] == j (nothing moves) and keep = the last B slots (everything moves by the same shift)."""
    for keep_row in (torch.arange(40), torch.arange(60, 100)):
        k, v, _ = case(2, 128, 3, 16, 9, 100, 40)
        keep = keep_row.expand(2, 3, -1).contiguous()
        want = expected(k, 9, keep)
        kv_compact_triton(k, v, 9, keep)
        assert torch.equal(k, want)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_kernel_on_gpu_at_qwen3_32b_shapes():
    k, v, keep = case(64, 4500, 8, 128, 2176, 2176, 2048, dtype=torch.bfloat16, device="cuda")
    k2, v2 = k.clone(), v.clone()
    kv_compact_triton(k, v, 2176, keep)
    kv_compact_ref(k2, v2, 2176, keep)
    assert torch.equal(k, k2) and torch.equal(v, v2)


@pytest.mark.parametrize("kernel", [kv_compact_ref, pytest.param(kv_compact_triton, marks=needs_triton)])
def test_mla_pool_compacts_the_latent_cache_and_its_empty_value(kernel):
    """GLM-4.7-Flash's pool: keys [L, S, 1, 512 + 64] ([latent | RoPE key]) and a value of width 0 (odd layer count
    and budget here); the latent moves like any key."""
    k, _, keep = case(3, 300, 1, 576, 21, 150, 77)
    v = torch.zeros(3, 300, 1, 0)
    want = expected(k, 21, keep)
    kernel(k, v, 21, keep)
    assert torch.equal(k, want) and v.shape == (3, 300, 1, 0)
