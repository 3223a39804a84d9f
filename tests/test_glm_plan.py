"""The GLM manifest entries through the VRAM plan: GLM-Z1-32B and GLM-4.7-Flash fit 24 GiB as a 24 GB user loads them
(bf16 quantized to NF4 at load), with the right KV bytes per token (MLA: latent + RoPE key, not expanded K/V) and, for
GLM-4.7-Flash, a whole 32K trace without eviction; planned weight bytes equal what the loader allocates on the tiny
models; the manifest's sampling defaults reach the engine."""

import subprocess
import sys

import pytest
import torch
from tiny_models import make_hf_model

from openclaw.config import EngineConfig
from openclaw.engine.engine import Engine
from openclaw.engine.memory import GIB, loaded_bytes, plan_model
from openclaw.weights.loader import load_model
from openclaw.weights.sizes import checkpoint_weight_bytes


def test_glm_z1_32b_fits_24_gib():
    p, name, fitting = plan_model("GLM-Z1-32B", "/nonexistent", 24, 4096)
    assert name == "GLM-Z1-32B" and p.fits()
    assert p.kv_bytes_per_token == 2 * 61 * 2 * 128 * 2  # K and V of 2 KV heads: 61 KiB
    assert 16 * GIB < p.weights < 18 * GIB and p.kv_tokens > 32768  # 32K context and more
    assert {"GLM-Z1-32B", "GLM-4-32B", "GLM-4.7-Flash"} <= set(fitting)


def test_glm47_flash_fits_24_gib_with_a_whole_32k_trace():
    p, _, _ = plan_model("GLM-4.7-Flash", "/nonexistent", 24, None)
    assert p.kv_bytes_per_token == 54_144  # 47 x (512 + 64) x 2 B
    assert 15 * GIB < p.weights < 16 * GIB
    assert p.kv_tokens >= 2 * 32768 and p.fits(32768)


def test_plan_command_prints_the_kv_tokens_for_both(tmp_path):
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "COLUMNS": "120"}
    for name in ("GLM-Z1-32B", "GLM-4.7-Flash"):
        r = subprocess.run([sys.executable, "-m", "openclaw", "plan", name, "--vram", "24"], capture_output=True,
                           text=True, env=env, check=False)
        assert r.returncode == 0, r.stderr
        kv = next(line for line in r.stdout.splitlines() if "KV tokens" in line)
        assert int(kv.split("│")[2].strip().replace(",", "")) > 32768, kv
    r = subprocess.run([sys.executable, "-m", "openclaw", "models", "--vram", "24"], capture_output=True, text=True,
                       env=env, check=False)
    assert r.returncode == 0 and "GLM-4.7-Flash" in r.stdout and "not yet" not in r.stdout, r.stdout


@pytest.mark.parametrize("kind", ["glm4", "glm4_moe_lite"])
def test_planned_nf4_bytes_equal_allocated(kind, tmp_path):
    """The config-only count (linear_shapes in NF4, kv_b_proj and norms in the dtype, routers in fp32, 8-bit
    embeddings) is what the loader allocates when it quantizes the tiny checkpoint to NF4, but for the 64-byte code
    table it counts per checkpoint tensor where a fused stack (q/k/v, an MoE layer's experts) keeps one."""
    make_hf_model(kind, tmp_path, hidden_size=128, intermediate_size=128, **(
        {"moe_intermediate_size": 64, "q_lora_rank": 64, "kv_lora_rank": 64} if kind == "glm4_moe_lite" else {}))
    model = load_model(tmp_path, torch.device("cpu"), torch.bfloat16, nf4=True)
    if kind == "glm4_moe_lite":  # routers in fp32 in a bf16 model (Family.fp32), counted at 4 bytes
        router = model.get_submodule("model.layers.1.mlp.gate")
        assert router.weight.dtype == router.e_score_correction_bias.dtype == torch.float32
    extra = checkpoint_weight_bytes(tmp_path, 2, nf4=True) - loaded_bytes(model)
    assert 0 <= extra <= 64 * len(model.config.linear_shapes()), extra


def test_manifest_sampling_defaults_reach_the_engine(tmp_path):
    make_hf_model("glm4", tmp_path)
    engine = Engine(tmp_path, EngineConfig(model="GLM-Z1-32B", device="cpu", dtype="float32", kv_tokens=64))
    assert (engine.sampling_defaults["temperature"], engine.sampling_defaults["top_p"],
            engine.sampling_defaults["top_k"]) == (0.6, 0.95, 40)
    plain = Engine(tmp_path, EngineConfig(model=str(tmp_path), device="cpu", dtype="float32", kv_tokens=64))
    assert plain.sampling_defaults["temperature"] == 0.0  # transformers' generation_config: greedy
