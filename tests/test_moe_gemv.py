"""kernels/moe_gemv.py against its fp32 reference (Triton's interpreter on the CPU, the real kernel on CUDA): every
weight layout the loader makes (AWQ-like, NF4, GGUF Q4_0 / Q4_K / Q6_K / Q8_0), plain, gated (gate/up + SiLU) and
scaled (routing weights) rows, odd and real GLM-4.7-Flash shapes; models/moe.py's decode path (GEMVs by expert id)
against its prefill path (tokens grouped by expert); and on CUDA, a captured graph replayed with new expert ids."""

import pytest
import torch
from openclaw.kernels.moe_gemv import moe_gemv_ref, moe_gemv_triton
from openclaw.kernels.qlinear import QuantWeight, pack_codes, quantize_rtn
from openclaw.models.moe import Experts

from openclaw.weights.formats import NF4_CODE

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"
# (bits, group, offsets, zero): the layouts of kernels/qlinear.py's docstring that experts arrive in
LAYOUTS = {"awq": (4, 128, True, 0), "q4_k": (4, 32, True, 0), "q4_0": (4, 32, False, 8), "q6_k": (8, 16, False, 32),
           "q8_0": (8, 32, False, 128), "nf4": (4, 64, False, 0)}


def weight(kind: str, rows: int, k: int, seed: int) -> QuantWeight:
    """Random codes and scales in one layout (NF4: bitsandbytes' code table)."""
    g = torch.Generator().manual_seed(seed)
    bits, group, offsets, zero = LAYOUTS[kind]
    codes = torch.randint(0, 1 << bits, (rows, k), generator=g)
    scales = (torch.rand(rows, k // group, generator=g) * 0.02 + 0.01).half()
    off = (torch.randn(rows, k // group, generator=g) * 0.05).half() if offsets else None
    lut = torch.tensor(NF4_CODE) if kind == "nf4" else None
    return QuantWeight(pack_codes(codes, bits), scales, off, lut, bits, group, (rows, k), zero).to(DEV)


def check(kind: str, E: int, N: int, K: int, T: int, k: int, mode: str, dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(1)
    qw = weight(kind, E * N, K, 2)
    up = weight(kind, E * N, K, 3) if mode == "gated" else None
    x_div = k if mode == "gated" else 1
    x = torch.randn(T * k // x_div, K, generator=g).to(DEV, dtype)
    ids = torch.randint(0, E, (T * k,), generator=g).to(DEV)
    ids[-1] = ids[0]  # an expert chosen twice
    scale = torch.rand(T * k, generator=g).to(DEV) if mode == "scaled" else None
    out = torch.full((T * k, N), float("nan"), dtype=torch.float32, device=DEV)
    got = moe_gemv_triton(x, qw, ids, N, x_div, up, scale, out=out)
    ref = moe_gemv_ref(x.float(), qw, ids, N, x_div, up, scale, torch.float32)
    assert not got.isnan().any(), "an unwritten lane"
    rel = ((got.cpu() - ref.cpu()).norm() / ref.norm()).item()
    assert rel <= (1e-5 if dtype == torch.float32 else 5e-3), f"relative RMS error {rel:.2e}"


@pytest.mark.parametrize("kind", LAYOUTS)
@pytest.mark.parametrize("mode", ["plain", "gated", "scaled"])
def test_odd_shapes_every_layout(kind, mode):
    """5 experts of 24 rows (not a block multiple), K of three groups, 3 tokens x 2 experts."""
    check(kind, 5, 24, 3 * LAYOUTS[kind][1], 3, 2, mode, torch.float32)


@pytest.mark.parametrize("kind,mode,N,K", [("awq", "gated", 1536, 2048), ("awq", "scaled", 2048, 1536),
                                           ("q4_k", "gated", 1536, 2048), ("nf4", "scaled", 2048, 1536)])
def test_real_glm47_flash_shapes(kind, mode, N, K):
    """64 experts; gate/up [64 x 1536, 2048] with the SiLU for one token's 4 experts, down [64 x 2048, 1536] scaled
    by the routing weights; bf16 activations."""
    check(kind, 64, N, K, 1, 4, mode, torch.bfloat16)


@pytest.mark.parametrize("quantized", [False, True])
def test_decode_by_ids_equals_prefill_grouped_by_expert(quantized):
    E, H, I, T, k = 6, 64, 32, 9, 3
    experts = Experts(H, I, E, quantized)
    g = torch.Generator().manual_seed(4)
    dense = [torch.randn(E * I, H, generator=g) * 0.1, torch.randn(E * I, H, generator=g) * 0.1,
             torch.randn(E * H, I, generator=g) * 0.1]
    for proj, w in zip((experts.gate_proj, experts.up_proj, experts.down_proj), dense):
        if quantized:
            proj.qweight = quantize_rtn(w, 4, 32)
        else:
            proj.weight.data.copy_(w)
    x = torch.randn(T, H, generator=g)
    weights, ids = torch.rand(T, k, generator=g), torch.randint(0, E, (T, k), generator=g)
    with torch.inference_mode():
        by_ids, grouped = experts._by_ids(x, weights, ids), experts._grouped(x, weights, ids)
    torch.testing.assert_close(by_ids, grouped, rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_graph_replays_with_new_expert_ids():
    """The ids are read on the device: a graph captured once gives the right rows for ids written later."""
    E, N, K = 8, 64, 256
    qw, up = weight("awq", E * N, K, 5), weight("awq", E * N, K, 6)
    x = torch.randn(1, K, device=DEV, dtype=torch.bfloat16)
    ids = torch.tensor([0, 1, 2, 3], device=DEV)
    moe_gemv_triton(x, qw, ids, N, 4, up)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = moe_gemv_triton(x, qw, ids, N, 4, up)
    for new in ([7, 6, 5, 4], [3, 3, 0, 1]):
        ids.copy_(torch.tensor(new))
        graph.replay()
        ref = moe_gemv_ref(x.float(), qw, ids, N, 4, up, None, torch.float32)
        assert ((y.float() - ref).norm() / ref.norm()).item() <= 5e-3
