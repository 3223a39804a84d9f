"""Leaf layers shared by the model families: batch metadata, RMSNorm, RoPE (with HF scaling types, partial rotary) and
the band layout TriAttention scores in, pool attention, the SwiGLU MLP, the full-precision linear layer (dense: fp32
products for half-precision weights on a CPU) and the quantized linear / embedding layers over kernels/qlinear.py's
layout.

Attention reads the KV pool as a sequence's slots [base, base + kv_len) in temporal order, keys already rotated:
SDPA per sequence for prefill, kernels/decode_attention.py for decode. Every op goes through a kernel wrapper that
picks Triton for CUDA tensors and its plain-PyTorch reference for CPU tensors, so the model knows no device. It does
not own the pool or decide what is cached; the runner and the KV pool do.
"""

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from openclaw.kernels.decode_attention import decode_attention
from openclaw.kernels.decode_ops import add_rmsnorm, silu_mul
from openclaw.kernels.qlinear import GEMV_MAX_ROWS, QuantWeight, qgemv, qlinear, silu_mul_interleaved
from torch import nn

CPU_GEMM_ROWS = 4  # rows from which a CPU product with half-precision weights runs in fp32 (see dense)
CPU_GEMM_BLOCK = 4 << 20  # bytes of fp32 weight upcast at a time: cache-sized, and reused by the allocator


@dataclass
class BatchMeta:
    """One forward step over several sequences, flattened into T tokens.

    slot_mapping: [T] pool slot each new token's K/V is written to; -1: a padded row of a captured batch, whose K/V
                  must go nowhere (every family's KV write skips negative slots).
    seqs: per sequence (q_start, q_len, slot_base, kv_len) with kv_len counted after this step's writes;
          query i of a sequence sees slots [slot_base, slot_base + kv_len - q_len + i].
    sample_idx: [N] rows of T whose logits are wanted (the last token of each sequence that samples).
    query_tap: when set, each attention layer calls it in layer order with its queries (pre-RoPE: exactly the
               vectors RoPE rotates; post-RoPE), both [T, H, D], after writing this step's K/V to the pool.
               Calibration and query-based eviction read queries through it; None costs nothing.
    kv_valid: [number of sequences] slots each sequence really has, on the device: at most seqs' kv_len, which is
              only an upper bound fixed at CUDA-graph capture in the runner's decode graphs; slots past it are
              masked. Decode attention reads lengths only from here (with slot_base). Default: seqs' kv_len.
    slot_base: [number of sequences] each sequence's first slot, on the device, so decode attention runs without
               host values and a graph replays at any length. Default: seqs' slot_base.
    key_mass: [L, S, Hkv] fp32, pool-shaped: when set, each layer adds at every cached key's slot the attention it
              receives in this step (softmax probabilities summed over the step's queries and each KV head's query
              group): the realized-attention signal of eviction. None costs nothing.
    """

    slot_mapping: torch.Tensor
    seqs: list[tuple[int, int, int, int]]
    sample_idx: torch.Tensor
    query_tap: Callable[[torch.Tensor, torch.Tensor], None] | None = None
    kv_valid: torch.Tensor | None = None
    slot_base: torch.Tensor | None = None
    key_mass: torch.Tensor | None = None

    def __post_init__(self) -> None:
        dev = self.slot_mapping.device
        if self.slot_base is None:
            self.slot_base = torch.tensor([s[2] for s in self.seqs], dtype=torch.long, device=dev)
        if self.kv_valid is None:
            self.kv_valid = torch.tensor([s[3] for s in self.seqs], dtype=torch.long, device=dev)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [..., N]; fp32 statistics, cast back before the weight, as the HF reference does."""
        return self.add_norm(x.reshape(-1, x.shape[-1]), None)[0].view(x.shape)

    def add_norm(self, x: torch.Tensor, residual: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """x, residual: [T, N] -> (norm(x + residual), x + residual), vLLM style: the sum is the residual stream the
        next block adds to; residual None means x alone (kernels/decode_ops.py, one kernel on CUDA)."""
        return add_rmsnorm(x, residual, self.weight, self.eps)


def rope_parameters(cfg: dict) -> dict:
    """Normalize a config.json's RoPE fields (old rope_theta + rope_scaling, or new rope_parameters)."""
    params = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
    params.setdefault("rope_theta", cfg.get("rope_theta", params.get("rope_theta", 10000.0)))
    params["rope_type"] = params.get("rope_type", params.get("type", "default"))
    return params


def rope_inv_freq(dim: int, params: dict, max_position_embeddings: int) -> tuple[torch.Tensor, float]:
    """Inverse frequencies [dim // 2] (fp32) and the cos/sin scale, for rope_type default/linear/llama3/yarn."""
    base = float(params["rope_theta"])
    kind = params["rope_type"]
    inv_freq = 1.0 / base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    if kind == "default":
        return inv_freq, 1.0
    factor = params.get("factor")
    if kind == "linear":
        return inv_freq / factor, 1.0
    original = params.get("original_max_position_embeddings") or max_position_embeddings
    if kind == "llama3":
        low_wavelen = original / params["low_freq_factor"]
        high_wavelen = original / params["high_freq_factor"]
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (original / wavelen - params["low_freq_factor"]) / (
            params["high_freq_factor"] - params["low_freq_factor"])
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return torch.where(medium, smoothed, scaled), 1.0
    if kind == "yarn":
        if factor is None:
            factor = max_position_embeddings / original
        return _yarn_inv_freq(dim, base, factor, original, params)
    raise ValueError(f"rope_type {kind!r} is not supported (default, linear, llama3, yarn)")


def _yarn_inv_freq(dim: int, base: float, factor: float, original: int, params: dict) -> tuple[torch.Tensor, float]:
    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention_factor = params.get("attention_factor")
    if attention_factor is None:
        m, m_all = params.get("mscale"), params.get("mscale_all_dim")
        attention_factor = mscale(factor, m) / mscale(factor, m_all) if m and m_all else mscale(factor)

    def correction_dim(rotations: float) -> float:
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(params.get("beta_fast") or 32), correction_dim(params.get("beta_slow") or 1)
    if params.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    pos_freqs = base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    extrapolation = 1 - ramp
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
    return inv_freq, float(attention_factor)


class Rope:
    """RoPE in the "half" layout (dim j pairs with j + D/2), as HF Llama/Qwen checkpoints expect.

    rotary_dim < head_dim (partial rotary, GLM): bands past rotary_dim / 2 have frequency 0, so their cos is 1 and
    their sin 0 and those dims pass through unrotated (the attention scaling of YaRN applies to rotated bands only).
    Not an nn.Module: its table is derived from the config, never loaded, so it survives meta-device builds.
    """

    def __init__(self, head_dim: int, params: dict, max_position_embeddings: int, rotary_dim: int | None = None):
        rotary_dim = head_dim if rotary_dim is None else rotary_dim
        assert rotary_dim % 2 == 0 and rotary_dim <= head_dim, f"rotary_dim {rotary_dim} vs head_dim {head_dim}"
        with torch.device("cpu"):  # real values even when the model is built on the meta device
            inv_freq, scale = rope_inv_freq(rotary_dim, params, max_position_embeddings)
            rest = (head_dim - rotary_dim) // 2
            self.inv_freq = torch.cat([inv_freq, torch.zeros(rest)])  # [head_dim / 2]: one frequency per band
            self.band_scale = torch.cat([torch.full_like(inv_freq, scale), torch.ones(rest)])
        self.scale = scale

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """positions: [T] -> cos, sin: [T, 1, D] in dtype (computed in fp32)."""
        if self.inv_freq.device != positions.device:
            self.inv_freq = self.inv_freq.to(positions.device)
            self.band_scale = self.band_scale.to(positions.device)
        freqs = positions.float()[:, None] * self.inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)[:, None, :]
        scale = torch.cat((self.band_scale, self.band_scale))
        return (emb.cos() * scale).to(dtype), (emb.sin() * scale).to(dtype)


@dataclass(frozen=True)
class BandLayout:
    """How the query and key vectors a model attends with (its query tap's vectors, its pool's keys) split into RoPE
    frequency bands, for TriAttention (TRIATTENTION.md; docs/glm.md for GLM and MLA).

    blocks: (start, width) ranges of the vector, each paired in the half layout (dim j with j + width / 2); bands
    are numbered block after block. omega: [F] each band's angular frequency, 0 for dims RoPE does not rotate, F the
    total width / 2. rope_style: how the checkpoint pairs its rotated dims ("half", or "interleaved": adjacent
    pairs, which the model's weights were permuted from at load, band f keeping its index), recorded in stats files.
    scale: the softmax scale of a query-key dot product.
    """

    blocks: tuple[tuple[int, int], ...]
    omega: torch.Tensor
    rope_style: str
    scale: float

    @property
    def width(self) -> int:
        return sum(w for _, w in self.blocks)

    @classmethod
    def single(cls, rope: "Rope", head_dim: int, rope_style: str = "half") -> "BandLayout":
        """One block of head_dim dims with the rope's frequencies (dense GQA families)."""
        return cls(((0, head_dim),), rope.inv_freq.cpu(), rope_style, head_dim ** -0.5)


def interleaved_to_half(width: int) -> torch.Tensor:
    """The row order that turns a block of adjacent pairs (2j, 2j + 1) into the half layout (j, j + width / 2): all
    even dims, then all odd ones. Band j keeps its index, so statistics are the same arrays in either description."""
    return torch.cat([torch.arange(0, width, 2), torch.arange(1, width, 2)])


def permute_rows(t: torch.Tensor | QuantWeight, idx: torch.Tensor) -> torch.Tensor | QuantWeight:
    """Rows (output features) of a weight or bias in the order idx: exact for a QuantWeight too, whose every row has
    its own codes, scales and offsets."""
    if isinstance(t, QuantWeight):
        assert not t.tiled, "permute a row-major weight"
        idx = idx.to(t.device)
        return QuantWeight(t.qweight[idx], t.scales[idx], None if t.offsets is None else t.offsets[idx], t.lut, t.bits,
                           t.group, t.shape, t.zero)
    return t[idx.to(t.device)]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [T, H, D]; cos, sin: [T, 1, D]."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def pool_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: BatchMeta,
                   scale: float, mass: torch.Tensor | None = None) -> torch.Tensor:
    """q: [T, H, D] -> [T, H, D]; each sequence attends to its own slots, causally within this step. mass: this
    layer's [S, Hkv] of BatchMeta.key_mass, or None.

    Decoding sequences (one query) go through kernels/decode_attention.py, all of them in one call when every sequence
    of the step decodes; a prefill chunk through SDPA (and, when mass is wanted, its probabilities once more)."""
    if all(q_len == 1 and q_start == i for i, (q_start, q_len, _, _) in enumerate(meta.seqs)):
        max_len = max(kv_len for _, _, _, kv_len in meta.seqs)
        return decode_attention(q, k_cache, v_cache, meta.slot_base, meta.kv_valid, scale, max_len, mass=mass,
                                slots=meta.slot_mapping)
    out = torch.empty_like(q)
    for i, (q_start, q_len, base, kv_len) in enumerate(meta.seqs):
        if q_len == 1:
            decode_attention(q[q_start:q_start + 1], k_cache, v_cache, meta.slot_base[i:i + 1],
                             meta.kv_valid[i:i + 1], scale, kv_len, out=out[q_start:q_start + 1], mass=mass)
            continue
        # on a CPU in fp32: half-precision matmuls run at a fifth of its rate there (see dense)
        dtype = q.dtype if q.is_cuda else torch.float32
        qs = q[q_start:q_start + q_len].transpose(0, 1).to(dtype)  # [H, q_len, D]
        ks = k_cache[base:base + kv_len].transpose(0, 1).to(dtype)  # [Hkv, kv_len, D]
        vs = v_cache[base:base + kv_len].transpose(0, 1).to(dtype)
        # query i sees every cached slot plus new tokens up to itself
        cols = torch.arange(kv_len, device=q.device)
        rows = torch.arange(kv_len - q_len, kv_len, device=q.device)
        mask = cols[None, :] <= rows[:, None]
        if q.is_cuda:
            o = _prefill_attention_cuda(qs, ks, vs, mask, scale)
        else:
            o = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, scale=scale, enable_gqa=True)
        out[q_start:q_start + q_len] = o.transpose(0, 1).to(q.dtype)
        if mass is not None:
            mass[base:base + kv_len] += _received(qs, ks, mask, scale)
    return out


def _received(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor, scale: float) -> torch.Tensor:
    """Attention [kv, Hkv] each key receives from the chunk's queries q [H, n, D] (k: [Hkv, kv, D], mask [n, kv]),
    summed over the queries and each KV head's query group; fp32."""
    hkv = k.shape[0]
    qg = q.float().unflatten(0, (hkv, q.shape[0] // hkv))  # [Hkv, G, n, D]
    logits = (qg @ k.float().transpose(1, 2)[:, None]) * scale  # [Hkv, G, n, kv]
    return torch.softmax(logits.masked_fill(~mask, float("-inf")), dim=-1).sum((1, 2)).T


def _prefill_attention_cuda(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
                            scale: float) -> torch.Tensor:
    """q: [H, T, D]; k, v: [Hkv, S, D] -> [H, T, D], one KV head's query group at a time. SDPA with enable_gqa and a
    mask takes the math path, which materializes [H, T, S] scores; per group, with K/V broadcast to the group, the
    memory-efficient kernel runs and the transient is at most one group's K/V (what the memory plan counts)."""
    hkv, group = k.shape[0], q.shape[0] // k.shape[0]
    out = torch.empty_like(q)
    for j in range(hkv):
        kj = k[j:j + 1].expand(group, -1, -1)
        vj = v[j:j + 1].expand(group, -1, -1)
        out[j * group:(j + 1) * group] = F.scaled_dot_product_attention(q[j * group:(j + 1) * group], kj, vj,
                                                                        attn_mask=mask, scale=scale)
    return out


def dense(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K] @ weight.T [K, N] (+ bias) in x.dtype. On a CPU, half-precision weights multiply fast only as a GEMV:
    this torch's fp16 / bf16 GEMM on AVX2 costs a GEMV per row, 4-5x fp32's time from 8 rows on (bench/RESULTS-cpu.md),
    so from CPU_GEMM_ROWS rows the product runs in fp32 over the weight upcast CPU_GEMM_BLOCK bytes at a time (nothing
    weight-sized is allocated) and is rounded once to x.dtype."""
    rows = x.numel() // x.shape[-1]
    if x.is_cuda or weight.dtype == torch.float32 or rows < CPU_GEMM_ROWS:
        return F.linear(x, weight, bias)
    x2 = x.reshape(rows, -1).float()
    n, k = weight.shape
    step = max(1, CPU_GEMM_BLOCK // (4 * k))
    y = torch.empty(rows, n)
    for i in range(0, n, step):
        torch.mm(x2, weight[i:i + step].float().T, out=y[:, i:i + step])
    if bias is not None:
        y += bias.float()
    return y.to(x.dtype).view(*x.shape[:-1], n)


class Linear(nn.Linear):
    """nn.Linear through dense (the same parameters and checkpoint names)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dense(x, self.weight, self.bias)


class QuantLinear(nn.Module):
    """A linear layer over a group-quantized weight (openclaw.kernels.qlinear.QuantWeight), set by the loader: one
    QuantWeight, or a list of them stacked along N in output order when a fused projection's parts have different
    layouts (a GGUF Q4_K_M's Q4_K q/k and Q6_K v), each kept in its own.

    kernels/qlinear.py's qlinear runs it: on CUDA the Triton kernels (fused GEMV for decode, dequantize + cuBLAS for
    prefill; per part for a list), on the CPU the reference (the weight dequantized on every call), so the CPU engine
    runs quantized checkpoints too.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = False):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.qweight = None  # QuantWeight [out_features, in_features] or a list of row blocks, set by the loader
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None
        self.gated = False  # a [gate; up] projection (set by the MLP): the loader may interleave its rows
        self.interleaved = False  # rows in qlinear.interleave_gate_up's order (set by the loader)
        self.row_major = False  # keep the weight row-major and in one piece (MoE experts: read by expert id)

    @property
    def parts(self) -> list[QuantWeight]:
        """The weight as row blocks in output order (one, unless the loader kept parts of different layouts)."""
        return self.qweight if isinstance(self.qweight, list) else [self.qweight]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return qlinear(x, self.qweight, self.bias)

    def silu_mul(self, x: torch.Tensor) -> torch.Tensor:
        """silu(gate) * up of an interleaved [gate; up] projection -> [..., out_features / 2]: up to GEMV_MAX_ROWS bf16
        rows on the GPU in one kernel (the tensor-core GEMV's SiLU epilogue), else the output reordered."""
        assert self.interleaved
        x2 = x.reshape(-1, x.shape[-1])
        if x.is_cuda and 1 <= x2.shape[0] <= GEMV_MAX_ROWS:
            return qgemv(x2.contiguous(), self.qweight, self.bias, silu=True).view(*x.shape[:-1], -1)
        return silu_mul_interleaved(self.forward(x))


def linear(in_features: int, out_features: int, bias: bool, quantized: bool) -> nn.Module:
    return QuantLinear(in_features, out_features, bias) if quantized else Linear(in_features, out_features, bias)


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)) with gate and up fused into one gate_up_proj [2I, hidden]."""

    def __init__(self, hidden_size: int, intermediate_size: int, quantized: bool = False):
        super().__init__()
        self.gate_up_proj = linear(hidden_size, 2 * intermediate_size, False, quantized)
        if quantized:
            self.gate_up_proj.gated = True  # the loader may interleave its rows (SiLU-mul in the decode GEMV)
        self.down_proj = linear(intermediate_size, hidden_size, False, quantized)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if getattr(self.gate_up_proj, "interleaved", False):  # a 4-bit weight on the GPU: SiLU in the GEMV
            return self.down_proj(self.gate_up_proj.silu_mul(x))
        return self.down_proj(silu_mul(self.gate_up_proj(x)))


class QuantEmbedding(nn.Module):
    """An embedding table kept quantized (8-bit on a 24 GB card): lookups dequantize only the rows they read."""

    def __init__(self, num_embeddings: int, embedding_dim: int):
        super().__init__()
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.qweight = None  # QuantWeight [num_embeddings, embedding_dim], set by the loader
        self.dtype = torch.float32  # the model's activation dtype, set by the loader

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.qweight.rows(ids, self.dtype)
