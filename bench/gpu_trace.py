"""A long reasoning trace under the VRAM cap: one sequence generates --tokens tokens with TriAttention eviction
(offline statistics calibrated on the model first, or online ones), or with full attention, which must stop clearly
where its KV pool ends. Prints tok/s over the first and the last window of tokens, peak allocated memory against the
cap, evictions and their share of the decode time.

    python bench/gpu_trace.py [--model Qwen3-32B] [--vram 24] [--tokens 32768] [--mode offline|auto|full] [--json F]

One mode per call (a 32K trace is minutes on an H100). --device cpu runs it on a CPU (the tests use tiny shapes).
"""

import argparse
import json
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch
from gpu_decode import model_dir_for

from openclaw.config import EngineConfig, EvictionConfig
from openclaw.engine.engine import Engine
from openclaw.errors import OpenClawError
from openclaw.eval import speed
from openclaw.evict.calibrate import calibrate
from openclaw.evict.compressor import Compressor
from openclaw.evict.stats_file import model_metadata, save_stats


def offline_stats(engine: Engine, tokens: int, path: Path) -> float:
    """Calibrate on `tokens` random ids with the engine's model into path; seconds taken."""
    t0 = time.perf_counter()
    mc = engine.model.config
    ids = torch.randint(0, mc.vocab_size, (tokens,), generator=torch.Generator().manual_seed(3)).tolist()
    # contexts of 1,024 tokens in chunks of 256: calibration's own KV pool and activations must fit beside the
    # engine's, which took the cap (4,096-token contexts in the engine's chunk size ran out of memory on an H100)
    stats = calibrate(engine.model, ids, context=min(1024, tokens), chunk=256)
    save_stats(path, stats.tri_stats(engine.model.bands.omega), model_metadata(engine.model, "bench"), stats.tokens)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="Qwen3-32B")
    ap.add_argument("--vram", type=float, default=24.0)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--kv-tokens", type=int)
    ap.add_argument("--tokens", type=int, default=32768)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--window", type=int, default=1024, help="tokens of the first / last rate")
    ap.add_argument("--mode", choices=("offline", "auto", "full"), default="offline")
    ap.add_argument("--budget", type=int, default=2048)
    ap.add_argument("--divide-length", type=int, default=128)
    ap.add_argument("--protect-recent", type=int, default=128)
    ap.add_argument("--calibration-tokens", type=int, default=8192)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--cache", type=Path, default=Path("/tmp/openclaw-bench"))
    args = ap.parse_args()
    cuda = args.device.startswith("cuda")
    policy = "full" if args.mode == "full" else "triattention"
    evict = EvictionConfig(policy="full") if policy == "full" else EvictionConfig(
        policy=policy, budget=args.budget, stats="auto", divide_length=args.divide_length,
        protect_recent=args.protect_recent)
    t0 = time.perf_counter()
    engine = Engine(model_dir_for(args.model, args.device, args.cache),
                    EngineConfig(device=args.device, vram=args.vram, kv_tokens=args.kv_tokens, max_seqs=1, evict=evict))
    res = {"model": args.model, "mode": args.mode, "budget": args.budget if policy != "full" else None,
           "load_s": time.perf_counter() - t0, "kv_tokens": engine.pool.num_slots,
           "card": torch.cuda.get_device_name() if cuda else "cpu"}
    if engine.plan is not None:
        res["cap_gib"] = engine.plan.cap / 2**30
        res["allocator_limit_gib"] = (engine.plan.cap - engine.plan.context - engine.plan.graph_overhead) / 2**30
    with tempfile.TemporaryDirectory() as tmp:
        if args.mode == "offline":  # the compressor of the same engine, now with statistics from a file
            path = Path(tmp) / "stats.pt"
            res["calibration_s"] = offline_stats(engine, args.calibration_tokens, path)
            engine.evict = replace(engine.evict, stats=str(path))
            engine.compressor = Compressor.for_model(engine.evict, engine.model, engine.pool, 1)
        tokens = args.tokens
        if args.mode == "full":
            try:
                speed.trace(engine, tokens, args.prompt, args.window)
            except OpenClawError as e:  # the clear stop: refused at admission, with the numbers
                res["refused"] = str(e)
                tokens = engine.max_new_tokens(args.prompt)  # what the pool holds: run to its end
        res["trace"] = asdict(speed.trace(engine, tokens, args.prompt, args.window))
    t = res["trace"]
    print(json.dumps(res, indent=1))
    print(f"\n| {args.model}, {args.mode} | value |\n| --- | --- |")
    rows = [("tokens generated", f"{t['tokens']} ({t['finish_reason']})"),
            (f"tok/s first {args.window} / last {args.window}",
             f"{t['first_tok_s']:.1f} / {t['last_tok_s']:.1f} ({100 * t['last_tok_s'] / t['first_tok_s']:.0f}%)"),
            ("evictions, their share of decode time", f"{t['evictions']}, {100 * t['eviction_share']:.2f}%"),
            ("decode time", f"{t['seconds']:.1f} s")]
    if t["peak_gib"] is not None:
        limits = f"{res['allocator_limit_gib']:.2f} / {res['cap_gib']:.2f}"
        rows.append(("peak allocated / allocator limit / cap", f"{t['peak_gib']:.2f} / {limits} GiB"))
    if "refused" in res:
        rows.insert(0, (f"{args.tokens} tokens with full attention", res["refused"]))
    for k, v in rows:
        print(f"| {k} | {v} |")
    if args.json:
        args.json.write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
