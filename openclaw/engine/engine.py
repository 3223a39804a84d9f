"""Glue: model + KV pool + scheduler + runner + sampler + compressor. Token ids in, token ids out.

A step is schedule -> runner.step -> scheduler.advance -> compress what is due -> sample -> scheduler.postprocess.
On CUDA the decode rows of a step replay a captured graph (openclaw.engine.graphs) and a decode step's only
device-to-host copy is its tokens. Whatever goes wrong with one sequence (an exception in its forward, compression or
sampling; non-finite logits) fails that sequence alone, with a message for its client; the others go on. Text (chat
templates, detokenizing, stop strings) lives at the edges; stop strings reach the engine only as finish() calls from
the edge that saw them. The engine never prints.
"""

import logging
from collections.abc import Callable
from pathlib import Path

import torch

from openclaw.config import EngineConfig, EvictionConfig, SamplingParams
from openclaw.engine.kv_pool import KVPool
from openclaw.engine.memory import Plan, cap_allocator, gpu_plan
from openclaw.engine.runner import Runner
from openclaw.engine.sampler import Sampler
from openclaw.engine.scheduler import Scheduler
from openclaw.engine.sequence import Sequence
from openclaw.errors import OpenClawError
from openclaw.evict.compressor import Compressor
from openclaw.evict.query_stats import load_sums, running_path, save_sums
from openclaw.evict.stats_file import model_metadata
from openclaw.weights.checkpoint import generation_defaults
from openclaw.weights.hub import manifest_generation
from openclaw.weights.loader import load_model

log = logging.getLogger(__name__)

# What min_tokens writes over the float32 logits of eos and stop tokens: never sampled under any penalty (x 1e-4) and
# still finite under any penalty and temperature (x 1e4 / 1e-5), so the sampler's non-finite check keeps meaning a
# broken row
MASKED_LOGIT = -1e20
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
                  progress: Callable[[str, int, int], None] | None = None, evict: EvictionConfig | None = None,
                  cuda_graphs: bool = False) -> tuple[torch.nn.Module, Plan | None]:
    """(model, VRAM plan or None on the CPU). On CUDA the plan comes first (refusing, before anything is loaded,
    what does not fit --vram; choosing NF4 for a full-precision checkpoint when quantize is auto and only NF4 fits)
    and caps the allocator, then the loader loads what the plan decided; on the CPU quantize nf4 alone quantizes.
    evict, cuda_graphs: the eviction state and decode graphs the plan counts."""
    plan, nf4 = None, quantize == "nf4"
    if device.type == "cuda":
        plan, nf4 = gpu_plan(model_dir, Path(model_dir).name, device, dtype, vram, max_batch_tokens, max_seqs,
                             kv_budget, divide_length, kv_tokens, quantize, evict, cuda_graphs)
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
                                              progress, ev, config.cuda_graphs)
        mc = self.model.config
        self.generation_config = manifest_generation(config.model) | generation_defaults(model_dir)
        self.sampling_defaults = sampling_defaults(self.generation_config)
        self.eos_ids = eos_ids(self.generation_config, extra_eos)
        self.max_model_len = min(config.max_model_len or mc.max_position_embeddings, mc.max_position_embeddings)
        kv_tokens = config.kv_tokens or (CPU_KV_TOKENS if self.plan is None else
                                         min(self.plan.kv_tokens, config.max_seqs * self.max_model_len))
        self.pool = KVPool.for_config(mc, kv_tokens, self.dtype, self.device)
        self.scheduler = Scheduler(self.pool.allocator, config.max_seqs, config.max_batch_tokens, self.eos_ids)
        # the eviction setting made concrete: a sequence's KV range is its whole length, at most the pool
        self.evict = config.evict.for_range(self.pool.num_slots)
        self.stats_metadata = model_metadata(self.model, model_dir.name)
        self.stats_path = running_path(config.cache_dir, model_dir.name)
        online = None
        if self.evict.evicts and self.evict.online:  # warm start from earlier sessions' statistics
            online = load_sums(self.stats_path, self.stats_metadata, self.device)
        self.compressor = Compressor.for_model(self.evict, self.model, self.pool, config.max_seqs, online)
        self._stats_saved = self.compressor.online.tokens if self.compressor.online is not None else 0
        graphs = "capture" if config.cuda_graphs and self.device.type == "cuda" else "off"
        self.runner = Runner(self.model, self.pool, self.device, graphs, config.max_seqs, self.max_model_len)
        self.sampler = Sampler(self.device, config.max_seqs)
        # what a client reads when its row's logits are not finite; float16's narrow range is the usual cause
        self.bad_row = ("the model's activations overflowed float16 (non-finite logits); rerun with --dtype bfloat16 "
                        "or --dtype float32" if self.dtype == torch.float16 else
                        "the model produced non-finite logits (NaN or inf) for this request")

    def max_new_tokens(self, prompt_len: int) -> int:
        """The most tokens a request whose prompt has prompt_len tokens may generate: what the model's context
        leaves and, without eviction, what the KV pool leaves; 0 when the prompt itself cannot run (too long for
        them, or a pinned prompt over the eviction budget). The one answer to that question: add_request, the
        server's default max_tokens and the chat's trimming of old turns ask it."""
        ev = self.evict
        if ev.evicts and ev.policy != "auto" and ev.pin_prompt and prompt_len + ev.protect_recent >= ev.budget:
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
        ev = self.evict
        if self.max_new_tokens(n) == 0 and ev.evicts:
            raise OpenClawError(f"the prompt has {n} tokens; with the prompt pinned it must fit the kv budget "
                                f"{ev.budget} beside {ev.protect_recent} recent tokens; raise --kv-budget or use "
                                "--no-pin-prompt")
        params = params.with_defaults(self.sampling_defaults)
        # auto pins a prompt that leaves half the budget to the rest; a longer one competes like generated tokens
        pinned = ev.evicts and ev.pin_prompt and (ev.policy != "auto" or n + ev.protect_recent <= ev.budget // 2)
        seq = Sequence(list(prompt_ids), params, max_len=self.max_model_len,
                       kv_budget=ev.budget if ev.evicts else None, divide_length=ev.divide_length,
                       pinned=n if pinned else 0)
        if seq.slots_needed() > self.pool.num_slots:
            raise OpenClawError(f"the request needs {seq.slots_needed()} KV slots but the pool has "
                                f"{self.pool.num_slots}; lower max_tokens or raise --kv-tokens")
        self.sampler.add(seq)
        self.scheduler.add(seq)
        return seq

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    def step(self) -> list[tuple[Sequence, int]]:
        """One forward over the scheduled batch; returns (sequence, new token) for each that sampled and (sequence, -1)
        for each that failed in this step (finish_reason "error", Sequence.error says why)."""
        batch = self.scheduler.schedule()
        if not batch:
            return []
        logits, seqs = self._forward(batch)
        self.scheduler.advance([(seq, n) for seq, n in batch if not seq.finished])
        for seq, _ in batch:
            if not seq.finished and self.compressor.due(seq):
                try:
                    self.compressor.evict(seq)
                    self.scheduler.compacted(seq, seq.kv_budget)
                except Exception as e:  # noqa: BLE001 (fail_on logs it; the other sequences go on)
                    self.fail_on(seq, e)
        failed = [seq for seq, _ in batch if seq.finished]
        live = [i for i, seq in enumerate(seqs) if not seq.finished]
        if len(live) < len(seqs):
            logits, seqs = logits[live], [seqs[i] for i in live]
        tokens = self._sample(logits, seqs) if seqs else []
        for seq in self.scheduler.postprocess(seqs, tokens, self.bad_row):
            self._release(seq)
        return [(seq, -1) for seq in failed] + list(zip(seqs, tokens))

    def _forward(self, batch: list[tuple[Sequence, int]]) -> tuple[torch.Tensor | None, list[Sequence]]:
        """runner.step over the batch. When it raises, each sequence runs alone, so the exception fails only the
        sequences that cause it (a rerun rewrites the same slots: nothing has advanced yet)."""
        try:
            return self.runner.step(batch, self.compressor)
        except Exception as e:  # noqa: BLE001 (fail_on logs it; the other sequences go on)
            if len(batch) == 1:
                self.fail_on(batch[0][0], e)
                return None, []
        logits, seqs = [], []
        for item in batch:
            try:
                part, sampled = self.runner.step([item], self.compressor)
            except Exception as e:  # noqa: BLE001 (as above)
                self.fail_on(item[0], e)
                continue
            logits.append(part)
            seqs += sampled
        return (torch.cat(logits) if logits else None), seqs

    def _sample(self, logits: torch.Tensor, seqs: list[Sequence]) -> list[int]:
        """The sampler over the rows after min_tokens' masks (one copy to the host); an exception is tracked down
        row by row and fails only the rows that raise (their token is -1)."""
        logits = self._mask_stops(logits, seqs)
        try:
            return self.sampler.sample(logits, seqs)
        except Exception as e:  # noqa: BLE001 (as above)
            if len(seqs) == 1:
                self.fail_on(seqs[0], e)
                return [-1]
        tokens = []
        for i, seq in enumerate(seqs):
            try:
                tokens += self._sample(logits[i:i + 1], [seq])
            except Exception as e:  # noqa: BLE001 (as above)
                self.fail_on(seq, e)
                tokens.append(-1)
        return tokens

    @torch.inference_mode()  # the runner's logits are inference tensors: written in place only in this mode
    def _mask_stops(self, logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        """min_tokens: a sequence with fewer output tokens cannot sample eos or its stop_token_ids yet. Returns the
        logits, in float32 where a row was masked."""
        rows, cols = [], []
        for i, seq in enumerate(seqs):
            p = seq.params
            if len(seq.output_ids) < p.min_tokens:
                ids = {t for t in (set() if p.ignore_eos else self.eos_ids) | set(p.stop_token_ids)
                       if t < logits.shape[1]}
                rows += [i] * len(ids)
                cols += sorted(ids)
        if rows:
            logits = logits.float()
            logits[torch.tensor(rows, device=logits.device), torch.tensor(cols, device=logits.device)] = MASKED_LOGIT
        return logits

    def fail_on(self, seq: Sequence, e: BaseException) -> None:
        """seq's step raised e: an OpenClawError is the request's own fault and reaches its client as it is; anything
        else is a bug, logged with its traceback."""
        if isinstance(e, OpenClawError):
            self.fail(seq, str(e), input_error=True)
            return
        log.error("sequence %d failed in an engine step", seq.seq_id, exc_info=e)
        self.fail(seq, f"the engine failed on this request ({type(e).__name__}: {e}); the server log has the details")

    def fail(self, seq: Sequence, message: str, input_error: bool = False) -> None:
        """End a sequence with finish_reason "error" and a message for its client; the others go on."""
        if not seq.finished:
            self.scheduler.fail(seq, message, input_error)
            self._release(seq)

    def inject(self, seq: Sequence, token_ids: list[int]) -> bool:
        """Append tokens the model did not sample (Scheduler.inject); False when they do not fit."""
        return self.scheduler.inject(seq, token_ids)

    def finish(self, seq: Sequence, reason: str) -> None:
        """End a sequence now (a stop string seen at the edge, or the user's abort)."""
        if not seq.finished:
            self.scheduler.finish(seq, reason)
            self._release(seq)

    def _release(self, seq: Sequence) -> None:
        self.sampler.release(seq)
        self.compressor.release(seq)

    def close(self) -> None:
        """Persist the online statistics this session added to (the next session of this model warm-starts)."""
        online = self.compressor.online
        if online is not None and online.tokens > self._stats_saved:
            save_sums(self.stats_path, online, self.stats_metadata)
            self._stats_saved = online.tokens

    def generate(self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams]) -> list[Sequence]:
        """Run every prompt to completion in shared batches; sequences in the prompts' order."""
        plist = params if isinstance(params, list) else [params] * len(prompts)
        seqs = [self.add_request(p, sp) for p, sp in zip(prompts, plist)]
        while self.has_work():
            self.step()
        return seqs
