"""The dense GQA decoder family: Qwen3 (q/k RMSNorm before RoPE), Qwen2 (q/k/v bias) and Llama (neither).

Reads top to bottom: config (HF field names, from config.json) -> modules -> model -> checkpoint-name mapping.
The checkpoint's q/k/v and gate/up projections are fused here; PACKED says how their tensors fold in.
With `fused` (on CUDA by default) norms, q/k-norm + RoPE + KV write and SiLU-mul run as Triton kernels
(kernels/decode_ops.py) and decode attention as flash-decoding; the plain path is the CPU reference.
It does not load weights (openclaw.loader does) or own the KV pool (the runner passes it in).
"""

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from openclaw.kernels.decode_ops import qk_norm_rope_kv, silu_mul
from openclaw.models.layers import (
    BatchMeta,
    QuantEmbedding,
    QuantLinear,
    RMSNorm,
    Rope,
    apply_rope,
    pool_attention,
    rope_parameters,
    write_kv,
)
from torch import nn

ARCHITECTURES = ("llama", "qwen2", "qwen3")

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


def linear(in_features: int, out_features: int, bias: bool, quantized: bool) -> nn.Module:
    return QuantLinear(in_features, out_features, bias) if quantized else nn.Linear(in_features, out_features, bias)


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
                k_cache: torch.Tensor, v_cache: torch.Tensor, fused: bool = False) -> torch.Tensor:
        """x: [T, hidden]; k_cache, v_cache: [S, Hkv, D] (this layer's pool)."""
        T = x.shape[0]
        qkv = self.qkv_proj(x)
        if fused and meta.query_tap is None:  # the tap needs pre-RoPE queries, which the fused kernel never stores
            norms = (self.q_norm.weight, self.k_norm.weight) if self.qk_norm else (None, None)
            q = qk_norm_rope_kv(qkv, *norms, self.eps, cos, sin, k_cache, v_cache, meta.slot_mapping, self.h,
                                self.hkv, self.d)
        else:
            q, k, v = qkv.split([self.h * self.d, self.hkv * self.d, self.hkv * self.d], dim=-1)
            q, k, v = q.view(T, self.h, self.d), k.view(T, self.hkv, self.d), v.view(T, self.hkv, self.d)
            if self.qk_norm:
                q, k = self.q_norm(q), self.k_norm(k)
            q_pre = q
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
            write_kv(k_cache, v_cache, k, v, meta.slot_mapping)
            if meta.query_tap is not None:
                meta.query_tap(q_pre, q)
        o = pool_attention(q, k_cache, v_cache, meta, self.scale, fused)
        return self.o_proj(o.reshape(T, self.h * self.d))


class MLP(nn.Module):
    def __init__(self, cfg: Qwen3Config, quantized: bool = False):
        super().__init__()
        self.inter = cfg.intermediate_size
        self.gate_up_proj = linear(cfg.hidden_size, 2 * cfg.intermediate_size, False, quantized)
        if quantized:
            self.gate_up_proj.gated = True  # the loader may interleave its rows (SiLU-mul in the decode GEMV)
        self.down_proj = linear(cfg.intermediate_size, cfg.hidden_size, False, quantized)

    def forward(self, x: torch.Tensor, fused: bool = False) -> torch.Tensor:
        if getattr(self.gate_up_proj, "interleaved", False):  # a 4-bit weight on the GPU: SiLU in the GEMV
            return self.down_proj(self.gate_up_proj.silu_mul(x))
        if fused:
            return self.down_proj(silu_mul(self.gate_up_proj(x)))
        gate, up = self.gate_up_proj(x).split(self.inter, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: Qwen3Config, quantized: bool = False):
        super().__init__()
        self.self_attn = Attention(cfg, quantized)
        self.mlp = MLP(cfg, quantized)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, residual, cos, sin, meta, k_cache, v_cache, fused=False):
        """-> (this layer's MLP output, the residual stream before it): the caller adds them, here in the next
        layer's add_norm, so that the add and the norm are one kernel on the fused path."""
        x, residual = self.input_layernorm.add_norm(x, residual, fused)
        x = self.self_attn(x, cos, sin, meta, k_cache, v_cache, fused)
        x, residual = self.post_attention_layernorm.add_norm(x, residual, fused)
        return self.mlp(x, fused), residual


class Backbone(nn.Module):
    def __init__(self, cfg: Qwen3Config, quantized: bool = False):
        super().__init__()
        embedding = QuantEmbedding if quantized else nn.Embedding
        self.embed_tokens = embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, quantized) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class Qwen3ForCausalLM(nn.Module):
    """quantized: every linear layer is a QuantLinear and the embedding a QuantEmbedding; the loader fills them from a
    quantized checkpoint (embeddings and lm_head in 8 bits). A tied quantized lm_head shares the embedding's weight.
    fused_kernels: run the Triton kernels (True; Triton's interpreter on CPU tensors) or the plain PyTorch path
    (False); None picks them when the inputs are on CUDA."""

    def __init__(self, cfg: Qwen3Config, quantized: bool = False):
        super().__init__()
        self.config = cfg
        self.quantized = quantized
        self.model = Backbone(cfg, quantized)
        if quantized or not cfg.tie_word_embeddings:
            self.lm_head = linear(cfg.hidden_size, cfg.vocab_size, False, quantized)
        self.rope = Rope(cfg.head_dim, cfg.rope, cfg.max_position_embeddings)
        self.fused_kernels: bool | None = None

    def lm_head_weight(self) -> torch.Tensor:
        """The unquantized model's output projection [vocab, hidden]."""
        return self.model.embed_tokens.weight if self.config.tie_word_embeddings else self.lm_head.weight

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """x: [N, hidden] (final-normed) -> [N, vocab] fp32."""
        if self.quantized:
            return self.lm_head(x).float()
        return F.linear(x, self.lm_head_weight()).float()

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: BatchMeta,
                k_pool: torch.Tensor, v_pool: torch.Tensor) -> torch.Tensor:
        """input_ids, positions: [T]; k_pool, v_pool: [L, S, Hkv, D] -> logits [N, vocab] (fp32) of sampled rows."""
        fused = input_ids.is_cuda if self.fused_kernels is None else self.fused_kernels
        x = self.model.embed_tokens(input_ids)
        cos, sin = self.rope.cos_sin(positions, x.dtype)
        residual = None
        for i, layer in enumerate(self.model.layers):
            x, residual = layer(x, residual, cos, sin, meta, k_pool[i], v_pool[i], fused)
        idx = meta.sample_idx
        x, _ = self.model.norm.add_norm(x[idx], None if residual is None else residual[idx], fused)
        return self.logits(x)


def checkpoint_target(name: str) -> tuple[str, int, int] | None:
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


def packed_sizes(cfg: Qwen3Config, fused: str) -> list[int]:
    """Output rows of each checkpoint tensor folded into a fused parameter."""
    if fused == "qkv_proj":
        d = cfg.head_dim
        return [cfg.num_attention_heads * d, cfg.num_key_value_heads * d, cfg.num_key_value_heads * d]
    return [cfg.intermediate_size, cfg.intermediate_size]
