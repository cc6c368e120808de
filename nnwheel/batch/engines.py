"""A job planned, then run on the engine it names."""

from __future__ import annotations

from .job import BatchJob, plan_job
from .local import Scored, run_local


def run_job(job: BatchJob) -> Scored:
    plan = plan_job(job)
    if job.engine == "spark":
        from .spark import run_spark

        return run_spark(plan)
    if job.engine == "ray":
        from .ray import run_ray

        return run_ray(plan)
    return run_local(plan)
