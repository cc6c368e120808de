"""A progress bar on stderr for long work (copying or uploading large weights, scoring many rows).

Drawn only when the stream is a terminal and the work is large enough to take a while;
otherwise every call is a no-op, so logs and pipes stay clean.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from types import TracebackType
from typing import TextIO

# Below this many bytes the work takes well under a second at disk speed: a bar would only flicker.
SHOW_ABOVE_BYTES = 100 * 1000 * 1000
_REDRAW_EVERY_S = 0.1
_BAR_WIDTH = 30


@dataclass(frozen=True)
class Unit:
    name: str  # as shown: "MB"
    scale: float  # how many of what advance() counts make one shown unit
    show_above: int  # below this much work (in what advance() counts), no bar


BYTES = Unit("MB", 1e6, SHOW_ABOVE_BYTES)
ROWS = Unit("rows", 1, 100_000)


class Progress:
    """Counts bytes (or another unit) of one piece of work; draws `label [####----] 45% 450/1000 MB 310 MB/s`.

    Use as a context manager and call advance(n) after each chunk.
    """

    def __init__(self, total: int, label: str, stream: TextIO | None = None, unit: Unit = BYTES) -> None:
        self.total = total
        self.label = label
        self.done = 0
        self.unit = unit
        self._stream = sys.stderr if stream is None else stream
        self._visible = total > unit.show_above and self._stream.isatty()
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
        done, total, rate = (_shown(n / self.unit.scale) for n in (self.done, self.total, rate))
        name = self.unit.name
        self._stream.write(f"\r{self.label} [{bar}] {fraction:4.0%} {done}/{total} {name} {rate} {name}/s")
        self._stream.flush()


def _shown(n: float) -> str:
    return f"{n:.0f}" if n >= 10 else f"{n:.1f}"
