"""openclaw/engine/graphs.py: the batched static decode step (staged inputs, padded rows, KV-length buckets), run
eagerly through the very code a CUDA graph captures, equals the dynamic path token for token on the tiny random
families: batch sizes 1-8, mixed prompt lengths, steps that mix prefill chunks and decodes, and evictions of every
policy. Padded rows write nowhere; the registry stays within its buckets however many slot bases it meets. On CUDA
the captured graphs equal the eager steps."""

import pytest
import torch
from tiny_models import make_hf_model

from openclaw.config import EngineConfig, EvictionConfig, SamplingParams
from openclaw.engine.engine import Engine
from openclaw.engine.graphs import DecodeGraphs, batch_buckets, len_buckets
from openclaw.engine.runner import Runner
from openclaw.engine.sequence import Sequence
from openclaw.evict.calibrate import calibrate
from openclaw.evict.stats_file import model_metadata, save_stats

CUDA = torch.cuda.is_available()
PROMPTS = (3, 29, 11, 1, 17, 25, 7, 13)  # 8 sequences of mixed lengths, all under the eviction budget
EVICT = {"budget": 40, "divide_length": 8, "protect_recent": 8, "window": 8, "sinks": 4}


def prompts(n: int = len(PROMPTS)) -> list[list[int]]:
    g = torch.Generator().manual_seed(7)
    return [torch.randint(0, 128, (k,), generator=g).tolist() for k in PROMPTS[:n]]


def engine(path, graphs: str, device: str = "cpu", dtype: str = "float32", **kw) -> Engine:
    """An engine whose decode rows run through the static steps ("eager", "capture") or dynamically ("off")."""
    e = Engine(path, EngineConfig(device=device, dtype=dtype, kv_tokens=kw.pop("kv_tokens", 2048),
                                  max_seqs=kw.pop("max_seqs", 8), max_batch_tokens=16, cuda_graphs=False, **kw))
    e.runner = Runner(e.model, e.pool, e.device, graphs, e.config.max_seqs, e.max_model_len)
    return e


def run(e: Engine, ids: list[list[int]]) -> list[list[int]]:
    # different lengths: sequences finish one by one, so decode batches shrink through every size (and pad)
    params = [SamplingParams(temperature=0, max_tokens=30 + 5 * i, ignore_eos=True) for i in range(len(ids))]
    return [s.output_ids for s in e.generate(ids, params)]


def stats_file(path, tmp_path) -> str:
    e = Engine(path, EngineConfig(device="cpu", dtype="float32", kv_tokens=512))
    ids = torch.randint(0, 128, (300,), generator=torch.Generator().manual_seed(1)).tolist()
    f = tmp_path / "stats.pt"
    save_stats(f, calibrate(e.model, ids, context=128).tri_stats(e.model.bands.omega), model_metadata(e.model, "tiny"),
               300)
    return str(f)


CASES = [("qwen3", p) for p in ("full", "streaming", "snapkv", "rkv", "h2o", "triattention", "triattention-auto")]
CASES += [("llama", "full"), ("llama", "snapkv"), ("qwen2", "triattention-auto"), ("glm4", "snapkv"),
          ("glm4_moe_lite", "full"), ("glm4_moe_lite", "triattention-auto")]


@pytest.mark.parametrize("kind,policy", CASES)
def test_static_decode_equals_dynamic(kind, policy, tmp_path):
    make_hf_model(kind, tmp_path / "m")
    path = tmp_path / "m"
    evict = EvictionConfig(policy="full")
    if policy != "full":
        name, _, auto = policy.partition("-")
        stats = None if name != "triattention" else "auto" if auto else stats_file(path, tmp_path)
        evict = EvictionConfig(policy=name, stats=stats, **EVICT)
    ids = prompts()
    dynamic = engine(path, "off", evict=evict)
    static = engine(path, "eager", evict=evict)
    assert run(static, ids) == run(dynamic, ids)
    steps = static.runner.graphs.steps
    assert {key[0] for key in steps} >= {1, 2, 4, 8}  # every batch bucket, most of them padded at times
    if policy == "h2o":  # the attention mass comes from the attention itself: padded rows must add none
        torch.testing.assert_close(static.compressor.mass, dynamic.compressor.mass, rtol=1e-5, atol=1e-5)
    if policy != "full":
        assert static.compressor.evictions == dynamic.compressor.evictions > 8


@pytest.mark.parametrize("kind", ["qwen3", "glm4_moe_lite"])
def test_padded_rows_write_nowhere_and_lengths_are_inputs(kind, tmp_path):
    """Three sequences at far-apart slot bases in a bucket of 4: the padded row leaves every slot but the three new
    ones untouched (NaN stays NaN), and the same step object serves other bases and lengths. (MLA's latent write
    once sent the padded row's slot -1 to index_copy_: the pool's last slot on a CPU, a device-side assert on CUDA.)"""
    make_hf_model(kind, tmp_path)
    e = engine(tmp_path, "eager", kv_tokens=1024)
    graphs: DecodeGraphs = e.runner.graphs
    e.pool.k.fill_(float("nan"))
    e.pool.v.fill_(float("nan"))
    g = torch.Generator().manual_seed(0)
    seqs = []
    for base, n in ((700, 5), (3, 9), (400, 1)):
        seq = Sequence(torch.randint(0, 128, (n + 1,), generator=g).tolist(), SamplingParams(), max_len=100)
        seq.slot_base, seq.num_computed, seq.kv_len = base, n, n
        e.pool.k[:, base:base + n] = torch.randn(n, *e.pool.k.shape[2:], generator=g)
        e.pool.v[:, base:base + n] = torch.randn(n, *e.pool.v.shape[2:], generator=g)
        seqs.append(seq)
    written = [s.slot_base + s.kv_len for s in seqs]
    before = e.pool.k.isnan()
    logits = graphs.run(seqs)
    assert logits.shape[0] == 3 and torch.isfinite(logits).all()
    changed = before & ~e.pool.k.isnan()
    assert changed.any(0).any(-1).any(-1).nonzero().flatten().tolist() == sorted(written)
    dynamic, _ = Runner(e.model, e.pool, e.device).step([(s, 1) for s in seqs])
    torch.testing.assert_close(logits, dynamic, rtol=1e-5, atol=1e-5)
    assert list(graphs.steps) == [(4, 256, 0, False)]


def test_registry_is_bounded_over_many_slot_bases(tmp_path):
    """Forty requests of different lengths through four rows at a time: the allocator hands out many slot bases, the
    registry holds one step per (batch bucket, length bucket) it met, never more than its bound."""
    make_hf_model("llama", tmp_path)
    e = engine(tmp_path, "eager", kv_tokens=1500, max_seqs=4)
    g = torch.Generator().manual_seed(2)
    ids = [torch.randint(0, 128, (int(n),), generator=g).tolist() for n in torch.randint(1, 60, (40,), generator=g)]
    bases = set()
    params = [SamplingParams(temperature=0, max_tokens=int(m), ignore_eos=True)
              for m in torch.randint(2, 24, (40,), generator=g)]
    for i, p in zip(ids, params):
        e.add_request(i, p)
    while e.has_work():
        e.step()
        bases |= {s.slot_base for s in e.scheduler.running}
    graphs = e.runner.graphs
    assert len(bases) >= 20
    assert graphs.batch_buckets == [1, 2, 4] and graphs.len_buckets == [256, 512]
    assert 3 <= len(graphs.steps) <= graphs.max_steps == 6  # (1, 2, 4 rows) x (256, 512 slots)


def test_buckets():
    assert batch_buckets(1) == [1] and batch_buckets(16) == [1, 2, 4, 8, 16]
    assert batch_buckets(12) == [1, 2, 4, 8, 12] and batch_buckets(3) == [1, 2, 3]
    assert len_buckets(100) == [256] and len_buckets(256) == [256] and len_buckets(40960) == [256 * 2 ** i
                                                                                               for i in range(9)]


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("policy", ["full", "snapkv", "triattention-auto"])
def test_gpu_captured_graphs_equal_eager_steps(policy, tmp_path):
    """The captured graphs replay the eager static steps token for token (fp32: no rounding-order flips), across
    batch buckets, length buckets and evictions, with one memory pool."""
    make_hf_model("qwen3", tmp_path)
    evict = EvictionConfig(policy="full")
    if policy != "full":
        name, _, auto = policy.partition("-")
        evict = EvictionConfig(policy=name, stats="auto" if auto else None, **EVICT)
    ids = prompts()
    eager = engine(tmp_path, "eager", device="cuda", evict=evict)
    captured = engine(tmp_path, "capture", device="cuda", evict=evict)
    assert run(captured, ids) == run(eager, ids)
    graphs = captured.runner.graphs
    assert graphs.capture and graphs.mempool is not None
    assert all(s.graph is not None for s in graphs.steps.values()) and len(graphs.steps) <= graphs.max_steps


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_gpu_decode_step_copies_to_the_host_once(tmp_path):
    """A batched decode step on the graphs, with a query tap and sampling: one device-to-host copy (the tokens),
    counted by CUDA's sync debug mode."""
    import warnings

    make_hf_model("qwen3", tmp_path)
    evict = EvictionConfig(policy="triattention", stats="auto", **EVICT)
    e = engine(tmp_path, "capture", device="cuda", dtype="bfloat16", evict=evict)
    params = [SamplingParams(temperature=t, top_p=0.9, repetition_penalty=1.1, seed=i, max_tokens=60,
                             ignore_eos=True) for i, t in enumerate((0.0, 0.8, 1.0))]
    for p, ids in zip(params, prompts(3)):
        e.add_request(ids, p)
    for _ in range(8):  # prefill, then capture this bucket's graph
        e.step()
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            e.step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = [w for w in caught if "synchroniz" in str(w.message)]
    assert len(syncs) == 1, [str(w.message) for w in syncs]
