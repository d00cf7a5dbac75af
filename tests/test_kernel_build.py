"""The kernel sources build with the x86 paths disabled (no <immintrin.h>, no CPU detection),
and that portable-only build computes bit for bit what the installed library's portable path
computes."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

import adderquant.ops
from adderquant.ops import _kernel, _loader
from adderquant.ops.geometry import adder_geometry
from adderquant.ops.requant import fixed_point
from adderquant.ops.sad import ConvGeometry, packed_bytes

CSRC = Path(adderquant.ops.__file__).parent / "csrc"
SOURCES = ["cpu_dispatch.c", "adder_kernel.c", "sad_kernel.c", "requant.c", "fakequant.c"]
FLAGS = ["-O3", "-fopenmp", "-std=c11", "-fno-math-errno", "-Wall", "-Werror", "-shared", "-fPIC"]

pytestmark = pytest.mark.skipif(shutil.which("gcc") is None or not (CSRC / SOURCES[0]).exists(),
                                reason="needs gcc and the kernel sources")


@pytest.fixture(scope="module")
def portable(tmp_path_factory):
    """The kernels built with ADDERQUANT_PORTABLE_ONLY and an <immintrin.h> that fails to
    compile first on the include path, loaded with the package's loader."""
    folder = tmp_path_factory.mktemp("portable")
    (folder / "poison").mkdir()
    (folder / "poison" / "immintrin.h").write_text("#error the portable build included it\n")
    library = folder / "kernels.so"
    result = subprocess.run(
        ["gcc", *FLAGS, "-DADDERQUANT_PORTABLE_ONLY", f"-I{folder / 'poison'}",
         *(str(CSRC / s) for s in SOURCES), "-o", str(library), "-lm"],
        capture_output=True, text=True, check=False,
    )
    assert result.returncode == 0, result.stderr
    return _loader.open_library(str(library))


def test_portable_build_offers_only_the_portable_path(portable):
    assert portable.kernel_available_paths() == 1 << _loader.PATHS.index("portable")
    assert portable.kernel_best_path() == _loader.PATHS.index("portable")


def test_portable_build_refuses_the_x86_paths(portable):
    gen = torch.Generator().manual_seed(0)
    x, w = torch.randn(1, 2, 5, 5, generator=gen), torch.randn(3, 2, 3, 3, generator=gen)
    geom = adder_geometry(x, w, 1, 1, 1, 1)
    y = torch.empty(1, 3, 5, 5)
    avx2 = _loader.PATHS.index("avx2")
    assert portable.adder_forward_f32(geom, x.data_ptr(), w.data_ptr(), y.data_ptr(), avx2,
                                      1) == _loader.PATH_UNAVAILABLE


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_portable_build_matches_the_adder_kernel(portable, dtype):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(3, 4, 9, 8, generator=gen, dtype=dtype)
    x[0, 1, 2, 3] = float("inf")
    w = torch.randn(6, 2, 3, 3, generator=gen, dtype=dtype)
    geom = adder_geometry(x, w, (2, 1), 1, 1, 2)
    g = torch.randn(3, 6, geom.h_out, geom.w_out, generator=gen, dtype=dtype)
    sfx = "f64" if dtype == torch.float64 else "f32"
    portable_path = _loader.PATHS.index("portable")
    y = torch.empty(3, 6, geom.h_out, geom.w_out, dtype=dtype)
    gx, gw = torch.empty_like(x), torch.empty_like(w)
    assert getattr(portable, f"adder_forward_{sfx}")(
        geom, x.data_ptr(), w.data_ptr(), y.data_ptr(), portable_path, 2) == 0
    assert getattr(portable, f"adder_backward_{sfx}")(
        geom, x.data_ptr(), w.data_ptr(), g.data_ptr(), gx.data_ptr(), gw.data_ptr(), 0,
        portable_path, 2) == 0
    with _kernel.use_simd("portable"):
        expected_y = _kernel.forward(geom, x, w)
        expected_gx, expected_gw = _kernel.backward(geom, x, w, g, True, True, False)
    for got, expected in ((y, expected_y), (gx, expected_gx), (gw, expected_gw)):
        assert torch.equal(got.isnan(), expected.isnan())
        assert torch.equal(got.nan_to_num(), expected.nan_to_num())


def test_portable_build_matches_the_sad_kernel_and_requantization(portable):
    gen = torch.Generator().manual_seed(2)
    n, c, h, w, t = 2, 11, 9, 10, 5
    codes = torch.randint(0, 256, (n, c, h, w), dtype=torch.uint8, generator=gen)
    weights = torch.randint(0, 256, (t, c, 3, 3), dtype=torch.uint8, generator=gen)
    geometry = ConvGeometry((3, 3), (2, 1), (1, 1))
    ho, wo = geometry.output_size(h, w)
    installed = _loader.library()
    outs = []
    for lib, path in ((portable, 0), (installed, _loader.PATHS.index(_loader.best_path()))):
        out = torch.empty(n, t, ho, wo, dtype=torch.int32)
        assert lib.sad_conv2d(codes.data_ptr(), n, c, h, w, weights.data_ptr(), t,
                              *geometry.args(), 7, None, t, out.data_ptr(), path, 2) == 0
        outs.append(out)
    assert torch.equal(*outs)

    sums = torch.randint(-2**17, 2**17, (n, c, h, w), dtype=torch.int32, generator=gen)
    mult, offset, shift = map(torch.from_numpy, fixed_point(
        np.linspace(1e-3, 2e-2, 2 * c).reshape(2, c), np.linspace(-3, 3, 2 * c).reshape(2, c),
        18))
    zero = torch.tensor([3, 120], dtype=torch.int32)
    size = packed_bytes(c, h, w, geometry)
    packed = []
    for lib in (portable, installed):
        out = torch.empty(2, n, size, dtype=torch.uint8)
        assert lib.pack_codes(1, sums.data_ptr(), n, c, h, w, 2, None, mult.data_ptr(),
                              offset.data_ptr(), shift.data_ptr(), None, zero.data_ptr(), 255, 1,
                              *geometry.args(), out.data_ptr(), 2) == 0
        packed.append(out)
    assert torch.equal(*packed)
