"""Batch mode as a user runs it: `openclaw run --jsonl IN --out OUT` on 32 prompts, plus items that fail."""

import json
import os
import pty
import re
import select
import signal
import subprocess
import sys
import time

import pytest

from openclaw.batch import read_items
from openclaw.errors import OpenClawError

CITIES = {"France": "Paris", "Germany": "Berlin", "Japan": "Tokyo", "Egypt": "Cairo", "Canada": "Ottawa",
          "Peru": "Lima", "Italy": None, "Spain": None}  # SmolLM2-135M gets these two wrong


def test_read_items_keeps_bad_lines_as_errors(tmp_path):
    p = tmp_path / "in.jsonl"
    p.write_text('{"prompt": "a"}\n\nnot json\n[1, 2]\n{"messages": []}\n')
    items = read_items(p)
    assert items[0] == {"prompt": "a"} and items[3] == {"messages": []}
    assert items[1].startswith("line 3 is not JSON") and items[2] == "line 4 is not a JSON object"
    p.write_text("\n \n")
    with pytest.raises(OpenClawError, match="has no items"):
        read_items(p)


@pytest.mark.slow
def test_32_prompts_in_order_with_per_item_fields_and_failures(smol_model_dir, tmp_path):
    countries = list(CITIES)
    items = [{"id": f"q{i}", "prompt": f"What is the capital of {countries[i % 8]}?"} for i in range(32)]
    items[5] |= {"max_tokens": 3}
    items[6] |= {"stop": ["capital"]}
    items[7] = {"id": "q7", "messages": [{"role": "system", "content": "Answer in one word."},
                                         {"role": "user", "content": "What color is the sky?"}]}
    lines = [json.dumps(it) for it in items]
    lines.insert(9, '{"prompt": "hi", "temperature": -2}')  # items that fail: a bad value, an unknown field,
    lines.insert(20, '{"prompt": "hi", "max_token": 3}')  # and a line that is not JSON
    lines.insert(30, "{oops")
    lines.insert(33, '{"prompt": "hi", "seed": 100000000000000000000000}')  # once a traceback from torch, no rows
    lines.append('{"prompt": "hi", "think_budget": "many"}')
    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text("\n".join(lines) + "\n")
    r = subprocess.run([sys.executable, "-m", "openclaw", "run", "--jsonl", src, "--out", dst, "--model",
                        smol_model_dir, "--device", "cpu", "--temperature", "0", "--max-tokens", "12",
                        "--max-seqs", "32", "--dtype", "float32"], check=False, capture_output=True, text=True, timeout=600,
                       env={**os.environ, "COLUMNS": "200", "OPENCLAW_CACHE": str(tmp_path)})
    assert r.returncode == 2, r.stderr  # some items failed ...
    assert re.search(r"32 answers, \d+ tokens in [\d.]+s \([\d.]+ tok/s, 32 at a time\)", r.stderr), r.stderr
    assert "error: 5 of 37 items failed" in r.stderr and "Traceback" not in r.stderr
    rows = [json.loads(line) for line in dst.read_text().splitlines()]  # ... and the others were still written
    assert [row["index"] for row in rows] == list(range(37))
    errors = {i: row["error"] for i, row in enumerate(rows) if "error" in row}
    assert sorted(errors) == [9, 20, 30, 33, 36]
    assert "temperature -2" in errors[9] and "'max_token'" in errors[20] and "not JSON" in errors[30]
    assert "seed 100000000000000000000000 must be in" in errors[33]
    assert errors[36] == "think_budget must be an integer, not 'many'"
    answers = [row for row in rows if "error" not in row]
    assert [row["id"] for row in answers] == [f"q{i}" for i in range(32)]
    for i, row in enumerate(answers):
        assert row["text"] and row["prompt_tokens"] > 10 and 1 <= row["completion_tokens"] <= 12, row
        assert row["finish_reason"] in ("stop", "length")
        if i not in (5, 6, 7) and (city := CITIES[countries[i % 8]]):  # batched like alone: right where it knows
            assert city in row["text"], row
    assert answers[5]["completion_tokens"] == 3 and answers[5]["finish_reason"] == "length"
    assert answers[6]["finish_reason"] == "stop" and "capital" not in answers[6]["text"]
    assert "sky" in answers[7]["text"].lower() and answers[7]["prompt_tokens"] < answers[8]["prompt_tokens"]


def test_out_that_cannot_be_written_is_refused_before_loading(tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text('{"prompt": "hi"}\n')
    for out, message in [(tmp_path / "nodir" / "out.jsonl", "no such directory"), (tmp_path, "is a directory")]:
        r = subprocess.run([sys.executable, "-m", "openclaw", "run", "--jsonl", src, "--out", out, "--model", "Nope"],
                           check=False, capture_output=True, text=True, env={**os.environ, "COLUMNS": "200"})
        assert r.returncode == 2 and r.stderr.strip() == f"error: --out {out}: {message}", r.stderr


def test_line_separators_inside_json_strings_do_not_split_lines(tmp_path):
    """str.splitlines also splits at U+2028, U+0085, ...: 4 valid lines became 6 rows and every later index shifted."""
    p = tmp_path / "in.jsonl"
    items = [{"prompt": "one\u2028two"}, {"prompt": "three\x85four"}, {"prompt": "five\u2029\x1c\x1d\x1esix"},
             {"prompt": "seven"}]
    p.write_text("\n".join(json.dumps(it, ensure_ascii=False) for it in items) + "\r\n", encoding="utf-8")
    assert read_items(p) == items


def test_out_equal_to_the_input_is_refused(tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text('{"prompt": "hi"}\n')
    (tmp_path / "link.jsonl").symlink_to(src)
    for out in (src, tmp_path / "link.jsonl", tmp_path / "." / "in.jsonl"):
        r = subprocess.run([sys.executable, "-m", "openclaw", "run", "--jsonl", src, "--out", out, "--model", "Nope"],
                           check=False, capture_output=True, text=True, env={**os.environ, "COLUMNS": "200"})
        assert r.returncode == 2 and "is the input file" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert src.read_text() == '{"prompt": "hi"}\n'


@pytest.mark.slow
def test_ctrl_c_keeps_every_finished_answer_and_says_how_many_are_missing(smol_model_dir, tmp_path):
    """Ctrl-C (exit 130) once wrote no --out at all; a temperature of 1e-300 once crashed the whole run."""
    quick = [{"id": "a", "prompt": "What is the capital of France?", "max_tokens": 4},
             {"id": "b", "prompt": "Name a color.", "max_tokens": 3, "temperature": 1e-300},
             {"id": "c", "prompt": "hi", "repetition_penalty": 1e-300}]
    slow = [{"id": f"slow{i}", "prompt": "Tell me a long story.", "max_tokens": 4000, "ignore_eos": True}
            for i in range(3)]
    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text("".join(json.dumps(it) + "\n" for it in quick[:2] + slow[:1] + quick[2:] + slow[1:]))
    # a shell that runs the suite in the background starts it with SIGINT ignored, and the child would inherit that
    # (and never see Ctrl-C); with a handler here, the child starts with the default action
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    master, terminal = pty.openpty()  # stderr on a terminal: the progress bar shows how many items are done
    proc = subprocess.Popen([sys.executable, "-m", "openclaw", "run", "--jsonl", src, "--out", dst, "--model",
                             smol_model_dir, "--device", "cpu", "--max-seqs", "8", "--dtype", "float32",
                             "--temperature", "0.7"], stderr=terminal, stdout=subprocess.DEVNULL,
                            env={**os.environ, "COLUMNS": "200", "OPENCLAW_CACHE": str(tmp_path), "TERM": "xterm"})
    signal.signal(signal.SIGINT, previous)
    os.close(terminal)
    shown, deadline = b"", time.monotonic() + 300
    try:
        while b"3/6" not in shown:  # the quick items are done, the slow ones decode
            assert proc.poll() is None and time.monotonic() < deadline, shown.decode(errors="replace")
            if select.select([master], [], [], 0.5)[0]:
                shown += os.read(master, 65536)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 130
    finally:
        proc.kill()  # a failed check leaves no decoding child behind (a no-op once it has exited)
    while select.select([master], [], [], 0.2)[0]:
        try:
            shown += os.read(master, 65536)
        except OSError:  # EIO: the terminal's other end closed
            break
    os.close(master)
    stderr = shown.decode(errors="replace")
    assert "wrote the 3 finished rows" in stderr and "3 of 6 items are missing" in stderr, stderr
    assert "Traceback" not in stderr
    rows = [json.loads(line) for line in dst.read_text(encoding="utf-8").splitlines()]
    assert [(r["index"], r["id"]) for r in rows] == [(0, "a"), (1, "b"), (3, "c")]
    assert rows[0]["completion_tokens"] == 4 or rows[0]["finish_reason"] == "stop"
    assert rows[1]["text"] and rows[1]["completion_tokens"] <= 3  # greedy: no crash
    assert "repetition_penalty 1e-300 must be in" in rows[2]["error"]
