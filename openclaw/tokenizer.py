"""Text <-> token ids for one model dir: the HF `tokenizers` backend, its chat template, and streaming text.

Owns encode/decode, chat rendering (jinja2, sandboxed, the way transformers renders it), the incremental
detokenizer and the stop-string checker. It never imports transformers and knows nothing about sampling.
"""

import json
from datetime import datetime
from pathlib import Path

import jinja2
import jinja2.ext
import jinja2.sandbox
import tokenizers

from openclaw.errors import OpenClawError

# The names transformers exposes to chat templates (its special_tokens_map), plus extra_special_tokens below.
_SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
# How many prompt tokens the detokenizer decodes as context, as vLLM does: enough to settle a leading space.
_PROMPT_CONTEXT = 5


def _token_str(value) -> str | None:
    """tokenizer_config stores a special token as a string or as a serialized AddedToken dict."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}
    except json.JSONDecodeError as e:
        raise OpenClawError(f"{path} is not valid JSON ({e}); re-download the model") from e


def _raise_exception(message: str):
    raise jinja2.TemplateError(message)


def _tojson(x, ensure_ascii: bool = False, indent: int | None = None, separators=None, sort_keys: bool = False) -> str:
    # jinja's own tojson escapes <, >, & and ' for HTML, which would change the prompt the model sees
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


# What one chat-template render may spend: characters of output (and of any string or list it builds), and loop
# iterations over all its loops. A prompt is a context's worth of text (a 128K-token context is ~0.5M characters),
# so these only stop templates that would run away: range(10**9), nested loops, 'x' * 10**9.
MAX_RENDER_CHARS = 2**25
MAX_LOOP_STEPS = 2**20
_BUDGET = "openclaw render budget"  # the render's _Budget in its context; no template can name a key with spaces


class _Budget:
    def __init__(self):
        self.steps = 0

    def step(self) -> None:
        self.steps += 1
        if self.steps > MAX_LOOP_STEPS:
            raise jinja2.sandbox.SecurityError(f"the template looped more than {MAX_LOOP_STEPS} times")


class _Sandbox(jinja2.sandbox.ImmutableSandboxedEnvironment):
    """The immutable sandbox, bounded: every {% for %} counts its iterations against the render's budget (the
    compiled loop iterates through bounded()), and * and ** refuse results past MAX_RENDER_CHARS."""

    intercepted_binops = frozenset({"*", "**"})

    def call_binop(self, context, operator: str, left, right):
        if (operator == "**" and isinstance(left, int) and isinstance(right, int)
                and abs(left).bit_length() * right > 8 * MAX_RENDER_CHARS):
            raise jinja2.sandbox.SecurityError(f"{left} ** {right} is too large a number")
        if operator == "*":
            seq, n = (left, right) if isinstance(right, int) else (right, left)
            if isinstance(seq, (str, list, tuple)) and isinstance(n, int) and len(seq) * n > MAX_RENDER_CHARS:
                raise jinja2.sandbox.SecurityError(f"a sequence of {len(seq)} repeated {n} times is too long")
        return super().call_binop(context, operator, left, right)

    @staticmethod
    def bounded(context, iterable):
        budget = context.get(_BUDGET)
        for item in iterable:
            budget.step()
            yield item


def _compile(template: str) -> jinja2.Template:
    # Templates come from the Hub: render them in the immutable sandbox with the helpers transformers provides
    env = _Sandbox(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    tree = env.parse(template)
    for loop in tree.find_all(jinja2.nodes.For):  # for x in ITER -> for x in environment.bounded(context, ITER)
        loop.iter = jinja2.nodes.Call(jinja2.nodes.EnvironmentAttribute("bounded"),
                                      [jinja2.nodes.ContextReference(), loop.iter], [], None, None)
    return env.from_string(tree)


def _render(template: jinja2.Template, context: dict) -> str:
    """The template's output, stopped past MAX_RENDER_CHARS (and loops past MAX_LOOP_STEPS)."""
    out, size = [], 0
    for chunk in template.generate(**context, **{_BUDGET: _Budget()}):
        size += len(chunk)
        if size > MAX_RENDER_CHARS:
            raise jinja2.sandbox.SecurityError(f"the template wrote more than {MAX_RENDER_CHARS} characters")
        out.append(chunk)
    return "".join(out)


class Tokenizer:
    """One model's tokenizer, read from tokenizer.json, tokenizer_config.json and generation_config.json."""

    def __init__(self, backend: tokenizers.Tokenizer, config: dict, generation_config: dict | None = None,
                 chat_template: str | dict[str, str] | None = None, name: str = "tokenizer"):
        self.backend = backend
        self.name = name
        self.vocab_size = backend.get_vocab_size(with_added_tokens=True)
        gen = generation_config or {}
        self.special_tokens = {k: s for k in _SPECIAL_TOKEN_NAMES if (s := _token_str(config.get(k))) is not None}
        extra = config.get("extra_special_tokens")
        if isinstance(extra, dict):  # named multimodal tokens (image_token, ...) that templates may reference
            self.special_tokens.update({k: s for k, v in extra.items() if (s := _token_str(v)) is not None})

        bos = self.special_tokens.get("bos_token")
        self.bos_id: int | None = backend.token_to_id(bos) if bos is not None else None
        if self.bos_id is None and isinstance(gen.get("bos_token_id"), int):
            self.bos_id = gen["bos_token_id"]
        self.add_bos_token = bool(config.get("add_bos_token", False))

        gen_eos = gen.get("eos_token_id")
        self.eos_ids: set[int] = set(gen_eos) if isinstance(gen_eos, list) else {gen_eos} if gen_eos is not None else set()
        eos = self.special_tokens.get("eos_token")
        if eos is not None and (eos_id := backend.token_to_id(eos)) is not None:
            self.eos_ids.add(eos_id)

        # A dict holds named templates ("default", "tool_use"), as tokenizer_config's list form does
        self._templates = chat_template if isinstance(chat_template, dict) else {"default": chat_template}
        self._templates = {k: v for k, v in self._templates.items() if v}
        self.chat_template: str | None = self._templates.get("default")
        self._compiled: dict[str, jinja2.Template] = {}

    @classmethod
    def from_dir(cls, path: Path) -> "Tokenizer":
        path = Path(path)
        tok_file = path / "tokenizer.json"
        if not tok_file.exists():
            raise OpenClawError(f"no tokenizer.json in {path}: the model dir needs the HF fast-tokenizer file "
                                "(slow-only tokenizers such as tokenizer.model alone are not supported)")
        try:
            backend = tokenizers.Tokenizer.from_file(str(tok_file))
        except Exception as e:  # the tokenizers library raises a bare Exception on malformed files
            raise OpenClawError(f"could not read {tok_file}: {e}") from e
        config = _read_json(path / "tokenizer_config.json")
        template = config.get("chat_template")
        if isinstance(template, list):
            template = {t["name"]: t["template"] for t in template}
        # A standalone chat_template.jinja wins over the config entry, as in transformers
        if (path / "chat_template.jinja").exists():
            template = (path / "chat_template.jinja").read_text(encoding="utf-8")
        return cls(backend, config, _read_json(path / "generation_config.json"), template, name=str(path))

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of `text`; add_special_tokens applies tokenizer.json's post-processor and add_bos_token."""
        try:
            ids = self.backend.encode(text, add_special_tokens=add_special_tokens).ids
        except TypeError:  # the Rust side takes valid Unicode only: a lone surrogate (JSON's "\ud800") is not
            bad = next((i for i, c in enumerate(text) if "\ud800" <= c <= "\udfff"), None)
            if bad is None:
                raise
            raise OpenClawError(f"the text holds a lone surrogate ({text[bad]!r} at character {bad}), which is not "
                                "valid Unicode") from None
        if add_special_tokens and self.add_bos_token and self.bos_id is not None and ids[:1] != [self.bos_id]:
            ids = [self.bos_id, *ids]
        return ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        # No clean_up_tokenization_spaces: it is meant for WordPiece and corrupts BPE text (transformers skips it too)
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = True, tools: list[dict] | None = None,
                    enable_thinking: bool | None = None, **extra) -> str:
        """The prompt text for a conversation, as transformers' apply_chat_template(..., tokenize=False) gives.

        No template is an error rather than a ChatML guess: a base model fed the wrong format silently
        produces nonsense, so the caller should send raw text (encode) instead.
        """
        name = "tool_use" if tools is not None and "tool_use" in self._templates else "default"
        template = self._templates.get(name)
        if template is None:
            raise OpenClawError(f"{self.name} has no chat template (neither tokenizer_config.json's chat_template "
                                "nor chat_template.jinja): send a plain prompt instead of chat messages")
        if not messages:
            raise OpenClawError("the conversation is empty: give at least one message")
        # Drop None values the way transformers does: templates test `'key' in message`, not for None
        messages = [{k: v for k, v in m.items() if v is not None} for m in messages]
        context = {"documents": None, **self.special_tokens, **extra, "messages": messages, "tools": tools,
                   "add_generation_prompt": add_generation_prompt}
        if enable_thinking is not None:  # templates test `enable_thinking is defined`
            context["enable_thinking"] = enable_thinking
        try:
            if name not in self._compiled:
                self._compiled[name] = _compile(template)
            return _render(self._compiled[name], context)
        except jinja2.TemplateSyntaxError as e:
            raise OpenClawError(f"the chat template of {self.name} does not parse (line {e.lineno}): {e.message}") from e
        except jinja2.TemplateError as e:
            raise OpenClawError(f"the chat template of {self.name} failed on this conversation: {e}") from e
        except Exception as e:  # the template is code from the model's files: whatever it raises is its failure
            raise OpenClawError(f"the chat template of {self.name} failed on this conversation "
                                f"({type(e).__name__}: {e})") from e

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True, tools: list[dict] | None = None,
                    enable_thinking: bool | None = None, **extra) -> list[int]:
        # The template writes BOS and the role tokens itself, so adding special tokens again would double them
        text = self.render_chat(messages, add_generation_prompt, tools, enable_thinking, **extra)
        return self.encode(text, add_special_tokens=False)


class IncrementalDetokenizer:
    """Turns generated ids into text deltas whose concatenation is the decoded text.

    Decodes a short window: text(prefix..end) minus text(prefix..read). The prefix token gives the decoder
    its context (SentencePiece's leading space, byte-level merges) and a delta is held back while the
    window ends in U+FFFD, i.e. inside a UTF-8 character split over byte tokens. Without prompt_ids the
    deltas join to decode(generated); with them the first token keeps the space the prompt implies (as
    vLLM does), which changes nothing for byte-level BPE.
    """

    def __init__(self, tokenizer: Tokenizer, prompt_ids: list[int] | None = None, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids = list(prompt_ids[-_PROMPT_CONTEXT:]) if prompt_ids else []
        self.prefix_offset = 0
        self.read_offset = len(self.ids)

    def _decode(self, start: int, end: int | None = None) -> str:
        return self.tokenizer.decode(self.ids[start:end], skip_special_tokens=self.skip_special_tokens)

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        prefix_text = self._decode(self.prefix_offset, self.read_offset)
        new_text = self._decode(self.prefix_offset)
        if len(new_text) <= len(prefix_text) or new_text.endswith("\ufffd"):
            return ""  # a skipped special token, or half a character: wait for more bytes
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return new_text[len(prefix_text):]

    def flush(self) -> str:
        """Whatever is held back (an incomplete character at the end comes out as U+FFFD, like decode)."""
        prefix_text = self._decode(self.prefix_offset, self.read_offset)
        new_text = self._decode(self.prefix_offset)
        self.prefix_offset = self.read_offset = len(self.ids)
        return new_text[len(prefix_text):]


class StopChecker:
    """Cuts streamed text at the first stop string (after it, when keep_stop), holding back a tail that may be the
    start of one."""

    def __init__(self, stop: list[str], keep_stop: bool = False):
        self.stop = [s for s in stop if s]  # an empty stop string would end every request at once
        self.keep_stop = keep_stop
        self.buffer = ""
        self.stopped = False

    def feed(self, text: str) -> tuple[str, bool]:
        """(text safe to emit now, whether a stop string was hit); nothing is emitted after a hit."""
        if self.stopped:
            return "", True
        self.buffer += text
        hits = [(i, len(s)) for s in self.stop if (i := self.buffer.find(s)) >= 0]
        if hits:
            i, n = min(hits)
            out, self.buffer, self.stopped = self.buffer[:i + n * self.keep_stop], "", True
            return out, True
        hold = 0
        for s in self.stop:
            # the longest buffer suffix that is a proper prefix of this stop string
            for n in range(min(len(s) - 1, len(self.buffer)), hold, -1):
                if self.buffer.endswith(s[:n]):
                    hold = n
                    break
        out, self.buffer = self.buffer[:len(self.buffer) - hold], self.buffer[len(self.buffer) - hold:]
        return out, False

    def flush(self) -> str:
        """The held-back tail once the stream ends without a stop string."""
        out, self.buffer = self.buffer, ""
        return out
