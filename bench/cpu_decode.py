"""SmolLM2 on the CPU, per dtype: prefill of a long prompt, batch-8 decode, batch-1 decode, and greedy agreement with
float32; beside transformers' generate on the same weights in the same run.

    python bench/cpu_decode.py [--dtypes float16,bfloat16,float32] [--prompt 2048] [--reps 2]

Greedy, eos ignored, one warm-up run each. Prefill tok/s: a prompt of --prompt random token ids over the time to its
first token. Decode tok/s: (tokens - 1) per sequence over the time of a full run minus a one-token run (so prefill and
the first token drop out); batch 8 decodes 8 chat prompts together. "same as float32": how many of the greedy tokens
equal the float32 engine's (batch 1, and all 8 sequences of batch 8). Uses only the engine API that the code before the
refactor also has, so `/work/oldvenv/bin/python bench/cpu_decode.py` measures that code the same way.
"""

import argparse
import platform
import time

import torch

from openclaw.config import EngineConfig, SamplingParams
from openclaw.llm import LLM

PROMPTS = ["Write a short story about a robot who learns to paint.", "What is the capital of France?",
           "Name three primary colors.", "Describe the sea in winter.", "Tell me a fact about the moon.",
           "Write a short poem about bread.", "Why do cats purr?", "Explain what a lighthouse does."]


def best_of(reps: int, fn) -> float:
    fn()  # warm-up
    return min(_timed(fn) for _ in range(reps))


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def decode_rate(engine, prompts: list[list[int]], n: int, reps: int) -> tuple[float, list[list[int]]]:
    """(decode tok/s of all sequences together, their greedy outputs)."""
    full = SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)
    one = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
    outs = []
    t_full = best_of(reps, lambda: outs.append([s.output_ids for s in engine.generate(prompts, full)]))
    t_one = best_of(reps, lambda: engine.generate(prompts, one))
    return len(prompts) * (n - 1) / (t_full - t_one), outs[-1]


def ours(dtype: str, args) -> dict:
    llm = LLM(EngineConfig(dtype=dtype, max_seqs=8))
    engine = llm.engine
    chats = [llm.chat_ids([{"role": "user", "content": p}]) for p in PROMPTS]
    vocab = engine.model.config.vocab_size
    long = torch.randint(0, vocab, (args.prompt,), generator=torch.Generator().manual_seed(0)).tolist()
    one = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
    r = {"prefill": args.prompt / best_of(args.reps, lambda: engine.generate([long], one))}
    r["batch8"], r["out8"] = decode_rate(engine, chats, args.tokens8, args.reps)
    r["batch1"], out1 = decode_rate(engine, chats[:1], args.tokens, args.reps)
    r["out1"] = out1[0]
    return r | {"model_dir": llm.model_dir, "ids": chats[0]}


def theirs(model_dir, ids: list[int], n: int, reps: int) -> tuple[float, list[int]]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    x = torch.tensor([ids])
    kw = {"do_sample": False, "pad_token_id": 0}
    out = []
    with torch.inference_mode():
        t_full = best_of(reps, lambda: out.append(model.generate(x, max_new_tokens=n, min_new_tokens=n, **kw)))
        t_one = best_of(reps, lambda: model.generate(x, max_new_tokens=1, min_new_tokens=1, **kw))
    return (n - 1) / (t_full - t_one), out[-1][0, len(ids):].tolist()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtypes", default="float16,bfloat16,float32")
    ap.add_argument("--prompt", type=int, default=2048, help="prefill prompt length")
    ap.add_argument("--tokens", type=int, default=128, help="batch-1 decode tokens")
    ap.add_argument("--tokens8", type=int, default=64, help="batch-8 decode tokens per sequence")
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--no-hf", action="store_true")
    args = ap.parse_args()
    print(f"# {time.strftime('%Y-%m-%d %H:%M')} {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}; best of {args.reps}", flush=True)
    rows = {dt: ours(dt, args) for dt in args.dtypes.split(",")}
    ref = rows.get("float32")
    print(f"{'engine':22} {'prefill tok/s':>14} {'batch-8 tok/s':>14} {'batch-1 tok/s':>14} "
          f"{'same as float32 (batch 1, batch 8)':>36}")
    for dt, r in rows.items():
        same = "" if ref is None else (
            f"{sum(a == b for a, b in zip(r['out1'], ref['out1']))}/{len(ref['out1'])}, "
            f"{sum(a == b for x, y in zip(r['out8'], ref['out8']) for a, b in zip(x, y))}/"
            f"{sum(len(x) for x in ref['out8'])}")
        print(f"openclaw {dt:13} {r['prefill']:14.1f} {r['batch8']:14.1f} {r['batch1']:14.1f} {same:>36}",
              flush=True)
    if not args.no_hf:
        some = next(iter(rows.values()))
        tps, toks = theirs(some["model_dir"], some["ids"], args.tokens, args.reps)
        same = "" if ref is None else f"{sum(a == b for a, b in zip(toks, ref['out1']))}/{len(toks)}"
        print(f"{'transformers float32':22} {'':>14} {'':>14} {tps:14.1f} {same:>36}")


if __name__ == "__main__":
    main()
