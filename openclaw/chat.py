"""`openclaw chat`: the terminal chat. A REPL over one LLM that streams answers through rich.

It owns the conversation (messages, system prompt, thinking switch and budget, /save and /load) and the
terminal (readline input with history, multi-line entry, Ctrl-C stopping an answer, Ctrl-D leaving). It talks
to the user, like cli.py; decoding, the reasoning split and the thinking budget live in llm.py.
"""

import json
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console
from rich.table import Table

from openclaw.config import SamplingParams
from openclaw.errors import OpenClawError
from openclaw.llm import LLM
from openclaw.typeahead import TypeAhead

HELP = [
    ("/think on|off", "Qwen3-style thinking on or off (the template's switch)"),
    ("/think-budget N|off", "close the thinking after N tokens (injects </think>)"),
    ("/system TEXT", "set the system message (no TEXT: remove it)"),
    ("/reset", "start a new conversation (settings stay)"),
    ("/stats", "speed, context and KV use, memory"),
    ("/save FILE", "write the conversation and settings as JSON"),
    ("/load FILE", "read a conversation written by /save"),
    ("/help", "this list"),
    ("/exit", "leave (or Ctrl-D)"),
]
_FORMAT = "openclaw-chat/1"


@dataclass
class TurnStats:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    first_token_s: float = 0.0
    decode_tok_s: float = 0.0
    finish_reason: str = ""
    kv_len: int = 0  # KV entries the answer's sequence held at its end (prompt + answer, less what was evicted)
    kv_capacity: int = 0  # pool slots it owned
    eviction: str | None = None  # when and how eviction kept the answer within its KV range (LLM.eviction_note)


@dataclass
class Chat:
    llm: LLM
    params: SamplingParams
    out: Console
    err: Console
    system: str | None = None
    think: bool | None = None
    think_budget: int | None = None
    history_file: Path | None = None
    messages: list[dict] = field(default_factory=list)
    last: TurnStats = field(default_factory=TurnStats)
    turns: int = 0
    generated: int = 0
    evicted: bool = False  # the user has been told that eviction started
    _stop: bool = False
    _typed: str = ""  # typed while the last answer streamed: the next prompt starts with it


    def run(self) -> None:
        readline = _setup_readline(self.history_file)
        self.err.print("[dim]Type a message; /help lists commands; Ctrl-C stops an answer; Ctrl-D leaves.[/dim]")
        try:
            while True:
                try:
                    text = self.read()
                except EOFError:
                    self.out.print()
                    return
                except KeyboardInterrupt:  # at the prompt: drop the line, as a shell does
                    self.out.print()
                    continue
                except UnicodeDecodeError as e:
                    self.err.print(f"[bold red]error:[/bold red] the input is not UTF-8 text ({e.reason})")
                    continue
                try:
                    if text.startswith("/") and not text.startswith("//"):
                        if self.command(text) == "exit":
                            return
                    elif text.strip():
                        self.turn(text[1:] if text.startswith("//") else text)
                except Exception as e:  # noqa: BLE001 (a bug must never cost the conversation: say what broke, go on)
                    self.err.print(f"[bold red]internal error:[/bold red] {type(e).__name__}: {e} (the conversation "
                                   "is kept)", soft_wrap=True)
        finally:
            if readline and self.history_file:
                readline.write_history_file(self.history_file)

    def read(self) -> str:
        """One message: a trailing backslash continues the line; \"\"\" opens a block closed by \"\"\"."""
        line = self._first_line()
        if line.strip().startswith('"""'):
            lines, line = [], line.strip()[3:]
            while not line.rstrip().endswith('"""'):
                lines.append(line)
                line = input(_prompt("… ", "2"))
            lines.append(line.rstrip()[:-3])
            return "\n".join(lines).strip("\n")
        lines = []
        while line.endswith("\\"):
            lines.append(line[:-1])
            line = input(_prompt("… ", "2"))
        return "\n".join([*lines, line])


    def _first_line(self) -> str:
        typed, self._typed = self._typed, ""
        readline = sys.modules.get("readline")
        if not typed or readline is None:
            return input(_prompt("> ", "1;32"))
        readline.set_startup_hook(lambda: readline.insert_text(typed))  # editable, as if typed at the prompt
        try:
            return input(_prompt("> ", "1;32"))
        finally:
            readline.set_startup_hook(None)

    def conversation(self, messages: list[dict] | None = None) -> list[dict]:
        """The system message (if any) and these messages (default: the whole conversation)."""
        system = [{"role": "system", "content": self.system}] if self.system else []
        return system + (self.messages if messages is None else messages)

    def _prompt_tokens(self, messages: list[dict]) -> int:
        return len(self.llm.chat_ids(self.conversation(messages), **self._template()))

    def _fits(self, messages: list[dict]) -> bool:
        """Whether these messages' prompt leaves room to answer (Engine.max_new_tokens): a quarter of the space the
        prompt could take, at most --max-tokens; with a pinned prompt under eviction, any room at all (the answer's
        KV is evicted)."""
        engine = self.llm.engine
        ev = engine.evict
        need = 1 if ev.evicts and ev.pin_prompt else min(self.params.max_tokens, engine.max_new_tokens(0) // 4)
        return engine.max_new_tokens(self._prompt_tokens(messages)) >= need

    def _fit(self) -> int:
        """Drop the oldest turns until the prompt leaves room to answer; how many messages were dropped. A message
        that leaves no room even alone is refused first (OpenClawError), so nothing is dropped for it."""
        if not self._fits(self.messages[-1:]):
            raise OpenClawError(f"this message takes {self._prompt_tokens(self.messages[-1:])} tokens and leaves too "
                                f"little room to answer in the model's {self.llm.engine.max_model_len}-token context; "
                                "shorten it (the conversation is kept)")
        dropped = 0
        while not self._fits(self.messages) and len(self.messages) > 1:
            del self.messages[0]
            dropped += 1
            while len(self.messages) > 1 and self.messages[0]["role"] != "user":
                del self.messages[0]
                dropped += 1
        return dropped

    def _template(self) -> dict:
        return {} if self.think is None else {"enable_thinking": self.think}

    def turn(self, text: str) -> None:
        before = self.messages
        self.messages = [*before, {"role": "user", "content": text}]
        try:
            answer, reasoning, stats = self._answer()
        except OpenClawError as e:  # refused, or the answer failed (fp16 overflow): this turn is lost, not the chat
            self.messages = before
            self.err.print(f"[bold red]error:[/bold red] {e}", soft_wrap=True)
            return
        except BaseException:
            self.messages = before
            raise
        if stats.finish_reason == "abort":
            self.err.print("[dim](stopped)[/dim]")
        elif stats.finish_reason == "length":
            self.err.print(f"[dim](stopped at --max-tokens {self.params.max_tokens})[/dim]")
        if stats.eviction and not self.evicted:
            self.evicted = True
            self.err.print(f"[dim]({stats.eviction}; /stats shows it)[/dim]", soft_wrap=True)
        # The assistant turn keeps its reasoning apart: the template decides whether later prompts show it
        # (Qwen3's drops it from turns before the last user message).
        self.messages.append({"role": "assistant", "content": answer.strip(), "reasoning_content": reasoning.strip()})
        self.last, self.turns, self.generated = stats, self.turns + 1, self.generated + stats.completion_tokens

    def _answer(self) -> tuple[str, str, TurnStats]:
        """Stream the answer to the conversation, dropping the oldest turns first if it does not fit."""
        if dropped := self._fit():
            self.err.print(f"[dim](dropped the {dropped} oldest messages to fit the context)[/dim]")
        request = self.llm.chat_request(self.conversation(), self.params, self.think, self.think_budget)
        streams = self.llm.streams()
        key = streams.add(request)
        return self._stream(streams, key, len(request.prompt_ids))

    def _stream(self, streams, key: int, prompt_tokens: int) -> tuple[str, str, TurnStats]:
        answer = reasoning = ""
        error = None
        stats = TurnStats(prompt_tokens=prompt_tokens, finish_reason="abort")
        self._stop = False
        previous = signal.signal(signal.SIGINT, self._on_interrupt)
        t0 = time.perf_counter()
        first = None
        keys = TypeAhead(sys.stdin.fileno()) if sys.stdin.isatty() else None
        try:
            with keys or nullcontext():
                while streams and not self._stop:
                    for d in streams.step():
                        if self._stop:  # Ctrl-C came during this step: no more of the answer is shown
                            break
                        if first is None:
                            first = time.perf_counter()
                        if d.reasoning:
                            if not reasoning:
                                self.out.print("thinking: ", style="dim italic", end="")
                            self.out.print(d.reasoning, style="dim", end="", markup=False, highlight=False)
                            reasoning += d.reasoning
                        if d.text:
                            if reasoning and not answer:
                                self.out.print("\n")
                            self.out.print(d.text, end="", markup=False, highlight=False)
                            answer += d.text
                        stats.completion_tokens = d.completion_tokens
                        stats.kv_len, stats.kv_capacity = d.kv_len, d.kv_capacity
                        stats.eviction = d.eviction
                        if d.finish_reason:
                            stats.finish_reason = d.finish_reason
                        if d.error:
                            error = d.error
        finally:
            streams.close()
            signal.signal(signal.SIGINT, previous)
            self._typed = keys.text if keys else ""
        end = time.perf_counter()
        self.out.print()
        if error:
            raise OpenClawError(error)
        stats.first_token_s = (first or end) - t0
        if first is not None and stats.completion_tokens > 1 and end > first:
            stats.decode_tok_s = (stats.completion_tokens - 1) / (end - first)
        return answer, reasoning, stats

    def _on_interrupt(self, signum, frame) -> None:
        self._stop = True  # checked between engine steps, so the engine never stops halfway through one


    def command(self, text: str) -> str | None:
        name, _, arg = text.strip().partition(" ")
        arg = arg.strip()
        handlers = {"/think": self._think, "/think-budget": self._think_budget, "/system": self._system,
                    "/reset": self._reset, "/stats": self._stats, "/save": self._save, "/load": self._load,
                    "/help": self._help}
        if name in ("/exit", "/quit"):
            return "exit"
        if name not in handlers:
            self.err.print(f"unknown command {name}; /help lists them (start a message with // to send a /)")
            return None
        try:
            handlers[name](arg)
        except OpenClawError as e:
            self.err.print(f"[bold red]error:[/bold red] {e}", soft_wrap=True)
        return None

    def _note(self, text: str) -> None:
        self.err.print(f"[dim]{text}[/dim]", soft_wrap=True)

    def _think(self, arg: str) -> None:
        if arg not in ("on", "off"):
            raise OpenClawError(f"/think takes on or off, not {arg!r}")
        self.think = arg == "on"
        switch = "" if self.llm.has_thinking_switch else " (this model's chat template has no thinking switch)"
        self._note(f"thinking {arg}{switch}")

    def _think_budget(self, arg: str) -> None:
        if arg in ("off", "0"):
            self.think_budget = None
            self._note("thinking budget off")
            return
        if not (arg.isascii() and arg.isdigit()):  # "²".isdigit() is True, but int("²") raises
            raise OpenClawError(f"/think-budget takes a number of tokens or off, not {arg!r}")
        self.think_budget = int(arg)
        self._note(f"thinking closes after {self.think_budget} tokens")

    def _system(self, arg: str) -> None:
        self.system = arg or None
        self._note(f"system message set: {arg}" if arg else "system message removed")

    def _reset(self, arg: str) -> None:
        self.messages = []
        self._note("conversation cleared")

    def _stats(self, arg: str) -> None:
        engine, s = self.llm.engine, self.last
        context = len(self.llm.chat_ids(self.conversation(), **self._template())) if self.messages else 0
        table = Table(show_header=False, box=None, pad_edge=False)
        if self.turns:
            table.add_row("last answer", f"{s.completion_tokens} tokens ({s.finish_reason}), {s.decode_tok_s:.1f} tok/s "
                          f"decode, first token {s.first_token_s * 1000:.0f} ms, prompt {s.prompt_tokens} tokens")
        table.add_row("session", f"{self.turns} answers, {self.generated} tokens generated")
        table.add_row("context", f"{context} tokens in the conversation; the model takes {engine.max_model_len}")
        held = f"the last answer held {s.kv_len} KV entries in its {s.kv_capacity} slots; " if self.turns else ""
        table.add_row("KV", f"{held}pool of {engine.pool.num_slots} slots")
        table.add_row("eviction", _eviction(engine) + (f"; last answer: {s.eviction}" if s.eviction else ""))
        table.add_row("memory", _memory(engine))
        params = self.params.with_defaults(engine.sampling_defaults).__dict__
        table.add_row("sampling", ", ".join(f"{k} {v}" for k, v in params.items() if v is not None and v != []
                                            and v is not False))
        self.err.print(table)

    def _save(self, arg: str) -> None:
        if not arg:
            raise OpenClawError("/save needs a file name")
        data = {"format": _FORMAT, "model": self.llm.config.model, "system": self.system, "think": self.think,
                "think_budget": self.think_budget, "messages": self.messages}
        try:
            Path(arg).expanduser().write_text(json.dumps(data, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
        except OSError as e:
            raise OpenClawError(f"could not write {arg}: {e.strerror}") from e
        self._note(f"saved {len(self.messages)} messages to {arg}")

    def _load(self, arg: str) -> None:
        if not arg:
            raise OpenClawError("/load needs a file name")
        try:
            data = json.loads(Path(arg).expanduser().read_text(encoding="utf-8"))
        except OSError as e:
            raise OpenClawError(f"could not read {arg}: {e.strerror}") from e
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:  # RecursionError: nested too deep
            raise OpenClawError(f"{arg} is not a saved chat ({e})") from e
        if not isinstance(data, dict) or data.get("format") != _FORMAT:
            raise OpenClawError(f"{arg} is not a chat written by /save (no \"format\": \"{_FORMAT}\")")
        messages = data.get("messages")
        if not isinstance(messages, list) or not all(
                isinstance(m, dict) and m.get("role") in ("user", "assistant") and isinstance(m.get("content"), str)
                for m in messages):
            raise OpenClawError(f"{arg}: \"messages\" must be a list of user/assistant messages with text content")
        settings = {"system": (str, "text"), "think": (bool, "true or false"), "think_budget": (int, "a number of tokens")}
        for key, (kind, what) in settings.items():
            value = data.get(key)
            if value is not None and (not isinstance(value, kind) or (kind is int and (isinstance(value, bool)
                                                                                       or value < 1))):
                raise OpenClawError(f"{arg}: \"{key}\" must be {what} or null, not {value!r}")
        self.messages, self.system = messages, data.get("system")
        self.think, self.think_budget = data.get("think"), data.get("think_budget")
        self._note(f"loaded {len(messages)} messages from {arg}")
        for m in messages[-2:]:
            self.out.print(f"{m['role']}: ", style="bold", end="")
            self.out.print(m["content"], markup=False, highlight=False)

    def _help(self, arg: str) -> None:
        table = Table(show_header=False, box=None, pad_edge=False)
        for name, what in HELP:
            table.add_row(f"[bold]{name}[/bold]", what)
        self.err.print(table)
        self._note('Multi-line: end a line with \\ to continue it, or wrap the text in """ ... """.')


def _prompt(text: str, sgr: str) -> str:
    if not (sys.stdin.isatty() and sys.stdout.isatty()):
        return text  # piped: no colour codes in the output
    # readline counts the prompt's width; \001 ... \002 mark the escape codes as zero-width
    return f"\001\033[{sgr}m\002{text}\001\033[0m\002"


def _setup_readline(history_file: Path | None):
    """Line editing and history through the stdlib's readline, where the platform has it."""
    try:
        import readline
    except ImportError:  # Windows without pyreadline: plain input() still works
        return None
    readline.set_history_length(1000)
    if history_file is not None:
        history_file.parent.mkdir(parents=True, exist_ok=True)
        if history_file.is_file():
            readline.read_history_file(history_file)
    return readline


def _eviction(engine) -> str:
    ev = engine.evict
    if not ev.evicts:
        return "off (full attention; a sequence longer than the pool is refused)"
    online = engine.compressor.online
    stats = "" if ev.scorer != "triattention" else (
        f", online statistics of {online.tokens:,} tokens" if online is not None else f", statistics {ev.stats}")
    when = "once a sequence outgrows the pool" if ev.policy == "auto" else "from the first overflow"
    return f"{ev.policy}: {ev.scorer} keeps {ev.budget} entries {when}{stats}"


def _memory(engine) -> str:
    if engine.device.type != "cuda":
        return f"{engine.device.type}: weights and KV in host memory ({engine.dtype})"
    import torch

    used, peak = torch.cuda.memory_allocated(engine.device), torch.cuda.max_memory_allocated(engine.device)
    vram = engine.config.vram
    cap = vram * 2**30 if vram else torch.cuda.get_device_properties(engine.device).total_memory
    return f"VRAM {used / 2**30:.2f} GiB in use, peak {peak / 2**30:.2f} GiB, cap {cap / 2**30:.1f} GiB"
