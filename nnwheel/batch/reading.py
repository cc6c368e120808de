"""The input rows, streamed a batch at a time from Parquet, CSV or .npy: memory stays bounded by the batch."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv
import pyarrow.parquet as pq

from ..errors import BatchInputError, first_line

_KINDS = {".parquet": "parquet", ".pq": "parquet", ".csv": "csv", ".npy": "npy"}
_CSV_BLOCK_BYTES = 4 << 20


@dataclass(frozen=True)
class InputFile:
    path: Path
    kind: str  # "parquet", "csv" or "npy"

    def schema(self, npy_column: str) -> pa.Schema:
        """The columns and their types, from the file's footer or header (a CSV's first block)."""
        if self.kind == "parquet":
            return self._parquet().schema_arrow
        if self.kind == "npy":
            return pa.schema([pa.field(npy_column, _list_type(*_npy_header(self.path)[:2]))])
        with _reading(self):
            return pyarrow.csv.open_csv(self.path, read_options=_csv_options()).schema

    def row_count(self) -> int:
        """The rows, for the progress bar: exact for Parquet and .npy, the lines of a CSV past its header."""
        if self.kind == "parquet":
            return self._parquet().metadata.num_rows
        if self.kind == "npy":
            return _npy_header(self.path)[0][0]
        with self.path.open("rb") as file:
            return max(sum(chunk.count(b"\n") for chunk in iter(lambda: file.read(1 << 20), b"")) - 1, 0)

    def batches(self, columns: list[str], batch_size: int) -> Iterator[pa.RecordBatch]:
        """Record batches of at most batch_size rows, of the given columns (a .npy file's one array)."""
        with _reading(self):
            if self.kind == "npy":
                yield from _npy_batches(self.path, columns[0], batch_size)
                return
            if self.kind == "parquet":
                read = self._parquet().iter_batches(batch_size=batch_size, columns=columns)
            else:
                convert = pyarrow.csv.ConvertOptions(include_columns=columns)
                read = pyarrow.csv.open_csv(self.path, read_options=_csv_options(), convert_options=convert)
            for batch in read:
                for start in range(0, batch.num_rows, batch_size):
                    yield batch.slice(start, batch_size)

    def _parquet(self) -> pq.ParquetFile:
        with _reading(self):
            # pre_buffer (pyarrow's default) reads every row group asked for at once: the whole file.
            return pq.ParquetFile(self.path, pre_buffer=False, buffer_size=1 << 20)


def open_input(path: Path) -> InputFile:
    if not path.is_file():
        raise BatchInputError(f"{path} does not exist or is not a file")
    kind = _KINDS.get(path.suffix.lower())
    if kind is None:
        raise BatchInputError(f"{path}: nnwheel batch reads .parquet, .csv and .npy files; convert it to Parquet")
    return InputFile(path, kind)


@contextlib.contextmanager
def _reading(source: InputFile) -> Iterator[None]:
    """What pyarrow raises about a damaged file, as a BatchInputError that names the file."""
    try:
        yield
    except (pa.ArrowException, OSError) as error:
        if isinstance(error, FileNotFoundError):
            raise
        raise BatchInputError(f"{source.path} is not a readable {source.kind} file ({first_line(error)})") from None


def _csv_options() -> pyarrow.csv.ReadOptions:
    return pyarrow.csv.ReadOptions(block_size=_CSV_BLOCK_BYTES)


def _npy_header(path: Path) -> tuple[tuple[int, ...], np.dtype, int]:
    """The array's shape, dtype and where its data starts, without reading the data."""
    with path.open("rb") as file:
        try:
            version = np.lib.format.read_magic(file)
            read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, fortran_order, dtype = read_header(file)
        except ValueError as error:
            raise BatchInputError(f"{path} is not a readable .npy file ({first_line(error)})") from None
        if fortran_order or dtype.hasobject or not shape:
            raise BatchInputError(f"{path} holds a Fortran-ordered, object or 0-d array; save it with numpy.save(np.ascontiguousarray(a))")
        return shape, dtype, file.tell()


def _npy_batches(path: Path, column: str, batch_size: int) -> Iterator[pa.RecordBatch]:
    shape, dtype, start = _npy_header(path)
    with path.open("rb") as file:
        file.seek(start)
        for first in range(0, shape[0], batch_size):
            rows = np.empty((min(batch_size, shape[0] - first), *shape[1:]), dtype)
            if file.readinto(memoryview(rows).cast("B")) != rows.nbytes:
                raise BatchInputError(f"{path} is shorter than its header says: the file is truncated")
            yield pa.record_batch([_fixed_size_lists(rows)], names=[column])


def _fixed_size_lists(rows: np.ndarray) -> pa.Array:
    array = pa.array(rows.reshape(-1))
    for size in reversed(rows.shape[1:]):
        array = pa.FixedSizeListArray.from_arrays(array, size)
    return array


def _list_type(shape: tuple[int, ...], dtype: np.dtype) -> pa.DataType:
    kind = pa.from_numpy_dtype(dtype)
    for size in reversed(shape[1:]):
        kind = pa.list_(kind, size)
    return kind
