"""The casts of wire data (``to_bfloat16``/``from_bfloat16``, ``to_float16``/
``from_float16``): bit for bit what ml_dtypes and numpy give, on every backend that
runs on the host; and half-precision gradients in ``aggregate`` and the updates: the
same bits as widening them first."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from pserver.kernels import (
    KernelError,
    aggregate,
    from_bfloat16,
    from_float16,
    sgd,
    to_bfloat16,
    to_float16,
)
from pserver.kernels.dispatch import SERIAL_BELOW

BF16 = np.dtype(ml_dtypes.bfloat16)
F16 = np.dtype(np.float16)
# the half dtype, its narrowing cast, its widening cast
CASTS: dict[str, tuple[np.dtype[Any], Callable[..., Any], Callable[..., Any]]] = {
    "bfloat16": (BF16, to_bfloat16, from_bfloat16),
    "float16": (F16, to_float16, from_float16),
}
HOST = ("cpu", "numpy")
SPECIAL = np.array(
    [0.0, -0.0, np.inf, -np.inf, np.nan, -np.nan, 1.0, -1.0, 3.4028235e38, -3.4028235e38,
     1e-40, -1e-40, 1.40129846e-45, 1.1754942e-38, 65504.0, 65519.996, 65520.0, -65520.0,
     6.1035156e-05, 6.0975552e-05, 5.9604645e-08, 2.9802322e-08, 2.9802326e-08, 8.940697e-08,
     1.00390625, 1.01171875, 1.0078125, 1.99609375, 1.00048828125, 1.00146484375],
    np.float32)
# NaNs with payloads, and values on both sides of rounding ties
SPECIAL_BITS = np.array([0x7F800001, 0xFF800001, 0x7FC00000, 0x7FBFFFFF, 0x7F802000,
                         0x3F808000, 0x3F818000, 0x3F807FFF, 0x3F808001, 0x7F7FFFFF,
                         0x7F7F8000, 0x3F801000, 0x3F803000, 0x3F800FFF, 0x3F801001],
                        np.uint32)
# float16's boundaries, every float32 around them: zero/subnormal (2**-25), subnormal/
# normal (2**-14), overflow (65520)
F16_WINDOWS = (0x33000000, 0x38800000, 0x477FF000)

float32_arrays = hnp.arrays(np.float32, st.integers(0, 300),
                            elements=st.floats(width=32, allow_nan=True, allow_infinity=True))


def _all_cases() -> np.ndarray[Any, Any]:
    rng = np.random.default_rng(7)
    noise = (rng.standard_normal(5000) * 10.0 ** rng.integers(-40, 38, 5000)).astype(np.float32)
    windows = [np.arange(w - (1 << 16), w + (1 << 16), dtype=np.uint32) for w in F16_WINDOWS]
    near = np.concatenate(windows)
    return np.concatenate([SPECIAL, SPECIAL_BITS.view(np.float32), noise,
                           near.view(np.float32), (near | np.uint32(1 << 31)).view(np.float32)])


def _cast(src: np.ndarray[Any, Any], dtype: np.dtype[Any]) -> np.ndarray[Any, Any]:
    """numpy's or ml_dtypes' cast (they warn about NaNs and overflow, which are the
    point here)."""
    with np.errstate(invalid="ignore", over="ignore"):
        return src.astype(dtype)


def _same_bits(a: np.ndarray[Any, Any], b: np.ndarray[Any, Any]) -> bool:
    return bool(np.array_equal(a.view(np.uint16), b.view(np.uint16)))


@pytest.mark.parametrize("half", CASTS)
@pytest.mark.parametrize("backend", HOST)
def test_narrowing_is_the_library_cast_bit_for_bit(backend: str, half: str) -> None:
    dtype, narrow, _ = CASTS[half]
    src = _all_cases()
    out = np.empty(src.size, dtype)
    assert narrow(src, out, backend=backend) is out
    assert _same_bits(out, _cast(src, dtype))


@pytest.mark.parametrize("half", CASTS)
@pytest.mark.parametrize("backend", HOST)
def test_widening_is_exact(backend: str, half: str) -> None:
    dtype, _, widen = CASTS[half]
    bits = np.arange(1 << 16, dtype=np.uint16)  # every value there is
    out = np.empty(bits.size, np.float32)
    widen(bits.view(dtype), out, backend=backend)
    want = bits.view(dtype).astype(np.float32)
    assert np.array_equal(out.view(np.uint32), want.view(np.uint32))


@given(src=float32_arrays, half=st.sampled_from(sorted(CASTS)))
def test_random_arrays_match_the_library_both_ways(src: np.ndarray[Any, Any],
                                                   half: str) -> None:
    dtype, narrow, widen = CASTS[half]
    bits = np.empty(src.size, np.uint16)  # uint16 bits are accepted as well
    narrow(src, bits)
    assert _same_bits(bits, _cast(src, dtype))
    wide = np.empty_like(src)
    widen(bits, wide)
    assert np.array_equal(wide.view(np.uint32),
                          _cast(src, dtype).astype(np.float32).view(np.uint32))


@pytest.mark.parametrize("half", CASTS)
def test_large_arrays_cast_as_small_ones(half: str) -> None:
    """Above SERIAL_BELOW the other kernels run in parallel; the casts stay serial and
    give the library's bits at every size."""
    dtype, narrow, widen = CASTS[half]
    big = np.random.default_rng(3).standard_normal(SERIAL_BELOW + 1001).astype(np.float32)
    out = np.empty(big.size, dtype)
    narrow(big, out)
    assert _same_bits(out, _cast(big, dtype))
    back = np.empty_like(big)
    widen(out, back)
    assert np.array_equal(back, out.astype(np.float32))


def test_multidimensional_arrays_cast_element_by_element() -> None:
    src = np.linspace(-3, 3, 24, dtype=np.float32).reshape(2, 3, 4)
    out = np.empty((2, 3, 4), BF16)
    to_bfloat16(src, out)
    assert _same_bits(out, _cast(src, BF16))


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
