"""`openclaw chat` driven through a real pseudo-terminal, as a person types: turns, commands, Ctrl-C, Ctrl-D."""

import fcntl
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
        term.send("\x03")
        stopped = term.expect(PROMPT, timeout=30)
        assert "(stopped)" in stopped
        term.send("/stats\r")
        m = re.search(r"last answer\s+(\d+) tokens \(abort\)", term.expect(PROMPT))
        assert m and 6 <= int(m.group(1)) < 64, m  # stopped mid-answer, well before --max-tokens

        term.send('"""\rWhat is the capital\rof Italy?\r"""\r')  # a multi-line message
        assert "Rome" in term.expect(PROMPT)
        term.send(f"/load {tmp_path / 'talk.json'}\r")
        assert "loaded 4 messages" in term.expect(PROMPT)
        term.send("/nope\r")
        assert "unknown command /nope" in term.expect(PROMPT)
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
