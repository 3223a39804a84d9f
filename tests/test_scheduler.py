"""Slot allocator and scheduler on plain sequences (no torch, no model)."""

import random

from openclaw.config import SamplingParams
from openclaw.engine.kv_pool import SlotAllocator
from openclaw.engine.scheduler import Scheduler
from openclaw.engine.sequence import Sequence, Status


def test_allocator_never_loses_or_doubles_slots():
    rng = random.Random(0)
    alloc = SlotAllocator(1000)
    owned: dict[int, int] = {}
    for _ in range(2000):
        if owned and rng.random() < 0.45:
            start = rng.choice(list(owned))
            alloc.free(start)
            del owned[start]
        else:
            n = rng.randint(1, 120)
            start = alloc.allocate(n)
            if start is None:
                assert alloc.largest_free < n
                continue
            owned[start] = n
        used = [s for start, n in owned.items() for s in range(start, start + n)]
        assert len(used) == len(set(used)), "a slot was handed out twice"
        assert all(0 <= s < 1000 for s in used)
        assert alloc.num_free + len(used) == 1000, "slots were lost"
    for start in list(owned):
        alloc.free(start)
    assert alloc.free_ranges == [(0, 1000)], "freed neighbours must merge back into one range"


def seq(prompt_len: int, max_tokens: int = 10, max_len: int = 10_000) -> Sequence:
    return Sequence(list(range(prompt_len)), SamplingParams(max_tokens=max_tokens), max_len=max_len)


def test_schedule_chunks_prefill_and_batches_decodes():
    sched = Scheduler(SlotAllocator(10_000), max_seqs=4, max_batch_tokens=64)
    a, b = seq(100), seq(30)
    sched.add(a)
    sched.add(b)
    batch = sched.schedule()
    assert [(s.seq_id, n) for s, n in batch] == [(a.seq_id, 64)]  # the token budget caps prefill
    a.num_computed = 64
    batch = sched.schedule()
    assert [(s.seq_id, n) for s, n in batch] == [(a.seq_id, 36), (b.seq_id, 28)]
    a.num_computed, b.num_computed = 100, 28
    a.token_ids.append(7)  # a sampled its first token: it decodes now, before b's prefill rest
    batch = sched.schedule()
    assert [(s.seq_id, n) for s, n in batch] == [(a.seq_id, 1), (b.seq_id, 2)]


def test_admission_waits_for_slots_and_is_fifo():
    alloc = SlotAllocator(100)
    sched = Scheduler(alloc, max_seqs=8, max_batch_tokens=512)
    big, small, later = seq(50, 30), seq(60, 30), seq(5, 5)
    for s in (big, small, later):
        sched.add(s)
    sched.schedule()
    assert big.status is Status.RUNNING and small.status is Status.WAITING
    assert later.status is Status.WAITING, "admission is FIFO: a small request does not jump the queue"
    sched.finish(big, "stop")
    assert big.finish_reason == "stop" and alloc.num_free == 100
    sched.schedule()
    assert small.status is Status.RUNNING and later.status is Status.RUNNING
    assert small.slot_base != later.slot_base


def test_max_seqs_limits_the_batch():
    sched = Scheduler(SlotAllocator(10_000), max_seqs=2, max_batch_tokens=512)
    seqs = [seq(10) for _ in range(5)]
    for s in seqs:
        sched.add(s)
    assert len(sched.schedule()) == 2
    assert sum(s.status is Status.RUNNING for s in seqs) == 2


def test_slots_needed_respects_model_length():
    assert seq(100, max_tokens=50).slots_needed() == 150
    assert seq(100, max_tokens=5000, max_len=1024).slots_needed() == 1024
