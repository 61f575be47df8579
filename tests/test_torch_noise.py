"""`--noise torch-cpu`: torch's CPU randn, bit for bit, from NumPy (torch is only the reference here)."""

import json
import os
import subprocess
import sys
from fractions import Fraction

import numpy as np
import pytest

from edgesd import EdgesdError
from edgesd.torch_noise import TorchCpuGenerator, _fma, _torch_picks_avx2

torch = pytest.importorskip("torch")

SEEDS = [0, 1, 42, 1234567, 2**32 - 1, 2**32 + 5, 2**40 + 3]
# < 16 values use torch's double Box-Muller path, >= 16 the float32 blocks of 16 (with a redrawn tail when the
# size is not a multiple of 16); the sequence also checks that state and the cached second normal carry over.
SHAPES = [(1,), (3,), (15,), (16,), (17,), (33,), (1, 4, 64, 64), (2, 4, 96, 64), (5,), (1, 4, 8, 8), (2, 4, 9, 7)]

_TORCH_DRAWS = """
import json, sys, numpy as np, torch
seeds, shapes = json.loads(sys.argv[1])
out = {}
for seed in seeds:
    g = torch.Generator().manual_seed(seed)
    for i, shape in enumerate(shapes):
        out[f"{seed}/{i}"] = torch.randn(shape, generator=g).numpy()
np.savez(sys.argv[2], **out)
"""


def _assert_bit_identical(expected: np.ndarray, got: np.ndarray, what: str):
    assert got.dtype == np.float32 and got.shape == expected.shape, what
    differ = int((expected.view(np.uint32) != got.view(np.uint32)).sum())
    assert differ == 0, f"{what}: {differ} of {expected.size} values differ (max {np.abs(expected - got).max()})"


def _torch_in_subprocess(capability: str, tmp_path) -> dict:
    """torch's draws with its CPU kernel forced (ATEN_CPU_CAPABILITY is read once, at start-up)."""
    path = tmp_path / f"{capability}.npz"
    env = {**os.environ, "ATEN_CPU_CAPABILITY": capability}
    subprocess.run([sys.executable, "-c", _TORCH_DRAWS, json.dumps([SEEDS, SHAPES]), str(path)], env=env,
                   check=True, timeout=300)
    return dict(np.load(path))


def _check_against(expected: dict, math: str):
    for seed in SEEDS:
        ours = TorchCpuGenerator(seed, math)
        for i, shape in enumerate(SHAPES):
            _assert_bit_identical(expected[f"{seed}/{i}"], ours.randn(shape), f"seed {seed}, draw {i} {shape}")


def test_matches_torch_on_this_machine():
    """"auto" picks the kernel torch itself runs here."""
    for seed in SEEDS:
        g, ours = torch.Generator().manual_seed(seed), TorchCpuGenerator(seed)
        for shape in SHAPES:
            _assert_bit_identical(torch.randn(shape, generator=g).numpy(), ours.randn(shape), f"{seed} {shape}")


@pytest.mark.skipif(not _torch_picks_avx2(), reason="torch's AVX2 kernel needs an AVX2 + FMA CPU")
def test_matches_torchs_avx2_kernel(tmp_path):
    """x86 with AVX2 and FMA (with or without AVX-512): the Cephes polynomials of avx_mathfun.h, with the
    compiler's FMAs."""
    _check_against(_torch_in_subprocess("avx2", tmp_path), "avx2")


def test_matches_torchs_scalar_kernel(tmp_path):
    """x86 without AVX2, ARM, ATEN_CPU_CAPABILITY=default: the C library's logf / sinf / cosf."""
    _check_against(_torch_in_subprocess("default", tmp_path), "libm")


def test_a_million_values_bit_for_bit():
    """Every Box-Muller block of a large draw, not only the first few thousand."""
    g = torch.Generator().manual_seed(2026)
    _assert_bit_identical(torch.randn((4, 4, 256, 256), generator=g).numpy(),
                          TorchCpuGenerator(2026).randn((4, 4, 256, 256)), "1M values")


def test_fma_rounds_once():
    """_fma(a, b, c) is the exactly rounded float32 of a*b + c, including where two roundings would differ."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal(4000).astype(np.float32)
    b = rng.standard_normal(4000).astype(np.float32)
    # c close to -a*b makes cancellation; c tiny makes the double sum land near float32 halfway points
    c = np.concatenate([-(a[:2000] * b[:2000]).astype(np.float32) * np.float32(1.0000001),
                        (rng.standard_normal(2000) * 1e-9).astype(np.float32)])
    got = _fma(a, b, c)
    for x, y, z, r in zip(a, b, c, got):
        exact = Fraction(float(x)) * Fraction(float(y)) + Fraction(float(z))
        down = np.float32(float(exact))  # float() of a Fraction is correctly rounded to float64 ...
        candidates = [np.nextafter(down, np.float32(-np.inf)), down, np.nextafter(down, np.float32(np.inf))]
        best = min(candidates, key=lambda v: (abs(Fraction(float(v)) - exact),
                                              int(np.array(v).view(np.uint32)) & 1))  # ties to even
        assert r == best, (x, y, z)


def test_bad_arguments():
    with pytest.raises(EdgesdError, match="non-negative integer"):
        TorchCpuGenerator(-1)
    with pytest.raises(EdgesdError, match="unknown torch math 'sse'"):
        TorchCpuGenerator(1, "sse")


@pytest.mark.skipif(not _torch_picks_avx2(), reason="torch's AVX2 kernel needs an AVX2 + FMA CPU")
def test_avx512_kernel_fills_like_avx2(tmp_path):
    """torch's AVX-512 build of the normal fill is the AVX2 code (where the CPU has AVX-512)."""
    from numpy._core._multiarray_umath import __cpu_features__ as features

    if not all(features.get(n) for n in ("AVX512F", "AVX512VL", "AVX512BW", "AVX512DQ")):
        pytest.skip("no AVX-512 on this CPU")
    _check_against(_torch_in_subprocess("avx512", tmp_path), "avx2")
