"""Quantized checkpoints through the loader and the engine, and the VRAM plan (openclaw/memory.py): planned weight
bytes equal what the loader allocates, a model that does not fit is refused with the numbers, and (on CUDA) the
batch-1 decode CUDA graphs give the eager path's tokens under the cap."""

import json
import subprocess
import sys

import pytest
import torch
from openclaw.kernels.qlinear import quantize_rtn
from safetensors.torch import load_file, save_file
from tiny_models import full_forward, make_hf_model

from openclaw.config import EngineConfig, SamplingParams
from openclaw.errors import OpenClawError
from openclaw.loader import load_model, save_quantized
from openclaw.memory import GIB, checkpoint_weight_bytes, eight_bit, loaded_bytes, plan, plan_model, weight_bytes

CUDA = torch.cuda.is_available()


def quantized_copy(src, dst, bits: int = 4, group: int = 32, mixed: bool = False):
    """Our own layout of an HF checkpoint: every decoder linear RTN-quantized (v_proj 8-bit group 16 when mixed,
    as GGUF Q4_K_M mixes Q4_K and Q6_K); embeddings and lm_head stay full precision (the loader makes them 8-bit).
    Returns the dequantized reference directory's tensors."""
    dst.mkdir(parents=True, exist_ok=True)
    sd = load_file(str(src / "model.safetensors"))
    tensors, ref = {}, {}
    for name, t in sd.items():
        if name.endswith("proj.weight"):
            qw = quantize_rtn(t, 8, 16) if mixed and "v_proj" in name else quantize_rtn(t, bits, group)
            tensors[name], ref[name] = qw, qw.dequantize()
        elif name.endswith(("embed_tokens.weight", "lm_head.weight")):
            tensors[name], ref[name] = t, quantize_rtn(t, 8, eight_bit(t.shape[1]).group).dequantize()
        else:
            tensors[name] = ref[name] = t
    save_quantized(dst / "model.safetensors", tensors)
    cfg = json.loads((src / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps({**cfg, "quantization_config": {"quant_method": "openclaw"}}))
    return ref


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
    from openclaw.memory import Layout

    cfg = json.loads((tmp_path / "q" / "config.json").read_text())
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
    p = plan(cfg, weights=0, cap=2 * GIB, context=0, kv_budget=10**9)
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
    from openclaw.engine import Engine

    make_hf_model("qwen3", tmp_path / "hf")
    quantized_copy(tmp_path / "hf", tmp_path / "q", group=32, mixed=True)
    # fp32 so that the graphs' longer (masked) attention rows cannot flip a greedy choice by rounding
    engine = Engine(tmp_path / "q", EngineConfig(model=str(tmp_path / "q"), vram=4, kv_tokens=4096, max_seqs=2,
                                                 dtype="float32"))
    prompt = torch.randint(0, 128, (300,), generator=torch.Generator().manual_seed(5)).tolist()
    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    graphs = engine.generate([prompt], params)[0].output_ids
    assert engine.runner.graphs
    engine.runner.cuda_graphs = False
    eager = engine.generate([prompt], params)[0].output_ids
    assert graphs == eager
    assert torch.cuda.max_memory_allocated() <= engine.plan.cap - engine.plan.context
