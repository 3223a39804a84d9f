"""Dormant-needle retrieval under eviction: a fact planted early in long filler, asked for ~1K tokens later.

Scored by teacher forcing the answer: its log-probability and exact match (every answer token is the argmax, so
greedy decoding would produce it). Controls, per DESIGN.md: the same haystack without the needle (what the model
guesses from nothing) and the right haystack asked about a name that is not in it (copying "some number" rather
than retrieving). The haystack is treated as a generated trace (nothing pinned), so eviction can drop the needle.
"""

import random
from dataclasses import dataclass

import torch

from openclaw.config import EvictionConfig
from openclaw.eval.fidelity import FULL, forced_logprobs
from openclaw.evict.evictor import TriStats
from openclaw.evict.query_stats import QueryStats

NAMES = ["Adelaide", "Bartholomew", "Cornelius", "Dorothea", "Ezekiel", "Florentine", "Gwendolyn", "Horatio",
         "Isadora", "Jedediah", "Leopold", "Millicent", "Octavia", "Percival", "Rosalind", "Thaddeus"]


@dataclass
class Case:
    """One haystack: token ids before the question, the question, the answer, and the controls' question."""

    haystack: list[int]
    bare: list[int]  # the same haystack without the needle
    question: list[int]
    wrong_question: list[int]  # asks about a name that is not in the haystack
    answer: list[int]
    needle_pos: int


def build_cases(tokenizer, filler: list[int], count: int, needle_at: int = 64, dormancy: int = 1024,
                seed: int = 0) -> list[Case]:
    """count cases: filler[off:off + needle_at] + needle + filler[...dormancy] + question; special tokens never
    added (pieces are encoded separately and concatenated)."""
    rng = random.Random(seed)
    enc = tokenizer.encode  # add_special_tokens=False by default
    cases = []
    for i in range(count):
        name, wrong = rng.sample(NAMES, 2)
        code = str(rng.randint(1000, 9999))
        off = (i * (len(filler) - needle_at - dormancy)) // max(count, 1)
        before, after = filler[off:off + needle_at], filler[off + needle_at:off + needle_at + dormancy]
        needle = enc(f" The secret code of {name} is {code}. Remember it: {code}. ")
        ask = "\n\nQuestion: What is the secret code of {}?\nAnswer: The secret code of {} is"
        cases.append(Case(before + needle + after, before + after, enc(ask.format(name, name)),
                          enc(ask.format(wrong, wrong)), enc(f" {code}"), len(before)))
    return cases


def answer_score(model, context: list[int], answer: list[int], cfg: EvictionConfig,
                 stats: TriStats | None, online: QueryStats | None = None) -> tuple[float, bool]:
    """(log p(answer | context), every answer token is the argmax) under cfg's eviction."""
    ids = context + answer
    logp, _ = forced_logprobs(model, ids, cfg, stats, start=len(context) - 1, online=online)
    target = torch.tensor(answer)
    return logp.gather(1, target[:, None]).sum().item(), bool((logp.argmax(-1) == target).all())


def run_needles(model, cases: list[Case], runs: list[tuple[str, EvictionConfig]], stats: TriStats | None = None,
                progress=None, online: QueryStats | None = None) -> list[dict]:
    """Per run: exact-match rate and mean answer log-prob with the needle, and on the wrong-name control; the
    no-needle control is measured once with full attention: the model's prior for the answer. It is no floor for an
    evicting run: a partly kept needle can lead to a confident wrong answer, below the prior. progress(what, tokens
    done, tokens) after each case."""
    rows = []
    forced = [len(c.haystack + c.question) + len(c.haystack + c.wrong_question) + 2 * len(c.answer) for c in cases]
    total = sum(len(c.bare + c.question + c.answer) for c in cases) + len(runs) * sum(forced)
    bare = [answer_score(model, c.bare + c.question, c.answer, FULL, None)[0] for c in cases]
    done = total - len(runs) * sum(forced)
    for label, cfg in runs:
        hit, lp, wrong_hit, wrong_lp = 0, 0.0, 0, 0.0
        for i, c in enumerate(cases):
            a, ok = answer_score(model, c.haystack + c.question, c.answer, cfg, stats, online)
            b, wrong_ok = answer_score(model, c.haystack + c.wrong_question, c.answer, cfg, stats, online)
            done += forced[i]
            if progress:
                progress(f"{label}: case {i + 1}/{len(cases)}", done, total)
            hit, lp, wrong_hit, wrong_lp = hit + ok, lp + a, wrong_hit + wrong_ok, wrong_lp + b
        n = len(cases)
        rows.append({"label": label, "policy": cfg.policy, "budget": cfg.budget if cfg.evicts else None,
                     "exact": hit / n, "logp": lp / n, "wrong_name_exact": wrong_hit / n,
                     "wrong_name_logp": wrong_lp / n, "no_needle_logp": sum(bare) / n, "cases": n,
                     "context_tokens": sum(len(c.haystack + c.question) for c in cases) // n})
    return rows
