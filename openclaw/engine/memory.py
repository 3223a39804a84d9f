"""The VRAM plan of DESIGN.md ("Memory: the hard cap"): weights + CUDA context + workspace + prefill activations +
decode graphs + eviction state + KV pool = the cap, so the pool's size in tokens, and how many sequences of an
eviction budget fit, follow.

Computed before anything is loaded, from the family's config dataclass (config.json or a manifest entry's config) and
openclaw.weights.sizes's weight bytes; it also decides what --quantize auto loads (NF4 only when full precision does
not fit). The engine asks for the plan first and hands the loader what it decided. It allocates
nothing; the engine refuses a plan that does not fit (Plan.require) and caps PyTorch's allocator (cap_allocator).
"""

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from openclaw.config import EvictionConfig
from openclaw.engine.graphs import batch_buckets, len_buckets
from openclaw.errors import OpenClawError
from openclaw.kernels.decode_attention import WAVES
from openclaw.kernels.qlinear import QuantWeight
from openclaw.weights.checkpoint import parse_config, read_config, read_json
from openclaw.weights.hub import hub_dir, load_manifest, load_quantize, manifest_entry
from openclaw.weights.layout import FORMAT_LAYOUTS, NF4
from openclaw.weights.sizes import checkpoint_weight_bytes, gguf_weight_bytes, weight_bytes

GIB = 1 << 30
MIB = 1 << 20
CONTEXT_ESTIMATE = 600 * MIB  # CUDA context when it cannot be measured (planning on a machine without the GPU)
WORKSPACE = 512 * MIB  # cuBLAS / Triton workspaces, autotuning (do_bench's 256 MiB buffer), slack
# driver memory of one captured decode graph (its kernel nodes and their parameters), outside PyTorch's allocator:
# bench/gpu_decode.py measured 19 MiB per Qwen3-32B graph on an H100 (torch 2.11, CUDA 13; bench/RESULTS.md)
GRAPH_OVERHEAD = 20 * MIB
MAX_SMS = 160  # the partition count of decode attention grows with the SMs; more than any card this plans for has


def activation_bytes(cfg, dtype_bytes: int, max_batch_tokens: int, max_seqs: int) -> int:
    """The largest prefill chunk's transient tensors at the full context (the family config's activation_bytes; x2 for
    allocator fragmentation there) and the sampled rows' fp32 logits (x4 for the sampler's copies), plus the
    sampler's bitmap of penalized sequences' tokens."""
    logits = 4 * max_seqs * cfg.vocab_size * 4 + (max_seqs + 1) * cfg.vocab_size
    return cfg.activation_bytes(max_batch_tokens, cfg.max_position_embeddings, dtype_bytes) + logits


def graph_bytes(cfg, dtype_bytes: int, max_seqs: int, max_len: int) -> tuple[int, int]:
    """(bytes in PyTorch's allocator, driver bytes) of the batched decode graphs (openclaw.engine.graphs) at their
    bound: the shared logits buffer; the one memory pool, which holds the largest step's transients (a step of
    max_seqs rows: activations, logits, decode attention's partials); and each graph's own driver memory, for every
    (batch bucket, length bucket up to max_len, the longest cache a sequence can reach)."""
    rows, vocab = max_seqs, cfg.vocab_size
    heads = cfg.num_attention_heads
    hkv, key_width, value_width = cfg.cache_shape()
    out_width = value_width or key_width  # MLA caches no value: its attention outputs latents (under the key width)
    partitions = WAVES * MAX_SMS // hkv + rows  # rows x partitions at most (kernels/decode_attention.num_partitions)
    step = (cfg.activation_bytes(rows, 0, dtype_bytes) + rows * vocab * (dtype_bytes + 4)
            + partitions * heads * (out_width + 2) * 4)
    graphs = len(batch_buckets(max_seqs)) * len(len_buckets(max_len))
    return rows * vocab * 4 + step, graphs * GRAPH_OVERHEAD


def eviction_bytes(cfg, evict: EvictionConfig | None, max_seqs: int, dtype_bytes: int) -> int:
    """What the compressor keeps on the device for max_seqs sequences (openclaw.evict.compressor) besides the
    attention it accumulates per pool slot (mass_bytes_per_token): SnapKV / R-KV's query ring, online TriAttention
    sums."""
    if evict is None or not evict.evicts:
        return 0
    layers, heads = cfg.num_hidden_layers, cfg.num_attention_heads
    _, d, _ = cfg.cache_shape()  # the queries the policies keep are as wide as the cached keys (MLA: absorbed)
    if evict.scorer in ("snapkv", "rkv"):
        return (max_seqs + 1) * layers * evict.window * heads * d * dtype_bytes
    if evict.online:
        return 3 * layers * heads * (d // 2) * 8
    return 0


def mass_bytes_per_token(cfg, evict: EvictionConfig | None) -> int:
    """The compressor's attention accumulator per pool slot (fp32 per layer and KV head: h2o, and TriAttention's
    attention term), which grows with the pool like its K/V."""
    if evict is None or not evict.evicts:
        return 0
    if evict.scorer == "h2o" or (evict.scorer == "triattention" and evict.tri_mass > 0):
        return cfg.num_hidden_layers * cfg.cache_shape()[0] * 4
    return 0


@dataclass
class Plan:
    """Bytes of each part of the cap, and what the KV pool left over holds."""

    cap: int
    context: int
    workspace: int
    weights: int
    activations: int
    kv_bytes_per_token: int
    graphs: int = 0  # the batched decode graphs' buffer and memory pool (PyTorch's allocator)
    graph_overhead: int = 0  # the graphs' own driver memory (outside PyTorch's allocator)
    eviction: int = 0  # the compressor's device state (query ring, attention sums, statistics)
    kv_budget: int | None = None  # the eviction budget B each sequence keeps
    divide_length: int = 128
    weight_format: str = ""  # how the weights are held, for the printed plan
    hint: str = ""  # appended to the refusal: what another --quantize (or another file) would change
    kv_limit: int | None = None  # the pool's most tokens: the decode graphs were counted for caches up to this many

    @property
    def kv_pool(self) -> int:
        return (self.cap - self.context - self.workspace - self.weights - self.activations - self.graphs
                - self.graph_overhead - self.eviction)

    @property
    def kv_tokens(self) -> int:
        tokens = max(0, self.kv_pool // self.kv_bytes_per_token)
        return tokens if self.kv_limit is None else min(tokens, self.kv_limit)

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
                *([("weight format", self.weight_format)] if self.weight_format else []),
                ("activations (largest prefill chunk)", gib(self.activations)),
                ("decode graphs (memory pool + driver)", gib(self.graphs + self.graph_overhead)),
                *([("eviction state", gib(self.eviction))] if self.eviction else []),
                ("KV pool", gib(self.kv_pool) if self.kv_pool >= 0 else f"none ({gib(-self.kv_pool)} short)"),
                ("KV per token", f"{self.kv_bytes_per_token / 1024:.0f} KiB"), ("KV tokens", f"{self.kv_tokens:,}")]
        if self.kv_budget is not None:
            rows.append((f"sequences at budget {self.kv_budget} (+{self.divide_length} slots each)", str(self.seqs)))
        return rows

    def require(self, name: str, kv_tokens: int | None = None, smaller: list[str] = ()) -> None:
        """Raise OpenClawError, with the numbers and what would fit, when the plan leaves no room for the pool
        (kv_tokens: what the user asked for; else one sequence of the budget, else 1024 tokens). smaller: models
        that would fit."""
        if self.fits(kv_tokens):
            return
        need = self.need(kv_tokens)
        fixed = self.context + self.workspace + self.activations + self.graphs + self.graph_overhead + self.eviction
        lacking = need * self.kv_bytes_per_token - self.kv_pool
        msg = (f"{name} does not fit in {self.cap / GIB:.1f} GiB: weights {self.weights / GIB:.2f} GiB + context, "
               f"workspace, activations and decode graphs {fixed / GIB:.2f} GiB leave "
               f"{max(self.kv_pool, 0) / GIB:.2f} GiB "
               f"for the KV cache ({self.kv_tokens} tokens) but {need} tokens need "
               f"{need * self.kv_bytes_per_token / GIB:.2f} GiB; it needs --vram "
               f"{math.ceil((self.cap + lacking) / GIB * 10) / 10:.1f} or more")
        if self.kv_budget is not None and self.kv_tokens > self.divide_length + 256:
            msg += f", or a --kv-budget of at most {self.kv_tokens - self.divide_length}"
        fits = f"; models that fit: {', '.join(smaller)}" if smaller else "; `openclaw models` lists smaller models"
        raise OpenClawError(msg + self.hint + fits)

    def need(self, kv_tokens: int | None = None) -> int:
        """KV tokens the pool must hold: what the user asked for, else one sequence of the budget, else 1024."""
        return kv_tokens or self.slots_per_seq or 1024

    def fits(self, kv_tokens: int | None = None) -> bool:
        return self.kv_tokens >= self.need(kv_tokens)


def plan(cfg, weights: int, cap: int, context: int = CONTEXT_ESTIMATE, dtype_bytes: int = 2,
         max_batch_tokens: int = 512, max_seqs: int = 16, kv_budget: int | None = None,
         divide_length: int = 128, evict: EvictionConfig | None = None, cuda_graphs: bool = True,
         min_kv: int | None = None) -> Plan:
    """The plan for a model of config `cfg` (a family config dataclass) whose weights take `weights` bytes; evict:
    the eviction policy whose device state to count; min_kv: the pool the user asked for (--kv-tokens)."""
    longest = cfg.max_position_embeddings

    def build(max_len: int) -> Plan:
        graphs, overhead = graph_bytes(cfg, dtype_bytes, max_seqs, max_len) if cuda_graphs else (0, 0)
        return Plan(cap=cap, context=context, workspace=WORKSPACE, weights=weights,
                    activations=activation_bytes(cfg, dtype_bytes, max_batch_tokens, max_seqs),
                    kv_bytes_per_token=cfg.kv_bytes_per_token(dtype_bytes) + mass_bytes_per_token(cfg, evict),
                    graphs=graphs, graph_overhead=overhead, eviction=eviction_bytes(cfg, evict, max_seqs, dtype_bytes),
                    kv_budget=kv_budget, divide_length=divide_length)

    whole = build(longest)
    if not cuda_graphs:
        return whole
    # the engine captures length buckets only up to its pool (Runner: no cache outgrows it). A pool limited to a bucket
    # top T needs only the graphs up to T: keep the T whose pool is largest (ties: the smallest T, whose refusal
    # names the least memory), counting from the pool a refusal asks for (Plan.need), so that its "needs --vram"
    # holds and more memory never plans a smaller pool
    best = None
    for top in len_buckets(longest)[:-1]:
        if top >= whole.need(min_kv):
            p = build(top)
            p.kv_limit = top
            best = p if best is None or p.kv_tokens > best.kv_tokens else best
    return whole if best is None or whole.kv_tokens > best.kv_tokens else best


def loaded_bytes(model) -> int:
    """What a loaded model holds: its parameters and buffers plus every QuantWeight, also those of a QuantLinear
    kept in parts (shared ones once)."""
    seen, total = set(), 0
    tensors = [*model.parameters(), *model.buffers()]
    for m in model.modules():
        qws = getattr(m, "qweight", None)
        for qw in qws if isinstance(qws, list) else [qws]:
            if isinstance(qw, QuantWeight):
                tensors += [t for t in (qw.qweight, qw.scales, qw.offsets, qw.lut) if t is not None]
    for t in tensors:
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


GGUF_HINT = ("; GGUF Q5_0/Q6_K/Q8_0 tensors keep 8-bit codes here (Q6_K: 9 bits per weight, Q4_K: 5, Q4_0: 4.5), so "
             "a Q4_K_M file is larger than on disk: the AWQ checkpoint or a Q4_0 file is smaller")


def weight_plan(raw: dict, weights_at: Callable[[bool], int], make: Callable[[int], Plan], quantize: str,
                kv_tokens: int | None = None) -> tuple[Plan, bool]:
    """(the plan to load with, whether to quantize to NF4 while loading) for --quantize auto / none / nf4 (see
    EngineConfig.quantize). weights_at(nf4) gives the weight bytes, make(weights) the plan. Only a full-precision
    checkpoint is quantized at load: with auto when its weights fit only as NF4, as vLLM's users ask for with
    --quantization bitsandbytes and llama.cpp's never need to. A refused plan's hint names the alternative."""
    qc = raw.get("quantization_config") or {}
    if qc:
        p = make(weights_at(False))
        method = str(qc.get("quant_method", "?")).lower()
        p.weight_format = f"{method}, as stored" + (" (GGUF blocks repacked)" if method == "gguf" else "")
        if method == "random":
            p.weight_format = f"random, in {qc.get('format', '?')}'s layout (openclaw bench --random-weights)"
        p.hint = GGUF_HINT if method == "gguf" else ""
        return p, False
    full = make(weights_at(False))
    full.weight_format = "full precision, in the model dtype"
    if quantize == "none" or (quantize == "auto" and full.fits(kv_tokens)):
        if not full.fits(kv_tokens):
            full.hint = f"; --quantize nf4 would hold the weights in {weights_at(True) / GIB:.2f} GiB"
        return full, False
    q = make(weights_at(True))
    q.weight_format = "NF4, quantized while loading (group 64)"
    if quantize == "auto":
        q.weight_format += f"; in full precision they would take {full.weights / GIB:.2f} GiB, which does not fit"
        q.hint = f" (even quantized to NF4 at load; in full precision they take {full.weights / GIB:.2f} GiB)"
    return q, True


def gpu_plan(model_dir: Path, name: str, device, dtype, vram: float | None, max_batch_tokens: int, max_seqs: int,
             kv_budget: int | None, divide_length: int, kv_tokens: int | None,
             quantize: str = "auto", evict: EvictionConfig | None = None,
             cuda_graphs: bool = True) -> tuple[Plan, bool]:
    """(the plan on this CUDA device, whether to quantize to NF4 while loading), with the context measured
    (whatever is on the card before our first allocation); refuses (OpenClawError) what does not fit, before
    anything is loaded."""
    cap, context = _card(device, vram)
    _, cfg, raw = read_config(model_dir)

    def make(weights: int) -> Plan:
        return plan(cfg, weights, cap, context, dtype.itemsize, max_batch_tokens, max_seqs, kv_budget, divide_length,
                    evict, cuda_graphs, kv_tokens)

    p, nf4 = weight_plan(raw, lambda q: checkpoint_weight_bytes(model_dir, dtype.itemsize, q), make, quantize,
                         kv_tokens)
    p.require(name, kv_tokens)
    return p, nf4


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
    """Enforce the cap: PyTorch's allocator may hold at most cap - context - the graphs' driver memory."""
    import torch

    # growable segments instead of fixed ones: the load's conversion temporaries otherwise strand ~2 GiB of
    # reserved-but-unusable memory between weights, which under a tight cap is the KV pool's
    setter = getattr(torch._C, "_accelerator_setAllocatorSettings", None) or torch.cuda.memory._set_allocator_settings
    setter("expandable_segments:True")
    index = torch.device(device).index
    index = torch.cuda.current_device() if index is None else index
    total = torch.cuda.get_device_properties(index).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, (p.cap - p.context - p.graph_overhead) / total), index)


def plan_model(spec: str, cache_dir: Path, vram: float | None, kv_budget: int | None, max_seqs: int = 16,
               max_batch_tokens: int = 512, divide_length: int = 128,
               quantize: str = "auto") -> tuple[Plan, str, list[str]]:
    """(plan, model name, the manifest models that would fit) for `openclaw plan`: a manifest name (its local
    checkpoint when pulled, else the manifest's config and format), a model directory or a .gguf file (from its
    header), planned in bf16 against --vram (default: this GPU's total) as the engine would load it on a GPU.
    Nothing is downloaded or loaded; an architecture no family defines is refused as the loader would refuse it."""
    import torch  # here, not at the top: `openclaw plan --help` should not wait for it

    manifest = load_manifest()
    entry = manifest_entry(spec, manifest)
    local = Path(spec).expanduser() if entry is None else hub_dir(Path(cache_dir).expanduser(), entry.hub_repo or "-")
    quantize = load_quantize(spec, quantize, True, manifest)
    context = CONTEXT_ESTIMATE
    if torch.cuda.is_available():
        cap, context = _card(torch.device("cuda"), vram)
    elif vram is None:
        raise OpenClawError("no GPU here to take the default from: give --vram GIB")
    else:
        cap = int(vram * GIB)
    raw, weights_at = _plan_source(spec, local, entry, quantize)
    _, cfg = parse_config(raw, spec)

    def make(weights: int) -> Plan:
        return plan(cfg, weights, cap, context, 2, max_batch_tokens, max_seqs, kv_budget, divide_length)

    p, _ = weight_plan(raw, weights_at, make, quantize)
    fitting = []
    for e in manifest.values():
        if not e.supported:
            continue
        _, ecfg = parse_config(e.raw_config, e.name)
        ep = plan(ecfg, weight_bytes(ecfg, 2, FORMAT_LAYOUTS.get(e.format)), cap, context, 2, max_batch_tokens,
                  max_seqs, kv_budget, divide_length)
        if ep.fits():
            fitting.append(e.name)
    return p, entry.name if entry is not None else local.name, fitting


def _plan_source(spec: str, local: Path, entry, quantize: str) -> tuple[dict, Callable[[bool], int]]:
    """(config.json dict, weight bytes given nf4) of what plan_model plans: a .gguf file (its blocks kept unless
    quantize is none), a model directory, or a manifest entry not pulled yet (its config and format)."""
    if local.is_file() and local.suffix.lower() == ".gguf":
        raw, stored = gguf_weight_bytes(local, 2)
        if quantize == "none":  # dequantized at import: a full-precision checkpoint
            _, cfg = parse_config(raw, local)
            return raw, lambda nf4: weight_bytes(cfg, 2, NF4 if nf4 else None)
        raw["quantization_config"] = {"quant_method": "gguf"}
        return raw, lambda _: stored
    if (local / "config.json").is_file():
        return read_json(local / "config.json"), lambda nf4: checkpoint_weight_bytes(local, 2, nf4)
    if entry is None:
        raise OpenClawError(f"{spec} is neither a manifest name (`openclaw models`), a model directory nor a .gguf file")
    raw = entry.raw_config
    _, cfg = parse_config(raw, entry.name)
    stored = None
    if not entry.format.startswith("bf16"):  # pre-quantized: loads as stored
        raw["quantization_config"] = {"quant_method": entry.format}
        stored = FORMAT_LAYOUTS.get(entry.format)
    return raw, lambda nf4: weight_bytes(cfg, 2, NF4 if nf4 else stored)
