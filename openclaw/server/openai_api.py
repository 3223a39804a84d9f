"""The OpenAI wire format for the server: request bodies -> validated Requests, Deltas -> responses and chunks.

Anything a client can get wrong becomes an ApiError (a 4xx status and OpenAI's error body), never an exception
from deeper down. No HTTP and no threads here (server.py). `tools` reach the chat template and the calls in the
answer, in the format that template teaches (Hermes <tool_call> JSON, GLM's), come back as `tool_calls`
(tool_calls.py); tool_choice "none" leaves the tools out, any other tool_choice is taken as "auto" (nothing forces
a call). vLLM's extras (ignore_eos, min_tokens, stop_token_ids, skip_special_tokens, include_stop_str_in_output)
are honoured. A request that fails while decoding ends with finish_reason "error": a 4xx (its own fault) or 500
body, or in a stream a last chunk and an error event.
"""

import json
import time
import uuid
from dataclasses import dataclass, field

from openclaw.config import SamplingParams, ServerConfig
from openclaw.errors import OpenClawError
from openclaw.llm import LLM, Delta, Request
from openclaw.server.tool_calls import ToolCallSplitter, parse_tool_calls, tool_dialect

ROLES = {"system", "developer", "user", "assistant", "tool"}


class ApiError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code = status, message, kind, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


@dataclass
class Api:
    """What the server serves: one loaded model under one name, and its request defaults."""

    llm: LLM
    model_name: str
    max_tokens: int  # when a request gives none (capped by the context left after the prompt)
    limits: ServerConfig = field(default_factory=ServerConfig)
    created: int = field(default_factory=lambda: int(time.time()))

    def model_card(self) -> dict:
        return {"id": self.model_name, "object": "model", "created": self.created, "owned_by": "openclaw",
                "max_model_len": self.llm.engine.max_model_len}


def _check_model(api: Api, body: dict) -> None:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise ApiError(400, "\"model\" is required: the id /v1/models lists", param="model")
    if model.lower() != api.model_name.lower():
        raise ApiError(404, f"The model '{model}' does not exist; this server serves '{api.model_name}'",
                       param="model", code="model_not_found")


def _number(body: dict, name: str, kind: type, lo: float | None = None, hi: float | None = None):
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float) if kind is float else int):
        raise ApiError(400, f"\"{name}\" must be {'a number' if kind is float else 'an integer'}, not {value!r}",
                       param=name)
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise ApiError(400, f"\"{name}\" {value} must be in [{lo}, {hi}]", param=name)
    return kind(value)


def _flag(body: dict, name: str, default: bool) -> bool:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise ApiError(400, f"\"{name}\" must be true or false, not {value!r}", param=name)
    return value


def _token_ids(api: Api, body: dict, name: str) -> list[int]:
    ids = body.get(name) or []
    vocab = api.llm.tokenizer.vocab_size
    if not (isinstance(ids, list) and all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab
                                          for t in ids)):
        raise ApiError(400, f"\"{name}\" must be a list of token ids in [0, {vocab})", param=name)
    return ids


def _sampling(api: Api, body: dict, prompt_tokens: int) -> SamplingParams:
    if body.get("n") not in (None, 1) or body.get("best_of") not in (None, 1):
        raise ApiError(400, "only n=1 (and best_of=1) is supported", param="n")
    for name in ("presence_penalty", "frequency_penalty"):
        if body.get(name):
            raise ApiError(400, f"\"{name}\" is not supported; use repetition_penalty", param=name)
    if body.get("logprobs") or body.get("echo") or body.get("suffix"):
        raise ApiError(400, "logprobs, echo and suffix are not supported", param="logprobs")
    stop = body.get("stop")
    stop = [stop] if isinstance(stop, str) else stop or []
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop) or len(stop) > 16:
        raise ApiError(400, "\"stop\" must be a string or a list of at most 16 strings", param="stop")
    context = api.llm.engine.max_model_len
    room = context - prompt_tokens
    if room < 1:
        raise ApiError(400, f"This model's maximum context length is {context} tokens, and the prompt alone has "
                       f"{prompt_tokens}; shorten it", param="messages", code="context_length_exceeded")
    name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _number(body, name, int, 1)
    if max_tokens is not None and max_tokens > room:
        raise ApiError(400, f"This model's maximum context length is {context} tokens. However, you requested "
                       f"{prompt_tokens + max_tokens} tokens ({prompt_tokens} in the prompt, {max_tokens} in the "
                       f"completion). Please reduce the prompt or {name}.", param=name,
                       code="context_length_exceeded")
    try:
        return SamplingParams(
            temperature=_number(body, "temperature", float, 0, 2), top_p=_number(body, "top_p", float),
            top_k=_number(body, "top_k", int), min_p=_number(body, "min_p", float),
            repetition_penalty=_number(body, "repetition_penalty", float), seed=_number(body, "seed", int),
            max_tokens=max_tokens or _default_max_tokens(api, prompt_tokens), stop=stop,
            ignore_eos=_flag(body, "ignore_eos", False), min_tokens=_number(body, "min_tokens", int, 0) or 0,
            stop_token_ids=_token_ids(api, body, "stop_token_ids"),
            skip_special_tokens=_flag(body, "skip_special_tokens", True),
            include_stop_str_in_output=_flag(body, "include_stop_str_in_output", False),
        )
    except OpenClawError as e:
        raise ApiError(400, str(e)) from None


def _default_max_tokens(api: Api, prompt_tokens: int) -> int:
    """--max-tokens, capped by what the context and the KV pool leave (Engine.max_new_tokens): a request that gives
    no max_tokens should not be refused for a limit it never asked for."""
    return max(1, min(api.max_tokens, api.llm.engine.max_new_tokens(prompt_tokens)))


def _text_content(content, where: str) -> str | None:
    if content is None or isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) for p in content):
        if any(p.get("type") != "text" for p in content):
            raise ApiError(400, f"{where}: only text content parts are supported", param="messages")
        return "".join(str(p.get("text", "")) for p in content)
    raise ApiError(400, f"{where}: content must be a string or a list of text parts", param="messages")


def _messages(body: dict, limit: int) -> list[dict]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "\"messages\" must be a non-empty list", param="messages")
    if len(messages) > limit:  # before any is read: 900k tiny messages once took 22 s to refuse
        raise ApiError(400, f"{len(messages)} messages are over this server's limit of {limit}", param="messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise ApiError(400, f"messages[{i}] needs a role among {', '.join(sorted(ROLES))}", param="messages")
        m = {**m, "content": _text_content(m.get("content"), f"messages[{i}]")}
        if m["content"] is None:  # OpenAI allows none only beside an assistant's tool_calls; templates want text
            if m["role"] != "assistant":
                raise ApiError(400, f"messages[{i}]: a {m['role']} message needs \"content\"", param="messages")
            m["content"] = ""
        if m.get("tool_calls") is not None:
            m["tool_calls"] = _tool_calls(m["tool_calls"], i)
        if m["role"] == "developer":  # OpenAI's newer name for the system role; templates know "system"
            m["role"] = "system"
        out.append(m)
    return out


def _tool_calls(calls, i: int) -> list[dict]:
    """An assistant's tool_calls with JSON-string arguments parsed, as vLLM does: templates write them with tojson."""
    if not isinstance(calls, list) or not all(isinstance(c, dict) and isinstance(c.get("function"), dict)
                                              for c in calls):
        raise ApiError(400, f"messages[{i}].tool_calls must be a list of {{\"function\": {{...}}}} objects",
                       param="messages")
    out = []
    for c in calls:
        fn = dict(c["function"])
        if isinstance(fn.get("arguments"), str):
            try:
                fn["arguments"] = json.loads(fn["arguments"])
            except json.JSONDecodeError:
                pass  # left as the text the client sent
        out.append({**c, "function": fn})
    return out


def _tools(body: dict) -> list[dict] | None:
    tools, choice = body.get("tools"), body.get("tool_choice")
    if tools is not None and not (isinstance(tools, list) and all(isinstance(t, dict) for t in tools)):
        raise ApiError(400, "\"tools\" must be a list of tool objects", param="tools")
    if choice is not None and not isinstance(choice, (str, dict)):
        raise ApiError(400, "\"tool_choice\" must be \"none\", \"auto\", \"required\" or an object", param="tool_choice")
    return (tools or None) if choice != "none" else None


def _stream_flags(body: dict) -> tuple[bool, bool]:
    options = body.get("stream_options") or {}
    return bool(body.get("stream")), bool(isinstance(options, dict) and options.get("include_usage"))


def parse_chat(api: Api, body: dict) -> tuple[Request, "Reply"]:
    _check_model(api, body)
    messages = _messages(body, api.limits.max_messages)
    kwargs = body.get("chat_template_kwargs") or {}
    if not isinstance(kwargs, dict):
        raise ApiError(400, "\"chat_template_kwargs\" must be an object", param="chat_template_kwargs")
    think = kwargs.get("enable_thinking")
    if think is not None and not isinstance(think, bool):
        raise ApiError(400, f"\"enable_thinking\" must be true or false, not {think!r}", param="chat_template_kwargs")
    budget = _number(body, "thinking_budget", int, 1)
    tools = _tools(body)
    try:
        probe = api.llm.chat_request(messages, SamplingParams(), think, budget, tools)
    except OpenClawError as e:  # the chat template refused this conversation
        raise ApiError(400, str(e), param="messages") from None
    request = Request(probe.prompt_ids, _sampling(api, body, len(probe.prompt_ids)), probe.thinking, budget)
    return request, Reply("chat", api.model_name, len(request.prompt_ids), *_stream_flags(body), tools=tools,
                          dialect=tool_dialect(api.llm.tokenizer.chat_template))


def parse_completion(api: Api, body: dict) -> tuple[Request, "Reply"]:
    _check_model(api, body)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if isinstance(prompt, str) and prompt:
        try:
            ids = api.llm.tokenizer.encode(prompt, add_special_tokens=True)
        except OpenClawError as e:  # not valid Unicode
            raise ApiError(400, f"\"prompt\": {e}", param="prompt") from None
    elif isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        ids = prompt
        if max(ids) >= api.llm.tokenizer.vocab_size or min(ids) < 0:
            raise ApiError(400, f"token ids must be in [0, {api.llm.tokenizer.vocab_size})", param="prompt")
    else:
        raise ApiError(400, "\"prompt\" must be a non-empty string (or a list of token ids); one prompt per request",
                       param="prompt")
    request = Request(list(ids), _sampling(api, body, len(ids)), split_reasoning=False)
    return request, Reply("completion", api.model_name, len(ids), *_stream_flags(body))


class Reply:
    """One request's answer in OpenAI's shapes: chunks as deltas arrive (stream) or one body at the end."""

    def __init__(self, kind: str, model: str, prompt_tokens: int, stream: bool, include_usage: bool,
                 tools: list[dict] | None = None, dialect: str = "hermes"):
        self.kind, self.model, self.prompt_tokens = kind, model, prompt_tokens
        self.tool_list, self.dialect = tools, dialect  # the request's tools; the format the chat template teaches
        self.tools = ToolCallSplitter(dialect, tools) if tools else None  # parse the calls out of the answer
        self.stream, self.include_usage = stream, include_usage
        self.id = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        self.created = int(time.time())
        self.text = self.reasoning = ""
        self.completion_tokens, self.finish_reason = 0, None

    def _object(self, chunk: bool) -> str:
        return ("chat.completion" if self.kind == "chat" else "text_completion") + (".chunk" if chunk and
                                                                                     self.kind == "chat" else "")

    def _head(self, chunk: bool) -> dict:
        return {"id": self.id, "object": self._object(chunk), "created": self.created, "model": self.model}

    def usage(self) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens}

    def add(self, d: Delta) -> None:
        self.text += d.text
        self.reasoning += d.reasoning
        self.completion_tokens = d.completion_tokens
        if d.finish_reason:
            self.finish_reason = d.finish_reason if d.finish_reason in ("length", "error") else "stop"

    @staticmethod
    def error(d: Delta) -> ApiError:
        """What a request that failed while decoding (finish_reason "error") answers."""
        if d.input_error:  # an OpenClawError: the request's own fault, said as it is
            return ApiError(400, d.error or "the request failed")
        return ApiError(500, d.error or "the request failed", kind="server_error")

    def final(self) -> dict:
        if self.kind == "chat":
            content, calls = (parse_tool_calls(self.text, self.dialect, self.tool_list) if self.tools
                              else (self.text, []))
            message = {"role": "assistant", "content": content} | ({"tool_calls": calls} if calls else {})
            finish = "tool_calls" if calls and self.finish_reason == "stop" else self.finish_reason
            if self.reasoning:
                message["reasoning_content"] = self.reasoning
            choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": finish}
        else:
            choice = {"index": 0, "text": self.text, "logprobs": None, "finish_reason": self.finish_reason}
        return {**self._head(False), "choices": [choice], "usage": self.usage()}

    def _chunk(self, delta: dict, finish_reason: str | None = None) -> dict:
        if self.kind == "chat":
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        else:
            choice = {"index": 0, "text": delta.get("content", ""), "logprobs": None, "finish_reason": finish_reason}
        chunk = {**self._head(True), "choices": [choice]}
        return chunk | ({"usage": None} if self.include_usage else {})

    def first_chunk(self) -> dict | None:
        return self._chunk({"role": "assistant", "content": ""}) if self.kind == "chat" else None

    def chunks(self, d: Delta) -> list[dict]:
        self.add(d)
        text = self.tools.feed(d.text) if self.tools else d.text
        delta = {k: v for k, v in (("reasoning_content", d.reasoning), ("content", text)) if v}
        out = [self._chunk(delta)] if delta else []
        if d.finish_reason == "error":  # the last chunk says so, then an error event (the openai client raises it)
            return [*out, self._chunk({}, "error"), self.error(d).body()]
        if d.finish_reason:
            finish = self.finish_reason
            if self.tools:
                rest, calls = self.tools.finish()
                if rest:
                    out.append(self._chunk({"content": rest}))
                if calls:
                    out.append(self._chunk({"tool_calls": [{"index": i, **c} for i, c in enumerate(calls)]}))
                    finish = "tool_calls" if finish == "stop" else finish
            out.append(self._chunk({}, finish))
            if self.include_usage:
                out.append({**self._head(True), "choices": [], "usage": self.usage()})
        return out
