"""Adaptive micro-batching: concurrent requests merged into one model call, and the check that this is exact.

A request's inputs all carry the batch dimension first. The batcher takes the oldest waiting request and
adds the ones behind it while the rows fit in max_rows and their other dimensions match. It waits for
more (up to max_wait) only while other requests are still being received, so a lone client never waits;
under load, requests pile up while the model is busy and the batches grow by themselves.

Merging is only exact if the model gives every row the same bits whatever the batch size. Many float
kernels do not (BLAS picks its blocking by the batch size, which changes the order of additions), so
`batch_difference` runs a probe through every batch size before the server merges anything.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

# The model, called with one array per input (batch dimension first), giving one array per output.
ModelCall = Callable[[list[np.ndarray]], list[np.ndarray]]


@dataclass
class _Waiting:
    inputs: list[np.ndarray]
    answer: asyncio.Future[list[np.ndarray]]

    @property
    def rows(self) -> int:
        return self.inputs[0].shape[0]

    def fits_with(self, other: _Waiting) -> bool:
        return all(a.shape[1:] == b.shape[1:] and a.dtype == b.dtype for a, b in zip(self.inputs, other.inputs))


class Batcher:
    def __init__(self, call: ModelCall, max_rows: int, max_wait: float, on_call: Callable[[int], None]) -> None:
        self._call = call
        self.max_rows = max_rows  # most rows per model call
        self.max_wait = max_wait  # seconds
        self._on_call = on_call  # told the rows of each model call, on the event loop
        self._waiting: deque[_Waiting] = deque()
        self._arriving = 0
        self._wakeup = asyncio.Event()
        # One model thread: batches run one after another, and the next one fills up meanwhile.
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="nnwheel-batch")

    @contextlib.contextmanager
    def arriving(self) -> Iterator[None]:
        """Mark a request whose body is still being read: the batcher may wait a little for it."""
        self._arriving += 1
        try:
            yield
        finally:
            self._arriving -= 1
            self._wakeup.set()

    async def submit(self, inputs: list[np.ndarray]) -> list[np.ndarray]:
        answer = asyncio.get_running_loop().create_future()
        self._waiting.append(_Waiting(inputs, answer))
        self._wakeup.set()
        return await answer

    async def run(self) -> None:
        """Answer submitted requests until cancelled."""
        try:
            while True:
                await self._answer(await self._next_batch())
        finally:
            self._executor.shutdown(wait=False)

    async def _next_batch(self) -> list[_Waiting]:
        while not self._waiting:
            await self._sleep_until_woken(None)
        batch = [self._waiting.popleft()]
        rows = batch[0].rows
        deadline = asyncio.get_running_loop().time() + self.max_wait
        while rows < self.max_rows:
            if self._waiting:
                following = self._waiting[0]
                if rows + following.rows > self.max_rows or not following.fits_with(batch[0]):
                    break
                batch.append(self._waiting.popleft())
                rows += following.rows
            elif self._arriving == 0 or not await self._sleep_until_woken(deadline):
                break
        return batch

    async def _sleep_until_woken(self, deadline: float | None) -> bool:
        self._wakeup.clear()
        timeout = None if deadline is None else deadline - asyncio.get_running_loop().time()
        try:
            await asyncio.wait_for(self._wakeup.wait(), timeout)
        except asyncio.TimeoutError:  # not yet the built-in TimeoutError on Python 3.10
            return False
        return True

    async def _answer(self, batch: list[_Waiting]) -> None:
        if len(batch) == 1:
            await self._answer_alone(batch[0])
            return
        merged = [np.concatenate(parts) for parts in zip(*(waiting.inputs for waiting in batch))]
        try:
            outputs = await self._run(merged)
            parts = _split(outputs, [waiting.rows for waiting in batch])
        except Exception:
            # One bad request must not fail the others: each is answered alone, with its own error.
            for waiting in batch:
                await self._answer_alone(waiting)
            return
        for waiting, part in zip(batch, parts):
            _resolve(waiting.answer, part)

    async def _answer_alone(self, waiting: _Waiting) -> None:
        try:
            outputs = await self._run(waiting.inputs)
        except Exception as error:
            if not waiting.answer.done():
                waiting.answer.set_exception(error)
        else:
            _resolve(waiting.answer, outputs)

    async def _run(self, inputs: list[np.ndarray]) -> list[np.ndarray]:
        outputs = await asyncio.get_running_loop().run_in_executor(self._executor, self._call, inputs)
        self._on_call(inputs[0].shape[0])
        return outputs


def _split(outputs: list[np.ndarray], rows: list[int]) -> list[list[np.ndarray]]:
    total = sum(rows)
    if any(output.ndim == 0 or output.shape[0] != total for output in outputs):
        raise ValueError(f"an output does not have the batch's {total} rows first; it cannot be split")
    offsets = np.cumsum(rows)[:-1]
    per_output = [np.split(output, offsets) for output in outputs]
    return [list(parts) for parts in zip(*per_output)]


def _resolve(answer: asyncio.Future[list[np.ndarray]], outputs: list[np.ndarray]) -> None:
    if not answer.done():  # the request may have been cancelled meanwhile
        answer.set_result(outputs)


def batch_difference(call: ModelCall, probe: list[np.ndarray]) -> str | None:
    """Describe how merging changes a result, or None when every row keeps its bits in every batch size.

    The probe's rows run together, alone, and as every shorter batch from the start; each row's outputs
    must be bitwise the same in all of them. Dense kernels choose their order of operations by shape,
    not by data, so random rows find the kernels that round differently at some batch size.
    """
    reference = call(probe)
    rows = probe[0].shape[0]
    for start, stop in [(0, size) for size in range(1, rows)] + [(row, row + 1) for row in range(1, rows)]:
        outputs = call([array[start:stop] for array in probe])
        for output, expected in zip(outputs, reference):
            expected = expected[start:stop]
            if output.shape != expected.shape or output.tobytes() != expected.tobytes():
                which = f"row {start}" if stop - start == 1 else f"rows {start} to {stop - 1}"
                return (
                    f"{which} came out different in a batch of {stop - start} than in a batch of {rows}, "
                    f"by up to {_largest_difference(output, expected)}"
                )
    return None


def _largest_difference(a: np.ndarray, b: np.ndarray) -> str:
    if a.shape != b.shape:
        return f"shapes {a.shape} and {b.shape}"
    return f"{np.max(np.abs(a.astype(np.float64) - b.astype(np.float64))):.3g}"
