"""`openclaw serve` when requests go wrong: poisoned values, bad rows, clients that hang up, hostile clients.

In-process servers on one SmolLM2 (fp32), so a test can see the pool and inject a failure into one sequence.
"""

import http.client
import json
import socket
import threading
import time
import urllib.error
import urllib.request
from contextlib import contextmanager

import pytest
import torch

from openclaw.config import EngineConfig, SamplingParams, ServerConfig
from openclaw.errors import OpenClawError
from openclaw.llm import LLM, Delta, Request
from openclaw.server.openai_api import Api
from openclaw.server.server import make_server

openai = pytest.importorskip("openai")
pytestmark = pytest.mark.slow
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
STORY = [{"role": "user", "content": "Write a short story about a robot who learns to paint."}]
KV_TOKENS = 2200


@pytest.fixture(scope="module")
def llm(smol_model_dir):
    return LLM(EngineConfig(model=str(smol_model_dir), device="cpu", dtype="float32", kv_tokens=KV_TOKENS, max_seqs=4))


@contextmanager
def serving(llm, **limits):
    server = make_server(llm, Api(llm, "smol", 64, ServerConfig(**limits)), "127.0.0.1", 0)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.loop.stop()
        server.server_close()
        server.loop.join(timeout=30)  # a daemon thread still inside torch at exit aborts the interpreter
        assert llm.engine.pool.allocator.num_free == llm.engine.pool.num_slots  # nothing held after a test


def client(url: str):
    return openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=300)


def health(url: str) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(url + "/health", timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def raw(url: str, body: bytes, headers: dict | None = None, path: str = "/v1/chat/completions") -> tuple[int, dict]:
    """POST bytes as they are; (status, JSON body). A connection closed without a reply raises."""
    host, port = url.split("//")[1].split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    try:
        conn.putrequest("POST", path)
        for k, v in ({"Content-Length": str(len(body))} | (headers or {})).items():
            conn.putheader(k, v)
        conn.endheaders(body)
        r = conn.getresponse()
        return r.status, json.loads(r.read())
    finally:
        conn.close()


def chat_body(messages=QUESTION, **kw) -> bytes:
    return json.dumps({"model": "smol", "messages": messages, "temperature": 0} | kw).encode()


def open_request(url: str, body: bytes) -> socket.socket:
    """A request sent on a raw socket whose reply nobody reads yet."""
    host, port = url.split("//")[1].split(":")
    s = socket.create_connection((host, int(port)))
    s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
              + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
    return s


def wait_for(condition, timeout: float, what: str) -> float:
    t0 = time.monotonic()
    while not condition():
        assert time.monotonic() - t0 < timeout, f"{what}: not within {timeout}s"
        time.sleep(0.02)
    return time.monotonic() - t0


def test_a_poisoned_temperature_never_takes_the_batch_down(llm):
    """temperature 1e-300 became 0 in float32 and crashed the sampling step: 6 of 6 live streams got a 500."""
    with serving(llm) as url:
        c = client(url)
        results = {}

        def stream(i):
            chunks = list(c.chat.completions.create(model="smol", messages=STORY, max_tokens=12 + i, stream=True,
                                                    temperature=0.8, stream_options={"include_usage": True},
                                                    extra_body={"ignore_eos": True}))
            results[i] = (chunks[-2].choices[0].finish_reason, chunks[-1].usage.completion_tokens)

        threads = [threading.Thread(target=stream, args=(i,)) for i in range(3)]
        for t in threads:
            t.start()
        wait_for(lambda: health(url)[1]["running"] == 3, 60, "three streams decoding")
        for temperature in (1e-300, 1e-45):
            r = c.chat.completions.create(model="smol", messages=QUESTION, temperature=temperature, max_tokens=8)
            assert "Paris" in r.choices[0].message.content  # greedy
        with pytest.raises(openai.BadRequestError, match=r"repetition_penalty 1e-300 must be in \[0.0001, 10000\]"):
            c.chat.completions.create(model="smol", messages=QUESTION, temperature=0.7, max_tokens=8,
                                      extra_body={"repetition_penalty": 1e-300})
        for t in threads:
            t.join(timeout=300)
        assert results == {i: ("length", 12 + i) for i in range(3)}


def test_a_client_that_hangs_up_frees_its_slots_at_once(llm):
    """A non-streamed request whose client hung up was never cancelled: it kept its slots for max_tokens."""
    pool = llm.engine.pool
    with serving(llm) as url:
        hog = open_request(url, chat_body(STORY, max_tokens=2000, ignore_eos=True))  # 2000 + prompt of the 2200 slots
        wait_for(lambda: pool.allocator.num_free < 300, 60, "the long request admitted")
        waiter = open_request(url, chat_body(STORY, max_tokens=400, ignore_eos=True))  # queued: needs the hog's slots
        time.sleep(0.5)
        waiter.close()  # a client that leaves while its request still queues
        time.sleep(0.3)
        hog.close()
        t0 = time.monotonic()
        stream = client(url).chat.completions.create(model="smol", messages=STORY, max_tokens=400, stream=True)
        assert next(text for chunk in stream if (text := chunk.choices[0].delta.content))  # admitted, decoding
        assert time.monotonic() - t0 < 10  # the hog had 2000 tokens to go: minutes at this machine's speed
        stream.close()
        wait_for(lambda: pool.allocator.num_free == pool.num_slots, 10, "every slot back")
        assert health(url)[1] | {"max_batch": 0} == {"status": "ok", "max_batch": 0, "max_seqs": 4, "running": 0,
                                                     "waiting": 0, "kv_free": KV_TOKENS, "kv_slots": KV_TOKENS}


def test_one_bad_row_fails_only_its_request(llm, monkeypatch):
    """Non-finite logits were checked only in float16, and an exception inside a step failed every live request."""
    step = llm.engine.runner.step

    def poisoned(batch, tap=None, rows=None):
        seeds = {seq.params.seed for seq, _ in batch}
        if 777 in seeds:
            raise OpenClawError("the thinking budget does not fit (an injected OpenClawError)")
        if 888 in seeds:
            raise RuntimeError("an injected bug")
        logits, seqs = step(batch, tap, rows)
        with torch.inference_mode():
            for i, seq in enumerate(seqs):
                if seq.params.seed == 666 and len(seq.output_ids) >= 2:
                    logits[i, 100] = float("nan")
        return logits, seqs

    monkeypatch.setattr(llm.engine.runner, "step", poisoned)
    with serving(llm) as url:
        c = client(url)
        good = {}

        def stream(i):
            chunks = list(c.chat.completions.create(model="smol", messages=STORY, max_tokens=16, stream=True,
                                                    temperature=0, extra_body={"ignore_eos": True}))
            good[i] = ("".join(ch.choices[0].delta.content or "" for ch in chunks), chunks[-1].choices[0].finish_reason)

        threads = [threading.Thread(target=stream, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        wait_for(lambda: health(url)[1]["running"] == 2, 60, "two streams decoding")
        with pytest.raises(openai.InternalServerError, match="non-finite logits") as e:
            c.chat.completions.create(model="smol", messages=QUESTION, max_tokens=8, seed=666)
        assert e.value.status_code == 500
        streamed = c.chat.completions.create(model="smol", messages=QUESTION, max_tokens=8, seed=666, stream=True)
        texts = []
        with pytest.raises(openai.APIError, match="non-finite logits"):
            for chunk in streamed:
                texts.append(chunk.choices[0].delta.content or "")
                assert chunk.choices[0].finish_reason in (None, "error")
        assert "".join(texts)  # the tokens before the bad row arrived
        with pytest.raises(openai.BadRequestError, match="thinking budget does not fit"):
            c.chat.completions.create(model="smol", messages=QUESTION, max_tokens=8, seed=777)
        with pytest.raises(openai.InternalServerError, match=r"RuntimeError: an injected bug"):
            c.chat.completions.create(model="smol", messages=QUESTION, max_tokens=8, seed=888)
        for t in threads:
            t.join(timeout=300)
        assert good[0] == good[1] and good[0][1] == "length" and len(good[0][0]) > 20
        assert "Paris" in c.chat.completions.create(model="smol", messages=QUESTION, max_tokens=8).choices[0].message.content


def test_deltas_are_plain_data(llm):
    """Delta carried the live Sequence from the engine thread to the handler threads."""
    streams = llm.streams()
    streams.add(Request(llm.chat_ids(QUESTION), SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)))
    deltas = []
    while streams:
        deltas += streams.step()
    assert deltas and deltas[-1].finish_reason == "length" and deltas[-1].completion_tokens == 6
    for d in deltas:
        assert isinstance(d, Delta) and all(isinstance(v, (int, str, bool, type(None))) for v in vars(d).values())
    assert deltas[-1].prompt_tokens == len(llm.chat_ids(QUESTION)) and deltas[-1].kv_capacity > 0


def test_vllm_request_extras_are_honoured(llm):
    with serving(llm) as url:
        c = client(url)

        def ask(**extra):
            r = c.chat.completions.create(model="smol", messages=QUESTION, temperature=0, max_tokens=24,
                                          extra_body=extra)
            return r.choices[0].message.content, r.choices[0].finish_reason, r.usage.completion_tokens

        text, finish, n = ask()
        assert text == "The capital of France is Paris." and finish == "stop" and n == 8
        assert ask(ignore_eos=True)[1:] == ("length", 24)
        assert ask(min_tokens=12)[2] >= 12  # eos is masked until then
        paris = llm.tokenizer.encode(" Paris")
        assert len(paris) == 1
        assert ask(stop_token_ids=paris) == ("The capital of France is", "stop", 6)
        assert ask(stop_token_ids=paris, include_stop_str_in_output=True)[0] == "The capital of France is Paris"
        assert ask(stop=["France"], include_stop_str_in_output=True)[0] == "The capital of France"
        assert ask(stop=["France"], min_tokens=7)[0] == "The capital of France is Paris."  # found too early
        shown = ask(ignore_eos=True, skip_special_tokens=False)[0]
        assert shown.startswith("The capital of France is Paris.<|im_end|>")
        for bad, match in [({"min_tokens": "x"}, "min_tokens"), ({"min_tokens": 30}, "min_tokens 30 must be in"),
                           ({"stop_token_ids": [-1]}, "stop_token_ids"), ({"stop_token_ids": [10**9]}, "token ids"),
                           ({"ignore_eos": "yes"}, "ignore_eos"), ({"skip_special_tokens": 1}, "skip_special_tokens")]:
            with pytest.raises(openai.BadRequestError, match=match):
                ask(**bad)


def test_hostile_bodies_get_400_and_never_a_closed_connection(llm):
    """100k-deep JSON, a lone surrogate, a non-ASCII Content-Length and huge integers closed the connection without
    a reply; 900k tiny messages took 22 s of parsing while /health stalled."""
    with serving(llm) as url:
        deep = b'{"model": "smol", "messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
        cases = [
            (deep, {}, "not valid JSON: RecursionError"),
            (chat_body([{"role": "user", "content": "a\ud800b"}]), {}, "lone surrogate"),
            (b'{"model": "smol", "prompt": "\\udfff", "max_tokens": 2}', {}, "lone surrogate"),
            (chat_body()[:-1] + b', "max_tokens": ' + b"9" * 5000 + b"}", {}, "not valid JSON: ValueError"),
            (chat_body(), {"Content-Length": "\xb2"}, "is not a number of bytes"),
            (chat_body(QUESTION * 5000), {}, "5000 messages are over this server's limit of 4096"),
        ]
        for body, headers, match in cases:
            path = "/v1/completions" if b'"prompt"' in body else "/v1/chat/completions"
            status, answer = raw(url, body, headers, path)
            assert status == 400 and match in answer["error"]["message"], (match, answer)
        big = chat_body([{"role": "user", "content": "a"}] * 900_000)
        stalls = []

        def poll():
            while not done.is_set():
                t0 = time.monotonic()
                status = health(url)[0]
                stalls.append((time.monotonic() - t0, status))
                time.sleep(0.05)

        done = threading.Event()
        poller = threading.Thread(target=poll)
        poller.start()
        t0 = time.monotonic()
        status, answer = raw(url, big)
        spent = time.monotonic() - t0
        done.set()
        poller.join()
        assert status == 400 and "900000 messages are over" in answer["error"]["message"]
        assert spent < 10 and max(stalls)[0] < 5 and {status for _, status in stalls} == {200}, (spent, stalls)
        assert "Paris" in client(url).chat.completions.create(model="smol", messages=QUESTION, max_tokens=8,
                                                              temperature=0).choices[0].message.content


def test_stalled_connections_are_bounded_and_time_out(llm):
    """500 stalled connections held 500 threads forever; at the descriptor limit /health stopped answering."""
    with serving(llm, max_connections=4, read_timeout=1.5) as url:
        host, port = url.split("//")[1].split(":")
        before = threading.active_count()
        stalled = [socket.create_connection((host, int(port))) for _ in range(3)]  # connected, silent
        half = socket.create_connection((host, int(port)))  # a request cut short: headers and part of its body
        half.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nContent-Length: 100\r\n\r\n{\"model\"")
        time.sleep(0.3)
        t0 = time.monotonic()
        status, answer = health(url)  # the bound is reached: refused at once, never a hang
        assert status == 503 and "4 connections open" in answer["error"]["message"] and time.monotonic() - t0 < 2
        assert threading.active_count() <= before + 4
        wait_for(lambda: health(url)[0] == 200, 10, "/health once the stalled connections time out")
        for s in [*stalled, half]:  # the server closed them without a word
            s.settimeout(10)
            assert s.recv(1) == b""
            s.close()


def test_health_reports_the_real_batch(llm):
    """/health said max_batch 32 under --max-seqs 8: it counted queued requests as decoded together."""
    with serving(llm) as url:
        c = client(url)
        threads = [threading.Thread(target=lambda: c.chat.completions.create(
            model="smol", messages=QUESTION, max_tokens=6, temperature=0, extra_body={"ignore_eos": True}))
            for _ in range(7)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=300)
        report = health(url)[1]
        assert report["max_batch"] == report["max_seqs"] == 4, report
