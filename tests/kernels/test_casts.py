"""The bfloat16 casts of wire data (``to_bfloat16``, ``from_bfloat16``): bit for bit
what ml_dtypes gives, on every backend that runs on the host; and bfloat16 gradients
in ``aggregate`` and the updates: the same bits as widening them first."""

from __future__ import annotations

from typing import Any

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from pserver.kernels import KernelError, aggregate, from_bfloat16, sgd, to_bfloat16
from pserver.kernels.dispatch import SERIAL_BELOW

BF16 = np.dtype(ml_dtypes.bfloat16)
HOST = ("cpu", "numpy")
SPECIAL = np.array(
    [0.0, -0.0, np.inf, -np.inf, np.nan, -np.nan, 1.0, -1.0, 3.4028235e38, -3.4028235e38,
     1e-40, -1e-40, 1.40129846e-45, 1.1754942e-38, 65504.0, 1.00390625, 1.01171875,
     1.0078125, 1.99609375],
    np.float32)
# NaNs with payloads, and values on both sides of every rounding tie
SPECIAL_BITS = np.array([0x7F800001, 0xFF800001, 0x7FC00000, 0x7FBFFFFF, 0x3F808000,
                         0x3F818000, 0x3F807FFF, 0x3F808001, 0x7F7FFFFF, 0x7F7F8000],
                        np.uint32)

float32_arrays = hnp.arrays(np.float32, st.integers(0, 300),
                            elements=st.floats(width=32, allow_nan=True, allow_infinity=True))


def _all_cases() -> np.ndarray[Any, Any]:
    rng = np.random.default_rng(7)
    noise = (rng.standard_normal(5000) * 10.0 ** rng.integers(-40, 38, 5000)).astype(np.float32)
    return np.concatenate([SPECIAL, SPECIAL_BITS.view(np.float32), noise])


def _bf16(src: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    """ml_dtypes' cast (it warns about NaNs, which are the point here)."""
    with np.errstate(invalid="ignore"):
        return src.astype(BF16)


def _same_bits(a: np.ndarray[Any, Any], b: np.ndarray[Any, Any]) -> bool:
    return bool(np.array_equal(a.view(np.uint16), b.view(np.uint16)))


@pytest.mark.parametrize("backend", HOST)
def test_to_bfloat16_is_ml_dtypes_bit_for_bit(backend: str) -> None:
    src = _all_cases()
    out = np.empty(src.size, BF16)
    assert to_bfloat16(src, out, backend=backend) is out
    assert _same_bits(out, _bf16(src))


@pytest.mark.parametrize("backend", HOST)
def test_from_bfloat16_is_exact(backend: str) -> None:
    bits = np.arange(1 << 16, dtype=np.uint16)  # every bfloat16 value there is
    out = np.empty(bits.size, np.float32)
    from_bfloat16(bits.view(BF16), out, backend=backend)
    want = bits.view(BF16).astype(np.float32)
    assert np.array_equal(out.view(np.uint32), want.view(np.uint32))


@given(src=float32_arrays)
def test_random_arrays_match_ml_dtypes_both_ways(src: np.ndarray[Any, Any]) -> None:
    narrow = np.empty(src.size, np.uint16)  # uint16 bits are accepted as well
    to_bfloat16(src, narrow)
    assert _same_bits(narrow, _bf16(src))
    wide = np.empty_like(src)
    from_bfloat16(narrow, wide)
    assert np.array_equal(wide.view(np.uint32), _bf16(src).astype(np.float32).view(np.uint32))


def test_parallel_and_serial_kernels_give_the_same_bits() -> None:
    rng = np.random.default_rng(3)
    big = rng.standard_normal(SERIAL_BELOW + 1001).astype(np.float32)  # parallel kernel
    out = np.empty(big.size, BF16)
    to_bfloat16(big, out)
    assert _same_bits(out, _bf16(big))
    back = np.empty_like(big)
    from_bfloat16(out, back)
    assert np.array_equal(back, out.astype(np.float32))


def test_multidimensional_arrays_cast_element_by_element() -> None:
    src = np.linspace(-3, 3, 24, dtype=np.float32).reshape(2, 3, 4)
    out = np.empty((2, 3, 4), BF16)
    to_bfloat16(src, out)
    assert _same_bits(out, _bf16(src))


def _read_only(a: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    a.flags.writeable = False
    return a


@pytest.mark.parametrize("call", [
    lambda: to_bfloat16(np.zeros(4, np.float64), np.empty(4, BF16)),
    lambda: to_bfloat16(np.zeros(4, np.float32), np.empty(4, np.float16)),
    lambda: to_bfloat16(np.zeros(4, np.float32), np.empty(5, BF16)),
    lambda: to_bfloat16(np.zeros(8, np.float32)[::2], np.empty(4, BF16)),
    lambda: to_bfloat16(np.zeros(4, np.float32), _read_only(np.zeros(4, BF16))),
    lambda: from_bfloat16(np.zeros(4, BF16), np.empty(4, np.float64)),
    lambda: from_bfloat16(np.zeros(3, BF16), np.empty(4, np.float32)),
    lambda: from_bfloat16([0, 0], np.empty(2, np.float32)),
    lambda: to_bfloat16(np.zeros(4, np.float32), np.empty(4, BF16), backend="gpu"),
], ids=["float64 src", "float16 out", "size", "strided src", "read-only out",
        "float64 out", "size back", "list src", "unknown backend"])
def test_bad_arguments_raise_kernel_error(call: Any) -> None:
    with pytest.raises(KernelError):
        call()


@pytest.mark.parametrize("n", [0, 1, 1001, SERIAL_BELOW + 3])
@pytest.mark.parametrize("workers", [1, 2, 9])  # 9: two groups of the fused sum
def test_aggregate_of_bfloat16_gradients_equals_widening_them_first(n: int,
                                                                    workers: int) -> None:
    rng = np.random.default_rng(n + workers)
    grads = [rng.standard_normal(n).astype(BF16) for _ in range(workers)]
    wide = [g.astype(np.float32) for g in grads]
    want = np.empty(n, np.float32)
    aggregate(wide, want, mean=True)
    for backend in HOST:
        out = np.empty(n, np.float32)
        aggregate(grads, out, mean=True, backend=backend)
        assert np.array_equal(out.view(np.uint32), want.view(np.uint32)), backend


def test_aggregate_widens_bfloat16_mixed_with_other_gradients() -> None:
    rng = np.random.default_rng(5)
    a = rng.standard_normal(777).astype(BF16)
    b = rng.standard_normal(777).astype(np.float32)
    c = rng.standard_normal(777).astype(np.float16)
    out, want = np.empty(777, np.float32), np.empty(777, np.float32)
    aggregate([a, b, c], out)
    aggregate([a.astype(np.float32), b, c.astype(np.float32)], want)
    assert np.array_equal(out, want)
    out64 = np.empty(777, np.float64)
    aggregate([a, a], out64)  # into float64: widened by ml_dtypes' cast
    assert np.array_equal(out64, 2 * a.astype(np.float64))


def test_sgd_takes_a_bfloat16_gradient() -> None:
    p = np.ones(300, np.float32)
    g = np.linspace(-1, 1, 300, dtype=np.float32).astype(BF16)
    want = p - np.float32(0.5) * g.astype(np.float32)
    sgd(p, g, lr=0.5)
    assert np.array_equal(p, want)
