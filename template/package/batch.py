"""Batch scoring over Apache Arrow: this model in Spark, in Ray Data, or in any loop over record batches.

    # Spark: the model's package (and pyarrow) installed on the workers
    from functools import partial
    from <package> import batch
    scored = df.mapInArrow(partial(batch.map_arrow, keep=["id"]), batch.spark_schema(df.schema, keep=["id"]))

    # Ray Data: one model per actor, loaded when the actor starts
    scored = dataset.map_batches(batch.Predictor, fn_constructor_kwargs={"keep": ["id"]},
                                 batch_format="pyarrow", batch_size=batch.batch_rows(), concurrency=2)

Each input is read from the column of its name, or from the columns given for it (`columns=`): a list or
fixed-size list column becomes one array of shape (rows, ...); several number columns are stacked as the last
dimension. Each output of the model (predict_tensors(): a package's --preprocess, --labels and --postprocess are for
predict() on raw values, not for columns) becomes a column of its name, beside the `keep` columns. Needs pyarrow, which the
package itself does not require; the model is loaded once per process, by its first batch.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any, Union

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from . import _MANIFEST, predict_tensors

# Input name -> its column, or the columns stacked into it. Union, not |: the package runs on Python 3.9.
Columns = Mapping[str, Union[str, Sequence[str]]]
_BATCH_BYTES = 4 << 20  # input bytes per batch: big enough to amortise a call, small enough to stream
# Spark's types for the outputs' dtypes: only those Arrow gives as they are (no uint8, no float16).
_SPARK_TYPES = {"float32": "float", "float64": "double", "int8": "tinyint", "int16": "smallint", "int32": "int",
                "int64": "bigint", "bool": "boolean"}


def predict_table(table: Any, columns: Columns | None = None, keep: Sequence[str] = ()) -> Any:
    """The predictions for a pyarrow Table or RecordBatch, one row per row, beside its `keep` columns
    (of the same kind: a RecordBatch for a RecordBatch). Raises ValueError naming a column that does not fit."""
    inputs = [_input_array(table, spec, _columns_of(spec, columns)) for spec in _MANIFEST["inputs"]]
    outputs = _named_outputs(predict_tensors(*inputs))
    for name in keep:
        if name in outputs:
            raise ValueError(f"the column {name!r} to keep has the name of an output; rename it")
    names = [*keep, *outputs]
    arrays = [table.column(name) for name in keep] + [_to_arrow(value) for value in outputs.values()]
    if isinstance(table, pa.RecordBatch):
        return pa.RecordBatch.from_arrays(arrays, names=names)
    return pa.Table.from_arrays(arrays, names=names)


def map_arrow(batches: Iterable[Any], columns: Columns | None = None, keep: Sequence[str] = ()) -> Iterator[Any]:
    """predict_table over an iterator of RecordBatches, as Spark's DataFrame.mapInArrow calls it."""
    for batch in batches:
        if batch.num_rows:
            yield predict_table(batch, columns, keep)


class Predictor:
    """A callable class for Ray Data's map_batches (batch_format="pyarrow"): the model loads in __init__,
    once per actor, not on the first batch."""

    def __init__(self, columns: Columns | None = None, keep: Sequence[str] = (), device: str | None = None) -> None:
        from . import load

        load(device)
        self.columns, self.keep = columns, keep

    def __call__(self, table: Any) -> Any:
        return predict_table(table, self.columns, self.keep)


def batch_rows() -> int:
    """Rows per batch such that the inputs take about 4 MiB: 16384 rows of 64 float32s."""
    row_bytes = sum(np.dtype(_numpy_dtype(spec)).itemsize * _row_size(spec) for spec in _MANIFEST["inputs"])
    return int(min(max(_BATCH_BYTES // max(row_bytes, 1), 64), 65536))


def spark_schema(schema: Any, keep: Sequence[str] = ()) -> str:
    """The output schema as Spark DDL, for mapInArrow: the `keep` fields of the input's pyspark StructType,
    then the outputs'."""
    kept = [f"`{name}` {schema[name].dataType.simpleString()}" for name in keep]
    return ", ".join(kept + [f"`{spec['name']}` {_spark_type(spec)}" for spec in _MANIFEST["outputs"]])


def _spark_type(spec: dict[str, Any]) -> str:
    text = _SPARK_TYPES.get(spec["dtype"], "string" if spec.get("kind") == "text" else None)
    if text is None:
        raise ValueError(f"output {spec['name']!r} has dtype {spec['dtype']}, which Spark has no type for")
    for _ in spec["shape"][1:]:
        text = f"array<{text}>"
    return text


def _columns_of(spec: dict[str, Any], columns: Columns | None) -> list[str]:
    given = (columns or {}).get(spec["name"], spec["name"])
    return [given] if isinstance(given, str) else list(given)


def _input_array(table: Any, spec: dict[str, Any], names: list[str]) -> Any:
    missing = [name for name in names if name not in table.schema.names]
    if missing:
        raise ValueError(
            f"input {spec['name']!r} is read from the column {missing[0]!r}, which the data does not have "
            f"(it has {', '.join(table.schema.names)}); name the columns for it with columns="
        )
    if spec.get("kind") == "text":
        return table.column(names[0]).to_pylist()
    arrays = [_column_array(_one_chunk(table.column(name)), name, spec) for name in names]
    array = arrays[0] if len(arrays) == 1 else np.stack(arrays, axis=-1)
    expected = tuple(spec["shape"][1:])
    if len(expected) != array.ndim - 1 or any(want not in (-1, got) for want, got in zip(expected, array.shape[1:])):
        shape = ", ".join("any" if dim == -1 else str(dim) for dim in expected)
        raise ValueError(
            f"input {spec['name']!r} takes rows of shape ({shape}); the column(s) {', '.join(names)} give "
            f"rows of shape {array.shape[1:]}"
        )
    return array


def _one_chunk(column: Any) -> Any:
    return column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column


def _column_array(column: Any, name: str, spec: dict[str, Any]) -> np.ndarray:
    """A column as an array of shape (rows, ...): list columns whose rows have one length give a dimension."""
    dims = []
    while True:
        if column.null_count:
            raise ValueError(f"the column {name!r} has empty (null) values; input {spec['name']!r} needs numbers")
        if pa.types.is_fixed_size_list(column.type):
            dims.append(column.type.list_size)
        elif pa.types.is_list(column.type) or pa.types.is_large_list(column.type):
            dims.append(_one_length(column, name, spec))
        else:
            break
        column = column.flatten()  # the values of the rows in this slice only, past any offset
    # A copy: Arrow's memory is read-only, and a model may write to its input (torch warns that it could).
    return _cast(column, name, spec).to_numpy(zero_copy_only=False, writable=True).reshape(-1, *dims)


def _one_length(column: Any, name: str, spec: dict[str, Any]) -> int:
    lengths = pc.min_max(pc.list_value_length(column))
    shortest, longest = lengths["min"].as_py(), lengths["max"].as_py()
    if shortest != longest:
        raise ValueError(f"the column {name!r} has rows of lengths {shortest} to {longest}; "
                         f"input {spec['name']!r} takes rows of one shape")
    return shortest or 0


def _cast(values: Any, name: str, spec: dict[str, Any]) -> Any:
    """The values in the input's dtype where no value changes (int64 ids from 3.0 are fine, 3.5 is not)."""
    kind = values.type
    if not (pa.types.is_integer(kind) or pa.types.is_floating(kind) or pa.types.is_boolean(kind)):
        raise ValueError(f"the column {name!r} holds {kind}; input {spec['name']!r} takes {spec['dtype']} numbers")
    target = pa.from_numpy_dtype(np.dtype(_numpy_dtype(spec)))
    try:
        return values if kind == target else pc.cast(values, target, safe=not pa.types.is_floating(target))
    except pa.ArrowInvalid as error:
        raise ValueError(f"the column {name!r} ({kind}) does not fit input {spec['name']!r} ({spec['dtype']}): {error}") from None


def _numpy_dtype(spec: dict[str, Any]) -> str:
    return "float32" if spec["dtype"] == "bfloat16" else spec["dtype"]


def _row_size(spec: dict[str, Any]) -> int:
    size = 1
    for dim in spec["shape"][1:]:
        size *= dim if dim > 0 else 64  # a free dimension: guess a modest length
    return size


def _named_outputs(outputs: Any) -> dict[str, Any]:
    if isinstance(outputs, dict):
        return outputs
    values = outputs if isinstance(outputs, tuple) else (outputs,)
    return {spec["name"]: value for spec, value in zip(_MANIFEST["outputs"], values)}


def _to_arrow(value: Any) -> Any:
    """An output of shape (rows, ...) as a column: nested lists over the values, which are not copied."""
    value = np.asarray(value)
    if value.dtype.kind in "US":
        return pa.array(value.tolist())
    flat = pa.array(np.ascontiguousarray(value).reshape(-1))
    for size in reversed(value.shape[1:]):
        flat = pa.ListArray.from_arrays(pa.array(np.arange(0, len(flat) + 1, size, dtype=np.int32)), flat)
    return flat
