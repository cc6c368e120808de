"""--engine spark: the model's batch module in DataFrame.mapInArrow, on the executors' packed environment."""

from __future__ import annotations

import functools
import os
import shutil
from pathlib import Path
from typing import Any

from ..errors import BatchInputError, EngineError, MissingDependencyError, first_line
from .environment import packed, worker_environment
from .job import Plan
from .local import Scored
from .output import rows_written, staged

_ENVIRONMENT = "environment"  # the directory each executor unpacks the archive into


def run_spark(plan: Plan) -> Scored:
    _require_java()
    try:
        from pyspark.sql import SparkSession
    except ModuleNotFoundError as error:
        if error.name not in ("pyspark", "py4j"):
            raise
        raise MissingDependencyError("--engine spark needs pyspark: pip install 'nnwheel[spark]'") from None
    job = plan.job
    environment = worker_environment(plan.model, job.index)
    with staged(job.output, job.overwrite) as temporary:
        spark = _session(SparkSession, job.master, environment, plan.batch_size)
        try:
            frame = _read(spark, plan).select(*(f"`{name}`" for name in plan.needed))
            score = functools.partial(plan.model.batch.map_arrow, columns=plan.columns, keep=plan.keep)
            frame.mapInArrow(score, plan.model.batch.spark_schema(frame.schema, plan.keep)).write.parquet(str(temporary))
        except Exception as error:
            raise _job_error(plan, error) from None
        finally:
            spark.stop()
        rows = rows_written(temporary)
    return Scored(rows, job.output)


def _require_java() -> None:
    java_home = os.environ.get("JAVA_HOME")
    if not (java_home and (Path(java_home) / "bin" / "java").is_file()) and shutil.which("java") is None:
        raise EngineError("--engine spark needs Java 17 or later, and there is no java on PATH nor in JAVA_HOME; "
                          "install a JDK (e.g. apt-get install openjdk-17-jre-headless) or set JAVA_HOME")


def _session(builder_class: Any, master: str, environment: Path, batch_size: int) -> Any:
    builder = (
        builder_class.builder.master(master)
        .appName("nnwheel batch")
        .config("spark.sql.execution.arrow.maxRecordsPerBatch", str(batch_size))
        .config("spark.ui.enabled", "false")
    )
    if master.startswith("local"):  # the executor is this process: its Python workers run the venv where it is
        os.environ["PYSPARK_PYTHON"] = str(environment / "bin" / "python")
        return builder.getOrCreate()
    # Spark's documented way: each executor unpacks the archive in its directory and runs its python.
    os.environ["PYSPARK_PYTHON"] = f"./{_ENVIRONMENT}/bin/python"
    return builder.config("spark.archives", f"{packed(environment)}#{_ENVIRONMENT}").getOrCreate()


def _read(spark: Any, plan: Plan) -> Any:
    path = str(plan.source.path.resolve())
    if plan.source.kind == "csv":
        return spark.read.csv(path, header=True, inferSchema=True)
    return spark.read.parquet(path)


def _job_error(plan: Plan, error: Exception) -> Exception:
    """A worker's ValueError (a column that does not fit) as the local engine says it; anything else as the
    first line Spark gives."""
    text = str(error)
    for line in reversed(text.splitlines()):
        if line.startswith("ValueError: "):
            return BatchInputError(f"{plan.source.path}: {line.removeprefix('ValueError: ')}")
    return EngineError(f"the Spark job failed: {first_line(error)}")
