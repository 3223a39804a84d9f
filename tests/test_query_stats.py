"""kernels/query_stats.py: online TriAttention sums against the fp64 reference (Triton's interpreter on the CPU, the
real kernel on CUDA) on tiny, odd and real head shapes, with padded rows skipped and the sums added to, not
overwritten."""

import pytest
import torch
from openclaw.kernels.query_stats import query_stats_ref, query_stats_triton

DEV = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("T,H,D", [(1, 2, 16), (5, 3, 24), (130, 9, 64), (3, 64, 128)])  # SmolLM2, Qwen3-32B heads
def test_sums_match_reference(T, H, D, dtype):
    g = torch.Generator().manual_seed(T)
    q = (torch.randn(T, H, D, generator=g) * 3).to(DEV, dtype)
    start = [torch.randn(H, D // 2, generator=g, dtype=torch.float64).to(DEV) for _ in range(3)]
    slots = torch.arange(T, device=DEV)
    slots[1::3] = -1  # padded rows of a captured batch
    for s in (None, slots):
        got, ref = [x.clone() for x in start], [x.clone() for x in start]
        query_stats_triton(q, s, *got)
        query_stats_ref(q, s, *ref)
        for a, b in zip(got, ref):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    # what the sums hold: the start plus the kept rows' Re, Im and |q_f| of band f = (dim f, dim f + D/2)
    kept = q[slots >= 0].double()
    half = D // 2
    torch.testing.assert_close(ref[0] - start[0], kept[..., :half].sum(0), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ref[2] - start[2], torch.view_as_complex(
        torch.stack((kept[..., :half], kept[..., half:]), -1).contiguous()).abs().sum(0), rtol=1e-12, atol=1e-12)


def test_all_rows_padded_adds_nothing():
    q = torch.randn(4, 2, 16, device=DEV)
    sums = [torch.ones(2, 8, dtype=torch.float64, device=DEV) for _ in range(3)]
    query_stats_triton(q, torch.full((4,), -1, device=DEV), *sums)
    assert all(torch.equal(s, torch.ones_like(s)) for s in sums)


@pytest.mark.gpu
@pytest.mark.skipif(DEV != "cuda", reason="needs CUDA")
def test_gpu_sums_at_the_qwen3_32b_shape():
    test_sums_match_reference(130, 64, 128, torch.bfloat16)
