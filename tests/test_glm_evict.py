"""Eviction on the GLM families (tiny random glm4 and glm4_moe_lite): every policy equals full attention bit for bit
when the budget holds the text and evicts (and changes the predictions) when it does not; TriAttention's statistics
are the pre-RoPE queries each model computes, in its band layout (MLA: absorbed latent queries + RoPE queries), and
stats files record that layout; compaction moves the MLA latent cache; the engine generates past its slots."""

import pytest
import torch
from openclaw.kernels.tri_score import tri_score_prerope_series
from openclaw.models.layers import BatchMeta
from openclaw.models.mla import latent_mass
from tiny_models import make_hf_model

from openclaw.config import POLICIES, EngineConfig, EvictionConfig, SamplingParams
from openclaw.engine.engine import Engine
from openclaw.engine.kv_pool import KVPool
from openclaw.errors import OpenClawError
from openclaw.eval.fidelity import evaluate, forced_logprobs, standard_runs
from openclaw.evict.bands import band_parts, tri_score_blocks
from openclaw.evict.calibrate import calibrate
from openclaw.evict.stats_file import load_stats, model_metadata, save_stats
from openclaw.weights.loader import load_model

EVICTING = [p for p in POLICIES if p != "full"]
KINDS = ["glm4", "glm4_moe_lite"]


@pytest.fixture(scope="module", params=KINDS)
def tiny(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    make_hf_model(request.param, path)
    return path


def evict(policy: str, budget: int, **kw) -> EvictionConfig:
    kw = {"protect_recent": 4, "divide_length": 16, "stats": "auto" if policy == "triattention" else None} | kw
    return EvictionConfig(policy=policy, budget=budget, **kw)


def ids_of(n: int, seed: int) -> list[int]:
    return torch.randint(0, 128, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def test_budget_at_least_the_text_equals_full_attention_exactly(tiny):
    model = load_model(tiny, torch.device("cpu"), torch.float32)
    base = evict("full", 256, divide_length=32, stats="auto")
    rows = evaluate(model, [ids_of(200, 0)], standard_runs(list(POLICIES), [256], base, ablations=True, online=True))
    assert len(rows) == 1 + len(EVICTING) + 6  # five ablations and the online variant
    for r in rows:
        assert (r.kl, r.top1, r.evictions) == (0.0, 1.0, 0), r.label


@pytest.mark.parametrize("policy", EVICTING)
def test_small_budget_evicts_and_changes_the_predictions(tiny, policy):
    model = load_model(tiny, torch.device("cpu"), torch.float32)
    ids = ids_of(160, 1)
    stats = calibrate(model, ids[::-1]).tri_stats(model.bands.omega)
    cfg = evict(policy, 24, stats="offline.pt" if policy == "triattention" else None)
    full, _ = forced_logprobs(model, ids, EvictionConfig(policy="full"), start=40)
    ev, count = forced_logprobs(model, ids, cfg, stats, start=40)
    assert count >= 5 and full.shape == ev.shape
    assert (full.exp() * (full - ev)).sum(-1).mean() > 1e-4


@pytest.mark.parametrize("policy", ["snapkv", "triattention"])
def test_engine_generates_past_its_slots(tiny, policy):
    prompt = ids_of(20, 2)
    greedy = SamplingParams(temperature=0, max_tokens=100, ignore_eos=True)
    plain = Engine(tiny, EngineConfig(device="cpu", dtype="float32", kv_tokens=1024)).generate([prompt], greedy)
    roomy = Engine(tiny, EngineConfig(device="cpu", dtype="float32", kv_tokens=1024, evict=evict(policy, 200)))
    assert roomy.generate([prompt], greedy)[0].output_ids == plain[0].output_ids
    tight = Engine(tiny, EngineConfig(device="cpu", dtype="float32", kv_tokens=56, max_seqs=1,
                                      evict=evict(policy, 40)))
    seq = tight.generate([prompt], greedy)[0]
    assert len(seq.output_ids) == 100 and tight.compressor.evictions == 4


class Tap:
    """Records every layer's (pre-RoPE, post-RoPE) queries of one forward."""

    def __init__(self):
        self.calls = []

    def __call__(self, q_pre, q_post):
        self.calls.append((q_pre.clone(), q_post.clone()))


def test_mla_tap_sees_absorbed_queries_that_reproduce_the_attention(tmp_path):
    """The MLA tap's post-RoPE queries against the pool's [latent | RoPE key] at the model's scale give the model's
    attention logits: what snapkv / rkv / h2o score is what the model attends with. Pre-RoPE queries equal the
    post-RoPE ones on the latent block (frequency 0) and rotate back from them on the RoPE block."""
    make_hf_model("glm4_moe_lite", tmp_path)
    model = load_model(tmp_path, torch.device("cpu"), torch.float32)
    cfg, bands = model.config, model.bands
    assert bands.blocks == ((0, 32), (32, 8)) and bands.rope_style == "interleaved"
    assert bands.scale == (16 + 8) ** -0.5 and torch.equal(bands.omega[:16], torch.zeros(16))
    T = 12
    pool = KVPool.for_config(cfg, T, torch.float32, "cpu")
    tap = Tap()
    meta = BatchMeta(slot_mapping=torch.arange(T), seqs=[(0, T, 0, T)], sample_idx=torch.arange(T), query_tap=tap)
    with torch.inference_mode():
        model(torch.tensor(ids_of(T, 3)), torch.arange(T), meta, pool.k, pool.v)
    assert len(tap.calls) == cfg.num_hidden_layers
    q_pre, q_post = tap.calls[0]
    assert q_post.shape == (T, 4, 40) and torch.equal(q_pre[..., :32], q_post[..., :32])
    # the series on pre-RoPE queries (positions explicit) equals the post-RoPE form on the RoPE block
    keys = pool.k[:1]  # [1, T, 1, 40] post-RoPE
    mu_re, mu_im = (x.mean(0)[None] for x in band_parts(q_pre, bands.blocks))
    a = torch.sqrt(mu_re ** 2 + mu_im ** 2) * 1.5
    post = tri_score_blocks(keys, mu_re, mu_im, a, bands.omega, T, bands.blocks)
    cos, sin = model.rope.cos_sin(torch.arange(T), torch.float32)
    rope_pre = keys[..., 32:] * cos[None, :, :, :] - torch.cat([-keys[..., 36:], keys[..., 32:36]], -1) * sin[None]
    pre = (tri_score_prerope_series(keys[..., :32], torch.arange(T), mu_re[..., :16], mu_im[..., :16], a[..., :16],
                                    bands.omega[:16], T)
           + tri_score_prerope_series(rope_pre, torch.arange(T), mu_re[..., 16:], mu_im[..., 16:], a[..., 16:],
                                      bands.omega[16:], T))
    torch.testing.assert_close(post, pre, rtol=2e-4, atol=2e-4)


def test_stats_files_record_the_band_layout_and_refuse_another(tiny, tmp_path):
    model = load_model(tiny, torch.device("cpu"), torch.float32)
    bands = model.bands
    qs = calibrate(model, ids_of(300, 4), context=128)
    stats = qs.tri_stats(bands.omega)
    save_stats(tmp_path / "s.pt", stats, model_metadata(model, "tiny"), qs.tokens)
    meta = torch.load(tmp_path / "s.pt", weights_only=True)["metadata"]
    assert meta["rope_style"] == "interleaved" and meta["blocks"] == [list(b) for b in bands.blocks]
    assert meta["head_dim"] == bands.width and len(meta["inv_freq"]) == bands.width // 2
    back = load_stats(tmp_path / "s.pt", model_metadata(model, "tiny"), bands.omega)
    assert torch.equal(back.mu_re, stats.mu_re) and torch.equal(back.a_mean, stats.a_mean)
    with pytest.raises(OpenClawError, match="pairs RoPE dims"):  # a half-layout (Qwen) file of the same shapes
        save_stats(tmp_path / "q.pt", stats, model_metadata(model, "qwen-like") | {"rope_style": "half"}, qs.tokens)
        load_stats(tmp_path / "q.pt", model_metadata(model, "tiny"), bands.omega)


@pytest.mark.parametrize("policy", ["h2o", "triattention"])
def test_compaction_moves_the_latent_cache(policy, tmp_path, monkeypatch):
    """After an eviction each layer's kept [latent | RoPE key] rows sit at the front of the sequence's slots, in
    temporal order, none doubled, moved whole (h2o chooses per layer, triattention one set for all layers)."""
    make_hf_model("glm4_moe_lite", tmp_path)
    engine = Engine(tmp_path, EngineConfig(device="cpu", dtype="float32", kv_tokens=64, max_seqs=1,
                                           evict=evict(policy, 24)))
    seq = engine.add_request(ids_of(10, 5), SamplingParams(temperature=0, max_tokens=40, ignore_eos=True))
    comp, seen = engine.compressor, []
    evict_now = comp.evict

    def spy(s):
        seen.append(engine.pool.k[:, s.slot_base:s.slot_base + s.kv_len].clone())
        return evict_now(s)

    monkeypatch.setattr(comp, "evict", spy)
    while not comp.evictions:
        engine.step()
    before, kept = seen[0], engine.pool.k[:, seq.slot_base:seq.slot_base + seq.kv_len]
    assert seq.kv_len == 24 and before.shape[1] == 24 + 16
    sets = []
    for layer in range(kept.shape[0]):
        rows = [int((before[layer, :, 0] == kept[layer, j, 0]).all(-1).nonzero()[0]) for j in range(24)]
        assert rows == sorted(set(rows)), rows
        assert torch.equal(kept[layer, :, 0], before[layer, rows, 0])
        sets.append(rows)
    if policy == "triattention":  # one keep set for the latent of every layer
        assert all(r == sets[0] for r in sets)


def test_latent_mass_is_the_attention_each_key_receives():
    """MLA's mass (models/mla.latent_mass): decode rows over the static bound masked by the device length, a padded
    row (slot -1) adding nothing, and a prefill chunk with its causal mask, each equal to the softmax written out."""
    g = torch.Generator().manual_seed(6)
    H, K, scale = 4, 24, 0.3
    cache = torch.randn(40, 1, K, generator=g)
    q = torch.randn(5, H, K, generator=g)
    # rows: decode of a 7-key sequence at slot 10 (bound 16), a padded decode row, then a 3-token chunk at slot 20
    meta = BatchMeta(slot_mapping=torch.tensor([16, -1, 23, 24, 25]), seqs=[(0, 1, 10, 16), (1, 1, 0, 16),
                                                                             (2, 3, 20, 6)],
                     sample_idx=torch.tensor([0]), kv_valid=torch.tensor([7, 1, 6]),
                     slot_base=torch.tensor([10, 0, 20]))
    mass = torch.zeros(40, 1)
    latent_mass(q, cache, meta, scale, mass)
    want = torch.zeros(40)
    want[10:17] = torch.softmax(q[0] @ cache[10:17, 0].T * scale, -1).sum(0)
    causal = torch.ones(6, 6, dtype=torch.bool).tril()[3:]  # queries 3..5 of the 6 keys
    s = torch.einsum("thk,sk->ths", q[2:], cache[20:26, 0]) * scale
    want[20:26] = torch.softmax(s.masked_fill(~causal[:, None], float("-inf")), -1).sum((0, 1))
    torch.testing.assert_close(mass[:, 0], want, rtol=1e-5, atol=1e-6)
