"""The engine end to end: greedy parity with transformers' generate, batching, and SmolLM2 from its GGUF."""

import pytest
import torch
from tiny_models import full_forward, make_hf_model

from openclaw.config import EngineConfig, SamplingParams
from openclaw.engine.engine import Engine, resolve_dtype
from openclaw.errors import OpenClawError
from openclaw.weights.hub import resolve_model
from openclaw.weights.loader import load_model

GREEDY = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)


def fp32_engine(path, **kw) -> Engine:
    return Engine(path, EngineConfig(device="cpu", dtype="float32", kv_tokens=kw.pop("kv_tokens", 1024), **kw))


def hf_greedy(hf, prompt: list[int], n: int) -> list[int]:
    hf.generation_config.eos_token_id = None  # like ignore_eos (min_new_tokens would mask eos logits instead)
    with torch.no_grad():
        out = hf.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False, pad_token_id=0)
    return out[0, len(prompt):].tolist()


@pytest.mark.parametrize("kind", ["qwen3", "qwen2", "llama"])
def test_greedy_matches_transformers_generate(kind, tmp_path):
    hf = make_hf_model(kind, tmp_path)
    engine = fp32_engine(tmp_path)
    prompt = torch.randint(0, 128, (23,), generator=torch.Generator().manual_seed(2)).tolist()
    ours = engine.generate([prompt], GREEDY)[0].output_ids
    assert len(ours) == 32
    assert ours == hf_greedy(hf, prompt, 32)


def test_batch_of_different_lengths_equals_each_alone(tmp_path):
    make_hf_model("qwen3", tmp_path)
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 128, (n,), generator=g).tolist() for n in (5, 61, 17, 130, 1)]
    alone = [fp32_engine(tmp_path).generate([p], GREEDY)[0].output_ids for p in prompts]
    # small max_batch_tokens: long prompts prefill in chunks while others already decode
    batched = fp32_engine(tmp_path, max_batch_tokens=48).generate(prompts, GREEDY)
    assert [s.output_ids for s in batched] == alone


def test_pool_slots_are_returned_when_sequences_finish(tmp_path):
    make_hf_model("llama", tmp_path)
    engine = fp32_engine(tmp_path, kv_tokens=100, max_seqs=2)
    # three requests of 50 slots each cannot all be resident: the third waits for a finished one
    seqs = engine.generate([[1, 2, 3]] * 3, SamplingParams(temperature=0, max_tokens=47, ignore_eos=True))
    assert all(len(s.output_ids) == 47 for s in seqs)
    assert engine.pool.allocator.num_free == 100


def test_sampling_with_seed_is_reproducible_and_varies_with_seed(tmp_path):
    make_hf_model("qwen2", tmp_path)
    engine = fp32_engine(tmp_path)

    def run(seed):
        p = SamplingParams(temperature=1.5, top_k=0, top_p=1.0, min_p=0.0, seed=seed, max_tokens=24, ignore_eos=True)
        return engine.generate([[5, 6, 7]], p)[0].output_ids

    assert run(1) == run(1)
    assert run(1) != run(2)


@pytest.mark.slow
def test_smollm2_gguf_matches_transformers_gguf_loading(smollm2_gguf, tmp_path):
    """Our GGUF import + model definition against transformers' own GGUF dequantization of the same file."""
    transformers = pytest.importorskip("transformers")
    model_dir = resolve_model(str(smollm2_gguf), tmp_path)
    ours = load_model(model_dir, torch.device("cpu"), torch.float32)
    hf = transformers.AutoModelForCausalLM.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name,
                                                           dtype=torch.float32).eval()
    ids = [1, 4093, 314, 260, 3575, 282, 4649, 47, 378, 3575, 282] + list(range(300, 400))
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0]
    got = full_forward(ours, ids)
    torch.testing.assert_close(got, ref, rtol=1e-3, atol=1e-3)
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean() == 1.0


def test_generation_config_is_read_as_transformers_reads_it():
    from openclaw.engine.engine import sampling_defaults

    assert sampling_defaults({"eos_token_id": 2})["temperature"] == 0.0  # silent config: greedy
    qwen3 = sampling_defaults({"do_sample": True, "temperature": 0.6, "top_p": 0.95, "top_k": 20})
    assert (qwen3["temperature"], qwen3["top_p"], qwen3["top_k"], qwen3["min_p"]) == (0.6, 0.95, 20, 0.0)
    assert sampling_defaults({"do_sample": True})["temperature"] == 1.0
    assert sampling_defaults({"do_sample": False, "temperature": 0.7})["temperature"] == 0.0
    # a flag always wins over the config
    assert SamplingParams(temperature=0.5).with_defaults(sampling_defaults({})).temperature == 0.5


def test_a_row_with_non_finite_logits_fails_alone(tmp_path):
    """The bad-row contract: a sequence whose logits are not all finite gets token -1 and finishes with reason
    "error"; the sequence beside it in the same steps decodes as it would alone."""
    make_hf_model("llama", tmp_path)
    engine = fp32_engine(tmp_path)
    with torch.no_grad():
        engine.model.model.embed_tokens.weight[77] = float("nan")  # any sequence that holds token 77 is poisoned
    good = [5, 6, 7, 8]
    alone = fp32_engine(tmp_path).generate([good], GREEDY)[0].output_ids
    bad = engine.add_request([1, 77, 3], GREEDY)
    ok = engine.add_request(good, GREEDY)
    first = engine.step()
    assert (bad, -1) in first and bad.finish_reason == "error" and not bad.output_ids
    while engine.has_work():
        engine.step()
    assert ok.output_ids == alone and ok.finish_reason == "length"
    assert engine.pool.allocator.num_free == engine.pool.num_slots


@pytest.mark.parametrize("kind", ["qwen3", "qwen2", "llama"])
def test_cpu_float16_default_agrees_with_float32(kind, tmp_path):
    """The CPU default dtype (float16 weights and activations; products of 4+ rows in fp32) against float32, greedy,
    8 sequences decoding together: nearly every token equal (bf16 keeps 62-91% on these models: bench/RESULTS-cpu.md)."""
    make_hf_model(kind, tmp_path)
    g = torch.Generator().manual_seed(11)
    prompts = [torch.randint(0, 128, (n,), generator=g).tolist() for n in (5, 23, 40, 9, 31, 2, 17, 12)]
    params = SamplingParams(temperature=0, max_tokens=48, ignore_eos=True)
    out = {}
    for dtype in ("auto", "float32"):
        engine = Engine(tmp_path, EngineConfig(device="cpu", dtype=dtype, kv_tokens=2048, max_seqs=8))
        out[dtype] = [s.output_ids for s in engine.generate(prompts, params)]
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float16
    same = sum(a == b for x, y in zip(out["auto"], out["float32"]) for a, b in zip(x, y))
    assert same >= 0.9 * 8 * 48
def _poison(engine: Engine, bad, *, raises: Exception | None = None) -> None:
    """Make the forward fail for sequences bad(seq) says are poisoned: raise (only when the batch holds one), or
    give their rows NaN logits."""
    step = engine.runner.step

    def poisoned(batch, tap=None, rows=None):
        if raises is not None and any(bad(seq) for seq, _ in batch):
            raise raises
        logits, seqs = step(batch, tap, rows)
        with torch.inference_mode():  # the runner's logits are inference tensors
            for i, seq in enumerate(seqs):
                if bad(seq):
                    logits[i, 5] = float("nan")
        return logits, seqs

    engine.runner.step = poisoned


@pytest.mark.parametrize("failure", ["nan", "exception", "openclaw_error"])
def test_one_failing_sequence_leaves_the_rest_of_the_batch_running(failure, tmp_path):
    make_hf_model("qwen3", tmp_path)
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, 128, (n,), generator=g).tolist() for n in (7, 30, 12)]
    alone = [fp32_engine(tmp_path).generate([p], GREEDY)[0].output_ids for p in prompts]
    engine = fp32_engine(tmp_path, max_batch_tokens=32)
    seqs = [engine.add_request(p, GREEDY) for p in prompts]
    for _ in range(3):  # all three are decoding together before the failure
        engine.step()
    bad = seqs[1]
    before = list(bad.output_ids)
    assert before and all(s.output_ids for s in seqs)
    raises = {"nan": None, "exception": RuntimeError("injected"), "openclaw_error": OpenClawError("your fault")}
    _poison(engine, lambda s: s is bad, raises=raises[failure])
    reported = []
    while engine.has_work():
        reported += [(s, t) for s, t in engine.step() if s is bad]
    assert bad.finish_reason == "error" and reported == [(bad, -1)], reported
    assert bad.error == {"nan": "the model produced non-finite logits (NaN or inf) for this request",
                         "exception": "the engine failed on this request (RuntimeError: injected); the server log "
                                      "has the details",
                         "openclaw_error": "your fault"}[failure]
    assert bad.input_error == (failure == "openclaw_error") and bad.output_ids == before  # no token for the bad row
    for seq, want in zip((seqs[0], seqs[2]), (alone[0], alone[2])):
        assert seq.finish_reason == "length" and seq.output_ids == want  # untouched by their neighbour's failure
    assert engine.pool.allocator.num_free == engine.pool.num_slots


def test_a_prefilling_sequence_that_fails_is_reported_too(tmp_path):
    make_hf_model("llama", tmp_path)
    engine = fp32_engine(tmp_path, max_batch_tokens=16)
    long, short = engine.add_request(list(range(1, 60)), GREEDY), engine.add_request([3, 4, 5], GREEDY)
    _poison(engine, lambda s: s is long, raises=ValueError("bad chunk"))
    first = engine.step()  # long's first chunk fails before it samples anything; short goes on
    assert (long, -1) in first and long.finish_reason == "error" and "ValueError: bad chunk" in long.error
    while engine.has_work():
        engine.step()
    assert short.finish_reason == "length" and len(short.output_ids) == GREEDY.max_tokens


def test_stop_token_ids_min_tokens_and_ignore_eos(tmp_path):
    make_hf_model("qwen2", tmp_path)
    prompt = [9, 8, 7, 6]
    free = fp32_engine(tmp_path).generate([prompt], GREEDY)[0].output_ids
    stop = free[5]
    params = SamplingParams(temperature=0, max_tokens=32, stop_token_ids=[stop])
    seq = fp32_engine(tmp_path).generate([prompt], params)[0]
    assert seq.finish_reason == "stop" and seq.output_ids == free[:free.index(stop) + 1]
    eos_first = Engine(tmp_path, EngineConfig(device="cpu", dtype="float32", kv_tokens=1024), extra_eos={free[0]})
    assert eos_first.generate([prompt], SamplingParams(temperature=0, max_tokens=32))[0].output_ids == free[:1]
    held = eos_first.generate([prompt], SamplingParams(temperature=0, max_tokens=32, min_tokens=6))[0]
    assert len(held.output_ids) >= 7 and free[0] not in held.output_ids[:6]  # eos masked for 6 tokens
    ignored = eos_first.generate([prompt], SamplingParams(temperature=0, max_tokens=10, ignore_eos=True))[0]
    assert ignored.output_ids == free[:10] and ignored.finish_reason == "length"
    with pytest.raises(OpenClawError, match="min_tokens 40 must be in"):
        SamplingParams(max_tokens=32, min_tokens=40)
