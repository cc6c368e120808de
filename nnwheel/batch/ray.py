"""--engine ray: the model's batch.Predictor in Ray Data's map_batches, on workers whose pip installs the model.

Ray makes each job's runtime_env pip environment on every node a worker of the job starts on, as a
virtualenv over the node's own Python environment: what is installed there (torch, pyarrow, ray) is used,
and pip adds the model and whatever else it requires.
"""

from __future__ import annotations

from typing import Any

from ..errors import BatchInputError, EngineError, MissingDependencyError, WorkerInstallError, first_line
from .job import Plan
from .local import Scored
from .output import rows_written, staged
from .workers import index_options, pip_error


def run_ray(plan: Plan) -> Scored:
    try:
        import ray
        import ray.data
    except ModuleNotFoundError as error:
        if error.name is None or error.name.split(".")[0] != "ray":
            raise
        raise MissingDependencyError("--engine ray needs Ray Data: pip install 'nnwheel[ray]'") from None
    job = plan.job
    runtime_env = {"pip": {"packages": [plan.model.requirement], "pip_install_options": index_options(job.index)}}
    with staged(job.output, job.overwrite) as temporary:
        # "local": a new cluster, not the one a `ray start` on this machine left its address for (it may be gone)
        ray.init(address=job.address or "local", runtime_env=runtime_env, include_dashboard=False, log_to_driver=False,
                 configure_logging=False)
        try:
            ray.data.DataContext.get_current().enable_progress_bars = False
            scored = _read(ray, plan).map_batches(
                plan.model.batch.Predictor,
                fn_constructor_kwargs={"columns": plan.columns, "keep": plan.keep},
                batch_format="pyarrow",
                batch_size=plan.batch_size,
                concurrency=(1, max(int(ray.cluster_resources().get("CPU", 1)), 1)),
            )
            scored.write_parquet(str(temporary))
        except Exception as error:
            raise _job_error(plan, error) from None
        finally:
            ray.shutdown()
        rows = rows_written(temporary)
    return Scored(rows, job.output)


def _read(ray: Any, plan: Plan) -> Any:
    path = str(plan.source.path.resolve())
    if plan.source.kind == "csv":
        return ray.data.read_csv(path).select_columns(plan.needed)
    return ray.data.read_parquet(path, columns=plan.needed)


def _job_error(plan: Plan, error: Exception) -> Exception:
    text = str(error)
    if type(error).__name__ == "RuntimeEnvSetupError" or ("runtime_env" in text.lower() and "pip" in text.lower()):
        return WorkerInstallError(f"the Ray workers' pip could not install {plan.model.requirement}: {pip_error(text)}")
    for line in reversed(text.splitlines()):
        if "ValueError: " in line:
            return BatchInputError(f"{plan.source.path}: {line.split('ValueError: ', 1)[1]}")
    return EngineError(f"the Ray job failed: {first_line(error)}")
