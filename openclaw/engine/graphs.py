"""Batched decode steps with static shapes: one per (batch bucket, KV-length bucket), captured as CUDA graphs.

A step's rows are decode tokens of up to `bucket` sequences; every row's token, position, slot, slot base and length
(and the per-row inputs of the step's query tap) are staged into one input tensor before the step runs, so no slot
base or length is baked into a graph and any sequence at any slot replays any graph. Rows past the real ones are
padding: slot -1 (their K/V go nowhere: the models' KV writes skip negative slots), length 1 at slot 0, and the tap's
scratch row. The KV-length bucket (a power of two from 256) is only the static bound decode attention derives its
partition count from; the true lengths are read on the device. All graphs share one memory pool and write their
logits into one buffer; the registry holds at most len(batch buckets) x len(length buckets) steps per tap width.

Without capture (`capture=False`) the very same staged step runs eagerly: the twin the CPU tests compare with the
dynamic path. It does not decide which rows are decode rows (openclaw.engine.runner does) or change sequences.
"""

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from openclaw.engine.kv_pool import KVPool
from openclaw.engine.sequence import Sequence
from openclaw.models.layers import BatchMeta

MIN_LEN_BUCKET = 256  # the smallest KV-length bound: shorter contexts would only shave partitions off tiny launches
INPUT_ROWS = 5  # token, position, slot, slot base, length: the staged rows every step has
TAP_ROWS = 2  # staged rows a tap may add (the compressor's ring row uses one)


def batch_buckets(max_seqs: int) -> list[int]:
    """1, 2, 4, 8, ... below max_seqs, then max_seqs: a step of n decode rows runs in the smallest bucket >= n."""
    return sorted({1 << i for i in range(max_seqs.bit_length()) if 1 << i < max_seqs} | {max_seqs})


def len_buckets(max_len: int) -> list[int]:
    """Powers of two from MIN_LEN_BUCKET up to the first >= max_len (the longest cache a sequence can have)."""
    out = [MIN_LEN_BUCKET]
    while out[-1] < max_len:
        out.append(out[-1] * 2)
    return out


@dataclass
class StepTap:
    """What one step's forward records for eviction or calibration (openclaw.evict.compressor makes them).

    rows: per-token int inputs the tap reads on the device, one list per input row ([k][T]; k fixed per tap source);
    pad: each input row's value for padded rows; bind(inputs [k, T], slots [T], positions [T]) -> the
    BatchMeta.query_tap that records the step with device ops only (so a graph captures it); key_mass: the
    BatchMeta.key_mass the step's attention adds to (a fixed pool-shaped tensor), or None."""

    rows: list[list[int]]
    pad: list[int]
    bind: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], Callable]
    key_mass: torch.Tensor | None = None


@dataclass
class _Step:
    """One static step: its staged inputs [INPUT_ROWS + k, bucket] on the device, what the forward reads, and its
    graph once captured."""

    inputs: torch.Tensor
    meta: BatchMeta
    graph: torch.cuda.CUDAGraph | None = None


class DecodeGraphs:
    def __init__(self, model: torch.nn.Module, pool: KVPool, device: torch.device, max_seqs: int, max_len: int,
                 capture: bool = True):
        """max_len: the longest cache a sequence can reach."""
        self.model, self.pool, self.device = model, pool, device
        self.capture = capture and device.type == "cuda"
        self.batch_buckets = batch_buckets(max_seqs)
        self.len_buckets = len_buckets(max_len)
        # (batch bucket, length bucket, tap rows, adds key mass) -> step
        self.steps: dict[tuple[int, int, int, bool], _Step] = {}
        self.logits: torch.Tensor | None = None  # [largest bucket, V] fp32, made by the first step (never in a capture)
        self.mempool = None  # one memory pool for every graph: they never run at once
        rows = (INPUT_ROWS + TAP_ROWS) * self.batch_buckets[-1]
        # staged in one pinned buffer (a fresh pinned tensor per token cost ~60 us of host time); `uploaded` marks when
        # the last copy out of it finished, so it is never overwritten early
        self.staging = torch.empty(rows, dtype=torch.long, pin_memory=self.capture)
        self.uploaded = torch.cuda.Event() if self.capture else None

    @property
    def max_steps(self) -> int:
        """The registry's bound per tap width (an engine uses one)."""
        return len(self.batch_buckets) * len(self.len_buckets)

    def bucket(self, n: int, kv_len: int) -> tuple[int, int]:
        """(batch bucket, length bucket) of n decode rows whose longest cache holds kv_len slots after the step."""
        b = next((b for b in self.batch_buckets if b >= n), None)
        s = next((s for s in self.len_buckets if s >= kv_len), None)
        if b is None or s is None:
            raise ValueError(f"{n} rows at {kv_len} slots exceed the buckets (max {self.batch_buckets[-1]} rows, "
                             f"{self.len_buckets[-1]} slots)")
        return b, s

    def run(self, seqs: list[Sequence], tap: StepTap | None = None) -> torch.Tensor:
        """Logits [len(seqs), V] (fp32, a new tensor) of one decode token of each sequence (its next unrun token),
        its K/V written to the pool; tap: what the step records (its rows must be one per sequence)."""
        n = len(seqs)
        k = 0 if tap is None else len(tap.rows)
        assert k <= TAP_ROWS, f"a tap of {k} input rows; the staging buffer holds {TAP_ROWS}"
        B, S = self.bucket(n, max(s.kv_len for s in seqs) + 1)
        values = np.empty((INPUT_ROWS + k, B), dtype=np.int64)
        values[:INPUT_ROWS, n:] = np.array([0, 0, -1, 0, 1])[:, None]  # padded rows: write nowhere, read slot 0
        values[0, :n] = [s.token_ids[s.num_computed] for s in seqs]
        values[1, :n] = [s.num_computed for s in seqs]
        values[3, :n] = [s.slot_base for s in seqs]
        values[2, :n] = values[3, :n] + [s.kv_len for s in seqs]
        values[4, :n] = [s.kv_len + 1 for s in seqs]
        if k:
            values[INPUT_ROWS:, :n] = tap.rows
            values[INPUT_ROWS:, n:] = np.array(tap.pad)[:, None]
        key = (B, S, k, tap is not None and tap.key_mass is not None)
        step = self.steps.get(key)
        if step is None:  # keys come from the bucket lists, so the registry never passes max_steps per tap width
            step = self.steps[key] = self._make(B, S, tap)
        self._stage(values, step.inputs)
        if not self.capture:
            self._forward(step)
        elif step.graph is None:
            step.graph = self._capture(step)  # its warm-up computed this step; a replay would repeat the tap's sums
        else:
            step.graph.replay()
        return self.logits[:n].clone()

    def _stage(self, values: np.ndarray, inputs: torch.Tensor) -> None:
        if not self.capture:
            inputs.copy_(torch.from_numpy(values))
            return
        if not self.uploaded.query():  # done already unless two steps were queued without reading a token; query()
            self.uploaded.synchronize()  # first, so the usual step adds no host synchronization to count
        staged = self.staging[:values.size].view(values.shape)
        staged.numpy()[:] = values
        inputs.copy_(staged, non_blocking=True)
        self.uploaded.record()

    def _make(self, B: int, S: int, tap: StepTap | None) -> _Step:
        k = 0 if tap is None else len(tap.rows)
        inputs = torch.zeros(INPUT_ROWS + k, B, dtype=torch.long, device=self.device)
        meta = BatchMeta(slot_mapping=inputs[2], seqs=[(i, 1, 0, S) for i in range(B)],
                         sample_idx=torch.arange(B, device=self.device), slot_base=inputs[3], kv_valid=inputs[4])
        if tap is not None:
            meta.query_tap = tap.bind(inputs[INPUT_ROWS:], inputs[2], inputs[1])
            meta.key_mass = tap.key_mass
        return _Step(inputs, meta)

    def _forward(self, step: _Step) -> None:
        logits = self.model(step.inputs[0], step.inputs[1], step.meta, self.pool.k, self.pool.v)
        if self.logits is None:  # a warm-up run comes before every capture, so this never allocates in one
            self.logits = logits.new_empty(self.batch_buckets[-1], logits.shape[1])
        self.logits[:logits.shape[0]].copy_(logits)

    def _capture(self, step: _Step) -> torch.cuda.CUDAGraph:
        """Capture step's forward into a graph. A warm-up run outside the capture (Triton autotuning, lazy init)
        computes this very step: its results are this step's."""
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            self._forward(step)
        torch.cuda.current_stream(self.device).wait_stream(side)
        if self.mempool is None:
            self.mempool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.mempool):
            self._forward(step)
        return graph
