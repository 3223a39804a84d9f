"""Calibration: exact pre-RoPE queries (after q_norm), the reference stats format, refusals, online statistics."""

import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from tiny_models import make_hf_model, quantized_copy

from openclaw.config import EngineConfig, EvictionConfig, SamplingParams
from openclaw.engine.engine import Engine
from openclaw.errors import OpenClawError
from openclaw.evict.calibrate import StatsTaps, calibrate, concentration
from openclaw.evict.evictor import TriStats
from openclaw.evict.query_stats import QueryStats, load_sums, running_path, save_sums
from openclaw.evict.stats_file import load_stats, save_stats
from openclaw.weights.loader import load_model

OMEGA = 1.0 / 1e4 ** (torch.arange(0, 24, 2).float() / 24)


def random_stats(L=3, H=4, D=24, seed=0) -> TriStats:
    g = torch.Generator().manual_seed(seed)
    mu_re, mu_im = torch.randn(L, H, D // 2, generator=g), torch.randn(L, H, D // 2, generator=g)
    return TriStats(mu_re, mu_im, torch.sqrt(mu_re ** 2 + mu_im ** 2) + 0.1, OMEGA)


def test_tap_sees_the_queries_after_q_norm(tmp_path):
    """The captured pre-RoPE query is q_norm's output (the reference calibrate script forgot q_norm)."""
    hf = make_hf_model("qwen3", tmp_path)
    ours = load_model(tmp_path, torch.device("cpu"), torch.float32)
    ids = list(range(3, 40))
    seen = []
    hook = hf.model.layers[1].self_attn.q_norm.register_forward_hook(lambda m, i, o: seen.append(o[0].detach()))
    with torch.no_grad():
        hf(torch.tensor([ids]))
    hook.remove()
    stats = calibrate(ours, ids)
    want = seen[0]  # [T, H, D]
    half = want.shape[-1] // 2
    torch.testing.assert_close(stats.re[1].float(), want[..., :half].sum(0), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(stats.im[1].float(), want[..., half:].sum(0), rtol=1e-4, atol=1e-4)
    assert stats.tokens == len(ids)


def test_calibration_and_forced_logprobs_on_a_quantized_model(tmp_path):
    """A quantized model (QuantEmbedding has no .weight) calibrates, and teacher-forces for `openclaw eval`, like the
    full-precision model holding its dequantized weights."""
    from openclaw.eval.fidelity import forced_logprobs

    make_hf_model("qwen3", tmp_path / "hf")
    ref_sd = quantized_copy(tmp_path / "hf", tmp_path / "q", mixed=True)
    (tmp_path / "ref").mkdir()
    save_file(ref_sd, str(tmp_path / "ref" / "model.safetensors"))
    (tmp_path / "ref" / "config.json").write_text((tmp_path / "hf" / "config.json").read_text())
    quantized = load_model(tmp_path / "q", torch.device("cpu"), torch.float32)
    reference = load_model(tmp_path / "ref", torch.device("cpu"), torch.float32)
    assert quantized.quantized and not hasattr(quantized.model.embed_tokens, "weight")
    ids = torch.randint(0, 128, (200,), generator=torch.Generator().manual_seed(2)).tolist()
    done = []
    got = calibrate(quantized, ids, context=128, chunk=64, progress=lambda what, n, total: done.append((n, total)))
    want = calibrate(reference, ids, context=128, chunk=64)
    assert got.tokens == want.tokens == len(ids)
    assert done == [(n, 200) for n in (64, 128, 192, 200)]  # tokens done after each chunk: the progress bar's figures
    for a, b in ((got.re, want.re), (got.im, want.im), (got.abs, want.abs)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    evict = EvictionConfig(policy="streaming", budget=64, protect_recent=8)
    (lp, n), (lp_ref, n_ref) = forced_logprobs(quantized, ids, evict), forced_logprobs(reference, ids, evict)
    assert n == n_ref > 0
    torch.testing.assert_close(lp, lp_ref, rtol=1e-4, atol=1e-4)


def meta(L=3, H=4, D=24, q_norm=False) -> dict:
    """model_metadata of a model of these shapes (its RoPE: OMEGA, theta 1e4)."""
    return {"model_name": "tiny", "num_layers": L, "num_attention_heads": H, "num_key_value_heads": 2, "head_dim": D,
            "rope_style": "half", "blocks": [[0, D]], "rope_theta": 1e4, "rope_type": "default",
            "inv_freq": OMEGA.tolist()[:D // 2], "query_capture": "rope_input", "q_norm": q_norm}


def reference_payload(s: TriStats, heads, **metadata) -> dict:
    """A file as the reference's calibrate script writes it: sampled_heads, head_dim, rope_style, no model shapes."""
    md = {"sampled_heads": [list(h) for h in heads], "head_dim": 24, "rope_style": "half", "model_name": "their-model",
          "rope_type": "default", "dtype": "bfloat16"} | metadata
    return {"metadata": md, "stats": {f"layer{layer:02d}_head{h:02d}": {"q_mean_real": s.mu_re[layer, h],
                                                                        "q_mean_imag": s.mu_im[layer, h],
                                                                        "q_abs_mean": s.a_mean[layer, h]}
                                      for layer, h in heads}}


def test_stats_file_round_trips(tmp_path):
    s = random_stats()
    save_stats(tmp_path / "s.pt", s, meta(), tokens=100)
    got = load_stats(tmp_path / "s.pt", meta(), OMEGA)
    for a, b in zip((got.mu_re, got.mu_im, got.a_mean), (s.mu_re, s.mu_im, s.a_mean)):
        assert torch.equal(a, b)
    assert got.heads is None
    data = torch.load(tmp_path / "s.pt", weights_only=True)
    md = data["metadata"]
    assert md["sampled_heads"][5] == [1, 1] and md["rope_style"] == "half" and md["calibration_tokens"] == 100
    assert md["query_capture"] == "rope_input" and md["rope_theta"] == 1e4 and len(md["inv_freq"]) == 12
    assert set(data["stats"]["layer02_head03"]) == {"q_mean_real", "q_mean_imag", "q_abs_mean"}


def test_reference_plugin_files_load(tmp_path, caplog):
    """Their files carry only sampled_heads, head_dim, rope_style and model_name (no shapes, RoPE or capture point):
    they load; for a model with q_norm (Qwen3) with a warning, as their calibrate script captures before q_norm."""
    s = random_stats(L=2, H=2)
    torch.save(reference_payload(s, [(0, 0), (0, 1), (1, 0), (1, 1)]), tmp_path / "ref.pt")
    with caplog.at_level("WARNING"):
        got = load_stats(tmp_path / "ref.pt", meta(L=2, H=2), OMEGA)
    assert torch.equal(got.mu_im, s.mu_im) and not caplog.records
    with caplog.at_level("WARNING"):
        load_stats(tmp_path / "ref.pt", meta(L=2, H=2, q_norm=True), OMEGA)
    assert len(caplog.records) == 1 and "before q_norm" in caplog.records[0].getMessage()


def test_partial_head_files_load_with_the_heads_marked(tmp_path):
    """A reference file that covers a subset of heads (`sampled_heads`) loads; the others are marked missing."""
    s = random_stats(L=2, H=4)
    torch.save(reference_payload(s, [(0, 1), (1, 0), (1, 3)]), tmp_path / "ref.pt")
    got = load_stats(tmp_path / "ref.pt", meta(L=2, H=4), OMEGA)
    assert got.heads.tolist() == [[False, True, False, False], [True, False, False, True]]
    assert torch.equal(got.mu_re[1, 3], s.mu_re[1, 3]) and got.mu_re[0, 0].abs().sum() == 0


@pytest.mark.parametrize("shape, match", [((3, 4, 32), "head_dim"), ((3, 8, 24), "num_attention_heads"),
                                          ((5, 4, 24), "num_layers")])
def test_stats_of_another_model_are_refused(tmp_path, shape, match):
    save_stats(tmp_path / "s.pt", random_stats(), meta(), tokens=100)
    with pytest.raises(OpenClawError, match=match):
        load_stats(tmp_path / "s.pt", meta(*shape), OMEGA)


def test_stats_of_other_rope_are_refused(tmp_path):
    save_stats(tmp_path / "s.pt", random_stats(), meta(), tokens=100)
    other = meta() | {"inv_freq": (OMEGA * 2).tolist()}
    with pytest.raises(OpenClawError, match="RoPE frequencies"):
        load_stats(tmp_path / "s.pt", other, OMEGA)
    s = random_stats(L=1, H=2)
    torch.save(reference_payload(s, [(0, 0), (0, 1)], rope_theta=5e5), tmp_path / "ref.pt")
    with pytest.raises(OpenClawError, match="rope_theta"):
        load_stats(tmp_path / "ref.pt", meta(L=1, H=2), OMEGA)


def test_reference_file_outside_the_model_or_other_layout_is_refused(tmp_path):
    s = random_stats(L=1, H=2)
    torch.save(reference_payload(s, [(0, 0), (0, 1)]), tmp_path / "ref.pt")
    with pytest.raises(OpenClawError, match="outside this model"):
        load_stats(tmp_path / "ref.pt", meta(L=1, H=1), OMEGA)
    torch.save(reference_payload(s, [(0, 0), (0, 1)], rope_style="interleaved"), tmp_path / "ref.pt")
    with pytest.raises(OpenClawError, match="interleaved"):
        load_stats(tmp_path / "ref.pt", meta(L=1, H=2), OMEGA)


class Payload:
    def __reduce__(self):
        return (print, ("this ran code",))


def test_files_that_need_code_to_load_are_refused(tmp_path):
    with open(tmp_path / "evil.pt", "wb") as f:
        pickle.dump({"metadata": Payload()}, f, protocol=2)
    (tmp_path / "junk.pt").write_bytes(b"not a torch file" * 8)
    for name in ("evil.pt", "junk.pt"):
        with pytest.raises(OpenClawError, match="is not a stats file") as e:
            load_stats(tmp_path / name, meta(), OMEGA)
        assert "\n" not in str(e.value)  # torch's refusal runs over five lines
        assert "weights_only" not in str(e.value)  # torch's advice (weights_only=False) would run the file's code
    with pytest.raises(OpenClawError, match="does not exist"):
        load_stats(tmp_path / "missing.pt", meta(), OMEGA)


def _reference_payload(L: int = 1, H: int = 2) -> dict:
    s = random_stats(L=L, H=H)
    return {"metadata": {"sampled_heads": [[layer, h] for layer in range(L) for h in range(H)], "head_dim": 24},
            "stats": {f"layer{layer:02d}_head{h:02d}": {"q_mean_real": s.mu_re[layer, h], "q_mean_imag": s.mu_im[layer, h],
                                                      "q_abs_mean": s.a_mean[layer, h]}
                      for layer in range(L) for h in range(H)}}


@pytest.mark.parametrize("damage", [
    lambda p: p["stats"].update(layer00_head01="not a dict"),
    lambda p: p["stats"]["layer00_head00"].pop("q_mean_imag"),
    lambda p: p["stats"]["layer00_head00"].update(q_mean_real="text"),
    lambda p: p["stats"]["layer00_head00"].update(q_mean_real=torch.full((12,), float("nan"))),
    lambda p: p["metadata"].update(sampled_heads=[["zero", 0], [0, 1]]),
    lambda p: p["metadata"].update(sampled_heads=[[0], [0, 1]]),
    lambda p: p["metadata"].update(sampled_heads=7),
])
def test_malformed_stats_files_are_one_line_errors(tmp_path, damage):
    """These raised TypeError / KeyError / ValueError with a traceback (exit 1)."""
    payload = _reference_payload()
    damage(payload)
    torch.save(payload, tmp_path / "bad.pt")
    with pytest.raises(OpenClawError, match="bad.pt") as e:
        load_stats(tmp_path / "bad.pt", meta(L=1, H=2), OMEGA)
    assert "\n" not in str(e.value)


def test_stats_are_written_through_a_temporary_file(tmp_path, monkeypatch):
    save_stats(tmp_path / "s.pt", random_stats(), meta(), tokens=100)
    before = (tmp_path / "s.pt").read_bytes()

    def cut_short(obj, f):
        Path(f).write_bytes(b"PK\x03\x04 half a file")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", cut_short)
    with pytest.raises(KeyboardInterrupt):
        save_stats(tmp_path / "s.pt", random_stats(seed=1), meta(), tokens=100)
    assert (tmp_path / "s.pt").read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["s.pt"]


def test_concentration_report():
    s = random_stats()
    s.a_mean = torch.sqrt(s.mu_re ** 2 + s.mu_im ** 2)  # every band perfectly concentrated: R = 1
    s.a_mean[0] *= 2  # layer 0: R = 0.5
    rep = concentration(s)
    assert rep.share_concentrated == [0.0, 1.0, 1.0]
    assert abs(rep.mean_r[0] - 0.5) < 1e-6 and abs(rep.mean_r[1] - 1.0) < 1e-6


def test_online_statistics_equal_offline_on_the_same_text(tmp_path):
    """--stats auto accumulates the queries the engine computes: over the same tokens it must equal calibration."""
    make_hf_model("qwen3", tmp_path)
    ids = torch.randint(0, 128, (300,), generator=torch.Generator().manual_seed(0)).tolist()
    evict = EvictionConfig(policy="triattention", stats="auto", budget=400, protect_recent=8)
    engine = Engine(tmp_path, EngineConfig(device="cpu", dtype="float32", kv_tokens=1024, evict=evict))
    engine.generate([ids], SamplingParams(max_tokens=1, temperature=0))  # the prompt only: its queries
    online = engine.compressor.online
    offline = calibrate(engine.model, ids, chunk=engine.config.max_batch_tokens)
    assert online.tokens == offline.tokens == len(ids)
    for a, b in ((online.re, offline.re), (online.im, offline.im), (online.abs, offline.abs)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_query_stats_running_means():
    qs = QueryStats(2, 1, 4)
    taps = StatsTaps(qs, 2)
    q = torch.tensor([[[1.0, 0.0, 0.0, 1.0]], [[3.0, 0.0, 0.0, -1.0]], [[9.0, 9.0, 9.0, 9.0]]])
    # bands (1+0i, 0+1i), (3+0i, 0-1i); the third row is padding (slot -1) and must not count
    record = taps.tap([(None, 2)]).bind(torch.zeros(0, 3), torch.tensor([4, 5, -1]), torch.arange(3))
    record(q, q)
    record(q, q)
    assert qs.tokens == 2
    s = qs.tri_stats(torch.ones(2))
    assert s.mu_re[0, 0].tolist() == [2.0, 0.0] and s.mu_im[0, 0].tolist() == [0.0, 0.0]
    assert s.a_mean[1, 0].tolist() == [2.0, 1.0]


@pytest.mark.slow
def test_smollm2_stats_are_stable_across_texts(smol_model_dir):
    """The paper's premise on our real model: the pre-RoPE query centers from prose and from Python source agree
    (median cosine per head), and a good share of heads is concentrated."""
    from pathlib import Path

    from openclaw.tokenizer import Tokenizer

    model = load_model(smol_model_dir, torch.device("cpu"), torch.float32)
    tok = Tokenizer.from_dir(smol_model_dir)
    prose = tok.encode((Path(__file__).parent / "data" / "devil_excerpt.txt").read_text())[:512]
    code = tok.encode(Path(torch.__file__).with_name("functional.py").read_text())[:512]
    a, b = (calibrate(model, ids, context=512).tri_stats(model.rope.inv_freq) for ids in (prose, code))
    mu_a = torch.cat([a.mu_re, a.mu_im], -1)
    mu_b = torch.cat([b.mu_re, b.mu_im], -1)
    cos = torch.nn.functional.cosine_similarity(mu_a, mu_b, dim=-1)  # [L, H]
    assert cos.median() > 0.9, f"median cosine {cos.median():.3f}"
    assert concentration(a).overall_share > 0.3


def test_online_statistics_persist_and_warm_start_the_next_session(tmp_path):
    """An engine with eviction on saves its online sums (fp64, with the token count) when closed; the next engine of
    the model starts from them and adds to them."""
    make_hf_model("qwen3", tmp_path / "m")
    ids = torch.randint(0, 128, (120,), generator=torch.Generator().manual_seed(0)).tolist()
    config = EngineConfig(device="cpu", dtype="float32", kv_tokens=1024, cache_dir=tmp_path / "cache")
    first = Engine(tmp_path / "m", config)
    assert first.evict.policy == "auto" and first.compressor.online.tokens == 0
    first.generate([ids], SamplingParams(max_tokens=1, temperature=0))
    first.close()
    path = running_path(tmp_path / "cache", "m")
    saved = torch.load(path, weights_only=True)
    assert saved["re"].dtype == torch.float64 and saved["metadata"]["tokens"] == len(ids)
    second = Engine(tmp_path / "m", config)
    warm = second.compressor.online
    assert warm.tokens == len(ids)
    for a, b in ((warm.re, first.compressor.online.re), (warm.abs, first.compressor.online.abs)):
        assert torch.equal(a, b)
    second.generate([ids[:50]], SamplingParams(max_tokens=1, temperature=0))
    second.close()
    assert torch.load(path, weights_only=True)["metadata"]["tokens"] == len(ids) + 50


def test_persisted_sums_of_another_model_are_ignored(tmp_path, caplog):
    qs = QueryStats(3, 4, 24)
    qs.add(0, torch.randn(5, 4, 24))
    qs.tokens = 5
    save_sums(tmp_path / "s.pt", qs, meta())
    back = load_sums(tmp_path / "s.pt", meta())
    assert back.tokens == 5 and torch.equal(back.re, qs.re) and back.re.dtype == torch.float64
    with caplog.at_level("WARNING"):
        assert load_sums(tmp_path / "s.pt", meta(L=5)) is None
        assert load_sums(tmp_path / "s.pt", meta() | {"inv_freq": (OMEGA * 3).tolist()}) is None
        assert load_sums(tmp_path / "s.pt", meta() | {"blocks": [[0, 12], [12, 12]]}) is None
        data = torch.load(tmp_path / "s.pt", weights_only=True)
        data["abs"] = data["abs"][:2]
        torch.save(data, tmp_path / "bad.pt")
        assert load_sums(tmp_path / "bad.pt", meta()) is None
    assert len(caplog.records) == 4 and all("starting cold" in r.getMessage() for r in caplog.records)
    assert load_sums(tmp_path / "missing.pt", meta()) is None


def test_the_cache_online_statistics_load_as_a_stats_file(tmp_path):
    """--stats accepts the sums OpenClaw keeps in its cache: their means, checked against the model like any file."""
    qs = QueryStats(3, 4, 24)
    for layer in range(3):
        qs.add(layer, torch.randn(7, 4, 24, generator=torch.Generator().manual_seed(layer)))
    qs.tokens = 7
    save_sums(tmp_path / "s.pt", qs, meta())
    got, want = load_stats(tmp_path / "s.pt", meta(), OMEGA), qs.tri_stats(OMEGA)
    assert torch.equal(got.mu_re, want.mu_re) and torch.equal(got.a_mean, want.a_mean)
    with pytest.raises(OpenClawError, match="another model"):
        load_stats(tmp_path / "s.pt", meta(H=8), OMEGA)
