"""The local engine: the model in this process, over the input's batches, into one Parquet file."""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from ..errors import BatchInputError
from ..progress import ROWS, Progress
from .job import Plan
from .output import staged
from .pipeline import WriteBehind, read_ahead

_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter


@dataclass(frozen=True)
class Scored:
    rows: int
    output: Path


def run_local(plan: Plan) -> Scored:
    job, rows = plan.job, 0
    _fixed_mmap_threshold()
    with staged(job.output, job.overwrite) as temporary, \
            Progress(plan.source.row_count(), f"scoring {plan.model.distribution}", unit=ROWS) as progress:
        out = _ParquetOut(temporary)
        try:
            with WriteBehind(out.write) as written:
                for table in read_ahead(plan.source.batches(plan.needed, plan.batch_size)):
                    written.put(_predict(plan, table))
                    rows += table.num_rows
                    progress.advance(table.num_rows)
            if out.writer is None:  # no rows: an empty file with the columns rows would have had
                out.write(_predict(plan, _empty(plan)))
        finally:
            out.close()
    return Scored(rows, job.output)


def _fixed_mmap_threshold() -> None:
    """glibc raises its mmap threshold whenever a large block is freed; batch-sized blocks (inputs, activations)
    then come from the heap, freed in other threads than they were allocated in, and the heap fragments: RSS
    grew with the number of batches. A fixed threshold keeps them mapped, and given back when freed."""
    try:
        ctypes.CDLL(None).mallopt(_M_MMAP_THRESHOLD, 1 << 17)
    except (OSError, AttributeError):  # not glibc: its allocator has no such threshold
        pass


class _ParquetOut:
    """One Parquet file, opened by the first batch, whose columns it takes: one row group per batch."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.writer: pq.ParquetWriter | None = None

    def write(self, batch: pa.RecordBatch) -> None:
        if self.writer is None:
            # Dictionaries cost six times the writing of float columns and shrink none: predictions repeat rarely.
            self.writer = pq.ParquetWriter(self.path, batch.schema, use_dictionary=False)
        self.writer.write_batch(batch)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _predict(plan: Plan, table: Any) -> Any:
    try:
        return plan.model.batch.predict_table(table, plan.columns, plan.keep)
    except ValueError as error:
        raise BatchInputError(f"{plan.source.path}: {error}") from None


def _empty(plan: Plan) -> pa.RecordBatch:
    schema = plan.source.schema(npy_column=plan.needed[0])
    return pa.RecordBatch.from_pylist([], schema=pa.schema([schema.field(name) for name in plan.needed]))
