"""The output appears only once complete: written under a temporary name beside it, then renamed."""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from ..errors import OutputExistsError


def refuse_existing(output: Path, overwrite: bool) -> None:
    """Checked before the job starts, so that a refused run costs nothing."""
    if (output.exists() or output.is_symlink()) and not overwrite:
        raise OutputExistsError(f"{output} exists; pass --overwrite to replace it, or choose another output path")
    if not output.parent.is_dir():
        raise OutputExistsError(f"the directory {output.parent} does not exist; create it first")


@contextlib.contextmanager
def staged(output: Path, overwrite: bool) -> Iterator[Path]:
    """A temporary path beside `output` to write the file or directory to; renamed to `output` when the block
    ends without an error, removed when it ends with one. A reader of `output` never sees half a result."""
    refuse_existing(output, overwrite)
    temporary = output.with_name(f".{output.name}.partial-{os.getpid()}")
    _remove(temporary)
    try:
        yield temporary
    except BaseException:
        _remove(temporary)
        raise
    if output.exists() and (output.is_dir() or temporary.is_dir()):  # os.replace swaps files for files only
        _remove(output)
    os.replace(temporary, output)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def rows_written(directory: Path) -> int:
    """The rows of the Parquet files Spark or Ray wrote into `directory`, from their footers."""
    import pyarrow.parquet as pq

    return sum(pq.ParquetFile(part).metadata.num_rows for part in sorted(directory.rglob("*.parquet")))
