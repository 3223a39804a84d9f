"""The model's own traces (openclaw.eval.traces) and what uses them: `calibrate --generate` (statistics from the
model's generations, into the cache's online statistics or a file), greedy agreement under eviction, and the
harness's refusals (tiny random models with a character tokenizer and a chat template; SmolLM2 in the slow test)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny_models import add_char_tokenizer, make_hf_model

from openclaw.config import EngineConfig, EvictionConfig
from openclaw.eval.traces import generate_traces, greedy_agreement, trace_prompt
from openclaw.evict.calibrate import calibrate
from openclaw.evict.query_stats import load_sums, running_path
from openclaw.evict.stats_file import load_stats, model_metadata
from openclaw.llm import LLM
from openclaw.weights.loader import load_model

PROMPTS = ["Count the sheep.", "Why is the sky blue?"]


def openclaw(*args, home: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "openclaw", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, check=False, env={"PATH": "/usr/bin:/bin", "HOME": str(home),
                                                             "OPENCLAW_CACHE": str(home), "COLUMNS": "200"})


@pytest.fixture(scope="module", params=["qwen3", "glm4_moe_lite"])
def tiny(request, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp(request.param)
    make_hf_model(request.param, path)
    add_char_tokenizer(path)
    return path


def full_llm(path: Path, kv_tokens: int = 1024) -> LLM:
    return LLM(EngineConfig(model=str(path), device="cpu", dtype="float32", kv_tokens=kv_tokens,
                            evict=EvictionConfig(policy="full")))


def test_traces_are_the_templated_prompt_and_the_asked_length(tiny):
    llm = full_llm(tiny)
    traces = generate_traces(llm, PROMPTS, 40)
    for prompt, trace in zip(PROMPTS, traces):
        head = trace_prompt(llm, prompt)
        assert trace[:len(head)] == head and len(trace) == len(head) + 40  # past end-of-turn: the asked length
    assert traces == generate_traces(full_llm(tiny), PROMPTS, 40), "seeded: the same traces again"
    auto = LLM(EngineConfig(model=str(tiny), device="cpu", dtype="float32", kv_tokens=256))
    with pytest.raises(ValueError, match="full attention"):
        generate_traces(auto, PROMPTS, 8)


def test_greedy_agreement_is_complete_with_room_and_shorter_without(tiny):
    model = load_model(tiny, torch.device("cpu"), torch.float32)
    prompt = torch.randint(0, 128, (20,), generator=torch.Generator().manual_seed(3)).tolist()
    runs = [("roomy", EvictionConfig(policy="streaming", budget=200, divide_length=16, protect_recent=4)),
            ("tight", EvictionConfig(policy="streaming", budget=24, divide_length=8, protect_recent=4,
                                     pin_prompt=False))]
    agree = greedy_agreement(model, prompt, 60, runs)
    assert agree["roomy"] == 60
    assert agree["tight"] < 60  # a random model's argmax moves once 20+ of its tokens are gone


def test_calibrate_generate_adds_to_the_cache_statistics_or_writes_a_file(tiny, tmp_path):
    """`openclaw calibrate MODEL --generate N`: the statistics of the model's own traces (prompt and generation, as
    in-process calibration of the same traces gives them) go into the cache's online statistics, which the next
    run adds to; with --out into a stats file that loads for this model."""
    (tmp_path / "prompts.txt").write_text("\n".join(PROMPTS) + "\n\n")
    args = ["calibrate", tiny, "--generate", "48", "--prompts", tmp_path / "prompts.txt", "--device", "cpu",
            "--dtype", "float32"]  # the reference below is computed in float32
    r = openclaw(*args, home=tmp_path)
    assert r.returncode == 0, r.stderr
    model = load_model(tiny, torch.device("cpu"), torch.float32)
    meta = model_metadata(model, tiny.name)
    saved = load_sums(running_path(tmp_path, tiny.name), meta)
    traces = generate_traces(full_llm(tiny), PROMPTS, 24)  # 48 tokens over two prompts
    want = [calibrate(model, ids) for ids in traces]
    assert saved.tokens == sum(w.tokens for w in want) == sum(len(t) for t in traces)
    torch.testing.assert_close(saved.re, want[0].re + want[1].re, rtol=1e-5, atol=1e-5)
    assert openclaw(*args, home=tmp_path).returncode == 0
    assert load_sums(running_path(tmp_path, tiny.name), meta).tokens == 2 * saved.tokens
    r = openclaw(*args, "--out", tmp_path / "gen.pt", home=tmp_path)
    assert r.returncode == 0, r.stderr
    stats = load_stats(tmp_path / "gen.pt", meta, model.bands.omega)
    torch.testing.assert_close(stats.mu_re, saved.tri_stats(model.bands.omega).mu_re, rtol=1e-5, atol=1e-5)


def test_calibrate_and_fidelity_refuse_bad_combinations_with_one_line(tmp_path):
    tiny = tmp_path / "m"
    make_hf_model("qwen3", tiny)
    add_char_tokenizer(tiny)
    text = tmp_path / "t.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 30)
    cases = [(["calibrate", tiny, "--text", text, "--generate", "8"], "one of them"),
             (["calibrate", tiny], "one of them"),
             (["calibrate", tiny, "--generate", "0"], "--generate 0"),
             (["calibrate", tiny, "--generate", "8", "--prompts", tmp_path / "none.txt"], "unreadable"),
             # budget + divide_length past the window: nothing left to score (was a ZeroDivisionError)
             (["eval", "fidelity", "--model", tiny, "--text", text, "--windows", "1", "--window-len", "200",
               "--budgets", "128", "--device", "cpu"], "leaves nothing to score")]
    for args, needle in cases:
        r = openclaw(*args, home=tmp_path)
        lines = [line for line in r.stderr.splitlines() if line.strip()]
        assert r.returncode == 2 and "Traceback" not in r.stderr and len(lines) == 1, r.stderr
        assert needle in lines[0], lines[0]


@pytest.mark.slow
def test_smollm2_calibrates_on_its_own_generation(smol_model_dir, tmp_path):
    (tmp_path / "prompts.txt").write_text("Explain why the sum of two odd numbers is even.\n")
    r = openclaw("calibrate", smol_model_dir, "--generate", "64", "--prompts", tmp_path / "prompts.txt",
                 "--device", "cpu", "--dtype", "bfloat16", "--out", tmp_path / "smol.pt", home=tmp_path)
    assert r.returncode == 0, r.stderr
    model = load_model(smol_model_dir, torch.device("cpu"), torch.bfloat16)
    stats = load_stats(tmp_path / "smol.pt", model_metadata(model, "smol"), model.bands.omega)
    assert stats.heads is None and torch.isfinite(stats.a_mean).all() and (stats.a_mean > 0).all()
    meta = torch.load(tmp_path / "smol.pt", weights_only=True)["metadata"]
    assert meta["calibration_tokens"] > 64 and meta["query_capture"] == "rope_input"


def test_fidelity_on_the_models_own_traces_reports_greedy_agreement(tmp_path):
    tiny = tmp_path / "m"
    make_hf_model("qwen3", tiny)
    add_char_tokenizer(tiny)
    (tmp_path / "prompts.txt").write_text(PROMPTS[0] + "\n")
    r = openclaw("eval", "fidelity", "--model", tiny, "--generate", "200", "--prompts", tmp_path / "prompts.txt",
                 "--policies", "full,streaming", "--budgets", "16,400", "--score-from", "40", "--device", "cpu",
                 "--dtype", "float32", "--json", tmp_path / "f.json", home=tmp_path)
    assert r.returncode == 0, r.stderr
    data = json.loads((tmp_path / "f.json").read_text())
    rows = {row["label"]: row for row in data["rows"]}
    assert data["meta"]["generate"] == 200 and data["meta"]["windows"] == 1
    assert rows["full"]["kl"] == 0 and rows["streaming@400"]["kl"] == 0 and rows["streaming@400"]["evictions"] == 0
    assert rows["streaming@400"]["greedy_agree"] == 200  # never evicts: greedy decoding is full attention's
    assert rows["streaming@16"]["evictions"] > 0 and rows["streaming@16"]["kl"] > 0
    assert rows["streaming@16"]["greedy_agree"] < 200
