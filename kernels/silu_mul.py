"""SwiGLU's middle: silu(gate) * up, reading the fused gate/up projection output [T, 2I] once.

`width` > I writes zeros past column I: the input of a down projection whose weight is zero-padded
to that width (models/layers.PaddedLinear; Qwen2.5-VL's ViT, I = 3420 -> 3424)."""
import torch
import torch.nn.functional as F

from tinyvila.kernels.pdl import chain_start, launch_options
from tinyvila.kernels.triton_lang import tl, triton


def silu_mul_ref(gate_up):
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


@triton.jit
def _silu_mul(GU, Out, inter, width, BLOCK: tl.constexpr, PDL: tl.constexpr):
    chain_start(PDL)  # programmatic dependent launch in decode (kernels/pdl.py)
    row = tl.program_id(0).to(tl.int64)  # long prompts: row * 2 * inter passes 2**31
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < inter
    g = tl.load(GU + row * 2 * inter + cols, mask=mask, other=0.0)
    u = tl.load(GU + row * 2 * inter + inter + cols, mask=mask, other=0.0)  # silu(0) * 0 = 0 past inter
    gf = g.to(tl.float32)
    act = (gf / (1.0 + tl.exp(-gf))).to(g.dtype)  # silu rounded to the activation dtype, as torch does
    tl.store(Out + row * width + cols, act * u, mask=cols < width)


def silu_mul(gate_up, block=1024, width=None):
    """[..., 2I] -> [..., I], or [..., width] with zeros past I."""
    assert gate_up.is_contiguous() and gate_up.shape[-1] % 2 == 0, gate_up.shape
    inter = gate_up.shape[-1] // 2
    width = width or inter
    assert width >= inter, (width, inter)
    rows = gate_up.numel() // (2 * inter)
    out = torch.empty(*gate_up.shape[:-1], width, device=gate_up.device, dtype=gate_up.dtype)
    _silu_mul[(rows, triton.cdiv(width, block))](gate_up, out, inter, width, BLOCK=block,
                                                 **launch_options(gate_up.device, dependent=True))
    return out
