"""`openclaw serve` on loopback, spoken to with the official openai client, as an agent would."""

import http.client
import json
import os
import re
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import pytest

from openclaw.config import EngineConfig, EvictionConfig
from openclaw.llm import LLM
from openclaw.server.openai_api import Api
from openclaw.server.server import make_server

openai = pytest.importorskip("openai")
pytestmark = pytest.mark.slow
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
STORY = [{"role": "user", "content": "Write a short story about a robot who learns to paint."}]
WEATHER = [{"type": "function", "function": {"name": "get_weather", "description": "The weather in a city",
                                             "parameters": {"type": "object", "required": ["city"],
                                                            "properties": {"city": {"type": "string"}}}}}]
_SHOT = '<tool_call>{{"name": "get_weather", "arguments": {{"city": "{}"}}}}</tool_call>'
# SmolLM2's template has no tools section: two examples teach it Qwen3's tool-call format (it copies it, greedily)
TOOL_TALK = [{"role": "system", "content": "You call tools. To call one, reply with exactly <tool_call>{\"name\": NAME, "
              "\"arguments\": {...}}</tool_call> and nothing else."},
             {"role": "user", "content": "What is the weather in Berlin?"},
             {"role": "assistant", "content": _SHOT.format("Berlin")},
             {"role": "user", "content": "What is the weather in Rome?"},
             {"role": "assistant", "content": _SHOT.format("Rome")},
             {"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def server(smol_model_dir, tmp_path_factory):
    """The real CLI serving SmolLM2 (fp32, so batched and single answers agree token for token)."""
    log = tmp_path_factory.mktemp("serve") / "stderr.txt"
    env = {**os.environ, "COLUMNS": "200", "OPENCLAW_CACHE": str(log.parent)}
    with log.open("w") as f:
        proc = subprocess.Popen([sys.executable, "-m", "openclaw", "serve", str(smol_model_dir), "--name", "smol",
                                 "--port", "0", "--device", "cpu", "--dtype", "float32", "--max-seqs", "4",
                                 "--kv-tokens", "8192", "--max-tokens", "48"], stdout=f, stderr=f, env=env)
    try:
        deadline = time.monotonic() + 180
        while not (m := re.search(r"at (http://127\.0\.0\.1:\d+/v1)", log.read_text())):
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
        yield m.group(1), log
    finally:
        proc.terminate()
        proc.wait(timeout=20)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[0], api_key="unused", max_retries=0, timeout=120)


def chat(client, messages=QUESTION, **kw):
    return client.chat.completions.create(model="smol", messages=messages, temperature=0, **kw)


def health(url: str) -> dict:
    with urllib.request.urlopen(url.removesuffix("/v1") + "/health", timeout=10) as r:
        return json.loads(r.read())


def test_models_lists_the_served_model(client):
    models = client.models.list().data
    assert [m.id for m in models] == ["smol"] and models[0].owned_by == "openclaw"


def test_non_streamed_and_streamed_chat_agree(client):
    r = chat(client)
    assert "Paris" in r.choices[0].message.content and r.choices[0].finish_reason == "stop"
    assert r.usage.prompt_tokens > 20 and r.usage.completion_tokens > 3
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    chunks = list(chat(client, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == r.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == r.usage.completion_tokens
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 3  # streamed, not one block


def test_two_concurrent_requests_are_decoded_together(client, server):
    alone = [chat(client, m, max_tokens=24).choices[0].message.content for m in (STORY, QUESTION)]
    stamps: dict[int, list[float]] = {0: [], 1: []}
    texts = ["", ""]

    def run(i, messages):
        for c in chat(client, messages, max_tokens=24, stream=True):
            if c.choices and c.choices[0].delta.content:
                stamps[i].append(time.monotonic())
                texts[i] += c.choices[0].delta.content

    threads = [threading.Thread(target=run, args=(i, m)) for i, m in enumerate((STORY, QUESTION))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert texts == alone  # no cross-talk between the sequences of one batch
    # interleaved: each got its first token before the other got its last (one after the other would not)
    assert stamps[0][0] < stamps[1][-1] and stamps[1][0] < stamps[0][-1], stamps
    assert health(server[0])["max_batch"] >= 2


def test_stop_sequences_and_length(client):
    r = chat(client, stop=["Paris"])
    assert r.choices[0].finish_reason == "stop" and "Paris" not in r.choices[0].message.content
    assert r.choices[0].message.content.startswith("The capital")
    r = chat(client, STORY, max_tokens=5)
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 5


def test_completions_endpoint(client):
    r = client.completions.create(model="smol", prompt="The capital of France is", max_tokens=6, temperature=0)
    assert "Paris" in r.choices[0].text and r.usage.completion_tokens == 6
    streamed = client.completions.create(model="smol", prompt="The capital of France is", max_tokens=6,
                                         temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == r.choices[0].text


def test_tool_calls_come_back_as_tool_calls(client):
    r = chat(client, TOOL_TALK, tools=WEATHER, tool_choice="auto")
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None, choice
    [call] = choice.message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris"}
    chunks = list(chat(client, TOOL_TALK, tools=WEATHER, stream=True))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert not "".join(d.content or "" for d in deltas)  # the call's text is not streamed as content
    [streamed] = [tc for d in deltas for tc in d.tool_calls or []]
    assert streamed.index == 0 and streamed.id.startswith("call_")
    assert (streamed.function.name, streamed.function.arguments) == (call.function.name, call.function.arguments)
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    r = chat(client, TOOL_TALK, tools=WEATHER, tool_choice="none")  # no tools offered: the text stays text
    assert r.choices[0].message.content == _SHOT.format("Paris") and not r.choices[0].message.tool_calls
    # the agent's next request: the call (content null) and the tool's result go back in
    result = [{"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
              {"role": "tool", "tool_call_id": call.id, "content": "sunny, 21 C"}]
    r = chat(client, TOOL_TALK + result, tools=WEATHER, max_tokens=8)
    assert r.choices[0].finish_reason in ("stop", "length", "tool_calls")
    with pytest.raises(openai.BadRequestError, match="tools"):
        chat(client, tools="get_weather")


def raw_post(url: str, body, headers: dict, method: str = "POST", path: str = "/v1/chat/completions",
             allow: list | None = None) -> tuple[int, dict]:
    """A request the openai client would never send: bad headers, a chunked body, another method. allow: gets the
    reply's Allow header."""
    host, port = url.split("//")[1].split("/")[0].split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    try:
        conn.request(method, path, body=body, headers=headers, encode_chunked=not isinstance(body, bytes))
        r = conn.getresponse()
        if allow is not None:
            allow.append(r.getheader("Allow"))
        return r.status, json.loads(r.read())
    finally:
        conn.close()


def test_bad_requests_get_4xx_and_the_server_keeps_serving(client, server):
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.chat.completions.create(model="gpt-4o", messages=QUESTION)
    with pytest.raises(openai.BadRequestError, match="maximum context length is 8192") as e:
        chat(client, max_tokens=100_000)
    assert e.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError, match="messages"):
        client.chat.completions.create(model="smol", messages=[])
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.chat.completions.create(model="smol", messages=QUESTION, temperature=7)
    req = urllib.request.Request(server[0] + "/chat/completions", data=b"{not json",
                                 headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=10)
    assert e.value.code == 400 and "not valid JSON" in json.loads(e.value.read())["error"]["message"]
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(server[0] + "/nowhere", timeout=10)
    assert e.value.code == 404
    with pytest.raises(openai.BadRequestError, match=r"seed \d+ must be in \[0, 2\*\*63\)"):
        chat(client, seed=10**30)  # once crashed the engine thread: every later request got a 503
    with pytest.raises(openai.BadRequestError, match="enable_thinking"):
        chat(client, extra_body={"chat_template_kwargs": {"enable_thinking": "no"}})
    with pytest.raises(openai.BadRequestError, match="a user message needs"):
        client.chat.completions.create(model="smol", messages=[{"role": "user"}])
    body = json.dumps({"model": "smol", "messages": QUESTION, "max_tokens": 6, "n": None}).encode()
    assert raw_post(server[0], body, {"Content-Length": "many"})[0] == 400
    assert raw_post(server[0], body, {"Content-Length": str(len(body))}, method="PUT")[0] == 405
    allow = []  # a route asked with the other method is a 405 naming the right one (README promises it), not a 404
    assert raw_post(server[0], None, {}, method="GET", allow=allow)[0] == 405  # or a 400 for a body-less POST:
    for path in ("/v1/models", "/health"):
        status, answer = raw_post(server[0], None, {}, path=path, allow=allow)
        assert status == 405 and "takes GET" in answer["error"]["message"]
    assert allow == ["POST", "GET", "GET"]
    assert raw_post(server[0], None, {}, path="/v1/nowhere")[0] == 404
    status, answer = raw_post(server[0], iter([body[:20], body[20:]]), {"Content-Type": "application/json"})
    assert status == 200 and "Paris" in answer["choices"][0]["message"]["content"]  # a chunked upload
    assert health(server[0])["status"] == "ok"
    assert "Paris" in chat(client).choices[0].message.content
    assert "Traceback" not in server[1].read_text()


def test_a_busy_port_is_refused_before_the_model_loads(server, smol_model_dir, tmp_path):
    port = server[0].split(":")[2].split("/")[0]  # the served port: taken
    r = subprocess.run([sys.executable, "-m", "openclaw", "serve", str(smol_model_dir), "--port", port, "--device",
                        "cpu"], check=False, capture_output=True, text=True, timeout=120,
                       env={**os.environ, "COLUMNS": "200", "OPENCLAW_CACHE": str(tmp_path)})
    assert r.returncode == 2 and f"cannot listen on 127.0.0.1:{port}" in r.stderr, r.stderr
    assert "loaded" not in r.stderr and "Traceback" not in r.stderr  # refused first, not after loading the model
    assert len(r.stderr.strip().splitlines()) == 1


def test_reasoning_content_is_separate_and_a_gone_client_frees_its_slots(smol_thinking_dir):
    # full attention: a request longer than the pool is refused (auto, the default, would evict instead)
    llm = LLM(EngineConfig(model=str(smol_thinking_dir), device="cpu", kv_tokens=4096, max_seqs=4,
                           evict=EvictionConfig(policy="full")))
    server = make_server(llm, Api(llm, "smol-think", 40), "127.0.0.1", 0)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True).start()
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{server.server_address[1]}/v1", api_key="x", max_retries=0)
    try:
        r = client.chat.completions.create(model="smol-think", messages=STORY, temperature=0,
                                           extra_body={"thinking_budget": 6})
        msg = r.choices[0].message
        assert msg.reasoning_content and msg.content and "think>" not in msg.reasoning_content
        chunks = list(client.chat.completions.create(model="smol-think", messages=STORY, temperature=0, stream=True,
                                                     extra_body={"thinking_budget": 6}))
        deltas = [c.choices[0].delta for c in chunks if c.choices]
        assert "".join(getattr(d, "reasoning_content", None) or "" for d in deltas) == msg.reasoning_content
        assert "".join(d.content or "" for d in deltas) == msg.content
        off = client.chat.completions.create(model="smol-think", messages=QUESTION, temperature=0,
                                             extra_body={"chat_template_kwargs": {"enable_thinking": False}})
        assert "Paris" in off.choices[0].message.content
        assert getattr(off.choices[0].message, "reasoning_content", None) is None

        stream = client.chat.completions.create(model="smol-think", messages=STORY, stream=True, max_tokens=2000)
        next(iter(stream))
        stream.close()  # the client hangs up mid-answer, long before 2000 tokens
        pool = llm.engine.pool
        deadline = time.monotonic() + 5
        while pool.allocator.num_free != pool.num_slots and time.monotonic() < deadline:
            time.sleep(0.1)
        assert pool.allocator.num_free == pool.num_slots

        with pytest.raises(openai.BadRequestError, match="needs 50\\d\\d KV slots but the pool has 4096"):
            client.chat.completions.create(model="smol-think", messages=QUESTION, max_tokens=5000)
        # as `serve --max-tokens 100000`: a request that gives no max_tokens gets what the pool holds, not a 400
        server.api.max_tokens = 100_000
        off = client.chat.completions.create(model="smol-think", messages=QUESTION, temperature=0,
                                             extra_body={"chat_template_kwargs": {"enable_thinking": False}})
        assert "Paris" in off.choices[0].message.content
    finally:
        client.close()  # its pooled connections (left open, they warned of an unclosed socket at exit)
        server.shutdown()
        server.loop.stop()
        server.server_close()
        server.loop.join(timeout=10)  # a daemon thread still inside torch at exit aborts the interpreter


def test_a_request_past_its_kv_range_evicts_and_the_log_says_so_once(smol_model_dir, tmp_path):
    """No eviction flags (--evict auto) and a 256-slot pool: two answers of 300 tokens each run past the range
    instead of being refused, the server's log gets one line about it, and closing persists the statistics."""
    lines = []
    llm = LLM(EngineConfig(model=str(smol_model_dir), device="cpu", kv_tokens=256, max_seqs=1, cache_dir=tmp_path))
    server = make_server(llm, Api(llm, "smol", 300), "127.0.0.1", 0, log=lines.append)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True).start()
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{server.server_address[1]}/v1", api_key="x",
                               max_retries=0)
        for _ in range(2):
            r = client.chat.completions.create(model="smol", messages=STORY, temperature=0, max_tokens=300,
                                               extra_body={"ignore_eos": True})
            assert r.usage.completion_tokens == 300 and r.choices[0].finish_reason == "length"
        assert len([line for line in lines if "eviction took over" in line]) == 1, lines
    finally:
        server.shutdown()
        server.loop.stop()
        server.server_close()
        server.loop.join(timeout=10)
    llm.close()
    assert list((tmp_path / "stats").glob("*.pt")), "the online statistics persist in the cache"
