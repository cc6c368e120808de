"""What a batch job is asked to do, checked against the model and the input before any engine starts."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import BatchInputError, UsageError
from .model import BatchModel, find_model
from .reading import InputFile, open_input


@dataclass(frozen=True)
class BatchJob:
    model: str  # the installed model's name
    input: Path
    output: Path
    engine: str = "local"
    id_column: str | None = None
    columns: Mapping[str, tuple[str, ...]] = field(default_factory=dict)  # input name ("" for the only one) -> columns
    batch_size: int | None = None  # default: the model's batch_rows()
    overwrite: bool = False
    master: str = "local[*]"  # Spark's
    address: str | None = None  # Ray's; None starts a local cluster
    index: str | None = None  # where the workers' pip finds the model; None: their own pip configuration


@dataclass(frozen=True)
class Plan:
    """A job made concrete: the model, the input, each model input's columns, the rows per batch."""

    job: BatchJob
    model: BatchModel
    source: InputFile
    columns: dict[str, list[str]]
    keep: list[str]
    batch_size: int

    @property
    def needed(self) -> list[str]:
        """The input columns read: the kept ones, then each input's."""
        return list(dict.fromkeys([*self.keep, *(name for names in self.columns.values() for name in names)]))


def plan_job(job: BatchJob) -> Plan:
    if job.engine != "local" and job.id_column is None:
        raise UsageError(f"--engine {job.engine} needs --id-column: its workers give the rows back in no fixed order")
    source = open_input(job.input)
    model = find_model(job.model)
    inputs = [spec["name"] for spec in model.manifest["inputs"]]
    if source.kind == "npy" and (len(inputs) != 1 or job.id_column or job.engine != "local"):
        raise UsageError(f"{job.input}: a .npy file holds one array, with no id column, for the local engine; "
                         "give a Parquet file for a model with several inputs, --id-column or another engine")
    columns = _columns_of_inputs(inputs, job.columns)
    keep = [job.id_column] if job.id_column else []
    plan = Plan(job, model, source, columns, keep, job.batch_size or model.batch.batch_rows())
    _check_columns(plan, source.schema(npy_column=inputs[0]).names)
    return plan


def _columns_of_inputs(inputs: list[str], given: Mapping[str, tuple[str, ...]]) -> dict[str, list[str]]:
    columns = {name: [name] for name in inputs}
    for name, names in given.items():
        if name == "" and len(inputs) != 1:
            raise UsageError(f"the model has {len(inputs)} inputs ({', '.join(inputs)}): say which with --columns INPUT=COLUMN")
        if name not in ("", *inputs):
            raise UsageError(f"--columns {name}=...: the model has no input {name!r} (its inputs: {', '.join(inputs)})")
        columns[name or inputs[0]] = list(names)
    return columns


def _check_columns(plan: Plan, present: list[str]) -> None:
    for name in plan.needed:
        if name not in present:
            used_for = "--id-column" if name in plan.keep else f"input {_input_of(plan, name)!r}"
            raise BatchInputError(
                f"{plan.source.path} has no column {name!r} (for {used_for}); it has {', '.join(present)}. "
                "Name the columns with --columns INPUT=COLUMN[,COLUMN...]"
            )


def _input_of(plan: Plan, column: str) -> str:
    return next(name for name, names in plan.columns.items() if column in names)
