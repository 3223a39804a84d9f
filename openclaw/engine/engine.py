"""Glue: model + KV pool + scheduler + runner + sampler + compressor. Token ids in, token ids out.

A step is schedule -> runner.step -> scheduler.advance -> compress what is due -> sample -> scheduler.postprocess.
Text (chat templates, detokenizing, stop strings) lives at the edges; stop strings reach the engine only as
finish() calls from the edge that saw them. The engine never prints.
"""

import logging
from collections.abc import Callable
from pathlib import Path

import torch

from openclaw.config import EngineConfig, SamplingParams
from openclaw.engine.kv_pool import KVPool
from openclaw.engine.memory import Plan, cap_allocator, gpu_plan
from openclaw.engine.runner import Runner
from openclaw.engine.sampler import sample
from openclaw.engine.scheduler import Scheduler
from openclaw.engine.sequence import Sequence
from openclaw.errors import OpenClawError
from openclaw.evict.compressor import Compressor
from openclaw.weights.checkpoint import generation_defaults
from openclaw.weights.hub import manifest_generation
from openclaw.weights.loader import load_model

log = logging.getLogger(__name__)

CPU_KV_TOKENS = 32768  # the pool on the CPU when --kv-tokens is not given (the GPU's comes from the VRAM plan)
# transformers' GenerationConfig defaults, used where the checkpoint's generation_config is silent
HF_SAMPLING = {"temperature": 1.0, "top_k": 50, "top_p": 1.0, "min_p": 0.0, "repetition_penalty": 1.0}


def sampling_defaults(gen: dict) -> dict:
    """What a checkpoint's generation_config means, read as transformers reads it: without do_sample=True the
    model decodes greedily (SmolLM2's config is such a one); with it, unset fields take transformers' defaults.
    The one place that reads do_sample: SamplingParams.with_defaults fills a request's unset fields from this."""
    defaults = HF_SAMPLING | {k: v for k, v in gen.items() if k in HF_SAMPLING and v is not None}
    if not gen.get("do_sample"):
        defaults["temperature"] = 0.0
    return defaults


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise OpenClawError(f"--device {name}: no CUDA device is visible; use --device cpu")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """auto: bfloat16 on CUDA; float16 on the CPU, where this torch's fp16 GEMV reads weights ~1.8x faster than
    bf16 and keeps more mantissa (bench/cpu_decode.py: fp16 greedy matches fp32 token for token, bf16 does not).
    The engine refuses to go on if fp16 overflows (non-finite logits) and names the fix."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float16
    return getattr(torch, name)


def eos_ids(gen: dict, extra: set[int] = frozenset()) -> set[int]:
    eos = gen.get("eos_token_id")
    ids = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
    return ids | set(extra)


def plan_and_load(model_dir: Path, device: torch.device, dtype: torch.dtype, quantize: str = "none",
                  vram: float | None = None, max_batch_tokens: int = 512, max_seqs: int = 1,
                  kv_budget: int | None = None, divide_length: int = 128, kv_tokens: int | None = None,
                  progress: Callable[[str, int, int], None] | None = None) -> tuple[torch.nn.Module, Plan | None]:
    """(model, VRAM plan or None on the CPU). On CUDA the plan comes first (refusing, before anything is loaded,
    what does not fit --vram; choosing NF4 for a full-precision checkpoint when quantize is auto and only NF4 fits)
    and caps the allocator, then the loader loads what the plan decided; on the CPU quantize nf4 alone quantizes."""
    plan, nf4 = None, quantize == "nf4"
    if device.type == "cuda":
        plan, nf4 = gpu_plan(model_dir, Path(model_dir).name, device, dtype, vram, max_batch_tokens, max_seqs,
                             kv_budget, divide_length, kv_tokens, quantize)
        cap_allocator(plan, device)
    model = load_model(model_dir, device, dtype, nf4=nf4, progress=progress)
    if device.type == "cuda":
        torch.cuda.empty_cache()  # hand back conversion temporaries' segments before the pool takes the rest
    return model, plan


class Engine:
    def __init__(self, model_dir: Path, config: EngineConfig, extra_eos: set[int] = frozenset(),
                 progress: Callable[[str, int, int], None] | None = None):
        self.config = config
        if config.threads:
            torch.set_num_threads(config.threads)
        self.device = pick_device(config.device)
        self.dtype = resolve_dtype(config.dtype, self.device)
        ev = config.evict
        # self.plan: the VRAM plan (openclaw.engine.memory); the CPU has none
        self.model, self.plan = plan_and_load(model_dir, self.device, self.dtype, config.quantize, config.vram,
                                              config.max_batch_tokens, config.max_seqs,
                                              ev.budget if ev.evicts else None, ev.divide_length, config.kv_tokens,
                                              progress)
        mc = self.model.config
        self.generation_config = manifest_generation(config.model) | generation_defaults(model_dir)
        self.sampling_defaults = sampling_defaults(self.generation_config)
        self.eos_ids = eos_ids(self.generation_config, extra_eos)
        self.max_model_len = min(config.max_model_len or mc.max_position_embeddings, mc.max_position_embeddings)
        kv_tokens = config.kv_tokens or (CPU_KV_TOKENS if self.plan is None else
                                         min(self.plan.kv_tokens, config.max_seqs * self.max_model_len))
        self.pool = KVPool.for_config(mc, kv_tokens, self.dtype, self.device)
        self.scheduler = Scheduler(self.pool.allocator, config.max_seqs, config.max_batch_tokens, self.eos_ids)
        self.runner = Runner(self.model, self.pool, self.device, config.cuda_graphs)
        self.compressor = Compressor.for_model(config.evict, self.model, self.pool)
        self.generators: dict[int, torch.Generator] = {}

    def max_new_tokens(self, prompt_len: int) -> int:
        """The most tokens a request whose prompt has prompt_len tokens may generate: what the model's context
        leaves and, without eviction, what the KV pool leaves; 0 when the prompt itself cannot run (too long for
        them, or a pinned prompt over the eviction budget). The one answer to that question: add_request, the
        server's default max_tokens and the chat's trimming of old turns ask it."""
        ev = self.config.evict
        if ev.evicts and ev.pin_prompt and prompt_len + ev.protect_recent >= ev.budget:
            return 0
        room = self.max_model_len - prompt_len
        if not ev.evicts:
            room = min(room, self.pool.num_slots - prompt_len)
        return max(0, room)

    def add_request(self, prompt_ids: list[int], params: SamplingParams) -> Sequence:
        """Queue a request; OpenClawError when it can never run (what max_new_tokens refuses, or more KV slots than
        the pool has)."""
        n = len(prompt_ids)
        if not prompt_ids:
            raise OpenClawError("the prompt is empty: nothing to generate from")
        if n >= self.max_model_len:
            raise OpenClawError(f"the prompt has {n} tokens but the model's context is {self.max_model_len}; "
                                "shorten it")
        ev = self.config.evict
        if self.max_new_tokens(n) == 0 and ev.evicts:
            raise OpenClawError(f"the prompt has {n} tokens; with the prompt pinned it must fit the kv budget "
                                f"{ev.budget} beside {ev.protect_recent} recent tokens; raise --kv-budget or use "
                                "--no-pin-prompt")
        params = params.with_defaults(self.sampling_defaults)
        seq = Sequence(list(prompt_ids), params, max_len=self.max_model_len,
                       kv_budget=ev.budget if ev.evicts else None, divide_length=ev.divide_length)
        if seq.slots_needed() > self.pool.num_slots:
            raise OpenClawError(f"the request needs {seq.slots_needed()} KV slots but the pool has "
                                f"{self.pool.num_slots}; lower max_tokens or raise --kv-tokens")
        if params.seed is not None:
            self.generators[seq.seq_id] = torch.Generator().manual_seed(params.seed)
        self.scheduler.add(seq)
        return seq

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    def step(self) -> list[tuple[Sequence, int]]:
        """One forward over the scheduled batch; returns (sequence, new token) for each that sampled."""
        batch = self.scheduler.schedule()
        if not batch:
            return []
        logits, seqs = self.runner.step(batch, self.compressor.tap(batch))
        self.scheduler.advance(batch)
        for seq, _ in batch:
            if self.compressor.due(seq):
                self.compressor.evict(seq)
                self.scheduler.compacted(seq, seq.kv_budget)
        if not seqs:
            return []
        if self.dtype == torch.float16 and not torch.isfinite(logits).all():
            raise OpenClawError("activations overflowed float16 (non-finite logits); rerun with --dtype bfloat16 "
                                "or --dtype float32")
        histories = [s.token_ids for s in seqs]
        gens = [self.generators.get(s.seq_id) for s in seqs]
        tokens = sample(logits, [s.params for s in seqs], histories, gens).tolist()
        for seq in self.scheduler.postprocess(seqs, tokens):
            self._release(seq)
        return list(zip(seqs, tokens))

    def inject(self, seq: Sequence, token_ids: list[int]) -> bool:
        """Append tokens the model did not sample (Scheduler.inject); False when they do not fit."""
        return self.scheduler.inject(seq, token_ids)

    def finish(self, seq: Sequence, reason: str) -> None:
        """End a sequence now (a stop string seen at the edge, or the user's abort)."""
        if not seq.finished:
            self.scheduler.finish(seq, reason)
            self._release(seq)

    def _release(self, seq: Sequence) -> None:
        self.generators.pop(seq.seq_id, None)
        self.compressor.release(seq)

    def generate(self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams]) -> list[Sequence]:
        """Run every prompt to completion in shared batches; sequences in the prompts' order."""
        plist = params if isinstance(params, list) else [params] * len(prompts)
        seqs = [self.add_request(p, sp) for p, sp in zip(prompts, plist)]
        while self.has_work():
            self.step()
        return seqs
