"""Float64 ports of the special functions featomic's LODE radial integral uses.

featomic (``featomic/src/math``) evaluates its own gamma function (a Lanczos
approximation), confluent and Gauss hypergeometric functions, exponential integral,
complementary error function and symmetric eigen decomposition. Reproducing its results to the last digits needs the
same algorithms with the same order of floating-point operations, which this module
provides for the construction of :class:`rascaline_e3nn._lode_radial.LodeRadialIntegral`
(numpy and pure Python, float64, no autograd).

Transcendental functions go through Python's :mod:`math` (the C library's ``exp``,
``log``, ``pow``, ...), like Rust's ``f64`` methods do, and not through numpy's SIMD
implementations, which can differ in the last bit. ``hypot`` is taken from the C library
through :mod:`ctypes` because Python's :func:`math.hypot` has its own algorithm.
"""

import ctypes
import ctypes.util
import math
from fractions import Fraction
from typing import List, Tuple

import numpy as np

EPSILON = 2.220446049250313e-16
EULER = 0.5772156649015329
SQRT_2 = math.sqrt(2.0)

_LN_PI = 1.1447298858494002
_TWO_SQRT_E_OVER_PI = 1.8603827342052657
_LN_2_SQRT_E_OVER_PI = 0.6207822376352452
_GAMMA_R = 10.900511
_GAMMA_DK = (
    2.4857408913875355e-5,
    1.0514237858172197,
    -3.4568709722201625,
    4.512277094668948,
    -2.9828522532357664,
    1.056397115771267,
    -1.9542877319164587e-1,
    1.709705434044412e-2,
    -5.719261174043057e-4,
    4.633994733599057e-6,
    -2.7199490848860772e-9,
)


def _load_hypot():
    name = ctypes.util.find_library("m")
    try:
        libm = ctypes.CDLL(name if name is not None else "libm.so.6")
        function = libm.hypot
    except (OSError, AttributeError):  # pragma: no cover - platforms without a libm
        return math.hypot
    function.restype = ctypes.c_double
    function.argtypes = [ctypes.c_double, ctypes.c_double]
    return function


hypot = _load_hypot()


def _log(x: float) -> float:
    """Natural logarithm with the C library's conventions (``log(0) = -inf``)."""
    if x == 0.0:
        return -math.inf
    if x < 0.0 or math.isnan(x):
        return math.nan
    return math.log(x)


def powi(x: float, n: int) -> float:
    """``x`` to an integer power as Rust's ``f64::powi`` computes it.

    Rust lowers ``powi`` to compiler-rt's ``__powidf2``: repeated squaring, with a
    reciprocal for negative exponents, which can differ from a correctly rounded
    ``pow`` in the last bit.

    Parameters
    ----------
    x : float
        The base.
    n : int
        The exponent.

    Returns
    -------
    float
    """
    recip = n < 0
    b = abs(n)
    r = 1.0
    a = float(x)
    while True:
        if b & 1:
            r *= a
        b //= 2
        if b == 0:
            break
        a *= a
    return 1.0 / r if recip else r


def powi_array(x: np.ndarray, n: int) -> np.ndarray:
    """Element-wise :func:`powi` of a float64 array (same operations, same order)."""
    recip = n < 0
    b = abs(n)
    r = np.ones_like(x)
    a = np.array(x, dtype=np.float64, copy=True)
    while True:
        if b & 1:
            r = r * a
        b //= 2
        if b == 0:
            break
        a = a * a
    return 1.0 / r if recip else r


def _lanczos_sum_below(x: float) -> float:
    s = _GAMMA_DK[0]
    for i in range(1, len(_GAMMA_DK)):
        s = s + _GAMMA_DK[i] / (i - x)
    return s


def _lanczos_sum_above(x: float) -> float:
    s = _GAMMA_DK[0]
    for i in range(1, len(_GAMMA_DK)):
        s = s + _GAMMA_DK[i] / (x + i - 1.0)
    return s


def gamma(x: float) -> float:
    """featomic's gamma function (statrs' Lanczos approximation, ``math/gamma.rs``).

    Parameters
    ----------
    x : float

    Returns
    -------
    float
    """
    x = float(x)
    if x < 0.5:
        s = _lanczos_sum_below(x)
        denominator = (
            math.sin(math.pi * x)
            * s
            * _TWO_SQRT_E_OVER_PI
            * math.pow((0.5 - x + _GAMMA_R) / math.e, 0.5 - x)
        )
        if denominator == 0.0:
            return math.copysign(math.inf, denominator)
        return math.pi / denominator
    s = _lanczos_sum_above(x)
    return s * _TWO_SQRT_E_OVER_PI * math.pow((x - 0.5 + _GAMMA_R) / math.e, x - 0.5)


def ln_gamma(x: float) -> float:
    """featomic's ``ln_gamma`` (``-inf``/``inf`` where the C library gives them).

    Parameters
    ----------
    x : float

    Returns
    -------
    float
    """
    x = float(x)
    if x < 0.5:
        s = _lanczos_sum_below(x)
        return (
            _LN_PI
            - _log(math.sin(math.pi * x))
            - _log(s)
            - _LN_2_SQRT_E_OVER_PI
            - (0.5 - x) * _log((0.5 - x + _GAMMA_R) / math.e)
        )
    s = _lanczos_sum_above(x)
    return (
        _log(s)
        + _LN_2_SQRT_E_OVER_PI
        + (x - 0.5) * _log((x - 0.5 + _GAMMA_R) / math.e)
    )


def digamma(x: float) -> float:
    """featomic's digamma function (``math/gamma.rs``).

    Parameters
    ----------
    x : float

    Returns
    -------
    float
    """
    c = 12.0
    d1 = -0.5772156649015329
    d2 = 1.6449340668482264
    s = 1e-6
    s3 = 1.0 / 12.0
    s4 = 1.0 / 120.0
    s5 = 1.0 / 252.0
    s6 = 1.0 / 240.0
    s7 = 1.0 / 132.0

    if x == -math.inf or math.isnan(x):
        return math.nan
    if x <= 0.0 and math.floor(x) == x:
        return -math.inf
    if x < 0.0:
        return digamma(1.0 - x) + math.pi / math.tan(-math.pi * x)
    if x <= s:
        return d1 - 1.0 / x + d2 * x

    result = 0.0
    z = x
    while z < c:
        result -= 1.0 / z
        z += 1.0
    if z >= c:
        r = 1.0 / z
        result += math.log(z) - 0.5 * r
        r *= r
        result -= r * (s3 - r * (s4 - r * (s5 - r * (s6 - r * s7))))
    return result


def _map(function, x: np.ndarray) -> np.ndarray:
    """Apply a scalar :mod:`math` function element-wise (C library results)."""
    return np.array([function(float(v)) for v in x.ravel()], dtype=np.float64).reshape(
        x.shape
    )


def _hyp1f1_series(a: float, b: float, x: np.ndarray) -> np.ndarray:
    term = np.ones_like(x)
    result = np.ones_like(x)
    active = np.ones(x.shape, dtype=bool)
    for k in range(1000):
        k = float(k)
        new_term = term * ((a + k) * x / (b + k) / (k + 1.0))
        term = np.where(active, new_term, term)
        result = np.where(active, result + term, result)
        active = active & ~(np.abs(term) <= EPSILON * np.abs(result))
        if not active.any():
            break
    return np.where(active, np.nan, result)


def _chgm_fortran(a: float, b: float, x: np.ndarray, negative: bool) -> np.ndarray:
    """``chgm_fortran`` of ``hyp1f1.rs`` for values of ``x`` sharing one sign."""
    x0 = x
    a0 = a
    if negative:
        a = b - a
        a0 = a
        x = np.abs(x)
    nl = 0
    la = 0
    if a >= 2.0:
        nl = 1
        la = int(a)
        a = a - float(la) - 1.0

    y0 = np.zeros_like(x)
    y1 = np.zeros_like(x)
    result = np.zeros_like(x)
    for n in range(nl + 1):
        if a0 >= 2.0:
            a += 1.0
        result = np.zeros_like(x)
        series = (x <= abs(b) + 30.0) | (a < 0.0)

        # power series, x < 500
        small = series & (x < 500.0)
        if small.any():
            xs = x[small]
            res = np.ones_like(xs)
            term = np.ones_like(xs)
            active = np.ones(xs.shape, dtype=bool)
            for j in range(1, 501):
                j = float(j)
                new_term = term * ((a + j - 1.0) / (j * (b + j - 1.0)) * xs)
                term = np.where(active, new_term, term)
                res = np.where(active, res + term, res)
                with np.errstate(divide="ignore", invalid="ignore"):
                    done = (res != 0.0) & (np.abs(term / res) < 1e-15)
                active = active & ~done
                if not active.any():
                    break
            if negative:
                res = res * _map(math.exp, x0[small])
            result[small] = res

        # asymptotic series, x >= 500
        large = series & ~(x < 500.0)
        if large.any():
            xs = x[large]
            res = np.ones_like(xs)
            term = np.ones_like(xs)
            active = np.ones(xs.shape, dtype=bool)
            for j in range(1, 51):
                j = float(j)
                new_term = term * ((j - a) * (b - a + j - 1.0) / (j * xs))
                term = np.where(active, new_term, term)
                res = np.where(active, res + term, res)
                with np.errstate(divide="ignore", invalid="ignore"):
                    done = (res != 0.0) & (np.abs(term / res) < 1e-15)
                active = active & ~done
                if not active.any():
                    break
            gamma_b = gamma(b)
            gamma_a = gamma(a)
            pw = _map(lambda v: math.pow(v, a - b), xs)
            res = res * (pw * gamma_b / gamma_a)
            if not negative:
                res = res * _map(math.exp, xs)
            result[large] = res

        # DLMF 13.7.2 & 13.2.4
        other = ~series
        if other.any():
            xs = x[other]
            ln_gamma_a = ln_gamma(a)
            ln_gamma_b = ln_gamma(b)
            ln_gamma_ba = ln_gamma(b - a)
            sum_1 = np.ones_like(xs)
            sum_2 = np.ones_like(xs)
            term_1 = np.ones_like(xs)
            term_2 = np.ones_like(xs)
            for i in range(1, 31):
                i = float(i)
                term_1 = -term_1 * (a + i - 1.0) * (a - b + i) / (xs * i)
                term_2 = -term_2 * (b - a + i - 1.0) * (a - i) / (xs * i)
                sum_1 = sum_1 + term_1
                sum_2 = sum_2 + term_2
            cos_pi_a = math.cos(math.pi * a)
            pw_a = _map(lambda v: math.pow(v, -a), xs)
            pw_ab = _map(lambda v: math.pow(v, a - b), xs)
            if not negative:
                e1 = _map(lambda v: math.exp(ln_gamma_b - ln_gamma_ba), xs)
                e2 = _map(lambda v: math.exp(ln_gamma_b - ln_gamma_a + v), xs)
            else:
                e1 = _map(lambda v: math.exp(ln_gamma_b - ln_gamma_ba + v), x0[other])
                e2 = np.full_like(xs, _exp_or_zero(ln_gamma_b - ln_gamma_a))
            hg1 = e1 * pw_a * cos_pi_a * sum_1
            hg2 = e2 * pw_ab * sum_2
            result[other] = hg1 + hg2

        if n == 0:
            y0 = result
        if n == 1:
            y1 = result

    if a0 >= 2.0:
        for _ in range(1, la):
            result = ((a * 2.0 - b + x) * y1 + (b - a) * y0) / a
            y0 = y1
            y1 = result
            a += 1.0
    return result


def _exp_or_zero(v: float) -> float:
    if v == -math.inf:
        return 0.0
    return math.exp(v)


def hyp1f1(a: float, b: float, x) -> np.ndarray:
    """featomic's confluent hypergeometric function 1F1(a, b, x) (``hyp1f1.rs``).

    The branches depending on ``a`` and ``b`` are taken once; the ones depending on
    ``x`` element-wise, each element going through the same operations as featomic's
    scalar code (including the per-element convergence tests).

    Parameters
    ----------
    a, b : float
        Parameters, ``b > 0``.
    x : array_like
        Arguments (float64).

    Returns
    -------
    numpy.ndarray
        Same shape as ``x``.
    """
    a = float(a)
    b = float(b)
    x = np.asarray(x, dtype=np.float64)
    if not b > 0.0:
        raise ValueError("b must be positive in hyp1f1")
    shape = x.shape
    x = x.reshape(-1)
    if a == 0.0:
        return np.ones(shape)
    if a == -1.0:
        out = 1.0 - x / b
    elif a == b:
        out = _map(math.exp, x)
    elif a - b == 1.0:
        out = (1.0 + x / b) * _map(math.exp, x)
    elif a <= 0.0 and math.floor(a) == a:
        raise ValueError("hyp1f1 with a non-positive integer `a` is not supported")
    else:
        out = np.empty_like(x)
        series = (abs(a) + 1.0) * np.abs(x) < 0.9 * b
        if series.any():
            out[series] = _hyp1f1_series(a, b, x[series])
        negative = ~series & (x < 0.0)
        if negative.any():
            out[negative] = _chgm_fortran(a, b, x[negative], True)
        positive = ~series & (x > 0.0)
        if positive.any():
            out[positive] = _chgm_fortran(a, b, x[positive], False)
    out = np.where(x == 0.0, 1.0, out)
    return out.reshape(shape)


def _is_integer(x: float) -> bool:
    return float(int(x)) == x


def hyp2f1(a: float, b: float, c: float, x: float) -> float:
    """featomic's Gauss hypergeometric function 2F1(a, b; c; x) (``hyp2f1.rs``), x < 1.

    Parameters
    ----------
    a, b, c, x : float

    Returns
    -------
    float
    """
    if not x < 1.0:
        raise ValueError("x must be smaller than 1.0 in hyp2f1")
    c_is_neg_int = _is_integer(c) and c < 0.0
    a_is_neg_int = _is_integer(a) and a < 0.0
    b_is_neg_int = _is_integer(b) and b < 0.0
    ca_is_neg_int = _is_integer(c - a) and c - a <= 0.0
    cb_is_neg_int = _is_integer(c - b) and c - b <= 0.0

    if 1.0 - x < 1e-15 and c - a - b <= 0.0 and not (a_is_neg_int or b_is_neg_int):
        raise ValueError("invalid arguments to hyp2f1 (x==1 & c - a - b < 0)")
    elif c_is_neg_int:
        if a_is_neg_int and round(a) > round(c):
            pass
        elif b_is_neg_int and round(b) > round(c):
            pass
        else:
            raise ValueError("invalid arguments to hyp2f1 (c < 0)")

    eps = 1e-8 if x > 0.95 else 1e-15

    if x == 0.0 or a == 0.0 or b == 0.0:
        return 1.0
    elif 1.0 - x == eps and c - a - b > 0.0:
        return gamma(c) * gamma(c - a - b) / (gamma(c - a) * gamma(c - b))
    elif x + 1.0 <= eps and abs(c - a + b - 1.0) <= eps:
        gamma_0 = math.sqrt(math.pi) * math.pow(2.0, -a)
        gamma_1 = gamma(c)
        gamma_2 = gamma(a / 2.0 + 1.0 - b)
        gamma_3 = gamma(a * 0.5 + 0.5)
        return gamma_0 * gamma_1 / (gamma_2 * gamma_3)
    elif a_is_neg_int or b_is_neg_int:
        nm = int(abs(b)) if b_is_neg_int else int(abs(a))
        hf = 1.0
        term = 1.0
        for k in range(1, nm + 1):
            k = float(k)
            term *= (a + k - 1.0) * (b + k - 1.0) / (k * (c + k - 1.0)) * x
            hf += term
        return hf
    elif ca_is_neg_int or cb_is_neg_int:
        nm = int(abs(c - b)) if cb_is_neg_int else int(abs(c - a))
        hf = 1.0
        term = 1.0
        for k in range(1, nm + 1):
            k = float(k)
            term *= (c - a + k - 1.0) * (c - b + k - 1.0) / (k * (c + k - 1.0)) * x
            hf += term
        return math.pow(1.0 - x, c - a - b) * hf

    aa = a
    bb = b
    x1 = x
    if x < 0.0:
        x /= x - 1.0
        if c > a and b < a and b > 0.0:
            a_in, b_in = bb, aa
        else:
            a_in, b_in = aa, bb
        b_in = c - b_in
        a, b = a_in, b_in

    if x >= 0.75:
        cab = c - a - b
        if abs(cab - float(int(cab))) < 1e-15:
            m = int(cab)
            gamma_a = gamma(a)
            gamma_b = gamma(b)
            gamma_c = gamma(c)
            gamma_am = gamma(a + m)
            gamma_bm = gamma(b + m)
            digamma_a = digamma(a)
            digamma_b = digamma(b)
            gm = 0.0 if m == 0 else 1.0
            for j in range(1, abs(m)):
                gm *= float(j)
            rm = 1.0
            for j in range(1, abs(m) + 1):
                rm *= float(j)
            f0 = 1.0
            r0 = 1.0
            r1 = 1.0
            sp0 = 0.0
            sp = 0.0
            fm = float(m)
            if m >= 0:
                c0 = gm * gamma_c / (gamma_am * gamma_bm)
                c1 = -gamma_c * powi(x - 1.0, m) / (gamma_a * gamma_b * rm)
                for k in range(1, m):
                    k = float(k)
                    r0 *= (a + k - 1.0) * (b + k - 1.0) / (k * (k - fm)) * (1.0 - x)
                    f0 += r0
                for k in range(1, m + 1):
                    k = float(k)
                    sp0 += 1.0 / (a + k - 1.0) + 1.0 / (b + k - 1.0) - 1.0 / k
                f1 = digamma_a + digamma_b + sp0 + EULER * 2.0 + math.log(1.0 - x)
                previous = 0.0
                for k in range(1, 251):
                    k = float(k)
                    sp += (1.0 - a) / (k * (a + k - 1.0)) + (1.0 - b) / (k * (b + k - 1.0))
                    sm = 0.0
                    for j in range(1, m + 1):
                        j = float(j)
                        sm += (1.0 - a) / ((j + k) * (a + j + k - 1.0)) + 1.0 / (b + j + k - 1.0)
                    rp = digamma_a + digamma_b + EULER * 2.0 + sp + sm + math.log(1.0 - x)
                    r1 *= (a + fm + k - 1.0) * (b + fm + k - 1.0) / (k * (fm + k)) * (1.0 - x)
                    f1 += r1 * rp
                    if abs(f1 - previous) < abs(f1) * eps:
                        break
                    previous = f1
                result = f0 * c0 + f1 * c1
            else:
                m = -m
                fm = float(m)
                c0 = gm * gamma_c / (gamma_a * gamma_b * powi(1.0 - x, m))
                c1 = -(powi(-1.0, m)) * gamma_c / (gamma_am * gamma_bm * rm)
                for k in range(1, m):
                    k = float(k)
                    r0 *= (a - fm + k - 1.0) * (b - fm + k - 1.0) / (k * (k - fm)) * (1.0 - x)
                    f0 += r0
                for k in range(1, m + 1):
                    sp0 += 1.0 / float(k)
                f1 = digamma_a + digamma_b - sp0 + EULER * 2.0 + math.log(1.0 - x)
                previous = 0.0
                for k in range(1, 251):
                    k = float(k)
                    sp += (1.0 - a) / (k * (a + k - 1.0)) + (1.0 - b) / (k * (b + k - 1.0))
                    sm = 0.0
                    for j in range(1, m + 1):
                        sm += 1.0 / (float(j) + k)
                    rp = digamma_a + digamma_b + EULER * 2.0 + sp - sm + math.log(1.0 - x)
                    r1 *= (a + k - 1.0) * (b + k - 1.0) / (k * (fm + k)) * (1.0 - x)
                    f1 += r1 * rp
                    if abs(f1 - previous) < abs(f1) * eps:
                        break
                    previous = f1
                result = f0 * c0 + f1 * c1
        else:
            gamma_a = gamma(a)
            gamma_b = gamma(b)
            gamma_c = gamma(c)
            gamma_ca = gamma(c - a)
            gamma_cb = gamma(c - b)
            gamma_cab = gamma(c - a - b)
            gamma_abc = gamma(a + b - c)
            c0 = gamma_c * gamma_cab / (gamma_ca * gamma_cb)
            c1 = gamma_c * gamma_abc / (gamma_a * gamma_b) * math.pow(1.0 - x, c - a - b)
            result = 0.0
            r0 = c0
            r1 = c1
            previous = 0.0
            for k in range(1, 251):
                k = float(k)
                r0 *= (a + k - 1.0) * (b + k - 1.0) / (k * (a + b - c + k)) * (1.0 - x)
                r1 *= (c - a + k - 1.0) * (c - b + k - 1.0) / (k * (c - a - b + k)) * (1.0 - x)
                result += r0 + r1
                if abs(result - previous) < abs(result) * eps:
                    break
                previous = result
            result += c0 + c1
    else:
        if c > a and c < a * 2.0 and c > b and c < b * 2.0:
            a0 = math.pow(1.0 - x, c - a - b)
            a, b = c - a, c - b
        else:
            a0 = 1.0
        result = 1.0
        previous = 0.0
        term = 1.0
        for k in range(1, 251):
            k = float(k)
            term *= (a + k - 1.0) * (b + k - 1.0) / (k * (c + k - 1.0)) * x
            result += term
            if abs(result - previous) <= abs(result) * eps:
                break
            previous = result
        result *= a0

    if x1 < 0.0:
        result *= 1.0 / math.pow(1.0 - x1, aa)
    return result


def exp1(x: float) -> float:
    """featomic's exponential integral E1(x) (``exp.rs``), x >= 0.

    Parameters
    ----------
    x : float

    Returns
    -------
    float
    """
    if x == 0.0:
        return math.inf
    elif x <= 1.0:
        e1 = 1.0
        r = 1.0
        for k in range(1, 26):
            d1 = float(k) + 1.0
            r = -r * float(k) * x / (d1 * d1)
            e1 += r
            if abs(r) <= abs(e1) * 1e-15:
                break
        return -0.5772156649015328 - math.log(x) + x * e1
    else:
        m = int(80.0 / x) + 20
        t0 = 0.0
        for k in range(m, 0, -1):
            t0 = float(k) / (float(k) / (x + t0) + 1.0)
        t = 1.0 / (x + t0)
        return math.exp(-x) * t


def unrolled_dot(xs, ys) -> float:
    """ndarray's ``unrolled_dot``: the order of the sums of ``a.dot(b)`` on slices.

    Eight partial sums over blocks of eight, combined as
    ``(p0 + p4) + (p1 + p5) + (p2 + p6) + (p3 + p7)``, then the remainder in order.

    Parameters
    ----------
    xs, ys : sequence of float
        Same length.

    Returns
    -------
    float
    """
    n = len(xs)
    p = [0.0] * 8
    start = 0
    while n - start >= 8:
        for i in range(8):
            p[i] = p[i] + float(xs[start + i]) * float(ys[start + i])
        start += 8
    total = 0.0
    total = total + (p[0] + p[4])
    total = total + (p[1] + p[5])
    total = total + (p[2] + p[6])
    total = total + (p[3] + p[7])
    for i in range(start, n):
        total = total + float(xs[i]) * float(ys[i])
    return total


def rows_dot(matrix: np.ndarray, vectors: np.ndarray) -> np.ndarray:
    """``vectors[k] . matrix.T`` for every row ``k``, in :func:`unrolled_dot` order.

    This is what featomic's ``values.dot(&orthonormalization.t())`` computes: each
    output entry ``j`` is ``unrolled_dot(matrix[j], values)``.

    Parameters
    ----------
    matrix : numpy.ndarray
        ``[N, N]``.
    vectors : numpy.ndarray
        ``[K, N]``.

    Returns
    -------
    numpy.ndarray
        ``[K, N]``.
    """
    vectors = np.asarray(vectors, dtype=np.float64)
    n = vectors.shape[1]
    out = np.empty((vectors.shape[0], matrix.shape[0]))
    for j in range(matrix.shape[0]):
        row = matrix[j]
        p = [np.zeros(vectors.shape[0]) for _ in range(8)]
        start = 0
        while n - start >= 8:
            for i in range(8):
                p[i] = p[i] + vectors[:, start + i] * row[start + i]
            start += 8
        total = np.zeros(vectors.shape[0])
        total = total + (p[0] + p[4])
        total = total + (p[1] + p[5])
        total = total + (p[2] + p[6])
        total = total + (p[3] + p[7])
        for i in range(start, n):
            total = total + vectors[:, i] * row[i]
        out[:, j] = total
    return out


def _fma(a: float, b: float, c: float) -> float:
    """Fused multiply-add, correctly rounded (exact rational arithmetic)."""
    return float(Fraction(a) * Fraction(b) + Fraction(c))


def gemm(a: np.ndarray, b: np.ndarray, fused: bool = True) -> np.ndarray:
    """``a @ b`` as matrixmultiply's dgemm accumulates it for small matrices.

    Each entry is a chain over the inner index in order, starting from zero, with a
    fused multiply-add per step (the kernel used on x86-64 CPUs with FMA) or a
    multiplication then an addition.

    Parameters
    ----------
    a, b : numpy.ndarray
        ``[M, K]`` and ``[K, N]``.
    fused : bool
        Whether each step is a fused multiply-add.

    Returns
    -------
    numpy.ndarray
        ``[M, N]``.
    """
    m, k = a.shape
    n = b.shape[1]
    out = np.empty((m, n))
    for i in range(m):
        for j in range(n):
            acc = 0.0
            for p in range(k):
                if fused:
                    acc = _fma(float(a[i, p]), float(b[p, j]), acc)
                else:
                    acc = acc + float(a[i, p]) * float(b[p, j])
            out[i, j] = acc
    return out


def symmetric_eigen(matrix: np.ndarray) -> Tuple[List[float], List[List[float]]]:
    """featomic's symmetric eigen decomposition (``eigen.rs``, from nalgebra/JAMA).

    Householder tridiagonalisation then the QL algorithm with implicit shifts, eigen
    values sorted in increasing order.

    Parameters
    ----------
    matrix : numpy.ndarray
        A symmetric ``[n, n]`` matrix.

    Returns
    -------
    eigenvalues : list of float
        ``n`` values.
    eigenvectors : list of list of float
        ``evec[row][column]``, the eigenvectors are the columns.
    """
    n = matrix.shape[0]
    evec = [[float(matrix[i, j]) for j in range(n)] for i in range(n)]
    ev = [0.0] * n
    work = [0.0] * n

    # tridiagonalize
    for j in range(n):
        ev[j] = evec[n - 1][j]
    for i in range(n - 1, 0, -1):
        scale = 0.0
        h = 0.0
        for k in range(i):
            scale += abs(ev[k])
        if scale == 0.0:
            work[i] = ev[i - 1]
            for j in range(i):
                ev[j] = evec[i - 1][j]
                evec[i][j] = 0.0
                evec[j][i] = 0.0
        else:
            for k in range(i):
                ev[k] /= scale
                h += ev[k] * ev[k]
            f = ev[i - 1]
            g = math.sqrt(h)
            if f > 0.0:
                g = -g
            work[i] = scale * g
            h -= f * g
            ev[i - 1] = f - g
            for j in range(i):
                work[j] = 0.0
            for j in range(i):
                f = ev[j]
                evec[j][i] = f
                g = work[j] + evec[j][j] * f
                for k in range(j + 1, i):
                    g += evec[k][j] * ev[k]
                    work[k] += evec[k][j] * f
                work[j] = g
            f = 0.0
            for j in range(i):
                work[j] /= h
                f += work[j] * ev[j]
            hh = f / (h + h)
            for j in range(i):
                work[j] -= hh * ev[j]
            for j in range(i):
                f = ev[j]
                g = work[j]
                for k in range(j, i):
                    evec[k][j] = evec[k][j] - (f * work[k] + g * ev[k])
                ev[j] = evec[i - 1][j]
                evec[i][j] = 0.0
        ev[i] = h

    for i in range(n - 1):
        evec[n - 1][i] = evec[i][i]
        evec[i][i] = 1.0
        h = ev[i + 1]
        if h != 0.0:
            for k in range(i + 1):
                ev[k] = evec[k][i + 1] / h
            for j in range(i + 1):
                g = 0.0
                for k in range(i + 1):
                    g += evec[k][i + 1] * evec[k][j]
                for k in range(i + 1):
                    evec[k][j] = evec[k][j] - g * ev[k]
        for k in range(i + 1):
            evec[k][i + 1] = 0.0
    for j in range(n):
        ev[j] = evec[n - 1][j]
        evec[n - 1][j] = 0.0
    evec[n - 1][n - 1] = 1.0
    work[0] = 0.0

    # tridiagonal QL
    for i in range(1, n):
        work[i - 1] = work[i]
    work[n - 1] = 0.0
    f = 0.0
    tst1 = 0.0
    for l in range(n):
        tst1 = max(tst1, abs(ev[l]) + abs(work[l]))
        m = l
        while m < n:
            if abs(work[m]) <= EPSILON * tst1:
                break
            m += 1
        if m > l:
            while True:
                g = ev[l]
                p = (ev[l + 1] - g) / (2.0 * work[l])
                r = hypot(p, 1.0)
                if p < 0.0:
                    r = -r
                ev[l] = work[l] / (p + r)
                ev[l + 1] = work[l] * (p + r)
                ev_lp1 = ev[l + 1]
                h = g - ev[l]
                for i in range(l + 2, n):
                    ev[i] -= h
                f += h

                p = ev[m]
                c = 1.0
                c2 = c
                c3 = c
                work_lp1 = work[l + 1]
                s = 0.0
                s2 = 0.0
                for i in range(m - 1, l - 1, -1):
                    c3 = c2
                    c2 = c
                    s2 = s
                    g = c * work[i]
                    h = c * p
                    r = hypot(p, work[i])
                    work[i + 1] = s * r
                    s = work[i] / r
                    c = p / r
                    p = c * ev[i] - s * g
                    ev[i + 1] = h + s * (c * g + s * ev[i])
                    for k in range(n):
                        h = evec[k][i + 1]
                        evec[k][i + 1] = s * evec[k][i] + c * h
                        evec[k][i] = c * evec[k][i] - s * h
                p = -s * s2 * c3 * work_lp1 * work[l] / ev_lp1
                work[l] = s * p
                ev[l] = c * p
                if abs(work[l]) <= EPSILON * tst1:
                    break
        ev[l] += f
        work[l] = 0.0

    for i in range(n - 1):
        k = i
        p = ev[i]
        for j in range(i + 1, n):
            if ev[j] < p:
                k = j
                p = ev[j]
        if k != i:
            ev[k] = ev[i]
            ev[i] = p
            for j in range(n):
                p = evec[j][i]
                evec[j][i] = evec[j][k]
                evec[j][k] = p
    return ev, evec


# Rational approximations of featomic's erf/erfc (``math/erf.rs``, from statrs and
# Boost): numerator and denominator coefficients, lowest degree first, per interval.
ERF_TABLES = {
    "AN": (
        0.00337916709551257388990745,
        -0.00073695653048167948530905,
        -0.374732337392919607868241,
        0.0817442448733587196071743,
        -0.0421089319936548595203468,
        0.0070165709512095756344528,
        -0.00495091255982435110337458,
        0.000871646599037922480317225,
    ),
    "AD": (
        1.0,
        -0.218088218087924645390535,
        0.412542972725442099083918,
        -0.0841891147873106755410271,
        0.0655338856400241519690695,
        -0.0120019604454941768171266,
        0.00408165558926174048329689,
        -0.000615900721557769691924509,
    ),
    "BN": (
        -0.0361790390718262471360258,
        0.292251883444882683221149,
        0.281447041797604512774415,
        0.125610208862766947294894,
        0.0274135028268930549240776,
        0.00250839672168065762786937,
    ),
    "BD": (
        1.0,
        1.8545005897903486499845,
        1.43575803037831418074962,
        0.582827658753036572454135,
        0.124810476932949746447682,
        0.0113724176546353285778481,
    ),
    "CN": (
        -0.0397876892611136856954425,
        0.153165212467878293257683,
        0.191260295600936245503129,
        0.10276327061989304213645,
        0.029637090615738836726027,
        0.0046093486780275489468812,
        0.000307607820348680180548455,
    ),
    "CD": (
        1.0,
        1.95520072987627704987886,
        1.64762317199384860109595,
        0.768238607022126250082483,
        0.209793185936509782784315,
        0.0319569316899913392596356,
        0.00213363160895785378615014,
    ),
    "DN": (
        -0.0300838560557949717328341,
        0.0538578829844454508530552,
        0.0726211541651914182692959,
        0.0367628469888049348429018,
        0.00964629015572527529605267,
        0.00133453480075291076745275,
        0.778087599782504251917881e-4,
    ),
    "DD": (
        1.0,
        1.75967098147167528287343,
        1.32883571437961120556307,
        0.552528596508757581287907,
        0.133793056941332861912279,
        0.0179509645176280768640766,
        0.00104712440019937356634038,
        -0.106640381820357337177643e-7,
    ),
    "EN": (
        -0.0117907570137227847827732,
        0.014262132090538809896674,
        0.0202234435902960820020765,
        0.00930668299990432009042239,
        0.00213357802422065994322516,
        0.00025022987386460102395382,
        0.120534912219588189822126e-4,
    ),
    "ED": (
        1.0,
        1.50376225203620482047419,
        0.965397786204462896346934,
        0.339265230476796681555511,
        0.0689740649541569716897427,
        0.00771060262491768307365526,
        0.000371421101531069302990367,
    ),
    "FN": (
        -0.00546954795538729307482955,
        0.00404190278731707110245394,
        0.0054963369553161170521356,
        0.00212616472603945399437862,
        0.000394984014495083900689956,
        0.365565477064442377259271e-4,
        0.135485897109932323253786e-5,
    ),
    "FD": (
        1.0,
        1.21019697773630784832251,
        0.620914668221143886601045,
        0.173038430661142762569515,
        0.0276550813773432047594539,
        0.00240625974424309709745382,
        0.891811817251336577241006e-4,
        -0.465528836283382684461025e-11,
    ),
    "GN": (
        -0.00270722535905778347999196,
        0.0013187563425029400461378,
        0.00119925933261002333923989,
        0.00027849619811344664248235,
        0.267822988218331849989363e-4,
        0.923043672315028197865066e-6,
    ),
    "GD": (
        1.0,
        0.814632808543141591118279,
        0.268901665856299542168425,
        0.0449877216103041118694989,
        0.00381759663320248459168994,
        0.000131571897888596914350697,
        0.404815359675764138445257e-11,
    ),
    "HN": (
        -0.00109946720691742196814323,
        0.000406425442750422675169153,
        0.000274499489416900707787024,
        0.465293770646659383436343e-4,
        0.320955425395767463401993e-5,
        0.778286018145020892261936e-7,
    ),
    "HD": (
        1.0,
        0.588173710611846046373373,
        0.139363331289409746077541,
        0.0166329340417083678763028,
        0.00100023921310234908642639,
        0.24254837521587225125068e-4,
    ),
    "IN": (
        -0.00056907993601094962855594,
        0.000169498540373762264416984,
        0.518472354581100890120501e-4,
        0.382819312231928859704678e-5,
        0.824989931281894431781794e-7,
    ),
    "ID": (
        1.0,
        0.339637250051139347430323,
        0.043472647870310663055044,
        0.00248549335224637114641629,
        0.535633305337152900549536e-4,
        -0.117490944405459578783846e-12,
    ),
    "JN": (
        -0.000241313599483991337479091,
        0.574224975202501512365975e-4,
        0.115998962927383778460557e-4,
        0.581762134402593739370875e-6,
        0.853971555085673614607418e-8,
    ),
    "JD": (
        1.0,
        0.233044138299687841018015,
        0.0204186940546440312625597,
        0.000797185647564398289151125,
        0.117019281670172327758019e-4,
    ),
    "KN": (
        -0.000146674699277760365803642,
        0.162666552112280519955647e-4,
        0.269116248509165239294897e-5,
        0.979584479468091935086972e-7,
        0.101994647625723465722285e-8,
    ),
    "KD": (
        1.0,
        0.165907812944847226546036,
        0.0103361716191505884359634,
        0.000286593026373868366935721,
        0.298401570840900340874568e-5,
    ),
    "LN": (
        -0.583905797629771786720406e-4,
        0.412510325105496173512992e-5,
        0.431790922420250949096906e-6,
        0.993365155590013193345569e-8,
        0.653480510020104699270084e-10,
    ),
    "LD": (
        1.0,
        0.105077086072039915406159,
        0.00414278428675475620830226,
        0.726338754644523769144108e-4,
        0.477818471047398785369849e-6,
    ),
    "MN": (
        -0.196457797609229579459841e-4,
        0.157243887666800692441195e-5,
        0.543902511192700878690335e-7,
        0.317472492369117710852685e-9,
    ),
    "MD": (
        1.0,
        0.052803989240957632204885,
        0.000926876069151753290378112,
        0.541011723226630257077328e-5,
        0.535093845803642394908747e-15,
    ),
    "NN": (
        -0.789224703978722689089794e-5,
        0.622088451660986955124162e-6,
        0.145728445676882396797184e-7,
        0.603715505542715364529243e-10,
    ),
    "ND": (
        1.0,
        0.0375328846356293715248719,
        0.000467919535974625308126054,
        0.193847039275845656900547e-5,
    ),
}

#: (upper bound of the interval, offset subtracted from z, table letter, constant b)
#: for erf_impl's branches with 0.5 <= z < 110
ERF_INTERVALS = (
    (0.75, 0.5, "B", 0.3440242112),
    (1.25, 0.75, "C", 0.419990927),
    (2.25, 1.25, "D", 0.4898625016),
    (3.5, 2.25, "E", 0.5317370892),
    (5.25, 3.5, "F", 0.5489973426),
    (8.0, 5.25, "G", 0.5571740866),
    (11.5, 8.0, "H", 0.5609807968),
    (17.0, 11.5, "I", 0.5626493692),
    (24.0, 17.0, "J", 0.5634598136),
    (38.0, 24.0, "K", 0.5638477802),
    (60.0, 38.0, "L", 0.5640528202),
    (85.0, 60.0, "M", 0.5641309023),
    (110.0, 85.0, "N", 0.5641584396),
)


def evaluate_polynomial(z: float, coefficients) -> float:
    """Horner's scheme as featomic's ``evaluate_polynomial`` (highest degree first)."""
    total = float(coefficients[-1])
    for c in reversed(coefficients[:-1]):
        total = float(c) + z * total
    return total


def _erf_impl(z: float, inv: bool) -> float:
    if z < 0.0:
        if not inv:
            return -_erf_impl(-z, False)
        if z < -0.5:
            return 2.0 - _erf_impl(-z, True)
        return 1.0 + _erf_impl(-z, False)

    if z < 0.5:
        if z < 1e-10:
            result = z * 1.125 + z * 0.003379167095512573896158903121545171688
        else:
            result = z * 1.125 + z * evaluate_polynomial(
                z, ERF_TABLES["AN"]
            ) / evaluate_polynomial(z, ERF_TABLES["AD"])
    elif z < 110.0:
        for upper, offset, letter, b in ERF_INTERVALS:
            if z < upper:
                r = evaluate_polynomial(z - offset, ERF_TABLES[letter + "N"]) / (
                    evaluate_polynomial(z - offset, ERF_TABLES[letter + "D"])
                )
                break
        g = math.exp(-z * z) / z
        result = g * b + g * r
    else:
        result = 0.0

    if inv and z >= 0.5:
        return result
    elif z >= 0.5 or inv:
        return 1.0 - result
    return result


def erfc(x: float) -> float:
    """featomic's complementary error function (``math/erf.rs``).

    Parameters
    ----------
    x : float

    Returns
    -------
    float
    """
    if math.isnan(x):
        return math.nan
    if x == math.inf:
        return 0.0
    if x == -math.inf:
        return 2.0
    return _erf_impl(float(x), True)
