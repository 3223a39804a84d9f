"""In-place compaction of one sequence's pool slots: kept entries move to the front, per (layer, KV head).

keep[l, h] holds sorted slot offsets (relative to the sequence's base) of the entries to keep; entry j of the
result is the old entry keep[l, h, j], so order stays temporal. Because keep is sorted, keep[j] >= j: a block of
destinations [j0, j0 + BLOCK) is read only from slots >= j0, and later blocks read only slots >= j0 + BLOCK, so one
program per (layer, head) can walk the blocks in order with a barrier between its loads and stores, no scratch.
The key and value caches are compacted by one launch each (an MLA pool has a value width of 0: no launch). It does
not choose what to keep (openclaw.evict.evictor does).
"""

import torch
import triton
import triton.language as tl


@triton.jit(do_not_specialize=["base", "budget"])
def _kv_compact_kernel(c_ptr, keep_ptr, base, budget, stride_l, stride_s, stride_h,
                       HKV: tl.constexpr, D: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_D: tl.constexpr):
    i_lh = tl.program_id(0).to(tl.int64)
    i_l = i_lh // HKV
    i_h = i_lh % HKV
    o_d = tl.arange(0, BLOCK_D)
    m_d = o_d < D
    p_head = i_l * stride_l + i_h * stride_h + base * stride_s
    for j0 in range(0, budget, BLOCK_J):
        o_j = j0 + tl.arange(0, BLOCK_J)
        m_j = o_j < budget
        b_src = tl.load(keep_ptr + i_lh * budget + o_j, mask=m_j, other=0).to(tl.int64)
        m = m_j[:, None] & m_d[None, :]
        o_src = p_head + b_src[:, None] * stride_s + o_d[None, :]
        o_dst = p_head + o_j[:, None].to(tl.int64) * stride_s + o_d[None, :]
        b_c = tl.load(c_ptr + o_src, mask=m)
        tl.debug_barrier()  # every lane has read its source before any lane overwrites a slot of this block
        tl.store(c_ptr + o_dst, b_c, mask=m)
        tl.debug_barrier()


def kv_compact(k: torch.Tensor, v: torch.Tensor, base: int, keep: torch.Tensor) -> None:
    """k: [L, S, Hkv, D], v: [L, S, Hkv, Dv] pool tensors (modified in place); keep: [L, Hkv, B] sorted offsets from
    base. Triton on CUDA tensors, kv_compact_ref on CPU tensors."""
    (kv_compact_triton if k.is_cuda else kv_compact_ref)(k, v, base, keep)


def kv_compact_triton(k: torch.Tensor, v: torch.Tensor, base: int, keep: torch.Tensor) -> None:
    """kv_compact as one Triton launch per cache of nonzero width (CPU tensors run in Triton's interpreter)."""
    L, _, hkv, _ = k.shape
    assert k.shape[:3] == v.shape[:3] and keep.shape[:2] == (L, hkv)
    budget = keep.shape[2]
    keep = keep.to(device=k.device, dtype=torch.int32).contiguous()
    for cache in (k, v):
        D = cache.shape[-1]
        if D:
            assert cache.is_contiguous()
            _kv_compact_kernel[(L * hkv,)](cache, keep, base, budget, cache.stride(0), cache.stride(1),
                                           cache.stride(2), HKV=hkv, D=D, BLOCK_J=32,
                                           BLOCK_D=triton.next_power_of_2(D))


def kv_compact_ref(k: torch.Tensor, v: torch.Tensor, base: int, keep: torch.Tensor) -> None:
    """Plain-PyTorch compaction (gather the kept entries, then write them to the front of the range): the oracle and
    the CPU path."""
    budget = keep.shape[2]
    n = int(keep.max()) + 1
    idx = keep.to(k.device, torch.long).transpose(1, 2)[..., None]  # [L, B, Hkv, 1]
    for cache in (k, v):
        cache[:, base:base + budget] = cache[:, base:base + n].gather(1, idx.expand(-1, -1, -1, cache.shape[-1]))
