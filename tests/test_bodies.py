"""array_from_json's one-pass path for flat lists of floats (_flat_floats) against its general path
(_checked_array): the same array, dtype and writability for what it reads, the same refusal for what it refuses."""

from __future__ import annotations

import math

import numpy as np
import pytest

from nnwheel.schema import TensorSpec
from nnwheel.serving import bodies
from nnwheel.serving.bodies import RequestFailed, array_from_json

FLOATS = [0.1, -2.5, 3.5, 1e-45, 3.4028234e38, 7]

VALUES = [
    ("floats and an integer", FLOATS),
    ("empty", []),
    ("nested", [FLOATS, FLOATS]),
    ("a string", [*FLOATS, "0.5"]),
    ("a word", ["one", 1.5]),
    ("null", [1.5, None]),
    ("true", [0.5, True]),
    ("false", [False, 0.5]),
    ("a one and a zero", [1.0, 0.5, 0.0]),
    ("beyond float32", [1.5, 1e39]),
    ("an integer past float64", [1.5, 10**400]),
    ("NaN", [math.nan, 1.5]),
    ("a scalar", 1.5),
    ("ragged", [[1.5], [1.5, 2.5]]),
]


def outcome(value, spec: TensorSpec, general: bool):
    """array_from_json's answer, with the one-pass path turned off where `general`."""
    with pytest.MonkeyPatch.context() as patch:
        if general:
            patch.setattr(bodies, "_flat_floats", lambda value, dtype: None)
        try:
            return array_from_json(value, spec, "inputs[0].data")
        except RequestFailed as refused:
            return refused.status, str(refused)


@pytest.mark.parametrize("dtype", ["float32", "float64", "float16", "int64", "bool"])
@pytest.mark.parametrize("value", [value for _, value in VALUES], ids=[name for name, _ in VALUES])
def test_the_one_pass_path_gives_the_general_paths_answer(value, dtype):
    spec = TensorSpec("input", dtype, (-1,))
    general, fast = outcome(value, spec, general=True), outcome(value, spec, general=False)
    if isinstance(general, np.ndarray):
        assert isinstance(fast, np.ndarray) and fast.dtype == general.dtype and fast.flags.writeable
        np.testing.assert_array_equal(fast, general)
    else:
        assert fast == general


def test_flat_floats_take_one_pass_and_bools_are_still_refused(monkeypatch):
    spec = TensorSpec("input", "float32", (-1,))
    checked, checked_array = [], bodies._checked_array

    def counted(*args):
        checked.append(args[0])
        return checked_array(*args)

    monkeypatch.setattr(bodies, "_checked_array", counted)
    np.testing.assert_array_equal(array_from_json(FLOATS, spec, "data"), np.array(FLOATS, np.float32))
    assert checked == []
    with pytest.raises(RequestFailed, match=r"has true at data\[1\]"):
        array_from_json([0.5, True], spec, "data")
    assert checked == [[0.5, True]]
