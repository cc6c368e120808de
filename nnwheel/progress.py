"""A progress bar on stderr for long work (copying or uploading large weights).

Drawn only when the stream is a terminal and the work is large enough to take a while;
otherwise every call is a no-op, so logs and pipes stay clean.
"""

from __future__ import annotations

import sys
import time
from types import TracebackType
from typing import TextIO

# Below this many bytes the work takes well under a second at disk speed: a bar would only flicker.
SHOW_ABOVE_BYTES = 100 * 1000 * 1000
_REDRAW_EVERY_S = 0.1
_BAR_WIDTH = 30


class Progress:
    """Counts bytes of one piece of work; draws `label [####----] 45% 450/1000 MB 310 MB/s`.

    Use as a context manager and call advance(n) after each chunk.
    """

    def __init__(self, total: int, label: str, stream: TextIO | None = None) -> None:
        self.total = total
        self.label = label
        self.done = 0
        self._stream = sys.stderr if stream is None else stream
        self._visible = total > SHOW_ABOVE_BYTES and self._stream.isatty()
        self._started = 0.0
        self._drawn_at = 0.0

    def __enter__(self) -> Progress:
        self._started = time.monotonic()
        return self

    def advance(self, n: int) -> None:
        self.done += n
        if not self._visible:
            return
        now = time.monotonic()
        if now - self._drawn_at >= _REDRAW_EVERY_S:
            self._draw(now)

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc_value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if not self._visible:
            return
        # Redraw the final state, then end the line so that whatever is printed next starts clean.
        self._draw(time.monotonic())
        self._stream.write("\n")
        self._stream.flush()

    def _draw(self, now: float) -> None:
        self._drawn_at = now
        fraction = min(self.done / self.total, 1.0) if self.total else 1.0
        filled = round(fraction * _BAR_WIDTH)
        bar = "#" * filled + "-" * (_BAR_WIDTH - filled)
        elapsed = max(now - self._started, 1e-9)
        rate = self.done / elapsed
        self._stream.write(
            f"\r{self.label} [{bar}] {fraction:4.0%} "
            f"{_megabytes(self.done)}/{_megabytes(self.total)} MB {_megabytes(rate)} MB/s"
        )
        self._stream.flush()


def _megabytes(n: float) -> str:
    return f"{n / 1e6:.0f}" if n >= 10e6 else f"{n / 1e6:.1f}"
