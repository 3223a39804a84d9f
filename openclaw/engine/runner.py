"""Turns a scheduled step into tensors, runs the model over the KV pool, and returns logits of sampled rows.

Decode rows (one token of a sequence that samples) go through openclaw.engine.graphs when the runner has it: one
replay of a captured batched step on CUDA ("capture"), or the same static step run eagerly ("eager": the twin the
CPU tests check). The rest of a step (prefill chunks, teacher-forced rows, and every row when the step's taps cannot
be captured) runs as one dynamic forward over its flattened tokens; a step that mixes both runs the decode rows on
the graph and the rest beside it. It reads sequences and never changes them: it does not choose what runs or advance
progress (the scheduler does) or pick tokens (the sampler does). Calibration and the fidelity harness build their
steps here too.
"""

from typing import Protocol

import torch

from openclaw.engine.graphs import DecodeGraphs, StepTap
from openclaw.engine.kv_pool import KVPool
from openclaw.engine.sequence import Sequence
from openclaw.models.layers import BatchMeta

GRAPH_MODES = ("capture", "eager", "off")


class Taps(Protocol):
    """What records a step's queries (openclaw.evict.compressor.Compressor; calibration's statistics)."""

    graphable: bool  # its taps record with device ops only, so a captured step may hold them

    def tap(self, batch: list[tuple[Sequence, int]]) -> StepTap | None: ...


class Runner:
    def __init__(self, model: torch.nn.Module, pool: KVPool, device: torch.device, graphs: str = "off",
                 max_seqs: int = 1, max_len: int | None = None):
        """graphs: capture (CUDA graphs; eager on a CPU), eager (the static decode steps, uncaptured) or off (every
        step dynamic); max_seqs: decode rows per step at most; max_len: the longest cache (default: the pool)."""
        assert graphs in GRAPH_MODES, f"graphs {graphs!r} must be one of {GRAPH_MODES}"
        self.model = model
        self.pool = pool
        self.device = device
        self.graphs = None
        if graphs != "off":
            self.graphs = DecodeGraphs(model, pool, device, max_seqs, min(max_len or pool.num_slots, pool.num_slots),
                                       capture=graphs == "capture")

    @torch.inference_mode()
    def step(self, batch: list[tuple[Sequence, int]], taps: Taps | None = None,
             rows: list[int] | None = None) -> tuple[torch.Tensor, list[Sequence]]:
        """Run n tokens of each sequence; write their K/V; return logits [N, V] and the N sequences that sample.

        A sequence samples when this step reaches the end of its known tokens (the last prefill chunk or decode).
        taps: what records the step's queries (the eviction loop's compressor, calibration), or None.
        rows: the step's token rows to return logits for instead (teacher forcing; no sequence samples then).
        """
        decode, rest = [], []
        for seq, n in batch:
            on_graph = self.graphs is not None and rows is None and n == 1 and seq.num_computed + 1 == seq.num_tokens
            (decode if on_graph else rest).append((seq, n))
        if decode and taps is not None and not taps.graphable:
            decode, rest = [], batch
        parts, samplers = [], []
        if decode:
            seqs = [seq for seq, _ in decode]
            parts.append(self.graphs.run(seqs, None if taps is None else taps.tap(decode)))
            samplers += seqs
        if rest:
            logits, sampled = self._forward(rest, taps, rows)
            parts.append(logits)
            samplers += sampled
        return parts[0] if len(parts) == 1 else torch.cat(parts), samplers

    def _forward(self, batch: list[tuple[Sequence, int]], taps: Taps | None,
                 rows: list[int] | None) -> tuple[torch.Tensor, list[Sequence]]:
        """The dynamic path: one forward over the batch's flattened tokens."""
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

        def tensor(values: list[int] | list[list[int]]) -> torch.Tensor:
            return torch.tensor(values, dtype=torch.long).to(self.device, non_blocking=True)

        if rows is not None:
            sample_rows, samplers = rows, []
        spans = tensor([s[2] for s in seqs] + [s[3] for s in seqs])  # decode attention reads slot ranges here
        slot_t, pos_t = tensor(slots), tensor(positions)
        tap = None if taps is None else taps.tap(batch)
        query_tap = None if tap is None else tap.bind(tensor(tap.rows).view(len(tap.rows), t), slot_t, pos_t)
        meta = BatchMeta(slot_mapping=slot_t, seqs=seqs, sample_idx=tensor(sample_rows), query_tap=query_tap,
                         slot_base=spans[:len(seqs)], kv_valid=spans[len(seqs):],
                         key_mass=None if tap is None else tap.key_mass)
        return self.model(tensor(ids), pos_t, meta, self.pool.k, self.pool.v), samplers
