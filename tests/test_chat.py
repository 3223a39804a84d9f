"""`openclaw chat` driven through a real pseudo-terminal, as a person types: turns, commands, Ctrl-C, Ctrl-D."""

import fcntl
import io
import json
import os
import pty
import re
import select
import signal
import struct
import sys
import termios
import time

import pytest
import torch
from rich.console import Console
from test_tokenizer import QWEN3_TEMPLATE

from openclaw.chat import HELP, Chat
from openclaw.config import EngineConfig, EvictionConfig, SamplingParams
from openclaw.llm import LLM
from openclaw.tokenizer import Tokenizer

pytestmark = pytest.mark.slow
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b[()][A-Z0-9]|[\x01\x02\r]")


class Terminal:
    """A child process on a pty (its controlling terminal, so ^C reaches it as SIGINT), read with timeouts."""

    def __init__(self, args: list[str], env: dict, cols: int = 100):
        self.pid, self.fd = pty.fork()
        if self.pid == 0:  # the child: become the program
            os.execve(sys.executable, [sys.executable, "-m", "openclaw", *args], env)
        fcntl.ioctl(self.fd, termios.TIOCSWINSZ, struct.pack("HHHH", 40, cols, 0, 0))
        self.raw = b""  # everything the terminal showed, escape codes included
        self.seen = 0  # how much of the plain text expect() has consumed

    @property
    def text(self) -> str:
        return ANSI.sub("", self.raw.decode("utf-8", "replace"))

    def _read(self, timeout: float) -> bool:
        ready, _, _ = select.select([self.fd], [], [], timeout)
        if not ready:
            return True
        try:
            chunk = os.read(self.fd, 65536)
        except OSError:  # EIO: the child closed the terminal
            return False
        self.raw += chunk
        return bool(chunk)

    def expect(self, pattern: str, timeout: float = 240) -> str:
        """Wait for a regex in the not-yet-consumed text; return the text up to and including the match."""
        deadline = time.monotonic() + timeout
        while True:
            m = re.compile(pattern).search(self.text, self.seen)
            if m:
                consumed, self.seen = self.text[self.seen:m.end()], m.end()
                return consumed
            if time.monotonic() > deadline or not self._read(min(0.5, deadline - time.monotonic())):
                raise AssertionError(f"no {pattern!r} in the terminal; it shows:\n{self.text[self.seen:]}")

    def send(self, keys: str) -> None:
        os.write(self.fd, keys.encode())

    def wait(self, timeout: float = 20) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._read(0.2)
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                return os.waitstatus_to_exitcode(status)
        self.kill()
        raise AssertionError(f"chat did not exit; the terminal shows:\n{self.text[-2000:]}")

    def kill(self) -> None:
        try:
            os.kill(self.pid, signal.SIGKILL)
            os.waitpid(self.pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass
        os.close(self.fd)


PROMPT = r"\n> $"


@pytest.fixture
def chat_env(tmp_path):
    return {"HOME": str(tmp_path), "OPENCLAW_CACHE": str(tmp_path / "cache"), "TERM": "xterm-256color",
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LANG": "C.UTF-8"}


def start(model_dir, env, *flags) -> Terminal:
    term = Terminal(["chat", str(model_dir), "--device", "cpu", "--temperature", "0", "--kv-tokens", "4096",
                     *flags], env)
    term.expect(r"/help lists commands.*\n> ", timeout=120)
    return term


def test_chat_turns_commands_ctrl_c_and_ctrl_d(smol_model_dir, chat_env, tmp_path):
    term = start(smol_model_dir, chat_env, "--max-tokens", "64")
    try:
        term.send("What is the capital of France?\r")
        assert "Paris" in term.expect(PROMPT)
        term.send("And what is the capital of Germany?\r")  # answerable only with the first turn in context
        assert "Berlin" in term.expect(PROMPT)
        term.send("/stats\r")
        stats = term.expect(PROMPT)
        assert re.search(r"last answer\s+\d+ tokens \(stop\), [\d.]+ tok/s decode", stats), stats
        assert re.search(r"context\s+\d+ tokens in the conversation; the model takes 8192", stats), stats
        assert re.search(r"KV\s+the last answer held \d+ KV entries in its \d+ slots; pool of 4096 slots", stats), stats
        assert re.search(r"session\s+2 answers", stats) and "temperature 0.0" in stats, stats
        term.send(f"/save {tmp_path / 'talk.json'}\r")
        assert "saved 4 messages" in term.expect(PROMPT)
        term.send("/reset\r")
        assert "conversation cleared" in term.expect(PROMPT)
        term.send("/stats\r")
        assert re.search(r"context\s+0 tokens", term.expect(PROMPT))

        term.send("Write a very long story about a dragon who collects teapots.\r")
        term.expect(r"teapots\.\n")  # the terminal echoed the message; now the answer streams
        assert len(term.expect(r"(\w+\W+){6}").split()) >= 6
        term.send("typed ahead")  # typed during the answer: kept out of it, waiting at the next prompt
        time.sleep(0.3)
        term.send("\x03")
        stopped = term.expect(r"\n> typed ahead$", timeout=30)
        assert "(stopped)" in stopped and stopped.count("typed ahead") == 1, stopped
        term.send("\x15")  # Ctrl-U: readline clears the line
        term.send("/stats\r")
        m = re.search(r"last answer\s+(\d+) tokens \(abort\)", term.expect(PROMPT))
        assert m and 6 <= int(m.group(1)) < 64, m  # stopped mid-answer, well before --max-tokens

        term.send('"""\rWhat is the capital\rof Italy?\r"""\r')  # a multi-line message
        assert "Rome" in term.expect(PROMPT)
        term.send(f"/load {tmp_path / 'talk.json'}\r")
        assert "loaded 4 messages" in term.expect(PROMPT)
        term.send("/nope\r")
        assert "unknown command /nope" in term.expect(PROMPT)
        term.send("/help\r")
        shown = term.expect(PROMPT)
        assert all(name.split()[0] in shown for name, _ in HELP) and "Multi-line" in shown
        term.send("\x04")
        assert term.wait() == 0
    finally:
        term.kill()
    saved = json.loads((tmp_path / "talk.json").read_text())
    assert [m["role"] for m in saved["messages"]] == ["user", "assistant"] * 2
    assert "Berlin" in saved["messages"][3]["content"]
    assert (tmp_path / "cache" / "chat_history").read_text().count("capital") >= 3  # readline history kept


def test_thinking_is_dimmed_budgeted_and_left_out_of_the_next_prompt(smol_thinking_dir, chat_env):
    term = start(smol_thinking_dir, chat_env, "--max-tokens", "40")
    try:
        term.send("/think-budget 6\r")
        assert "thinking closes after 6 tokens" in term.expect(PROMPT)
        term.send("Write a short poem about the sea.\r")
        answer = term.expect(PROMPT)
        assert "thinking: " in answer
        dim = re.search(rb"\x1b\[2m([^\x1b]+)\x1b\[0m", term.raw)  # the reasoning, in rich's dim style
        assert dim and dim.group(1).strip(), term.raw[-1500:]
        term.send("/think off\r")
        assert "thinking off" in term.expect(PROMPT)
        term.send("Thanks!\r")
        assert "thinking: " not in term.expect(PROMPT)
        term.send("/exit\r")
        assert term.wait() == 0
    finally:
        term.kill()


def in_process(model_dir, max_tokens: int, **config) -> tuple[Chat, io.StringIO]:
    """A Chat on the real model without a terminal: what it prints to stderr (notes, errors) comes back as text."""
    llm = LLM(EngineConfig(model=str(model_dir), device="cpu", max_seqs=1, **config))
    err = io.StringIO()
    return Chat(llm, SamplingParams(temperature=0, max_tokens=max_tokens), Console(file=io.StringIO(), width=200),
                Console(file=err, width=200)), err


def test_bad_command_input_gets_one_line(smol_model_dir, tmp_path):
    chat, err = in_process(smol_model_dir, 8, kv_tokens=1024)
    (tmp_path / "notjson.json").write_text("{oops")
    (tmp_path / "odd.json").write_text(json.dumps({"format": "openclaw-chat/1", "messages": [], "think_budget": "x"}))
    (tmp_path / "roles.json").write_text(json.dumps({"format": "openclaw-chat/1", "messages": [{"role": "bot"}]}))
    for command, message in [
        ("/think maybe", "/think takes on or off, not 'maybe'"),
        ("/think-budget lots", "/think-budget takes a number of tokens or off"),
        ("/save", "/save needs a file name"),
        (f"/save {tmp_path}", f"could not write {tmp_path}"),
        ("/load", "/load needs a file name"),
        (f"/load {tmp_path / 'none.json'}", "could not read"),
        (f"/load {tmp_path / 'notjson.json'}", "is not a saved chat"),
        (f"/load {tmp_path / 'odd.json'}", "\"think_budget\" must be a number of tokens or null, not 'x'"),
        (f"/load {tmp_path / 'roles.json'}", "must be a list of user/assistant messages"),
    ]:
        err.seek(0), err.truncate()
        assert chat.command(command) is None
        lines = err.getvalue().strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], (command, lines)
    assert chat.think is None and chat.think_budget is None and chat.messages == []  # nothing half-applied
    chat.command("/system Answer in one word.")
    assert chat.conversation() == [{"role": "system", "content": "Answer in one word."}]
    assert "Answer in one word." in chat.llm.tokenizer.render_chat(chat.conversation() + [{"role": "user",
                                                                                          "content": "hi"}])
    chat.command("/system")
    assert chat.system is None and "system message removed" in err.getvalue()


def test_thinking_is_kept_apart_and_out_of_the_next_prompt(smol_thinking_dir, tmp_path):
    chat, _ = in_process(smol_thinking_dir, 24, kv_tokens=1024)
    chat.think_budget = 6
    chat.turn("Write a short poem about the sea.")
    reasoning, answer = chat.messages[-1]["reasoning_content"], chat.messages[-1]["content"]
    assert len(reasoning) > 5 and answer and "think>" not in reasoning + answer
    nxt = chat.conversation() + [{"role": "user", "content": "Thanks!"}]

    def left_out(prompt: str) -> bool:  # the answer may repeat the reasoning's words: count, and look for the tag
        return answer in prompt and "</think>" not in prompt and prompt.count(reasoning) == answer.count(reasoning)

    assert left_out(chat.llm.tokenizer.render_chat(nxt))
    qwen3 = tmp_path / "qwen3"  # and Qwen3's own template, which drops reasoning_content before the last question
    qwen3.mkdir()
    for f in smol_thinking_dir.iterdir():
        if f.name != "chat_template.jinja":
            (qwen3 / f.name).symlink_to(f)
    (qwen3 / "chat_template.jinja").write_text(QWEN3_TEMPLATE)
    assert left_out(Tokenizer.from_dir(qwen3).render_chat(nxt))
    assert not left_out(Tokenizer.from_dir(qwen3).render_chat(nxt[:-1]))  # the last turn's reasoning: kept


@pytest.mark.parametrize("evict", [EvictionConfig(policy="full"), EvictionConfig(policy="streaming", budget=32, divide_length=64,
                                                        protect_recent=8, pin_prompt=False)])
def test_a_session_longer_than_the_kv_pool_keeps_going(smol_model_dir, evict):
    """A pool of 128 slots, and a conversation that outgrows it: without eviction the oldest turn is dropped (and
    the chat says so); with an eviction budget the whole conversation stays in the prompt."""
    chat, err = in_process(smol_model_dir, 8, kv_tokens=128, evict=evict)
    for i in range(2):
        chat.turn(f"Here is a fact about the number {i + 3}: it is a number. " * 3 + "Say something about it.")
        assert chat.last.finish_reason in ("stop", "length") and chat.last.completion_tokens >= 1
    chat.command("/stats")
    if not evict.evicts:
        assert "dropped the 2 oldest messages" in err.getvalue() and len(chat.messages) == 2
        assert chat.last.prompt_tokens + chat.last.completion_tokens <= 128
        assert chat.last.eviction is None and "took over" not in err.getvalue()
        assert re.search(r"eviction\s+off \(full attention", err.getvalue()), err.getvalue()  # /stats
    else:
        assert "dropped" not in err.getvalue() and len(chat.messages) == 4
        assert chat.last.prompt_tokens > 128 and chat.last.kv_len <= 32 + 64
        m = re.match(r"KV range of \d+ slots full after [\d,]+ tokens: streaming eviction took over, keeping 32 "
                     r"entries \((\d+) compressions so far\)", chat.last.eviction or "")
        assert m and int(m.group(1)) >= 1, chat.last.eviction
        assert re.search(r"eviction\s+streaming: streaming keeps 32 entries from the first overflow", err.getvalue())
        assert "last answer: KV range" in err.getvalue().replace("\n", " ").replace("│", " "), err.getvalue()


def test_ctrl_c_shows_nothing_of_the_step_it_lands_in(smol_model_dir):
    """After Ctrl-C the text of the step that was running still printed."""
    chat, err = in_process(smol_model_dir, 40, kv_tokens=1024)
    streams = chat.llm.streams

    def interrupted_streams():
        live = streams()
        step = live.step

        def step_and_ctrl_c():
            deltas = step()
            if any(d.text for d in deltas):
                chat._on_interrupt(signal.SIGINT, None)  # the signal arrives while this step runs
            return deltas

        live.step = step_and_ctrl_c
        return live

    chat.llm.streams = interrupted_streams
    chat.turn("Write a long story about a dragon.")
    assert chat.last.finish_reason == "abort" and "(stopped)" in err.getvalue()
    assert chat.out.file.getvalue().strip() == "" and chat.messages[-1]["content"] == ""


def test_an_over_long_message_is_refused_before_any_turn_is_dropped(smol_model_dir, tmp_path):
    """It dropped every old turn and was then refused anyway: /stats showed context 0 and /save wrote 0 messages.
    Full attention: with --evict auto (the default) the message would run, past its KV range."""
    chat, err = in_process(smol_model_dir, 8, kv_tokens=256, evict=EvictionConfig(policy="full"))
    chat.turn("What is the capital of France?")
    chat.turn("And of Germany?")
    before = list(chat.messages)
    assert len(before) == 4
    chat.turn("Please read this. " * 80)
    assert chat.messages == before
    assert re.search(r"error: this message takes \d+ tokens and leaves too little room to answer", err.getvalue())
    chat.command(f"/save {tmp_path / 'kept.json'}")
    assert "saved 4 messages" in err.getvalue()
    chat.turn("And of Italy?")  # the conversation goes on where it was
    assert len(chat.messages) == 6 and chat.messages[:4] == before


def test_bad_budgets_deep_files_and_failed_answers_keep_the_conversation(smol_model_dir, tmp_path):
    """/think-budget ² raised ValueError and /load of deeply nested JSON RecursionError: the chat died with its
    conversation. A row with non-finite logits ends this answer with an error, and only it."""
    chat, err = in_process(smol_model_dir, 8, kv_tokens=1024)
    chat.turn("What is the capital of France?")
    before = list(chat.messages)
    (tmp_path / "deep.json").write_text("[" * 100_000 + "]" * 100_000)
    for command, message in [("/think-budget ²", "/think-budget takes a number of tokens or off, not '²'"),
                             ("/think-budget ٣", "not '٣'"), (f"/load {tmp_path / 'deep.json'}", "is not a saved chat")]:
        err.seek(0), err.truncate()
        assert chat.command(command) is None
        lines = err.getvalue().strip().splitlines()
        assert len(lines) == 1 and message in lines[0], lines
    step = chat.llm.engine.runner.step

    def nan_logits(batch, tap=None, rows=None):
        logits, seqs = step(batch, tap, rows)
        with torch.inference_mode():
            logits[:, 0] = float("nan")
        return logits, seqs

    chat.llm.engine.runner.step = nan_logits
    err.seek(0), err.truncate()
    chat.turn("And of Germany?")
    assert "(non-finite logits); rerun with --dtype bfloat16" in err.getvalue() and chat.messages == before
    chat.llm.engine.runner.step = step
    chat.turn("And of Germany?")
    assert len(chat.messages) == 4 and "Berlin" in chat.messages[-1]["content"]


def test_an_answer_that_outgrows_the_kv_range_evicts_and_the_chat_says_so_once(smol_model_dir):
    """No eviction flags and a 256-slot pool: each answer runs past its range (TriAttention takes over, --evict auto)
    instead of stopping, the chat says so once, and /stats shows it."""
    chat, err = in_process(smol_model_dir, 400, kv_tokens=256)
    chat.turn("Write a long, detailed story about a lighthouse keeper who finds a message in a bottle.")
    chat.turn("Now tell the same story from the point of view of the bottle.")
    assert chat.last.finish_reason == "length" and chat.last.completion_tokens == 400
    assert err.getvalue().count("TriAttention eviction took over") == 1, err.getvalue()
    assert "KV range of 256 slots full after" in err.getvalue()
    before = len(err.getvalue())
    chat.command("/stats")
    assert "triattention keeps 128 entries" in err.getvalue()[before:], err.getvalue()[before:]
