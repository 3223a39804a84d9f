"""The dense GLM-4-0414 family (GLM-4-32B-0414, GLM-Z1-32B-0414; model_type glm4): GQA with q/k/v bias, RoPE on the
first partial_rotary_factor of each head's dims in adjacent-pair order, a fused gate_up_proj, and two more RMSNorms
per layer on the attention and MLP outputs before each residual add.

Reads top to bottom: config (HF field names, from config.json) -> modules -> model -> checkpoint-name mapping ->
the family's table entry. At load, sanitize reorders each q/k head's dims from adjacent pairs (2j, 2j + 1) to the half
layout (j, j + D/2), band j keeping its index (q and k alike, so every dot product is unchanged): the rotated bands
come first and the unrotated dims become frequency-zero bands, so the shared q/k RoPE + KV-write kernel and decode
attention run it as they run Qwen3, and TriAttention scores its keys in bands that match the checkpoint's pairs. It
does not load weights (openclaw.weights.loader does) or own the KV pool (the runner passes it in).
"""

import re
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
    interleaved_to_half,
    linear,
    permute_rows,
    pool_attention,
    rope_parameters,
)
from torch import nn

# fused parameter -> checkpoint tensors in the order they are stacked along the output dim (gate_up_proj is fused in
# the checkpoint already)
PACKED = {"qkv_proj": ("q_proj", "k_proj", "v_proj")}


@dataclass
class Glm4Config:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rotary_dim: int  # head_dim * partial_rotary_factor: the leading dims RoPE rotates
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool
    rope: dict = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: dict) -> "Glm4Config":
        heads = d["num_attention_heads"]
        head_dim = d.get("head_dim") or d["hidden_size"] // heads
        rope = rope_parameters(d)
        # transformers 5 moves partial_rotary_factor into rope_parameters; published configs keep it at the top
        factor = rope.pop("partial_rotary_factor", d.get("partial_rotary_factor", 0.5))
        return cls(model_type=d["model_type"], vocab_size=d["vocab_size"], hidden_size=d["hidden_size"],
                   intermediate_size=d["intermediate_size"], num_hidden_layers=d["num_hidden_layers"],
                   num_attention_heads=heads, num_key_value_heads=d.get("num_key_value_heads") or heads,
                   head_dim=head_dim, rotary_dim=int(head_dim * factor), rms_norm_eps=d.get("rms_norm_eps", 1e-5),
                   max_position_embeddings=d.get("max_position_embeddings", 32768),
                   tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
                   attention_bias=bool(d.get("attention_bias", True)), rope=rope)

    def cache_shape(self) -> tuple[int, int, int]:
        """(KV heads, key width, value width) of one token in one layer of the KV pool."""
        return self.num_key_value_heads, self.head_dim, self.head_dim

    def kv_bytes_per_token(self, dtype_bytes: int) -> int:
        """KV pool bytes of one token, all layers (K and V of every KV head)."""
        return 2 * self.num_hidden_layers * self.num_key_value_heads * self.head_dim * dtype_bytes

    def linear_shapes(self) -> list[tuple[str, int, int, bool]]:
        """(checkpoint name, N, K, has bias) of every linear weight of the decoder layers, as the checkpoint stores
        them (q/k/v apart, gate_up_proj fused)."""
        h, d, inter = self.hidden_size, self.head_dim, self.intermediate_size
        heads, hkv, bias = self.num_attention_heads, self.num_key_value_heads, self.attention_bias
        layer = [("self_attn.q_proj", heads * d, h, bias), ("self_attn.k_proj", hkv * d, h, bias),
                 ("self_attn.v_proj", hkv * d, h, bias), ("self_attn.o_proj", h, heads * d, False),
                 ("mlp.gate_up_proj", 2 * inter, h, False), ("mlp.down_proj", h, inter, False)]
        return [(f"model.layers.{i}.{name}.weight", n, k, b)
                for i in range(self.num_hidden_layers) for name, n, k, b in layer]

    def norm_elements(self) -> int:
        """Weights of every RMSNorm (four per layer, the final norm)."""
        return self.num_hidden_layers * 4 * self.hidden_size + self.hidden_size

    def dense_bytes(self, dtype_bytes: int) -> int:
        """Matrices held unquantized whatever the format, besides the embeddings: none here."""
        return 0

    def activation_bytes(self, tokens: int, context: int, dtype_bytes: int) -> int:
        """Bytes of one forward step's transient tensors at `tokens` tokens of prefill against `context` cached ones
        (as Qwen3Config.activation_bytes: the prefill attention's per-KV-head-group K/V copy and its mask)."""
        h, d = self.hidden_size, self.head_dim
        heads, hkv = self.num_attention_heads, self.num_key_value_heads
        per_token = 4 * h + (heads + 2 * hkv) * d + heads * d + 3 * self.intermediate_size
        attention = 2 * 2 * (heads // hkv) * context * d * dtype_bytes + tokens * context
        return 2 * tokens * per_token * dtype_bytes + attention


class Attention(nn.Module):
    def __init__(self, cfg: Glm4Config, quantized: bool = False):
        super().__init__()
        self.h, self.hkv, self.d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.qkv_proj = linear(cfg.hidden_size, (self.h + 2 * self.hkv) * self.d, cfg.attention_bias, quantized)
        self.o_proj = linear(self.h * self.d, cfg.hidden_size, False, quantized)  # GLM's o_proj never has a bias
        self.eps = cfg.rms_norm_eps
        self.scale = self.d ** -0.5

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, meta: BatchMeta,
                k_cache: torch.Tensor, v_cache: torch.Tensor, mass: torch.Tensor | None = None) -> torch.Tensor:
        """x: [T, hidden]; k_cache, v_cache: [S, Hkv, D] (this layer's pool); mass: this layer's BatchMeta.key_mass."""
        T = x.shape[0]
        qkv = self.qkv_proj(x)
        q_pre = None if meta.query_tap is None else qkv.new_empty(T, self.h, self.d)
        q = qk_norm_rope_kv(qkv, None, None, self.eps, cos, sin, k_cache, v_cache, meta.slot_mapping, self.h, self.hkv,
                            self.d, q_pre=q_pre)
        if meta.query_tap is not None:
            meta.query_tap(q_pre, q)
        o = pool_attention(q, k_cache, v_cache, meta, self.scale, mass)
        return self.o_proj(o.reshape(T, self.h * self.d))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: Glm4Config, quantized: bool = False):
        super().__init__()
        self.self_attn = Attention(cfg, quantized)
        self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size, quantized)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_self_attn_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)  # the MLP's input norm
        self.post_mlp_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, residual, cos, sin, meta, k_cache, v_cache, mass=None):
        """-> (this layer's normed MLP output, the residual stream before it): the caller adds them, here in the next
        layer's add_norm, so that the add and the norm are one kernel."""
        x, residual = self.input_layernorm.add_norm(x, residual)
        x = self.post_self_attn_layernorm(self.self_attn(x, cos, sin, meta, k_cache, v_cache, mass))
        x, residual = self.post_attention_layernorm.add_norm(x, residual)
        return self.post_mlp_layernorm(self.mlp(x)), residual


class Backbone(nn.Module):
    def __init__(self, cfg: Glm4Config, quantized: bool = False):
        super().__init__()
        embedding = QuantEmbedding if quantized else nn.Embedding
        self.embed_tokens = embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, quantized) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class Glm4ForCausalLM(nn.Module):
    """quantized: every linear layer is a QuantLinear and the embedding a QuantEmbedding (see Qwen3ForCausalLM)."""

    def __init__(self, cfg: Glm4Config, quantized: bool = False):
        super().__init__()
        self.config = cfg
        self.quantized = quantized
        self.model = Backbone(cfg, quantized)
        if quantized or not cfg.tie_word_embeddings:
            self.lm_head = linear(cfg.hidden_size, cfg.vocab_size, False, quantized)
        self.rope = Rope(cfg.head_dim, cfg.rope, cfg.max_position_embeddings, cfg.rotary_dim)
        # one block of head_dim dims in the half layout after sanitize; the unrotated half are frequency-0 bands
        self.bands = BandLayout.single(self.rope, cfg.head_dim, rope_style="interleaved")

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """x: [N, hidden] (final-normed) -> [N, vocab] fp32."""
        if self.quantized:
            return self.lm_head(x).float()
        w = self.model.embed_tokens.weight if self.config.tie_word_embeddings else self.lm_head.weight
        return dense(x, w).float()

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


def packed_sizes(cfg: Glm4Config, param: str) -> list[int]:
    """Output rows of each checkpoint tensor folded into a fused parameter (by name); [] for any other parameter."""
    if param.split(".")[-2] == "qkv_proj":
        d = cfg.head_dim
        return [cfg.num_attention_heads * d, cfg.num_key_value_heads * d, cfg.num_key_value_heads * d]
    return []


_QK = re.compile(r"\.self_attn\.(q|k)_proj\.(weight|bias)$")


def sanitize(cfg: Glm4Config, name: str, tensor):
    """q/k weights and biases: each head's dims from adjacent pairs to the half layout (model docstring)."""
    if not _QK.search(name):
        return tensor
    heads = tensor.shape[0] // cfg.head_dim
    order = interleaved_to_half(cfg.head_dim)
    rows = (torch.arange(heads)[:, None] * cfg.head_dim + order[None, :]).reshape(-1)
    return permute_rows(tensor, rows)


FAMILY = Family(config=Glm4Config, model=Glm4ForCausalLM, checkpoint_target=checkpoint_target,
                packed_sizes=packed_sizes, architectures={"glm4": "Glm4ForCausalLM"}, sanitize=sanitize)
