"""Turns a scheduled step into tensors, runs the model over the KV pool, and returns logits of sampled rows.

On CUDA a decode step of a single sequence replays a captured CUDA graph (one launch instead of one per kernel of
every layer); a graph attends to a power-of-two bucket of the sequence's slots, masked down to its real length.
It reads sequences and never changes them: it does not choose what runs or advance progress (the scheduler does) or
pick tokens (the sampler does). Calibration and the fidelity harness build their steps here too.
"""

from dataclasses import dataclass

import torch

from openclaw.engine.kv_pool import KVPool
from openclaw.engine.sequence import Sequence
from openclaw.models.layers import BatchMeta


@dataclass
class DecodeGraph:
    """One captured batch-1 decode step over slots [base, base + bucket): inputs = (token, position, slot, kv_len)."""

    graph: torch.cuda.CUDAGraph
    inputs: torch.Tensor  # [4] long, on the device
    meta: BatchMeta  # keeps the tensors the graph reads (sample_idx) alive
    logits: torch.Tensor  # [1, V], written by each replay


class Runner:
    def __init__(self, model: torch.nn.Module, pool: KVPool, device: torch.device, cuda_graphs: bool = True,
                 key_mass: torch.Tensor | None = None):
        """key_mass: BatchMeta.key_mass of every step (the compressor's realized-attention accumulator), or None."""
        self.model = model
        self.pool = pool
        self.key_mass = key_mass
        self.device = device
        self.cuda_graphs = cuda_graphs and device.type == "cuda"
        self.graphs: dict[tuple[int, int], DecodeGraph] = {}  # (slot base, bucket) -> graph
        self.graph_pool = None  # one memory pool shared by all graphs (they never run at once)
        # a graph's inputs are staged in one pinned buffer (a fresh pinned tensor per token cost ~60 us of host time
        # before each launch); `uploaded` marks when the last copy out of it finished, so it is never overwritten early
        self.staging = torch.empty(4, dtype=torch.long, pin_memory=True) if self.cuda_graphs else None
        self.uploaded = torch.cuda.Event() if self.cuda_graphs else None

    @torch.inference_mode()
    def step(self, batch: list[tuple[Sequence, int]], query_tap=None,
             rows: list[int] | None = None) -> tuple[torch.Tensor, list[Sequence]]:
        """Run n tokens of each sequence; write their K/V; return logits [N, V] and the N sequences that sample.

        A sequence samples when this step reaches the end of its known tokens (the last prefill chunk or decode).
        query_tap (BatchMeta.query_tap) sees every layer's queries; the eviction loop passes one when it needs them.
        rows: the step's token rows to return logits for instead (teacher forcing; no sequence samples then).
        """
        ids, positions, slots, seqs, sample_rows, samplers = [], [], [], [], [], []
        t = 0
        for seq, n in batch:
            start = seq.num_computed
            ids.extend(seq.token_ids[start:start + n])
            positions.extend(range(start, start + n))
            first_slot = seq.slot_base + seq.kv_len
            slots.extend(range(first_slot, first_slot + n))
            seqs.append((t, n, seq.slot_base, seq.kv_len + n))
            t += n
            if start + n == seq.num_tokens:
                sample_rows.append(t - 1)
                samplers.append(seq)

        def tensor(values: list[int]) -> torch.Tensor:
            return torch.tensor(values, dtype=torch.long).to(self.device, non_blocking=True)

        if rows is not None:
            sample_rows, samplers = rows, []
        if self.cuda_graphs and query_tap is None and len(batch) == 1 and t == 1 and samplers:
            logits = self._replay(batch[0][0].slot_base, ids[0], positions[0], slots[0], seqs[0][3])
        else:
            spans = tensor([s[2] for s in seqs] + [s[3] for s in seqs])  # decode attention reads slot ranges here
            meta = BatchMeta(slot_mapping=tensor(slots), seqs=seqs, sample_idx=tensor(sample_rows),
                             query_tap=query_tap, slot_base=spans[:len(seqs)], kv_valid=spans[len(seqs):],
                             key_mass=self.key_mass)
            logits = self.model(tensor(ids), tensor(positions), meta, self.pool.k, self.pool.v)
        return logits, samplers

    def _replay(self, base: int, token: int, position: int, slot: int, kv_len: int) -> torch.Tensor:
        """Logits [1, V] of one decode token, through the graph of this slot base and length bucket."""
        bucket = min(max(256, 1 << (kv_len - 1).bit_length()), self.pool.num_slots - base)
        self.uploaded.synchronize()  # done already unless two steps were queued without reading a token
        self.staging.numpy()[:] = (token, position, slot, kv_len)
        g = self.graphs.get((base, bucket))
        if g is None:
            g = self.graphs[(base, bucket)] = self._capture(base, bucket, self.staging.to(self.device))
        g.inputs.copy_(self.staging, non_blocking=True)
        self.uploaded.record()
        g.graph.replay()
        return g.logits.clone()

    def _capture(self, base: int, bucket: int, inputs: torch.Tensor) -> DecodeGraph:
        meta = BatchMeta(slot_mapping=inputs[2:3], seqs=[(0, 1, base, bucket)],
                         sample_idx=torch.zeros(1, dtype=torch.long, device=self.device), kv_valid=inputs[3:4],
                         slot_base=torch.full((1,), base, dtype=torch.long, device=self.device),
                         key_mass=self.key_mass)

        def forward() -> torch.Tensor:
            return self.model(inputs[0:1], inputs[1:2], meta, self.pool.k, self.pool.v)

        # a warm-up run (Triton autotuning, lazy init) outside the capture; it computes this very step, so its
        # K/V write is the one the replay repeats
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            forward()
        torch.cuda.current_stream(self.device).wait_stream(side)
        if self.graph_pool is None:
            self.graph_pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.graph_pool):
            logits = forward()
        return DecodeGraph(graph, inputs, meta, logits)
