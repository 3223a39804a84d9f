"""Keys typed while chat streams an answer: not echoed into it, and handed to the next prompt (a real pty)."""

import os
import pty
import select
import termios

from openclaw.typeahead import TypeAhead


def shown(fd: int) -> bytes:
    """What the terminal has echoed back so far."""
    data = b""
    while select.select([fd], [], [], 0.2)[0]:
        data += os.read(fd, 1024)
    return data


def test_typing_during_an_answer_is_not_echoed_and_comes_back():
    master, slave = pty.openpty()
    try:
        before = termios.tcgetattr(slave)
        os.write(master, b"echoed")
        assert b"echoed" in shown(master)  # the control: a terminal echoes what is typed
        termios.tcflush(slave, termios.TCIFLUSH)
        with TypeAhead(slave) as keys:
            os.write(master, "next quéstion\r".encode())
            assert shown(master) == b""  # nothing lands inside the answer
        assert keys.text == "next quéstion"
        assert termios.tcgetattr(slave) == before  # the terminal is left as it was found
        with TypeAhead(slave):
            assert termios.tcgetattr(slave)[3] & termios.NOFLSH  # Ctrl-C (SIGINT) keeps what was typed before it
    finally:
        os.close(master)
        os.close(slave)


def test_off_a_terminal_it_does_nothing(tmp_path):
    with (tmp_path / "f").open("w+") as f, TypeAhead(f.fileno()) as keys:
        f.write("typed")
    assert keys.text == ""
