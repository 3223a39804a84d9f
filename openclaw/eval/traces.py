"""The model's own traces: what calibration and the fidelity harness use when told to `--generate`.

generate_traces writes, with full attention, one trace per prompt (its chat template, thinking on where the model
has the switch, sampled as the TriAttention paper samples: temperature 0.6, top-p 0.95), running past the end-of-turn
token so every trace has the asked length (what a small model writes after it is still its own output).
greedy_agreement decodes greedily from a prompt under each eviction setting and counts the tokens before the first
one that differs from greedy decoding with full attention. It does not score distributions (fidelity.py) or compute
statistics (openclaw.evict.calibrate).
"""

from dataclasses import replace
from pathlib import Path

import torch

from openclaw.config import EvictionConfig, SamplingParams
from openclaw.engine.kv_pool import KVPool
from openclaw.engine.runner import Runner
from openclaw.engine.scheduler import Scheduler
from openclaw.engine.sequence import Sequence
from openclaw.errors import OpenClawError
from openclaw.evict.compressor import Compressor
from openclaw.evict.evictor import TriStats
from openclaw.evict.query_stats import QueryStats
from openclaw.llm import LLM

TRACE_SAMPLING = SamplingParams(temperature=0.6, top_p=0.95, ignore_eos=True)  # the paper's sampling
# what `openclaw calibrate --generate` asks when no --prompts file is given: reasoning of several kinds
DEFAULT_PROMPTS = (
    "A train leaves at 9:40 and arrives at 13:05. How long is the trip? Explain each step.",
    "Prove that the sum of two odd numbers is even, then generalize to the sum of k odd numbers.",
    "Write a Python function that returns the n-th Fibonacci number in O(log n) time and explain why it works.",
    "How many ways can 8 rooks be placed on a chessboard so that none attacks another? Reason it out.",
    "Explain how a hash table handles collisions, and compare chaining with open addressing.",
    "A farmer has 17 sheep; all but 9 run away. How many are left? Think carefully, then check the answer.",
    "Plan a three-day trip to a city you know well, with a budget, a schedule and what to do if it rains.",
    "Why is the sky blue but sunsets red? Explain the physics step by step.",
    "Find all integer solutions of x^2 - y^2 = 45 and show how you know there are no others.",
    "Describe how you would debug a program that crashes only when run with optimizations on.",
    "Summarize the causes of the French Revolution and weigh which mattered most.",
    "Solve: a bat and a ball cost 1.10 together; the bat costs 1.00 more than the ball. Explain the trap.",
)


def read_prompts(path: Path | None) -> list[str]:
    """The non-blank lines of a text file, one prompt each; the built-in prompts when path is None."""
    if path is None:
        return list(DEFAULT_PROMPTS)
    try:
        prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except (FileNotFoundError, IsADirectoryError, UnicodeDecodeError) as e:
        raise OpenClawError(f"prompts file {path} is unreadable ({e})") from None
    if not prompts:
        raise OpenClawError(f"prompts file {path} has no prompts: write one per line")
    return prompts


def trace_prompt(llm: LLM, prompt: str) -> list[int]:
    """The chat-templated prompt, thinking on where the template has the switch."""
    think = True if llm.has_thinking_switch else None
    return llm.chat_request([{"role": "user", "content": prompt}], SamplingParams(), think).prompt_ids


def generate_traces(llm: LLM, prompts: list[str], tokens: int, seed: int = 0) -> list[list[int]]:
    """One trace per prompt: prompt ids + `tokens` generated ids, all decoded together with full attention (the
    engine's own setting must not evict)."""
    if llm.engine.evict.evicts:
        raise ValueError("traces are generated with full attention")
    seqs = [llm.engine.add_request(trace_prompt(llm, p), replace(TRACE_SAMPLING, max_tokens=tokens, seed=seed + i))
            for i, p in enumerate(prompts)]
    while llm.engine.has_work():
        llm.engine.step()
    return [list(s.token_ids) for s in seqs]


class GreedyRun:
    """Greedy decoding of one prompt under one eviction setting, token by token through the engine's scheduler,
    runner and compressor (eos ignored), on its own pool."""

    def __init__(self, model: torch.nn.Module, prompt: list[int], tokens: int, cfg: EvictionConfig,
                 stats: TriStats | None = None, online: QueryStats | None = None):
        mc = model.config
        norm = model.model.norm.weight
        device, dtype = norm.device, norm.dtype
        # the run's KV range: budget + divide_length, or (auto without a budget) the whole run, as in the engine
        cfg = cfg.for_range(len(prompt) + tokens if cfg.budget is None else cfg.budget + cfg.divide_length) if cfg.evicts else cfg
        params = SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True)
        self.seq = Sequence(list(prompt), params, max_len=len(prompt) + tokens,
                            kv_budget=cfg.budget if cfg.evicts else None, divide_length=cfg.divide_length,
                            pinned=len(prompt) if cfg.evicts and cfg.pin_prompt else 0)
        pool = KVPool.for_config(mc, self.seq.slots_needed(), dtype, device)
        self.compressor = Compressor(cfg, pool, mc.num_attention_heads, model.bands.omega, stats, model.bands,
                                     online=online.copy() if online is not None else None)
        self.runner = Runner(model, pool, device)
        self.scheduler = Scheduler(pool.allocator, max_seqs=1, max_batch_tokens=cfg.divide_length)
        self.scheduler.add(self.seq)

    @torch.inference_mode()
    def next(self) -> int | None:
        """Run steps until one samples; its greedy token (None once the sequence has all its tokens)."""
        while not self.seq.finished:
            batch = self.scheduler.schedule()
            logits, seqs = self.runner.step(batch, self.compressor)
            self.scheduler.advance(batch)
            if self.compressor.due(self.seq):
                self.compressor.evict(self.seq)
                self.scheduler.compacted(self.seq, self.seq.kv_budget)
            if seqs:
                token = int(logits[0].argmax())
                self.scheduler.postprocess(seqs, [token])
                return token
        return None


def greedy_agreement(model: torch.nn.Module, prompt: list[int], tokens: int,
                     runs: list[tuple[str, EvictionConfig]], stats: TriStats | None = None,
                     online: QueryStats | None = None) -> dict[str, int]:
    """Per run label: how many of `tokens` greedy tokens from prompt equal greedy decoding with full attention
    before the first that differs (each run stops there)."""
    full = GreedyRun(model, prompt, tokens, EvictionConfig(policy="full"))
    reference = [t for t in iter(full.next, None)]
    agree = {}
    for label, cfg in runs:
        run = GreedyRun(model, prompt, tokens, cfg, stats, online)
        n = 0
        while n < len(reference) and run.next() == reference[n]:
            n += 1
        agree[label] = n
    return agree
