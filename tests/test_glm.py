"""The GLM families against transformers on tiny random configs: glm4 (GLM-4-0414, GLM-Z1) and glm4_moe_lite
(GLM-4.7-Flash: MLA + MoE). Logits of one forward and 32 greedy tokens match; prefill + decode through the pool equals
one full forward (also quantized, where decode runs the MoE GEMVs by expert id); the MTP layer is skipped and the
routing follows the model's rules."""

import json

import pytest
import torch
from openclaw.kernels.qlinear import quantize_rtn
from openclaw.models.glm4_moe_lite import checkpoint_target
from openclaw.models.layers import BatchMeta
from openclaw.models.moe import route
from safetensors.torch import load_file, save_file
from test_quant_formats import AWQ_CONFIG, assert_same_greedy, awq_pack, awq_quantize, write_reference
from tiny_models import full_forward, make_hf_model, quantized_copy

from openclaw.config import EngineConfig, SamplingParams
from openclaw.engine.engine import Engine
from openclaw.engine.kv_pool import KVPool
from openclaw.errors import OpenClawError
from openclaw.weights.checkpoint import parse_config
from openclaw.weights.formats import quantize_nf4
from openclaw.weights.layout import rtn_group
from openclaw.weights.loader import load_model

VARIANTS = {
    "glm4": ("glm4", {}),
    "glm4-tied-yarn": ("glm4", {"tie_word_embeddings": True, "rope_parameters": {
        "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "rope_theta": 10000.0,
        "partial_rotary_factor": 0.5}}),
    "glm4-rotary-3/4": ("glm4", {"rope_parameters": {"rope_type": "default", "rope_theta": 1e6,
                                                     "partial_rotary_factor": 0.75}}),
    "glm4_moe_lite": ("glm4_moe_lite", {}),
    "glm4_moe_lite-no-q-lora-2-dense": ("glm4_moe_lite", {"q_lora_rank": None,
                                                          "mlp_layer_types": ["dense", "dense", "sparse"]}),
    "glm4_moe_lite-groups-unnormed": ("glm4_moe_lite", {"n_group": 4, "topk_group": 2, "norm_topk_prob": False}),
}


def ids_of(n: int, seed: int) -> list[int]:
    return torch.randint(0, 128, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_logits_match_transformers(variant, tmp_path):
    kind, overrides = VARIANTS[variant]
    hf = make_hf_model(kind, tmp_path, **overrides)
    ids = ids_of(150, 1)
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0]
    got = full_forward(load_model(tmp_path, torch.device("cpu"), torch.float32), ids)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind", ["glm4", "glm4_moe_lite"])
def test_32_greedy_tokens_match_transformers(kind, tmp_path):
    hf = make_hf_model(kind, tmp_path)
    prompt = ids_of(20, 2)
    with torch.no_grad():
        ref = hf.generate(torch.tensor([prompt]), max_new_tokens=32, min_new_tokens=32, do_sample=False)[0, 20:]
    engine = Engine(tmp_path, EngineConfig(device="cpu", dtype="float32", kv_tokens=256))
    seq = engine.generate([prompt], SamplingParams(temperature=0, max_tokens=32, ignore_eos=True))[0]
    assert seq.output_ids == ref.tolist()


@pytest.mark.parametrize("kind", ["glm4", "glm4_moe_lite"])
@pytest.mark.parametrize("quantized", [False, True])
def test_prefill_then_decode_through_pool_equals_full_forward(kind, quantized, tmp_path):
    make_hf_model(kind, tmp_path / "hf")
    if quantized:  # every projection 4-bit (experts stacked; kv_b_proj dequantized back to full precision)
        quantized_copy(tmp_path / "hf", tmp_path / "q", group=16)
    model = load_model(tmp_path / ("q" if quantized else "hf"), torch.device("cpu"), torch.float32)
    assert model.quantized == quantized
    ids = ids_of(90, 3)
    full = full_forward(model, ids)
    # the sequence lives at slots [37, 37 + 128) of a larger pool, to catch base-offset mistakes
    pool = KVPool.for_config(model.config, 300, torch.float32, "cpu")
    base, got, done = 37, [], 0
    with torch.inference_mode():
        for n in [33, 20] + [1] * 37:  # two prefill chunks (the second over 16 tokens: experts grouped), then decode
            meta = BatchMeta(slot_mapping=torch.arange(base + done, base + done + n),
                             seqs=[(0, n, base, done + n)], sample_idx=torch.arange(n))
            got.append(model(torch.tensor(ids[done:done + n]), torch.arange(done, done + n), meta, pool.k, pool.v))
            done += n
    torch.testing.assert_close(torch.cat(got), full, rtol=1e-4, atol=1e-4)


def test_mla_pool_holds_the_latent_and_the_rope_key_not_expanded_kv(tmp_path):
    make_hf_model("glm4_moe_lite", tmp_path)
    model = load_model(tmp_path, torch.device("cpu"), torch.float32)
    cfg = model.config
    assert cfg.cache_shape() == (1, 32 + 8, 0) and cfg.kv_bytes_per_token(2) == 3 * 40 * 2
    pool = KVPool.for_config(cfg, 50, torch.float32, "cpu")
    assert pool.k.shape == (3, 50, 1, 40) and pool.v.numel() == 0
    full_forward(model, ids_of(10, 4))
    real = parse_config(json.loads((tmp_path / "config.json").read_text()) | {
        "num_hidden_layers": 47, "kv_lora_rank": 512, "qk_rope_head_dim": 64, "mlp_layer_types": None})[1]
    assert real.kv_bytes_per_token(2) == 54_144  # GLM.md: 47 x (512 + 64) x 2 B


def test_routing_is_sigmoid_with_the_bias_for_selection_only():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    bias = torch.tensor([0.0, 0.0, 5.0, 0.0])  # pulls expert 2 into the choice, not into its weight
    weights, ids = route(logits, bias, top_k=2, norm_topk_prob=True, scaling=1.8)
    assert sorted(ids[0].tolist()) == [0, 2]
    s = torch.sigmoid(logits[0])
    expected = torch.stack([s[i] for i in ids[0].tolist()])
    torch.testing.assert_close(weights[0], expected / expected.sum() * 1.8)
    unnormed, _ = route(logits, bias, top_k=2, norm_topk_prob=False)
    torch.testing.assert_close(unnormed[0], expected)


def test_mtp_layer_is_skipped_and_experts_are_stacked(tmp_path):
    make_hf_model("glm4_moe_lite", tmp_path)
    cfg = parse_config(json.loads((tmp_path / "config.json").read_text()))[1]
    assert checkpoint_target(cfg, "model.layers.3.eh_proj.weight") is None
    assert checkpoint_target(cfg, "model.layers.2.mlp.experts.5.down_proj.weight") == (
        "model.layers.2.mlp.experts.down_proj.weight", 5, 8)
    assert checkpoint_target(cfg, "model.layers.1.mlp.shared_experts.up_proj.weight") == (
        "model.layers.1.mlp.shared_experts.gate_up_proj.weight", 1, 2)
    # an MTP layer in the checkpoint (GLM-4.7-Flash ships model.layers.47.*) loads and changes nothing
    ids = ids_of(40, 5)
    before = full_forward(load_model(tmp_path, torch.device("cpu"), torch.float32), ids)
    sd = load_file(str(tmp_path / "model.safetensors"))
    sd |= {f"model.layers.3.{k[len('model.layers.1.'):]}": v.clone() for k, v in sd.items()
           if k.startswith("model.layers.1.")}
    sd["model.layers.3.eh_proj.weight"] = torch.randn(64, 128)
    save_file(sd, str(tmp_path / "model.safetensors"))
    torch.testing.assert_close(full_forward(load_model(tmp_path, torch.device("cpu"), torch.float32), ids), before,
                               rtol=0, atol=0)


def test_softmax_routing_is_refused_in_one_line(tmp_path):
    make_hf_model("glm4_moe_lite", tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(cfg | {"scoring_func": "softmax"}))
    with pytest.raises(OpenClawError, match="sigmoid"):
        load_model(tmp_path, torch.device("cpu"), torch.float32)


@pytest.mark.parametrize("kind", ["glm4", "glm4_moe_lite"])
def test_nf4_at_load_runs_the_nf4_rounded_checkpoint(kind, tmp_path):
    """bf16 -> NF4 at load (how the manifest loads both GLMs): every decoder projection NF4, the experts stacked in
    checkpoint order, kv_b_proj and the router untouched, embeddings and lm_head 8-bit: the logits equal the
    full-precision model of the same checkpoint with those weights rounded by hand."""
    sizes = {"hidden_size": 128, "intermediate_size": 128}
    if kind == "glm4_moe_lite":
        sizes |= {"moe_intermediate_size": 64, "q_lora_rank": 64, "kv_lora_rank": 64, "v_head_dim": 32}
    make_hf_model(kind, tmp_path / "hf", **sizes)
    sd = load_file(str(tmp_path / "hf" / "model.safetensors"))
    for name, t in sd.items():
        if name.endswith(("embed_tokens.weight", "lm_head.weight")):
            sd[name] = quantize_rtn(t, 8, rtn_group(t.shape[1])).dequantize()
        elif name.endswith("proj.weight") and "kv_b_proj" not in name or name.endswith("mqa.weight"):
            assert t.shape[1] % 64 == 0, name
            sd[name] = quantize_nf4(t).dequantize()
    (tmp_path / "ref").mkdir()
    save_file(sd, str(tmp_path / "ref" / "model.safetensors"))
    (tmp_path / "ref" / "config.json").write_text((tmp_path / "hf" / "config.json").read_text())
    ours = load_model(tmp_path / "hf", torch.device("cpu"), torch.float32, nf4=True)
    proj = "mlp.experts.gate_proj" if kind == "glm4_moe_lite" else "self_attn.qkv_proj"
    assert ours.get_submodule(f"model.layers.1.{proj}").qweight.lut is not None  # NF4's code table
    if kind == "glm4_moe_lite":
        assert ours.get_submodule("model.layers.1.self_attn.kv_b_proj").weight.dtype == torch.float32
        assert ours.get_submodule("model.layers.1.mlp.gate").weight.dtype == torch.float32
    ids = ids_of(40, 7)
    ref = full_forward(load_model(tmp_path / "ref", torch.device("cpu"), torch.float32), ids)
    torch.testing.assert_close(full_forward(ours, ids), ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind", ["glm4", "glm4_moe_lite"])
def test_awq_checkpoint_equals_its_dequantized_reference(kind, tmp_path):
    """AutoAWQ's GEMM layout of every projection (q/k rows permuted at load as QuantWeights; a quantized kv_b_proj
    dequantized into the dense weight the MLA absorbs; experts stacked): greedy tokens and logits of the
    dequantized checkpoint."""
    sizes = {"hidden_size": 128, "intermediate_size": 128}
    sizes |= {"head_dim": 32} if kind == "glm4" else {"moe_intermediate_size": 128, "q_lora_rank": 128,
                                                       "kv_lora_rank": 128, "v_head_dim": 32}
    make_hf_model(kind, tmp_path / "hf", **sizes)
    tensors, reference = {}, {}
    for name, w in load_file(str(tmp_path / "hf" / "model.safetensors")).items():
        if name.endswith(("proj.weight", "mqa.weight")) and "embed" not in name:
            q, z, s = awq_quantize(w)
            base = name[: -len(".weight")]
            tensors |= {f"{base}.qweight": awq_pack(q), f"{base}.qzeros": awq_pack(z), f"{base}.scales": s}
            reference[name] = ((q - z.repeat_interleave(128, 0)) * s.float().repeat_interleave(128, 0)).T
        else:
            tensors[name] = w if "mlp.gate." in name else w.half()  # the router stays fp32 in AWQ files
            reference[name] = tensors[name].float()
    (tmp_path / "awq").mkdir()
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    (tmp_path / "awq" / "config.json").write_text(json.dumps(config | {"quantization_config": AWQ_CONFIG}))
    save_file(tensors, str(tmp_path / "awq" / "model.safetensors"))
    assert_same_greedy(tmp_path / "awq", write_reference(tmp_path / "awq", tmp_path / "ref", reference), atol=5e-3)
