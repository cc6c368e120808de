"""Read large files through memory maps, a window at a time.

Hashing a checkpoint, or copying its bytes into a wheel, straight from the page cache spares the copy that
read() makes into a buffer of ours: a quarter of a second of CPU per GiB on our 2-core benchmark machine,
where wrap keeps both cores busy with two sha256 passes and an import of torch. A window is unmapped once
nothing refers to it, so no more than a window or two of a file ever counts in a process's resident memory.
"""

from __future__ import annotations

import fcntl
import hashlib
import mmap
import os
import signal
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
    cut short between two windows, raises CheckpointError. A file cut short under a window being read would
    end the process with SIGBUS, which no Python code can catch; so the file is read under a lease where the
    kernel grants one (_hold_writers_back), and a writer's open or truncate then waits until the next window
    raises CheckpointError and the mappings are gone. Where no lease is granted (another user's file, NFS, a
    file some process holds open for writing) or the writer outwaits it, a truncation under a window being
    read still ends the process with SIGBUS; wrap refuses any other change (checkpoint.check_unchanged).
    """
    with path.open("rb") as file:
        leased = _hold_writers_back(file.fileno())
        end = os.fstat(file.fileno()).st_size if size is None else offset + size
        start = offset - offset % mmap.ALLOCATIONGRANULARITY
        while start < end:
            if leased and fcntl.fcntl(file.fileno(), fcntl.F_GETLEASE) == fcntl.F_UNLCK:  # a writer is waiting
                raise CheckpointError(
                    f"{path} is being written while it is read; wrap it again once it is saved"
                )
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


def _hold_writers_back(fd: int) -> bool:
    """Take a read lease on the open file: the kernel then makes whoever opens it for writing or truncates it
    wait until every mapping of it is gone (at most /proc/sys/fs/lease-break-time, 45 s by default). False
    where it is not granted. The kernel announces the wait with a signal, SIGIO by default, which would end
    this process: SIGURG ends nothing, and the reader asks the lease before each window instead."""
    try:
        fcntl.fcntl(fd, fcntl.F_SETSIG, signal.SIGURG)
        fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_RDLCK)
    except OSError:
        return False
    return True


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
