"""nnwheel batch on real engines: Spark local[2] and a Ray cluster, whose workers pip-install the model from
a real devpi index (the cluster's own environment has no model), with predict()'s answers row for row."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from batch_fixtures import (
    batch_world,  # noqa: F401  (a fixture)
    column,
    digits_rows,
    scored,
    scorer_rows,
    write_digits,
    write_scorer,
)
from conftest import free_port, make_venv, the_error

pytestmark = pytest.mark.e2e
SCORER_COLUMNS = ("--columns", "input_0=x", "--columns", "input_1=ids")


@pytest.fixture(scope="module")
def spark_cache(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Where the Spark runs keep their packed environments, to look into them."""
    return {"XDG_CACHE_HOME": str(tmp_path_factory.mktemp("spark-cache"))}


@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A Ray head node with 2 CPUs on this machine, in an environment without the models that sees the test
    environment's packages: Ray copies a virtualenv's own files into every job's pip environment, and this
    one's are a .pth file, where the test environment's are gigabytes."""
    port = free_port()
    directory = tmp_path_factory.mktemp("ray")
    log = directory / "head.log"
    node = make_venv(directory / "node-env")
    command = [str(node.python), "-m", "ray.scripts.scripts", "start", "--head", "--block", "--port", str(port),
               "--num-cpus", "2", "--include-dashboard", "false", "--disable-usage-stats"]
    # Ray turns token authentication on for `ray start` once any local ray.init() has left ~/.ray/auth_token,
    # then asks it of every client: this cluster and its clients (nnwheel batch among them) go without.
    saved = os.environ.get("RAY_AUTH_MODE")
    os.environ["RAY_AUTH_MODE"] = "disabled"
    with log.open("wb") as output:
        head = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, "PIP_RETRIES": "0"})
    address = f"127.0.0.1:{port}"
    try:
        _wait_for_ray(address, head, log)
        yield address
    finally:
        if saved is None:
            os.environ.pop("RAY_AUTH_MODE")
        else:
            os.environ["RAY_AUTH_MODE"] = saved  # the head and every process of the node are in the session it leads: ours to end
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(5)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait(10)


def _wait_for_ray(address: str, head: subprocess.Popen, log: Path) -> None:
    check = [sys.executable, "-c", f"import ray; ray.init(address={address!r}); ray.shutdown()"]
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if head.poll() is not None:
            raise AssertionError(f"ray start ended: {log.read_text()[-2000:]}")
        attempt = subprocess.run(check, capture_output=True, text=True, timeout=120)
        if attempt.returncode == 0:
            return
    raise AssertionError(f"the Ray cluster at {address} did not answer: {attempt.stderr[-2000:]}")


def engine_args(engine: str, world, address: str | None = None) -> list:
    common = ["--engine", engine, "--index", world.index.simple_url]
    return [*common, "--master", "local[2]"] if engine == "spark" else [*common, "--address", address]


def by_id(table, key: str) -> dict:
    order = np.argsort(column(table, key))
    return {name: column(table, name)[order] for name in table.column_names}


def test_digits_on_ray_equal_predict(batch_world, ray_cluster, tmp_path):
    """Spark's one-input job is the ONNX model's below: each Spark job costs a JVM and a workers' venv (a minute here)."""
    pixels = digits_rows(3000)
    source = write_digits(tmp_path / "pixels.parquet", pixels, row_group=500)
    output = tmp_path / "scores"
    result = batch_world.batch("digits-mlp", source, output, "--id-column", "id", "--batch-size", "400",
                               *engine_args("ray", batch_world, ray_cluster))
    assert "3000 rows scored" in result.stderr
    table = by_id(scored(output), "id")
    assert table["id"].tolist() == list(range(3000))
    np.testing.assert_array_equal(table["output"], batch_world.predict("digits-mlp", pixels)["output"])


@pytest.mark.parametrize("engine", ["spark", "ray"])
def test_two_inputs_on_the_engine_equal_predict(batch_world, engine, spark_cache, request, tmp_path):
    address = request.getfixturevalue("ray_cluster") if engine == "ray" else None
    x, ids = scorer_rows(800)
    source = write_scorer(tmp_path / "rows.parquet", x, ids)
    batch_world.batch("batch-scorer", source, tmp_path / "out", "--id-column", "key", *SCORER_COLUMNS,
                      *engine_args(engine, batch_world, address), env=spark_cache)
    table = scored(tmp_path / "out")
    order = np.argsort([int(key.split("-")[1]) for key in column(table, "key")])
    expected = batch_world.predict("batch-scorer", x, ids)
    np.testing.assert_array_equal(column(table, "scores")[order], expected["scores"])
    np.testing.assert_array_equal(column(table, "total")[order], expected["total"])


def test_an_onnx_wheel_on_spark_workers_without_torch(batch_world, spark_cache, tmp_path):
    pixels = digits_rows(500)
    source = write_digits(tmp_path / "pixels.parquet", pixels)
    batch_world.batch("digits-onnx", source, tmp_path / "out", "--id-column", "id", "--columns", "x=input",
                      *engine_args("spark", batch_world), env=spark_cache)  # the exported model names its input x
    table = by_id(scored(tmp_path / "out"), "id")
    np.testing.assert_allclose(table["output"], batch_world.predict("digits-onnx", pixels)["output"], rtol=1e-6, atol=1e-6)
    [workers] = (Path(spark_cache["XDG_CACHE_HOME"]) / "nnwheel" / "spark-environments").glob("digits-onnx-*")
    for absent in ("torch", "nnwheel"):
        imported = subprocess.run([workers / "bin" / "python", "-c", f"import {absent}"], capture_output=True, cwd=tmp_path)
        assert imported.returncode != 0, f"{absent} is in the workers' environment"


def test_the_packed_environment_runs_where_it_is_unpacked(batch_world, spark_cache, tmp_path):
    """What a cluster's executors get in spark.archives: the venv as an archive that runs from anywhere."""
    from nnwheel.batch.environment import packed

    [workers] = (Path(spark_cache["XDG_CACHE_HOME"]) / "nnwheel" / "spark-environments").glob("digits-onnx-*[!z]")
    with tarfile.open(packed(workers)) as archive:
        archive.extractall(tmp_path / "environment", filter="tar")
    code = "import digits_onnx.batch, numpy; print(digits_onnx.predict(numpy.zeros((2, 64), 'float32')).shape)"
    result = subprocess.run([tmp_path / "environment" / "bin" / "python", "-c", code], capture_output=True, text=True)
    assert result.stdout.strip() == "(2, 10)", result.stderr


@pytest.mark.parametrize("engine", ["spark", "ray"])
def test_workers_that_cannot_reach_the_index_stop_the_job(batch_world, engine, spark_cache, request, tmp_path):
    address = request.getfixturevalue("ray_cluster") if engine == "ray" else None
    source = write_digits(tmp_path / "pixels.parquet", digits_rows(10))
    args = engine_args(engine, batch_world, address)
    args[args.index("--index") + 1] = f"http://127.0.0.1:{free_port()}/nowhere/+simple/"
    result = batch_world.batch("digits-mlp", source, tmp_path / "out", "--id-column", "id", *args, check=False,
                               env={**spark_cache, "PIP_RETRIES": "0"})
    assert result.returncode != 0
    error = result.stderr.strip().splitlines()[-1]
    assert error.startswith("error: ") and "pip could not install digits-mlp==0.1.0" in error, result.stderr
    assert sorted(path.name for path in tmp_path.iterdir()) == ["pixels.parquet"]  # nothing written


def test_spark_without_java_says_what_to_install(batch_world, tmp_path):
    source = write_digits(tmp_path / "pixels.parquet", digits_rows(1))
    env = {"PATH": str(tmp_path), "JAVA_HOME": ""}
    result = batch_world.batch("digits-mlp", source, tmp_path / "out", "--id-column", "id", "--engine", "spark",
                               check=False, env=env)
    assert result.returncode != 0
    assert "needs Java 17 or later" in the_error(result.stderr)
