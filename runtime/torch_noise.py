"""PyTorch's CPU `torch.randn`, reimplemented in NumPy, bit for bit.

diffusers draws its noise with `torch.randn(shape, generator=torch.Generator("cpu").manual_seed(seed))`.
`TorchCpuGenerator(seed).randn(shape)` returns the same float32 values without torch, so a seed copied from a
diffusers picture gives the same starting noise here (and the same per-step noise, drawn from the same stream).

How torch draws them (ATen `normal_kernel`, CPU, float32), which this module follows step by step:

- The stream is MT19937 seeded with the low 32 bits of the seed (Matsumoto & Nishimura 1998, `init_genrand`).
- A float uniform is `(u32 & (2**24 - 1)) * 2**-24`; a double uniform takes the low 53 bits of
  `(u32_first << 32) | u32_second`.
- Tensors of >= 16 values: all uniforms are drawn first, then each block of 16 becomes 16 normals by the
  Box-Muller transform in float32, value j paired with j + 8: `r = sqrt(-2 log(1 - u[j]))`,
  `theta = 2 pi u[j + 8]`, `out[j] = r cos(theta)`, `out[j + 8] = r sin(theta)`. If the size is not a multiple
  of 16, 16 fresh uniforms redo the last 16 values.
  The float32 log / sin / cos depend on the CPU kernel torch picks: on x86 with AVX2 and FMA they are
  the Cephes polynomials of `avx_mathfun.h` (`MATH_AVX2`, emulated below operation by operation,
  with the FMAs torch's compiler made of them); torch's AVX-512 kernels run the same AVX2 fill (measured on an
  AVX-512 Xeon, torch 2.13). Elsewhere (x86 without AVX2, ARM, or ATEN_CPU_CAPABILITY=default) they are the
  C library's `logf` / `cosf` / `sinf` (`MATH_LIBM`, called through ctypes).
- Tensors of < 16 values: one double Box-Muller pair per two values (`r = sqrt(-2 log1p(-u2))`,
  `theta = 2 pi u1`, cosine first), the sine kept for the next value, even across calls.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import math
import os
from typing import Literal

import numpy as np

from .errors import EdgesdError

TorchMath = Literal["auto", "avx2", "libm"]
MATH_AVX2: TorchMath = "avx2"
MATH_LIBM: TorchMath = "libm"

_F = np.float32
_MASK24 = np.uint32((1 << 24) - 1)
_MASK53 = (1 << 53) - 1


class TorchCpuGenerator:
    """A NumPy stand-in for `torch.Generator("cpu").manual_seed(seed)`, for `randn` only.

    It keeps its state between calls, as torch's does: `randn` twice gives torch's first and second tensors.
    `math` picks the float32 log/sin/cos torch uses for tensors of >= 16 values ("auto": as torch would pick on
    this machine, honouring `ATEN_CPU_CAPABILITY` as torch does).
    """

    def __init__(self, seed: int, math: TorchMath = "auto"):
        if not isinstance(seed, (int, np.integer)) or seed < 0:
            raise EdgesdError(f"a torch-compatible seed must be a non-negative integer, got {seed!r}")
        # numpy's legacy RandomState seeds MT19937 with init_genrand for 32-bit seeds, as torch does.
        self._mt = np.random.RandomState(int(seed) & 0xFFFFFFFF)
        self._math = _resolve_math(math)
        self._cached_normal: float | None = None  # the second value of the last double Box-Muller pair

    @property
    def math(self) -> TorchMath:
        return self._math

    def randn(self, shape: tuple[int, ...]) -> np.ndarray:
        """float32 standard normals of `shape`, equal to `torch.randn(shape, generator=g)`."""
        size = math.prod(shape)
        if size >= 16:
            return self._normal_fill(size).reshape(shape)
        return np.array([self._normal_double() for _ in range(size)], dtype=_F).reshape(shape)

    def _uint32(self, n: int) -> np.ndarray:
        return self._mt.randint(0, 2**32, size=n, dtype=np.uint32)

    def _uniform_float(self, n: int) -> np.ndarray:
        return (self._uint32(n) & _MASK24).astype(_F) * _F(2.0**-24)

    def _normal_fill(self, size: int) -> np.ndarray:
        data = self._uniform_float(size)
        blocks = size // 16
        data[: blocks * 16] = self._box_muller_16(data[: blocks * 16].reshape(blocks, 16)).ravel()
        if size % 16:
            data[size - 16:] = self._box_muller_16(self._uniform_float(16).reshape(1, 16)).ravel()
        return data

    def _box_muller_16(self, u: np.ndarray) -> np.ndarray:
        """(n, 16) uniforms in [0, 1) -> (n, 16) normals; column j pairs with j + 8."""
        u1 = _F(1.0) - u[:, :8]  # [0, 1) -> (0, 1] for the log
        if self._math == MATH_AVX2:
            radius = np.sqrt(_F(-2.0) * _log_avx2(u1))
            sin, cos = _sincos_avx2(_F(2.0 * math.pi) * u[:, 8:])
        else:
            radius = np.sqrt(_F(-2.0) * _libm("logf", u1))
            # theta = 2.0f * pi<double> * u2 is computed in double, then stored as float.
            theta = (np.float64(2.0 * math.pi) * u[:, 8:].astype(np.float64)).astype(_F)
            sin, cos = _libm("sinf", theta), _libm("cosf", theta)
        return np.concatenate([radius * cos, radius * sin], axis=1)

    def _normal_double(self) -> float:
        if self._cached_normal is not None:
            value, self._cached_normal = self._cached_normal, None
            return value
        first, second, third, fourth = (int(v) for v in self._uint32(4))
        u1 = (((first << 32) | second) & _MASK53) * 2.0**-53
        u2 = (((third << 32) | fourth) & _MASK53) * 2.0**-53
        r = math.sqrt(-2.0 * math.log1p(-u2))
        theta = 2.0 * math.pi * u1
        self._cached_normal = r * math.sin(theta)
        return r * math.cos(theta)


def _resolve_math(choice: TorchMath) -> TorchMath:
    if choice in (MATH_AVX2, MATH_LIBM):
        return choice
    if choice != "auto":
        raise EdgesdError(f"unknown torch math {choice!r}", "use auto, avx2 or libm")
    forced = os.environ.get("ATEN_CPU_CAPABILITY", "").lower()
    if forced in ("avx2", "avx512"):  # torch's AVX-512 kernels fill normals with the AVX2 code
        return MATH_AVX2
    if forced in ("default", "zvector", "vsx"):
        return MATH_LIBM
    return MATH_AVX2 if _torch_picks_avx2() else MATH_LIBM


def _torch_picks_avx2() -> bool:
    """torch runs its AVX2 normal fill on x86 CPUs with AVX2 and FMA (its AVX-512 kernels included)."""
    try:
        from numpy._core._multiarray_umath import __cpu_features__ as features
    except ImportError:  # numpy < 2
        from numpy.core._multiarray_umath import __cpu_features__ as features
    has = lambda *names: all(features.get(n, False) for n in names)  # noqa: E731
    return has("AVX2", "FMA3")


# --- the Cephes single-precision polynomials, as torch's build of avx_mathfun.h evaluates them ---
# The compiler fuses each multiply feeding an add into one FMA (a single rounding); `_fma` reproduces that, and
# the order of the fused pairs below is the one that matches torch bit for bit (checked on 4M values).

_SQRTHF = _F(0.707106781186547524)
_LOG_P = [_F(c) for c in (7.0376836292e-2, -1.1514610310e-1, 1.1676998740e-1, -1.2420140846e-1,
                          1.4249322787e-1, -1.6668057665e-1, 2.0000714765e-1, -2.4999993993e-1, 3.3333331174e-1)]
_LOG_Q1, _LOG_Q2 = _F(-2.12194440e-4), _F(0.693359375)
_MINUS_DP = [_F(-0.78515625), _F(-2.4187564849853515625e-4), _F(-3.77489497744594108e-8)]
_SIN_P = [_F(-1.9515295891e-4), _F(8.3321608736e-3), _F(-1.6666654611e-1)]
_COS_P = [_F(2.443315711809948e-5), _F(-1.388731625493765e-3), _F(4.166664568298827e-2)]
_FOPI = _F(1.27323954473516)  # 4 / pi


def _fma(a, b, c) -> np.ndarray:
    """float32 a * b + c with one rounding.

    The float64 product of two float32 values is exact; the float64 sum is made round-to-odd (TwoSum error
    term, Boldo & Melquiond 2008), so its rounding to float32 equals the exactly rounded result.
    """
    p = np.asarray(a, np.float64) * np.asarray(b, np.float64)
    c = np.asarray(c, np.float64)
    s = p + c
    b_virtual = s - p
    err = (p - (s - b_virtual)) + (c - b_virtual)
    inexact_even = (err != 0) & ((s.view(np.int64) & 1) == 0)
    s = np.where(inexact_even, np.nextafter(s, np.copysign(np.inf, err)), s)
    return s.astype(_F)


def _log_avx2(x: np.ndarray) -> np.ndarray:
    """Natural log of positive float32 values: log(m 2^e) = e ln2 + log(m), m in [sqrt(1/2), sqrt(2))."""
    x = np.maximum(x, np.array(0x00800000, np.int32).view(_F))  # no denormals
    bits = x.view(np.int32)
    e = ((bits >> 23) - 0x7F).astype(_F) + _F(1.0)
    x = ((bits & ~0x7F800000) | np.array(0.5, _F).view(np.int32)).view(_F)  # mantissa in [0.5, 1)
    small = x < _SQRTHF
    tmp = np.where(small, x, _F(0.0))
    x = x - _F(1.0)
    e = e - np.where(small, _F(1.0), _F(0.0))
    x = x + tmp
    z = x * x
    y = _LOG_P[0]
    for p in _LOG_P[1:]:
        y = _fma(y, x, p)
    y = _fma(y * x, z, e * _LOG_Q1)
    y = y - z * _F(0.5)
    return _fma(e, _LOG_Q2, x + y)


def _sincos_avx2(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """sin and cos of non-negative float32 values (Cephes range reduction by pi/4, two polynomials)."""
    j = (x * _FOPI).astype(np.int32)  # truncation, as cvttps
    j = (j + 1) & ~1
    y = j.astype(_F)
    sin_negative = (j & 4) != 0
    swapped = (j & 2) != 0  # octants where the sine takes the cosine polynomial and vice versa
    cos_negative = ((j - 2) & 4) == 0
    for dp in _MINUS_DP:  # x - j pi/4 in three parts (extended precision)
        x = _fma(y, dp, x)
    z = x * x
    cos_poly = _fma(_fma(_COS_P[0], z, _COS_P[1]), z, _COS_P[2]) * z
    cos_poly = _fma(cos_poly, z, -(z * _F(0.5))) + _F(1.0)  # 1 - z/2 + z^2 P(z)
    sin_poly = _fma(_fma(_fma(_SIN_P[0], z, _SIN_P[1]), z, _SIN_P[2]) * z, x, x)  # x + x z Q(z)
    sin = np.where(swapped, cos_poly, sin_poly)
    cos = np.where(swapped, sin_poly, cos_poly)
    return np.where(sin_negative, -sin, sin), np.where(cos_negative, -cos, cos)


@functools.cache
def _libm_function(name: str):
    """The C library's float function `name`, loaded once."""
    path = ctypes.util.find_library("m") or ctypes.util.find_library("c")
    if path is None:
        raise EdgesdError("no C math library found for torch-compatible noise",
                          "use the numpy noise generator on this platform")
    fn = getattr(ctypes.CDLL(path), name)
    fn.restype, fn.argtypes = ctypes.c_float, [ctypes.c_float]
    return fn


def _libm(name: str, x: np.ndarray) -> np.ndarray:
    """The C library's float function `name` (logf, sinf, cosf) applied to each value of `x`."""
    fn = _libm_function(name)
    flat = np.ascontiguousarray(x, dtype=_F).ravel()
    return np.fromiter((fn(float(v)) for v in flat), dtype=_F, count=flat.size).reshape(x.shape)
