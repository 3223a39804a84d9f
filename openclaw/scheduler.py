"""Admission and step composition: which sequences run in the next forward and how many tokens each.

FIFO admission while the pool has a free slot range and the batch has room; each step gives every running
sequence in decode one token, then fills the rest of the token budget with prefill chunks. No torch.
"""

from collections import deque

from openclaw.sequence import Sequence, Status


class Scheduler:
    def __init__(self, allocator, max_seqs: int, max_batch_tokens: int):
        """allocator: anything with allocate(n) -> start | None and free(start) (kv_pool.SlotAllocator)."""
        self.allocator = allocator
        self.max_seqs = max_seqs
        self.max_batch_tokens = max_batch_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def _admit(self) -> None:
        while self.waiting and len(self.running) < self.max_seqs:
            seq = self.waiting[0]
            base = self.allocator.allocate(seq.slots_needed())
            if base is None:
                return  # FIFO: later requests wait behind the first that does not fit
            self.waiting.popleft()
            seq.slot_base, seq.capacity, seq.status = base, seq.slots_needed(), Status.RUNNING
            self.running.append(seq)

    def schedule(self) -> list[tuple[Sequence, int]]:
        """(sequence, tokens to run) for the next forward step; empty when nothing can run."""
        self._admit()
        budget = self.max_batch_tokens
        batch = []
        for seq in self.running:
            if seq.num_pending == 1 and seq.num_computed >= seq.prompt_len:
                batch.append((seq, 1))
                budget -= 1
        for seq in self.running:
            if budget <= 0:
                break
            if seq.num_computed < seq.prompt_len or seq.num_pending > 1:  # prompt, or tokens Engine.inject added
                # an evicting sequence owns budget + divide_length slots and is compressed between chunks
                n = min(seq.num_pending, budget, seq.capacity - seq.kv_len)
                batch.append((seq, n))
                budget -= n
        return batch

    def finish(self, seq: Sequence, reason: str) -> None:
        seq.status, seq.finish_reason = Status.FINISHED, reason
        if seq in self.running:
            self.running.remove(seq)
            self.allocator.free(seq.slot_base)
        elif seq in self.waiting:
            self.waiting.remove(seq)
