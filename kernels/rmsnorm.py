"""RMSNorm, optionally fused with the residual add before it.

`add_rmsnorm(x, delta, weight, eps)` returns (rmsnorm(x + delta), x + delta) in one pass over the
row: the decoder's "residual add, then normalise" without writing and re-reading the sum. Numerics
follow transformers: the sum in the activation dtype, the normalisation in fp32, cast back, then
times the weight in the activation dtype.
"""
import torch

from tinyvila.kernels.pdl import chain_start, launch_options
from tinyvila.kernels.triton_lang import tl, triton
from tinyvila.kernels.w4a16 import sums_parts


def rmsnorm_ref(x, weight, eps):
    xf = x.float()
    return weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def add_rmsnorm_ref(x, delta, weight, eps):
    s = x + delta
    return rmsnorm_ref(s, weight, eps), s


@triton.jit
def _rmsnorm(X, Delta, Bias, W, Y, Sum, n, eps, HAS_DELTA: tl.constexpr, CONSUME: tl.constexpr,
             HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr):
    chain_start(PDL)  # programmatic dependent launch in decode (kernels/pdl.py)
    row = tl.program_id(0).to(tl.int64)  # 64-bit offsets: long prompts times wide rows
    cols = tl.arange(0, BLOCK)
    mask = cols < n
    x = tl.load(X + row * n + cols, mask=mask, other=0.0)
    if HAS_DELTA:
        d = tl.load(Delta + row * n + cols, mask=mask, other=0.0)
        if CONSUME:  # a GEMV's fp32 sums (w4a16.Sums): its bias added and rounded as its store would, zeroed
            tl.store(Delta + row * n + cols, tl.zeros_like(d), mask=mask)
            if HAS_BIAS:
                d += tl.load(Bias + cols, mask=mask, other=0.0).to(tl.float32)
        x = x + d.to(x.dtype)
        tl.store(Sum + row * n + cols, x, mask=mask)
    xf = x.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(xf * xf, axis=0) / n + eps)
    w = tl.load(W + cols, mask=mask, other=0.0)
    tl.store(Y + row * n + cols, (xf * rstd).to(x.dtype) * w, mask=mask)


def _launch(x, delta, weight, eps, consume=False, bias=None):
    assert x.is_contiguous() and weight.shape == (x.shape[-1],), (x.shape, weight.shape)
    n = x.shape[-1]
    y = torch.empty_like(x)
    s = torch.empty_like(x) if delta is not None else y
    _rmsnorm[(x.numel() // n,)](x, delta if delta is not None else x, bias if bias is not None else x, weight, y, s,
                                n, eps, HAS_DELTA=delta is not None, CONSUME=consume, HAS_BIAS=bias is not None,
                                BLOCK=triton.next_power_of_2(n),
                                **launch_options(x.device, dependent=True))
    return y, s


def rmsnorm(x, weight, eps):
    return _launch(x, None, weight, eps)[0]


def add_rmsnorm(x, delta, weight, eps):
    """delta: a tensor like x, or a decode GEMV's w4a16.Sums (read once: its workspace is zeroed)."""
    delta, bias, consume = sums_parts(delta)
    assert delta.shape == x.shape and delta.is_contiguous()
    return _launch(x, delta, weight, eps, consume, bias)
