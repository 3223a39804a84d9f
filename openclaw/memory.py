"""The VRAM plan of DESIGN.md ("Memory: the hard cap"): weights + CUDA context + workspace + prefill activations +
KV pool = the cap, so the pool's size in tokens, and how many sequences of an eviction budget fit, follow.

Computed before anything is loaded, from config.json (or a manifest entry's config) and the target weight format;
for our own quantized layout the per-tensor layouts are read from the safetensors headers. It allocates nothing;
the engine refuses a plan that does not fit (Plan.require) and caps PyTorch's allocator with it (cap_allocator).
"""

import json
from dataclasses import dataclass
from pathlib import Path

from openclaw.errors import OpenClawError

GIB = 1 << 30
MIB = 1 << 20
CONTEXT_ESTIMATE = 600 * MIB  # CUDA context when it cannot be measured (planning on a machine without the GPU)
WORKSPACE = 512 * MIB  # cuBLAS / Triton workspaces, autotuning (do_bench's 256 MiB buffer), CUDA graphs, slack
DEQUANT_WORKSPACE = 64 * MIB  # = kernels.qlinear.DEQUANT_CHUNK_BYTES (prefill dequantizes this much at a time)


@dataclass(frozen=True)
class Layout:
    """How one quantized weight is stored (kernels/qlinear.py): bits per code, group, offsets, a 16-entry lut."""

    bits: int
    group: int
    offsets: bool
    lut: bool

    def nbytes(self, n: int, k: int) -> int:
        groups = n * (k // self.group)
        return n * k * self.bits // 8 + groups * 2 * (1 + self.offsets) + 64 * self.lut


def rtn_group(k: int) -> int:
    """The group of weights the loader quantizes itself (8-bit embeddings / lm_head): 128, or the largest power of
    two from 64 down to 16 that divides K, else K."""
    return next((g for g in (128, 64, 32, 16) if k % g == 0), k)


def eight_bit(k: int) -> Layout:
    """Embeddings, lm_head and anything a quantized checkpoint leaves in full precision."""
    return Layout(8, rtn_group(k), True, False)


# manifest formats whose linear layers load quantized, and their layout (others load in the model dtype)
FORMAT_LAYOUTS = {"awq-int4": Layout(4, 128, True, False), "bnb-nf4": Layout(4, 64, False, True),
                  "bf16->nf4": Layout(4, 64, False, True)}


def config_layout(raw: dict) -> Layout | None:
    """The layout of a checkpoint's linear layers from config.json's quantization_config (None: unquantized)."""
    qc = raw.get("quantization_config")
    if not qc:
        return None
    method = str(qc.get("quant_method", "?")).lower()
    if method == "bitsandbytes":
        return Layout(4, int(qc.get("bnb_4bit_blocksize", 64)), False, qc.get("bnb_4bit_quant_type", "nf4") == "nf4")
    return Layout(int(qc.get("bits", qc.get("w_bit", 4))), int(qc.get("group_size", qc.get("q_group_size", 128))),
                  bool(qc.get("zero_point", True)), False)


def _linear_shapes(cfg: dict) -> list[tuple[int, int, bool]]:
    """(N, K, has bias) of every checkpoint linear weight of the dense family, all layers."""
    h, inter = cfg["hidden_size"], cfg["intermediate_size"]
    heads = cfg["num_attention_heads"]
    hkv = cfg.get("num_key_value_heads") or heads
    d = cfg.get("head_dim") or h // heads
    qkv_bias = cfg.get("model_type") == "qwen2" or bool(cfg.get("attention_bias"))
    o_bias = cfg.get("model_type") != "qwen2" and bool(cfg.get("attention_bias"))
    layer = [(heads * d, h, qkv_bias), (hkv * d, h, qkv_bias), (hkv * d, h, qkv_bias), (h, heads * d, o_bias),
             (inter, h, False), (inter, h, False), (h, inter, False)]
    return layer * cfg["num_hidden_layers"]


def weight_bytes(cfg: dict, dtype_bytes: int, layout: Layout | None) -> int:
    """Bytes the loader allocates for the weights: linear layers in `layout` (or the dtype), embeddings and lm_head
    8-bit when quantized (a tied lm_head shares the embedding), norms and biases in the dtype."""
    h, vocab = cfg["hidden_size"], cfg["vocab_size"]
    heads = cfg["num_attention_heads"]
    d = cfg.get("head_dim") or h // heads
    norms = cfg["num_hidden_layers"] * (2 * h + (2 * d if cfg.get("model_type") == "qwen3" else 0)) + h
    total = norms * dtype_bytes
    for n, k, bias in _linear_shapes(cfg):
        total += (layout.nbytes(n, k) if layout else n * k * dtype_bytes) + bias * n * dtype_bytes
    tables = 1 if cfg.get("tie_word_embeddings") else 2
    return total + tables * (eight_bit(h).nbytes(vocab, h) if layout else vocab * h * dtype_bytes)


def checkpoint_weight_bytes(model_dir: Path, dtype_bytes: int) -> int:
    """weight_bytes for a local checkpoint; exact per tensor for our own layout (quant_method "openclaw"), whose
    safetensors headers record each weight's bits and group."""
    model_dir = Path(model_dir)
    raw = json.loads((model_dir / "config.json").read_text())
    if str((raw.get("quantization_config") or {}).get("quant_method")) != "openclaw":
        return weight_bytes(raw, dtype_bytes, config_layout(raw))
    from safetensors import safe_open

    from openclaw.loader import shard_files

    total, tied = 0, bool(raw.get("tie_word_embeddings"))
    for path in shard_files(model_dir):
        with safe_open(str(path), framework="pt", device="cpu") as f:
            layouts = json.loads((f.metadata() or {}).get("openclaw.quant", "{}"))
            for name in f.keys():  # noqa: SIM118 (safe_open has no __iter__)
                base, _, part = name.rpartition(".")
                if f"{base}#parts" in layouts:
                    if part == "qweight":
                        bits, group, n, k = layouts[base]
                        parts = layouts[f"{base}#parts"]
                        total += Layout(bits, group, "offsets" in parts, "lut" in parts).nbytes(n, k)
                    continue
                if tied and name == "lm_head.weight":
                    continue
                shape = f.get_slice(name).get_shape()
                if name.endswith(("embed_tokens.weight", "lm_head.weight", "proj.weight")):
                    total += eight_bit(shape[1]).nbytes(*shape)
                else:
                    total += dtype_bytes * _numel(shape)
    return total


def _numel(shape: list[int]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def kv_bytes_per_token(cfg: dict, dtype_bytes: int) -> int:
    heads = cfg["num_attention_heads"]
    d = cfg.get("head_dim") or cfg["hidden_size"] // heads
    return 2 * cfg["num_hidden_layers"] * (cfg.get("num_key_value_heads") or heads) * d * dtype_bytes


def activation_bytes(cfg: dict, dtype_bytes: int, max_batch_tokens: int, max_seqs: int) -> int:
    """The largest prefill chunk's transient tensors (hidden states, fused qkv, gate/up, attention output; x2 for
    allocator fragmentation), the prefill dequantization workspace and the sampled rows' fp32 logits (x4 for the
    sampler's copies). Prefill attention (models/layers.py, per KV-head group) may copy one group's K/V at the full
    context and builds a [T, S] mask; no [H, T, S] score matrix is counted."""
    h, inter = cfg["hidden_size"], cfg["intermediate_size"]
    heads = cfg["num_attention_heads"]
    hkv = cfg.get("num_key_value_heads") or heads
    d = cfg.get("head_dim") or h // heads
    per_token = 4 * h + (heads + 2 * hkv) * d + heads * d + 3 * inter
    logits = 4 * max_seqs * cfg["vocab_size"] * 4
    context = cfg.get("max_position_embeddings", 4096)
    attention = 2 * 2 * (heads // hkv) * context * d * dtype_bytes + max_batch_tokens * context
    return 2 * max_batch_tokens * per_token * dtype_bytes + DEQUANT_WORKSPACE + logits + attention


@dataclass
class Plan:
    """Bytes of each part of the cap, and what the KV pool left over holds."""

    cap: int
    context: int
    workspace: int
    weights: int
    activations: int
    kv_bytes_per_token: int
    kv_budget: int | None = None  # the eviction budget B each sequence keeps
    divide_length: int = 128

    @property
    def kv_pool(self) -> int:
        return self.cap - self.context - self.workspace - self.weights - self.activations

    @property
    def kv_tokens(self) -> int:
        return max(0, self.kv_pool // self.kv_bytes_per_token)

    @property
    def slots_per_seq(self) -> int | None:
        return None if self.kv_budget is None else self.kv_budget + self.divide_length

    @property
    def seqs(self) -> int | None:
        """Sequences of budget B that run at once (each holds B + divide_length slots)."""
        return None if self.kv_budget is None else self.kv_tokens // self.slots_per_seq

    def rows(self) -> list[tuple[str, str]]:
        def gib(b: int) -> str:
            return f"{b / GIB:.2f} GiB"

        rows = [("cap (--vram)", gib(self.cap)), ("CUDA context", gib(self.context)),
                ("workspace", gib(self.workspace)), ("weights", f"{gib(self.weights)} ({self.weights:,} bytes)"),
                ("activations (largest prefill chunk)", gib(self.activations)), ("KV pool", gib(self.kv_pool)),
                ("KV per token", f"{self.kv_bytes_per_token / 1024:.0f} KiB"), ("KV tokens", f"{self.kv_tokens:,}")]
        if self.kv_budget is not None:
            rows.append((f"sequences at budget {self.kv_budget} (+{self.divide_length} slots each)", str(self.seqs)))
        return rows

    def require(self, name: str, kv_tokens: int | None = None, smaller: list[str] = ()) -> None:
        """Raise OpenClawError, with the numbers and what would fit, when the plan leaves no room for the pool
        (kv_tokens: what the user asked for; else one sequence of the budget, else 1024 tokens). smaller: models
        that would fit."""
        need = kv_tokens or self.slots_per_seq or 1024
        if self.kv_tokens >= need:
            return
        fixed = self.context + self.workspace + self.activations
        lacking = need * self.kv_bytes_per_token - self.kv_pool
        msg = (f"{name} does not fit in {self.cap / GIB:.1f} GiB: weights {self.weights / GIB:.2f} GiB + context, "
               f"workspace and activations {fixed / GIB:.2f} GiB leave {max(self.kv_pool, 0) / GIB:.2f} GiB "
               f"for the KV cache ({self.kv_tokens} tokens) but {need} tokens need "
               f"{need * self.kv_bytes_per_token / GIB:.2f} GiB; it needs --vram "
               f"{(self.cap + lacking) / GIB:.1f} or more")
        if self.kv_budget is not None and self.kv_tokens > self.divide_length + 256:
            msg += f", or a --kv-budget of at most {self.kv_tokens - self.divide_length}"
        fits = f"; models that fit: {', '.join(smaller)}" if smaller else "; `openclaw models` lists smaller models"
        raise OpenClawError(msg + fits)


def plan(cfg: dict, weights: int, cap: int, context: int = CONTEXT_ESTIMATE, dtype_bytes: int = 2,
         max_batch_tokens: int = 512, max_seqs: int = 16, kv_budget: int | None = None,
         divide_length: int = 128) -> Plan:
    return Plan(cap=cap, context=context, workspace=WORKSPACE, weights=weights,
                activations=activation_bytes(cfg, dtype_bytes, max_batch_tokens, max_seqs),
                kv_bytes_per_token=kv_bytes_per_token(cfg, dtype_bytes), kv_budget=kv_budget,
                divide_length=divide_length)


def loaded_bytes(model) -> int:
    """What a loaded model holds: its parameters and buffers plus every QuantWeight (shared ones once)."""
    from openclaw.kernels.qlinear import QuantWeight

    seen, total = set(), 0
    tensors = [*model.parameters(), *model.buffers()]
    for m in model.modules():
        qw = getattr(m, "qweight", None)
        if isinstance(qw, QuantWeight):
            tensors += [t for t in (qw.qweight, qw.scales, qw.offsets, qw.lut) if t is not None]
    for t in tensors:
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


def gpu_plan(model_dir: Path, name: str, device, dtype, vram: float | None, max_batch_tokens: int, max_seqs: int,
             kv_budget: int | None, divide_length: int, kv_tokens: int | None) -> Plan:
    """The plan on this CUDA device, with the context measured (whatever is on the card before our first
    allocation); refuses (OpenClawError) what does not fit, before anything is loaded."""

    cap, context = _card(device, vram)
    p = plan(json.loads((Path(model_dir) / "config.json").read_text()),
             checkpoint_weight_bytes(model_dir, dtype.itemsize), cap, context, dtype.itemsize, max_batch_tokens,
             max_seqs, kv_budget, divide_length)
    p.require(name, kv_tokens)
    return p


def _card(device, vram: float | None) -> tuple[int, int]:
    """(cap, context) on a CUDA device: the context is what the card holds beyond PyTorch's own cache (the CUDA
    context, other processes); memory this process already cached counts as free for the plan."""
    import torch

    free, total = torch.cuda.mem_get_info(device)
    cap = int(vram * GIB) if vram else total
    if cap > total:
        raise OpenClawError(f"--vram {vram} GiB is more than the card's {total / GIB:.1f} GiB")
    return cap, total - free - torch.cuda.memory_reserved(device)


def cap_allocator(p: Plan, device) -> None:
    """Enforce the cap: PyTorch's allocator may hold at most cap - context on the device."""
    import torch

    # growable segments instead of fixed ones: the load's conversion temporaries otherwise strand ~2 GiB of
    # reserved-but-unusable memory between weights, which under a tight cap is the KV pool's
    setter = getattr(torch._C, "_accelerator_setAllocatorSettings", None) or torch.cuda.memory._set_allocator_settings
    setter("expandable_segments:True")
    index = torch.device(device).index
    index = torch.cuda.current_device() if index is None else index
    total = torch.cuda.get_device_properties(index).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, (p.cap - p.context) / total), index)


def plan_model(spec: str, cache_dir: Path, vram: float | None, kv_budget: int | None, max_seqs: int = 16,
               max_batch_tokens: int = 512, divide_length: int = 128) -> tuple[Plan, str, list[str]]:
    """(plan, model name, the manifest models that would fit) for `openclaw plan`: a manifest name (its local checkpoint when pulled, else the
    manifest's config and format) or a model directory, planned in bf16 against --vram (default: this GPU's
    total). Nothing is downloaded or loaded."""
    import torch

    from openclaw.hub import hub_dir, load_manifest

    entry = {n.lower(): e for n, e in load_manifest().items()}.get(spec.lower())
    local = Path(spec).expanduser() if entry is None else hub_dir(Path(cache_dir).expanduser(), entry.hub_repo or "-")
    context = CONTEXT_ESTIMATE
    if torch.cuda.is_available():
        cap, context = _card(torch.device("cuda"), vram)
    elif vram is None:
        raise OpenClawError("no GPU here to take the default from: give --vram GIB")
    else:
        cap = int(vram * GIB)
    if (local / "config.json").is_file():
        cfg = json.loads((local / "config.json").read_text())
        weights = checkpoint_weight_bytes(local, 2)
    elif entry is not None:
        cfg = {"model_type": entry.architecture, **entry.config}
        weights = weight_bytes(cfg, 2, FORMAT_LAYOUTS.get(entry.format))
    else:
        raise OpenClawError(f"{spec} is neither a manifest name (`openclaw models`) nor a model directory")
    p = plan(cfg, weights, cap, context, 2, max_batch_tokens, max_seqs, kv_budget, divide_length)
    fitting = []
    for e in load_manifest().values():
        ecfg = {"model_type": e.architecture, **e.config}
        ep = plan(ecfg, weight_bytes(ecfg, 2, FORMAT_LAYOUTS.get(e.format)), cap, context, 2, max_batch_tokens,
                  max_seqs, kv_budget, divide_length)
        if e.supported and ep.kv_tokens >= (ep.slots_per_seq or 1024):
            fitting.append(e.name)
    return p, entry.name if entry is not None else local.name, fitting
