"""Read large files through memory maps, a window at a time.

Hashing a checkpoint, or copying its bytes into a wheel, straight from the page cache spares the copy that
read() makes into a buffer of ours: a quarter of a second of CPU per GiB on our 2-core benchmark machine,
where wrap keeps both cores busy with two sha256 passes and an import of torch. A window is unmapped once
nothing refers to it, so no more than a window or two of a file ever counts in a process's resident memory.
"""

from __future__ import annotations

import hashlib
import mmap
import os
from collections.abc import Iterator
from pathlib import Path

from .errors import CheckpointError
from .progress import Progress

# Large because hashes often run on a second thread while the first runs Python (import torch): each chunk
# costs that thread a wait for the GIL (up to the 5 ms switch interval). A multiple of ALLOCATIONGRANULARITY.
WINDOW_BYTES = 16 << 20
# Maps each window's pages at once instead of taking a page fault every 64 KiB (Linux only).
_POPULATE = getattr(mmap, "MAP_POPULATE", 0)


def mapped_chunks(path: Path, offset: int = 0, size: int | None = None) -> Iterator[memoryview]:
    """The bytes of `path` from `offset`, `size` of them (to the end by default), one window per chunk.

    A chunk stays valid for as long as something refers to it. A file shorter than the bytes asked for, or
    cut short between two windows, raises CheckpointError. One cut short under a window being read ends the
    process with SIGBUS, as it would under torch.load(mmap=True): wrap refuses a checkpoint that changes
    while it is wrapped (checkpoint.check_unchanged), but cannot stop another process from truncating it.
    """
    with path.open("rb") as file:
        end = os.fstat(file.fileno()).st_size if size is None else offset + size
        start = offset - offset % mmap.ALLOCATIONGRANULARITY
        while start < end:
            length = min(WINDOW_BYTES, end - start)
            try:
                window = mmap.mmap(file.fileno(), length, flags=mmap.MAP_SHARED | _POPULATE, prot=mmap.PROT_READ,
                                   offset=start)
            except ValueError:  # mmap's own check: the window must lie within the file as it is now
                raise CheckpointError(
                    f"{path} ended early while it was read; was it changed meanwhile? Wrap it again once it is saved"
                ) from None
            yield memoryview(window)[max(offset - start, 0) :]
            start += length


def sha256_of(path: Path, progress: bool = True) -> str:
    """The file's sha256, with a progress bar on a terminal for large files unless `progress` is False (on a
    second thread, beside the main thread's own bars)."""
    digest = hashlib.sha256()
    size = path.stat().st_size if progress else 0  # Progress draws nothing for 0 bytes
    with Progress(size, f"hashing {path.name}") as bar:
        for chunk in mapped_chunks(path):
            digest.update(chunk)
            bar.advance(len(chunk))
    return digest.hexdigest()
