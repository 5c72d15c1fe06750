"""Rotary embedding applied in place to q or k [T, H, D] (any strides with a unit last stride, e.g.
views into the fused qkv projection), rotate-half layout; cos/sin [T, D] in the activation dtype.
M-RoPE needs nothing special: its tables already mix the t/h/w angles. fp32 tables (Qwen2.5-VL's
ViT, which rotates in fp32) make the arithmetic fp32, rounded once to x's dtype at the store."""
import torch

from tinyvila.kernels.triton_lang import tl, triton


def rope_ref(x, cos, sin):
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos[:, None] + rotated * sin[:, None]


@triton.jit
def _rope(X, Cos, Sin, stride_t, stride_h, H, HALF: tl.constexpr, BLOCK_HALF: tl.constexpr,
          BLOCK_H: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)  # 64-bit offsets for long prompts
    h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    i = tl.arange(0, BLOCK_HALF)  # a power of two covering HALF (Qwen's ViT: D = 80)
    cos = tl.load(Cos + t * 2 * HALF + i, mask=i < HALF, other=0.0)
    sin = tl.load(Sin + t * 2 * HALF + i, mask=i < HALF, other=0.0)
    mask = (h < H)[:, None] & (i < HALF)[None, :]
    ptr = X + t * stride_t + h[:, None] * stride_h + i[None, :]
    x1 = tl.load(ptr, mask=mask, other=0.0)
    x2 = tl.load(ptr + HALF, mask=mask, other=0.0)
    tl.store(ptr, x1 * cos[None, :] - x2 * sin[None, :], mask=mask)
    tl.store(ptr + HALF, x2 * cos[None, :] + x1 * sin[None, :], mask=mask)


def rope_(x, cos, sin, block_h=4):
    """In place on x [T, H, D]; returns x."""
    T, H, D = x.shape
    assert x.stride(2) == 1 and cos.shape == (T, D) and sin.shape == (T, D), (x.shape, x.stride(), cos.shape)
    assert cos.dtype == sin.dtype and cos.dtype in (x.dtype, torch.float32), (cos.dtype, x.dtype)
    _rope[(T, triton.cdiv(H, block_h))](x, cos.contiguous(), sin.contiguous(), x.stride(0), x.stride(1), H,
                                       HALF=D // 2, BLOCK_HALF=triton.next_power_of_2(D // 2), BLOCK_H=block_h)
    return x
