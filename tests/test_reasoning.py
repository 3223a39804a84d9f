"""The reasoning/answer split of streamed text, fed in every possible chunking (tags split across deltas)."""

import pytest

from openclaw.reasoning import ThinkSplitter, prompt_opens_thinking


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
