"""GLM-4.7-Flash (model_type glm4_moe_lite): Multi-head Latent Attention (models/mla.py) and a sigmoid-routed MoE with
a shared expert (models/moe.py) after leading dense layers; DeepSeek-V3 lineage.

Reads top to bottom: config (HF field names, from config.json) -> decoder layer -> model -> checkpoint-name mapping ->
the family's table entry. The pool caches one [latent | RoPE key] vector per token and layer (cache_shape (1, R + E,
0): no separate value). At load, each expert's gate/up/down tensors are stacked into one weight per projection, the
MTP layer (model.layers.{num_hidden_layers}.*) is skipped, and sanitize reorders the RoPE dims of q_b_proj and
kv_a_proj_with_mqa from adjacent pairs to the half layout (rope_interleave, band j keeping its index). It does not load
weights (openclaw.weights.loader does) or own the KV pool (the runner passes it in).
"""

import math
import re
from dataclasses import dataclass, field

import torch
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
    rope_parameters,
)
from openclaw.models.mla import PREFILL_SCORE_BYTES, MLAttention
from openclaw.models.moe import MoE
from torch import nn

# fused parameter -> checkpoint tensors stacked along the output dim (the dense MLP and the shared expert)
PACKED = {"gate_up_proj": ("gate_proj", "up_proj")}
_EXPERT = re.compile(r"\.mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.")
_LAYER = re.compile(r"^model\.layers\.(\d+)\.")


@dataclass
class Glm4MoeLiteConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int  # the dense layers' MLP
    moe_intermediate_size: int  # one expert's
    num_hidden_layers: int
    num_attention_heads: int
    q_lora_rank: int | None
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    n_routed_experts: int
    n_shared_experts: int
    num_experts_per_tok: int
    n_group: int
    topk_group: int
    norm_topk_prob: bool
    routed_scaling_factor: float
    mlp_layer_types: list[str]  # "dense" or "sparse" per layer
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool
    rope_interleave: bool
    rope: dict = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: dict) -> "Glm4MoeLiteConfig":
        if str(d.get("scoring_func", "sigmoid")) != "sigmoid" or str(d.get("topk_method", "noaux_tc")) != "noaux_tc":
            raise ValueError(f"glm4_moe_lite routes with sigmoid scores (topk_method noaux_tc); this config asks for "
                             f"scoring_func {d.get('scoring_func')!r}, topk_method {d.get('topk_method')!r}")
        layers = d["num_hidden_layers"]
        types = d.get("mlp_layer_types") or (["dense"] * d.get("first_k_dense_replace", 1)
                                             + ["sparse"] * (layers - d.get("first_k_dense_replace", 1)))
        if len(types) != layers or set(types) - {"dense", "sparse"}:
            raise ValueError(f"mlp_layer_types {types} must name dense or sparse for each of the {layers} layers")
        return cls(model_type=d["model_type"], vocab_size=d["vocab_size"], hidden_size=d["hidden_size"],
                   intermediate_size=d["intermediate_size"], moe_intermediate_size=d["moe_intermediate_size"],
                   num_hidden_layers=layers, num_attention_heads=d["num_attention_heads"],
                   q_lora_rank=d.get("q_lora_rank"), kv_lora_rank=d["kv_lora_rank"],
                   qk_nope_head_dim=d["qk_nope_head_dim"], qk_rope_head_dim=d["qk_rope_head_dim"],
                   v_head_dim=d["v_head_dim"], n_routed_experts=d["n_routed_experts"],
                   n_shared_experts=d.get("n_shared_experts", 1), num_experts_per_tok=d["num_experts_per_tok"],
                   n_group=d.get("n_group") or 1, topk_group=d.get("topk_group") or 1,
                   norm_topk_prob=bool(d.get("norm_topk_prob", True)),
                   routed_scaling_factor=float(d.get("routed_scaling_factor", 1.0)), mlp_layer_types=list(types),
                   rms_norm_eps=d.get("rms_norm_eps", 1e-5), max_position_embeddings=d.get("max_position_embeddings",
                                                                                          202752),
                   tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
                   attention_bias=bool(d.get("attention_bias", False)),
                   rope_interleave=bool(d.get("rope_interleave", True)), rope=rope_parameters(d))

    @property
    def key_width(self) -> int:
        """One cached key: latent + shared RoPE key (576 for GLM-4.7-Flash)."""
        return self.kv_lora_rank + self.qk_rope_head_dim

    @property
    def softmax_scale(self) -> float:
        """1 / sqrt(nope + rope head dims), times YaRN's mscale_all_dim correction squared when the rope has one."""
        scale = (self.qk_nope_head_dim + self.qk_rope_head_dim) ** -0.5
        factor, m_all = self.rope.get("factor"), self.rope.get("mscale_all_dim")
        if self.rope.get("rope_type", "default") != "default" and m_all and factor and factor > 1:
            scale *= (0.1 * m_all * math.log(factor) + 1.0) ** 2
        return scale

    def moe_layers(self) -> int:
        return self.mlp_layer_types.count("sparse")

    def cache_shape(self) -> tuple[int, int, int]:
        """(KV heads, key width, value width) of one token in one layer of the KV pool: one latent "head", no value."""
        return 1, self.key_width, 0

    def kv_bytes_per_token(self, dtype_bytes: int) -> int:
        """KV pool bytes of one token, all layers: latent + RoPE key (54,144 in bf16 for GLM-4.7-Flash)."""
        return self.num_hidden_layers * self.key_width * dtype_bytes

    def linear_shapes(self) -> list[tuple[str, int, int, bool]]:
        """(checkpoint name, N, K, has bias) of every linear weight of the decoder layers that a format quantizes, as
        the checkpoint stores them (experts one by one); kv_b_proj and the router stay dense (dense_bytes)."""
        h, heads, bias = self.hidden_size, self.num_attention_heads, self.attention_bias
        q_dim = heads * (self.qk_nope_head_dim + self.qk_rope_head_dim)
        attn = ([("self_attn.q_a_proj", self.q_lora_rank, h, bias), ("self_attn.q_b_proj", q_dim, self.q_lora_rank,
                                                                        False)]
                if self.q_lora_rank else [("self_attn.q_proj", q_dim, h, False)])
        attn += [("self_attn.kv_a_proj_with_mqa", self.key_width, h, bias),
                 ("self_attn.o_proj", h, heads * self.v_head_dim, bias)]
        shapes = []
        for i, kind in enumerate(self.mlp_layer_types):
            mlps = [("mlp", self.intermediate_size)] if kind == "dense" else (
                [(f"mlp.experts.{e}", self.moe_intermediate_size) for e in range(self.n_routed_experts)]
                + [("mlp.shared_experts", self.moe_intermediate_size * self.n_shared_experts)])
            layer = attn + [(f"{m}.{p}", n, k, False) for m, inter in mlps
                            for p, n, k in (("gate_proj", inter, h), ("up_proj", inter, h), ("down_proj", h, inter))]
            shapes += [(f"model.layers.{i}.{name}.weight", n, k, b) for name, n, k, b in layer]
        return shapes

    def norm_elements(self) -> int:
        """Weights of every RMSNorm (input and post-attention, q_a and kv_a per layer; the final norm)."""
        per_layer = 2 * self.hidden_size + (self.q_lora_rank or 0) + self.kv_lora_rank
        return self.num_hidden_layers * per_layer + self.hidden_size

    def dense_bytes(self, dtype_bytes: int) -> int:
        """Matrices held unquantized whatever the format: kv_b_proj in the dtype (absorbed per head), the routers and
        their correction biases in fp32."""
        heads = self.num_attention_heads
        kv_b = heads * (self.qk_nope_head_dim + self.v_head_dim) * self.kv_lora_rank * dtype_bytes
        router = (self.n_routed_experts * self.hidden_size + self.n_routed_experts) * 4
        return self.num_hidden_layers * kv_b + self.moe_layers() * router

    def activation_bytes(self, tokens: int, context: int, dtype_bytes: int) -> int:
        """Bytes of one forward step's transient tensors at `tokens` tokens of prefill against `context` cached ones:
        hidden states, queries and absorbed queries (with the tap's copies), latent outputs, the larger of the dense
        MLP and the experts' activations (gathered inputs included), and one query chunk's prefill scores."""
        h, heads, r, e = self.hidden_size, self.num_attention_heads, self.kv_lora_rank, self.qk_rope_head_dim
        q = heads * (self.qk_nope_head_dim + e)
        attention = q + 3 * heads * (r + e) + heads * r + heads * self.v_head_dim + r + e
        experts = self.num_experts_per_tok * (h + 3 * self.moe_intermediate_size) + 3 * self.moe_intermediate_size
        per_token = 4 * h + attention + max(3 * self.intermediate_size, experts)
        return 2 * tokens * per_token * dtype_bytes + PREFILL_SCORE_BYTES + tokens * context


class DecoderLayer(nn.Module):
    def __init__(self, cfg: Glm4MoeLiteConfig, sparse: bool, quantized: bool = False):
        super().__init__()
        self.self_attn = MLAttention(cfg, quantized)
        self.mlp = MoE(cfg, quantized) if sparse else MLP(cfg.hidden_size, cfg.intermediate_size, quantized)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, residual, cos, sin, meta, cache, mass=None):
        """-> (this layer's MLP output, the residual stream before it), added in the next layer's add_norm."""
        x, residual = self.input_layernorm.add_norm(x, residual)
        x = self.self_attn(x, cos, sin, meta, cache, mass)
        x, residual = self.post_attention_layernorm.add_norm(x, residual)
        return self.mlp(x), residual


class Backbone(nn.Module):
    def __init__(self, cfg: Glm4MoeLiteConfig, quantized: bool = False):
        super().__init__()
        embedding = QuantEmbedding if quantized else nn.Embedding
        self.embed_tokens = embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, kind == "sparse", quantized) for kind in cfg.mlp_layer_types)
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class Glm4MoeLiteForCausalLM(nn.Module):
    """quantized: every quantizable linear layer is a QuantLinear (experts stacked, row-major) and the embedding a
    QuantEmbedding; kv_b_proj and the router stay in full precision."""

    def __init__(self, cfg: Glm4MoeLiteConfig, quantized: bool = False):
        super().__init__()
        self.config = cfg
        self.quantized = quantized
        self.model = Backbone(cfg, quantized)
        if quantized or not cfg.tie_word_embeddings:
            self.lm_head = linear(cfg.hidden_size, cfg.vocab_size, False, quantized)
        self.rope = Rope(cfg.qk_rope_head_dim, cfg.rope, cfg.max_position_embeddings)
        # the latent block is frequency-0 bands (j, j + R/2); the RoPE block the rotated ones (docs/glm.md)
        r = cfg.kv_lora_rank
        omega = torch.cat([torch.zeros(r // 2, device="cpu"), self.rope.inv_freq.cpu()])
        self.bands = BandLayout(((0, r), (r, cfg.qk_rope_head_dim)), omega,
                                "interleaved" if cfg.rope_interleave else "half", cfg.softmax_scale)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """x: [N, hidden] (final-normed) -> [N, vocab] fp32."""
        if self.quantized:
            return self.lm_head(x).float()
        w = self.model.embed_tokens.weight if self.config.tie_word_embeddings else self.lm_head.weight
        return dense(x, w).float()

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: BatchMeta,
                k_pool: torch.Tensor, v_pool: torch.Tensor) -> torch.Tensor:
        """input_ids, positions: [T]; k_pool: [L, S, 1, R + E] (v_pool has width 0) -> logits [N, vocab] (fp32)."""
        x = self.model.embed_tokens(input_ids)
        cos, sin = self.rope.cos_sin(positions, x.dtype)
        residual = None
        for i, layer in enumerate(self.model.layers):
            mass = None if meta.key_mass is None else meta.key_mass[i]
            x, residual = layer(x, residual, cos, sin, meta, k_pool[i], mass)
        idx = meta.sample_idx
        x, _ = self.model.norm.add_norm(x[idx], None if residual is None else residual[idx])
        return self.logits(x)


def checkpoint_target(cfg: Glm4MoeLiteConfig, name: str) -> tuple[str, int, int] | None:
    """Map a checkpoint tensor name to (parameter name, packed index, pack size), or None to skip it (the MTP layer,
    rotary buffers). Packed index -1 means the tensor is the whole parameter."""
    layer = _LAYER.match(name)
    if "rotary_emb" in name or (layer and cfg is not None and int(layer.group(1)) >= cfg.num_hidden_layers):
        return None
    expert = _EXPERT.search(name)
    if expert:
        return _EXPERT.sub(rf".mlp.experts.{expert.group(2)}.", name), int(expert.group(1)), cfg.n_routed_experts
    for fused, parts in PACKED.items():
        for i, part in enumerate(parts):
            if f".{part}." in name:
                return name.replace(f".{part}.", f".{fused}."), i, len(parts)
    return name, -1, 1


def packed_sizes(cfg: Glm4MoeLiteConfig, param: str) -> list[int]:
    """Output rows of each checkpoint tensor folded into a fused parameter (by name); [] for any other parameter."""
    module = param.split(".")[-2]
    if ".experts." in param:
        rows = cfg.hidden_size if module == "down_proj" else cfg.moe_intermediate_size
        return [rows] * cfg.n_routed_experts
    if module == "gate_up_proj":
        inter = cfg.moe_intermediate_size * cfg.n_shared_experts if ".shared_experts." in param else cfg.intermediate_size
        return [inter, inter]
    return []


def sanitize(cfg: Glm4MoeLiteConfig, name: str, tensor):
    """The RoPE rows of q_b_proj / q_proj (each head's last qk_rope_head_dim) and of kv_a_proj_with_mqa (its last
    qk_rope_head_dim) from adjacent pairs to the half layout, when the checkpoint interleaves them."""
    if not cfg.rope_interleave or not name.endswith(("q_b_proj.weight", "q_proj.weight", "kv_a_proj_with_mqa.weight",
                                                      "kv_a_proj_with_mqa.bias")):
        return tensor
    e = cfg.qk_rope_head_dim
    width = cfg.qk_nope_head_dim + e if "kv_a_proj" not in name else cfg.key_width
    heads = tensor.shape[0] // width
    within = torch.cat([torch.arange(width - e), width - e + interleaved_to_half(e)])
    return permute_rows(tensor, (torch.arange(heads)[:, None] * width + within[None, :]).reshape(-1))


FAMILY = Family(config=Glm4MoeLiteConfig, model=Glm4MoeLiteForCausalLM, checkpoint_target=checkpoint_target,
                packed_sizes=packed_sizes, architectures={"glm4_moe_lite": "Glm4MoeLiteForCausalLM"},
                sanitize=sanitize, dense=("self_attn.kv_b_proj.weight", "mlp.gate.weight"),
                fp32=("mlp.gate.weight", "mlp.gate.e_score_correction_bias"))
