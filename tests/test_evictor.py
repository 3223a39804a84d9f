"""Eviction invariants on CPU for every policy: exact budget, pinned and protected tokens kept, temporal order,
deterministic ties; and the compression loop over a real pool (positions tracked through compaction)."""

import pytest
import torch

from openclaw.config import POLICIES, EvictionConfig, SamplingParams
from openclaw.engine.kv_pool import KVPool
from openclaw.engine.sequence import Sequence
from openclaw.errors import OpenClawError
from openclaw.evict.compressor import Compressor
from openclaw.evict.evictor import EvictInputs, TriStats, keep_indices, kept_ends, redundancy, select

EVICTING = [p for p in POLICIES if p != "full"]
L, HKV, H, D = 3, 2, 6, 16


def stats(seed=0) -> TriStats:
    g = torch.Generator().manual_seed(seed)
    mu_re, mu_im = torch.randn(L, H, D // 2, generator=g), torch.randn(L, H, D // 2, generator=g)
    a = torch.sqrt(mu_re ** 2 + mu_im ** 2) + torch.rand(L, H, D // 2, generator=g)
    return TriStats(mu_re, mu_im, a, 1.0 / 1e4 ** (torch.arange(0, D, 2).float() / D))


def inputs(n, seed=0, prompt=0) -> EvictInputs:
    g = torch.Generator().manual_seed(seed)
    return EvictInputs(keys=torch.randn(L, n, HKV, D, generator=g), t=n + 100, pinned=prompt,
                       queries=torch.randn(L, 8, H, D, generator=g), attention=torch.rand(L, HKV, n, generator=g),
                       stats=stats(seed))


def config(policy, **kw) -> EvictionConfig:
    kw = {"budget": 40, "divide_length": 16, "protect_recent": 5, "stats": "x.pt"} | kw
    return EvictionConfig(policy=policy, **kw)


@pytest.mark.parametrize("policy", EVICTING)
@pytest.mark.parametrize("pin", [True, False])
def test_keeps_exactly_the_budget_in_order_with_protected_ends(policy, pin):
    cfg = config(policy)
    n, prompt = 56, 7
    keep = keep_indices(cfg, inputs(n, prompt=prompt if pin else 0))
    assert keep.shape == (L, HKV, cfg.budget)
    assert (keep.diff(dim=-1) > 0).all(), "kept tokens must stay in temporal order, no duplicates"
    assert keep.min() >= 0 and keep.max() < n
    kept = [set(row.tolist()) for row in keep.reshape(-1, cfg.budget)]
    must = set(range(n - cfg.protect_recent, n)) | (set(range(prompt)) if pin else set())
    assert all(must <= k for k in kept), "a pinned or protected token was evicted"


@pytest.mark.parametrize("policy", EVICTING)
def test_selection_is_deterministic(policy):
    a = keep_indices(config(policy), inputs(70, seed=3))
    b = keep_indices(config(policy), inputs(70, seed=3))
    assert torch.equal(a, b)


def test_ties_go_to_the_older_token_and_policy_specific_ends():
    keep = select(torch.zeros(2, 10), n=14, front=2, back=2, budget=7)
    assert keep.tolist() == [[0, 1, 2, 3, 4, 12, 13]] * 2
    cfg = config("streaming", pin_prompt=False)
    assert kept_ends(cfg, 56, 0) == (4, 36)  # sinks + most recent
    assert kept_ends(config("h2o", pin_prompt=False), 56, 0) == (0, 20)  # half recent
    assert kept_ends(config("snapkv", pin_prompt=False, protect_recent=2), 56, 0) == (0, 8)  # its window


def test_streaming_keeps_sinks_and_the_most_recent():
    keep = keep_indices(config("streaming", pin_prompt=False), inputs(56))
    assert keep[0, 0].tolist() == [0, 1, 2, 3] + list(range(20, 56))


def test_triattention_shares_one_keep_set_per_kv_head_across_layers():
    keep = keep_indices(config("triattention"), inputs(60, seed=5))
    assert all(torch.equal(keep[0], keep[layer]) for layer in range(L))
    assert not torch.equal(keep[0, 0], keep[0, 1]), "each KV head chooses its own tokens"


def test_triattention_follows_its_scores():
    """The key with by far the largest score must be kept, and the one with the lowest evicted."""
    inp = inputs(60, seed=7)
    s = inp.stats
    s.mu_re.zero_(), s.mu_im.zero_(), s.a_mean.fill_(1e-3)
    s.a_mean[..., 0] = 1.0  # band 0 diffuse (R = 0): scored by the key's norm in it
    inp.keys[:, 20, :, 0] = 100.0
    inp.keys[:, 30, :, :] = 0.0
    keep = keep_indices(config("triattention", tri_terms="norm", pin_prompt=False), inp)
    assert (keep == 20).any(-1).all(), "the key with by far the largest norm term was evicted"
    assert not (keep == 30).any(), "a zero key (score 0, the minimum) was kept"


def test_h2o_keeps_the_heavy_hitters():
    inp = inputs(60)
    inp.attention.zero_()
    inp.attention[:, :, [3, 11]] = 10.0
    keep = keep_indices(config("h2o", pin_prompt=False), inp)
    assert (keep == 3).any(-1).all() and (keep == 11).any(-1).all()


def test_rkv_redundancy_penalizes_copies():
    keys = torch.randn(12, 1, 64, generator=torch.Generator().manual_seed(0))  # random 64-d keys: cosine ~ 0
    keys[[2, 5, 9]] = keys[2].clone()  # three copies of one key
    red = redundancy(keys, 0.5)[0]
    others = [i for i in range(12) if i not in (2, 5, 9)]
    assert red[[2, 5, 9]].min() > red[others].max()
    assert torch.allclose(red[others], red[others[0]]), "keys without copies carry no redundancy"
    keys[9] = torch.randn(1, 64, generator=torch.Generator().manual_seed(1))  # 2 and 5 stay a pair
    red = redundancy(keys, 0.5)[0]
    assert torch.allclose(red, red[0]), "one similar copy is exempt: a single pair is not penalized"


def test_budget_must_exceed_protected_tokens():
    with pytest.raises(OpenClawError, match="must exceed"):
        EvictionConfig(policy="snapkv", budget=128, protect_recent=128)


@pytest.mark.parametrize("policy", EVICTING)
def test_compressor_tracks_positions_through_repeated_evictions(policy):
    """Tokens are written with their absolute position in v; after many compress cycles the pool must hold exactly
    budget tokens per (layer, head), in increasing position, including the pinned prompt and the recent window."""
    cfg = config(policy, stats="auto" if policy == "triattention" else None)
    cap = cfg.budget + cfg.divide_length
    pool = KVPool(L, cap + 10, HKV, D, torch.float32, "cpu")
    comp = Compressor(cfg, pool, H, 1.0 / 1e4 ** (torch.arange(0, D, 2).float() / D))
    seq = Sequence(list(range(7)), SamplingParams(max_tokens=1000), max_len=10_000, kv_budget=cfg.budget,
                   divide_length=cfg.divide_length, pinned=7)
    seq.slot_base, seq.capacity = 10, seq.slots_needed()
    assert seq.capacity == cap
    g = torch.Generator().manual_seed(0)
    for step in range(30):
        n = min(7 if step == 0 else 5, cap - seq.kv_len)  # the scheduler's cap: a chunk never overflows the slots
        seq.token_ids += [0] * (seq.num_computed + n - len(seq.token_ids))
        rows = torch.arange(seq.kv_len, seq.kv_len + n) + seq.slot_base
        pos = torch.arange(seq.num_computed, seq.num_computed + n, dtype=torch.float32)
        pool.k[:, rows] = torch.randn(L, n, HKV, D, generator=g)
        pool.v[:, rows] = pos[None, :, None, None]
        step = comp.tap([(seq, n)])
        if step is not None:
            record = step.bind(torch.tensor(step.rows).view(len(step.rows), n), rows, pos.long())
            for _ in range(L):
                q = torch.randn(n, H, D, generator=g)
                if record is not None:  # h2o taps no queries: its attention mass comes from the attention kernel
                    record(q, q)
        seq.num_computed += n
        seq.kv_len += n
        if comp.due(seq):
            comp.evict(seq)
            seq.kv_len = seq.kv_budget  # what Scheduler.compacted records
        assert seq.kv_len < cap
    assert comp.evictions >= 3
    held = pool.v[:, seq.slot_base:seq.slot_base + seq.kv_len, :, 0]  # [L, kv_len, Hkv] positions
    assert (held.diff(dim=1) > 0).all(), "kept order must be temporal"
    kept = comp.kept[seq.seq_id]  # what the compressor believes the last compaction kept
    assert torch.equal(kept.float(), pool.v[:, seq.slot_base:seq.slot_base + cfg.budget, :, 0].transpose(1, 2))
    for p in list(range(7)) + list(range(seq.num_computed - cfg.protect_recent, seq.num_computed)):
        assert (held == p).any(1).all(), f"position {p} (pinned or protected) was evicted"
