"""Per-token int8 quantization of activations (SmoothQuant W8A8), fused with the op that makes them.

Every function returns (xq, xs) for the rows of its output y [M, K] (leading dimensions flattened):
  xs[m] = max_k |y[m, k]| / 127             fp32 [M]   (0 for a zero row)
  xq[m] = round(y[m] / xs[m]), in [-127, 127]  int8 [M, K]   (round half to even, like torch.round;
                                                              a zero row quantizes to zeros)
so y ~= xq * xs[:, None]. y is what the 16-bit model would feed its next linear: the op computed in
fp32 and rounded once to the activation dtype (the norms as transformers compute them), then
quantized from that rounding.

  quantize_per_token(x)                 y = x
  layernorm_quant(x, weight, bias, eps) y = F.layer_norm(x, ...)  (fp32 statistics and affine, cast)
  rmsnorm_quant(x, weight, eps)         y = weight * (x * rsqrt(mean(x^2) + eps)).to(x.dtype)
  act_quant(x, act)                     y = act(x): "gelu" (erf), "gelu_pytorch_tanh", "quick_gelu"
                                        (x * sigmoid(1.702 x)), or "silu_mul": x = [gate, up] of
                                        width 2I, y = silu(gate) * up of width I (silu rounded to the
                                        activation dtype, then the product rounded, as torch does)

Layout of xq: the rows live in a buffer [M, Kp], Kp = padded_k(K) (a multiple of K_ALIGN = 128),
whose columns K..Kp-1 are written as zeros, and xq is its view [:, :K] (row stride Kp). The int8
GEMM (int8_gemm.int8_linear) reads whole Kp rows against weights zero-padded to Kp, so its main
loop needs no K masks and every row starts 128-byte aligned (SigLIP's K = 4304 and Qwen's 3420 are
not multiples of 16). int8_linear accepts any other int8 [M, K] too (it pads a copy).

One program quantizes ROWS rows (the row max needs the whole row): one read of the input, one
write of xq and xs. The `*_ref` functions are the plain-PyTorch definitions.
"""
import torch
import torch.nn.functional as F

from tinyvila.kernels.triton_lang import tl, triton

K_ALIGN = 128
ACTS = ("gelu", "gelu_pytorch_tanh", "quick_gelu", "silu_mul")

# MODE values of the row kernel
_PLAIN, _LAYERNORM, _RMSNORM, _ACT, _SILU_MUL = 0, 1, 2, 3, 4


def padded_k(k: int) -> int:
    """Row length of the xq buffers and of prepared weights: K rounded up to K_ALIGN."""
    return -(-k // K_ALIGN) * K_ALIGN


# ----------------------------------------------------------------------------------------------
# References (plain PyTorch; CPU-friendly)


def quantize_per_token_ref(x):
    """Symmetric per-row quantization of x [..., K] -> (int8 [M, K], fp32 [M])."""
    xf = x.reshape(-1, x.shape[-1]).float()
    xs = xf.abs().amax(dim=-1) / 127.0
    safe = torch.where(xs > 0, xs, torch.ones_like(xs))
    xq = torch.round(xf / safe[:, None]).clamp_(-127, 127).to(torch.int8)
    return xq, xs


def layernorm_quant_ref(x, weight, bias, eps):
    return quantize_per_token_ref(F.layer_norm(x, (x.shape[-1],), weight, bias, eps))


def rmsnorm_quant_ref(x, weight, eps):
    xf = x.float()
    return quantize_per_token_ref(weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype))


def act_ref(x, act):
    """The activation as the kernels define it: computed in fp32, rounded once to x.dtype
    (silu_mul: silu rounded, then the product with `up` rounded, as the 16-bit model does)."""
    assert act in ACTS, act
    xf = x.float()
    if act == "silu_mul":
        gate, up = x.chunk(2, dim=-1)
        return F.silu(gate.float()).to(x.dtype) * up
    if act == "gelu":
        y = F.gelu(xf)
    elif act == "gelu_pytorch_tanh":
        y = F.gelu(xf, approximate="tanh")
    else:
        y = xf * torch.sigmoid(1.702 * xf)
    return y.to(x.dtype)


def act_quant_ref(x, act):
    return quantize_per_token_ref(act_ref(x, act))


def quantize_weight_per_channel(w):
    """w [N, K] float -> (wq int8 [N, K], ws fp32 [N]): symmetric absmax per output channel (row),
    w ~= wq * ws[:, None]. Runs once when a checkpoint is quantized (plain PyTorch, any device)."""
    assert w.dim() == 2 and w.is_floating_point(), (w.shape, w.dtype)
    return quantize_per_token_ref(w)


# ----------------------------------------------------------------------------------------------
# The row kernel


@triton.jit
def _round_half_even(y):
    # for |y| < 2**22, adding and removing 1.5 * 2**23 rounds y to an integer, ties to even (fp32
    # round-to-nearest-even on the add), like torch.round: two adds, no libdevice call
    return (y + 12582912.0) - 12582912.0


@triton.jit
def _act(x, ACT: tl.constexpr):
    """fp32 elementwise activations: 0 gelu (erf), 1 gelu tanh approximation, 2 quick_gelu.
    0.5 x (1 + tanh(u)) = x * sigmoid(2u): one exp and one division (exp overflow gives the
    right limits: x / inf = -0 for very negative x)."""
    if ACT == 0:
        y = 0.5 * x * (1.0 + tl.erf(x * 0.7071067811865476))
    elif ACT == 1:
        y = x / (1.0 + tl.exp(-1.5957691216057308 * (x + 0.044715 * x * x * x)))
    else:
        y = x / (1.0 + tl.exp(-1.702 * x))
    return y


@triton.jit
def _row_quant(X, W, B, Q, S, M, K, stride_x, stride_q, KP, eps,
               MODE: tl.constexpr, ACT: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    rmask = rows < M
    rows64 = rows.to(tl.int64)  # 64-bit offsets: a 256-frame video is 186K rows of 4304
    cols = tl.arange(0, BLOCK)
    cmask = cols < K
    mask = rmask[:, None] & cmask[None, :]
    xp = X + rows64[:, None] * stride_x + cols[None, :]
    x = tl.load(xp, mask=mask, other=0.0)
    dt = x.dtype
    if MODE == 4:  # silu_mul: x is the gate, the up half starts K columns further
        u = tl.load(xp + K, mask=mask, other=0.0)
        xf = x.to(tl.float32)
        y = ((xf / (1.0 + tl.exp(-xf))).to(dt) * u).to(tl.float32)
    elif MODE == 3:
        y = _act(x.to(tl.float32), ACT).to(dt).to(tl.float32)
    elif MODE == 1:
        xf = x.to(tl.float32)
        mean = tl.sum(xf, axis=1) / K
        xc = tl.where(mask, xf - mean[:, None], 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, axis=1) / K + eps)
        w = tl.load(W + cols, mask=cmask, other=0.0).to(tl.float32)
        b = tl.load(B + cols, mask=cmask, other=0.0).to(tl.float32)
        y = (xc * rstd[:, None] * w[None, :] + b[None, :]).to(dt).to(tl.float32)
    elif MODE == 2:
        xf = x.to(tl.float32)
        rstd = 1.0 / tl.sqrt(tl.sum(xf * xf, axis=1) / K + eps)
        w = tl.load(W + cols, mask=cmask, other=0.0)
        y = ((xf * rstd[:, None]).to(dt) * w[None, :]).to(tl.float32)
    else:
        y = x.to(tl.float32)
    y = tl.where(mask, y, 0.0)
    amax = tl.max(tl.abs(y), axis=1)
    scale = tl.math.div_rn(amax, 127.0)
    # one division a row; y * (1 / scale) can differ from y / scale in the last bit, which moves
    # the rounding only for a y within an ulp of a tie (one LSB, rarely)
    inv = tl.math.div_rn(1.0, tl.where(amax > 0.0, scale, 1.0))
    q = _round_half_even(y * inv[:, None])
    q = tl.minimum(tl.maximum(q, -127.0), 127.0)
    # columns K..KP-1 of the buffer are zeros (the GEMM reads whole padded rows)
    tl.store(Q + rows64[:, None] * stride_q + cols[None, :], q.to(tl.int8),
             mask=rmask[:, None] & (cols < KP)[None, :])
    tl.store(S + rows, scale, mask=rmask)


def _rows_per_program(block):
    return 1  # 2+ rows a program were never faster (tools/int8_bench.py measures it)


def _launch(x, width, mode, act=0, weight=None, bias=None, eps=0.0, rows=None, num_warps=None):
    """x [..., C] (C = width, or 2 * width for silu_mul) -> (xq view [M, width] of a [M, Kp]
    buffer, xs [M])."""
    assert x.is_floating_point() and x.stride(-1) == 1, (x.dtype, x.stride())
    x2 = x.reshape(-1, x.shape[-1])  # a view when the rows are evenly strided
    M = x2.shape[0]
    kp = padded_k(width)
    buf = torch.empty(M, kp, dtype=torch.int8, device=x.device)
    xs = torch.empty(M, dtype=torch.float32, device=x.device)
    block = triton.next_power_of_2(kp)
    rows = rows or _rows_per_program(block)
    if num_warps is None:  # about 8 columns a thread: the fastest at the encoders' widths
        num_warps = min(16, max(4, block * rows // 256))
    if M:
        _row_quant[(triton.cdiv(M, rows),)](
            x2, weight if weight is not None else x2, bias if bias is not None else x2, buf, xs,
            M, width, x2.stride(0), kp, kp, eps, MODE=mode, ACT=act, ROWS=rows, BLOCK=block,
            num_warps=num_warps)
    return buf[:, :width], xs


def quantize_per_token(x, **launch):
    """x [..., K] fp16 / bf16 / fp32 -> (xq int8 [M, K], xs fp32 [M]); see the module docstring."""
    return _launch(x, x.shape[-1], _PLAIN, **launch)


def layernorm_quant(x, weight, bias, eps, **launch):
    """LayerNorm over the last dimension, then per-token int8 (one pass)."""
    K = x.shape[-1]
    assert weight.shape == (K,) and bias is not None and bias.shape == (K,), (x.shape, weight.shape)
    assert weight.is_contiguous() and bias.is_contiguous()
    return _launch(x, K, _LAYERNORM, weight=weight, bias=bias, eps=eps, **launch)


def rmsnorm_quant(x, weight, eps, **launch):
    """RMSNorm (transformers' order of roundings), then per-token int8 (one pass)."""
    K = x.shape[-1]
    assert weight.shape == (K,) and weight.is_contiguous(), (x.shape, weight.shape)
    return _launch(x, K, _RMSNORM, weight=weight, eps=eps, **launch)


def act_quant(x, act, **launch):
    """act(x) then per-token int8 (one pass). act in ACTS; "silu_mul" takes x = [gate, up] [M, 2I]
    and quantizes silu(gate) * up [M, I]."""
    assert act in ACTS, act
    if act == "silu_mul":
        assert x.shape[-1] % 2 == 0, x.shape
        return _launch(x, x.shape[-1] // 2, _SILU_MUL, **launch)
    return _launch(x, x.shape[-1], _ACT, act=ACTS.index(act), **launch)
