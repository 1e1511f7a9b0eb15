"""decimal_names: the obs names of integer ids, equal to ``str`` of each."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from stpredict.kernels import decimal_names


@settings(max_examples=100, deadline=None)
@given(ids=hnp.arrays(st.sampled_from([np.int64, np.int32, np.uint64, np.int8]), st.integers(0, 40)))
def test_decimal_names_equal_str(ids):
    names = decimal_names(ids)
    assert names.dtype == object
    assert names.tolist() == [str(int(i)) for i in ids]
    assert all(type(n) is str for n in names)


def test_decimal_names_extremes_and_errors():
    extremes = np.array([0, -1, 9, 10, -10, 99, 100, 2**62, -(2**62), 2**63 - 1, -(2**63)], dtype=np.int64)
    assert decimal_names(extremes).tolist() == [str(int(i)) for i in extremes]
    assert decimal_names(np.array([2**64 - 1, 5], dtype=np.uint64)).tolist() == ["18446744073709551615", "5"]
    assert decimal_names(np.array([], dtype=np.int64)).shape == (0,)
    with pytest.raises(ValueError, match="integer"):
        decimal_names(np.array([1.0, 2.0]))
    with pytest.raises(ValueError, match="1-D"):
        decimal_names(np.zeros((2, 2), dtype=np.int64))
