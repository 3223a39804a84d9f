"""Every tunable of the engine and of sampling: one dataclass field, one default, validated on creation.

CLI options take their defaults from these fields. Nothing here reads the environment or touches torch.
"""

from dataclasses import dataclass, field, fields, replace
from pathlib import Path

from openclaw.errors import OpenClawError


def default_cache_dir() -> Path:
    return Path.home() / ".cache" / "openclaw"


def _check(ok: bool, msg: str) -> None:
    if not ok:
        raise OpenClawError(msg)


# A temperature below this samples greedily (vLLM's threshold): logits / 1e-300 is inf in float32, and far below
# 1e-5 the softmax is one-hot anyway.
GREEDY_BELOW = 1e-5
# The repetition penalty divides or multiplies logits in float32: inside this range every logit a model gives stays
# finite (1e-300 became 0 in float32, a division by zero that made the whole batch's sampling step crash)
PENALTY_RANGE = (1e-4, 1e4)


@dataclass
class SamplingParams:
    """How one request samples. None means: take the model's generation_config value (or the built-in)."""

    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    seed: int | None = None
    max_tokens: int = 4096  # run, chat and serve alike; the server caps it by what the context and the pool leave
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False  # eos does not end the sequence (stop_token_ids still do)
    min_tokens: int = 0  # eos and stop_token_ids are masked, and stop strings unchecked, before this many tokens
    stop_token_ids: list[int] = field(default_factory=list)  # more tokens that end the sequence, as eos does
    skip_special_tokens: bool = True  # special tokens generated mid-text are left out of the text
    include_stop_str_in_output: bool = False  # the stop string (or the stop token's text) stays at the text's end

    def __post_init__(self) -> None:
        _check(self.temperature is None or 0 <= self.temperature < float("inf"),
               f"temperature {self.temperature} must be >= 0 (below {GREEDY_BELOW} it is greedy)")
        _check(self.top_p is None or 0 < self.top_p <= 1, f"top_p {self.top_p} must be in (0, 1]")
        _check(self.top_k is None or self.top_k >= 0, f"top_k {self.top_k} must be >= 0 (0 disables it)")
        _check(self.min_p is None or 0 <= self.min_p < 1, f"min_p {self.min_p} must be in [0, 1)")
        lo, hi = PENALTY_RANGE
        _check(self.repetition_penalty is None or lo <= self.repetition_penalty <= hi,
               f"repetition_penalty {self.repetition_penalty} must be in [{lo:g}, {hi:g}] (1 disables it)")
        _check(self.max_tokens >= 1, f"max_tokens {self.max_tokens} must be >= 1")
        _check(0 <= self.min_tokens <= self.max_tokens,
               f"min_tokens {self.min_tokens} must be in [0, max_tokens {self.max_tokens}]")
        _check(all(0 <= t < 2**31 for t in self.stop_token_ids),
               f"stop_token_ids {self.stop_token_ids} must be token ids (integers >= 0)")
        _check(self.seed is None or 0 <= self.seed < 2**63, f"seed {self.seed} must be in [0, 2**63)")

    def with_defaults(self, defaults: dict) -> "SamplingParams":
        """Fill the None fields from a dict of defaults (openclaw.engine.engine.sampling_defaults of the model's
        generation_config)."""
        values = {f.name: defaults[f.name] for f in fields(self)
                  if getattr(self, f.name) is None and defaults.get(f.name) is not None}
        return replace(self, **values)

    @property
    def greedy(self) -> bool:
        return self.temperature is not None and self.temperature < GREEDY_BELOW


QUANTIZE = ("auto", "none", "nf4")  # what --quantize accepts; see EngineConfig.quantize
POLICIES = ("auto", "full", "streaming", "snapkv", "rkv", "h2o", "triattention")
TRI_TERMS = ("both", "trig", "norm")
TRI_SELECT = ("per_head", "union", "per_layer_perhead")


@dataclass
class EvictionConfig:
    """How a sequence's KV cache is kept within a budget (TRIATTENTION.md sections 4 and 7).

    When a sequence's cache reaches budget + divide_length tokens it is compressed back to exactly budget. `auto`
    (the default) runs full attention while a sequence fits its KV range (its whole length, at most the pool) and
    TriAttention with online statistics once it would overflow; for_range makes a setting concrete for a range.
    """

    # auto; full (never evict); streaming, snapkv, rkv, h2o, triattention (evict from the first overflow of the budget)
    policy: str = "auto"
    budget: int | None = None  # KV entries kept per sequence, prompt included; None: the KV range less divide_length
    divide_length: int = 128  # compress when the cache reaches budget + divide_length
    pin_prompt: bool = True  # prompt tokens are never evicted (auto: when prompt + protect_recent fit in budget / 2)
    protect_recent: int = 128  # the most recent tokens are never evicted (auto: at most a quarter of the budget)
    stats: str | None = None  # triattention, auto: a stats file (openclaw calibrate --out), or None / "auto": online
    tri_terms: str = "both"  # triattention ablations: both, trig (distance series only), norm (key-norm term only)
    sinks: int = 4  # streaming: attention-sink tokens kept at the start
    window: int = 8  # snapkv / rkv: recent queries whose attention scores the cache
    pool_kernel: int = 7  # snapkv / rkv: max-pool width over neighbouring tokens
    rkv_lambda: float = 0.1  # rkv: score = lambda * importance - (1 - lambda) * redundancy
    rkv_threshold: float = 0.5  # rkv: key cosine similarity above which two tokens count as copies
    seed: int = 0  # triattention: seed of the 1e-6 tie-breaking noise
    # triattention: per_head (one keep set per KV head for all layers, the paper's), or the reference's union (one
    # for everything) and per_layer_perhead (one per layer and KV head)
    tri_select: str = "per_head"
    disable_mlr: bool = False  # triattention ablation (the reference's): norm term weighted by A_f, not A_f - |mu_f|
    tri_mass: float = 0.0  # triattention: weight of the realized-attention term (z of log accumulated attention)
    mass_per_query: bool = False  # the attention term divides by the queries that have seen the key
    recent_share: float = 0.0  # triattention: share of the budget always given to the most recent tokens

    def __post_init__(self) -> None:
        _check(self.policy in POLICIES, f"eviction policy {self.policy!r} must be one of {', '.join(POLICIES)}")
        _check(self.divide_length >= 1, f"divide_length {self.divide_length} must be >= 1")
        _check(self.protect_recent >= 0, f"protect_recent {self.protect_recent} must be >= 0")
        _check(self.budget is None or self.budget >= 1, f"kv budget {self.budget} must be >= 1")
        if self.budget is not None and self.policy != "auto":  # auto fits its recent window to the budget
            _check(self.budget > max(self.protect_recent, self.sinks, self.window),
                   f"kv budget {self.budget} must exceed protect_recent {self.protect_recent}, sinks {self.sinks} and "
                   f"window {self.window}; raise the budget or lower --protect-recent")
        _check(self.tri_terms in TRI_TERMS, f"tri_terms {self.tri_terms!r} must be one of {', '.join(TRI_TERMS)}")
        _check(self.tri_select in TRI_SELECT,
               f"tri_select {self.tri_select!r} must be one of {', '.join(TRI_SELECT)}")
        _check(self.tri_mass >= 0, f"tri_mass {self.tri_mass} must be >= 0")
        _check(self.window >= 1 and self.pool_kernel >= 1 and self.pool_kernel % 2 == 1,
               f"window {self.window} must be >= 1 and pool_kernel {self.pool_kernel} odd")
        _check(0 <= self.rkv_lambda <= 1, f"rkv_lambda {self.rkv_lambda} must be in [0, 1]")

    @property
    def evicts(self) -> bool:
        return self.policy != "full"

    @property
    def scorer(self) -> str:
        """The policy that scores when this setting evicts (auto evicts with TriAttention)."""
        return "triattention" if self.policy == "auto" else self.policy

    @property
    def online(self) -> bool:
        """Whether TriAttention runs on online statistics (no stats file)."""
        return self.scorer == "triattention" and self.stats in (None, "auto")

    def for_range(self, slots: int) -> "EvictionConfig":
        """This setting made concrete for sequences whose KV range is `slots` slots: an unset budget becomes
        slots - divide_length; auto also keeps its recent window within a quarter of the budget, and is full
        attention where the range is under two divide_lengths (too small to evict into)."""
        if not self.evicts or (self.policy == "auto" and self.budget is None and slots < 2 * self.divide_length):
            return replace(self, policy="full") if self.evicts else self
        budget = self.budget if self.budget is not None else slots - self.divide_length
        _check(budget >= 1, f"a KV range of {slots} slots leaves no budget beside divide_length {self.divide_length}; "
                            "give --kv-budget or a larger --kv-tokens")
        protect = min(self.protect_recent, budget // 4) if self.policy == "auto" else self.protect_recent
        return replace(self, budget=budget, protect_recent=protect)


@dataclass
class EngineConfig:
    """How the engine is built: which model, where, and how large its KV pool and batches are."""

    model: str = "SmolLM2-135M-Instruct"
    device: str = "auto"  # "auto" = cuda when present, else cpu
    dtype: str = "auto"  # "auto" = bfloat16 on cuda, float16 on cpu; "float32" for exact reference runs
    kv_tokens: int | None = None  # KV pool size in tokens, all sequences; None = what the VRAM plan leaves (GPU), 32768 (CPU)
    vram: float | None = None  # GiB this process may use on the GPU (a hard cap); None = the card's total; CPU: unused
    # nf4: full-precision linear layers quantized to NF4 while loading, GGUF files kept in their own blocks; none:
    # weights as stored (GGUF blocks dequantized); auto: nf4 on a GPU for GGUF files, manifest models marked
    # bf16->nf4, and checkpoints whose weights fit --vram only as NF4; none on a CPU (full precision decodes faster)
    quantize: str = "auto"
    cuda_graphs: bool = True  # decode rows replay captured CUDA graphs, one per (batch, KV-length) bucket (GPU only)
    max_seqs: int = 16  # sequences decoded together at most
    max_model_len: int | None = None  # per-sequence length cap; None = the model's context length
    max_batch_tokens: int = 512  # tokens per forward step (prefill is chunked to fit)
    cache_dir: Path = field(default_factory=default_cache_dir)
    threads: int | None = None  # CPU threads for torch; None = torch's default
    evict: EvictionConfig = field(default_factory=EvictionConfig)  # KV eviction (default: auto)
    verify: bool = False  # hash every file of a converted or pulled model at load (sizes are always checked)

    def __post_init__(self) -> None:
        _check(self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:"),
               f"--device {self.device!r} must be auto, cpu, cuda or cuda:N")
        _check(self.dtype in ("auto", "bfloat16", "float16", "float32"),
               f"--dtype {self.dtype!r} must be auto, bfloat16, float16 or float32")
        _check(self.kv_tokens is None or self.kv_tokens >= 16, f"--kv-tokens {self.kv_tokens} must be >= 16")
        _check(self.vram is None or self.vram > 0, f"--vram {self.vram} GiB must be > 0")
        _check(self.quantize in QUANTIZE, f"--quantize {self.quantize!r} must be one of {', '.join(QUANTIZE)}")
        _check(self.max_seqs >= 1, f"--max-seqs {self.max_seqs} must be >= 1")
        _check(self.threads is None or self.threads >= 1,
               f"--threads {self.threads} must be >= 1 (leave it out for one per core)")
        _check(self.max_batch_tokens >= 16, f"max_batch_tokens {self.max_batch_tokens} must be >= 16")
        _check(self.max_seqs <= self.max_batch_tokens, f"--max-seqs {self.max_seqs} must be <= max_batch_tokens "
               f"{self.max_batch_tokens} (every decoding sequence takes one token of a step)")
        _check(self.max_model_len is None or self.max_model_len >= 2, f"max_model_len {self.max_model_len} must be >= 2")
        self.cache_dir = Path(self.cache_dir).expanduser()


@dataclass
class BenchConfig:
    """What `openclaw bench` measures (openclaw.eval.speed). An empty list takes the device's default: on a CPU
    BENCH_CPU's, on a GPU BENCH_GPU's."""

    prompt_lengths: list[int] = field(default_factory=list)  # prefill: prompt tokens
    contexts: list[int] = field(default_factory=list)  # decode: cached tokens per sequence when timing starts
    batch_sizes: list[int] = field(default_factory=list)  # decode: sequences decoding together
    steps: int = 32  # timed decode steps per figure
    reps: int = 1  # each figure is the best of reps runs, after a warm-up run
    random_weights: bool = False  # random weights of a manifest model's real shapes: nothing is downloaded

    def __post_init__(self) -> None:
        for name in ("prompt_lengths", "contexts", "batch_sizes"):
            values = getattr(self, name)
            _check(all(v >= 1 for v in values), f"--{name.replace('_', '-')} {values} must all be >= 1")
        _check(self.steps >= 1 and self.reps >= 1, f"--steps {self.steps} and --reps {self.reps} must be >= 1")

    def for_device(self, cuda: bool) -> "BenchConfig":
        """A copy with every empty list filled with the device's default."""
        defaults = BENCH_GPU if cuda else BENCH_CPU
        return replace(self, **{k: getattr(self, k) or list(v) for k, v in defaults.items()})


BENCH_CPU = {"prompt_lengths": (2048,), "contexts": (128,), "batch_sizes": (1, 8)}
BENCH_GPU = {"prompt_lengths": (512, 4096), "contexts": (128, 4096), "batch_sizes": (1, 2, 4, 8, 16)}


@dataclass
class ServerConfig:
    """How `openclaw serve` bounds what clients may hold: connections, time, and the size of a request."""

    read_timeout: float = 60.0  # seconds a connection may stay silent (or not read a stream) before it is closed
    max_connections: int = 256  # open connections at most (each is a thread); more get a 503 at once
    max_body: int = 32 * 2**20  # bytes of a request body
    max_messages: int = 4096  # messages of one chat request, checked before any of them is read

    def __post_init__(self) -> None:
        _check(self.read_timeout > 0, f"--read-timeout {self.read_timeout} must be > 0 seconds")
        _check(self.max_connections >= 1, f"--max-connections {self.max_connections} must be >= 1")
        _check(self.max_body >= 1024 and self.max_messages >= 1,
               f"max_body {self.max_body} must be >= 1024 bytes and max_messages {self.max_messages} >= 1")
