"""The splits of streamed text, fed in every possible chunking (tags split across deltas): reasoning vs answer,
and Qwen3's <tool_call> blocks vs content, up to the OpenAI shapes the server sends."""

import json

import pytest

from openclaw.llm import Delta
from openclaw.reasoning import ThinkSplitter, prompt_opens_thinking
from openclaw.server.openai_api import Reply
from openclaw.server.tool_calls import ToolCallSplitter, parse_tool_calls, tool_dialect


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
    tools = [{"type": "function", "function": {"name": "get_weather"}}]
    whole, stream = (Reply("chat", "m", 3, streaming, False, tools=tools) for streaming in (False, True))
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


WEATHER = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"},
                                     "code": {"type": "string"}}}}},
           {"type": "function", "function": {"name": "now", "parameters": {"type": "object", "properties": {}}}}]
GLM45 = "<tool_call>get_weather<arg_key>city</arg_key><arg_value>Paris</arg_value><arg_key>days</arg_key>" \
        "<arg_value>3</arg_value></tool_call>"


@pytest.mark.parametrize("dialect, text, content, calls", [
    # GLM-4.7 / 4.7-Flash: one line; GLM-4.5 / 4.6 put newlines between the parts
    ("glm45", GLM45, None, [("get_weather", {"city": "Paris", "days": 3})]),
    ("glm45", ("Let me check.\n<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>Rome</arg_value>\n"
              "</tool_call>"), "Let me check.", [("get_weather", {"city": "Rome"})]),
    ("glm45", GLM45 + GLM45.replace("Paris", "Oslo"), None, [("get_weather", {"city": "Paris", "days": 3}),
                                                          ("get_weather", {"city": "Oslo", "days": 3})]),
    ("glm45", "<tool_call>now</tool_call>", None, [("now", {})]),
    # a string parameter that looks like a number stays a string (the schema says so); unknown ones are JSON-read
    ("glm45", ("<tool_call>get_weather<arg_key>code</arg_key><arg_value>007</arg_value><arg_key>x</arg_key>"
              "<arg_value>{\"a\": [1]}</arg_value></tool_call>"), None, [("get_weather", {"code": "007",
                                                                                    "x": {"a": [1]}})]),
    ("glm45", "It is sunny.", "It is sunny.", []),
    ("glm45", "<tool_call>two words<arg_key>a</arg_key></tool_call>", ("<tool_call>two words<arg_key>a</arg_key>"
              "</tool_call>"), []),  # not a call: kept as text
    # GLM-4-0414 / Z1: the name on its own line, then the JSON arguments
    ("glm4", 'get_weather\n{"city": "Paris", "days": 2}', None, [("get_weather", {"city": "Paris", "days": 2})]),
    ("glm4", "get_weather is a tool I could call.", "get_weather is a tool I could call.", []),
    ("glm4", 'unknown_tool\n{"a": 1}', 'unknown_tool\n{"a": 1}', []),
])
def test_glm_tool_calls_in_every_chunking(dialect, text, content, calls):
    got_content, got_calls = parse_tool_calls(text, dialect, WEATHER)
    assert got_content == content
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in got_calls] == calls
    for chunks in chunkings(text):
        s = ToolCallSplitter(dialect, WEATHER)
        streamed = "".join(s.feed(c) for c in chunks)
        rest, streamed_calls = s.finish()
        assert (streamed + rest or None) == content, chunks
        assert [c["function"] for c in streamed_calls] == [c["function"] for c in got_calls], chunks


def test_tool_dialect_follows_the_chat_template():
    assert tool_dialect("...<tool_call>{function-name}<arg_key>{arg-key-1}</arg_key>...") == "glm45"
    assert tool_dialect("[gMASK]<sop>{% if tools %}<|system|>...{% endif %}<|observation|>") == "glm4"
    assert tool_dialect("<|im_start|>...<tool_call>\n{\"name\": ...}</tool_call>") == "hermes"
    assert tool_dialect(None) == "hermes"


def test_reply_parses_the_dialect_its_template_teaches():
    """A GLM-4.7 answer streamed through Reply: content, then the call as OpenAI tool_calls."""
    text = "Sure.\n" + GLM45
    whole, stream = (Reply("chat", "m", 3, streaming, False, tools=WEATHER, dialect="glm45")
                     for streaming in (False, True))
    chunks = []
    for i in range(0, len(text), 5):
        d = Delta(0, text[i:i + 5], i // 5 + 1, "stop" if i + 5 >= len(text) else None)
        whole.add(d)
        chunks += stream.chunks(d)
    message = whole.final()["choices"][0]["message"]
    assert message["content"] == "Sure." and json.loads(message["tool_calls"][0]["function"]["arguments"]) == {
        "city": "Paris", "days": 3}
    deltas = [c["choices"][0]["delta"] for c in chunks]
    assert "".join(d.get("content", "") for d in deltas) == "Sure."
    assert [tc["function"] for d in deltas for tc in d.get("tool_calls", [])] == [
        c["function"] for c in message["tool_calls"]]
