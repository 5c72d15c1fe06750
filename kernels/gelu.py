"""The GELU variants of the vision encoders in one elementwise kernel each: exact (erf), tanh
approximation (SigLIP's gelu_pytorch_tanh) and CLIP's quick_gelu x * sigmoid(1.702 x), computed in
fp32 and rounded once."""
import torch
import torch.nn.functional as F

from tinyvila.kernels.triton_lang import tl, triton

KINDS = ("gelu", "gelu_pytorch_tanh", "quick_gelu")


def gelu_ref(x, kind):
    if kind == "gelu":
        return F.gelu(x)
    if kind == "gelu_pytorch_tanh":
        return F.gelu(x, approximate="tanh")
    return x * torch.sigmoid(1.702 * x)


@triton.jit
def _gelu(X, Y, n, KIND: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)  # 64-bit: tensors past 2**31
    mask = offs < n
    x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    if KIND == 0:
        y = 0.5 * x * (1.0 + tl.erf(x * 0.7071067811865476))
    elif KIND == 1:
        inner = 0.7978845608028654 * (x + 0.044715 * x * x * x)
        e = tl.exp(-2.0 * tl.abs(inner))  # tanh from exp(-2|u|): never overflows
        tanh = tl.where(inner >= 0, 1.0, -1.0) * (1.0 - e) / (1.0 + e)
        y = 0.5 * x * (1.0 + tanh)
    else:
        y = x / (1.0 + tl.exp(-1.702 * x))
    tl.store(Y + offs, y.to(Y.dtype.element_ty), mask=mask)


def gelu(x, kind, block=1024):
    assert x.is_contiguous() and kind in KINDS, (x.stride(), kind)
    y = torch.empty_like(x)
    _gelu[(triton.cdiv(x.numel(), block),)](x, y, x.numel(), KIND=KINDS.index(kind), BLOCK=block)
    return y
