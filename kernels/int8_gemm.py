"""W8A8 linear (SmoothQuant): int8 activations with per-token scales times int8 weights with
per-output-channel scales, int32 accumulation on the tensor cores (wgmma s8 on Hopper).

  y[m, n] = (sum_k xq[m, k] * wq[n, k]) * xs[m] * ws[n]  (+ bias[n])   ->  out_dtype
  optionally followed by an elementwise activation (gelu / gelu_pytorch_tanh / quick_gelu) in the
  epilogue, in fp32 before the one rounding to out_dtype. (fc1 with the activation in the epilogue
  + quantize_per_token moves the same bytes as fc1 + act_quant and is no faster, so the model code
  can use either.)

Weight layout (`prepare_int8_weight`, once at load): int8 [N, Kp], K contiguous, zero-padded from K
to Kp = padded_k(K) (a multiple of 128). K-major is what the 8-bit tensor-core instructions take
for both operands, and with both operands padded to Kp (the activations by quantize_int8's
kernels, see there) the main loop runs over whole 128-byte K tiles without masks. A weight whose K
is already a multiple of 128 is its own prepared form.

Two kernels (`int8_linear` picks one and its tiles with `pick_config`; `config=` overrides):
  "tma"  persistent: `ctas_per_sm` programs per SM walk the output tiles (grouped along M for L2
         reuse); the operand tiles come in through the tensor memory accelerator (host
         descriptors; rows past M read as zeros) and, with `tma_store`, the output tile leaves the
         same way through shared memory. Hopper and newer.
  "ptr"  one program per output tile, pointer loads (rows past M and columns past N wrap around
         inside the tensors and are masked at the store). Any GPU Triton supports, and the
         interpreter.

What limits it (Hopper, Triton 3.6): Triton keeps a wgmma asynchronous across K steps only for fp32
accumulators (WGMMAPipeline.cpp, "rule 2.1"), so an int32-accumulating dot waits for its MMAs
after every K tile; two 1-warpgroup programs per SM hide part of that (one computes while the
other drains). Storing the tile with tl.store straight from the MMA register layout saturated L2
(the SMs sat mostly idle); the TMA store fixed that. That per-step wait is not what bounds these
shapes, though: a Gluon kernel that keeps the int32 wgmma in flight across K steps (one
outstanding, a 3-stage TMA ring, TMA store) measured no faster than this one. What is left is
CUTLASS's structure: a TMA producer warp, two consumer warpgroups taking turns, the epilogue of one
tile under the next tile's main loop. tools/int8_bench.py measures it (the README has the figures).
"""
from dataclasses import dataclass, replace

import torch

from tinyvila.kernels.gpu import sm_count
from tinyvila.kernels.quantize_int8 import K_ALIGN, _act, act_ref, padded_k
from tinyvila.kernels.triton_lang import tl, triton

EPILOGUE_ACTS = ("gelu", "gelu_pytorch_tanh", "quick_gelu")


@dataclass(frozen=True)
class Int8Config:
    kind: str = "tma"  # "tma" or "ptr"
    BM: int = 128
    BN: int = 128
    BK: int = 128
    GROUP_M: int = 8
    num_warps: int = 4
    num_stages: int = 3
    flatten: bool = False  # "tma": let the pipeliner run across tiles (tl.range flatten=)
    warp_spec: bool = False  # "tma": warp-specialized loop (tl.range warp_specialize=)
    ctas_per_sm: int = 1  # "tma": persistent programs per SM (2 lets one program's MMAs run while
    #                        the other waits: Triton drains the int32-accumulator wgmma every K step)
    tma_store: bool = False  # "tma": write the output tile through a TMA descriptor
    epi_split: int = 1  # "tma" + tma_store: store the tile in this many column slices (1 or 2; less
    #                     shared memory for the staging buffer)


# ----------------------------------------------------------------------------------------------
# Layout and reference


def prepare_int8_weight(w_int8):
    """int8 [N, K] -> int8 [N, Kp] contiguous, zeros in columns K..Kp-1 (see module docstring)."""
    assert w_int8.dtype == torch.int8 and w_int8.dim() == 2, (w_int8.dtype, w_int8.shape)
    N, K = w_int8.shape
    kp = padded_k(K)
    if kp == K:
        return w_int8.contiguous()
    out = torch.zeros(N, kp, dtype=torch.int8, device=w_int8.device)
    out[:, :K] = w_int8
    return out


def int8_linear_ref(xq, xs, wq, ws, bias=None, out_dtype=torch.float16, act=None):
    """Plain PyTorch (any device): the int products summed exactly in float64 (|sum| < 2**53),
    then the kernel's fp32 epilogue. wq may be [N, K] or prepared [N, Kp]."""
    K = xq.shape[1]
    acc = xq.double() @ wq[:, :K].double().t()
    y = acc.float() * xs.float()[:, None] * ws.float()[None, :]
    if bias is not None:
        y = y + bias.float()[None, :]
    if act is not None:
        y = act_ref(y, act)  # fp32 in, fp32 out
    return y.to(out_dtype)


# ----------------------------------------------------------------------------------------------
# Kernels


@triton.jit
def _tile(tile, num_m, num_n, GROUP_M: tl.constexpr):
    """Tile index -> (pid_m, pid_n), GROUP_M row-tiles at a time walk along N (L2 reuse)."""
    per_group = GROUP_M * num_n
    first_m = (tile // per_group) * GROUP_M
    rows = tl.minimum(num_m - first_m, GROUP_M)
    return first_m + (tile % per_group) % rows, (tile % per_group) // rows


@triton.jit
def _scaled(acc, off_m, off_n, XS, WS, Bias, M, N,
            HAS_BIAS: tl.constexpr, ACT: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr):
    rm = off_m + tl.arange(0, BM)
    rn = off_n + tl.arange(0, BN)
    xs = tl.load(XS + rm, mask=rm < M, other=0.0)
    ws = tl.load(WS + rn, mask=rn < N, other=0.0)
    y = acc.to(tl.float32) * xs[:, None] * ws[None, :]
    if HAS_BIAS:
        y = y + tl.load(Bias + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    if ACT >= 0:
        y = _act(y, ACT)
    return y


@triton.jit
def _epilogue(acc, off_m, off_n, XS, WS, Bias, C, M, N, stride_cm,
              HAS_BIAS: tl.constexpr, ACT: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr):
    y = _scaled(acc, off_m, off_n, XS, WS, Bias, M, N, HAS_BIAS, ACT, BM, BN)
    rm = off_m + tl.arange(0, BM)
    rn = off_n + tl.arange(0, BN)
    tl.store(C + rm.to(tl.int64)[:, None] * stride_cm + rn[None, :], y.to(C.dtype.element_ty),
             mask=(rm < M)[:, None] & (rn < N)[None, :])


@triton.jit
def _tma_tile(tile, a_desc, b_desc, XS, WS, Bias, C, M, N, KP, stride_cm, num_m, num_n,
              HAS_BIAS: tl.constexpr, ACT: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
              BK: tl.constexpr, GROUP_M: tl.constexpr, TMA_STORE: tl.constexpr, EPI_SPLIT: tl.constexpr):
    pid_m, pid_n = _tile(tile, num_m, num_n, GROUP_M)
    off_m = pid_m * BM
    off_n = pid_n * BN
    acc = tl.zeros((BM, BN), dtype=tl.int32)
    for kk in range(KP // BK):
        a = a_desc.load([off_m, kk * BK])
        b = b_desc.load([off_n, kk * BK])
        acc = tl.dot(a, b.T, acc, out_dtype=tl.int32)
    if TMA_STORE:
        y = _scaled(acc, off_m, off_n, XS, WS, Bias, M, N, HAS_BIAS, ACT, BM, BN).to(C.dtype)
        if EPI_SPLIT == 2:
            y0, y1 = tl.split(tl.permute(tl.reshape(y, (BM, 2, BN // 2)), (0, 2, 1)))
            C.store([off_m, off_n], y0)
            C.store([off_m, off_n + BN // 2], y1)
        else:
            C.store([off_m, off_n], y)
    else:
        _epilogue(acc, off_m, off_n, XS, WS, Bias, C, M, N, stride_cm, HAS_BIAS, ACT, BM, BN)


@triton.jit(do_not_specialize=["M", "N", "NUM_PROGS", "stride_cm"])
def _int8_mm_tma(a_desc, b_desc, XS, WS, Bias, C, M, N, KP, stride_cm, NUM_PROGS,
                 HAS_BIAS: tl.constexpr, ACT: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                 BK: tl.constexpr, GROUP_M: tl.constexpr, FLATTEN: tl.constexpr, WARP_SPEC: tl.constexpr,
                 TMA_STORE: tl.constexpr, EPI_SPLIT: tl.constexpr):
    num_m = tl.cdiv(M, BM)
    num_n = tl.cdiv(N, BN)
    start = tl.program_id(0)
    # the tl.range options are passed only when asked for (older Tritons lack some of them)
    if WARP_SPEC:
        for tile in tl.range(start, num_m * num_n, NUM_PROGS, flatten=FLATTEN, warp_specialize=True):
            _tma_tile(tile, a_desc, b_desc, XS, WS, Bias, C, M, N, KP, stride_cm, num_m, num_n,
                      HAS_BIAS, ACT, BM, BN, BK, GROUP_M, TMA_STORE, EPI_SPLIT)
    elif FLATTEN:
        for tile in tl.range(start, num_m * num_n, NUM_PROGS, flatten=True):
            _tma_tile(tile, a_desc, b_desc, XS, WS, Bias, C, M, N, KP, stride_cm, num_m, num_n,
                      HAS_BIAS, ACT, BM, BN, BK, GROUP_M, TMA_STORE, EPI_SPLIT)
    else:
        for tile in range(start, num_m * num_n, NUM_PROGS):
            _tma_tile(tile, a_desc, b_desc, XS, WS, Bias, C, M, N, KP, stride_cm, num_m, num_n,
                      HAS_BIAS, ACT, BM, BN, BK, GROUP_M, TMA_STORE, EPI_SPLIT)


@triton.jit(do_not_specialize=["M", "N"])
def _int8_mm_ptr(A, B, XS, WS, Bias, C, M, N, KP, stride_am, stride_bn, stride_cm,
                 HAS_BIAS: tl.constexpr, ACT: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                 BK: tl.constexpr, GROUP_M: tl.constexpr):
    pid_m, pid_n = _tile(tl.program_id(0), tl.cdiv(M, BM), tl.cdiv(N, BN), GROUP_M)
    off_m = pid_m * BM
    off_n = pid_n * BN
    rm = (off_m + tl.arange(0, BM)) % M  # wrap inside the tensors: no masks in the loop
    rn = (off_n + tl.arange(0, BN)) % N
    rk = tl.arange(0, BK)
    a_ptrs = A + rm.to(tl.int64)[:, None] * stride_am + rk[None, :]
    b_ptrs = B + rn.to(tl.int64)[:, None] * stride_bn + rk[None, :]
    acc = tl.zeros((BM, BN), dtype=tl.int32)
    for _ in range(KP // BK):
        a = tl.load(a_ptrs)
        b = tl.load(b_ptrs)
        acc = tl.dot(a, b.T, acc, out_dtype=tl.int32)
        a_ptrs += BK
        b_ptrs += BK
    _epilogue(acc, off_m, off_n, XS, WS, Bias, C, M, N, stride_cm, HAS_BIAS, ACT, BM, BN)


# ----------------------------------------------------------------------------------------------
# Host side

def _has_tma(device):
    return device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 9


def pick_config(M, N, K, device):
    """Kernel and tiles for a shape. On Hopper (tools/int8_bench.py --sweep over the encoders'
    shapes) one config won everywhere: 128x128x128 tiles, one warpgroup, 3
    stages, two persistent programs per SM (while one drains its int32-accumulator wgmma, whose
    Triton lowering waits for every K step, the other's run), output through TMA in two 128x64
    slices (the plain tl.store epilogue from the MMA layout was the bottleneck at every shape)."""
    if device.type != "cuda":  # the interpreter: small tiles keep the CPU tests quick
        return Int8Config(kind="ptr", BM=16, BN=32, BK=32, GROUP_M=4, num_warps=4, num_stages=1)
    if _has_tma(device):
        return Int8Config(kind="tma", BM=128, BN=128, BK=128, GROUP_M=8, num_warps=4, num_stages=3,
                          ctas_per_sm=2, tma_store=True, epi_split=2)
    return Int8Config(kind="ptr", BM=128, BN=128, BK=128, GROUP_M=8, num_warps=8, num_stages=3)


def _padded_rows(xq, kp):
    """xq as a [M, >=kp]-strided tensor whose rows can be read whole up to kp (see module
    docstring); a zero-padded copy when the caller's tensor is not one."""
    M, K = xq.shape
    if xq.stride(1) == 1 and xq.stride(0) >= kp and xq.stride(0) % 16 == 0 and (
            M == 0 or xq.storage_offset() + (M - 1) * xq.stride(0) + kp <= xq.untyped_storage().nbytes()):
        return xq
    buf = torch.zeros(M, kp, dtype=torch.int8, device=xq.device)
    buf[:, :K] = xq
    return buf


def int8_linear(xq, xs, wq, ws, bias=None, out_dtype=torch.float16, act=None, config=None):
    """xq int8 [M, K] (best as returned by quantize_int8's functions), xs fp32 [M], wq the prepared
    weight int8 [N, Kp], ws fp32 [N], bias [N] (any float dtype) or None -> y [M, N] out_dtype.
    act: None or one of EPILOGUE_ACTS, applied in fp32 before the rounding to out_dtype."""
    assert xq.dtype == torch.int8 and xq.dim() == 2, (xq.dtype, xq.shape)
    M, K = xq.shape
    N, kp = wq.shape
    assert wq.dtype == torch.int8 and wq.is_contiguous() and kp == padded_k(K), (wq.shape, K)
    assert xs.shape == (M,) and xs.dtype == torch.float32 and xs.is_contiguous(), (xs.shape, xs.dtype)
    assert ws.shape == (N,) and ws.dtype == torch.float32 and ws.is_contiguous(), (ws.shape, ws.dtype)
    assert bias is None or (bias.shape == (N,) and bias.is_contiguous()), bias.shape
    assert act is None or act in EPILOGUE_ACTS, act
    y = torch.empty(M, N, dtype=out_dtype, device=xq.device)
    if M == 0 or N == 0:
        return y
    cfg = config or pick_config(M, N, K, xq.device)
    assert kp % cfg.BK == 0 and K_ALIGN % cfg.BK == 0, (kp, cfg)
    a = _padded_rows(xq, kp)
    common = dict(HAS_BIAS=bias is not None, ACT=-1 if act is None else EPILOGUE_ACTS.index(act),
                  BM=cfg.BM, BN=cfg.BN, BK=cfg.BK, GROUP_M=cfg.GROUP_M,
                  num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    b_arg = bias if bias is not None else ws
    if cfg.kind == "tma":
        from triton.tools.tensor_descriptor import TensorDescriptor

        a_desc = TensorDescriptor(a, [M, kp], [a.stride(0), 1], [cfg.BM, cfg.BK])
        b_desc = TensorDescriptor(wq, [N, kp], [kp, 1], [cfg.BN, cfg.BK])
        tiles = triton.cdiv(M, cfg.BM) * triton.cdiv(N, cfg.BN)
        progs = min(tiles, cfg.ctas_per_sm * sm_count(xq.device, cpu=4))
        tma_store = cfg.tma_store and (N * y.element_size()) % 16 == 0
        c = TensorDescriptor(y, [M, N], [N, 1], [cfg.BM, cfg.BN // cfg.epi_split]) if tma_store else y
        _int8_mm_tma[(progs,)](a_desc, b_desc, xs, ws, b_arg, c, M, N, kp, y.stride(0), progs,
                               FLATTEN=cfg.flatten, WARP_SPEC=cfg.warp_spec, TMA_STORE=tma_store,
                               EPI_SPLIT=cfg.epi_split, **common)
    else:
        grid = (triton.cdiv(M, cfg.BM) * triton.cdiv(N, cfg.BN),)
        _int8_mm_ptr[grid](a, wq, xs, ws, b_arg, y, M, N, kp, a.stride(0), kp, y.stride(0), **common)
    return y


def with_config(**kw):
    """Int8Config with fields replaced (for benchmarks and tests)."""
    return replace(Int8Config(), **kw)
