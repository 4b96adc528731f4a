"""gemmakit's C++ kernels: one library, compiled for this machine's CPU on first use, once per machine.

- `q4_0.cpp`: torch.ops.gemmakit.q4_0_linear, Q4_0 weights times Q8_0 activations as llama.cpp
  multiplies them (gemmakit.quant.Q4_0Linear).
- `bf16.cpp`: torch.ops.gemmakit.bf16_linear and bf16_tiles, bf16 weights times a few rows summed in
  fp32: the compiled decode step's products for a bf16 model (gemmakit.quant.DenseLinear and
  PackedEmbedding), with AVX-512 only.
- `int8.cpp`: torch.ops.gemmakit.int8_linear and int8_tiles, the same for int8 weights with one scale per
  row (gemmakit.quant.Int8Linear); fp8_linear and fp8_tiles for float8 e4m3 weights (Fp8Linear);
  q8_0_linear for int8 weights with one scale per block of 32 (BlockInt8Linear); with AVX-512 only.
  fp8_dequantize widens fp8 weights for BLAS (Fp8Linear's prefill), where torch converts one at a time.

The library is built with -march=native into `<cache>/kernels/<key>/` (the key digests the sources,
torch's version and the CPU) with a one-line notice; later processes load it in milliseconds. A
library whose checksum does not match is rebuilt after a one-line notice; without a C++ compiler a
notice says so and gemmakit runs its torch paths (same arithmetic for q4_0, slower).
"""

from __future__ import annotations

import functools
import hashlib
import platform
import shutil
import sys
import tempfile
from pathlib import Path

import torch
from torch import Tensor

SOURCES = tuple(Path(__file__).parent / name for name in ("q4_0.cpp", "bf16.cpp", "int8.cpp"))
LIBRARY = "gemmakit_kernels"


def build(name: str, directory: Path, flags: list[str]) -> None:
    """Compile SOURCES into `directory` as library `name` and load it (torch.utils.cpp_extension), with
    the compiler `flags` (the CPU's: -march=...; another op namespace: -DGK_NAMESPACE=...)."""
    from torch.utils.cpp_extension import load as load_extension

    # -fopenmp: ATen's parallel_for is inline OpenMP; the library then shares torch's libgomp.
    load_extension(name=name, sources=[str(s) for s in SOURCES], build_directory=str(directory),
                   extra_cflags=["-O3", "-fopenmp", *flags], extra_ldflags=["-fopenmp"], is_python_module=False)


@functools.cache
def load() -> bool:
    """Load the library (torch.ops.gemmakit.*): True once loaded, building it first if this machine has
    none; False, after a one-line notice, if it cannot be built."""
    from gemmakit.compiled import _cpu, _first_line
    from gemmakit.hub import home

    source = b"".join(s.read_bytes() for s in SOURCES)
    key = hashlib.sha256(source + torch.__version__.encode() + _cpu().encode()).hexdigest()[:16]
    build_dir = home() / "kernels" / key
    library = build_dir / f"{LIBRARY}.so"
    checksum = build_dir / f"{LIBRARY}.sha256"
    if library.exists():
        # Checked before loading: dlopen of a truncated library is a bus error, not an exception.
        digest = hashlib.sha256(library.read_bytes()).hexdigest()
        if not checksum.exists() or checksum.read_text().strip() != digest:
            print(f"gemmakit: the kernel library {library} is damaged (checksum mismatch); rebuilding it",
                  file=sys.stderr)
            shutil.rmtree(build_dir, ignore_errors=True)
        else:
            torch.ops.load_library(str(library))
    if not library.exists():
        tmp = None
        try:
            print("building gemmakit's kernels for this CPU, once: ~30 s", file=sys.stderr, flush=True)
            build_dir.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=build_dir.parent))  # renamed when complete
            native = ["-march=native"] if platform.machine() in ("x86_64", "AMD64") else []
            build(LIBRARY, tmp, native)
            (tmp / checksum.name).write_text(hashlib.sha256((tmp / library.name).read_bytes()).hexdigest())
            try:
                tmp.rename(build_dir)
            except OSError:  # another process finished first: its build is the same
                shutil.rmtree(tmp, ignore_errors=True)
        except Exception as e:  # noqa: BLE001 - any build failure leaves the torch paths
            if tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)
            print(f"gemmakit: gemmakit's kernels could not be built ({_first_line(e)}); q4_0 layers run a "
                  "slower reference", file=sys.stderr)
            return False
    # Shapes for torch.export / inductor, which trace the ops without running them.
    torch.library.register_fake("gemmakit::q4_0_linear")(_q4_0_linear_shape)
    torch.library.register_fake("gemmakit::bf16_linear")(_bf16_linear_shape)
    torch.library.register_fake("gemmakit::bf16_tiles")(_bf16_tiles_shape)
    torch.library.register_fake("gemmakit::int8_linear")(_int8_linear_shape)
    torch.library.register_fake("gemmakit::int8_tiles")(_int8_tiles_shape)
    torch.library.register_fake("gemmakit::fp8_linear")(_int8_linear_shape)
    torch.library.register_fake("gemmakit::fp8_tiles")(_int8_tiles_shape)
    torch.library.register_fake("gemmakit::q8_0_linear")(_int8_linear_shape)
    torch.library.register_fake("gemmakit::fp8_dequantize")(_fp8_dequantize_shape)
    return True


@functools.cache
def bf16() -> bool:
    """Use bf16_linear / bf16_tiles in the compiled decode step? Only where they were built with AVX-512
    (elsewhere inductor's loop is kept: the plain C++ build is for tests)."""
    return load() and torch.ops.gemmakit.bf16_isa() == "avx512"


@functools.cache
def int8() -> bool:
    """Use int8.cpp's products (int8, fp8, q8_0) in the compiled decode step? As bf16()."""
    return load() and torch.ops.gemmakit.int8_isa() == "avx512"


def _q4_0_linear_shape(x: Tensor, packed: Tensor, scales: Tensor, out_features: int) -> Tensor:
    return x.new_empty(*x.shape[:-1], out_features)


def _bf16_linear_shape(x: Tensor, weight: Tensor) -> Tensor:
    return x.new_empty(*x.shape[:-1], weight.shape[0])


def _bf16_tiles_shape(x: Tensor, tiles: Tensor) -> Tensor:
    return x.new_empty(*x.shape[:-1], tiles.shape[0] * tiles.shape[2])


def _int8_linear_shape(x: Tensor, weight: Tensor, scale: Tensor) -> Tensor:
    return x.new_empty(*x.shape[:-1], weight.shape[0])


def _fp8_dequantize_shape(weight: Tensor, scale: Tensor) -> Tensor:
    return scale.new_empty(weight.shape)


def _int8_tiles_shape(x: Tensor, tiles: Tensor, scale: Tensor) -> Tensor:
    return x.new_empty(*x.shape[:-1], tiles.shape[0] * tiles.shape[2])
