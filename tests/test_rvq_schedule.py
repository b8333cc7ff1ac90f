"""RVQ token schedules in vivace._C against plain-Python references."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from vivace import _C


def flatten_reference(codes: np.ndarray, codebook_size: int, offset: int) -> list[int]:
    return [offset + level * codebook_size + int(codes[t, level]) for t in range(codes.shape[0]) for level in range(codes.shape[1])]


def level_windows_reference(start: int, count: int, num_levels: int, codebook_size: int) -> list[list[int]]:
    return [[(step % num_levels) * codebook_size, (step % num_levels + 1) * codebook_size] for step in range(start, start + count)]


def delay_reference(codes: np.ndarray, pad_id: int) -> list[list[int]]:
    books, steps = codes.shape
    return [[int(codes[k, s - k]) if 0 <= s - k < steps else pad_id for s in range(steps + books - 1)] for k in range(books)]


@st.composite
def rvq_codes(draw):
    codebook_size = draw(st.integers(1, 64))
    shape = (draw(st.integers(0, 12)), draw(st.integers(1, 6)))
    codes = draw(hnp.arrays(np.int64, shape, elements=st.integers(0, codebook_size - 1)))
    return codes, codebook_size, draw(st.integers(0, 10_000))


@given(rvq_codes())
@settings(max_examples=150, deadline=None)
def test_flatten_matches_reference_and_unflatten_inverts_it(case):
    codes, codebook_size, offset = case
    tokens = _C.flatten_time_major(codes, codebook_size, offset)
    assert tokens.dtype == np.int64
    assert tokens.tolist() == flatten_reference(codes, codebook_size, offset)
    back = _C.unflatten_time_major(tokens, codes.shape[1], codebook_size, offset)
    np.testing.assert_array_equal(back, codes.reshape(back.shape))


@given(rvq_codes())
@settings(max_examples=100, deadline=None)
def test_unflatten_then_flatten_is_identity_on_valid_streams(case):
    codes, codebook_size, offset = case
    tokens = np.array(flatten_reference(codes, codebook_size, offset), dtype=np.int64)
    again = _C.flatten_time_major(_C.unflatten_time_major(tokens, codes.shape[1], codebook_size, offset), codebook_size, offset)
    np.testing.assert_array_equal(again, tokens)


@given(st.integers(0, 50), st.integers(0, 40), st.integers(1, 12), st.integers(1, 4096))
@settings(max_examples=100, deadline=None)
def test_level_windows_match_reference(start, count, num_levels, codebook_size):
    windows = _C.level_windows(start, count, num_levels, codebook_size)
    assert windows.shape == (count, 2)
    assert windows.tolist() == level_windows_reference(start, count, num_levels, codebook_size)


@given(hnp.arrays(np.int64, st.tuples(st.integers(1, 8), st.integers(0, 30)), elements=st.integers(0, 2047)), st.integers(-1, 4096))
@settings(max_examples=150, deadline=None)
def test_delay_pattern_matches_reference_and_undelay_inverts_it(codes, pad_id):
    delayed = _C.delay_pattern(codes, pad_id)
    books, steps = codes.shape
    assert delayed.shape == (books, steps + books - 1)
    assert delayed.tolist() == delay_reference(codes, pad_id)
    np.testing.assert_array_equal(_C.undelay_pattern(delayed), codes)


def test_delay_pattern_mask_is_musicgen_staircase():
    codes = np.arange(1, 4 * 5 + 1, dtype=np.int64).reshape(4, 5)
    delayed = _C.delay_pattern(codes, 2048)
    is_pad = delayed == 2048
    # codebook k starts at step k and ends at step T - 1 + k
    expected = np.array([[s < k or s >= 5 + k for s in range(8)] for k in range(4)])
    np.testing.assert_array_equal(is_pad, expected)
    assert delayed[0, :5].tolist() == [1, 2, 3, 4, 5]
    assert delayed[3, 3:].tolist() == [16, 17, 18, 19, 20]


def test_undelay_of_a_delayed_sequence_ignores_pads():
    delayed = _C.delay_pattern(np.array([[7, 8], [9, 10]], dtype=np.int64), -1)
    assert delayed.tolist() == [[7, 8, -1], [-1, 9, 10]]
    assert _C.undelay_pattern(delayed).tolist() == [[7, 8], [9, 10]]


def test_schedule_errors_are_value_errors():
    with pytest.raises(ValueError, match="outside"):
        _C.flatten_time_major(np.array([[5]]), 4, 0)
    with pytest.raises(ValueError, match="do not split"):
        _C.unflatten_time_major(np.arange(5), 2, 4, 0)
    with pytest.raises(ValueError, match=r"\[codebooks, steps\]"):
        _C.delay_pattern(np.arange(4), 0)
    with pytest.raises(ValueError, match="fewer than"):
        _C.undelay_pattern(np.zeros((4, 2), dtype=np.int64))
