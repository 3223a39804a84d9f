"""What a GGUF file's architecture means in Hugging Face terms: its config.json fields and, tensor by tensor, the HF
names and shapes its weights take (llama, qwen2, qwen3, glm4 and deepseek2, which GLM-4.7-Flash converts to).

llama.cpp's converter reshapes some weights: llama's Q/K rows are permuted (undone here), an MoE layer's experts are
stacked into one 3-D tensor per projection (split back into one entry per expert), and MLA's kv_b_proj is stored as
attn_k_b (W_UK^T per head) and attn_v_b (W_UV per head), joined back into kv_b_proj. A deepseek2 file may carry the
MTP layer (blocks past block_count - nextn_predict_layers), which is skipped. Each Entry says how to build one HF
tensor; `dequantized` builds it in float32, openclaw.weights.gguf_blocks repacks 2-D blocks without dequantizing. It
does not read tokenizers or write anything (openclaw.weights.gguf_import does).
"""

from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np

from openclaw.errors import OpenClawError
from openclaw.models import FAMILIES

# GGUF general.architecture -> the config.json model_type of the family that runs it
MODEL_TYPES = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "glm4": "glm4", "deepseek2": "glm4_moe_lite"}

_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LLAMA = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm", "attn_q": "self_attn.q_proj",
          "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
          "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm", "ffn_gate": "mlp.gate_proj",
          "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}
# GLM-4-0414: ffn_up holds the fused [gate; up] rows, two more norms on the sublayer outputs
_GLM4 = {"attn_norm": "input_layernorm", "post_attention_norm": "post_self_attn_layernorm",
         "ffn_norm": "post_attention_layernorm", "post_ffw_norm": "post_mlp_layernorm", "attn_q": "self_attn.q_proj",
         "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
         "ffn_up": "mlp.gate_up_proj", "ffn_down": "mlp.down_proj"}
_DEEPSEEK2 = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm", "attn_q": "self_attn.q_proj",
              "attn_q_a": "self_attn.q_a_proj", "attn_q_a_norm": "self_attn.q_a_layernorm",
              "attn_q_b": "self_attn.q_b_proj", "attn_kv_a_mqa": "self_attn.kv_a_proj_with_mqa",
              "attn_kv_a_norm": "self_attn.kv_a_layernorm", "attn_kv_b": "self_attn.kv_b_proj",
              "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
              "ffn_down": "mlp.down_proj", "ffn_gate_inp": "mlp.gate", "exp_probs_b": "mlp.gate",
              "ffn_gate_shexp": "mlp.shared_experts.gate_proj", "ffn_up_shexp": "mlp.shared_experts.up_proj",
              "ffn_down_shexp": "mlp.shared_experts.down_proj"}
_EXPERTS = {"ffn_gate_exps": "gate_proj", "ffn_up_exps": "up_proj", "ffn_down_exps": "down_proj"}
_LAYER_NAMES = {"llama": _LLAMA, "qwen2": _LLAMA, "qwen3": _LLAMA, "glm4": _GLM4, "deepseek2": _DEEPSEEK2}


@dataclass
class Entry:
    """One HF tensor of a GGUF file: `tensor` (or its expert `expert`'s slice), rows un-permuted by `heads` (llama
    Q/K), or kv_b_proj joined from `tensor` (attn_k_b) and `value` (attn_v_b)."""

    name: str
    shape: tuple[int, ...]
    tensor: gguf.ReaderTensor
    heads: int | None = None
    expert: int | None = None
    value: gguf.ReaderTensor | None = None

    def data(self) -> np.ndarray:
        """The raw (still quantized) rows of a plain or expert entry, as GGUFReader maps them."""
        return self.tensor.data if self.expert is None else self.tensor.data[self.expert]

    def dequantized(self) -> np.ndarray:
        """The HF tensor in float32 (a view of the mapped file is copied only where needed)."""
        if self.value is not None:  # per head [W_UK_h; W_UV_h] from W_UK_h^T [R, Dn] and W_UV_h [Dv, R]
            k_b, v_b = (_array(t) for t in (self.tensor, self.value))
            return np.concatenate([k_b.transpose(0, 2, 1), v_b], axis=1).reshape(self.shape)
        qtype = self.tensor.tensor_type
        w = gguf.quants.dequantize(self.data(), qtype).reshape(self.shape)
        return unpermute(w, self.heads) if self.heads else w


def _array(t: gguf.ReaderTensor) -> np.ndarray:
    return gguf.quants.dequantize(t.data, t.tensor_type).reshape([int(n) for n in reversed(t.shape)])


def field(reader: gguf.GGUFReader, key: str, default=None):
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def architecture(reader: gguf.GGUFReader, path: Path) -> str:
    """The file's general.architecture when a family runs it (MODEL_TYPES); a one-line error for any other."""
    arch = field(reader, "general.architecture")
    if arch not in MODEL_TYPES or MODEL_TYPES[arch] not in FAMILIES:
        raise OpenClawError(f"{path} is a {arch!r} model; the GGUF importer supports {', '.join(MODEL_TYPES)}.")
    return arch


def unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of llama.cpp's Q/K permutation: w: [n_head * D, ...] from rows interleaved in (i, half) pairs
    per head (GGML's rope) back to [first half; second half] per head (HF's rotate_half)."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def main_layers(reader: gguf.GGUFReader, arch: str) -> int:
    """Decoder layers the model runs: block_count less the MTP layers a deepseek2 file may append."""
    return int(field(reader, f"{arch}.block_count")) - int(field(reader, f"{arch}.nextn_predict_layers", 0) or 0)


def tensor_plan(reader: gguf.GGUFReader, arch: str, path: Path, config: dict) -> list[Entry]:
    """One Entry per HF tensor, after checking that every tensor type can be read."""
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    names, layers = _LAYER_NAMES[arch], main_layers(reader, arch)
    by_name = {t.name: t for t in reader.tensors}
    plan = []
    for t in reader.tensors:
        if t.name == "rope_freqs.weight":
            raise OpenClawError(f"{path} uses llama3-style rope scaling (rope_freqs), which is not supported yet.")
        shape = tuple(int(n) for n in reversed(t.shape))  # ggml lists the fastest dimension first
        parts = t.name.split(".")
        if t.name in _GLOBAL_NAMES:
            plan.append(Entry(_GLOBAL_NAMES[t.name], shape, t))
            continue
        if len(parts) != 4 or parts[0] != "blk":
            raise OpenClawError(f"{path} holds tensor {t.name!r}, which the {arch} importer does not know.")
        layer, kind = int(parts[1]), parts[2]
        if layer >= layers or kind == "nextn":  # the MTP / next-token-prediction layer: not run
            continue
        prefix = f"model.layers.{layer}"
        if kind in _EXPERTS:  # [E, N, K] -> E tensors [N, K]
            plan += [Entry(f"{prefix}.mlp.experts.{e}.{_EXPERTS[kind]}.weight", shape[1:], t, expert=e)
                     for e in range(shape[0])]
        elif kind == "attn_k_b":
            if f"blk.{layer}.attn_kv_b.weight" in by_name:  # older files store both: kv_b is read as it is
                continue
            value = by_name.get(f"blk.{layer}.attn_v_b.weight")
            if value is None:
                raise OpenClawError(f"{path} has {t.name} without attn_v_b; the file is incomplete.")
            h, r, dn = shape
            plan.append(Entry(f"{prefix}.self_attn.kv_b_proj.weight", (h * (dn + int(value.shape[1])), r), t,
                              value=value))
        elif kind == "attn_v_b":
            continue  # joined with attn_k_b
        elif kind in names:
            suffix = "e_score_correction_bias" if kind == "exp_probs_b" else parts[3]
            # llama.cpp's converter permutes Q/K rows only for the llama architecture (its rope pairs adjacent lanes)
            permuted = {"attn_q": heads, "attn_k": kv_heads}.get(kind) if arch == "llama" else None
            plan.append(Entry(f"{prefix}.{names[kind]}.{suffix}", shape, t, heads=permuted))
        else:
            raise OpenClawError(f"{path} holds tensor {t.name!r}, which the {arch} importer does not know.")
    for qtype in {t.tensor_type for t in reader.tensors}:
        sample = next(t for t in reader.tensors if t.tensor_type == qtype)
        try:
            gguf.quants.dequantize(sample.data.reshape(-1, sample.data.shape[-1])[:1], qtype)
        except NotImplementedError as exc:
            raise OpenClawError(
                f"{path} stores {sample.name} as {qtype.name}, which the gguf package cannot dequantize; "
                "use a file with another quantization (Q4_0, Q4_1, Q8_0, Q4_K, Q6_K, ...)."
            ) from exc
    return plan


def config(reader: gguf.GGUFReader, arch: str, path: Path) -> dict:
    """The HF config.json of the file's model, from its metadata and tensor shapes."""

    def get(key: str, default=None):
        return field(reader, f"{arch}.{key}", default)

    required = ["embedding_length", "feed_forward_length", "block_count", "attention.head_count", "context_length",
                "attention.layer_norm_rms_epsilon"]
    if arch == "deepseek2":
        required += ["attention.kv_lora_rank", "rope.dimension_count", "expert_count", "expert_used_count",
                     "expert_feed_forward_length"]
    for key in required:
        if get(key) is None:
            raise OpenClawError(f"{path} lacks the metadata key {arch}.{key}; the file is incomplete, re-download it.")
    names = {t.name: t for t in reader.tensors}
    if "token_embd.weight" not in names:
        raise OpenClawError(f"{path} has no token_embd.weight tensor; the file is incomplete or not a language model.")
    hidden, heads = get("embedding_length"), get("attention.head_count")
    eos = field(reader, "tokenizer.ggml.eos_token_id")
    if arch in ("glm4", "deepseek2"):  # GLM's turns also end at <|user|> and <|observation|>: its eot and eom
        ends = [field(reader, f"tokenizer.ggml.{k}_token_id") for k in ("eos", "eot", "eom")]
        eos = sorted({e for e in ends if e is not None})
    common = {
        "architectures": [FAMILIES[MODEL_TYPES[arch]].architectures[MODEL_TYPES[arch]]],
        "model_type": MODEL_TYPES[arch],
        "vocab_size": int(names["token_embd.weight"].shape[1]),  # ggml order: [hidden, vocab]
        "hidden_size": hidden,
        "intermediate_size": get("feed_forward_length"),
        "num_hidden_layers": main_layers(reader, arch),
        "num_attention_heads": heads,
        "hidden_act": "silu",
        "rms_norm_eps": get("attention.layer_norm_rms_epsilon"),
        "rope_theta": get("rope.freq_base", 10000.0),  # llama.cpp's default when the key is absent
        "rope_scaling": _rope_scaling(reader, arch, path),
        "max_position_embeddings": get("context_length"),
        "tie_word_embeddings": "output.weight" not in names,
        "bos_token_id": field(reader, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": eos,
        "torch_dtype": "float32",
    }
    if arch == "deepseek2":
        return common | _deepseek2(get, names, path)
    kv_heads = get("attention.head_count_kv", heads)
    if isinstance(kv_heads, list):  # a per-layer array in some files; these families use one value
        if len(set(kv_heads)) != 1:
            raise OpenClawError(f"{path} has a different KV head count per layer, which is not supported.")
        kv_heads = kv_heads[0]
    head_dim = get("attention.key_length", hidden // heads)
    rotary = get("rope.dimension_count", head_dim)
    if rotary != head_dim and arch != "glm4":
        raise OpenClawError(f"{path} rotates only part of each head (partial rope), which is not supported.")
    extra = {"partial_rotary_factor": rotary / head_dim} if arch == "glm4" else {"mlp_bias": False}
    return common | extra | {"num_key_value_heads": kv_heads, "head_dim": head_dim,
                             "attention_bias": "blk.0.attn_q.bias" in names}


def _deepseek2(get, names: dict, path: Path) -> dict:
    """config.json fields of an MLA + MoE model (GLM-4.7-Flash) from deepseek2 metadata."""
    gating = get("expert_gating_func")
    # files converted before llama.cpp wrote the key (2026-01) hold GLM-4.7-Flash's sigmoid router all the same:
    # a correction bias (exp_probs_b) is only ever used with sigmoid scores
    if gating is None and not any(n.endswith(".exp_probs_b.bias") for n in names):
        gating = int(gguf.ExpertGatingFuncType.SOFTMAX)
    if gating is not None and gating != int(gguf.ExpertGatingFuncType.SIGMOID):
        raise OpenClawError(f"{path} routes its experts with softmax scores (DeepSeek-V2); OpenClaw runs deepseek2 "
                            "files with sigmoid routing (GLM-4.7-Flash, DeepSeek-V3 lineage) only.")
    rope = get("rope.dimension_count")
    q_lora = get("attention.q_lora_rank")
    # key_length / value_length are the MQA view [latent | rope]; the *_mla keys (newer files) the per-head ones
    qk_head = get("attention.key_length_mla", get("attention.key_length"))
    v_head = get("attention.value_length_mla", get("attention.value_length"))
    if "blk.0.attn_kv_b.weight" not in names and "blk.0.attn_v_b.weight" in names:
        v_head = int(names["blk.0.attn_v_b.weight"].shape[1])  # [R, Dv, H] in ggml order
    layers = int(get("block_count")) - int(get("nextn_predict_layers", 0) or 0)
    dense = get("leading_dense_block_count", 0)
    return {
        "num_key_value_heads": get("attention.head_count"),  # transformers' value; the cache has one latent
        "q_lora_rank": q_lora,
        "kv_lora_rank": get("attention.kv_lora_rank"),
        "qk_nope_head_dim": qk_head - rope,
        "qk_rope_head_dim": rope,
        "v_head_dim": v_head,
        "moe_intermediate_size": get("expert_feed_forward_length"),
        "n_routed_experts": get("expert_count"),
        "n_shared_experts": get("expert_shared_count", 0),
        "num_experts_per_tok": get("expert_used_count"),
        "n_group": get("expert_group_count", 1) or 1,
        "topk_group": get("expert_group_used_count", 1) or 1,
        "norm_topk_prob": bool(get("expert_weights_norm", False)),
        "routed_scaling_factor": float(get("expert_weights_scale", 1.0)),
        "mlp_layer_types": ["dense"] * dense + ["sparse"] * (layers - dense),
        "rope_interleave": True,  # llama.cpp's deepseek2 rope pairs adjacent dims, as the weights store them
        "attention_bias": False,
    }


def _rope_scaling(reader: gguf.GGUFReader, arch: str, path: Path) -> dict | None:
    def get(key: str, default=None):
        return field(reader, f"{arch}.rope.{key}", default)

    kind = get("scaling.type", "linear" if get("scale_linear") else "none")
    factor = get("scaling.factor", get("scale_linear"))
    if kind == "none":
        return None
    if kind == "linear":
        return {"rope_type": "linear", "factor": factor}
    if kind == "yarn":
        scaling = {"rope_type": "yarn", "factor": factor}
        for gguf_key, hf_key in [("original_context_length", "original_max_position_embeddings"),
                                 ("yarn_beta_fast", "beta_fast"), ("yarn_beta_slow", "beta_slow")]:
            if (value := get(f"scaling.{gguf_key}")) is not None:
                scaling[hf_key] = value
        if (log_mul := get("scaling.yarn_log_multiplier")) and arch == "deepseek2":
            scaling["mscale_all_dim"] = log_mul / 0.1  # llama.cpp stores 0.1 * mscale_all_dim for deepseek2
        return scaling
    raise OpenClawError(f"{path} uses rope scaling {kind!r}; only linear and yarn are supported.")
