"""Programmatic dependent launch (PDL, Hopper and newer): overlap a kernel's start with the end of
the kernel before it in the stream.

A kernel launched as a dependent (`launch_pdl`) may begin while its predecessor still runs; before
it reads anything an earlier kernel wrote, or writes anything they might still read, it calls
`gdc_wait()`, which returns once the predecessor has finished and its writes are visible. A kernel
that calls `gdc_launch_dependents()` lets its dependent start right away instead of when its own
programs exit. Decode uses it so that each W4A16 GEMV streams its first weights (which no kernel
writes) while the small kernel before it (RMSNorm, SiLU-mul, the attention merge) still runs.
CUDA graphs keep these edges when they capture the launches.

Off on GPUs before sm_90 (the instructions do not exist there), under the Triton interpreter, with
a Triton older than 3.4 (no PDL in its language and launcher), and with TINYVILA_PDL=0 in the
environment (for A/B timing and for debugging an ordering doubt).
"""
import functools
import os

import torch

from tinyvila.kernels.triton_lang import tl, triton

try:  # re-exported to the kernels, which call them only under their PDL constexpr
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:  # an older Triton: the kernels compile with PDL=False and never name them
    gdc_launch_dependents = gdc_wait = None
# the launcher's launch_pdl option came with Triton 3.4
TRITON_HAS_PDL = gdc_wait is not None and tuple(int(v) for v in triton.__version__.split(".")[:2]) >= (3, 4)


@functools.lru_cache(maxsize=None)
def _capable(index: int) -> bool:
    return torch.cuda.get_device_capability(index)[0] >= 9


def enabled(device: torch.device) -> bool:
    if (device.type != "cuda" or not TRITON_HAS_PDL or os.environ.get("TRITON_INTERPRET") == "1"
            or os.environ.get("TINYVILA_PDL") == "0"):
        return False
    return _capable(device.index if device.index is not None else torch.cuda.current_device())


def launch_options(device: torch.device, dependent: bool = False) -> dict:
    """Keyword arguments for a kernel launch: PDL= (the kernel's constexpr switching its gdc calls)
    and, for a kernel that waits on its predecessor, launch_pdl."""
    on = enabled(device)
    return {"PDL": on, "launch_pdl": True} if on and dependent else {"PDL": on}


@triton.jit
def chain_start(PDL: tl.constexpr):
    """The first statement of a chained kernel: let the next kernel launch, then wait for the one
    before (a no-op unless the launch asked for PDL)."""
    if PDL:
        gdc_launch_dependents()
        gdc_wait()
