"""mapped_chunks gives exactly the bytes asked for, window by window, and refuses a file that is too short;
sha256_of, which reads through it, gives the plain sha256."""

from __future__ import annotations

import fcntl
import hashlib
import mmap
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from nnwheel.errors import CheckpointError
from nnwheel.filemap import WINDOW_BYTES, mapped_chunks, sha256_of

GRAIN = mmap.ALLOCATIONGRANULARITY


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Two and a half windows of random bytes: reads cross window boundaries and end inside one."""
    content = os.urandom(2 * WINDOW_BYTES + WINDOW_BYTES // 2 + 7)
    path = tmp_path_factory.mktemp("filemap") / "data.bin"
    path.write_bytes(content)
    return path, content


def test_whole_file_in_windows(data):
    path, content = data
    chunks = list(mapped_chunks(path))
    assert [len(chunk) for chunk in chunks] == [WINDOW_BYTES, WINDOW_BYTES, WINDOW_BYTES // 2 + 7]
    assert b"".join(chunks) == content  # every chunk still readable after the later ones were taken


@pytest.mark.parametrize(
    ("offset", "size"),
    [
        (0, 1),
        (3, 10),  # inside the first page
        (GRAIN - 1, 2),  # across a page boundary
        (WINDOW_BYTES - 5, 10),  # across a window boundary
        (WINDOW_BYTES + 12345, WINDOW_BYTES + 999),  # from an unaligned offset over a whole window
        (2 * WINDOW_BYTES + 1, WINDOW_BYTES // 2 + 6),  # to the very end
        (100, 0),
    ],
)
def test_a_region(data, offset, size):
    path, content = data
    assert b"".join(mapped_chunks(path, offset, size)) == content[offset : offset + size]


def test_an_empty_file(tmp_path):
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    assert list(mapped_chunks(empty)) == []


def test_a_region_past_the_end_is_refused_before_reading(data):
    path, content = data
    with pytest.raises(CheckpointError, match="ended early"):
        next(mapped_chunks(path, len(content) - 10, 11))


def test_a_file_cut_short_between_windows(data, tmp_path):
    """A file that is open for writing gets no lease: cut short between two windows, the next one is refused."""
    _, content = data
    copy = tmp_path / "copy.bin"
    copy.write_bytes(content)
    with copy.open("r+b") as file:
        chunks = mapped_chunks(copy)
        assert len(next(chunks)) == WINDOW_BYTES  # not read again: its pages past the new end would be gone
        file.truncate(WINDOW_BYTES + 10)
        with pytest.raises(CheckpointError, match="ended early"):
            next(chunks)


def test_a_writer_waits_until_the_mapped_windows_are_read(data, tmp_path):
    """Another process that truncates the file waits on the lease: the window being read keeps its pages (no
    SIGBUS), the next window is refused, and the truncation goes ahead once the mappings are gone."""
    _, content = data
    copy = tmp_path / "copy.bin"
    copy.write_bytes(content)
    skip_without_leases(copy)
    chunks = mapped_chunks(copy)
    first = next(chunks)
    cutter = subprocess.Popen([sys.executable, "-c", f"import os; os.truncate({str(copy)!r}, 10)"])
    try:
        _wait_for_lease_break(copy)
        assert bytes(first[-4:]) == content[WINDOW_BYTES - 4 : WINDOW_BYTES]
        with pytest.raises(CheckpointError, match="is being written while it is read"):
            next(chunks)
        del first
        assert cutter.wait(10) == 0
    finally:
        cutter.kill()
    assert copy.stat().st_size == 10


def skip_without_leases(path):
    """The protection needs a file system that grants read leases (local ones on Linux do; NFS may not)."""
    with path.open("rb") as file:
        try:
            fcntl.fcntl(file.fileno(), fcntl.F_SETLEASE, fcntl.F_RDLCK)
        except OSError as error:
            pytest.skip(f"no read lease on {path.parent} ({error.strerror})")


def _wait_for_lease_break(path):
    """Until the kernel shows the file's lease as breaking: a writer is waiting for it."""
    inode = f":{path.stat().st_ino} "
    deadline = time.monotonic() + 10
    while not any(inode in line and "BREAKING" in line for line in Path("/proc/locks").read_text().splitlines()):
        assert time.monotonic() < deadline, "the truncation never asked for the lease"
        time.sleep(0.01)


def test_sha256_of(data):
    path, content = data
    assert sha256_of(path) == hashlib.sha256(content).hexdigest()
