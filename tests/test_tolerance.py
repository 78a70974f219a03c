"""The tolerance rule itself: it must fail a wrong output, including where the reference is non-finite."""
import pytest
import torch

from support.tolerance import assert_within_tolerance

INF, NAN = float("inf"), float("nan")


def t(*values):
    return torch.tensor(values, dtype=torch.float64)


def test_passes_within_twice_the_low_precision_error():
    ref32 = t(1.0, 2.0, 3.0)
    assert_within_tolerance(t(1.0, 2.015, 3.0), ref32, t(1.0, 2.01, 3.0), floor=0.0)


def test_fails_beyond_it():
    with pytest.raises(AssertionError, match=r"first bad index \(1,\)"):
        assert_within_tolerance(t(1.0, 2.03, 3.0), t(1.0, 2.0, 3.0), t(1.0, 2.01, 3.0), floor=0.0)


def test_an_inf_in_the_reference_does_not_pass_everything():
    ref = t(INF, 1.0, 2.0)
    with pytest.raises(AssertionError, match="exceeds"):
        assert_within_tolerance(t(INF, 0.0, -5.0), ref, ref.clone())


@pytest.mark.parametrize("out", [t(-INF, 1.0, 2.0), t(NAN, 1.0, 2.0), t(7.0, 1.0, 2.0)], ids=["-inf", "nan", "finite"])
def test_non_finite_reference_entries_must_match_exactly(out):
    ref = t(INF, 1.0, 2.0)
    with pytest.raises(AssertionError, match="non-finite"):
        assert_within_tolerance(out, ref, ref.clone())


def test_nan_where_the_reference_is_nan_passes_and_a_number_there_fails():
    ref = t(NAN, -INF, 2.0)
    assert_within_tolerance(t(NAN, -INF, 2.0), ref, ref.clone())
    with pytest.raises(AssertionError, match="non-finite"):
        assert_within_tolerance(t(0.0, -INF, 2.0), ref, ref.clone())


def test_nan_output_where_the_reference_is_finite_fails():
    ref = t(1.0, 2.0)
    with pytest.raises(AssertionError, match="exceeds"):
        assert_within_tolerance(t(1.0, NAN), ref, ref.clone())


def test_low_precision_overflow_does_not_widen_the_bound():
    ref32 = t(1.0, 70000.0)
    ref_lp = t(1.0, INF)  # fp16 overflowed
    assert_within_tolerance(t(1.0, INF), ref32, ref_lp)  # the kernel overflowed the same way
    with pytest.raises(AssertionError, match="exceeds"):
        assert_within_tolerance(t(5.0, 70000.0), ref32, ref_lp)
