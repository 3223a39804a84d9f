"""kernels/mla_attention.py against its fp32 reference (Triton's interpreter on the CPU, the real kernel on CUDA) on tiny,
odd and real GLM-4.7-Flash shapes; the reference against MLA written out naively (expanded per-head keys and values);
and the tiny GLM-4.7-Flash model with its MLA and MoE kernels forced on, against its reference path, through
incremental decode in the pool."""

import openclaw.models.mla
import openclaw.models.moe
import pytest
import torch
from conftest import assert_close
from openclaw.kernels.mla_attention import mla_decode_attention_ref, mla_decode_attention_triton
from openclaw.kernels.moe_gemv import moe_gemv_ref, moe_gemv_triton
from openclaw.models.layers import BatchMeta
from tiny_models import make_hf_model, quantized_copy

from openclaw.engine.kv_pool import KVPool
from openclaw.weights.loader import load_model

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"
GLM_47_FLASH = (20, 512, 64)  # query heads, kv_lora_rank, qk_rope_head_dim


def randn(*shape, dtype=torch.float32, seed=0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(DEV, dtype)


def check(H: int, R: int, E: int, lens: list[int], bound: int, dtype: torch.dtype, num_parts: int | None = None,
          bases: list[int] | None = None) -> None:
    B = len(lens)
    bases = bases or [7 + 50 * i for i in range(B)]
    S = max(b + n for b, n in zip(bases, lens)) + 5
    q = randn(B, H, R + E, dtype=dtype, seed=1)
    cache = randn(S, 1, R + E, dtype=dtype, seed=2)
    base, n = torch.tensor(bases, device=DEV), torch.tensor(lens, device=DEV)
    scale = (R / 4 + E) ** -0.5
    out = torch.full((B, H, R), float("nan"), dtype=dtype, device=DEV)
    got = mla_decode_attention_triton(q, cache, base, n, scale, bound, R, num_parts=num_parts, out=out)
    ref = mla_decode_attention_ref(q.float(), cache.float(), base, n, scale, R)
    if dtype == torch.float32:
        assert_close(got, ref, dtype, matmul=True)
    else:  # bf16 operands; the interpreter truncates where the GPU rounds (see test_decode_ops.close)
        assert not got.isnan().any()
        assert (got.float().cpu() - ref.cpu()).norm() <= 1.5e-2 * ref.norm()


@pytest.mark.parametrize("H,R,E", [(4, 32, 8), (5, 40, 6), GLM_47_FLASH])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mla_decode_attention(H, R, E, dtype):
    check(H, R, E, [1, 65, 300], 320, dtype)


def test_mla_partitions_and_odd_lengths():
    for n in (1, 15, 17, 63, 64, 65, 190):
        check(5, 40, 6, [n], 192, torch.float32, num_parts=3)
    check(3, 24, 8, [100, 7, 40], 300, torch.float32, num_parts=5)


def test_lengths_are_read_at_run_time():
    """One static bound, the lengths in a device tensor (what a CUDA graph replays): every length is right."""
    H, R, E = 4, 32, 8
    q, cache = randn(1, H, R + E, seed=3), randn(400, 1, R + E, seed=4)
    base, n = torch.tensor([10], device=DEV), torch.tensor([0], device=DEV)
    for length in (1, 100, 256):
        n.fill_(length)
        got = mla_decode_attention_triton(q, cache, base, n, 0.2, 256, R)
        assert_close(got, mla_decode_attention_ref(q, cache, base, n, 0.2, R), torch.float32, matmul=True)


def test_absorbed_form_equals_naive_mla():
    """softmax((W_UK^T q_nope) . c + q_rope . k_rope) over c, then W_UV: the same as per-head expanded keys
    [W_UK c | k_rope] and values W_UV c, at the scale 1/sqrt(Dn + E) (GLM.md 1.2)."""
    H, Dn, Dv, R, E, n = 4, 12, 20, 32, 8, 50
    g = torch.Generator().manual_seed(5)
    w_uk, w_uv = torch.randn(H, Dn, R, generator=g), torch.randn(H, Dv, R, generator=g)
    q_nope, q_rope = torch.randn(H, Dn, generator=g), torch.randn(H, E, generator=g)
    c, k_rope = torch.randn(n, R, generator=g), torch.randn(n, E, generator=g)
    scale = (Dn + E) ** -0.5
    k = torch.cat([torch.einsum("hdr,sr->hsd", w_uk, c), k_rope.expand(H, n, E)], dim=-1)  # [H, n, Dn + E]
    v = torch.einsum("hvr,sr->hsv", w_uv, c)
    naive = torch.einsum("hs,hsv->hv", torch.softmax(torch.einsum("hd,hsd->hs", torch.cat([q_nope, q_rope], -1), k)
                                                     * scale, -1), v)
    q_abs = torch.cat([torch.einsum("hd,hdr->hr", q_nope, w_uk), q_rope], -1)[None]
    cache = torch.cat([c, k_rope], -1)[:, None]
    o_lat = mla_decode_attention_ref(q_abs, cache, torch.tensor([0]), torch.tensor([n]), scale, R)[0]
    torch.testing.assert_close(torch.einsum("hr,hvr->hv", o_lat, w_uv), naive, rtol=1e-4, atol=1e-4)


def _mla_ref(q, cache, slot_base, kv_len, scale, max_len, value_dim, out=None):
    y = mla_decode_attention_ref(q, cache, slot_base, kv_len, scale, value_dim)
    return y if out is None else out.copy_(y)


def through_pool(model, ids: list[int], fused: bool, chunks: list[int]) -> torch.Tensor:
    """Logits of ids fed in chunks at slots [11, ...) of a larger pool, the MLA and MoE ops on their Triton kernels
    (fused) or their references."""
    pool = KVPool.for_config(model.config, 200, torch.float32, DEV)
    base, done, got = 11, 0, []
    with pytest.MonkeyPatch.context() as mp, torch.inference_mode():
        mp.setattr(openclaw.models.mla, "mla_decode_attention", mla_decode_attention_triton if fused else _mla_ref)
        mp.setattr(openclaw.models.moe, "moe_gemv", moe_gemv_triton if fused else moe_gemv_ref)
        for T in chunks:
            kv = done + T
            meta = BatchMeta(slot_mapping=torch.arange(base + done, base + kv, device=DEV),
                             sample_idx=torch.arange(T, device=DEV), seqs=[(0, T, base, kv)])
            got.append(model(torch.tensor(ids[done:kv], device=DEV), torch.arange(done, kv, device=DEV), meta,
                             pool.k, pool.v).cpu())
            done = kv
    return torch.cat(got)


def test_tiny_glm47_flash_with_its_kernels_equals_the_reference_path(tmp_path):
    """Quantized (4-bit experts through the MoE GEMV kernel), fp32: prefill, then 12 decode steps."""
    make_hf_model("glm4_moe_lite", tmp_path / "hf")
    quantized_copy(tmp_path / "hf", tmp_path / "q", group=16)
    model = load_model(tmp_path / "q", torch.device(DEV), torch.float32)
    ids = torch.randint(0, 128, (30,), generator=torch.Generator().manual_seed(6)).tolist()
    chunks = [18] + [1] * 12
    ref = through_pool(model, ids, False, chunks)
    assert_close(through_pool(model, ids, True, chunks), ref, torch.float32, matmul=True)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_gpu_glm47_flash_shapes_at_long_contexts():
    """The real kernel at GLM-4.7-Flash's heads and ranks in bf16: one batch of mixed lengths up to 8K, and eight rows
    of 2K at separate slot bases (a batched decode step)."""
    check(*GLM_47_FLASH, [1, 777, 4096, 8190], 8192, torch.bfloat16)
    check(*GLM_47_FLASH, [2048] * 8, 2048, torch.bfloat16, bases=[5 + 2100 * i for i in range(8)])


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_gpu_tiny_glm47_flash_with_its_kernels(tmp_path):
    test_tiny_glm47_flash_with_its_kernels_equals_the_reference_path(tmp_path)
