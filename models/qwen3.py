"""The dense GQA decoder family: Qwen3 (q/k RMSNorm before RoPE), Qwen2 (q/k/v bias) and Llama (neither).

Reads top to bottom: config (HF field names, from config.json) -> modules -> model -> checkpoint-name mapping ->
the family's table entry. The checkpoint's q/k/v and gate/up projections are fused here; PACKED says how their
tensors fold in. Norms, q/k-norm + RoPE + KV write, SiLU-mul and decode attention are kernels/ ops, which run Triton on
CUDA tensors and their references on the CPU. It does not load weights (openclaw.weights.loader does) or own the KV
pool (the runner passes it in).
"""

from dataclasses import dataclass, field

import torch
from openclaw.kernels.decode_ops import qk_norm_rope_kv
from openclaw.models.family import Family
from openclaw.models.layers import (
    MLP,
    BandLayout,
    BatchMeta,
    QuantEmbedding,
    RMSNorm,
    Rope,
    dense,
    linear,
    pool_attention,
    rope_parameters,
)
from torch import nn

# fused parameter -> checkpoint tensors in the order they are stacked along the output dim
PACKED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


@dataclass
class Qwen3Config:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool
    o_bias: bool
    qk_norm: bool
    rope: dict = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: dict) -> "Qwen3Config":
        model_type = d["model_type"]
        heads = d["num_attention_heads"]
        return cls(
            model_type=model_type,
            vocab_size=d["vocab_size"],
            hidden_size=d["hidden_size"],
            intermediate_size=d["intermediate_size"],
            num_hidden_layers=d["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=d.get("num_key_value_heads") or heads,
            head_dim=d.get("head_dim") or d["hidden_size"] // heads,
            rms_norm_eps=d.get("rms_norm_eps", 1e-6),
            max_position_embeddings=d.get("max_position_embeddings", 4096),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            # Qwen2 always has q/k/v bias; Llama and Qwen3 only when attention_bias says so
            attention_bias=model_type == "qwen2" or bool(d.get("attention_bias", False)),
            # Llama and Qwen3 put the attention bias on o_proj too; Qwen2 never does
            o_bias=model_type != "qwen2" and bool(d.get("attention_bias", False)),
            qk_norm=model_type == "qwen3",
            rope=rope_parameters(d),
        )

    def cache_shape(self) -> tuple[int, int, int]:
        """(KV heads, key width, value width) of one token in one layer of the KV pool."""
        return self.num_key_value_heads, self.head_dim, self.head_dim

    def kv_bytes_per_token(self, dtype_bytes: int) -> int:
        """KV pool bytes of one token, all layers (K and V of every KV head)."""
        return 2 * self.num_hidden_layers * self.num_key_value_heads * self.head_dim * dtype_bytes

    def linear_shapes(self) -> list[tuple[str, int, int, bool]]:
        """(checkpoint name, N, K, has bias) of every linear weight of the decoder layers, as the checkpoint stores
        them (unfused)."""
        h, d, inter = self.hidden_size, self.head_dim, self.intermediate_size
        heads, hkv, bias = self.num_attention_heads, self.num_key_value_heads, self.attention_bias
        layer = [("self_attn.q_proj", heads * d, h, bias), ("self_attn.k_proj", hkv * d, h, bias),
                 ("self_attn.v_proj", hkv * d, h, bias), ("self_attn.o_proj", h, heads * d, self.o_bias),
                 ("mlp.gate_proj", inter, h, False), ("mlp.up_proj", inter, h, False), ("mlp.down_proj", h, inter, False)]
        return [(f"model.layers.{i}.{name}.weight", n, k, b)
                for i in range(self.num_hidden_layers) for name, n, k, b in layer]

    def norm_elements(self) -> int:
        """Weights of every RMSNorm (layer norms, q/k norms, the final norm)."""
        per_layer = 2 * self.hidden_size + (2 * self.head_dim if self.qk_norm else 0)
        return self.num_hidden_layers * per_layer + self.hidden_size

    def dense_bytes(self, dtype_bytes: int) -> int:
        """Matrices held unquantized whatever the format, besides the embeddings: none here."""
        return 0

    def activation_bytes(self, tokens: int, context: int, dtype_bytes: int) -> int:
        """Bytes of one forward step's transient tensors at `tokens` tokens of prefill against `context` cached ones:
        hidden states, fused qkv, attention output, gate/up, and prefill attention's per-KV-head-group K/V copy
        (models/layers.py) and its [T, S] mask."""
        h, d = self.hidden_size, self.head_dim
        heads, hkv = self.num_attention_heads, self.num_key_value_heads
        per_token = 4 * h + (heads + 2 * hkv) * d + heads * d + 3 * self.intermediate_size
        attention = 2 * 2 * (heads // hkv) * context * d * dtype_bytes + tokens * context
        return 2 * tokens * per_token * dtype_bytes + attention


class Attention(nn.Module):
    def __init__(self, cfg: Qwen3Config, quantized: bool = False):
        super().__init__()
        self.h, self.hkv, self.d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.qkv_proj = linear(cfg.hidden_size, (self.h + 2 * self.hkv) * self.d, cfg.attention_bias, quantized)
        self.o_proj = linear(self.h * self.d, cfg.hidden_size, cfg.o_bias, quantized)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(self.d, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(self.d, cfg.rms_norm_eps)
        self.qk_norm = cfg.qk_norm
        self.eps = cfg.rms_norm_eps
        self.scale = self.d ** -0.5

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, meta: BatchMeta,
                k_cache: torch.Tensor, v_cache: torch.Tensor, mass: torch.Tensor | None = None) -> torch.Tensor:
        """x: [T, hidden]; k_cache, v_cache: [S, Hkv, D] (this layer's pool); mass: this layer's BatchMeta.key_mass."""
        T = x.shape[0]
        qkv = self.qkv_proj(x)
        norms = (self.q_norm.weight, self.k_norm.weight) if self.qk_norm else (None, None)
        # the tap (calibration, query-based eviction) sees the vectors RoPE rotates: after q_norm, after the bias
        q_pre = None if meta.query_tap is None else qkv.new_empty(T, self.h, self.d)
        q = qk_norm_rope_kv(qkv, *norms, self.eps, cos, sin, k_cache, v_cache, meta.slot_mapping, self.h, self.hkv,
                            self.d, q_pre=q_pre)
        if meta.query_tap is not None:
            meta.query_tap(q_pre, q)
        o = pool_attention(q, k_cache, v_cache, meta, self.scale, mass)
        return self.o_proj(o.reshape(T, self.h * self.d))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: Qwen3Config, quantized: bool = False):
        super().__init__()
        self.self_attn = Attention(cfg, quantized)
        self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size, quantized)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, residual, cos, sin, meta, k_cache, v_cache, mass=None):
        """-> (this layer's MLP output, the residual stream before it): the caller adds them, here in the next
        layer's add_norm, so that the add and the norm are one kernel."""
        x, residual = self.input_layernorm.add_norm(x, residual)
        x = self.self_attn(x, cos, sin, meta, k_cache, v_cache, mass)
        x, residual = self.post_attention_layernorm.add_norm(x, residual)
        return self.mlp(x), residual


class Backbone(nn.Module):
    def __init__(self, cfg: Qwen3Config, quantized: bool = False):
        super().__init__()
        embedding = QuantEmbedding if quantized else nn.Embedding
        self.embed_tokens = embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, quantized) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class Qwen3ForCausalLM(nn.Module):
    """quantized: every linear layer is a QuantLinear and the embedding a QuantEmbedding; the loader fills them from a
    quantized checkpoint (embeddings and lm_head in 8 bits). A tied quantized lm_head shares the embedding's weight."""

    def __init__(self, cfg: Qwen3Config, quantized: bool = False):
        super().__init__()
        self.config = cfg
        self.quantized = quantized
        self.model = Backbone(cfg, quantized)
        if quantized or not cfg.tie_word_embeddings:
            self.lm_head = linear(cfg.hidden_size, cfg.vocab_size, False, quantized)
        self.rope = Rope(cfg.head_dim, cfg.rope, cfg.max_position_embeddings)
        self.bands = BandLayout.single(self.rope, cfg.head_dim)  # how TriAttention pairs q/k dims (half layout)

    def lm_head_weight(self) -> torch.Tensor:
        """The unquantized model's output projection [vocab, hidden]."""
        return self.model.embed_tokens.weight if self.config.tie_word_embeddings else self.lm_head.weight

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """x: [N, hidden] (final-normed) -> [N, vocab] fp32."""
        if self.quantized:
            return self.lm_head(x).float()
        return dense(x, self.lm_head_weight()).float()

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: BatchMeta,
                k_pool: torch.Tensor, v_pool: torch.Tensor) -> torch.Tensor:
        """input_ids, positions: [T]; k_pool, v_pool: [L, S, Hkv, D] -> logits [N, vocab] (fp32) of sampled rows."""
        x = self.model.embed_tokens(input_ids)
        cos, sin = self.rope.cos_sin(positions, x.dtype)
        residual = None
        for i, layer in enumerate(self.model.layers):
            mass = None if meta.key_mass is None else meta.key_mass[i]
            x, residual = layer(x, residual, cos, sin, meta, k_pool[i], v_pool[i], mass)
        idx = meta.sample_idx
        x, _ = self.model.norm.add_norm(x[idx], None if residual is None else residual[idx])
        return self.logits(x)


def checkpoint_target(cfg: object, name: str) -> tuple[str, int, int] | None:
    """Map a checkpoint tensor name to (parameter name, packed index, pack size), or None to skip it.

    Packed index -1 means the tensor is the whole parameter.
    """
    if "rotary_emb" in name:
        return None
    for fused, parts in PACKED.items():
        for i, part in enumerate(parts):
            if f".{part}." in name:
                return name.replace(f".{part}.", f".{fused}."), i, len(parts)
    return name, -1, 1


def packed_sizes(cfg: Qwen3Config, param: str) -> list[int]:
    """Output rows of each checkpoint tensor folded into a fused parameter (by name); [] for any other parameter."""
    fused = param.split(".")[-2]
    if fused == "qkv_proj":
        d = cfg.head_dim
        return [cfg.num_attention_heads * d, cfg.num_key_value_heads * d, cfg.num_key_value_heads * d]
    if fused == "gate_up_proj":
        return [cfg.intermediate_size, cfg.intermediate_size]
    return []

FAMILY = Family(config=Qwen3Config, model=Qwen3ForCausalLM, checkpoint_target=checkpoint_target,
                packed_sizes=packed_sizes, architectures={"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM",
                                                          "qwen3": "Qwen3ForCausalLM"})
