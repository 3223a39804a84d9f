"""Batch mode (`openclaw run --jsonl IN --out OUT`): JSONL items in, one answer row per item out, in order.

Every item is decoded in shared batches through llm.Streams. An item that cannot run (not JSON, unknown or bad
fields, too long for the context) or fails while decoding gets an "error" row and the others still run. Ctrl-C
ends the run with the rows finished so far (the others are missing, never half-written). It does not print: the
CLI draws the progress bar from the callback and reports the totals.
"""

import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from pathlib import Path

from openclaw.config import SamplingParams
from openclaw.errors import OpenClawError
from openclaw.llm import LLM, Request

SAMPLING_FIELDS = {f.name for f in fields(SamplingParams)}
ITEM_FIELDS = {"prompt", "messages", "system", "id", "think", "think_budget"} | SAMPLING_FIELDS
_NUMBER, _INT, _BOOL, _TEXT = "a number", "an integer", "true or false", "text"
_IDS = "a list of token ids"
_KINDS = {"temperature": _NUMBER, "top_p": _NUMBER, "min_p": _NUMBER, "repetition_penalty": _NUMBER,
          "top_k": _INT, "seed": _INT, "max_tokens": _INT, "min_tokens": _INT, "think_budget": _INT, "think": _BOOL,
          "ignore_eos": _BOOL, "skip_special_tokens": _BOOL, "include_stop_str_in_output": _BOOL, "system": _TEXT,
          "prompt": _TEXT, "stop_token_ids": _IDS}


@dataclass
class BatchResult:
    rows: list[dict]  # one per input line, in input order; after an interrupt only the finished ones
    failed: int
    completion_tokens: int
    seconds: float  # decoding time, from the first request admitted to the last token
    missing: int = 0  # items left unfinished by an interrupt (Ctrl-C): no row


def read_items(path: Path) -> list[dict | str]:
    """The non-blank lines of a JSONL file: an object each, or the error message of a line that is not one."""
    try:
        # JSON lines end at \n alone: str.splitlines would also split at U+2028, U+0085, ... inside valid JSON strings
        lines = path.read_text(encoding="utf-8").split("\n")
    except FileNotFoundError:
        raise OpenClawError(f"{path} does not exist") from None
    except (UnicodeDecodeError, IsADirectoryError) as e:
        raise OpenClawError(f"{path} is not UTF-8 text ({e})") from None
    items: list[dict | str] = []
    for n, line in enumerate(lines, 1):
        if line.strip():
            try:
                item = json.loads(line)
            except json.JSONDecodeError as e:
                item = f"line {n} is not JSON ({e})"
            items.append(item if isinstance(item, (dict, str)) else f"line {n} is not a JSON object")
    if not items:
        raise OpenClawError(f"{path} has no items: write one JSON object per line, with \"prompt\" or \"messages\"")
    return items


def _request(llm: LLM, item: dict | str, defaults: SamplingParams, system: str | None, think: bool | None,
             think_budget: int | None) -> Request:
    if isinstance(item, str):
        raise OpenClawError(item)
    unknown = sorted(set(item) - ITEM_FIELDS)
    if unknown:
        raise OpenClawError(f"unknown field {', '.join(map(repr, unknown))}; items take {', '.join(sorted(ITEM_FIELDS))}")
    item = {k: v for k, v in item.items() if v is not None}  # null: the flag's value, as if not given
    _check_types(item)
    if isinstance(item.get("messages"), list) and item["messages"]:
        messages = item["messages"]
        for n, m in enumerate(messages):
            if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
                raise OpenClawError(f"messages[{n}] must be an object with \"role\" and \"content\" text")
    elif isinstance(item.get("prompt"), str) and item["prompt"].strip():
        sys_msg = item.get("system", system)
        messages = ([{"role": "system", "content": sys_msg}] if sys_msg else []) + [
            {"role": "user", "content": item["prompt"]}]
    else:
        raise OpenClawError("needs \"prompt\" (non-empty text) or \"messages\" (a non-empty list)")
    params = replace(defaults, **{k: v for k, v in item.items() if k in SAMPLING_FIELDS})
    if item.get("think_budget", 1) < 1:
        raise OpenClawError(f"think_budget {item['think_budget']} must be >= 1")
    return llm.chat_request(messages, params, item.get("think", think), item.get("think_budget", think_budget))


def _check_types(item: dict) -> None:
    if isinstance(item.get("stop"), str):
        item["stop"] = [item["stop"]]
    for name, value in item.items():
        kind = _KINDS.get(name)
        if kind is _TEXT:
            ok = isinstance(value, str)
        elif kind is _BOOL:
            ok = isinstance(value, bool)
        elif kind is _IDS:
            ok = isinstance(value, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in value)
        elif kind is not None:
            ok = not isinstance(value, bool) and isinstance(value, int if kind is _INT else (int, float))
        elif name == "stop":
            kind, ok = "a string or a list of strings", isinstance(value, list) and all(isinstance(s, str) for s in value)
        else:
            ok = True
        if not ok:
            raise OpenClawError(f"{name} must be {kind}, not {value!r}")


def run_batch(llm: LLM, items: list[dict | str], defaults: SamplingParams, system: str | None = None,
              think: bool | None = None, think_budget: int | None = None,
              progress: Callable[[int, int, int], None] | None = None) -> BatchResult:
    """Answer every item; progress(items done, items, tokens generated) after each engine step. Ctrl-C
    (KeyboardInterrupt) stops decoding and returns the rows finished so far, with the count of those missing."""
    rows: list[dict] = [{"index": i} | ({"id": it["id"]} if isinstance(it, dict) and "id" in it else {})
                        for i, it in enumerate(items)]
    done = [False] * len(items)
    streams = llm.streams()
    keys: dict[int, int] = {}
    t0 = time.perf_counter()
    failed = tokens = 0
    try:
        for i, item in enumerate(items):
            try:
                keys[streams.add(_request(llm, item, defaults, system, think, think_budget))] = i
            except OpenClawError as e:
                rows[i]["error"], done[i] = str(e), True
                failed += 1
        texts = {i: ["", ""] for i in keys.values()}
        t0 = time.perf_counter()
        while streams:
            for d in streams.step():
                i = keys[d.index]
                texts[i][0] += d.text
                texts[i][1] += d.reasoning
                if d.finish_reason:
                    done[i] = True
                    tokens += d.completion_tokens
                    if d.finish_reason == "error":
                        failed += 1
                        rows[i]["error"] = d.error
                        continue
                    rows[i] |= {"text": texts[i][0]} | ({"reasoning": texts[i][1]} if texts[i][1] else {}) | {
                        "prompt_tokens": d.prompt_tokens, "completion_tokens": d.completion_tokens,
                        "finish_reason": d.finish_reason}
            if progress:
                progress(sum(done), len(items), tokens)
    except KeyboardInterrupt:  # keep what is finished; the caller writes it and says what is missing
        rows = [row for row, finished in zip(rows, done) if finished]
    finally:
        streams.close()
    return BatchResult(rows, failed, tokens, time.perf_counter() - t0, missing=len(items) - sum(done))


def write_rows(rows: list[dict], path: Path) -> None:
    """Write the rows as JSON lines through a temporary file renamed over path, so an interrupted write (a second
    Ctrl-C, a full disk) never leaves half a line or half a file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with tmp.open("w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        os.replace(tmp, path)
    except OSError as e:
        raise OpenClawError(f"could not write {path}: {e.strerror}") from None
    finally:
        tmp.unlink(missing_ok=True)
