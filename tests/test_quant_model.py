"""Quantized checkpoints through the loader and the engine, and the VRAM plan (openclaw/engine/memory.py): planned weight
bytes equal what the loader allocates, a model that does not fit is refused with the numbers, and (on CUDA) the
decode CUDA graphs give the eager path's tokens under the cap."""

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file
from tiny_models import full_forward, make_hf_model, quantized_copy

from openclaw.config import EngineConfig, SamplingParams
from openclaw.engine.memory import GIB, loaded_bytes, plan, plan_model
from openclaw.errors import OpenClawError
from openclaw.weights.checkpoint import parse_config
from openclaw.weights.loader import load_model
from openclaw.weights.sizes import checkpoint_weight_bytes, weight_bytes

CUDA = torch.cuda.is_available()


@pytest.mark.parametrize("kind,overrides,mixed", [("qwen3", {}, False), ("llama", {"tie_word_embeddings": True}, True),
                                                  ("qwen2", {}, False)])
def test_quantized_model_equals_its_dequantized_reference(kind, overrides, mixed, tmp_path):
    make_hf_model(kind, tmp_path / "hf", **overrides)
    ref_sd = quantized_copy(tmp_path / "hf", tmp_path / "q", mixed=mixed)
    (tmp_path / "ref").mkdir()
    save_file(ref_sd, str(tmp_path / "ref" / "model.safetensors"))
    (tmp_path / "ref" / "config.json").write_text((tmp_path / "hf" / "config.json").read_text())
    ids = torch.randint(0, 128, (60,), generator=torch.Generator().manual_seed(3)).tolist()
    got = full_forward(load_model(tmp_path / "q", torch.device("cpu"), torch.float32), ids)
    ref = full_forward(load_model(tmp_path / "ref", torch.device("cpu"), torch.float32), ids)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    assert torch.equal(got.argmax(-1), ref.argmax(-1))


@pytest.mark.parametrize("tied", [False, True])
def test_planned_weight_bytes_equal_allocated(tied, tmp_path):
    make_hf_model("qwen3", tmp_path / "hf", tie_word_embeddings=tied)
    quantized_copy(tmp_path / "hf", tmp_path / "q")
    model = load_model(tmp_path / "q", torch.device("cpu"), torch.bfloat16)
    allocated = loaded_bytes(model)
    assert abs(checkpoint_weight_bytes(tmp_path / "q", 2) / allocated - 1) < 0.03
    # the config-only estimate (group 32, offsets: what the checkpoint holds) matches too
    from openclaw.weights.layout import Layout

    cfg = parse_config(json.loads((tmp_path / "q" / "config.json").read_text()))[1]
    assert abs(weight_bytes(cfg, 2, Layout(4, 32, True, False)) / allocated - 1) < 0.03
    # and unquantized, in the model dtype
    hf = load_model(tmp_path / "hf", torch.device("cpu"), torch.bfloat16)
    assert weight_bytes(cfg, 2, None) == loaded_bytes(hf)


def test_qwen3_32b_plan_numbers():
    """DESIGN.md's reference arithmetic: 256 KiB of KV per token; 4-bit weights 16.5-18 GiB."""
    p, name, fitting = plan_model("Qwen3-32B", "/nonexistent", 24, 4096)
    assert name == "Qwen3-32B" and p.kv_bytes_per_token == 256 * 1024
    assert 16.5 * GIB < p.weights < 18 * GIB
    assert p.kv_tokens > 16_000 and p.seqs == p.kv_tokens // (4096 + 128)
    p12, _, fitting = plan_model("Qwen3-32B", "/nonexistent", 12, None)
    with pytest.raises(OpenClawError, match=r"does not fit in 12.0 GiB.*--vram 1[89]\.\d or more.*Qwen3-8B"):
        p12.require("Qwen3-32B", smaller=fitting)


def test_budget_that_does_not_fit_names_the_largest_that_does():
    cfg = {"model_type": "qwen3", "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
           "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "vocab_size": 128}
    p = plan(parse_config(cfg)[1], weights=0, cap=2 * GIB, context=0, kv_budget=10**9)
    with pytest.raises(OpenClawError, match="--kv-budget of at most"):
        p.require("tiny")


def test_plan_command_exits_2_when_it_does_not_fit(tmp_path):
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "COLUMNS": "100"}
    ok = subprocess.run([sys.executable, "-m", "openclaw", "plan", "Qwen3-32B", "--vram", "24", "--kv-budget", "4096"],
                        capture_output=True, text=True, env=env, check=False)
    assert ok.returncode == 0 and "KV tokens" in ok.stdout, ok.stderr
    bad = subprocess.run([sys.executable, "-m", "openclaw", "plan", "Qwen3-32B", "--vram", "12"],
                         capture_output=True, text=True, env=env, check=False)
    assert bad.returncode == 2 and "does not fit" in bad.stderr and "Traceback" not in bad.stderr
    assert "GiB short" in bad.stdout and "-" not in bad.stdout.split("KV pool")[1].split("\n")[0]  # no negative pool


def test_shape_mismatch_and_unknown_method_are_one_line_errors(tmp_path):
    make_hf_model("qwen3", tmp_path / "hf")
    quantized_copy(tmp_path / "hf", tmp_path / "q")
    cfg = json.loads((tmp_path / "q" / "config.json").read_text())
    (tmp_path / "q" / "config.json").write_text(json.dumps({**cfg, "intermediate_size": 128}))
    with pytest.raises(OpenClawError, match="config and the weights disagree"):
        load_model(tmp_path / "q", torch.device("cpu"), torch.float32)
    (tmp_path / "q" / "config.json").write_text(json.dumps({**cfg, "quantization_config": {"quant_method": "hqq"}}))
    with pytest.raises(OpenClawError, match="hqq"):
        load_model(tmp_path / "q", torch.device("cpu"), torch.float32)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_gpu_engine_graph_decode_equals_eager_under_the_cap(tmp_path):
    from openclaw.engine.engine import Engine
    from openclaw.engine.runner import Runner

    make_hf_model("qwen3", tmp_path / "hf")
    quantized_copy(tmp_path / "hf", tmp_path / "q", group=32, mixed=True)
    torch.cuda.empty_cache()  # other GPU tests in this process leave tensors and a peak behind
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    # fp32 so that the graphs' longer (masked) attention rows cannot flip a greedy choice by rounding
    try:
        engine = Engine(tmp_path / "q", EngineConfig(model=str(tmp_path / "q"), vram=4, kv_tokens=4096, max_seqs=2,
                                                     dtype="float32"))
        prompt = torch.randint(0, 128, (300,), generator=torch.Generator().manual_seed(5)).tolist()
        params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
        graphs = engine.generate([prompt], params)[0].output_ids
        assert engine.runner.graphs.steps and engine.runner.graphs.capture
        engine.runner = Runner(engine.model, engine.pool, engine.device)  # every step dynamic
        eager = engine.generate([prompt], params)[0].output_ids
        assert graphs == eager
        assert torch.cuda.max_memory_allocated() - before <= engine.plan.cap - engine.plan.context
    finally:  # the engine capped this process's allocator; later GPU tests need the whole card
        torch.cuda.set_per_process_memory_fraction(1.0)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_gpu_tiled_weights_give_the_dequantized_reference(tmp_path):
    """On the GPU the loader stores 4-bit group-128 weights tiled for the tensor-core GEMV (gate_up interleaved for its
    SiLU epilogue): bf16 forwards of 1 and 8 tokens (that kernel) and of 40 (dequantize by tiles + cuBLAS) give the
    fp32 dequantized reference's logits; an fp32 model keeps its weights row-major."""
    from openclaw.kernels.qlinear import tileable
    from openclaw.models.layers import QuantLinear

    make_hf_model("qwen3", tmp_path / "hf", hidden_size=128, intermediate_size=256, head_dim=32)
    ref_sd = quantized_copy(tmp_path / "hf", tmp_path / "q", group=128)
    (tmp_path / "ref").mkdir()
    save_file(ref_sd, str(tmp_path / "ref" / "model.safetensors"))
    (tmp_path / "ref" / "config.json").write_text((tmp_path / "hf" / "config.json").read_text())
    model = load_model(tmp_path / "q", torch.device("cuda"), torch.bfloat16)
    linears = [m.qweight for m in model.modules() if isinstance(m, QuantLinear) and tileable(m.qweight)]
    assert len(linears) == 4 * 3 and all(w.tiled for w in linears)  # qkv, o, gate_up, down x 3 layers
    assert all(layer.mlp.gate_up_proj.interleaved for layer in model.model.layers)  # SiLU-mul in the GEMV
    ref_model = load_model(tmp_path / "ref", torch.device("cpu"), torch.float32)
    ids = torch.randint(0, 128, (40,), generator=torch.Generator().manual_seed(7)).tolist()
    for t in (1, 8, 40):
        got = full_forward(model, ids[:t], torch.bfloat16, "cuda").float().cpu()
        ref = full_forward(ref_model, ids[:t])
        assert (got - ref).abs().max() <= 0.03 * ref.abs().max(), t
    fp32 = load_model(tmp_path / "q", torch.device("cuda"), torch.float32)  # the tensor-core GEMV takes bf16 rows
    assert not any(m.qweight.tiled or m.interleaved for m in fp32.modules() if isinstance(m, QuantLinear))


QWEN3_8B = {"model_type": "qwen3", "hidden_size": 4096, "intermediate_size": 12288, "num_hidden_layers": 36,
            "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 151936,
            "max_position_embeddings": 40960, "tie_word_embeddings": False}


def test_quantize_auto_picks_nf4_only_when_full_precision_does_not_fit(tmp_path):
    """A bf16 Qwen3-8B directory (config.json is all the plan reads): 15.3 GiB of bf16 weights fit --vram 24, not
    --vram 16, where auto holds them as NF4; none refuses there and names what nf4 would take."""
    (tmp_path / "q8").mkdir()
    (tmp_path / "q8" / "config.json").write_text(json.dumps(QWEN3_8B))
    full, _, _ = plan_model(str(tmp_path / "q8"), tmp_path, 24, None)
    assert full.fits() and "full precision" in full.weight_format and 15 * GIB < full.weights < 15.5 * GIB
    nf4, _, _ = plan_model(str(tmp_path / "q8"), tmp_path, 16, None)
    assert nf4.fits() and "NF4" in nf4.weight_format and 4.5 * GIB < nf4.weights < 6 * GIB
    assert plan_model(str(tmp_path / "q8"), tmp_path, 24, None, quantize="nf4")[0].weights == nf4.weights
    none, name, _ = plan_model(str(tmp_path / "q8"), tmp_path, 16, None, quantize="none")
    assert none.weights == full.weights
    with pytest.raises(OpenClawError, match=r"not fit in 16.0 GiB.*--quantize nf4 would hold the weights in 4\.63 GiB"):
        none.require(name)
    # the manifest's Qwen3-8B is bf16->nf4: NF4 under auto whether pulled or not
    assert plan_model("Qwen3-8B", tmp_path, 24, None)[0].weights == nf4.weights
    pulled = tmp_path / "hub" / "Qwen" / "Qwen3-8B"
    pulled.mkdir(parents=True)
    (pulled / "config.json").write_text(json.dumps(QWEN3_8B))
    assert plan_model("Qwen3-8B", tmp_path, 24, None)[0].weights == nf4.weights
    assert plan_model("Qwen3-8B", tmp_path, 24, None, quantize="none")[0].weights == full.weights


def test_nf4_plan_equals_what_nf4_at_load_allocates(tmp_path):
    make_hf_model("qwen3", tmp_path / "hf", intermediate_size=128, hidden_size=128)
    model = load_model(tmp_path / "hf", torch.device("cpu"), torch.bfloat16, nf4=True)
    # exact but for the 64-byte NF4 code table, planned per checkpoint linear (7 a layer), shared by fused ones
    assert 0 <= checkpoint_weight_bytes(tmp_path / "hf", 2, nf4=True) - loaded_bytes(model) <= 64 * 7 * 3


def test_engine_quantizes_to_nf4_at_load_when_asked(tmp_path):
    """--quantize nf4 reaches the loader (on the CPU too, where auto means none)."""
    from openclaw.engine.engine import Engine

    make_hf_model("qwen3", tmp_path, hidden_size=128)
    config = EngineConfig(model=str(tmp_path), device="cpu", dtype="float32", kv_tokens=256)
    assert not Engine(tmp_path, config).model.quantized
    engine = Engine(tmp_path, EngineConfig(**{**vars(config), "quantize": "nf4"}))
    qkv = engine.model.model.layers[0].self_attn.qkv_proj.qweight
    assert engine.model.quantized and qkv.lut is not None and qkv.group == 64
    prompt = torch.randint(0, 128, (20,), generator=torch.Generator().manual_seed(1)).tolist()
    ref = load_model(tmp_path, torch.device("cpu"), torch.float32, nf4=True)
    tokens = engine.generate([prompt], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))[0].output_ids
    ids = list(prompt)
    for _ in range(8):
        ids.append(int(full_forward(ref, ids)[-1].argmax()))
    assert tokens == ids[len(prompt):]
    with pytest.raises(OpenClawError, match="quantize 'int3' must be one of auto, none, nf4"):
        EngineConfig(quantize="int3")


def test_loading_reports_progress_over_every_weight(tmp_path):
    """The loading bar counts the model's weights (fused parts separately) up to all of them, per format."""
    from openclaw.weights.loader import load_model

    make_hf_model("qwen3", tmp_path / "hf")
    quantized_copy(tmp_path / "hf", tmp_path / "q", group=32, mixed=True)
    for src, nf4, what in [(tmp_path / "hf", False, "loading"), (tmp_path / "hf", True, "quantizing to NF4"),
                           (tmp_path / "q", False, "loading openclaw weights")]:
        calls = []
        load_model(src, torch.device("cpu"), torch.float32, nf4=nf4, progress=lambda *a, calls=calls: calls.append(a))
        assert {c[0] for c in calls} == {what}
        done = [c[1] for c in calls]
        assert done == sorted(done) and done[-1] == calls[-1][2] > 10
