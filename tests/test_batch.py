"""nnwheel batch with the local engine: a user scores a table with a model pip installed from a real devpi
index, and gets predict()'s answers row for row beside their ids; every bad input is one clear error."""

from __future__ import annotations

import csv

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from batch_fixtures import (
    batch_world,  # noqa: F401  (a fixture)
    column,
    digits_rows,
    fixed_size_lists,
    peak_rss_mib,
    scored,
    scorer_rows,
    write_digits,
    write_scorer,
)
from conftest import the_error

pytestmark = pytest.mark.e2e


def test_digits_scored_in_order_beside_their_ids(batch_world, tmp_path):
    pixels = digits_rows(5000)
    ids = np.random.default_rng(3).permutation(10**6)[:5000]  # ids in no order: the output keeps the input's
    source = write_digits(tmp_path / "pixels.parquet", pixels, ids, row_group=1500)
    result = batch_world.batch("digits-mlp", source, tmp_path / "scores.parquet", "--id-column", "id", "--batch-size", "700")
    assert "5000 rows scored" in result.stderr
    table = scored(tmp_path / "scores.parquet")
    assert table.column_names == ["id", "output"]
    assert column(table, "id").tolist() == ids.tolist()
    np.testing.assert_array_equal(column(table, "output"), batch_world.predict("digits-mlp", pixels)["output"])


def test_two_inputs_from_list_columns_and_a_dict_of_outputs(batch_world, tmp_path):
    x, ids = scorer_rows(999)
    source = write_scorer(tmp_path / "rows.parquet", x, ids)
    batch_world.batch("batch-scorer", source, tmp_path / "out.parquet", "--id-column", "key", "--batch-size", "100",
                      "--columns", "input_0=x", "--columns", "input_1=ids")  # a state_dict's inputs: input_0, input_1
    table = scored(tmp_path / "out.parquet")
    expected = batch_world.predict("batch-scorer", x, ids)
    assert table.column_names == ["key", "scores", "total"]
    assert column(table, "key").tolist() == [f"row-{i}" for i in range(999)]
    np.testing.assert_array_equal(column(table, "scores"), expected["scores"])
    np.testing.assert_array_equal(column(table, "total"), expected["total"])


def test_a_wide_csv_stacked_into_one_input(batch_world, tmp_path):
    pixels = digits_rows(300).round()  # integers, as a CSV of pixel counts holds them
    source = tmp_path / "pixels.csv"
    with source.open("w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["id", *(f"p{i}" for i in range(64))])
        writer.writerows([i, *map(int, row)] for i, row in enumerate(pixels))
    columns = "input=" + ",".join(f"p{i}" for i in range(64))
    batch_world.batch("digits-mlp", source, tmp_path / "out.parquet", "--id-column", "id", "--columns", columns)
    np.testing.assert_array_equal(column(scored(tmp_path / "out.parquet"), "output"),
                                  batch_world.predict("digits-mlp", pixels)["output"])


def test_an_npy_file(batch_world, tmp_path):
    pixels = digits_rows(1000)
    np.save(tmp_path / "pixels.npy", pixels)
    batch_world.batch("digits-mlp", tmp_path / "pixels.npy", tmp_path / "out.parquet", "--batch-size", "64")
    table = scored(tmp_path / "out.parquet")
    assert table.column_names == ["output"]
    np.testing.assert_array_equal(column(table, "output"), batch_world.predict("digits-mlp", pixels)["output"])


def test_memory_stays_bounded_by_the_batch_not_the_file(batch_world, tmp_path):
    """A file 100 batches long (420 MB of pixels) costs little more than the model loaded and one batch."""
    batch_size = 16384
    pixels = digits_rows(batch_size * 100)
    source = write_digits(tmp_path / "big.parquet", pixels, row_group=batch_size)
    del pixels
    one_batch = f"import numpy, pyarrow.parquet, digits_mlp; digits_mlp.predict(numpy.zeros(({batch_size}, 64), 'float32'))"
    model_only = [batch_world.env.python, "-c", one_batch]
    _, baseline = peak_rss_mib(model_only)
    command = [batch_world.env.python, "-m", "nnwheel", "batch", "digits-mlp", source, tmp_path / "out.parquet",
               "--id-column", "id", "--batch-size", batch_size]
    result, peak = peak_rss_mib(command)
    assert result.returncode == 0, result.stderr
    assert pq.ParquetFile(tmp_path / "out.parquet").metadata.num_rows == batch_size * 100
    # Generous: read whole, the file's 420 MB of pixels alone would be over it (150 MiB was seen to fail once).
    assert peak < baseline + 300, f"peak RSS {peak:.0f} MiB, the model and one batch {baseline:.0f} MiB"


# --- bad input: one error line, a non-zero exit, nothing written --------------------------------------------


def failed(batch_world, *args, env: dict | None = None) -> str:
    result = batch_world.batch(*args, check=False, env=env)
    assert result.returncode != 0
    return the_error(result.stderr)


def test_a_missing_column_is_named_with_what_the_file_has(batch_world, tmp_path):
    source = tmp_path / "renamed.parquet"
    pq.write_table(pa.table({"id": [1], "pixels": fixed_size_lists(digits_rows(1))}), source)
    error = failed(batch_world, "digits-mlp", source, tmp_path / "out.parquet")
    assert "has no column 'input' (for input 'input'); it has id, pixels" in error
    assert "--columns INPUT=COLUMN" in error
    assert not (tmp_path / "out.parquet").exists()
    batch_world.batch("digits-mlp", source, tmp_path / "out.parquet", "--columns", "pixels")  # as the error says
    assert "misnamed" in failed(batch_world, "digits-mlp", source, tmp_path / "x.parquet", "--id-column", "misnamed")


@pytest.mark.parametrize(
    ("values", "says"),
    [
        (pa.array([["a"] * 64]), "holds string; input 'input' takes float32 numbers"),
        (fixed_size_lists(digits_rows(1)[:, :63]), "takes rows of shape (64); the column(s) input give rows of shape (63,)"),
        (pa.array([[1.0] * 64, [1.0] * 63]), "has rows of lengths 63 to 64"),
        (pa.array([None], pa.list_(pa.float32())), "empty (null) values"),
    ],
    ids=["dtype", "width", "ragged", "null"],
)
def test_a_column_of_the_wrong_dtype_or_width(batch_world, tmp_path, values, says):
    source = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"input": values}), source)
    error = failed(batch_world, "digits-mlp", source, tmp_path / "out.parquet")
    assert f"bad.parquet: the column 'input' {says}" in error or says in error
    assert list(tmp_path.iterdir()) == [source]  # no output, no temporary file left behind


def test_ids_of_fractional_numbers_are_refused(batch_world, tmp_path):
    x, ids = scorer_rows(3)
    source = tmp_path / "rows.parquet"
    pq.write_table(pa.table({"x": fixed_size_lists(x), "ids": fixed_size_lists(ids + 0.5)}), source)
    error = failed(batch_world, "batch-scorer", source, tmp_path / "o.parquet", "--columns", "input_0=x", "--columns", "input_1=ids")
    assert "the column 'ids' (double) does not fit input 'input_1' (int64)" in error


def test_a_corrupt_parquet_file(batch_world, tmp_path):
    source = write_digits(tmp_path / "cut.parquet", digits_rows(100))
    source.write_bytes(source.read_bytes()[:-100])
    error = failed(batch_world, "digits-mlp", source, tmp_path / "out.parquet")
    assert "cut.parquet is not a readable parquet file" in error
    assert not (tmp_path / "out.parquet").exists()


def test_an_existing_output_is_kept_unless_overwrite_and_never_half_replaced(batch_world, tmp_path):
    source = write_digits(tmp_path / "pixels.parquet", digits_rows(10))
    output = tmp_path / "out.parquet"
    output.write_text("yesterday's scores")
    assert "out.parquet exists; pass --overwrite" in failed(batch_world, "digits-mlp", source, output)
    broken = tmp_path / "broken.parquet"
    pq.write_table(pa.table({"input": fixed_size_lists(digits_rows(2000)[:, :10])}), broken, row_group_size=100)
    failed(batch_world, "digits-mlp", broken, output, "--overwrite", "--batch-size", "100")
    assert output.read_text() == "yesterday's scores"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["broken.parquet", "out.parquet", "pixels.parquet"]
    batch_world.batch("digits-mlp", source, output, "--overwrite")
    assert scored(output).num_rows == 10


def test_a_model_that_is_not_installed(batch_world, tmp_path):
    source = write_digits(tmp_path / "pixels.parquet", digits_rows(1))
    error = failed(batch_world, "no-such-model", source, tmp_path / "out.parquet")
    assert "no installed model named 'no-such-model'" in error and "pip install no-such-model" in error


@pytest.mark.parametrize(("engine", "extra"), [("spark", "pyspark"), ("ray", "ray")])
def test_an_engine_that_is_not_installed_names_the_extra(batch_world, tmp_path, engine, extra):
    hidden = tmp_path / "hidden"
    hidden.mkdir()  # a module of the engine's name that says it is missing, first on sys.path
    (hidden / f"{extra}.py").write_text(f'raise ModuleNotFoundError("No module named {extra!r}", name={extra!r})\n')
    source = write_digits(tmp_path / "pixels.parquet", digits_rows(1))
    error = failed(batch_world, "digits-mlp", source, tmp_path / "out", "--engine", engine, "--id-column", "id",
                   env={"PYTHONPATH": str(hidden)})
    assert f"pip install 'nnwheel[{engine}]'" in error


def test_the_distributed_engines_need_an_id_column(batch_world, tmp_path):
    source = write_digits(tmp_path / "pixels.parquet", digits_rows(1))
    assert "needs --id-column" in failed(batch_world, "digits-mlp", source, tmp_path / "out", "--engine", "ray")


def test_help_says_what_each_engine_needs(batch_world):
    text = batch_world.batch("--help").stdout
    assert "Java 17+" in text and "nnwheel[spark]" in text and "nnwheel[ray]" in text and "--master" in text


def test_no_pyarrow_is_one_error_naming_the_extra(batch_world, tmp_path):
    hidden = tmp_path / "hidden"
    hidden.mkdir()
    (hidden / "pyarrow.py").write_text("raise ModuleNotFoundError(\"No module named 'pyarrow'\", name='pyarrow')\n")
    error = failed(batch_world, "digits-mlp", tmp_path / "in.parquet", tmp_path / "out.parquet",
                   env={"PYTHONPATH": str(hidden)})
    assert "pip install 'nnwheel[batch]'" in error



def test_the_progress_bar_counts_rows():
    import os
    import pty

    from nnwheel.progress import ROWS, Progress

    master, slave = pty.openpty()
    with os.fdopen(slave, "w") as terminal, Progress(1_000_000, "scoring digits-mlp", stream=terminal, unit=ROWS) as bar:
        bar.advance(1_000_000)
    shown = os.read(master, 1 << 16).decode()
    os.close(master)
    assert "scoring digits-mlp [" in shown and " 1000000/1000000 rows " in shown and " rows/s" in shown
