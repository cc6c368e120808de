"""mapped_chunks gives exactly the bytes asked for, window by window, and refuses a file that is too short;
sha256_of, which reads through it, gives the plain sha256."""

from __future__ import annotations

import hashlib
import mmap
import os

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
    path, content = data
    copy = tmp_path / "copy.bin"
    copy.write_bytes(content)
    chunks = mapped_chunks(copy)
    assert len(next(chunks)) == WINDOW_BYTES  # not read again: its pages past the new end would be gone
    with copy.open("r+b") as file:
        file.truncate(WINDOW_BYTES + 10)
    with pytest.raises(CheckpointError, match="ended early"):
        next(chunks)


def test_sha256_of(data):
    path, content = data
    assert sha256_of(path) == hashlib.sha256(content).hexdigest()
