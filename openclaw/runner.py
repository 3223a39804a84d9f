"""Turns a scheduled step into tensors, runs the model over the KV pool, and returns logits of sampled rows.

It does not choose what runs (the scheduler does) or pick tokens (the sampler does).
"""

import torch

from openclaw.kv_pool import KVPool
from openclaw.models.layers import BatchMeta
from openclaw.sequence import Sequence


class Runner:
    def __init__(self, model: torch.nn.Module, pool: KVPool, device: torch.device):
        self.model = model
        self.pool = pool
        self.device = device

    @torch.inference_mode()
    def step(self, batch: list[tuple[Sequence, int]]) -> tuple[torch.Tensor, list[Sequence]]:
        """Run n tokens of each sequence; write their K/V; return logits [N, V] and the N sequences that sample.

        A sequence samples when this step reaches the end of its known tokens (the last prefill chunk or decode).
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

        meta = BatchMeta(slot_mapping=tensor(slots), seqs=seqs, sample_idx=tensor(sample_rows))
        logits = self.model(tensor(ids), tensor(positions), meta, self.pool.k, self.pool.v)
        for seq, n in batch:
            seq.num_computed += n
            seq.kv_len += n
        return logits, samplers
