"""Batch mode vs one prompt at a time: the same 32 prompts, greedy, same engine, tokens per second of each.

    python bench/batch_vs_serial.py [--model M] [--prompts 32] [--max-tokens 64] [--max-seqs 32] [--reps 2]

Batch = every prompt submitted together (what `openclaw run --jsonl` does): decode steps are shared, up to
--max-seqs sequences per forward. Serial = each prompt run alone to completion, one after another. Both count
generated tokens over wall time including prefill; the best of --reps runs of each, alternated so that load
from other processes hits both alike. The answers must be identical (greedy, fp32 on CPU).
"""

import argparse
import time

import torch

from openclaw.config import EngineConfig, SamplingParams
from openclaw.llm import LLM, Request

TOPICS = ["the moon", "a cat", "rain", "the sea", "bread", "a robot", "winter", "a library", "music", "a bicycle",
          "trees", "the desert", "a lighthouse", "coffee", "a clock", "mountains"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="SmolLM2-135M-Instruct")
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--max-seqs", type=int, default=32)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--reps", type=int, default=2)
    args = ap.parse_args()

    llm = LLM(EngineConfig(model=args.model, device="cpu", dtype=args.dtype, max_seqs=args.max_seqs))
    params = SamplingParams(temperature=0, max_tokens=args.max_tokens, ignore_eos=True)
    asks = ["Write a few sentences about", "Describe", "Tell me a fact about", "Write a short poem about"]
    requests = [Request(llm.chat_ids([{"role": "user", "content": f"{asks[i // 16 % 4]} {TOPICS[i % 16]}."}]),
                        params) for i in range(args.prompts)]
    llm.generate(requests[:2])  # warm-up

    best = {"batch": 0.0, "serial": 0.0}
    for _ in range(args.reps):
        t0 = time.perf_counter()
        batch = llm.generate(requests)
        tokens = sum(c.completion_tokens for c in batch)
        best["batch"] = max(best["batch"], tokens / (time.perf_counter() - t0))
        t0 = time.perf_counter()
        serial = [llm.generate([r])[0] for r in requests]
        best["serial"] = max(best["serial"], sum(c.completion_tokens for c in serial) / (time.perf_counter() - t0))
    same = sum(a.text == b.text for a, b in zip(batch, serial))
    print(f"{args.prompts} prompts x {args.max_tokens} tokens, {llm.model_dir.name}, {args.dtype}, "
          f"{torch.get_num_threads()} threads, max_seqs {args.max_seqs}, best of {args.reps}")
    print(f"serial (one at a time): {best['serial']:7.1f} tok/s")
    print(f"batch  (one batch):     {best['batch']:7.1f} tok/s  ({best['batch'] / best['serial']:.1f}x)")
    print(f"identical answers: {same}/{len(requests)}")


if __name__ == "__main__":
    main()
