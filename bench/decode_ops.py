"""Fused decode ops on the GPU: decode attention (the flash-decoding kernel vs its plain-PyTorch reference) at
Qwen3-32B shapes, and kernels per layer and time per batch-1 decode step of a Qwen3-32B-shaped bf16 model (random,
few layers) replayed in a CUDA graph. Prints numbers; `python bench/decode_ops.py [--layers 4]`. (The plain torch
model path this once compared against is gone: on CUDA every op runs its kernel; bench/RESULTS.md has that run.)"""

import argparse

import torch
from openclaw.kernels.decode_attention import decode_attention, decode_attention_ref
from openclaw.models.layers import BatchMeta
from openclaw.models.qwen3 import Qwen3Config, Qwen3ForCausalLM

QWEN3_32B = {"model_type": "qwen3", "vocab_size": 151936, "hidden_size": 5120, "intermediate_size": 25600,
             "num_attention_heads": 64, "num_key_value_heads": 8, "head_dim": 128, "rms_norm_eps": 1e-6,
             "max_position_embeddings": 40960, "rope_theta": 1e6}


def timed(fn, reps: int = 50) -> float:
    """Median milliseconds of fn."""
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return sorted(times)[len(times) // 2]


def graphed(fn, n: int = 20) -> float:
    """Median milliseconds of one fn call, from a CUDA graph of n calls (no launch overhead, as in decode)."""
    fn()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(n):
            fn()
    return timed(graph.replay, 20) / n


def attention(ctx: int) -> None:
    H, Hkv, D = 64, 8, 128
    k = torch.randn(ctx, Hkv, D, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    q = torch.randn(1, H, D, device="cuda", dtype=torch.bfloat16)
    base, n = torch.zeros(1, dtype=torch.long, device="cuda"), torch.full((1,), ctx, device="cuda")
    fused = graphed(lambda: decode_attention(q, k, v, base, n, D ** -0.5, ctx))
    plain = timed(lambda: decode_attention_ref(q, k, v, base, n, D ** -0.5))  # host syncs: no graph
    gbs = 2 * k.numel() * k.element_size() / fused / 1e6
    print(f"decode attention, {ctx} keys: fused {fused * 1e3:.1f} us ({gbs:.0f} GB/s of K+V), plain {plain * 1e3:.1f} us")


def step(layers: int, ctx: int) -> tuple[float, int]:
    """(ms per step, kernels per step)."""
    cfg = Qwen3Config.from_dict({**QWEN3_32B, "num_hidden_layers": layers})
    with torch.device("cuda"):
        model = Qwen3ForCausalLM(cfg).to(torch.bfloat16).eval()
        k = torch.randn(layers, ctx + 256, 8, 128, dtype=torch.bfloat16) * 0.1
    v = torch.randn_like(k) * 0.1
    inputs = torch.tensor([7, ctx - 1, ctx - 1, ctx], device="cuda")
    meta = BatchMeta(slot_mapping=inputs[2:3], seqs=[(0, 1, 0, ctx)], sample_idx=torch.zeros(1, dtype=torch.long,
                     device="cuda"), kv_valid=inputs[3:4], slot_base=torch.zeros(1, dtype=torch.long, device="cuda"))
    with torch.inference_mode():
        def fwd():
            return model(inputs[0:1], inputs[1:2], meta, k, v)

        fwd()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fwd()
        ms = timed(graph.replay, 20)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            fwd()
            torch.cuda.synchronize()
    return ms, sum(e.count for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=4)
    args = ap.parse_args()
    print(torch.cuda.get_device_name(), "torch", torch.__version__)
    for ctx in (4096, 32768):
        attention(ctx)
    for ctx in (4096, 32768):
        half, full = step(args.layers // 2, ctx), step(args.layers, ctx)
        dl = args.layers - args.layers // 2
        per_ms, per_k = (full[0] - half[0]) / dl, (full[1] - half[1]) / dl
        print(f"{ctx} keys, in a graph: {args.layers} layers {full[0]:.3f} ms, {full[1]} kernels; per layer "
              f"{per_ms * 1e3:.0f} us, {per_k:.0f} kernels")


if __name__ == "__main__":
    main()
