"""Decode attention launch sweep at Qwen3-32B shapes (64 query heads, 8 KV heads, head dim 128, bf16, batch 1): the
partition rule (WAVES, MIN_PARTITION) and the launch (BLOCK_N, NUM_WARPS, NUM_STAGES) of kernels/decode_attention.py,
timed in a CUDA graph whose calls rotate over 8 layers' KV (so L2 does not hold it, as in decode), at (length, graph
bound) pairs the runner meets: a graph bucket is the next power of two, so 4160 keys run under a bound of 8192.
Prints microseconds per call and GB/s of K+V read: the combine kernel alone, an older kernel if one is put at
bench/_attn_old.py (e.g. `git show REV:kernels/decode_attention.py > bench/_attn_old.py`), the current defaults, then
the six best settings; `python bench/attn_lab.py [--quick]`.
"""

import argparse
import itertools
import statistics

import torch
import triton
from openclaw.kernels import decode_attention as da

H, HKV, D, LAYERS = 64, 8, 128, 8
CASES = [(130, 256), (4160, 8192), (4096, 4096), (8000, 8192), (20000, 32768)]


def time_us(fn, calls: int) -> float:
    """Microseconds per call of fn(i), i = 0..calls-1, captured once in a CUDA graph and replayed."""
    for i in range(calls):
        fn(i)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(calls):
            fn(i)
    times = []
    for _ in range(15):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        graph.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1e3 / calls)
    return statistics.median(times)


def case(n: int, bound: int, attend=da.decode_attention) -> float:
    stride = bound + 64
    k = torch.randn(LAYERS * stride, HKV, D, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    q = torch.randn(1, H, D, device="cuda", dtype=torch.bfloat16)
    bases = [torch.tensor([i * stride], device="cuda") for i in range(LAYERS)]
    length = torch.tensor([n], device="cuda")
    out = torch.empty_like(q)
    return time_us(lambda i: attend(q, k, v, bases[i % LAYERS], length, D ** -0.5, bound, out=out), 8 * LAYERS)


def combine_us(bound: int) -> float:
    """The combine kernel alone, at the default partition count of this bound (every partition full)."""
    parts = da.num_partitions(bound, HKV, torch.device("cuda"))
    acc = torch.randn(LAYERS, 1, H, parts, D, device="cuda")
    ml = torch.rand(LAYERS, 1, H, parts, 2, device="cuda") + 1
    out = torch.empty(1, H, D, device="cuda", dtype=torch.bfloat16)
    return time_us(lambda i: da._decode_combine_kernel[(H,)](acc[i % LAYERS], ml[i % LAYERS], out, parts, H * D, D,
                                                              H=H, D=D, BLOCK_P=triton.next_power_of_2(parts),
                                                              BLOCK_D=D), 8 * LAYERS)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="fewer launch settings")
    args = ap.parse_args()
    print(torch.cuda.get_device_name(), "torch", torch.__version__)
    knobs = ("WAVES", "MIN_PARTITION", "BLOCK_N", "NUM_WARPS", "NUM_STAGES")
    defaults = tuple(getattr(da, name) for name in knobs)
    grid = list(itertools.product([1, 2, 4], [64, 128, 256], [32, 64], [4, 8], [2, 3]))
    if args.quick:
        grid = list(itertools.product([2, 4], [64, 128], [64], [4], [2]))
    grid = [setting for setting in grid if setting != defaults]
    try:
        import _attn_old  # an older decode_attention.py, copied in for a same-run comparison
    except ImportError:
        _attn_old = None
    for n, bound in CASES:
        gb = 2 * n * HKV * D * 2 / 1e9
        rows = [("combine kernel alone (default partitions, all full)", combine_us(bound))]
        if _attn_old is not None:
            rows.append(("before (static split)", case(n, bound, _attn_old.decode_attention)))
        for setting in [defaults, *grid]:
            for name, value in zip(knobs, setting):
                setattr(da, name, value)
            name = "waves {} min_part {} block_n {} warps {} stages {}".format(*setting)
            rows.append((name + (" (default)" if setting == defaults else ""), case(n, bound)))
        for name, value in zip(knobs, defaults):
            setattr(da, name, value)
        print(f"\n{n} keys, bound {bound} ({gb * 1e3:.1f} MB of K+V):")
        first = 3 if _attn_old is not None else 2
        best = sorted(rows[first:], key=lambda r: r[1])[:6]
        for name, us in rows[:first] + best:
            print(f"  {us:7.2f} us  {gb / us * 1e6:6.0f} GB/s  {name}")


if __name__ == "__main__":
    main()
