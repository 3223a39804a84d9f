"""The one preallocated KV tensor pair and the bookkeeping of which sequence owns which slots.

k, v: [L, S, Hkv, D] allocated once at start; a sequence owns one contiguous range of S for its whole life
and its cached tokens occupy the front of that range in temporal order. The widths come from the model config's
cache_shape: an MLA model (GLM-4.7-Flash) caches its latent and RoPE key as one key [L, S, 1, 576] and no separate
value (v has width 0: the latent is the value). Nothing here runs a model or decides
what to evict. SlotAllocator is torch-free so the scheduler can be tested without tensors.
"""

import bisect

import torch


class SlotAllocator:
    """First-fit allocation of contiguous slot ranges out of num_slots."""

    def __init__(self, num_slots: int):
        self.num_slots = num_slots
        self.free_ranges: list[tuple[int, int]] = [(0, num_slots)]  # (start, length), sorted by start
        self.owned: dict[int, int] = {}  # start -> length

    def allocate(self, n: int) -> int | None:
        """Start of a free range of n slots, or None when no free range is that long."""
        for i, (start, length) in enumerate(self.free_ranges):
            if length >= n:
                if length == n:
                    self.free_ranges.pop(i)
                else:
                    self.free_ranges[i] = (start + n, length - n)
                self.owned[start] = n
                return start
        return None

    def free(self, start: int) -> None:
        n = self.owned.pop(start)
        i = bisect.bisect(self.free_ranges, (start, n))
        self.free_ranges.insert(i, (start, n))
        # merge with the neighbours so large ranges come back
        if i + 1 < len(self.free_ranges) and start + n == self.free_ranges[i + 1][0]:
            self.free_ranges[i] = (start, n + self.free_ranges.pop(i + 1)[1])
        if i > 0 and self.free_ranges[i - 1][0] + self.free_ranges[i - 1][1] == start:
            prev = self.free_ranges[i - 1]
            self.free_ranges[i - 1] = (prev[0], prev[1] + self.free_ranges.pop(i)[1])

    @property
    def num_free(self) -> int:
        return sum(length for _, length in self.free_ranges)

    @property
    def largest_free(self) -> int:
        return max((length for _, length in self.free_ranges), default=0)


class KVPool:
    """k: [L, S, Hkv, D], v: [L, S, Hkv, Dv] (Dv = D unless given) for all layers and all sequences, plus the slot
    allocator."""

    def __init__(self, num_layers: int, num_slots: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str, v_dim: int | None = None):
        shape = (num_layers, num_slots, num_kv_heads, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(*shape[:3], head_dim if v_dim is None else v_dim, dtype=dtype, device=device)
        self.allocator = SlotAllocator(num_slots)

    @classmethod
    def for_config(cls, cfg, num_slots: int, dtype: torch.dtype, device: torch.device | str) -> "KVPool":
        """The pool of a model of family config `cfg` (its cache_shape: KV heads, key width, value width)."""
        heads, k_dim, v_dim = cfg.cache_shape()
        return cls(cfg.num_hidden_layers, num_slots, heads, k_dim, dtype, device, v_dim)

    @property
    def num_slots(self) -> int:
        return self.k.shape[1]