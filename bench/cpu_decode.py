"""Decode speed of SmolLM2 on the CPU: OpenClaw's engine beside transformers' generate, same prompt, same run.

    python bench/cpu_decode.py [--tokens 128] [--dtypes float16,bfloat16,float32]

Both sides decode greedily, ignore eos, and are timed after one warm-up run; decode tok/s excludes the prompt.
"""

import argparse
import platform
import time

import torch

from openclaw.config import EngineConfig, SamplingParams
from openclaw.llm import LLM

PROMPT = "Write a short story about a robot who learns to paint."


def ours(dtype: str, n: int, reps: int) -> tuple[float, list[int]]:
    llm = LLM(EngineConfig(dtype=dtype))
    ids = llm.chat_ids([{"role": "user", "content": PROMPT}])
    one = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
    full = SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)
    llm.engine.generate([ids], full)  # warm-up
    best = 0.0
    for _ in range(reps):
        t0 = time.perf_counter()
        llm.engine.generate([ids], one)
        t1 = time.perf_counter()
        seq = llm.engine.generate([ids], full)[0]
        t2 = time.perf_counter()
        best = max(best, (n - 1) / ((t2 - t1) - (t1 - t0)))  # subtract prefill + first token
    return best, seq.output_ids, llm.model_dir, ids


def theirs(model_dir, ids: list[int], dtype: str, n: int, reps: int) -> tuple[float, list[int]]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype)).eval()
    x = torch.tensor([ids])
    kw = {"do_sample": False, "min_new_tokens": n, "pad_token_id": 0}
    with torch.inference_mode():
        model.generate(x, max_new_tokens=n, **kw)
        best = 0.0
        for _ in range(reps):
            t0 = time.perf_counter()
            model.generate(x, max_new_tokens=1, **kw | {"min_new_tokens": 1})
            t1 = time.perf_counter()
            out = model.generate(x, max_new_tokens=n, **kw)
            t2 = time.perf_counter()
            best = max(best, (n - 1) / ((t2 - t1) - (t1 - t0)))
    return best, out[0, len(ids):].tolist()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--dtypes", default="float16,bfloat16,float32")
    ap.add_argument("--hf-dtypes", default="float32,bfloat16")
    a = ap.parse_args()
    print(f"# {time.strftime('%Y-%m-%d')} {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}; {a.tokens} tokens greedy, best of {a.reps}")
    rows, ref = [], None
    for dt in a.dtypes.split(","):
        tps, toks, model_dir, ids = ours(dt, a.tokens, a.reps)
        rows.append((f"openclaw {dt}", tps, toks))
    for dt in a.hf_dtypes.split(","):
        tps, toks = theirs(model_dir, ids, dt, a.tokens, a.reps)
        rows.append((f"transformers {dt}", tps, toks))
        ref = ref or toks
    base = rows[-len(a.hf_dtypes.split(","))][1]
    print(f"{'engine':24} {'decode tok/s':>12} {'vs transformers ' + a.hf_dtypes.split(',')[0]:>26} "
          f"{'same tokens as it':>18}")
    for name, tps, toks in rows:
        same = sum(x == y for x, y in zip(toks, ref))
        print(f"{name:24} {tps:12.1f} {tps / base:25.2f}x {same:>10}/{len(ref)}")


if __name__ == "__main__":
    main()
