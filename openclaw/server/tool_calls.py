"""Tool calls in a model's answer as Qwen3 (and other Hermes-style templates) write them: <tool_call>{json}</tool_call>.

Text only: it finds the calls in the answer text (streamed or whole) and turns them into OpenAI `tool_calls`.
A block that is not JSON with a "name" leaves the whole answer as content, so nothing the model wrote is lost.
Other formats (Llama 3's bare JSON, Mistral's [TOOL_CALLS]) are not parsed; the server and its wire format are
openai_api.py's.
"""

import json
import re
import uuid

from openclaw.reasoning import partial_suffix

TOOL_OPEN, TOOL_CLOSE = "<tool_call>", "</tool_call>"
_BLOCK = re.compile(r"<tool_call>(.*?)(?:</tool_call>|$)", re.DOTALL)


def parse_tool_calls(text: str) -> tuple[str | None, list[dict]]:
    """(content, tool_calls) of an answer: the text outside the blocks (None when blank) and one OpenAI tool call
    per block; (text, []) when there is no block or one does not parse."""
    blocks = _BLOCK.findall(text)
    if not blocks:
        return text, []
    calls = []
    for block in blocks:
        try:
            call = json.loads(block)
        except json.JSONDecodeError:
            return text, []
        if not isinstance(call, dict) or not isinstance(call.get("name"), str):
            return text, []
        args = call.get("arguments", call.get("parameters", {}))
        calls.append({"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                      "function": {"name": call["name"],
                                   "arguments": args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)}})
    content = _BLOCK.sub("", text).strip()
    return content or None, calls


class ToolCallSplitter:
    """feed(text) -> answer text safe to stream now. From the first <tool_call> on, the text is held back until
    finish() parses it; a partial tag and trailing whitespace are held too, so the streamed content equals
    parse_tool_calls' and a tag split across deltas is still seen."""

    def __init__(self):
        self.buffer = ""
        self.calling = False

    def feed(self, text: str) -> str:
        self.buffer += text
        if self.calling:
            return ""
        at = self.buffer.find(TOOL_OPEN)
        if at >= 0:
            self.calling = True
        else:
            at = len(self.buffer) - partial_suffix(self.buffer, TOOL_OPEN)
        at = len(self.buffer[:at].rstrip())  # whitespace before a call is not content: hold it until we know
        out, self.buffer = self.buffer[:at], self.buffer[at:]
        return out

    def finish(self) -> tuple[str, list[dict]]:
        """(the rest of the content, the tool calls) once the answer has ended."""
        rest, self.buffer = self.buffer, ""
        if not self.calling:
            return rest, []
        content, calls = parse_tool_calls(rest)
        return content or "", calls
