r"""A branch-free ``exp`` for x <= 0 that LLVM can vectorise inside Numba loops: ``exp_nonpositive(x)``.

Why: the llvmlite Numba uses here has no SVML, so ``np.exp`` in a compiled loop is one scalar libm call per element,
and a loop containing a call is never vectorised. The WKV kernels evaluate exp twelve times per (b, t, c) and were
bound by those calls (docs/numba.md). Everything below is plain arithmetic, integer shifts and selects, so the
inner channel loop of a kernel vectorises (LLVM picks 8 float32 lanes, 256-bit vectors, on this CPU).

Method (Cody and Waite 1980, the scheme of fdlibm ``e_exp.c`` and Cephes ``expf``):

    n = round(x / ln 2)                      by adding and subtracting 1.5 * 2^(mantissa bits): no call, no branch
    r = (x - n ln2_hi) - n ln2_lo            ln 2 split in two: n ln2_hi is exact, so r is accurate, |r| <= ln2 / 2
    exp(r) ~ sum_{j <= d} r^j / j!           Horner; d = 7 (float32) or 13 (float64): truncation < 0.1 ulp
    exp(x) = exp(r) * 2^n1 * 2^n2            n1 + n2 = n, each 2^ni built from its exponent bits; two factors so
                                             that results down to the smallest subnormal are formed by one rounding

Domain: x <= 0 (the WKV only ever needs exp of "value minus the running maximum"), including -1e38 (the official
kernels' stand-in for log 0): x is clamped before the integer conversion, and every x below the underflow
threshold ln(2^-150) (float32) or ln(2^-1075) (float64), where the exact result rounds to 0, returns exactly 0.
exp(0) is exactly 1 (n = 0, r = 0, and the polynomial's constant term is 1).

Accuracy (tests/test_numba_ops.py asserts it): at most 2 ulp against the correctly rounded result for normal
results, in float32 (checked against float64 exp) and float64 (checked against long double exp); measured 0.91 and
0.89 ulp as the kernels compile it (with fused multiply-adds), ~1.2 ulp without. For subnormal results the
absolute error is at most one unit of the smallest subnormal.

Inside a ``prange`` loop the function must not add exits to the loop body, or Numba runs the loop serially: it is
inlined into the caller's IR (``inline="always"``), its selects are LLVM ``select`` instructions (``_select``)
rather than Python ``if``s, and the Horner loop lives in a separate, not IR-inlined, function that LLVM inlines
and unrolls later.

One generic definition serves both dtypes: ``exp_nonpositive`` is a Numba ``overload`` whose implementation takes
its constants (typed as the argument's dtype, so float32 stays float32) from ``_constants``. Only callable from
Numba-compiled code; ``exp_nonpositive_array`` maps it over an array (for tests and the benchmark).
"""
from __future__ import annotations

import math
from typing import NamedTuple

import numba
import numpy as np
from numba import types
from numba.core.extending import intrinsic, overload


class _ExpConstants(NamedTuple):
    """The constants of one dtype, each already of that dtype (a Python float in Numba code would be float64)."""

    log2e: np.floating  # 1 / ln 2
    ln2_hi: np.floating  # ln 2 rounded to few bits, so that n * ln2_hi is exact for every |n| the domain needs
    ln2_lo: np.floating  # ln 2 - ln2_hi
    magic: np.floating  # 1.5 * 2^mantissa: (t + magic) - magic rounds t to the nearest integer
    x_min: np.floating  # underflow threshold: exp(x) rounds to 0 below it
    zero: np.floating
    one: np.floating
    coeffs: tuple  # 1/d!, ..., 1/1!, 1/0!: the Taylor polynomial of exp in Horner order
    int_type: type  # the integer type of the same width (its bits are reinterpreted as the float)
    mantissa_bits: np.integer  # 23 or 52: where the exponent field starts
    bias: np.integer  # 127 or 1023: the exponent bias


def _constants(dtype) -> _ExpConstants:
    dtype = np.dtype(dtype)
    f = dtype.type
    if dtype == np.float32:
        # 0x3f318000: 9 significant bits, so n * ln2_hi is exact for |n| <= 2^15 (here |n| <= 150)
        ln2_hi, degree, int_type, mantissa, bias, min_exp = 0.693359375, 7, np.int32, 23, 127, -150
    elif dtype == np.float64:
        # fdlibm's ln2_hi (0x3fe62e42fee00000): 32 significant bits, n * ln2_hi exact for |n| <= 2^21
        ln2_hi, degree, int_type, mantissa, bias, min_exp = 6.93147180369123816490e-01, 13, np.int64, 52, 1023, -1075
    else:
        raise ValueError(f"exp_nonpositive supports float32 and float64, not {dtype}")
    # ln 2 - ln2_hi: in float64 for float32 (then rounded once); fdlibm's exact ln2_lo for float64
    ln2_lo = math.log(2) - ln2_hi if dtype == np.float32 else 1.90821492927058770002e-10
    return _ExpConstants(
        log2e=f(1 / math.log(2)), ln2_hi=f(ln2_hi), ln2_lo=f(ln2_lo), magic=f(1.5 * 2.0 ** mantissa),
        x_min=f(min_exp * math.log(2)), zero=f(0), one=f(1),
        coeffs=tuple(f(1 / math.factorial(j)) for j in range(degree, -1, -1)),
        int_type=int_type, mantissa_bits=int_type(mantissa), bias=int_type(bias))


@intrinsic
def _bits_as_float(typingctx, bits):
    """Reinterpret the bits of an int32 (int64) as a float32 (float64), as a C union or np.view would."""
    if bits == types.int32:
        out = types.float32
    elif bits == types.int64:
        out = types.float64
    else:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], context.get_value_type(out))

    return out(bits), codegen


@intrinsic
def _select(typingctx, condition, if_true, if_false):
    """``if_true if condition else if_false`` as one LLVM select: no branch in the IR, so the loop that contains it
    stays a single-exit loop (a prange requirement) and vectorises (a masked blend)."""
    if not isinstance(condition, types.Boolean) or if_true != if_false:
        return None

    def codegen(context, builder, signature, args):
        return builder.select(*args)

    return if_true(condition, if_true, if_false), codegen


def _exp_polynomial(r):
    """The Taylor polynomial of exp(r) for |r| <= ln 2 / 2, of the degree r's dtype needs. Numba code only."""
    raise TypeError("_exp_polynomial is compiled by Numba")


@overload(_exp_polynomial)  # not inlined into Numba's IR (a loop there breaks prange); LLVM inlines and unrolls it
def _exp_polynomial_overload(r):
    if not isinstance(r, types.Float) or r.bitwidth not in (32, 64):
        return None
    coeffs = _constants("float32" if r.bitwidth == 32 else "float64").coeffs
    first, rest = coeffs[0], coeffs[1:]

    def impl(r):
        p = first
        for c in rest:  # Horner: p(r) = 1 + r (1 + r (1/2 + r (1/6 + ...)))
            p = p * r + c
        return p

    return impl


def exp_nonpositive(x):
    """exp(x) for x <= 0, vectorisable in Numba loops (see the module docstring). Only callable from Numba code."""
    raise TypeError("exp_nonpositive is compiled by Numba; from Python call exp_nonpositive_array")


@overload(exp_nonpositive, inline="always")  # inlined into the caller's IR: LLVM then sees one loop body
def _exp_nonpositive_overload(x):
    if not isinstance(x, types.Float) or x.bitwidth not in (32, 64):
        return None
    log2e, ln2_hi, ln2_lo, magic, x_min, zero, _, _, int_type, mantissa_bits, bias = _constants(
        "float32" if x.bitwidth == 32 else "float64")

    def impl(x):
        xc = max(x, x_min)  # -1e38 would overflow the integer conversion; the select below zeroes it anyway
        n_f = (xc * log2e + magic) - magic  # round(x / ln 2), as a float
        r = (xc - n_f * ln2_hi) - n_f * ln2_lo  # x - n ln 2, |r| <= ln 2 / 2
        p = _exp_polynomial(r)  # exp(r)
        n = int_type(n_f)
        n1 = int_type(n >> 1)  # n = n1 + n2 with both halves >= -538: 2^n1, 2^n2 are normal numbers
        n2 = int_type(n - n1)
        scale1 = _bits_as_float(int_type((n1 + bias) << mantissa_bits))  # 2^n1 from its exponent field
        scale2 = _bits_as_float(int_type((n2 + bias) << mantissa_bits))
        y = (p * scale1) * scale2  # p * 2^n1 is exact; the second product rounds once (into subnormals if due)
        return _select(x >= x_min, y, zero)

    return impl


def exp_shifted_pair(a, b):
    """(exp(a - q), exp(b - q), q) with q = max(a, b), from ONE exp: the larger argument gives exactly exp(0) = 1.

    The WKV evaluates its exps in such pairs (docs/rwkv4.md §3.2: shift both log-weights by their maximum), so this
    halves its exps. Bit-identical to the two exps it replaces: x - x = 0 exactly and a - b = -(b - a) exactly.
    Only callable from Numba code.
    """
    raise TypeError("exp_shifted_pair is compiled by Numba")


@overload(exp_shifted_pair, inline="always")
def _exp_shifted_pair_overload(a, b):
    if not isinstance(a, types.Float) or a != b or a.bitwidth not in (32, 64):
        return None
    one = _constants("float32" if a.bitwidth == 32 else "float64").one

    def impl(a, b):
        ex = exp_nonpositive(-abs(a - b))  # exp(min - max); -(a - b) = b - a exactly
        a_larger = a >= b
        return _select(a_larger, one, ex), _select(a_larger, ex, one), max(a, b)

    return impl


def sigmoid(r):
    """1 / (1 + e^-r) with e = exp(-|r|) <= 1, so nothing overflows: 1 / (1 + e) for r >= 0, e / (1 + e) below
    (the branch-free form of ``minirwkv.ops.sigmoid``). Only callable from Numba code."""
    raise TypeError("sigmoid is compiled by Numba; from Python use minirwkv.ops.sigmoid")


@overload(sigmoid, inline="always")
def _sigmoid_overload(r):
    if not isinstance(r, types.Float) or r.bitwidth not in (32, 64):
        return None
    constants = _constants("float32" if r.bitwidth == 32 else "float64")
    zero, one = constants.zero, constants.one

    def impl(r):
        e = exp_nonpositive(-abs(r))
        return _select(r >= zero, one, e) / (one + e)

    return impl


@numba.njit(cache=True, fastmath={"contract"})
def exp_nonpositive_array(x):
    """exp_nonpositive of every element of an array (any shape), as a new array of the same dtype.

    Compiled as the kernels are (``fastmath={"contract"}``: a * b + c may become one fused multiply-add, which
    rounds once instead of twice), so the accuracy measured through it is the accuracy the kernels get.
    """
    flat = x.ravel()
    out = np.empty_like(flat)
    for i in range(flat.size):
        out[i] = exp_nonpositive(flat[i])
    return out.reshape(x.shape)
