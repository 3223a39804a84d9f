"""HF parity of the dense family (qwen3 / qwen2 / llama) through our loader, and cache consistency."""

import json

import pytest
import torch
from openclaw.models import layers
from openclaw.models.layers import BatchMeta
from tiny_models import full_forward, make_hf_model

from openclaw.engine.kv_pool import KVPool
from openclaw.weights.loader import load_model

VARIANTS = {
    "qwen3": ("qwen3", {}),
    "qwen3-tied": ("qwen3", {"tie_word_embeddings": True}),
    "qwen3-yarn": ("qwen3", {"rope_scaling": {"rope_type": "yarn", "factor": 4.0,
                                              "original_max_position_embeddings": 64}}),
    "qwen2": ("qwen2", {}),
    "qwen2-tied": ("qwen2", {"tie_word_embeddings": True}),
    "llama": ("llama", {}),
    "llama-tied-theta": ("llama", {"tie_word_embeddings": True, "rope_theta": 100000.0}),
    "llama-bias": ("llama", {"attention_bias": True}),
    "llama-linear": ("llama", {"rope_scaling": {"rope_type": "linear", "factor": 2.0}}),
    "llama3": ("llama", {"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                          "high_freq_factor": 4.0, "original_max_position_embeddings": 64}}),
}


def load_ours(path, dtype=torch.float32):
    return load_model(path, torch.device("cpu"), dtype)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_logits_match_transformers(variant, tmp_path):
    kind, overrides = VARIANTS[variant]
    hf = make_hf_model(kind, tmp_path, **overrides)
    ours = load_ours(tmp_path)
    ids = torch.randint(0, 128, (200,), generator=torch.Generator().manual_seed(1)).tolist()
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0]
    got = full_forward(ours, ids)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


def test_old_style_rope_config_loads(tmp_path):
    """Checkpoints written before transformers 5 keep rope_theta / rope_scaling at the top level."""
    hf = make_hf_model("llama", tmp_path, rope_scaling={"rope_type": "linear", "factor": 2.0}, rope_theta=5e4)
    cfg = json.loads((tmp_path / "config.json").read_text())
    rp = cfg.pop("rope_parameters")
    cfg["rope_theta"] = rp.pop("rope_theta")
    cfg["rope_scaling"] = {"type": rp.pop("rope_type"), **rp}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    ids = list(range(1, 100))
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0]
    torch.testing.assert_close(full_forward(load_ours(tmp_path), ids), ref, rtol=1e-4, atol=1e-4)


def test_sharded_checkpoint_loads(tmp_path):
    hf = make_hf_model("qwen3", tmp_path / "one")
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    ids = list(range(5, 60))
    a = full_forward(load_ours(tmp_path / "one"), ids)
    b = full_forward(load_ours(tmp_path / "sharded"), ids)
    assert torch.equal(a, b)


@pytest.mark.parametrize("kind", ["qwen3", "llama"])
def test_prefill_then_decode_through_pool_equals_full_forward(kind, tmp_path):
    make_hf_model(kind, tmp_path)
    model = load_ours(tmp_path)
    cfg = model.config
    ids = torch.randint(0, 128, (90,), generator=torch.Generator().manual_seed(2)).tolist()
    full = full_forward(model, ids)
    # the sequence lives at slots [37, 37 + 128) of a larger pool, to catch base-offset mistakes
    pool = KVPool(cfg.num_hidden_layers, 300, cfg.num_key_value_heads, cfg.head_dim, torch.float32, "cpu")
    base, got, done = 37, [], 0
    with torch.inference_mode():
        for n in [33, 20] + [1] * 37:  # two prefill chunks, then token-by-token decode
            T = n
            meta = BatchMeta(slot_mapping=torch.arange(base + done, base + done + T),
                             seqs=[(0, T, base, done + T)], sample_idx=torch.arange(T))
            got.append(model(torch.tensor(ids[done:done + T]), torch.arange(done, done + T), meta, pool.k, pool.v))
            done += T
    assert done == len(ids)
    torch.testing.assert_close(torch.cat(got), full, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_dense_on_a_cpu_multiplies_half_weights_in_fp32(dtype, monkeypatch):
    """From CPU_GEMM_ROWS rows the product runs in fp32 over weight blocks (a small block forces several, the last
    partial), rounded once: within one rounding (an eps) of the fp32 product of the same half-precision numbers; under
    the threshold it is F.linear itself."""
    monkeypatch.setattr(layers, "CPU_GEMM_BLOCK", 4 * 96 * 7)  # 7 rows of K = 96 per block: 37 rows in 6 blocks
    g = torch.Generator().manual_seed(0)
    w, b = torch.randn(37, 96, generator=g).to(dtype), torch.randn(37, generator=g).to(dtype)
    for shape in [(layers.CPU_GEMM_ROWS,), (2, 9), (41,)]:
        x = torch.randn(*shape, 96, generator=g).to(dtype)
        got = layers.dense(x, w, b)
        assert got.dtype == dtype and got.shape == (*shape, 37)
        ref = x.float() @ w.float().T + b.float()
        assert ((got.float() - ref).abs() <= torch.finfo(dtype).eps * ref.abs() + 1e-6).all()
    x = torch.randn(layers.CPU_GEMM_ROWS - 1, 96, generator=g).to(dtype)
    assert torch.equal(layers.dense(x, w, b), torch.nn.functional.linear(x, w, b))
