"""Glue: model + KV pool + scheduler + runner + sampler. Token ids in, token ids out.

Text (chat templates, detokenizing, stop strings) lives at the edges; stop strings reach the engine only as
abort() calls from the edge that saw them.
"""

import logging
from collections.abc import Callable
from pathlib import Path

import torch

from openclaw.compressor import Compressor
from openclaw.config import EngineConfig, SamplingParams
from openclaw.errors import OpenClawError
from openclaw.kv_pool import KVPool
from openclaw.loader import generation_defaults, load_planned, resolve_dtype
from openclaw.runner import Runner
from openclaw.sampler import sample
from openclaw.scheduler import Scheduler
from openclaw.sequence import Sequence

log = logging.getLogger(__name__)

CPU_KV_TOKENS = 32768  # the pool on the CPU when --kv-tokens is not given (the GPU's comes from the VRAM plan)
# transformers' GenerationConfig defaults, used where the checkpoint's generation_config is silent
HF_SAMPLING = {"temperature": 1.0, "top_k": 50, "top_p": 1.0, "min_p": 0.0, "repetition_penalty": 1.0}


def sampling_defaults(gen: dict) -> dict:
    """What a checkpoint's generation_config means, read as transformers reads it: without do_sample=True the
    model decodes greedily (SmolLM2's config is such a one); with it, unset fields take transformers' defaults."""
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


def eos_ids(gen: dict, extra: set[int] = frozenset()) -> set[int]:
    eos = gen.get("eos_token_id")
    ids = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
    return ids | set(extra)


class Engine:
    def __init__(self, model_dir: Path, config: EngineConfig, extra_eos: set[int] = frozenset(),
                 progress: Callable[[str, int, int], None] | None = None):
        self.config = config
        if config.threads:
            torch.set_num_threads(config.threads)
        self.device = pick_device(config.device)
        self.dtype = resolve_dtype(config.dtype, self.device)
        ev = config.evict
        # self.plan: the VRAM plan (openclaw.memory); the CPU has none
        self.model, self.plan = load_planned(model_dir, self.device, self.dtype, config.quantize, config.vram,
                                             config.max_batch_tokens, config.max_seqs,
                                             ev.budget if ev.evicts else None, ev.divide_length, config.kv_tokens,
                                             progress)
        mc = self.model.config
        self.generation_config = generation_defaults(model_dir)
        self.sampling_defaults = sampling_defaults(self.generation_config)
        self.eos_ids = eos_ids(self.generation_config, extra_eos)
        self.max_model_len = min(config.max_model_len or mc.max_position_embeddings, mc.max_position_embeddings)
        kv_tokens = config.kv_tokens or (CPU_KV_TOKENS if self.plan is None else
                                         min(self.plan.kv_tokens, config.max_seqs * self.max_model_len))
        self.pool = KVPool(mc.num_hidden_layers, kv_tokens, mc.num_key_value_heads, mc.head_dim, self.dtype,
                           self.device)
        self.scheduler = Scheduler(self.pool.allocator, config.max_seqs, config.max_batch_tokens)
        self.runner = Runner(self.model, self.pool, self.device, config.cuda_graphs)
        self.compressor = Compressor.for_model(config.evict, self.model, self.pool)
        self.generators: dict[int, torch.Generator] = {}

    def add_request(self, prompt_ids: list[int], params: SamplingParams) -> Sequence:
        if not prompt_ids:
            raise OpenClawError("the prompt is empty: nothing to generate from")
        if len(prompt_ids) >= self.max_model_len:
            raise OpenClawError(f"the prompt has {len(prompt_ids)} tokens but the model's context is "
                                f"{self.max_model_len}; shorten it")
        params = params.with_defaults(self.sampling_defaults)
        seq = Sequence(list(prompt_ids), params, max_len=self.max_model_len)
        self.compressor.slots_for(seq)
        ev = self.config.evict
        if ev.evicts and ev.pin_prompt and len(prompt_ids) + ev.protect_recent >= ev.budget:
            raise OpenClawError(f"the prompt has {len(prompt_ids)} tokens; with the prompt pinned it must fit the kv "
                                f"budget {ev.budget} beside {ev.protect_recent} recent tokens; raise --kv-budget "
                                "or use --no-pin-prompt")
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
        self.compressor.after_step(batch)
        if not seqs:
            return []
        if self.dtype == torch.float16 and not torch.isfinite(logits).all():
            raise OpenClawError("activations overflowed float16 (non-finite logits); rerun with --dtype bfloat16 "
                                "or --dtype float32")
        histories = [s.token_ids for s in seqs]
        gens = [self.generators.get(s.seq_id) for s in seqs]
        tokens = sample(logits, [s.params for s in seqs], histories, gens).tolist()
        for seq, token in zip(seqs, tokens):
            seq.token_ids.append(token)
            if token in self.eos_ids and not seq.params.ignore_eos:
                self.finish(seq, "stop")
            elif len(seq.output_ids) >= seq.params.max_tokens or seq.num_tokens >= seq.max_len:
                self.finish(seq, "length")
        return list(zip(seqs, tokens))

    def inject(self, seq: Sequence, token_ids: list[int]) -> bool:
        """Append tokens the model did not sample (e.g. </think> when a thinking budget runs out); the next steps
        compute them like a prompt chunk, then sampling resumes. False, and nothing appended, when they would
        pass the sequence's max_tokens or length cap (the slots it owns)."""
        room = min(seq.params.max_tokens - len(seq.output_ids), seq.max_len - seq.num_tokens)
        if seq.finished or len(token_ids) >= room:
            return False
        seq.token_ids.extend(token_ids)
        return True

    def finish(self, seq: Sequence, reason: str) -> None:
        """End a sequence now (eos, length, a stop string seen at the edge, or the user's abort)."""
        if not seq.finished:
            self.scheduler.finish(seq, reason)
            self.generators.pop(seq.seq_id, None)
            self.compressor.release(seq)

    def generate(self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams]) -> list[Sequence]:
        """Run every prompt to completion in shared batches; sequences in the prompts' order."""
        plist = params if isinstance(params, list) else [params] * len(prompts)
        seqs = [self.add_request(p, sp) for p, sp in zip(prompts, plist)]
        while self.has_work():
            self.step()
        return seqs
