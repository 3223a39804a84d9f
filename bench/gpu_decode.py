"""GPU decode benchmark on Qwen3-32B shapes: our 4-bit engine under a VRAM cap against transformers + bitsandbytes.

Writes a random-weight checkpoint with the real Qwen3-32B shapes in AWQ's on-disk layout (int32 GEMM packing,
bf16 embeddings and lm_head, as Qwen/Qwen3-32B-AWQ ships them), loads it through the normal engine under
--vram, and prints: load time, peak allocated vs the cap, planned vs allocated weight bytes, bytes read per token,
decode tok/s at batch 1 at two contexts, GB/s and its fraction of the copy bandwidth measured in the same run,
per-shape kernel speeds, and the peer (transformers + bitsandbytes NF4, all 64 layers) measured in the same run.
Run on a GPU machine: python bench/gpu_decode.py --dir /tmp/q32b [--json out.json]
"""

import argparse
import datetime
import gc
import json
import time
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

QWEN3_32B = {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "vocab_size": 151936,
             "hidden_size": 5120, "intermediate_size": 25600, "num_hidden_layers": 64, "num_attention_heads": 64,
             "num_key_value_heads": 8, "head_dim": 128, "rms_norm_eps": 1e-6, "max_position_embeddings": 40960,
             "rope_theta": 1000000.0, "tie_word_embeddings": False, "torch_dtype": "bfloat16"}
AWQ = {"quant_method": "awq", "bits": 4, "group_size": 128, "version": "gemm", "zero_point": True}
GB = 1e9


def write_awq_checkpoint(path: Path, cfg: dict) -> float:
    """Random AWQ GEMM tensors (random int32 words are valid packings of random 4-bit codes); seconds taken."""
    t0 = time.perf_counter()
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps({**cfg, "quantization_config": AWQ}))
    h, inter, d = cfg["hidden_size"], cfg["intermediate_size"], cfg["head_dim"]
    q, kv = cfg["num_attention_heads"] * d, cfg["num_key_value_heads"] * d
    shapes = {"self_attn.q_proj": (h, q), "self_attn.k_proj": (h, kv), "self_attn.v_proj": (h, kv),
              "self_attn.o_proj": (q, h), "mlp.gate_proj": (h, inter), "mlp.up_proj": (h, inter),
              "mlp.down_proj": (inter, h)}
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    for i in range(cfg["num_hidden_layers"]):
        t = {}
        for name, (k, n) in shapes.items():
            p = f"model.layers.{i}.{name}"
            t[f"{p}.qweight"] = torch.randint(-2**31, 2**31 - 1, (k, n // 8), dtype=torch.int32, device=dev)
            t[f"{p}.qzeros"] = torch.randint(-2**31, 2**31 - 1, (k // 128, n // 8), dtype=torch.int32, device=dev)
            # w = (q - z) * s with q, z uniform in 0..15: s ~ 1 / (6.5 sqrt(K)) keeps activations O(1)
            t[f"{p}.scales"] = torch.full((k // 128, n), 1 / (6.5 * k ** 0.5), dtype=torch.float16, device=dev)
        for norm in ("input_layernorm", "post_attention_layernorm"):
            t[f"model.layers.{i}.{norm}.weight"] = torch.ones(h, dtype=torch.bfloat16, device=dev)
        for norm in ("q_norm", "k_norm"):
            t[f"model.layers.{i}.self_attn.{norm}.weight"] = torch.ones(d, dtype=torch.bfloat16, device=dev)
        save_file({k: v.cpu() for k, v in t.items()}, str(path / f"model-{i:05d}.safetensors"))
    emb = {"model.embed_tokens.weight": torch.randn(cfg["vocab_size"], h, device=dev).bfloat16() * 0.02,
           "lm_head.weight": torch.randn(cfg["vocab_size"], h, device=dev).bfloat16() * 0.02,
           "model.norm.weight": torch.ones(h, dtype=torch.bfloat16, device=dev)}
    save_file({k: v.cpu() for k, v in emb.items()}, str(path / "model-embed.safetensors"))
    return time.perf_counter() - t0


def copy_bandwidth() -> float:
    """Device-to-device copy, bytes read + written per second (the ceiling GB/s is measured against)."""
    from triton.testing import do_bench

    a = torch.empty(4 << 30, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    ms = do_bench(lambda: b.copy_(a), warmup=50, rep=300, return_mode="median")
    a.set_(), b.set_()
    torch.cuda.empty_cache()
    return 2 * (4 << 30) / (ms / 1e3)


def graph_us(fn, copies: list, calls: int = 8) -> float:
    """Microseconds per call of fn(copy), replayed in a CUDA graph (no Python dispatch, as in decode) over rotating
    copies of the weight (together larger than the L2, so each call reads from memory)."""
    from triton.testing import do_bench

    for c in copies:  # autotune and compile outside the capture
        fn(c)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for i in range(calls):
            fn(copies[i % len(copies)])
    return do_bench(g.replay, warmup=10, rep=100, return_mode="median") * 1e3 / calls


def kernel_table(copy_bw: float) -> list[dict]:
    """Each Qwen3-32B linear shape alone, one bf16 row in a CUDA graph: the GEMV as decode runs it (4-bit: the
    tensor-core kernel on the tiled weight the loader makes, gate_up with its SiLU epilogue; 8-bit: the fp32
    kernel), gemv4 and the fp32 kernel on the row-major weight, and bf16 cuBLAS; prefill M=512 (dequantize + cuBLAS)
    vs bf16 GEMM."""
    from openclaw.kernels import qlinear as ql
    from triton.testing import do_bench

    rows = []
    for name, n, k in [("qkv", 10240, 5120), ("o_proj", 5120, 8192), ("gate_up", 51200, 5120),
                       ("down", 5120, 25600), ("lm_head 8-bit", 151936, 5120)]:
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k ** 0.5
        qw = ql.quantize_rtn(w, 8 if "lm_head" in name else 4, 128)
        x1 = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
        xp = torch.randn(512, k, device="cuda", dtype=torch.bfloat16)
        copies = [qw] + [ql.QuantWeight(qw.qweight.clone(), qw.scales.clone(), qw.offsets.clone(), None, qw.bits,
                                        qw.group, qw.shape) for _ in range(max(1, (200 << 20) // qw.nbytes))]
        if name == "gate_up":  # as decode runs it: rows interleaved, SiLU-mul in the GEMV's epilogue
            ms_q = graph_us(partial(ql.qgemv, x1, silu=True), [ql.tile(ql.interleave_gate_up(c)) for c in copies])
        else:
            ms_q = graph_us(partial(ql.qgemv, x1), [ql.tile(c) for c in copies])
        ms_q /= 1e3
        us_kind, kernels = {}, ql.GEMV_KERNELS
        for kind in ("gemv4", ""):
            ql.GEMV_KERNELS = (kind,)
            try:
                us_kind[kind] = graph_us(partial(ql.qgemv, x1), copies)
            finally:
                ql.GEMV_KERNELS = kernels
        qw = ql.tile(qw)
        del copies
        ms_b = do_bench(partial(F.linear, x1, w), warmup=25, rep=100, return_mode="median")
        ms_qp = do_bench(partial(ql.qlinear_triton, xp, qw), warmup=10, rep=50, return_mode="median")
        ms_bp = do_bench(partial(F.linear, xp, w), warmup=10, rep=50, return_mode="median")
        rows.append({"shape": f"{name} {k}->{n}", "q_us": ms_q * 1e3, "q_gbs": qw.nbytes / ms_q / 1e6,
                     "q_frac": qw.nbytes / (ms_q / 1e3) / copy_bw, "gemv4_us": us_kind["gemv4"], "fp32_us": us_kind[""],
                     "bf16_us": ms_b * 1e3,
                     "bf16_frac": w.numel() * 2 / (ms_b / 1e3) / copy_bw, "prefill512_ms": ms_qp,
                     "bf16_prefill512_ms": ms_bp})
    return rows


def decode_speed(engine, ctx: int, steps: int) -> tuple[float, float | None]:
    """Tokens/s of batch-1 decode with `ctx` tokens of context (prompt prefilled first, 3 warm-up steps), and the
    device-bound rate: the last step's CUDA graph replayed back to back with no host work between replays (None
    without graphs). The difference is the host's share: sampling, scheduling and the graph launch each token."""
    from openclaw.config import SamplingParams

    ids = torch.randint(0, 150000, (ctx,)).tolist()
    seq = engine.add_request(ids, SamplingParams(temperature=0.0, max_tokens=steps + 8, ignore_eos=True))
    while not seq.output_ids:
        engine.step()
    for _ in range(3):
        engine.step()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        engine.step()
    torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    device = None
    if engine.runner.cuda_graphs:
        graph = list(engine.runner.graphs.values())[-1].graph  # this step's graph: its bucket was captured last
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(steps):
            graph.replay()  # repeats the last step (same slot, same length)
        b.record()
        b.synchronize()
        device = steps / (a.elapsed_time(b) / 1e3)
    engine.finish(seq, "abort")
    return steps / dt, device


def ours(model_dir: Path, vram: float, copy_bw: float) -> dict:
    from openclaw.models.layers import QuantEmbedding, QuantLinear

    from openclaw.config import EngineConfig
    from openclaw.engine.engine import Engine
    from openclaw.engine.memory import loaded_bytes

    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    engine = Engine(model_dir, EngineConfig(model=str(model_dir), vram=vram))
    torch.cuda.synchronize()
    r = {"load_s": time.perf_counter() - t0, "cap": engine.plan.cap, "context": engine.plan.context,
         "planned_weights": engine.plan.weights, "allocated_weights": loaded_bytes(engine.model),
         "kv_tokens": engine.pool.num_slots, "peak_after_load": torch.cuda.max_memory_allocated()}
    seen, read = set(), 0
    for m in engine.model.modules():
        if isinstance(m, QuantLinear) and id(m.qweight) not in seen:
            seen.add(id(m.qweight))
            read += sum(p.nbytes for p in m.parts)
        elif isinstance(m, QuantEmbedding):
            read += m.qweight.nbytes // m.num_embeddings  # one row
    read += sum(p.numel() * p.element_size() for p in engine.model.parameters())  # norms
    r["bytes_per_token"] = read
    for ctx in (128, 4096):
        r[f"tok_s_{ctx}"], r[f"device_tok_s_{ctx}"] = decode_speed(engine, ctx, 64)
    engine.runner.cuda_graphs = False
    r["tok_s_128_eager"] = decode_speed(engine, 128, 16)[0]
    r["peak_total"] = torch.cuda.max_memory_allocated()
    r["graphs"] = len(engine.runner.graphs)
    for ctx in (128, 4096):
        r[f"gbs_{ctx}"] = read * r[f"tok_s_{ctx}"] / GB
        r[f"frac_{ctx}"] = read * r[f"tok_s_{ctx}"] / copy_bw
    del engine
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.set_per_process_memory_fraction(1.0)
    return r


def peer(cfg: dict) -> dict:
    """transformers + bitsandbytes NF4 (what transformers' load_in_4bit builds: every decoder linear a Linear4bit,
    lm_head bf16) with all of cfg's layers, built in bf16 on the GPU (64 GB for Qwen3-32B: the H200 holds it) and
    quantized layer by layer; per-token time of batch-1 greedy generate, best of 3. Earlier runs timed 4-32 layers and
    extrapolated, but batch-1 generate is host-bound and the slopes moved from 0.19 to 2.1 ms per layer between runs."""
    import bitsandbytes as bnb
    import transformers

    hf_cfg = transformers.Qwen3Config(**cfg)
    with torch.device("cuda"):
        model = transformers.Qwen3ForCausalLM(hf_cfg).to(torch.bfloat16).eval()
    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for cname, child in list(parent.named_children()):
                if isinstance(child, torch.nn.Linear):
                    q = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                          compute_dtype=torch.bfloat16, quant_type="nf4")
                    q.weight = bnb.nn.Params4bit(child.weight.data, requires_grad=False, quant_type="nf4")
                    setattr(parent, cname, q.to("cuda"))
        gc.collect()
        torch.cuda.empty_cache()
    ids = torch.randint(0, 150000, (1, 128), device="cuda")
    _generate(model, ids, 8), _generate(model, ids, 8)  # CUDA / cuBLAS / bitsandbytes warm-up
    per_token = min(_generate(model, ids, 33) - _generate(model, ids, 1) for _ in range(3)) / 32
    del model
    gc.collect()
    torch.cuda.empty_cache()
    return {"layers": cfg["num_hidden_layers"], "per_token_s": per_token, "tok_s_64": 1 / per_token,
            "bnb": bnb.__version__, "transformers": transformers.__version__}


def _generate(model, ids: torch.Tensor, n: int) -> float:
    """Seconds for transformers' generate to produce exactly n tokens greedily."""
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)
    torch.cuda.synchronize()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", type=Path, default=Path("/tmp/qwen3-32b-awq-random"))
    ap.add_argument("--vram", type=float, default=24.0)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--no-peer", action="store_true")
    args = ap.parse_args()
    res = {"date": datetime.date.today().isoformat(), "card": torch.cuda.get_device_name(),
           "torch": torch.__version__}
    import triton

    res["triton"] = triton.__version__
    res["copy_bw"] = copy_bandwidth()
    print(f"{res['card']}, torch {res['torch']}, triton {res['triton']}; copy bandwidth "
          f"{res['copy_bw'] / GB:.0f} GB/s", flush=True)
    if not (args.dir / "config.json").exists():
        res["write_s"] = write_awq_checkpoint(args.dir, QWEN3_32B)
        print(f"wrote the AWQ-layout checkpoint in {res['write_s']:.0f}s", flush=True)
    res["ours"] = o = ours(args.dir, args.vram, res["copy_bw"])
    print(json.dumps(o, indent=1), flush=True)
    res["kernels"] = kernel_table(res["copy_bw"])
    if not args.no_peer:
        try:
            res["peer"] = peer(QWEN3_32B)
        except Exception as e:  # noqa: BLE001 (the peer is optional: report why it did not run)
            res["peer"] = {"error": f"{type(e).__name__}: {e}"}
    if args.json:
        args.json.write_text(json.dumps(res, indent=1, default=str))
    print_table(res)


def print_table(res: dict) -> None:
    o, gib = res["ours"], 1 << 30
    print(f"\n## {res['date']} {res['card']} (torch {res['torch']}, triton {res['triton']})")
    print("Qwen3-32B shapes, random weights, AWQ int4 g128 checkpoint (converted at load by quant_formats), "
          "embeddings and lm_head quantized to 8 bits at load")
    print("| metric | value |\n| --- | --- |")
    rows = [("copy bandwidth (read+write)", f"{res['copy_bw'] / GB:.0f} GB/s"),
            ("load time (plan + load + convert + KV pool)", f"{o['load_s']:.1f} s"),
            ("cap (--vram)", f"{o['cap'] / gib:.2f} GiB (context measured {o['context'] / gib:.2f} GiB)"),
            ("peak allocated after load / after decode", (f"{o['peak_after_load'] / gib:.2f} / "
                                                          f"{o['peak_total'] / gib:.2f} GiB (allocator limit "
                                                          f"{(o['cap'] - o['context']) / gib:.2f} GiB)")),
            ("weights planned / allocated", (f"{o['planned_weights'] / GB:.3f} / {o['allocated_weights'] / GB:.3f} "
                                             f"GB ({100 * (o['planned_weights'] / o['allocated_weights'] - 1):+.2f}%)")),
            ("KV pool", f"{o['kv_tokens']} tokens"),
            ("weight bytes read per token", f"{o['bytes_per_token'] / GB:.3f} GB")]
    for ctx in (128, 4096):
        rows.append((f"decode batch 1, context {ctx} (CUDA graphs)",
                     (f"{o[f'tok_s_{ctx}']:.1f} tok/s = {o[f'gbs_{ctx}']:.0f} GB/s = "
                      f"{100 * o[f'frac_{ctx}']:.0f}% of copy bandwidth; graph replays alone "
                      f"{o[f'device_tok_s_{ctx}']:.1f} tok/s = "
                      f"{100 * o['bytes_per_token'] * o[f'device_tok_s_{ctx}'] / res['copy_bw']:.0f}%")))
    rows.append(("decode batch 1, context 128, eager", f"{o['tok_s_128_eager']:.1f} tok/s"))
    p = res.get("peer", {})
    if "tok_s_64" in p:
        rows.append((f"peer: transformers {p['transformers']} + bitsandbytes {p['bnb']} NF4",
                     (f"{p['tok_s_64']:.2f} tok/s ({1e3 * p['per_token_s']:.1f} ms/token, all {p['layers']} layers, "
                      "context 128)")))
        rows.append(("ours / peer", f"{o['tok_s_128'] / p['tok_s_64']:.1f}x at context 128"))
    elif p:
        rows.append(("peer", p.get("error", "?")))
    for k, v in rows:
        print(f"| {k} | {v} |")
    print("\n| shape (M=1) | decode GEMV in a graph | GB/s | of copy bw | gemv4 (row-major) | fp32 kernel | "
          "bf16 cuBLAS GEMV | of copy bw | prefill M=512: dequant+cuBLAS / bf16 cuBLAS |\n"
          "| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in res["kernels"]:
        print(f"| {r['shape']} | {r['q_us']:.1f} us | {r['q_gbs']:.0f} | {100 * r['q_frac']:.0f}% | "
              f"{r['gemv4_us']:.1f} us | {r['fp32_us']:.1f} us | "
              f"{r['bf16_us']:.1f} us | {100 * r['bf16_frac']:.0f}% | {r['prefill512_ms']:.3f} / "
              f"{r['bf16_prefill512_ms']:.3f} ms |")


if __name__ == "__main__":
    main()
