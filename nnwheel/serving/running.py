"""Requests turned into model calls: merged by the batcher where it may, else run one by one in threads."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
from starlette.requests import Request

from .batching import Batcher
from .bodies import RequestFailed, read_body
from .metrics import ServeMetrics
from .model import ServedModel

logger = logging.getLogger("nnwheel.serve")

Decoded = TypeVar("Decoded")


@dataclass
class Runner:
    model: ServedModel
    metrics: ServeMetrics
    batcher: Batcher | None
    executor: ThreadPoolExecutor  # model calls that are not merged
    max_body_bytes: int

    async def receive(self, request: Request, decode: Callable[[bytearray], Decoded]) -> Decoded:
        """The request's body, decoded; the batcher knows meanwhile that a request is arriving."""
        arriving = self.batcher.arriving() if self.batcher else contextlib.nullcontext()
        with arriving:
            return decode(await read_body(request, self.max_body_bytes))

    async def run(self, inputs: list[np.ndarray]) -> list[np.ndarray]:
        batch = self.model.as_batch(inputs) if self.batcher else None
        try:
            if batch is not None:
                assert self.batcher is not None
                outputs = await self.batcher.submit(batch[0])
                return [output[0] for output in outputs] if batch[1] else outputs
            outputs = await asyncio.get_running_loop().run_in_executor(self.executor, self.model.call, inputs)
        except (ValueError, TypeError) as error:  # predict()'s answer to inputs that do not fit the schema
            raise RequestFailed(400, str(error)) from None
        except Exception as error:
            logger.exception("the model failed")
            raise RequestFailed(500, f"the model failed on this input ({type(error).__name__}: {error}); see the server log") from None
        self.metrics.observe_model_call(self.model.rows(inputs))
        return outputs
