"""Throughput at one VRAM cap: as many concurrent generations as the KV pool holds, with full attention and with
eviction at a budget (TriAttention with online statistics, SnapKV): sequences at once and aggregate tokens/s.

    python bench/gpu_throughput.py [--model Qwen3-32B] [--vram 24] [--tokens 8192] [--budget 2048] [--json F]

Each policy gets its own engine under the same cap and as many sequences as its pool holds (full attention: prompt +
tokens slots each; eviction: budget + divide_length), at most --max-seqs. --device cpu runs it on a CPU (the tests use
tiny shapes).
"""

import argparse
import gc
import json
from dataclasses import asdict
from pathlib import Path

import torch
from gpu_decode import model_dir_for

from openclaw.config import EngineConfig, EvictionConfig
from openclaw.engine.engine import Engine
from openclaw.eval import speed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="Qwen3-32B")
    ap.add_argument("--vram", type=float, default=24.0)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--kv-tokens", type=int)
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--budget", type=int, default=2048)
    ap.add_argument("--divide-length", type=int, default=128)
    ap.add_argument("--protect-recent", type=int, default=128)
    ap.add_argument("--policies", default="full,triattention,snapkv")
    ap.add_argument("--max-seqs", type=int, default=32)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--cache", type=Path, default=Path("/tmp/openclaw-bench"))
    args = ap.parse_args()
    model_dir = model_dir_for(args.model, args.device, args.cache)
    res = {"model": args.model, "tokens": args.tokens, "runs": []}
    for policy in args.policies.split(","):
        evict = EvictionConfig(policy="full") if policy == "full" else EvictionConfig(
            policy=policy, budget=args.budget, stats="auto" if policy == "triattention" else None,
            divide_length=args.divide_length, protect_recent=args.protect_recent)
        engine = Engine(model_dir, EngineConfig(device=args.device, vram=args.vram, kv_tokens=args.kv_tokens,
                                                max_seqs=args.max_seqs, evict=evict))
        ev = engine.evict  # made concrete for the pool
        per_seq = min(args.prompt + args.tokens, ev.budget + ev.divide_length) if ev.evicts else args.prompt + args.tokens
        seqs = max(1, min(args.max_seqs, engine.pool.num_slots // per_seq))
        run = {"policy": policy, "kv_tokens": engine.pool.num_slots, "slots_per_seq": per_seq,
               **asdict(speed.throughput(engine, seqs, args.tokens, args.prompt))}
        print(json.dumps(run), flush=True)
        res["runs"].append(run)
        del engine
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
            torch.cuda.set_per_process_memory_fraction(1.0)
    base = res["runs"][0]["tok_s"]
    print(f"\n| policy | KV pool | sequences at once | tokens | tok/s | vs {res['runs'][0]['policy']} | evictions | "
          "peak GiB |\n| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in res["runs"]:
        peak = "" if r["peak_gib"] is None else f"{r['peak_gib']:.2f}"
        print(f"| {r['policy']} | {r['kv_tokens']} | {r['most_at_once']} | {r['tokens']} | {r['tok_s']:.1f} | "
              f"{r['tok_s'] / base:.2f}x | {r['evictions']} | {peak} |")
    if args.json:
        args.json.write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
