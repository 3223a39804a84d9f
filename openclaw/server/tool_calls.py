"""Tool calls in a model's answer, in the format its chat template teaches, turned into OpenAI `tool_calls`:
- hermes (Qwen3 and other Hermes-style templates): <tool_call>{"name": ..., "arguments": {...}}</tool_call>
- glm45 (GLM-4.5 / 4.6 / 4.7, GLM-4.7-Flash): <tool_call>NAME<arg_key>K</arg_key><arg_value>V</arg_value>...
  </tool_call>, a string value written as it is, any other as JSON (newlines between the parts allowed)
- glm4 (GLM-4-0414, GLM-Z1): the whole answer is NAME on its own line, then the arguments as a JSON object

Text only: it finds the calls in the answer text (streamed or whole). A block that does not parse leaves the whole
answer as content, so nothing the model wrote is lost. Other formats (Llama 3's bare JSON, Mistral's [TOOL_CALLS]) are
not parsed; the server and its wire format are openai_api.py's.
"""

import json
import re
import uuid

from openclaw.reasoning import partial_suffix

TOOL_OPEN, TOOL_CLOSE = "<tool_call>", "</tool_call>"
_BLOCK = re.compile(r"<tool_call>(.*?)(?:</tool_call>|$)", re.DOTALL)
_ARG = re.compile(r"<arg_key>(.*?)</arg_key>\s*<arg_value>(.*?)</arg_value>", re.DOTALL)
DIALECTS = ("hermes", "glm45", "glm4")


def tool_dialect(chat_template: str | None) -> str:
    """The tool-call format a chat template teaches (module docstring): GLM-4.5+'s writes <arg_key>, GLM-4-0414's
    has an <|observation|> role but no <tool_call> tag; anything else is taken as Hermes-style."""
    template = chat_template or ""
    if "<arg_key>" in template:
        return "glm45"
    if "<|observation|>" in template and TOOL_OPEN not in template:
        return "glm4"
    return "hermes"


def _call(name: str, args) -> dict:
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
            "function": {"name": name, "arguments": args if isinstance(args, str) else json.dumps(args,
                                                                                                 ensure_ascii=False)}}


def _string_params(tools: list[dict] | None, name: str) -> set[str]:
    """The parameters the tool `name` declares as strings (GLM writes those raw, so they are never parsed)."""
    for tool in tools or []:
        fn = tool.get("function", tool) if isinstance(tool, dict) else {}
        if isinstance(fn, dict) and fn.get("name") == name:
            props = (fn.get("parameters") or {}).get("properties") or {}
            return {k for k, v in props.items() if isinstance(v, dict) and v.get("type") == "string"}
    return set()


def _glm45_block(block: str, tools: list[dict] | None) -> dict | None:
    name, _, _ = block.partition("<arg_key>")
    name = name.strip()
    if not name or "<" in name or "\n" in name:
        return None
    strings, args = _string_params(tools, name), {}
    rest = block[len(block.partition("<arg_key>")[0]):]
    if _ARG.sub("", rest).strip():  # something besides key/value pairs: not a call
        return None
    for key, value in _ARG.findall(rest):
        key, value = key.strip(), value.strip()
        if key in strings:
            args[key] = value
            continue
        try:
            args[key] = json.loads(value)
        except json.JSONDecodeError:
            args[key] = value
    return _call(name, args)


def _hermes_block(block: str) -> dict | None:
    try:
        call = json.loads(block)
    except json.JSONDecodeError:
        return None
    if not isinstance(call, dict) or not isinstance(call.get("name"), str):
        return None
    return _call(call["name"], call.get("arguments", call.get("parameters", {})))


def _glm4_answer(text: str, tools: list[dict] | None) -> dict | None:
    name, _, rest = text.strip().partition("\n")
    names = {(t.get("function", t) or {}).get("name") for t in tools or [] if isinstance(t, dict)}
    if name.strip() not in names:
        return None
    try:
        args = json.loads(rest)
    except json.JSONDecodeError:
        return None
    return _call(name.strip(), args) if isinstance(args, dict) else None


def parse_tool_calls(text: str, dialect: str = "hermes",
                     tools: list[dict] | None = None) -> tuple[str | None, list[dict]]:
    """(content, tool_calls) of an answer: the text outside the calls (None when blank) and one OpenAI tool call per
    call; (text, []) when there is none or one does not parse. tools: the request's tools (glm4 matches their names;
    glm45 keeps their string parameters unparsed)."""
    if dialect == "glm4":
        call = _glm4_answer(text, tools)
        return (None, [call]) if call else (text, [])
    blocks = _BLOCK.findall(text)
    if not blocks:
        return text, []
    calls = []
    for block in blocks:
        call = _glm45_block(block, tools) if dialect == "glm45" else _hermes_block(block)
        if call is None:
            return text, []
        calls.append(call)
    content = _BLOCK.sub("", text).strip()
    return content or None, calls


class ToolCallSplitter:
    """feed(text) -> answer text safe to stream now. From the first <tool_call> on, the text is held back until
    finish() parses it; a partial tag and trailing whitespace are held too, so the streamed content equals
    parse_tool_calls' and a tag split across deltas is still seen. In the glm4 dialect the call is the whole answer
    and has no tag: everything is held until finish()."""

    def __init__(self, dialect: str = "hermes", tools: list[dict] | None = None):
        self.buffer = ""
        self.dialect, self.tools = dialect, tools
        self.calling = dialect == "glm4"

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
        content, calls = parse_tool_calls(rest, self.dialect, self.tools)
        return content or "", calls
