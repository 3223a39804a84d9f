"""Splits a model's streamed output into reasoning (<think>...</think>) and answer, as Qwen3 and R1 models write it.

Text only: it knows the tag convention, not tokens or sampling. Reasoning starts only at the very start of the
output (or in the prompt, for templates that end the prompt inside an open <think>), so an answer that merely
mentions the tag is left alone. Closing a thinking budget (injecting </think>) is the stream's job (llm.py).
"""

from enum import Enum

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


def prompt_opens_thinking(prompt_text: str) -> bool:
    """Whether the prompt ends inside an open <think> block, so the output starts as reasoning."""
    return prompt_text.rfind(THINK_OPEN) > prompt_text.rfind(THINK_CLOSE)


class Phase(Enum):
    START = "start"  # nothing but whitespace yet: <think> may still open
    THINKING = "thinking"
    ANSWER = "answer"


def partial_suffix(text: str, tag: str) -> int:
    """Length of the longest suffix of text that is a proper prefix of tag (held back: it may become the tag)."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0


class ThinkSplitter:
    """feed(text) -> (reasoning, answer) deltas; their concatenations are the reasoning and the answer without
    tags, without the newlines the template puts around them (it strips them when it renders the turn again)."""

    def __init__(self, thinking: bool = False):
        self.phase = Phase.THINKING if thinking else Phase.START
        self.buffer = ""
        self._strip = True  # drop newlines at the start of the reasoning and of the answer

    @property
    def thinking(self) -> bool:
        return self.phase is Phase.THINKING

    def feed(self, text: str) -> tuple[str, str]:
        self.buffer += text
        reasoning = answer = ""
        if self.phase is Phase.START:
            head = self.buffer.lstrip()
            if head.startswith(THINK_OPEN):
                self.phase, self.buffer = Phase.THINKING, head[len(THINK_OPEN):]
            elif THINK_OPEN.startswith(head):
                return "", ""  # empty, or a prefix of the tag: wait
            else:
                self.phase = Phase.ANSWER
        if self.phase is Phase.THINKING:
            if self._strip:
                self.buffer = self.buffer.lstrip("\n")
                self._strip = not self.buffer
            end = self.buffer.find(THINK_CLOSE)
            if end < 0:
                # hold back a possible start of </think> and trailing newlines (stripped if </think> follows)
                keep = len(self.buffer) - partial_suffix(self.buffer, THINK_CLOSE)
                keep = len(self.buffer[:keep].rstrip("\n"))
                reasoning, self.buffer = self.buffer[:keep], self.buffer[keep:]
                return reasoning, ""
            reasoning = self.buffer[:end].rstrip("\n")
            self.phase, self.buffer, self._strip = Phase.ANSWER, self.buffer[end + len(THINK_CLOSE):], True
        if self._strip:
            self.buffer = self.buffer.lstrip("\n")
            self._strip = not self.buffer
        answer, self.buffer = self.buffer, ""
        return reasoning, answer

    def flush(self) -> tuple[str, str]:
        """What is held back once the output ends (an unclosed reasoning stays reasoning)."""
        rest, self.buffer = self.buffer, ""
        return (rest, "") if self.phase is Phase.THINKING else ("", rest)
