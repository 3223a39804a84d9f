"""`openclaw serve` under load: 32 concurrent streamed requests with mixed max_tokens and 5 clients that hang up.

Every completed request has exact usage counts, the hung-up ones free their slots, /health answers throughout, and
the server's memory after the run is within 10% of what it was before (after a warm-up round).
"""

import http.client
import json
import os
import re
import subprocess
import sys
import threading
import time
import urllib.request

import pytest

from openclaw.tokenizer import Tokenizer

openai = pytest.importorskip("openai")
pytestmark = pytest.mark.slow
TOPICS = ["France", "Japan", "Peru", "Egypt", "Canada", "Italy", "Kenya", "Chile"]
MAX_SEQS, KV_TOKENS, HANG_UP_TOKENS = 8, 8192, 1000


def rss_kib(pid: int) -> int:
    status = open(f"/proc/{pid}/status").read()  # noqa: SIM115
    return int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1))


def health(url: str) -> dict:
    with urllib.request.urlopen(url + "/health", timeout=30) as r:
        return json.loads(r.read())


def messages(i: int) -> list[dict]:
    return [{"role": "user", "content": f"Tell me one fact about {TOPICS[i % 8]} (request {i})."}]


def hang_up(port: int, i: int, got_text: threading.Event) -> None:
    """A streamed request for HANG_UP_TOKENS tokens whose client reads its first text, then drops the connection."""
    body = json.dumps({"model": "smol", "messages": messages(100 + i), "max_tokens": HANG_UP_TOKENS, "stream": True,
                       "ignore_eos": True})
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
    conn.request("POST", "/v1/chat/completions", body=body, headers={"Content-Type": "application/json"})
    r = conn.getresponse()
    assert r.status == 200
    while b'"content": "' not in (line := r.fp.readline()) or b'"content": ""' in line:
        assert line, "the stream ended before any text"
    got_text.set()
    conn.sock.close()  # gone mid-answer, as a killed agent or a closed browser tab
    conn.close()


@pytest.fixture(scope="module")
def server(smol_model_dir, tmp_path_factory):
    log = tmp_path_factory.mktemp("serve") / "stderr.txt"
    env = {**os.environ, "COLUMNS": "200", "OPENCLAW_CACHE": str(log.parent)}
    with log.open("w") as f:
        proc = subprocess.Popen([sys.executable, "-m", "openclaw", "serve", str(smol_model_dir), "--name", "smol",
                                 "--port", "0", "--device", "cpu", "--dtype", "float32", "--max-seqs", str(MAX_SEQS),
                                 "--kv-tokens", str(KV_TOKENS)], stdout=f, stderr=f, env=env)
    try:
        deadline = time.monotonic() + 180
        while not (m := re.search(r"at (http://127\.0\.0\.1:(\d+))/v1", log.read_text())):
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
        yield m.group(1), int(m.group(2)), proc, log
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_32_streams_and_5_hang_ups(server, smol_model_dir):
    url, port, proc, log = server
    client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=600)
    tokenizer = Tokenizer.from_dir(smol_model_dir)

    def stream(i: int, max_tokens: int, out: dict) -> None:
        chunks = list(client.chat.completions.create(model="smol", messages=messages(i), max_tokens=max_tokens,
                                                     temperature=0.7, seed=i, stream=True,
                                                     stream_options={"include_usage": True},
                                                     extra_body={"ignore_eos": True}))
        out[i] = chunks

    warm: dict = {}
    threads = [threading.Thread(target=stream, args=(i, 4, warm)) for i in range(MAX_SEQS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    assert len(warm) == MAX_SEQS
    before = rss_kib(proc.pid)

    polls: list[tuple[float, dict]] = []
    done = threading.Event()

    def poll_health() -> None:
        while not done.is_set():
            t0 = time.monotonic()
            report = health(url)
            polls.append((time.monotonic() - t0, report))
            time.sleep(0.2)

    results: dict = {}
    max_tokens = {i: 2 + i % 9 for i in range(32)}  # 2..10
    hung = [threading.Event() for _ in range(5)]
    poller = threading.Thread(target=poll_health)
    poller.start()
    t0 = time.monotonic()
    threads = [threading.Thread(target=stream, args=(i, max_tokens[i], results)) for i in range(32)]
    threads += [threading.Thread(target=hang_up, args=(port, i, hung[i])) for i in range(5)]
    for i, t in enumerate(threads):
        t.start()
        if i % 8 == 7:
            time.sleep(0.3)  # arrivals spread over the run, as from many clients
    for t in threads:
        t.join(timeout=900)
    elapsed = time.monotonic() - t0
    assert all(e.is_set() for e in hung)
    time.sleep(1)  # the engine thread notices within one step; then the pool must be whole again
    done.set()
    poller.join()

    assert sorted(results) == list(range(32))
    for i, chunks in results.items():
        usage = chunks[-1].usage
        prompt = len(tokenizer.encode_chat(messages(i), add_generation_prompt=True))
        assert (usage.prompt_tokens, usage.completion_tokens) == (prompt, max_tokens[i]), i
        assert usage.total_tokens == prompt + max_tokens[i]
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    final = health(url)
    assert final["running"] == final["waiting"] == 0 and final["kv_free"] == final["kv_slots"] == KV_TOKENS, final
    assert final["max_batch"] == MAX_SEQS  # the queue filled every batch, and no batch went past --max-seqs
    assert len(polls) >= 3 and max(t for t, _ in polls) < 5, [t for t, _ in polls]
    assert max(r["waiting"] for _, r in polls) > 0  # requests did queue behind full batches
    after = rss_kib(proc.pid)
    assert abs(after - before) <= 0.1 * before, (before, after)
    assert "Traceback" not in log.read_text()
    print(f"\n37 clients in {elapsed:.1f}s; /health worst {max(t for t, _ in polls) * 1000:.0f} ms over {len(polls)} "
          f"polls; RSS {before / 1024:.0f} -> {after / 1024:.0f} MiB")
