"""Keys typed while the chat streams an answer: kept off the screen, and handed to the next prompt.

A terminal echoes what is typed at once, so text typed during an answer landed inside it, and the line-editing prompt
that came next did not show it. TypeAhead turns the terminal's echo (and line buffering) off for the answer, reads what
was typed when it ends, and leaves the terminal as it found it. Off a terminal (a pipe, a file) it does nothing.
It does not read the prompt itself (chat.py does, through readline).
"""

import os
import select
import sys

try:
    import termios
except ImportError:  # Windows: no termios; typing during an answer shows as the console shows it
    termios = None


class TypeAhead:
    """with TypeAhead(fd) as keys: ...; keys.text is what was typed meanwhile (newlines become spaces)."""

    def __init__(self, fd: int | None = None):
        self.fd = sys.stdin.fileno() if fd is None else fd
        self.text = ""
        self._saved = None

    def __enter__(self):
        if termios is None or not os.isatty(self.fd):
            return self
        self._saved = termios.tcgetattr(self.fd)
        quiet = termios.tcgetattr(self.fd)
        quiet[3] &= ~(termios.ECHO | termios.ICANON)  # lflags; ISIG stays on, so Ctrl-C still stops the answer,
        quiet[3] |= termios.NOFLSH  # and without throwing away what was typed before it
        termios.tcsetattr(self.fd, termios.TCSANOW, quiet)
        return self

    def __exit__(self, *exc) -> None:
        if self._saved is None:
            return
        data = b""
        try:
            while select.select([self.fd], [], [], 0)[0]:
                chunk = os.read(self.fd, 4096)
                if not chunk:
                    break
                data += chunk
        finally:
            termios.tcsetattr(self.fd, termios.TCSANOW, self._saved)
            self._saved = None
        text = data.decode("utf-8", errors="replace")
        # a line break typed during the answer would send the text unseen; keep it on the next prompt instead
        self.text = " ".join(part for part in text.replace("\r", "\n").split("\n") if part).strip()
