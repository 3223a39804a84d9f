"""Admission, step composition and the one owner of every sequence's progress.

FIFO admission while the pool has a free slot range and the batch has room; each step gives every running
sequence in decode one token, then fills the rest of the token budget with prefill chunks. After the forward, only
the scheduler advances a sequence (advance, compacted), appends its tokens (postprocess, inject) and finishes it;
the runner, the compressor and the harnesses read sequences and never write them. No torch.
"""

from collections import deque

from openclaw.engine.sequence import Sequence, Status


class Scheduler:
    def __init__(self, allocator, max_seqs: int, max_batch_tokens: int, eos_ids: set[int] = frozenset()):
        """allocator: anything with allocate(n) -> start | None and free(start) (kv_pool.SlotAllocator)."""
        self.allocator = allocator
        self.max_seqs = max_seqs
        self.max_batch_tokens = max_batch_tokens
        self.eos_ids = eos_ids
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
            if seq.num_computed < seq.prompt_len or seq.num_pending > 1:  # prompt, or tokens inject added
                # an evicting sequence owns budget + divide_length slots and is compressed between chunks
                n = min(seq.num_pending, budget, seq.capacity - seq.kv_len)
                batch.append((seq, n))
                budget -= n
        return batch

    def advance(self, batch: list[tuple[Sequence, int]]) -> None:
        """The step's forward has computed these tokens and written their K/V."""
        for seq, n in batch:
            seq.num_computed += n
            seq.kv_len += n

    def compacted(self, seq: Sequence, kv_len: int) -> None:
        """The compressor kept kv_len of seq's cached entries, now at the front of its slots."""
        seq.kv_len = kv_len
        seq.evictions += 1

    def postprocess(self, seqs: list[Sequence], tokens: list[int], bad_row: str = "non-finite logits") -> list[Sequence]:
        """Append each sampled token; finish sequences that hit eos, a stop token or their length. A token of -1 (the
        sampler's mark for a row whose logits were not finite) fails that sequence alone, with bad_row as its error.
        Returns the finished ones."""
        done = []
        for seq, token in zip(seqs, tokens, strict=True):
            p = seq.params
            if seq.finished:  # failed while the step ran (Engine.fail): nothing to append
                continue
            if token < 0:
                self.fail(seq, bad_row)
            else:
                seq.token_ids.append(token)
                stops = (token in self.eos_ids and not p.ignore_eos) or token in p.stop_token_ids
                if stops and len(seq.output_ids) > p.min_tokens:
                    self.finish(seq, "stop")
                elif len(seq.output_ids) >= p.max_tokens or seq.num_tokens >= seq.max_len:
                    self.finish(seq, "length")
            if seq.finished:
                done.append(seq)
        return done

    def inject(self, seq: Sequence, token_ids: list[int]) -> bool:
        """Append tokens the model did not sample (e.g. </think> when a thinking budget runs out); the next steps
        compute them like a prompt chunk, then sampling resumes. False, and nothing appended, when they would pass
        the sequence's max_tokens or length cap (the slots it owns)."""
        room = min(seq.params.max_tokens - len(seq.output_ids), seq.max_len - seq.num_tokens)
        if seq.finished or len(token_ids) >= room:
            return False
        seq.token_ids.extend(token_ids)
        return True

    def fail(self, seq: Sequence, message: str, input_error: bool = False) -> None:
        """End seq with finish_reason "error" and a message for its client; the other sequences go on."""
        seq.error, seq.input_error = message, input_error
        self.finish(seq, "error")

    def finish(self, seq: Sequence, reason: str) -> None:
        seq.status, seq.finish_reason = Status.FINISHED, reason
        if seq in self.running:
            self.running.remove(seq)
            self.allocator.free(seq.slot_base)
        elif seq in self.waiting:
            self.waiting.remove(seq)
