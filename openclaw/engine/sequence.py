"""One request's state as the scheduler and runner see it: token ids, progress, and its slots in the pool.

Token ids only (text lives at the edges) and no torch, so the scheduler can be tested with plain sequences.
"""

import itertools
from dataclasses import dataclass, field
from enum import Enum

from openclaw.config import SamplingParams

_ids = itertools.count()


class Status(Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class Sequence:
    token_ids: list[int]
    params: SamplingParams
    max_len: int  # prompt + generated tokens at most (the model's or the user's cap)
    seq_id: int = field(default_factory=lambda: next(_ids))
    prompt_len: int | None = None  # tokens that count as the prompt (pinned when evicting); None: all of token_ids
    status: Status = Status.WAITING
    num_computed: int = 0  # tokens whose K/V have been computed: the next token's absolute position
    kv_len: int = 0  # pool slots in use (equals num_computed until something is evicted)
    slot_base: int | None = None
    capacity: int = 0  # slots owned in the pool
    finish_reason: str | None = None  # "stop" (eos, a stop token or string), "length", "abort", "error"
    error: str | None = None  # finish_reason "error": what went wrong, in words the client may read
    input_error: bool = False  # the error is the request's own (an OpenClawError), not the engine's
    kv_budget: int | None = None  # with eviction: cached tokens kept after each compression
    divide_length: int = 128  # with eviction: compress when the cache reaches kv_budget + divide_length
    evictions: int = 0  # compressions so far

    def __post_init__(self) -> None:
        if self.prompt_len is None:
            self.prompt_len = len(self.token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[self.prompt_len:]

    @property
    def num_pending(self) -> int:
        """Tokens not yet run through the model (the prompt's rest in prefill, 1 in decode)."""
        return self.num_tokens - self.num_computed

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED

    def slots_needed(self) -> int:
        """Pool slots this sequence must own: its whole length, or budget + divide_length when it evicts."""
        length = min(self.max_len, self.num_tokens + self.params.max_tokens)
        return length if self.kv_budget is None else min(length, self.kv_budget + self.divide_length)
