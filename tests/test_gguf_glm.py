"""GGUF files of the two GLM architectures, written with the gguf package the way llama.cpp's converter writes them
(glm4: GLM-4-0414; deepseek2: GLM-4.7-Flash, experts stacked in 3-D tensors, kv_b_proj split into attn_k_b / attn_v_b,
an MTP block appended): the float32 import matches transformers, the quantized one loads in its blocks with the
dequantized import's greedy tokens and the planned bytes, and the tokenizer and routing metadata are read."""

import json
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from tiny_models import full_forward, make_hf_model

from openclaw.engine.memory import loaded_bytes
from openclaw.errors import OpenClawError
from openclaw.tokenizer import Tokenizer
from openclaw.weights.gguf_import import import_gguf
from openclaw.weights.loader import load_model
from openclaw.weights.sizes import checkpoint_weight_bytes

Q = gguf.GGMLQuantizationType
SPECIALS = ["<|endoftext|>", "[gMASK]", "<sop>", "<|system|>", "<|user|>", "<|assistant|>", "<|observation|>",
            "<think>", "</think>"]
# a GLM-4.7-style template: thinking opens in the prompt unless enable_thinking is false
TEMPLATE = ("[gMASK]<sop>{% for m in messages %}<|{{ m.role }}|>{{ m.content }}{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>{{ '</think>' if enable_thinking is defined and "
            "not enable_thinking else '<think>' }}{% endif %}")


def byte_tokens() -> list[str]:
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = iter(range(256, 512))
    return [chr(b) if b in keep else chr(next(extra)) for b in range(256)]


TOKENS = byte_tokens() + SPECIALS


def tiny(kind: str, path: Path, **overrides):
    return make_hf_model(kind, path, vocab_size=len(TOKENS), **overrides)


def write_gguf(hf_dir: Path, out: Path, arch: str, qtype: Q | None = None, mtp: bool = False,
               keep_kv_b: bool = False, gating: int | None = 2) -> None:
    """The tiny HF checkpoint as llama.cpp's converter writes it (names from the gguf package's own tensor map):
    2-D and expert weights in qtype where their rows split into its blocks (else F16), norms and routers F32."""
    cfg = json.loads((hf_dir / "config.json").read_text())
    sd = {k: v.numpy() for k, v in load_file(str(hf_dir / "model.safetensors")).items()}
    layers = cfg["num_hidden_layers"]
    w = gguf.GGUFWriter(out, arch)
    p = f"{arch}."
    w.add_uint32(p + "block_count", layers + mtp)
    w.add_uint32(p + "context_length", cfg["max_position_embeddings"])
    w.add_uint32(p + "embedding_length", cfg["hidden_size"])
    w.add_uint32(p + "feed_forward_length", cfg["intermediate_size"])
    w.add_uint32(p + "attention.head_count", cfg["num_attention_heads"])
    w.add_float32(p + "attention.layer_norm_rms_epsilon", cfg["rms_norm_eps"])
    w.add_float32(p + "rope.freq_base", cfg["rope_parameters"]["rope_theta"])
    if arch == "glm4":
        w.add_uint32(p + "attention.head_count_kv", cfg["num_key_value_heads"])
        w.add_uint32(p + "attention.key_length", cfg["head_dim"])
        w.add_uint32(p + "rope.dimension_count", cfg["head_dim"] // 2)
    else:
        rope, nope, dv, r = cfg["qk_rope_head_dim"], cfg["qk_nope_head_dim"], cfg["v_head_dim"], cfg["kv_lora_rank"]
        for key, value in [("attention.head_count_kv", 1), ("attention.q_lora_rank", cfg["q_lora_rank"]),
                           ("attention.kv_lora_rank", r), ("attention.key_length", r + rope),
                           ("attention.value_length", r), ("attention.key_length_mla", nope + rope),
                           ("attention.value_length_mla", dv), ("rope.dimension_count", rope),
                           ("expert_count", cfg["n_routed_experts"]), ("expert_used_count", cfg["num_experts_per_tok"]),
                           ("expert_shared_count", cfg["n_shared_experts"]),
                           ("expert_feed_forward_length", cfg["moe_intermediate_size"]),
                           ("leading_dense_block_count", 1), ("expert_group_count", 1),
                           ("expert_group_used_count", 1), ("nextn_predict_layers", int(mtp))]:
            w.add_uint32(p + key, value)
        w.add_float32(p + "expert_weights_scale", cfg["routed_scaling_factor"])
        w.add_bool(p + "expert_weights_norm", True)
        if gating is not None:
            w.add_uint32(p + "expert_gating_func", gating)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("glm4")
    w.add_token_list(TOKENS)
    w.add_token_types([1] * 256 + [3] * len(SPECIALS))
    w.add_token_merges([])
    w.add_eos_token_id(TOKENS.index("<|endoftext|>"))
    w.add_uint32("tokenizer.ggml.eot_token_id", TOKENS.index("<|user|>"))
    w.add_uint32("tokenizer.ggml.eom_token_id", TOKENS.index("<|observation|>"))
    w.add_bos_token_id(TOKENS.index("<|endoftext|>"))
    w.add_bool("tokenizer.ggml.add_bos_token", True)  # ignored for the glm4 pre-tokenizer, as llama.cpp does
    w.add_chat_template(TEMPLATE)
    for name, value in converted(sd, cfg, arch, layers, mtp, keep_kv_b).items():
        quantize = qtype is not None and value.ndim >= 2 and value.shape[-1] % 32 == 0 and "ffn_gate_inp" not in name
        if quantize:
            w.add_tensor(name, gguf.quants.quantize(value.astype(np.float32), qtype), raw_dtype=qtype)
        else:
            w.add_tensor(name, value.astype(np.float16 if value.ndim >= 2 and "ffn_gate_inp" not in name
                                            else np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def converted(sd: dict, cfg: dict, arch: str, layers: int, mtp: bool, keep_kv_b: bool) -> dict:
    """HF tensors -> GGUF names and layouts: experts stacked, kv_b_proj split (W_UK transposed), an MTP block."""
    tmap = gguf.get_tensor_name_map(gguf.MODEL_ARCH.GLM4 if arch == "glm4" else gguf.MODEL_ARCH.DEEPSEEK2, layers + 1)
    if mtp:  # an appended next-token-prediction block: layer 1's tensors again, and its own eh_proj
        sd = sd | {k.replace("layers.1.", f"layers.{layers}."): v for k, v in sd.items() if ".layers.1." in k}
    out, experts = {}, {}
    for name, value in sd.items():
        name = name.replace("e_score_correction_bias", "e_score_correction.bias")
        if ".experts." in name and ".shared_experts." not in name:
            layer, e, proj = name.split(".")[2], int(name.split(".")[5]), name.split(".")[6]
            experts.setdefault((layer, proj), {})[e] = value
            continue
        if name.endswith("kv_b_proj.weight") and not keep_kv_b:
            h, dn = cfg["num_attention_heads"], cfg["qk_nope_head_dim"]
            kv_b = value.reshape(h, -1, value.shape[-1])
            out[tmap.get_name(name.replace("kv_b_proj", "k_b_proj"), (".weight",))] = \
                np.ascontiguousarray(kv_b[:, :dn].transpose(0, 2, 1))
            out[tmap.get_name(name.replace("kv_b_proj", "v_b_proj"), (".weight",))] = np.ascontiguousarray(kv_b[:, dn:])
            continue
        mapped = tmap.get_name(name, (".weight", ".bias"))
        assert mapped is not None, name
        out[mapped] = value
    for (layer, proj), per in experts.items():
        stacked = np.stack([per[e] for e in sorted(per)])
        out[tmap.get_name(f"model.layers.{layer}.mlp.experts.{proj}", ()) + ".weight"] = stacked
    return out


def logits_of(model_dir: Path, ids: list[int]) -> torch.Tensor:
    return full_forward(load_model(model_dir, torch.device("cpu"), torch.float32), ids)


@pytest.mark.parametrize("arch,kind,extra", [("glm4", "glm4", {}), ("deepseek2", "glm4_moe_lite", {}),
                                             ("deepseek2", "glm4_moe_lite", {"keep_kv_b": True, "gating": None})])
def test_float_gguf_imports_and_matches_transformers(arch, kind, extra, tmp_path):
    """F16/F32 tensors: the import dequantizes them to the HF checkpoint; logits match transformers' model."""
    hf = tiny(kind, tmp_path / "hf")
    write_gguf(tmp_path / "hf", tmp_path / "m.gguf", arch, mtp=arch == "deepseek2", **extra)
    out = import_gguf(tmp_path / "m.gguf", tmp_path / "cache")
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == kind and config["num_hidden_layers"] == 3  # the MTP block is not a layer
    ids = torch.randint(0, len(TOKENS), (60,), generator=torch.Generator().manual_seed(1)).tolist()
    with torch.no_grad():  # transformers on the same fp16-rounded weights
        sd = hf.state_dict()
        for name, t in sd.items():
            if t.dim() >= 2 and "mlp.gate.weight" not in name:
                t.copy_(t.half().float())
        ref = hf(torch.tensor([ids])).logits[0]
    torch.testing.assert_close(logits_of(out, ids), ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("arch,kind", [("glm4", "glm4"), ("deepseek2", "glm4_moe_lite")])
@pytest.mark.parametrize("qtype", [Q.Q8_0, Q.Q4_0])
def test_quantized_gguf_loads_in_its_blocks_with_the_dequantized_greedy_output(arch, kind, qtype, tmp_path):
    tiny(kind, tmp_path / "hf")
    write_gguf(tmp_path / "hf", tmp_path / "m.gguf", arch, qtype, mtp=arch == "deepseek2")
    ref_dir = import_gguf(tmp_path / "m.gguf", tmp_path / "cache")
    q_dir = import_gguf(tmp_path / "m.gguf", tmp_path / "cache", quantized=True)
    model = load_model(q_dir, torch.device("cpu"), torch.float32)
    assert model.quantized
    if arch == "deepseek2":  # 3 x 8 experts of layer 1 stacked in one weight of the file's own layout
        qw = model.get_submodule("model.layers.1.mlp.experts.gate_proj").qweight
        assert qw.shape == (8 * 32, 64) and qw.bits == (8 if qtype == Q.Q8_0 else 4)
    assert checkpoint_weight_bytes(q_dir, 4) == loaded_bytes(model)
    reference = load_model(ref_dir, torch.device("cpu"), torch.float32)
    prompt = [3, 17, 99, 5, 60, 2, 41, 7]
    ids, ref_ids = list(prompt), list(prompt)
    for _ in range(12):
        ids.append(int(full_forward(model, ids)[-1].argmax()))
        ref_ids.append(int(full_forward(reference, ref_ids)[-1].argmax()))
    assert ids == ref_ids
    torch.testing.assert_close(full_forward(model, ids), full_forward(reference, ids), rtol=1e-4, atol=1e-4)


def test_glm_tokenizer_chat_template_and_stops(tmp_path):
    tiny("glm4", tmp_path / "hf")
    write_gguf(tmp_path / "hf", tmp_path / "m.gguf", "glm4")
    out = import_gguf(tmp_path / "m.gguf", tmp_path / "cache")
    tok = Tokenizer.from_dir(out)
    pieces = [p for p, _ in tok.backend.pre_tokenizer.pre_tokenize_str("12345 apples")]
    assert pieces == ["123", "45", "Ġapples"]  # digits in runs of up to three (llama.cpp's glm4 split)
    ids = tok.encode("hi", add_special_tokens=True)  # no BOS: GLM's template writes [gMASK]<sop>
    assert ids == [TOKENS.index("h"), TOKENS.index("i")]
    text = tok.render_chat([{"role": "user", "content": "hi"}], enable_thinking=False)
    assert text == "[gMASK]<sop><|user|>hi<|assistant|></think>"
    assert tok.encode(text)[:2] == [TOKENS.index("[gMASK]"), TOKENS.index("<sop>")]
    gen = json.loads((out / "generation_config.json").read_text())
    assert gen["eos_token_id"] == sorted(TOKENS.index(t) for t in ("<|endoftext|>", "<|user|>", "<|observation|>"))


def test_softmax_routed_deepseek2_is_refused_in_one_line(tmp_path):
    tiny("glm4_moe_lite", tmp_path / "hf")
    write_gguf(tmp_path / "hf", tmp_path / "m.gguf", "deepseek2", gating=1)
    with pytest.raises(OpenClawError, match="softmax"):
        import_gguf(tmp_path / "m.gguf", tmp_path / "cache")
