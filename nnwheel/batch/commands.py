"""nnwheel batch: the command line of this stage."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from ..errors import MissingDependencyError, UsageError

_ENGINES_HELP = """engines:
  local  this process (the default); needs pyarrow: pip install 'nnwheel[batch]'
  spark  Spark, here (--master local[*]) or a cluster (--master spark://HOST:7077, yarn, k8s://...); needs
         Java 17+ and pip install 'nnwheel[spark]'. The workers run a packed environment (venv-pack, in
         spark.archives) into which pip installs the model from --index
  ray    Ray, a local cluster or --address ray://HOST:10001 (or HOST:6379 from a cluster node); needs
         pip install 'nnwheel[ray]'. Each worker's pip installs the model from --index (runtime_env)

spark and ray read and write paths every worker can reach (a shared file system) and write OUTPUT as a
directory of Parquet files; they need --id-column, as their workers keep no order."""


def add_batch(commands: argparse._SubParsersAction) -> None:
    batch = commands.add_parser(
        "batch", help="score a table of rows with an installed model, here, on Spark or on Ray",
        description="Run an installed model over every row of INPUT (Parquet, CSV or .npy) and write the "
        "predictions to OUTPUT (Parquet), one column per output, beside --id-column. Streams: memory is "
        "bounded by --batch-size, whatever the size of INPUT.",
        epilog=_ENGINES_HELP + "\n\nexample: nnwheel batch digits-mlp pixels.parquet scores.parquet --id-column id",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    batch.add_argument("model", metavar="NAME", help="the installed model package, e.g. digits-mlp")
    batch.add_argument("input", type=Path, metavar="INPUT", help=".parquet, .csv or .npy (local engine only) file")
    batch.add_argument("output", type=Path, metavar="OUTPUT", help="the Parquet file (directory for spark and ray)")
    batch.add_argument("--engine", choices=["local", "spark", "ray"], default="local", help="(default: %(default)s)")
    batch.add_argument("--id-column", metavar="COLUMN", help="a column copied beside the predictions, to join them on")
    batch.add_argument("--columns", action="append", default=[], metavar="[INPUT=]COLUMN[,COLUMN...]",
                       help="the column(s) of a model input (default: the column of its name); several number "
                       "columns are stacked into the last dimension; repeat per input")
    batch.add_argument("--batch-size", type=int, metavar="ROWS",
                       help="rows per model call (default: about 4 MiB of inputs, from the model's schema)")
    batch.add_argument("--overwrite", action="store_true", help="replace OUTPUT if it exists")
    batch.add_argument("--master", default="local[*]", help="Spark's master URL (default: %(default)s)")
    batch.add_argument("--address", help="the Ray cluster's address (default: start a local one)")
    batch.add_argument("--index", metavar="URL", help="the simple index the workers' pip installs the model from "
                       "(default: their pip's own configuration)")
    batch.set_defaults(run=_run_batch)


def parse_columns(values: list[str]) -> dict[str, tuple[str, ...]]:
    """--columns values as input name -> columns; "" names the only input."""
    columns: dict[str, tuple[str, ...]] = {}
    for value in values:
        name, _, listed = value.rpartition("=")
        names = tuple(part.strip() for part in listed.split(",") if part.strip())
        if not names or name in columns:
            raise UsageError(f"--columns {value!r}: give INPUT=COLUMN[,COLUMN...] once per input")
        columns[name.strip()] = names
    return columns


def _run_batch(args: argparse.Namespace) -> None:
    if args.batch_size is not None and args.batch_size < 1:
        raise UsageError("--batch-size must be at least 1")
    try:
        from .engines import run_job
        from .job import BatchJob
    except ModuleNotFoundError as error:
        if error.name != "pyarrow":
            raise
        raise MissingDependencyError("nnwheel batch needs pyarrow: pip install 'nnwheel[batch]'") from None
    job = BatchJob(
        model=args.model, input=args.input, output=args.output, engine=args.engine, id_column=args.id_column,
        columns=parse_columns(args.columns), batch_size=args.batch_size, overwrite=args.overwrite,
        master=args.master, address=args.address, index=args.index,
    )
    started = time.monotonic()
    scored = run_job(job)
    print(f"{scored.rows} rows scored in {time.monotonic() - started:.1f} s: {scored.output}", file=sys.stderr)
