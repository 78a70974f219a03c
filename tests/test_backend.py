import pytest

from ditengine.kernels import interpreter_numpy_bug


@pytest.mark.parametrize("triton_version, numpy_version, broken", [
    ("3.6.0", "2.5.0", True), ("3.6.0", "2.4.0rc1", True), ("3.4.0", "2.4.6", True),
    ("3.7.0", "2.5.0", False), ("3.9.0", "2.4.6", False), ("3.6.0", "2.3.5", False), ("3.6.0", "1.26.4", False),
])
def test_interpreter_numpy_bug_names_exactly_the_broken_pair(triton_version, numpy_version, broken):
    reason = interpreter_numpy_bug(triton_version, numpy_version)
    assert (reason is not None) == broken
    if broken:
        assert f"Triton {triton_version}" in reason and f"numpy {numpy_version}" in reason and "3.7" in reason
