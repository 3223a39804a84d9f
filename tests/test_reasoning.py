"""The splits of streamed text, fed in every possible chunking (tags split across deltas): reasoning vs answer,
and Qwen3's <tool_call> blocks vs content, up to the OpenAI shapes the server sends."""

import json

import pytest

from openclaw.llm import Delta
from openclaw.reasoning import ThinkSplitter, prompt_opens_thinking
from openclaw.server.openai_api import Reply
from openclaw.server.tool_calls import ToolCallSplitter, parse_tool_calls


def split(chunks: list[str], thinking: bool = False) -> tuple[str, str]:
    s = ThinkSplitter(thinking)
    reasoning = answer = ""
    for c in chunks:
        r, a = s.feed(c)
        reasoning, answer = reasoning + r, answer + a
    r, a = s.flush()
    return reasoning + r, answer + a


def chunkings(text: str):
    yield [text]
    yield list(text)
    for cut in range(1, len(text)):
        yield [text[:cut], text[cut:]]


@pytest.mark.parametrize("text, thinking, expected", [
    ("<think>\nadd them\n</think>\n\n4", False, ("add them", "4")),
    ("  <think>a</think>b", False, ("a", "b")),
    ("add them\n</think>\n\n4", True, ("add them", "4")),  # R1-style: the prompt opened <think>
    ("The answer is 4.", False, ("", "The answer is 4.")),
    ("Use <think> tags </think> like so", False, ("", "Use <think> tags </think> like so")),  # not at the start
    ("<think>\n\n</think>\n\nhi\n\nthere", False, ("", "hi\n\nthere")),
    ("<think>still thinking when cut off", False, ("still thinking when cut off", "")),
    ("<thi", False, ("", "<thi")),  # a tag prefix that never completes is answer text
    ("</thin", True, ("</thin", "")),
    ("a < b </think>c", True, ("a < b ", "c")),
])
def test_split_is_the_same_for_every_chunking(text, thinking, expected):
    for chunks in chunkings(text):
        assert split(chunks, thinking) == expected, chunks


def test_thinking_state_follows_the_tags():
    s = ThinkSplitter()
    assert not s.thinking
    s.feed("<think>")
    assert s.thinking
    s.feed("x</think>")
    assert not s.thinking


def test_prompt_opens_thinking():
    assert prompt_opens_thinking("<|im_start|>assistant\n<think>\n")
    assert not prompt_opens_thinking("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert not prompt_opens_thinking("<think>old</think> hello <|im_start|>assistant\n")
    assert not prompt_opens_thinking("plain")


CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'


@pytest.mark.parametrize("text, content, calls", [
    (CALL, None, [("get_weather", {"city": "Paris"})]),
    ("Let me look.\n\n" + CALL, "Let me look.", [("get_weather", {"city": "Paris"})]),
    (CALL + "\n" + CALL.replace("Paris", "Rome"), None, [("get_weather", {"city": "Paris"}),
                                                      ("get_weather", {"city": "Rome"})]),
    ('<tool_call>{"name": "now"}</tool_call>', None, [("now", {})]),
    ('<tool_call>{"name": "f", "arguments": {"x": 1}}', None, [("f", {"x": 1})]),  # eos before the closing tag
    ("It is sunny.", "It is sunny.", []),
    ("a <tool_call>not json</tool_call>", "a <tool_call>not json</tool_call>", []),  # kept as text, not lost
    ('<tool_call>{"arguments": {}}</tool_call>', '<tool_call>{"arguments": {}}</tool_call>', []),  # no name
    ("<tool_cal", "<tool_cal", []),
])
def test_tool_calls_are_parsed_the_same_in_every_chunking(text, content, calls):
    got_content, got_calls = parse_tool_calls(text)
    assert got_content == content
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in got_calls] == calls
    assert all(c["type"] == "function" and c["id"].startswith("call_") for c in got_calls)
    for chunks in chunkings(text):
        s = ToolCallSplitter()
        streamed = "".join(s.feed(c) for c in chunks)
        rest, streamed_calls = s.finish()
        assert (streamed + rest or None) == content, chunks
        assert [c["function"] for c in streamed_calls] == [c["function"] for c in got_calls], chunks


def test_reply_sends_tool_calls_in_openai_shapes():
    text = "Checking.\n" + CALL
    whole, stream = (Reply("chat", "m", 3, streaming, False, tools=True) for streaming in (False, True))
    chunks = []
    for i in range(0, len(text), 7):
        d = Delta(0, text[i:i + 7], i // 7 + 1, "stop" if i + 7 >= len(text) else None)
        whole.add(d)
        chunks += stream.chunks(d)
    choice = whole.final()["choices"][0]
    assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] == "Checking."
    [call] = choice["message"]["tool_calls"]
    assert call["function"] == {"name": "get_weather", "arguments": '{"city": "Paris"}'}
    deltas = [c["choices"][0]["delta"] for c in chunks]
    assert "".join(d.get("content", "") for d in deltas) == "Checking."
    [streamed] = [tc for d in deltas for tc in d.get("tool_calls", [])]
    assert streamed["index"] == 0 and streamed["function"] == call["function"]
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"
    plain = Reply("chat", "m", 3, False, False)  # no tools in the request: the text stays text
    plain.add(Delta(0, text, 1, "stop"))
    assert plain.final()["choices"][0]["message"] == {"role": "assistant", "content": text}
