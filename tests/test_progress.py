"""The progress bar shows on a terminal for large work and stays out of pipes and logs."""

from __future__ import annotations

import io
import os
import pty
import select

import pytest

from nnwheel.progress import SHOW_ABOVE_BYTES, Progress

GIB = 1 << 30


@pytest.fixture
def terminal():
    """A real pseudo-terminal: what Progress writes to its slave end can be read from the master."""
    master, slave = pty.openpty()
    stream = os.fdopen(slave, "w")
    yield stream, master
    stream.close()
    os.close(master)


def read_terminal(master: int, last: str) -> str:
    """What the terminal shows up to `last`: the kernel hands written bytes to the master end a piece at
    a time, so one read may return only the first of them."""
    shown = ""
    while not shown.endswith(last):
        ready, _, _ = select.select([master], [], [], 10)
        assert ready, f"the terminal showed {shown!r}, then nothing for 10 s"
        shown += os.read(master, 1 << 16).decode()
    return shown


def test_bar_on_a_terminal(terminal):
    stream, master = terminal
    with Progress(GIB, "writing mnist_mlp.whl", stream=stream) as progress:
        progress.advance(GIB // 2)
        progress.advance(GIB // 2)

    shown = read_terminal(master, "\n")
    assert shown.startswith("\rwriting mnist_mlp.whl [")
    assert " 50% 537/1074 MB " in shown
    assert "[" + "#" * 30 + "] 100% 1074/1074 MB " in shown
    assert " MB/s" in shown
    assert shown.endswith("\r\n")  # the terminal turns the final newline into CR LF


def test_silent_when_not_a_terminal():
    stream = io.StringIO()
    with Progress(GIB, "writing", stream=stream) as progress:
        progress.advance(GIB)
    assert stream.getvalue() == ""


def test_silent_for_small_work(terminal):
    stream, master = terminal
    with Progress(SHOW_ABOVE_BYTES, "writing", stream=stream) as progress:
        progress.advance(SHOW_ABOVE_BYTES)
    stream.write("end")
    stream.flush()
    assert read_terminal(master, "end") == "end"
