"""`triton` and `triton.language` for the kernel modules, or stand-ins where Triton is not installed.

setup.py installs Triton on Linux only. Elsewhere the kernel modules still import (their PyTorch
references are what the CPU runs) and define their kernels; launching one says what is missing.
"""
from tinyvila.errors import TinyVilaError

MISSING = "the GPU kernels need Triton, which is not installed (pip install triton)"


class _Unlaunchable:
    """A kernel defined without Triton: `kernel[grid](...)` raises."""

    def __init__(self, fn):
        self.fn = fn

    def __getitem__(self, grid):
        raise TinyVilaError(f"{self.fn.__name__}: {MISSING}")


class _NoTriton:
    """Stands in for both `triton` and `triton.language`."""

    constexpr = None  # the annotation of the kernels' compile-time parameters

    @staticmethod
    def jit(fn=None, **options):
        if fn is None:  # @triton.jit(do_not_specialize=...)
            return _NoTriton.jit
        return _Unlaunchable(fn)

    def __getattr__(self, name):
        raise TinyVilaError(f"triton.{name}: {MISSING}")


try:
    import triton
    import triton.language as tl

    HAVE_TRITON = True
except ImportError:
    triton = tl = _NoTriton()
    HAVE_TRITON = False
