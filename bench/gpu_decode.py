"""GPU decode and prefill benchmark: our 4-bit engine under a VRAM cap, by batch size and context, against
transformers + bitsandbytes in the same run, plus per-shape kernel timings (decode GEMV, prefill GEMM).

    python bench/gpu_decode.py [--model Qwen3-32B] [--vram 24] [--json out.json]

The model is a manifest model's real shapes with random weights in its format's layout (openclaw.weights.synthetic:
nothing is read from disk; decode speed does not depend on the values), or --awq DIR: a random checkpoint written
in Qwen/Qwen3-32B-AWQ's on-disk layout and converted at load (the user's load path). Prints and logs: load time, peak
allocated vs the cap, planned vs allocated weights, bytes read per token, decode tok/s for every (context, batch
size) through the engine (CUDA graphs) with the graph-replay-only rate beside it, prefill tok/s, the graphs' memory,
the per-shape kernel table, and the peer (every decoder linear a bitsandbytes NF4 Linear4bit) at batch 1 and 8.
--device cpu --no-peer --no-kernels runs the engine part on a CPU (the test suite smoke-tests it on tiny shapes).
"""

import argparse
import datetime
import gc
import json
import time
from dataclasses import asdict
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from openclaw.config import EngineConfig
from openclaw.engine.engine import Engine
from openclaw.engine.memory import loaded_bytes
from openclaw.eval import speed
from openclaw.weights.hub import load_quantize, manifest_entry
from openclaw.weights.synthetic import loaded_format, synthetic_dir

AWQ = {"quant_method": "awq", "bits": 4, "group_size": 128, "version": "gemm", "zero_point": True}
GB = 1e9


def model_dir_for(model: str, device: str, cache: Path) -> Path:
    """A model directory: random weights of a manifest model's shapes in the layout its format loads into on this
    device (a GGUF is dequantized on a CPU), or the given directory itself."""
    entry = manifest_entry(model)
    if entry is None:
        return Path(model)
    fmt = loaded_format(entry.format, load_quantize(entry.name, "auto", device.startswith("cuda")))
    return synthetic_dir(cache, f"{entry.name}-{fmt.replace('>', '')}", entry.raw_config, fmt)


def write_awq_checkpoint(path: Path, cfg: dict) -> float:
    """Random AWQ GEMM tensors (random int32 words are valid packings of random 4-bit codes); seconds taken."""
    t0 = time.perf_counter()
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps({**cfg, "architectures": ["Qwen3ForCausalLM"],
                                                  "quantization_config": AWQ}))
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


def kernel_table(copy_bw: float, shapes: list[tuple[str, int, int]]) -> list[dict]:
    """Each linear shape alone in bf16: the decode GEMV of one row in a CUDA graph (4-bit: the tensor-core kernel on
    the tiled weight the loader makes, gate_up with its SiLU epilogue; 8-bit: the fp32 kernel) against bf16 cuBLAS;
    and the prefill GEMM (kernels/qgemm.py) at 512 and 4096 rows against a bf16 cuBLAS GEMM of the same shape and
    against the path it replaced (dequantize the weight to bf16, then cuBLAS), with the autotuner's choice."""
    from openclaw.kernels import qlinear as ql
    from openclaw.kernels.qgemm import _qgemm_kernel
    from triton.testing import do_bench

    rows = []
    for name, n, k in shapes:
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k ** 0.5
        qw = ql.quantize_rtn(w, 8 if "lm_head" in name else 4, 128)
        x1 = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
        copies = [qw] + [ql.QuantWeight(qw.qweight.clone(), qw.scales.clone(), qw.offsets.clone(), None, qw.bits,
                                        qw.group, qw.shape) for _ in range(max(1, (200 << 20) // qw.nbytes))]
        if name == "gate_up":  # as decode runs it: rows interleaved, SiLU-mul in the GEMV's epilogue
            us_q = graph_us(partial(ql.qgemv, x1, silu=True), [ql.tile(ql.interleave_gate_up(c)) for c in copies])
        else:
            us_q = graph_us(partial(ql.qgemv, x1), [ql.tile(c) for c in copies])
        del copies
        qw = ql.tile(qw)
        r = {"shape": f"{name} {k}->{n}", "gemv_us": us_q, "gemv_frac": qw.nbytes / (us_q / 1e6) / copy_bw,
             "bf16_gemv_us": 1e3 * do_bench(partial(F.linear, x1, w), warmup=25, rep=100, return_mode="median")}
        for m in (512, 4096):
            xp = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            r[f"gemm{m}_ms"] = do_bench(partial(ql.qlinear_triton, xp, qw), warmup=10, rep=50, return_mode="median")
            r[f"gemm{m}_config"] = str(_qgemm_kernel.best_config)
            r[f"bf16_{m}_ms"] = do_bench(partial(F.linear, xp, w), warmup=10, rep=50, return_mode="median")
            r[f"dequant_cublas{m}_ms"] = do_bench(partial(_dequant_cublas, xp, qw), warmup=10, rep=50,
                                                  return_mode="median")
        rows.append(r)
        del w, qw
        torch.cuda.empty_cache()
    return rows


def _dequant_cublas(x: torch.Tensor, qw) -> torch.Tensor:
    """The prefill path kernels/qgemm.py replaced: the whole weight dequantized to bf16, then cuBLAS."""
    from openclaw.kernels.qlinear import dequantize

    return F.linear(x, dequantize(qw, torch.bfloat16))


def device_rate(engine: Engine, batch: int, context: int, steps: int = 64) -> float | None:
    """Tokens/s of the (batch, context) step's captured graph replayed back to back, no host work between: the
    device-bound rate (the difference to the engine's rate is the host's share: staging, sampling, scheduling)."""
    graphs = engine.runner.graphs
    if graphs is None or not graphs.capture:
        return None
    key = (*graphs.bucket(batch, context + 2), 0)
    step = graphs.steps.get(key)
    if step is None or step.graph is None:
        return None
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(steps):
        step.graph.replay()  # the last staged step again (a padded-free repeat of its rows and slots)
    b.record()
    b.synchronize()
    return batch * steps / (a.elapsed_time(b) / 1e3)


def bytes_per_token(engine: Engine) -> int:
    """Weight bytes one decode step reads: every linear weight, the norms, one embedding row."""
    from openclaw.models.layers import QuantEmbedding, QuantLinear

    seen, read = set(), 0
    for m in engine.model.modules():
        if isinstance(m, QuantLinear) and id(m.qweight) not in seen:
            seen.add(id(m.qweight))
            read += sum(p.nbytes for p in m.parts)
        elif isinstance(m, QuantEmbedding):
            read += m.qweight.nbytes // m.num_embeddings
    return read + sum(p.numel() * p.element_size() for p in engine.model.parameters())


def ours(model_dir: Path, args) -> dict:
    cuda = args.device.startswith("cuda")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    engine = Engine(model_dir, EngineConfig(model=str(model_dir), device=args.device, vram=args.vram,
                                            max_seqs=max(args.batch_sizes), kv_tokens=args.kv_tokens))
    if cuda:
        torch.cuda.synchronize()
    r = {"load_s": time.perf_counter() - t0, "allocated_weights": loaded_bytes(engine.model),
         "kv_tokens": engine.pool.num_slots, "bytes_per_token": bytes_per_token(engine)}
    if engine.plan is not None:
        r |= {"cap": engine.plan.cap, "context": engine.plan.context, "planned_weights": engine.plan.weights,
              "planned_graphs": engine.plan.graphs + engine.plan.graph_overhead,
              "peak_after_load": torch.cuda.max_memory_allocated()}
        free0, reserved0 = torch.cuda.mem_get_info()[0], torch.cuda.memory_reserved()
    r["prefill"] = [asdict(speed.prefill(engine, n, args.reps)) for n in args.prompts]
    r["decode"] = []
    for ctx in args.contexts:
        for b in args.batch_sizes:
            row = asdict(speed.decode(engine, b, ctx, args.steps, args.reps))
            row["device_tok_s"] = device_rate(engine, b, ctx) if row["tok_s"] else None
            r["decode"].append(row)
            print(json.dumps(row), flush=True)
    if engine.runner.graphs is not None:
        r["graphs"] = len(engine.runner.graphs.steps)
    if engine.plan is not None:
        free1, reserved1 = torch.cuda.mem_get_info()[0], torch.cuda.memory_reserved()
        # what the card lost beyond PyTorch's own growth: the captured graphs' driver memory
        r["graph_driver_bytes"] = (free0 - free1) - (reserved1 - reserved0)
        r["peak_total"] = torch.cuda.max_memory_allocated()
        r["eager_tok_s_128"] = eager_rate(engine)
    del engine
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.set_per_process_memory_fraction(1.0)
    return r


def eager_rate(engine: Engine) -> float | None:
    """Batch-1 decode at context 128 with every step dynamic (no graphs), for the graphs' gain."""
    from openclaw.engine.runner import Runner

    graphed = engine.runner
    engine.runner = Runner(engine.model, engine.pool, engine.device)
    try:
        return speed.decode(engine, 1, 128, 16).tok_s
    finally:
        engine.runner = graphed


def peer(cfg: dict, batches: list[int]) -> dict:
    """transformers + bitsandbytes NF4 (what transformers' load_in_4bit builds: every decoder linear a Linear4bit,
    lm_head bf16) with all of cfg's layers, built in bf16 on the GPU (64 GB for Qwen3-32B: an H200 holds it, an H100
    barely) and quantized layer by layer; per-step time of greedy generate at each batch size (128-token prompts),
    best of 3."""
    import bitsandbytes as bnb
    import transformers

    hf_cfg = transformers.Qwen3Config(**{k: v for k, v in cfg.items() if k != "quantization_config"})
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
    out = {"layers": cfg["num_hidden_layers"], "bnb": bnb.__version__, "transformers": transformers.__version__}
    for b in batches:
        ids = torch.randint(0, 150000, (b, 128), device="cuda")
        _generate(model, ids, 8), _generate(model, ids, 8)  # CUDA / cuBLAS / bitsandbytes warm-up
        per_step = min(_generate(model, ids, 33) - _generate(model, ids, 1) for _ in range(3)) / 32
        out[f"batch{b}_tok_s"] = b / per_step
    del model
    gc.collect()
    torch.cuda.empty_cache()
    return out


def _generate(model, ids: torch.Tensor, n: int) -> float:
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)
    torch.cuda.synchronize()
    return time.perf_counter() - t0


def _ints(s: str) -> list[int]:
    return [int(v) for v in s.split(",")]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="Qwen3-32B",
                    help="a manifest model (random weights of its shapes) or a model directory (its own weights)")
    ap.add_argument("--awq", type=Path, help="write (once) and load a random AWQ-layout checkpoint in this directory")
    ap.add_argument("--vram", type=float, default=24.0)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--kv-tokens", type=int)
    ap.add_argument("--batch-sizes", type=_ints, default=[1, 2, 4, 8, 16])
    ap.add_argument("--contexts", type=_ints, default=[128, 4096])
    ap.add_argument("--prompts", type=_ints, default=[512, 4096], help="prefill prompt lengths")
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--reps", type=int, default=1)
    ap.add_argument("--peer-batches", type=_ints, default=[1, 8])
    ap.add_argument("--json", type=Path)
    ap.add_argument("--no-peer", action="store_true")
    ap.add_argument("--no-kernels", action="store_true")
    ap.add_argument("--cache", type=Path, default=Path("/tmp/openclaw-bench"))
    args = ap.parse_args()
    cuda = args.device.startswith("cuda")
    entry = manifest_entry(args.model)
    res = {"date": datetime.date.today().isoformat(), "torch": torch.__version__,
           "model": entry.name if entry else Path(args.model).name}
    if cuda:
        import triton

        res |= {"card": torch.cuda.get_device_name(), "triton": triton.__version__, "copy_bw": copy_bandwidth()}
        print(f"{res['card']}, torch {res['torch']}, triton {res['triton']}; copy bandwidth "
              f"{res['copy_bw'] / GB:.0f} GB/s", flush=True)
    if entry is not None and args.awq:
        if not (args.awq / "config.json").exists():
            res["write_s"] = write_awq_checkpoint(args.awq, entry.raw_config)
        model_dir = args.awq
    else:
        model_dir = model_dir_for(args.model, args.device, args.cache)
    res["ours"] = ours(model_dir, args)
    if cuda and not args.no_kernels and entry is not None:
        c = entry.config
        h, d, inter = c["hidden_size"], c["head_dim"], c["intermediate_size"]
        q, kv = c["num_attention_heads"] * d, c["num_key_value_heads"] * d
        res["kernels"] = kernel_table(res["copy_bw"], [("qkv", q + 2 * kv, h), ("o_proj", h, q),
                                                       ("gate_up", 2 * inter, h), ("down", h, inter),
                                                       ("lm_head 8-bit", c["vocab_size"], h)])
    if cuda and not args.no_peer and entry is not None:
        try:
            res["peer"] = peer(entry.raw_config, args.peer_batches)
        except Exception as e:  # noqa: BLE001 (the peer is optional: report why it did not run)
            res["peer"] = {"error": f"{type(e).__name__}: {e}"}
    if args.json:
        args.json.write_text(json.dumps(res, indent=1, default=str))
    print_tables(res)


def print_tables(res: dict) -> None:
    o, gib = res["ours"], 1 << 30
    bw = res.get("copy_bw")
    print(f"\n## {res['date']} {res.get('card', 'CPU')} (torch {res['torch']}, triton {res.get('triton', '-')}), "
          f"{res['model']} shapes, random weights")
    print("| metric | value |\n| --- | --- |")
    rows = [("load time", f"{o['load_s']:.1f} s"), ("KV pool", f"{o['kv_tokens']} tokens"),
            ("weight bytes read per token", f"{o['bytes_per_token'] / GB:.3f} GB")]
    if "cap" in o:
        rows += [("cap (--vram)", f"{o['cap'] / gib:.2f} GiB (context measured {o['context'] / gib:.2f} GiB)"),
                 ("peak allocated after load / after the runs", (
                     f"{o['peak_after_load'] / gib:.2f} / {o['peak_total'] / gib:.2f} GiB (allocator limit "
                     f"{(o['cap'] - o['context']) / gib:.2f} GiB)")),
                 ("weights planned / allocated",
                  f"{o['planned_weights'] / GB:.3f} / {o['allocated_weights'] / GB:.3f} GB"),
                 ("decode graphs: captured, driver memory each (measured), planned in all", (
                     f"{o.get('graphs', 0)}, {o['graph_driver_bytes'] / max(o.get('graphs', 0), 1) / 2**20:.2f} "
                     f"MiB, {o['planned_graphs'] / gib:.2f} GiB")),
                 ("decode batch 1, context 128, no graphs", f"{o['eager_tok_s_128']:.1f} tok/s")]
    for p in o["prefill"]:
        rows.append((f"prefill {p['context']} tokens", "-" if p["tok_s"] is None else f"{p['tok_s']:.0f} tok/s"))
    p = res.get("peer", {})
    for k, v in p.items():
        if k.endswith("_tok_s"):
            rows.append((f"peer: transformers {p['transformers']} + bitsandbytes {p['bnb']} NF4, {k[:-6]}",
                         f"{v:.2f} tok/s"))
    if "error" in p:
        rows.append(("peer", p["error"]))
    for k, v in rows:
        print(f"| {k} | {v} |")
    print("\n| context | batch | tok/s | ms/step | graph replays alone | of copy bw (weights, batch 1) | vs batch 1 |"
          "\n| --- | --- | --- | --- | --- | --- | --- |")
    base = {}
    for r in o["decode"]:
        if r["tok_s"] is None:
            print(f"| {r['context']} | {r['batch']} | - | | | | {r['note']} |")
            continue
        base.setdefault(r["context"], r["tok_s"] if r["batch"] == 1 else None)
        frac = f"{100 * o['bytes_per_token'] * r['tok_s'] / bw:.0f}%" if bw and r["batch"] == 1 else ""
        dev = f"{r['device_tok_s']:.1f}" if r.get("device_tok_s") else ""
        ratio = f"{r['tok_s'] / base[r['context']]:.2f}x" if base.get(r["context"]) else ""
        print(f"| {r['context']} | {r['batch']} | {r['tok_s']:.1f} | {r['ms_per_step']:.2f} | {dev} | {frac} | "
              f"{ratio} |")
    if "kernels" in res:
        print("\n| shape | GEMV 1 row (graph) | of copy bw | bf16 cuBLAS GEMV | GEMM 512 / bf16 / dequant+cuBLAS "
              "| GEMM 4096 / bf16 / dequant+cuBLAS | GEMM config (4096) |\n| --- | --- | --- | --- | --- | --- | --- |")
        for r in res["kernels"]:
            print(f"| {r['shape']} | {r['gemv_us']:.1f} us | {100 * r['gemv_frac']:.0f}% | {r['bf16_gemv_us']:.1f} us | "
                  f"{r['gemm512_ms']:.3f} / {r['bf16_512_ms']:.3f} / {r['dequant_cublas512_ms']:.3f} ms | "
                  f"{r['gemm4096_ms']:.3f} / {r['bf16_4096_ms']:.3f} / {r['dequant_cublas4096_ms']:.3f} ms | "
                  f"{r['gemm4096_config']} |")


if __name__ == "__main__":
    main()
