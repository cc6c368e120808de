"""Reading, running and writing at once: the model's batches in this thread, input and output in one each.

pyarrow and the model's runtime let go of the GIL while they work, so reading the next batch and writing the
last one cost the model's loop next to nothing. Each queue holds one batch: memory stays bounded.
"""

from __future__ import annotations

import contextlib
import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Generic, TypeVar

Item = TypeVar("Item")
_DEPTH = 1
_END = object()


def read_ahead(items: Iterable[Item]) -> Iterator[Item]:
    """The items of `items`, produced in a thread of their own one ahead; its errors raised here."""
    waiting: queue.Queue = queue.Queue(_DEPTH)
    stop = threading.Event()

    def produce() -> None:
        try:
            for item in items:
                if stop.is_set():
                    return
                waiting.put(item)
            waiting.put(_END)
        except BaseException as error:  # handed to the consumer, which raises it
            waiting.put(_Failed(error))

    thread = threading.Thread(target=produce, name="nnwheel-batch-read", daemon=True)
    thread.start()
    try:
        while (item := waiting.get()) is not _END:
            if isinstance(item, _Failed):
                raise item.error
            yield item
    finally:
        stop.set()
        while thread.is_alive():  # let a producer blocked on a full queue see the stop
            with contextlib.suppress(queue.Empty):
                waiting.get(timeout=0.05)


class WriteBehind(Generic[Item]):
    """Hands items to `write` in a thread of its own. Leaving the block waits for the last one, and raises
    the thread's error unless the block raised one of its own."""

    def __init__(self, write: Callable[[Item], Any]) -> None:
        self._waiting: queue.Queue = queue.Queue(_DEPTH)
        self._write = write
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._consume, name="nnwheel-batch-write", daemon=True)

    def __enter__(self) -> WriteBehind[Item]:
        self._thread.start()
        return self

    def put(self, item: Item) -> None:
        if self._error is not None:
            raise self._error
        self._waiting.put(item)

    def __exit__(self, kind: type | None, error: BaseException | None, traceback: Any) -> None:
        self._waiting.put(_END)
        self._thread.join()
        if error is None and self._error is not None:
            raise self._error

    def _consume(self) -> None:
        while (item := self._waiting.get()) is not _END:
            if self._error is None:  # after an error, only drain: the caller raises it
                try:
                    self._write(item)
                except BaseException as error:
                    self._error = error


class _Failed:
    def __init__(self, error: BaseException) -> None:
        self.error = error

