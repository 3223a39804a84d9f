"""The fidelity harness and eviction in the engine: with budget >= length nothing changes (bit for bit); with a
small budget every policy evicts, generates past its slot count, and the harness sees the difference."""

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
    assert len(rows) == 1 + len(EVICTING) + 3
    # the progress bar's figures: tokens forced so far, of full attention's pass plus each evicting run's, per window
    assert calls[-1][1:] == (2 * 200 * len(rows), 2 * 200 * len(rows)) and calls[0][0].startswith("window 1/2")
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
    full, _ = forced_logprobs(model, ids, EvictionConfig(), start=40)
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
    assert tight.pool.allocator.num_free == 56 and not tight.compressor.rows and not tight.compressor.attention


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
    assert len(seq.output_ids) == 100 and engine.compressor.evictions >= 5
    assert engine.pool.allocator.num_free == 56
