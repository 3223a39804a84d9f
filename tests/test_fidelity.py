"""The fidelity harness and eviction in the engine: with budget >= length nothing changes (bit for bit); with a
small budget every policy evicts, generates past its slot count, and the harness sees the difference."""

import math

import pytest
import torch
from tiny_models import make_hf_model

from openclaw.config import POLICIES, EngineConfig, EvictionConfig, SamplingParams
from openclaw.engine.engine import Engine
from openclaw.errors import OpenClawError
from openclaw.eval.fidelity import evaluate, forced_logprobs, standard_runs, text_windows
from openclaw.eval.needle import build_cases
from openclaw.evict.calibrate import calibrate
from openclaw.weights.loader import load_model

EVICTING = [p for p in POLICIES if p != "full"]
GREEDY = SamplingParams(temperature=0, max_tokens=100, ignore_eos=True)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_qwen3")
    make_hf_model("qwen3", path)
    return path


def evict(policy: str, budget: int, **kw) -> EvictionConfig:
    kw = {"protect_recent": 4, "divide_length": 16, "stats": "auto" if policy == "triattention" else None} | kw
    return EvictionConfig(policy=policy, budget=budget, **kw)


def test_budget_at_least_the_text_equals_full_attention_exactly(tiny):
    model = load_model(tiny, torch.device("cpu"), torch.float32)
    ids = torch.randint(0, 128, (200,), generator=torch.Generator().manual_seed(0)).tolist()
    base = evict("full", 256, divide_length=32, stats="auto")
    calls = []
    rows = evaluate(model, [ids, ids[::-1]], standard_runs(list(POLICIES), [256], base, ablations=True, online=True),
                    progress=lambda what, done, total: calls.append((what, done, total)))
    assert len(rows) == 1 + len(EVICTING) + 6
    # the progress bar's figures: tokens forced so far by the full-attention reference and every run, per window
    total = 2 * 200 * (1 + len(rows))
    assert calls[-1][1:] == (total, total) and calls[0][0].startswith("window 1/2")
    assert [c[1] for c in calls] == sorted(c[1] for c in calls)
    for r in rows:
        assert (r.kl, r.top1, r.evictions) == (0.0, 1.0, 0), r.label
        assert r.ppl == r.ppl_full


@pytest.mark.parametrize("policy", EVICTING)
def test_small_budget_evicts_and_changes_the_predictions(tiny, policy):
    model = load_model(tiny, torch.device("cpu"), torch.float32)
    ids = torch.randint(0, 128, (160,), generator=torch.Generator().manual_seed(1)).tolist()
    stats = calibrate(model, ids[::-1]).tri_stats(model.rope.inv_freq)
    cfg = evict(policy, 24, stats="offline.pt" if policy == "triattention" else None)
    full, _ = forced_logprobs(model, ids, EvictionConfig(policy="full"), start=40)
    ev, count = forced_logprobs(model, ids, cfg, stats, start=40)
    assert count >= 5
    assert full.shape == ev.shape
    assert (full.exp() * (full - ev)).sum(-1).mean() > 1e-4


@pytest.mark.parametrize("policy", EVICTING)
def test_engine_generates_past_its_slots_and_matches_full_when_nothing_is_evicted(tiny, policy):
    prompt = torch.randint(0, 128, (20,), generator=torch.Generator().manual_seed(2)).tolist()
    plain = Engine(tiny, EngineConfig(device="cpu", dtype="float32", kv_tokens=1024)).generate([prompt], GREEDY)
    roomy = Engine(tiny, EngineConfig(device="cpu", dtype="float32", kv_tokens=1024, evict=evict(policy, 200)))
    assert roomy.generate([prompt], GREEDY)[0].output_ids == plain[0].output_ids
    assert roomy.compressor.evictions == 0
    # 40 + 16 slots for a 120-token sequence: the cache reaches 56 at 56, 72, 88 and 104 cached tokens (the last
    # sampled token never enters it, so at most 119 are cached): 4 compressions, and it still finishes
    tight = Engine(tiny, EngineConfig(device="cpu", dtype="float32", kv_tokens=56, max_seqs=1,
                                      evict=evict(policy, 40)))
    seq = tight.generate([prompt], GREEDY)[0]
    assert len(seq.output_ids) == 100 and seq.capacity == 56
    assert tight.compressor.evictions == 4
    assert tight.pool.allocator.num_free == 56 and not tight.compressor.rows and not tight.compressor.kept


def test_engine_prefills_a_prompt_longer_than_its_slots_when_not_pinned(tiny):
    prompt = torch.randint(0, 128, (150,), generator=torch.Generator().manual_seed(3)).tolist()
    cfg = evict("snapkv", 40, pin_prompt=False)
    engine = Engine(tiny, EngineConfig(device="cpu", dtype="float32", kv_tokens=56, evict=cfg))
    seq = engine.generate([prompt], SamplingParams(temperature=0, max_tokens=5, ignore_eos=True))[0]
    assert len(seq.output_ids) == 5 and engine.compressor.evictions >= 6
    pinned = Engine(tiny, EngineConfig(device="cpu", dtype="float32", kv_tokens=56, evict=evict("snapkv", 40)))
    with pytest.raises(OpenClawError, match="pinned"):
        pinned.add_request(prompt, GREEDY)


def test_windows_and_needle_cases():
    ids = list(range(10_000))
    wins = text_windows(ids, 4, 2048)
    assert [w[0] for w in wins] == [0, 2650, 5300, 7950] and all(len(w) == 2048 for w in wins)
    with pytest.raises(ValueError):
        text_windows(ids, 8, 2048)

    class Tok:  # one id per character, so the pieces are easy to check
        def encode(self, text):
            return [ord(c) for c in text]

    cases = build_cases(Tok(), [ord("x")] * 3000, 3, dormancy=500)
    c = cases[0]
    text = "".join(map(chr, c.haystack))
    code = "".join(map(chr, c.answer)).strip()
    assert code in text and code not in "".join(map(chr, c.bare)) and c.needle_pos == 64
    assert len(c.haystack) - len(c.bare) == len(text) - text.count("x")


@pytest.mark.slow
def test_smollm2_fidelity_is_exact_when_the_budget_holds_the_text(smol_model_dir):
    """All six policies on real text: budget >= length is KL 0 and top-1 1.0 exactly; budget 64 is not."""
    from pathlib import Path

    from openclaw.tokenizer import Tokenizer

    model = load_model(smol_model_dir, torch.device("cpu"), torch.float32)
    ids = Tokenizer.from_dir(smol_model_dir).encode((Path(__file__).parent / "data" / "devil_excerpt.txt").read_text())
    ids = ids[:256]
    base = EvictionConfig(policy="full", budget=512, protect_recent=8, pin_prompt=False, stats="auto")
    rows = evaluate(model, [ids], standard_runs(list(POLICIES), [512], base), start=128)
    assert all((r.kl, r.top1) == (0.0, 1.0) for r in rows)
    rows = evaluate(model, [ids], standard_runs(["streaming", "triattention"], [64], base), start=128)
    assert all(r.kl > 0 and r.evictions > 0 for r in rows)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("policy", EVICTING)
def test_engine_evicts_through_the_triton_kernels_on_gpu(tiny, policy):
    prompt = torch.randint(0, 128, (20,), generator=torch.Generator().manual_seed(2)).tolist()
    engine = Engine(tiny, EngineConfig(device="cuda", dtype="bfloat16", kv_tokens=56, max_seqs=1,
                                       evict=evict(policy, 40)))
    seq = engine.generate([prompt], GREEDY)[0]
    # K/V is written for the prompt and every output token but the last: 119 tokens; the cache reaches 40 + 16 at the
    # 56th and every 16 tokens after it
    assert len(seq.output_ids) == 100 and engine.compressor.evictions == 1 + (20 + 100 - 1 - 56) // 16
    assert engine.pool.allocator.num_free == 56


def test_auto_is_full_attention_until_the_range_is_full_then_triattention_takes_over(tiny, tmp_path):
    """--evict auto (the default): a sequence runs exactly as --evict full while it fits its KV range (here the
    whole 256-slot pool) and is compressed from the step its cache reaches the range, where full attention would
    have refused it; a sequence that fits never evicts."""
    prompt = torch.randint(0, 128, (20,), generator=torch.Generator().manual_seed(4)).tolist()
    params = SamplingParams(temperature=0, max_tokens=400, ignore_eos=True)
    full = Engine(tiny, EngineConfig(device="cpu", dtype="float32", kv_tokens=1024, evict=EvictionConfig("full")))
    want = full.generate([prompt], params)[0].output_ids
    cramped = Engine(tiny, EngineConfig(device="cpu", dtype="float32", kv_tokens=256, evict=EvictionConfig("full")))
    with pytest.raises(OpenClawError, match="KV slots"):
        cramped.add_request(prompt, params)
    auto = Engine(tiny, EngineConfig(device="cpu", dtype="float32", kv_tokens=256, cache_dir=tmp_path))
    assert (auto.evict.scorer, auto.evict.budget, auto.evict.protect_recent) == ("triattention", 128, 32)
    seq = auto.generate([prompt], params)[0]
    assert len(seq.output_ids) == 400 and seq.capacity == 256
    assert seq.first_eviction == 256, "eviction must start exactly when the cache fills the range"
    assert seq.evictions == auto.compressor.evictions == 1 + (420 - 1 - 256) // 128
    # the token sampled from the step that filled the range was computed before the compression
    assert seq.output_ids[:256 - 20 + 1] == want[:256 - 20 + 1]
    assert seq.output_ids != want, "after eviction the continuation is expected to differ somewhere"
    roomy = Engine(tiny, EngineConfig(device="cpu", dtype="float32", kv_tokens=1024, cache_dir=tmp_path))
    seq = roomy.generate([prompt], params)[0]
    assert seq.output_ids == want and seq.evictions == 0 and roomy.compressor.evictions == 0


def test_the_attention_received_comes_from_the_forward_itself(tiny):
    """BatchMeta.key_mass: prefill chunks and decode steps add, at each key's slot, the attention it received (what
    H2O accumulates and TriAttention's attention term reads), equal to the softmax of the step's queries written out."""
    from openclaw.engine.graphs import StepTap
    from openclaw.engine.kv_pool import KVPool
    from openclaw.engine.runner import Runner
    from openclaw.engine.scheduler import Scheduler
    from openclaw.engine.sequence import Sequence

    model = load_model(tiny, torch.device("cpu"), torch.float32)
    mc = model.config
    ids = torch.randint(0, 128, (70,), generator=torch.Generator().manual_seed(5)).tolist()
    pool = KVPool(mc.num_hidden_layers, 80, mc.num_key_value_heads, mc.head_dim, torch.float32, "cpu")
    mass = torch.zeros(mc.num_hidden_layers, 80, mc.num_key_value_heads)
    runner = Runner(model, pool, torch.device("cpu"))
    seq = Sequence(ids[:50], SamplingParams(max_tokens=20, ignore_eos=True), max_len=80)
    scheduler = Scheduler(pool.allocator, max_seqs=1, max_batch_tokens=16)  # prefill in chunks of 16
    scheduler.add(seq)
    queries = [[] for _ in range(mc.num_hidden_layers)]
    calls = []

    def record(q_pre, q_post):
        queries[len(calls) % mc.num_hidden_layers].append(q_post.clone())
        calls.append(1)

    class Taps:
        graphable = True

        def tap(self, batch):
            return StepTap([], [], lambda inputs, slots, positions: record, key_mass=mass)

    while seq.num_computed < 69:
        batch = scheduler.schedule()
        _, seqs = runner.step(batch, Taps())
        scheduler.advance(batch)
        if seqs:
            scheduler.postprocess(seqs, [ids[seq.num_tokens]])  # teacher forcing: decode steps of single tokens
    G = mc.num_attention_heads // mc.num_key_value_heads
    for layer in (0, mc.num_hidden_layers - 1):
        q = torch.cat(queries[layer]).unflatten(1, (mc.num_key_value_heads, G))  # [69, Hkv, G, D]
        k = pool.k[layer, :69]  # [69, Hkv, D]
        logits = torch.einsum("thgd,shd->hgts", q, k) * mc.head_dim ** -0.5
        causal = torch.ones(69, 69, dtype=torch.bool).tril()
        want = torch.softmax(logits.masked_fill(~causal, float("-inf")), -1).sum((1, 2)).T  # [69, Hkv]
        torch.testing.assert_close(mass[layer, :69], want, rtol=1e-4, atol=1e-5)
    assert mass[:, 69:].abs().sum() == 0


def test_chunked_metrics_equal_the_whole_window_computation(tiny):
    """evaluate() sums KL / top-1 / NLL chunk by chunk in lockstep with one full-attention reference; the old harness
    kept every scored position's log-probs of both runs and compared them at once. Same numbers, two windows."""
    model = load_model(tiny, torch.device("cpu"), torch.float32)
    g = torch.Generator().manual_seed(8)
    windows = [torch.randint(0, 128, (180,), generator=g).tolist() for _ in range(2)]
    runs = [("full", EvictionConfig(policy="full")), ("streaming@32", evict("streaming", 32)),
            ("h2o@32", evict("h2o", 32)), ("tri@32", evict("triattention", 32))]
    start = 40
    rows = {r.label: r for r in evaluate(model, windows, runs, start=start)}
    for label, cfg in runs:
        kl = top1 = nll = nll_full = tokens = evictions = 0
        for ids in windows:
            full, _ = forced_logprobs(model, ids, EvictionConfig(policy="full"), start=start)
            ev, n = forced_logprobs(model, ids, cfg, start=start)
            targets = torch.tensor(ids[start + 1:])[:, None]
            kl += (full.exp() * (full - ev)).sum().item()
            top1 += int((full.argmax(-1) == ev.argmax(-1)).sum())
            nll -= ev.gather(1, targets).sum().item()
            nll_full -= full.gather(1, targets).sum().item()
            tokens += len(targets)
            evictions += n
        r = rows[label]
        assert (r.tokens, r.evictions, r.top1) == (tokens, evictions, top1 / tokens), label
        assert r.kl == pytest.approx(kl / tokens, rel=1e-6, abs=1e-9), label
        assert math.log(r.ppl) == pytest.approx(nll / tokens, rel=1e-6) and math.log(r.ppl_full) == pytest.approx(
            nll_full / tokens, rel=1e-6), label
    assert rows["full"].kl == 0 and rows["streaming@32"].evictions > 0 and rows["streaming@32"].kl > 0
