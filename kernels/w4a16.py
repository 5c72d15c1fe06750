"""W4A16 linear: 4-bit weights with group-wise asymmetric scales and zeros, fp16 / bf16 activations.

y[m, n] = sum_k x[m, k] * (q[k, n] - z[k // G, n]) * s[k // G, n]  (+ bias[n]),  x [M, K], y [M, N].

Layout made by `repack_awq` (once, at load) from the AutoAWQ "GEMM" tensors of quant/pack.py:
  qweight  int32 [K/8, N]: word (r, n) holds row slots 8r..8r+7 of column n, slot 8r + AWQ_ORDER[p] in
           nibble p (bits 4p..4p+3). Packed along K, not N as AWQ does: a row of words is contiguous
           along N, so loads are 16 bytes a thread and coalesced, and one word is 8 consecutive K of
           one column, so a thread's 8 nibbles are 8 consecutive rows of the GEMM's B tile. The
           nibble order is AWQ's interleave, (0, 2, 4, 6, 1, 3, 5, 7), along K: nibbles p and p + 4
           (bits 4p and 16 + 4p) are rows 2p and 2p + 1, so one mask-and-or makes them the fp16x2
           pair {1024 + q, 1024 + q'} of two consecutive rows, as tensor-core operands pair them.
           Fragment order (opt-in, FRAGMENT_ORDER; group sizes multiple of 32): within each block of 32
           rows the pairs are dealt out so that word 4b + c holds rows 32b + 2c + 8p (+ 1) in its
           pair p, not rows 32b + 8c + 2p: the pairs one thread of a tensor-core instruction takes
           (k = 2c, 2c + 8, 2c + 16, 2c + 24 for lane c of its quad), as Marlin arranges its
           weights. A thread's word then is its A fragment of the swapped GEMM as loaded (no trip
           through shared memory to change layout); the GEMV reads its activations in the same
           order, the other paths load x or store W through fragment_rows. Smaller groups keep K's
           own order.
  scales   [K/G, N] as the checkpoint stores them (fp16; casting them to bf16 would round them).
  zeros    uint8 [K/G, N], unpacked (3 bytes a group column with the scale, against 64 of weights
           at G=128).
  counters int32 [ceil(N/8)] and workspace fp32 [4, N], zero between calls: split-K state, so that
           split-K is one launch and a CUDA graph can replay it. The last program of an output tile
           (counted on its semaphore) finishes the tile and puts the counter back to 0. The GEMV adds
           its partial sums into the workspace with fp32 atomics (the last program reads and zeroes
           it: a one-load tail); the GEMM, with fewer splits, writes partials to a scratch buffer and
           the last program adds them in a fixed order.
No int -> float conversions. The fused GEMM on fp16 (inline PTX, on a GPU): per word, three shifts
and four LOP3 give four fp16x2 pairs 1024 + q, then (pair - (1024 + z)) * s in fp16x2 is exact up to
its one rounding, the one the fp32 form below has too: two weights per instruction. Elsewhere
(the interpreter, bf16 activations): f = bitcast((q << 19) | 0x3F800000) = 1 + q/16 exactly, so
  (q - z) * s = f * 16s - s*(16 + z)      (exact in fp32: one FMA; the GEMM and dequantize paths)
and the GEMV factors it per K tile (the tiles never straddle a group):
  sum_k (q - z) s x = 16s * sum_k f x - s*(16 + z) * sum_k x      (shift, LOP3, FMA a weight).
On fp16 activations (a GPU) the GEMV takes an fp16x2 step instead (_step_ptx): per word one shift
and four LOP3 give the pairs 1024 + q (or 1024 + 16 q) of rows 2p, 2p + 1, minus 1024 + z (or
1024 + 16 z) exactly, times the activation pair pre-scaled by 1/16 (or 1/256), summed four to an
fp16 lane, the lanes added in fp32 and 16 s applied once per column a step: ~3 SASS instructions
a weight against ~4 (relative error ~5e-4 against the fp16-rounded reference; the fp32 step ~1e-5).

Decode extras of the GEMV: it is launched as a programmatic dependent (kernels/pdl.py), loading its
first weights while the kernel before it still runs, and for the down projection it reads the
gate|up output itself and forms silu(gate) * up as it loads x (`swiglu=True`: no SiLU-mul kernel),
on the fp32 step; the fp16x2 step runs SiLU-mul first (each of its threads would redo the SiLU of
all its rows: slower than the extra kernel).

Paths (`w4a16_linear` picks by M alone, so a captured graph never branches on data):
  M <= GEMV_MAX_M       GEMV on CUDA cores: every weight read once for all M rows, split-K.
  M < CUBLAS_MIN_M      fused-dequant GEMM (tl.dot), split-K when the tiles do not fill the GPU; from
                        M = 17 with the operands swapped (y^T = W^T x^T, see _gemm_kernel).
  otherwise             dequantize into a scratch W [K, N] of the activation dtype, then cuBLAS.
Thresholds from python -m tinyvila.tools.kernel_bench (the 7B models' projections, fp16, G=128):
the GEMV wins up to M=2 and loses from M=3 (one FMA a weight a row on CUDA cores against a
tensor-core tile); the fused GEMM (a 128-row tile from M = 65) beats dequantize + cuBLAS at M=256
and loses at M=320 (the dequantization is paid once and cuBLAS's tiles win on a large M), so the
switch sits between them.
"""
import os
from typing import NamedTuple

import torch
import torch.nn.functional as F

from tinyvila.kernels.gpu import sm_count
from tinyvila.kernels.pdl import gdc_launch_dependents, gdc_wait, launch_options
from tinyvila.kernels.silu_mul import silu_mul
from tinyvila.kernels.triton_lang import tl, triton
from tinyvila.quant.pack import AWQ_ORDER, AWQ_REVERSE_ORDER

GEMV_MAX_M = 2
CUBLAS_MIN_M = 257
# GEMV by M (padded to 1, 2, 4): (num_warps, columns per thread, K rows a step, programs per SM,
# K steps loaded together). The fp32 step: one config for every shape ((4, 4, 64, 16) on the small
# 4096->4096 and 3584->4608 layers is faster alone but not in a whole LLaVA-NeXT-7B decode step).
# The PTX step at M = 1: two K steps of 32 rows at a time, 4 warps of 4 columns a thread, 4 programs
# an SM (119 registers); on the widest layers (LLaMA-7B's gate|up, 90M weights) three steps at a
# time, 2 warps, 6 programs an SM (155 registers). H100, summed over the seven 7B decode shapes:
# 85.9 against 90.2 us for the register double buffer of one step (24 configs in one process).
GEMV_CONFIG = {1: (2, 8, 32, 8, 1), 2: (4, 4, 32, 8, 1), 4: (4, 4, 16, 8, 1)}
GEMV_PTX_CONFIG = {1: (4, 4, 32, 4, 2), 2: (4, 4, 32, 8, 1), 4: (4, 4, 16, 8, 1)}
GEMV_PTX_WIDE_WEIGHTS, GEMV_PTX_WIDE_CONFIG = 80_000_000, (2, 4, 32, 6, 3)  # M = 1 from this many weights
# fused GEMM: (largest M, swapped operands, BLOCK_M, BLOCK_N, num_warps, num_stages, K rows a step,
# programs per SM). Picked on an H100 with the inline-PTX dequantization, by the summed time of the
# 7B projections (4096->12288, 4096->22016, 11008->4096, 4096->4096); the straight tile wins to
# M = 16, the swapped one above it; from M = 65 a 128-row tile (the activations a weight tile meets
# per dequantization doubled) beats two 64-row ones: 207 vs 245 us summed at M = 128. M = 17-32:
# 4 warps over 64 columns, 4 stages (H200: 95.7 vs 108.5 us summed at M = 32, 94.2 vs 104.1 at 24).
GEMM_CONFIG = [(16, False, 16, 64, 4, 3, 128, 2), (32, True, 32, 64, 4, 4, 128, 2),
               (64, True, 64, 128, 8, 3, 64, 1), (1 << 62, True, 128, 64, 4, 3, 128, 1)]
# In the fragment order the swapped tile wins from M = 1 (it builds its operand from the words as
# loaded; the straight one relabels x): H200, summed as above, M = 3-16 71.5-73.4 vs 80.3-83.2 us.
FRAGMENT_GEMM_CONFIG = [(16, True, 16, 64, 4, 3, 128, 2)] + GEMM_CONFIG[1:]
ONE_BITS = 0x3F800000  # 1.0f
# The fragment order of the packed rows: opt-in (TINYVILA_W4_FRAGMENT=1, read once, as the layout is
# fixed at load). Timed on an H200 it speeds the GEMM (M = 64: 135 vs 163 us summed over the 7B
# projections) but slows the M = 1 GEMV by 10-15%, so decode; the default is K's order.
FRAGMENT_ORDER = os.environ.get("TINYVILA_W4_FRAGMENT") == "1"


def _k_tile(group_size: int, cap: int) -> int:
    """Rows of K a kernel takes per step: a power of two dividing the group size (so a step never
    straddles two groups), at most `cap` (32 in the fragment order, which permutes rows within
    blocks of 32), at least 16 (tl.dot's minimum)."""
    kt = min(max(cap, 32) if fragment_order(group_size) else cap, group_size & -group_size)
    assert kt >= 16, f"group size {group_size} must be a multiple of 16"
    return kt


def fragment_order(group_size: int) -> bool:
    """Whether the packed rows are in the fragment order (module docstring): with FRAGMENT_ORDER on,
    at every group size that is a multiple of 32 (all published AWQ checkpoints); smaller groups
    keep K's own order."""
    return FRAGMENT_ORDER and group_size % 32 == 0


def fragment_rows(k: int, device=None) -> torch.Tensor:
    """The K row each packed row slot t < k holds in the fragment order: in each 32 rows, slot
    t = 32b + 8c + 2p + e holds row 32b + 8p + 2c + e. Its own inverse."""
    t = torch.arange(k, device=device)
    return t + 6 * ((t // 2) % 4) - 6 * ((t // 8) % 4)


# ----------------------------------------------------------------------------------------------
# Layout: repack and the reference


def _unpack_awq(packed: torch.Tensor) -> torch.Tensor:
    """int32 [R, C/8] in AWQ nibble order -> uint8 [R, C] with the columns in natural order."""
    R, C8 = packed.shape
    out = torch.empty(R, C8, 8, dtype=torch.uint8, device=packed.device)
    for nibble, col in enumerate(AWQ_ORDER):
        out[:, :, col] = ((packed >> (4 * nibble)) & 0xF).to(torch.uint8)
    return out.view(R, C8 * 8)


def repack_awq(qweight, qzeros, scales, dtype):
    """AutoAWQ GEMM tensors (qweight int32 [K, N/8], qzeros int32 [K/G, N/8], scales [K/G, N]) ->
    this module's layout (module docstring), on the input's device. `dtype` is the activation dtype
    the layer runs in (float16 / bfloat16 / float32); the kernels convert the scales themselves, so
    it is only checked."""
    assert dtype in (torch.float16, torch.bfloat16, torch.float32), dtype
    assert qweight.dtype == torch.int32 and qzeros.dtype == torch.int32, (qweight.dtype, qzeros.dtype)
    K, N8 = qweight.shape
    N = N8 * 8
    assert scales.shape[1] == N and qzeros.shape == (scales.shape[0], N8), (qweight.shape, qzeros.shape, scales.shape)
    assert K % scales.shape[0] == 0 and K % 8 == 0, (K, scales.shape)
    _k_tile(K // scales.shape[0], 64)  # the group size must suit the kernels
    q = _unpack_awq(qweight)
    if fragment_order(K // scales.shape[0]):
        q = q[fragment_rows(K, q.device)]
    q = q.view(K // 8, 8, N)  # [r, i, n]: row slot 8r + i
    words = torch.zeros(K // 8, N, dtype=torch.int64, device=qweight.device)
    for nibble, row in enumerate(AWQ_ORDER):
        words |= q[:, row].to(torch.int64) << (4 * nibble)
    words = (words - (words >= 2**31).to(torch.int64) * 2**32).to(torch.int32)
    return {
        "qweight": words,
        "scales": scales.contiguous(),
        "zeros": _unpack_awq(qzeros).contiguous(),
        "counters": torch.zeros(triton.cdiv(N, 8), dtype=torch.int32, device=qweight.device),
        "workspace": torch.zeros(4, N, dtype=torch.float32, device=qweight.device),
    }


def dequantize_w4(packed, group_size):
    """The fp32 weight W [N, K] the packed tensors stand for (plain PyTorch, any device)."""
    qw = packed["qweight"]
    K8, N = qw.shape
    shifts = torch.arange(0, 32, 4, device=qw.device, dtype=torch.int32)
    nibbles = (qw[:, None, :] >> shifts[None, :, None]) & 0xF  # [r, p, n]: nibble p of word (r, n)
    q = nibbles[:, AWQ_REVERSE_ORDER].reshape(8 * K8, N)  # slot 8r + i sits in nibble REVERSE[i]
    if fragment_order(group_size):
        q = q[fragment_rows(8 * K8, qw.device)]  # slots -> rows
    q = q.float()
    z = packed["zeros"].float().repeat_interleave(group_size, 0)
    s = packed["scales"].float().repeat_interleave(group_size, 0)
    assert z.shape == q.shape, f"group size {group_size} does not match the packed shapes"
    return ((q - z) * s).t().contiguous()


def w4a16_linear_ref(x, packed, group_size, bias=None):
    """Plain PyTorch reference: dequantize, then an fp32 linear, cast to x.dtype."""
    w = dequantize_w4(packed, group_size).to(x.device)
    y = F.linear(x.float(), w, None if bias is None else bias.float())
    return y.to(x.dtype)


# ----------------------------------------------------------------------------------------------
# Triton kernels


@triton.jit
def _row(j: tl.constexpr):
    """The row offset (in the word's 8 rows) of nibble j: AWQ_ORDER[j]."""
    return (j % 4) * 2 + j // 4


@triton.jit
def _plane(words, j: tl.constexpr, one):
    """Nibble j of each int32 word as the fp32 1 + q/16: the nibble moved into the top mantissa bits
    of `one` (0x3F800000, the bits of 1.0f, passed as an argument so that it sits in a register and
    the mask-and-or is a single LOP3)."""
    if 4 * j <= 19:
        b = (words << (19 - 4 * j)) & 0x780000
    else:
        b = (words >> (4 * j - 19)) & 0x780000
    return (b | one).to(tl.float32, bitcast=True)


@triton.jit
def _group_scales(S, Z, g, N, cols, cmask):
    """16 s and s (16 + z) of group g for the columns `cols` (the two terms of the dequantization)."""
    s = tl.load(S + tl.cast(g, tl.int64) * N + cols, mask=cmask, other=0.0).to(tl.float32)
    z = tl.load(Z + tl.cast(g, tl.int64) * N + cols, mask=cmask, other=0).to(tl.float32)
    return s * 16.0, s * (16.0 + z)


@triton.jit
def _finish(acc, rows, cols, M, N, Y, Bias, HAS_BIAS: tl.constexpr):
    mask = (rows < M)[:, None] & (cols < N)[None, :]
    if HAS_BIAS:
        acc += tl.load(Bias + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
    tl.store(Y + rows[:, None].to(tl.int64) * N + cols[None, :], acc.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _store_or_reduce(acc, rows, cols, M, N, Y, Bias, Part, Counters, tile, split, splits,
                     SPLIT_K: tl.constexpr, HAS_BIAS: tl.constexpr):
    """Write the output tile, or with split-K publish this program's partial sum; the last program
    of the tile (counted on a semaphore) adds the partials in a fixed order and writes the output."""
    if not SPLIT_K:
        _finish(acc, rows, cols, M, N, Y, Bias, HAS_BIAS)
    else:
        mask = (rows < M)[:, None] & (cols < N)[None, :]
        offs = rows[:, None].to(tl.int64) * N + cols[None, :]
        mn = tl.cast(M, tl.int64) * N
        tl.store(Part + split * mn + offs, acc, mask=mask)
        tl.debug_barrier()  # every thread's partial is written before the (release) atomic
        done = tl.atomic_add(Counters + tile, 1)  # acq_rel, gpu scope
        if done == splits - 1:
            total = tl.zeros_like(acc)
            for s in range(splits):
                total += tl.load(Part + s * mn + offs, mask=mask, other=0.0, cache_modifier=".cg")
            _finish(total, rows, cols, M, N, Y, Bias, HAS_BIAS)
            tl.atomic_xchg(Counters + tile, 0)  # ready for the next call (or graph replay)


@triton.jit
def _gemv_row(f, d, xs, Xt, row, M, k, K, MASKED: tl.constexpr, SWIGLU: tl.constexpr):
    """One activation row against nibble plane f [KT8, BLOCK_N] (1 + q/16 of the K rows k of slots
    8r + _row(j) of the step at Xt): d += f x (FMAs; reduced over K once a step), xs += x (for the zero-point term).
    SWIGLU: the row is a gate|up pair [2K] and x = silu(gate) * up, rounded as kernels/silu_mul.py
    rounds it (the down projection reads the gate/up output directly)."""
    if MASKED:
        mask = (k * 0 + row) < M
        x = tl.load(Xt + k, mask=mask, other=0.0)  # [KT8]
        u = tl.load(Xt + K + k, mask=mask, other=0.0) if SWIGLU else x
    else:
        x = tl.load(Xt + k)
        u = tl.load(Xt + K + k) if SWIGLU else x
    if SWIGLU:
        g = x.to(tl.float32)
        x = (g / (1.0 + tl.exp(-g))).to(u.dtype) * u
    x = x.to(tl.float32)
    return d + f * x[:, None], xs + x


@triton.jit
def _qz_pairs(words, z2a, z2b):
    """Each word's 8 weights as four fp16x2 pairs (inline PTX, one shift and four LOP3): nibbles p and
    p + 4 are rows 2p and 2p + 1, masked in place into 0x6400 (1024.0, whose last place is 1), which
    makes 1024 + q for nibbles 0/4 and 2/6 and 1024 + 16 q for 1/5 and 3/7; minus the pair 1024 + z
    (z2a) or 1024 + 16 z (z2b), exactly: q - z of rows (0, 1) and (4, 5), 16 (q - z) of (2, 3) and
    (6, 7)."""
    return tl.inline_asm_elementwise(
        """{
        .reg .b32 t;
        shr.b32 t, $4, 8;
        lop3.b32 $0, $4, 0x000f000f, 0x64006400, 0xea;
        lop3.b32 $1, $4, 0x00f000f0, 0x64006400, 0xea;
        lop3.b32 $2, t, 0x000f000f, 0x64006400, 0xea;
        lop3.b32 $3, t, 0x00f000f0, 0x64006400, 0xea;
        sub.f16x2 $0, $0, $5;
        sub.f16x2 $1, $1, $6;
        sub.f16x2 $2, $2, $5;
        sub.f16x2 $3, $3, $6;
        }""",
        "=r,=r,=r,=r,r,r,r", [words, z2a, z2b], dtype=(tl.int32,) * 4, is_pure=True, pack=1)


@triton.jit
def _dot_pairs(a0, a1, a2, a3, x0, x1, x2, x3):
    """sum over a word's 8 rows of weight pair times activation pair: fp16x2 products summed in fp16
    (each lane 4 terms of at most 15/16 |x|, the activations pre-scaled by 1/16: finite for any
    |x| under 17000), the two lanes added in fp32."""
    return tl.inline_asm_elementwise(
        """{
        .reg .b32 h;
        .reg .f16 lo, hi;
        .reg .f32 fl, fh;
        mul.rn.f16x2 h, $1, $5;
        fma.rn.f16x2 h, $2, $6, h;
        fma.rn.f16x2 h, $3, $7, h;
        fma.rn.f16x2 h, $4, $8, h;
        mov.b32 {lo, hi}, h;
        cvt.f32.f16 fl, lo;
        cvt.f32.f16 fh, hi;
        add.f32 $0, fl, fh;
        }""",
        "=f,r,r,r,r,r,r,r,r", [a0, a1, a2, a3, x0, x1, x2, x3], dtype=tl.float32, is_pure=True, pack=1)


@triton.jit
def _scaled_pair(Xt, r, p: tl.constexpr, mask, MASKED: tl.constexpr, ORDER: tl.constexpr):
    """x at the rows of pair p of word row r of the step (8r + 2p and 8r + 2p + 1, or in the fragment order
    32(r // 4) + 2(r % 4) + 8p and the next), loaded as one fp16x2 word, times 1/16 (p = 0, 2)
    or 1/256 (p = 1, 3), the planes' factors of _qz_pairs (powers of two: exact)."""
    X32 = Xt.to(tl.pointer_type(tl.int32))
    i = r + 12 * (r // 4) + 4 * p if ORDER else 4 * r + p  # the pair's K rows / 2
    bits = tl.load(X32 + i, mask=mask, other=0) if MASKED else tl.load(X32 + i)
    c = tl.full(bits.shape, 0x2C002C00 if p % 2 == 0 else 0x1C001C00, tl.int32)  # 1/16, 1/256 as fp16x2
    return tl.inline_asm_elementwise("mul.rn.f16x2 $0, $1, $2;", "=r,r,r", [bits, c], dtype=tl.int32,
                                     is_pure=True, pack=1)


@triton.jit
def _ptx_row(a0, a1, a2, a3, Xt, row, M, r, MASKED: tl.constexpr, ORDER: tl.constexpr):
    """One activation row against the step's weight pairs: sum over K of (q - z) x / 16, [BLOCK_N]."""
    mask = (r * 0 + row) < M
    x0 = _scaled_pair(Xt, r, 0, mask, MASKED, ORDER)[:, None]
    x1 = _scaled_pair(Xt, r, 1, mask, MASKED, ORDER)[:, None]
    x2 = _scaled_pair(Xt, r, 2, mask, MASKED, ORDER)[:, None]
    x3 = _scaled_pair(Xt, r, 3, mask, MASKED, ORDER)[:, None]
    return tl.sum(_dot_pairs(a0, a1, a2, a3, x0, x1, x2, x3), axis=0)


@triton.jit
def _step_fp32(words, s, z, Xt, stride_xm, r, M, K, one, acc0, acc1, acc2, acc3,
               KT8: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, SWIGLU: tl.constexpr,
               ORDER: tl.constexpr):
    """One K step of the GEMV in fp32 (any activation dtype, the interpreter): per nibble plane a
    shift, a LOP3 and an FMA a weight, the zero point through the sum of x (module docstring)."""
    d0 = tl.zeros([KT8, BLOCK_N], tl.float32)
    d1 = tl.zeros([KT8, BLOCK_N], tl.float32)
    d2 = tl.zeros([KT8, BLOCK_N], tl.float32)
    d3 = tl.zeros([KT8, BLOCK_N], tl.float32)
    x0 = tl.zeros([KT8], tl.float32)
    x1 = tl.zeros([KT8], tl.float32)
    x2 = tl.zeros([KT8], tl.float32)
    x3 = tl.zeros([KT8], tl.float32)
    for j in tl.static_range(8):
        f = _plane(words, j, one)
        k = _k_of(8 * r + _row(j), ORDER)
        d0, x0 = _gemv_row(f, d0, x0, Xt, 0, M, k, K, False, SWIGLU)  # M >= 1: row 0 always exists
        if BLOCK_M > 1:
            d1, x1 = _gemv_row(f, d1, x1, Xt + stride_xm, 1, M, k, K, True, SWIGLU)
        if BLOCK_M > 2:
            d2, x2 = _gemv_row(f, d2, x2, Xt + 2 * stride_xm, 2, M, k, K, True, SWIGLU)
            d3, x3 = _gemv_row(f, d3, x3, Xt + 3 * stride_xm, 3, M, k, K, True, SWIGLU)
    sf = s.to(tl.float32)
    s16 = sf * 16.0
    c = sf * (16.0 + z.to(tl.float32))
    acc0 += s16 * tl.sum(d0, axis=0) - c * tl.sum(x0, axis=0)
    if BLOCK_M > 1:
        acc1 += s16 * tl.sum(d1, axis=0) - c * tl.sum(x1, axis=0)
    if BLOCK_M > 2:
        acc2 += s16 * tl.sum(d2, axis=0) - c * tl.sum(x2, axis=0)
        acc3 += s16 * tl.sum(d3, axis=0) - c * tl.sum(x3, axis=0)
    return acc0, acc1, acc2, acc3


@triton.jit
def _step_ptx(words, s, z, Xt, stride_xm, r, M, acc0, acc1, acc2, acc3, BLOCK_M: tl.constexpr,
              ORDER: tl.constexpr):
    """One K step of the GEMV in fp16x2 inline PTX (fp16 on an NVIDIA GPU; no SwiGLU input): per word
    one shift, four LOP3, four subtractions and four FMAs for its 8 weights, about 70% of the fp32
    step's instructions (SASS); the group's scale applied once per column in fp32."""
    zi = z.to(tl.int32)[None, :]
    a0, a1, a2, a3 = _qz_pairs(words, (0x6400 + zi) * 0x10001, (0x6400 + 16 * zi) * 0x10001)
    s16 = s.to(tl.float32) * 16.0
    acc0 += s16 * _ptx_row(a0, a1, a2, a3, Xt, 0, M, r, False, ORDER)
    if BLOCK_M > 1:
        acc1 += s16 * _ptx_row(a0, a1, a2, a3, Xt + stride_xm, 1, M, r, True, ORDER)
    if BLOCK_M > 2:
        acc2 += s16 * _ptx_row(a0, a1, a2, a3, Xt + 2 * stride_xm, 2, M, r, True, ORDER)
        acc3 += s16 * _ptx_row(a0, a1, a2, a3, Xt + 3 * stride_xm, 3, M, r, True, ORDER)
    return acc0, acc1, acc2, acc3


@triton.jit
def _gemv_load(Q, S, Z, t, t1, N, w_offs, cols, cmask, KT8: tl.constexpr, GROUP: tl.constexpr):
    """K step t's words, scales and zeros; past the program's last step (t1) nothing is read and
    the scale is 0, so that the step adds nothing."""
    mask = cmask & ((cols * 0 + t) < t1)
    words = tl.load(Q + tl.cast(t * KT8, tl.int64) * N + w_offs, mask=mask[None, :], other=0)
    gs = tl.cast((t * 8 * KT8) // GROUP, tl.int64) * N + cols
    s = tl.load(S + gs, mask=mask, other=0.0)
    z = tl.load(Z + gs, mask=mask, other=0)
    return words, s, z


@triton.jit
def _gemv_loads(Q, S, Z, t, t1, N, w_offs, cols, cmask, KT8: tl.constexpr, GROUP: tl.constexpr,
                UNROLL: tl.constexpr):
    """Steps t .. t + UNROLL - 1 (_gemv_load each); the slots of steps past UNROLL repeat step t's
    (never used, nothing loaded for them)."""
    w0, s0, z0 = _gemv_load(Q, S, Z, t, t1, N, w_offs, cols, cmask, KT8, GROUP)
    w1, s1, z1 = w0, s0, z0
    w2, s2, z2 = w0, s0, z0
    if UNROLL > 1:
        w1, s1, z1 = _gemv_load(Q, S, Z, t + 1, t1, N, w_offs, cols, cmask, KT8, GROUP)
    if UNROLL > 2:
        w2, s2, z2 = _gemv_load(Q, S, Z, t + 2, t1, N, w_offs, cols, cmask, KT8, GROUP)
    return w0, s0, z0, w1, s1, z1, w2, s2, z2


@triton.jit
def _gemv_step(words, s, z, X, t, t1, stride_xm, r, M, K, one, acc0, acc1, acc2, acc3, KT8: tl.constexpr,
               BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, SWIGLU: tl.constexpr, PTX: tl.constexpr,
               ORDER: tl.constexpr):
    Xt = X + tl.minimum(t, t1 - 1) * (8 * KT8)  # a step past t1 has scale 0 but reads real rows of x
    if PTX:
        return _step_ptx(words, s, z, Xt, stride_xm, r, M, acc0, acc1, acc2, acc3, BLOCK_M, ORDER)
    return _step_fp32(words, s, z, Xt, stride_xm, r, M, K, one, acc0, acc1, acc2, acc3, KT8, BLOCK_N, BLOCK_M,
                      SWIGLU, ORDER)


@triton.jit
def _gemv_kernel(X, Q, S, Z, Bias, Y, Acc, Counters, M, N8, K, stride_xm, splits, tiles_per_split, one,
                 KT8: tl.constexpr, GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 SPLIT_K: tl.constexpr, HAS_BIAS: tl.constexpr, SWIGLU: tl.constexpr, PDL: tl.constexpr,
                 PTX: tl.constexpr, ORDER: tl.constexpr, UNROLL: tl.constexpr, SUMS: tl.constexpr):
    """One program: BLOCK_N columns x one K range, all M (<= BLOCK_M <= 4) rows; CUDA-core FMAs.
    Everything stays in the layout of the weight load (each thread: all KT8 word rows of a few
    adjacent columns), so K reductions are in-thread; one accumulator per activation row. The K
    loop goes UNROLL steps at a time, their words all loaded before the arithmetic of the first: a
    register double buffer (loading the next iteration's words at the top of this one) does not
    work, as ptxas sinks a load whose use lies in the next iteration to the end of the body, after
    the arithmetic it was to overlap. Split-K: fp32 atomic adds into the layer's zeroed workspace;
    the last program of a column block (its semaphore) reads the sums, writes y and zeroes the
    workspace again. SUMS: the kernel ends at its adds (or, unsplit, stores its fp32 sums there),
    for a reader that takes them from the workspace and zeroes it (Sums): no semaphore round trips
    at the kernel's end, where they cost 0.7-2.0 us a call (H100).
    PDL (programmatic dependent launch): the programs start while the kernel before is still
    running and load their first weights (which no kernel writes), then wait for it before reading x
    or touching y, the workspace or the semaphores."""
    KT: tl.constexpr = 8 * KT8
    if PDL:
        gdc_launch_dependents()
    N = N8 * 8  # N is passed as N / 8 so that row starts are known to be 16-byte aligned
    pid_n = tl.program_id(0)
    split = tl.program_id(1)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cmask = cols < N  # masked lanes load nothing: those columns are never stored
    r = tl.arange(0, KT8)
    t0 = split * tiles_per_split
    t1 = tl.minimum(t0 + tiles_per_split, K // KT)  # t0 < t1: the host makes every split non-empty
    w_offs = r[:, None] * N + cols[None, :]  # [KT8, BLOCK_N]
    w0, s0, z0, w1, s1, z1, w2, s2, z2 = _gemv_loads(Q, S, Z, t0, t1, N, w_offs, cols, cmask, KT8, GROUP, UNROLL)
    acc0 = tl.zeros([BLOCK_N], tl.float32)
    acc1 = tl.zeros([BLOCK_N], tl.float32)
    acc2 = tl.zeros([BLOCK_N], tl.float32)
    acc3 = tl.zeros([BLOCK_N], tl.float32)
    if PDL:
        gdc_wait()
    for t in range(t0, t1, UNROLL):
        if t != t0:  # this iteration's UNROLL steps (none past t1), all before the arithmetic
            w0, s0, z0, w1, s1, z1, w2, s2, z2 = _gemv_loads(Q, S, Z, t, t1, N, w_offs, cols, cmask, KT8, GROUP,
                                                             UNROLL)
        acc0, acc1, acc2, acc3 = _gemv_step(w0, s0, z0, X, t, t1, stride_xm, r, M, K, one, acc0, acc1, acc2, acc3,
                                            KT8, BLOCK_N, BLOCK_M, SWIGLU, PTX, ORDER)
        if UNROLL > 1:
            acc0, acc1, acc2, acc3 = _gemv_step(w1, s1, z1, X, t + 1, t1, stride_xm, r, M, K, one, acc0, acc1,
                                                acc2, acc3, KT8, BLOCK_N, BLOCK_M, SWIGLU, PTX, ORDER)
        if UNROLL > 2:
            acc0, acc1, acc2, acc3 = _gemv_step(w2, s2, z2, X, t + 2, t1, stride_xm, r, M, K, one, acc0, acc1,
                                                acc2, acc3, KT8, BLOCK_N, BLOCK_M, SWIGLU, PTX, ORDER)
    rows = tl.arange(0, BLOCK_M)
    acc = tl.where(rows[:, None] == 0, acc0[None, :], 0.0)
    if BLOCK_M > 1:
        acc = tl.where(rows[:, None] == 1, acc1[None, :], acc)
    if BLOCK_M > 2:
        acc = tl.where(rows[:, None] == 2, acc2[None, :], acc)
        acc = tl.where(rows[:, None] == 3, acc3[None, :], acc)
    mask = (rows < M)[:, None] & (cols < N)[None, :]
    offs = rows[:, None] * N + cols[None, :]
    if SPLIT_K:
        tl.atomic_add(Acc + offs, acc, mask=mask, sem="relaxed")
        if not SUMS:  # SUMS: the kernel ends here; the one reader of the sums zeroes them
            tl.debug_barrier()  # every thread's adds are issued before the (release) semaphore
            done = tl.atomic_add(Counters + pid_n, 1)  # acq_rel, gpu scope
            if done == splits - 1:
                # Read and zero in one atomic (a load then a store may fall to different threads of
                # the program), on the int32 bits: the interpreter exchanges integers only.
                zero = tl.zeros_like(rows[:, None] + cols[None, :])
                bits = tl.atomic_xchg(Acc.to(tl.pointer_type(tl.int32)) + offs, zero, mask=mask, sem="relaxed")
                _finish(bits.to(tl.float32, bitcast=True), rows, cols, M, N, Y, Bias, HAS_BIAS)
                tl.atomic_xchg(Counters + pid_n, 0)  # ready for the next call (or graph replay)
    elif SUMS:
        tl.store(Acc + offs, acc, mask=mask)
    else:
        _finish(acc, rows, cols, M, N, Y, Bias, HAS_BIAS)


@triton.jit
def _dequant_tile(words, s16, c, dtype, KT: tl.constexpr, BLOCK_N: tl.constexpr):
    """[KT/8, BLOCK_N] words -> the [KT, BLOCK_N] weight tile in `dtype` (p_i: row 8r + i, from
    nibble AWQ_REVERSE_ORDER[i]). 1.0f is a literal here: measured faster in this kernel than the
    register form the GEMV uses."""
    ONE: tl.constexpr = 0x3F800000
    p0 = (_plane(words, 0, ONE) * s16 - c).to(dtype)
    p1 = (_plane(words, 4, ONE) * s16 - c).to(dtype)
    p2 = (_plane(words, 1, ONE) * s16 - c).to(dtype)
    p3 = (_plane(words, 5, ONE) * s16 - c).to(dtype)
    p4 = (_plane(words, 2, ONE) * s16 - c).to(dtype)
    p5 = (_plane(words, 6, ONE) * s16 - c).to(dtype)
    p6 = (_plane(words, 3, ONE) * s16 - c).to(dtype)
    p7 = (_plane(words, 7, ONE) * s16 - c).to(dtype)
    return _rows_to_tile(p0, p1, p2, p3, p4, p5, p6, p7, KT, BLOCK_N)


@triton.jit
def _join_planes(p0, p1, p2, p3, p4, p5, p6, p7):
    """The eight planes (p_j: slot j of each word) joined as three minor dimensions: w[..., a, b, e]
    is plane a*4 + b*2 + e (the last join index is the lowest bit of j); a register relabelling."""
    return tl.join(tl.join(tl.join(p0, p4), tl.join(p2, p6)), tl.join(tl.join(p1, p5), tl.join(p3, p7)))


@triton.jit
def _rows_to_tile(p0, p1, p2, p3, p4, p5, p6, p7, KT: tl.constexpr, BLOCK_N: tl.constexpr):
    """Eight [KT/8, BLOCK_N] planes (p_i: row slots 8r + i) -> the [KT, BLOCK_N] tile: joined as a minor
    dimension, so row 8r + i is register i of the thread holding word r (no data moves)."""
    w = _join_planes(p0, p1, p2, p3, p4, p5, p6, p7)  # [r, n, a, b, e]
    w = tl.permute(w, 0, 2, 3, 4, 1)  # [r, a, b, e, n]: row ((r*2 + a)*2 + b)*2 + e = 8r + j
    return tl.reshape(w, [KT, BLOCK_N])


@triton.jit
def _cols_to_tile(p0, p1, p2, p3, p4, p5, p6, p7, KT: tl.constexpr, BLOCK_N: tl.constexpr):
    """Planes [BLOCK_N, KT/8] of the words' transpose -> the tile's transpose [BLOCK_N, KT] in K
    order: word 4b + c, pair p, half e is K row 32b + 8p + 2c + e (the fragment order), so each
    thread's word already holds its tensor-core A fragment and no layout conversion is needed."""
    w = _join_planes(p0, p1, p2, p3, p4, p5, p6, p7)
    return _swap_slots(tl.reshape(w, [BLOCK_N, KT]), BLOCK_N, KT)  # columns: slots 8r + j, then K rows


@triton.jit
def _swap_slots(a, ROWS: tl.constexpr, KT: tl.constexpr):
    """a [ROWS, KT] with its columns moved between the packed row slots' order and K's (the
    fragment order, its own inverse): in each 32, columns 8p + 2c + e and 8c + 2p + e trade places.
    A relabelling of registers, which the compiler folds into the loads."""
    return tl.reshape(tl.permute(tl.reshape(a, [ROWS, KT // 32, 4, 4, 2]), 0, 1, 3, 2, 4), [ROWS, KT])


@triton.jit
def _k_of(t, ORDER: tl.constexpr):
    """The K row of packed row slot t (from the step's start): fragment_rows in the fragment order
    (written with + and // so that Triton sees runs of 2 consecutive rows), else t."""
    if ORDER:
        t = t + 6 * ((t // 2) % 4) - 6 * ((t // 8) % 4)
    return t


@triton.jit
def _planes_ptx(words, s2, z2):
    """The fp16 tile of _dequant_tile in inline PTX, two weights an instruction. Per word: nibbles p
    and p + 4 are rows 2p and 2p + 1, so (w >> 4p) & 0x000F000F | 0x64006400 is the fp16x2 pair
    {1024 + q, 1024 + q'} (0x6400 is 1024.0, whose last place is 1); minus the pair 1024 + z
    (exact) and times s (rounded once, as the fp32 form is when cast). s2, z2: s and 1024 + z as
    fp16x2 bits (_pair_scales). Each output register is already the pair of consecutive rows a
    tensor-core operand takes."""
    p0, p1, p2, p3, p4, p5, p6, p7 = tl.inline_asm_elementwise(
        """{
        .reg .b32 t1, t2, t3, a0, a1, a2, a3;
        shr.b32 t1, $8, 4;
        shr.b32 t2, $8, 8;
        shr.b32 t3, $8, 12;
        lop3.b32 a0, $8, 0x000f000f, 0x64006400, 0xea;
        lop3.b32 a1, t1, 0x000f000f, 0x64006400, 0xea;
        lop3.b32 a2, t2, 0x000f000f, 0x64006400, 0xea;
        lop3.b32 a3, t3, 0x000f000f, 0x64006400, 0xea;
        sub.f16x2 a0, a0, $10;
        sub.f16x2 a1, a1, $10;
        sub.f16x2 a2, a2, $10;
        sub.f16x2 a3, a3, $10;
        mul.f16x2 a0, a0, $9;
        mul.f16x2 a1, a1, $9;
        mul.f16x2 a2, a2, $9;
        mul.f16x2 a3, a3, $9;
        mov.b32 {$0, $1}, a0;
        mov.b32 {$2, $3}, a1;
        mov.b32 {$4, $5}, a2;
        mov.b32 {$6, $7}, a3;
        }""",
        "=h,=h,=h,=h,=h,=h,=h,=h,r,r,r", [words, s2, z2], dtype=(tl.float16,) * 8, is_pure=True, pack=1)
    return p0, p1, p2, p3, p4, p5, p6, p7


@triton.jit
def _dequant_tile_ptx(words, s2, z2, KT: tl.constexpr, BLOCK_N: tl.constexpr):
    p0, p1, p2, p3, p4, p5, p6, p7 = _planes_ptx(words, s2, z2)
    return _rows_to_tile(p0, p1, p2, p3, p4, p5, p6, p7, KT, BLOCK_N)


@triton.jit
def _dequant_cols_ptx(words, s2, z2, KT: tl.constexpr, BLOCK_N: tl.constexpr):
    p0, p1, p2, p3, p4, p5, p6, p7 = _planes_ptx(words, s2, z2)
    return _cols_to_tile(p0, p1, p2, p3, p4, p5, p6, p7, KT, BLOCK_N)


@triton.jit
def _pair_scales(S, Z, g, N, cols, cmask):
    """s and 1024 + z of group g for the columns `cols`, each as the bits of an fp16x2 pair."""
    s = tl.load(S + tl.cast(g, tl.int64) * N + cols, mask=cmask, other=0.0)
    z = tl.load(Z + tl.cast(g, tl.int64) * N + cols, mask=cmask, other=0).to(tl.int32)
    bits = s.to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
    return bits * 0x10001, (0x6400 + z) * 0x10001


@triton.jit
def _weight_tile(words, S, Z, g, N, cols, cmask, dtype, KT: tl.constexpr, BLOCK_N: tl.constexpr, PTX: tl.constexpr):
    """Group g's [KT, BLOCK_N] weight tile from its words, in `dtype` (PTX: fp16, inline PTX)."""
    if PTX:
        s2, z2 = _pair_scales(S, Z, g, N, cols, cmask)
        w = _dequant_tile_ptx(words, s2[None, :], z2[None, :], KT, BLOCK_N)
    else:
        s16, c = _group_scales(S, Z, g, N, cols, cmask)
        w = _dequant_tile(words, s16[None, :], c[None, :], dtype, KT, BLOCK_N)
    return w


@triton.jit
def _gemm_kernel(X, Q, S, Z, Bias, Y, Part, Counters, M, N8, K, stride_xm, splits, tiles_per_split,
                 KT8: tl.constexpr, GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 GROUP_M: tl.constexpr, SWAPPED: tl.constexpr, SPLIT_K: tl.constexpr, HAS_BIAS: tl.constexpr,
                 PRECISION: tl.constexpr, PTX: tl.constexpr, ORDER: tl.constexpr):
    """Fused-dequant GEMM: a [BLOCK_M, BLOCK_N] output tile, K step by step (one group each).
    SWAPPED: the tile is computed transposed, y^T [BLOCK_N, BLOCK_M] = W^T x^T, so the dequantized
    weights are the tensor-core product's A operand, whose long side (64 rows a warpgroup on
    Hopper) BLOCK_N weight columns fill, and the activation rows are its short side. From M = 17
    this beats the straight tile, whose 64- and 128-row tiles spill registers. The grid is then
    (M tiles, N tiles, splits): programs next to each other in launch order share a weight tile,
    which comes from L2 after the first; the straight grid is (tiles, splits) in grouped order."""
    KT: tl.constexpr = 8 * KT8
    N = N8 * 8
    grid_m = tl.cdiv(M, BLOCK_M)
    grid_n = tl.cdiv(N, BLOCK_N)
    if SWAPPED:
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        split = tl.program_id(2)
    else:
        pid = tl.program_id(0)
        split = tl.program_id(1)
        width = GROUP_M * grid_n  # grouped order: programs running together share weight tiles in L2
        first_m = (pid // width) * GROUP_M
        size_m = tl.minimum(grid_m - first_m, GROUP_M)
        pid_m = first_m + (pid % width) % size_m
        pid_n = (pid % width) // size_m
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < M
    cmask = cols < N
    k = tl.arange(0, KT)
    r = tl.arange(0, KT8)
    t0 = split * tiles_per_split
    t1 = tl.minimum(t0 + tiles_per_split, K // KT)
    # Every split is non-empty (the host sees to it). Said here, the loop has no zero-trip path that
    # sets the accumulator outside the wgmma pipeline: with one, ptxas serializes every wgmma of the
    # swapped tiles (a full wait after each; sm_90 SASS of Triton 3.6 and 3.9).
    tl.assume(t1 > t0)
    w_offs = r[:, None] * N + cols[None, :]
    if SWAPPED:
        wt_offs = cols[:, None] + r[None, :] * N  # the words' transpose [BLOCK_N, KT/8]
        kx = k if PTX and ORDER else _k_of(k, ORDER)  # a tile in slot order meets x in slot order
        x_ptrs = X + rows[None, :].to(tl.int64) * stride_xm + kx[:, None]  # x^T [KT, BLOCK_M]
        acc = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)
    else:
        x_ptrs = X + rows[:, None].to(tl.int64) * stride_xm + k[None, :]
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for t in range(t0, t1):
        if SWAPPED and PTX and ORDER:  # the transposed tile [BLOCK_N, KT], the A operand as loaded
            words = tl.load(Q + tl.cast(t * KT8, tl.int64) * N + wt_offs, mask=cmask[:, None], other=0)
            s2, z2 = _pair_scales(S, Z, (t * KT) // GROUP, N, cols, cmask)
            w = _dequant_cols_ptx(words, s2[:, None], z2[:, None], KT, BLOCK_N)
        else:
            words = tl.load(Q + tl.cast(t * KT8, tl.int64) * N + w_offs, mask=cmask[None, :], other=0)
            w = _weight_tile(words, S, Z, (t * KT) // GROUP, N, cols, cmask, X.dtype.element_ty, KT, BLOCK_N, PTX)
            if SWAPPED:
                w = tl.trans(w)
        if SWAPPED:
            xt = tl.load(x_ptrs + t * KT, mask=rmask[None, :], other=0.0)
            acc = tl.dot(w, xt, acc, input_precision=PRECISION)
        else:
            a = tl.load(x_ptrs + t * KT, mask=rmask[:, None], other=0.0)
            if ORDER:
                a = _swap_slots(a, BLOCK_M, KT)  # x in the slot order of the weight tile's rows
            acc = tl.dot(a, w, acc, input_precision=PRECISION)
    if SWAPPED:
        acc = tl.trans(acc)
    _store_or_reduce(acc, rows, cols, M, N, Y, Bias, Part, Counters, pid_m * grid_n + pid_n, split, splits,
                     SPLIT_K, HAS_BIAS)


@triton.jit
def _dequant_kernel(Q, S, Z, W, N8, one, KT8: tl.constexpr, GROUP: tl.constexpr, BLOCK_N: tl.constexpr,
                    ORDER: tl.constexpr):
    """W [K, N] (row-major, the activation dtype) from the packed words; a program: KT rows x BLOCK_N."""
    KT: tl.constexpr = 8 * KT8
    N = N8 * 8
    t = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    cmask = cols < N
    r = tl.arange(0, KT8)
    words = tl.load(Q + tl.cast(t * KT8, tl.int64) * N + r[:, None] * N + cols[None, :], mask=cmask[None, :],
                    other=0)
    s16, c = _group_scales(S, Z, (t * KT) // GROUP, N, cols, cmask)
    for j in tl.static_range(8):
        w = _plane(words, j, one) * s16[None, :] - c[None, :]
        offs = (t * KT + _k_of(8 * r + _row(j), ORDER)).to(tl.int64)[:, None] * N + cols[None, :]
        tl.store(W + offs, w.to(W.dtype.element_ty), mask=cmask[None, :])


# ----------------------------------------------------------------------------------------------
# Host wrappers (decisions on shapes only: CUDA-graph capturable)


def _splits(n_out_tiles: int, k_tiles: int, target: int, max_tiles: int, split=None):
    """(splits, K steps per split): enough programs to reach `target`, every split non-empty."""
    if split is None:
        split = 1 if n_out_tiles > max_tiles else max(1, min(k_tiles, -(-target // n_out_tiles)))
    assert split == 1 or n_out_tiles <= max_tiles, "more output tiles than split-K semaphores"
    per = -(-k_tiles // split)
    return -(-k_tiles // per), per


def _check(x, packed, group_size, bias, swiglu=False):
    qw = packed["qweight"]
    K8, N = qw.shape
    K = x.shape[-1] // 2 if swiglu else x.shape[-1]
    assert x.dim() == 2 and K == 8 * K8 and (not swiglu or x.shape[-1] == 2 * K), (
        f"x {tuple(x.shape)} against a packed weight of {8 * K8} rows")
    assert K % group_size == 0 and packed["scales"].shape == (K // group_size, N), (
        f"group size {group_size} does not match scales {tuple(packed['scales'].shape)} for K={K}")
    assert packed["zeros"].shape == packed["scales"].shape and packed["zeros"].dtype == torch.uint8
    assert packed["workspace"].shape == (4, N) and packed["workspace"].dtype == torch.float32
    assert bias is None or bias.shape == (N,), (None if bias is None else bias.shape, N)
    assert x.dtype in (torch.float16, torch.bfloat16, torch.float32), x.dtype
    assert x.stride(-1) == 1, x.stride()
    return x.shape[0], K, N


class Sums(NamedTuple):
    """A decode GEMV's output [M, N] left as fp32 sums in its layer's workspace (gemv(sums=True)).
    Its one reader (add_rmsnorm or rope_append, given the Sums as its input) adds the bias, rounds
    them to the activation dtype, as the GEMV's own store would, and zeroes them for the layer's
    next call; until then the layer's next GEMV would add to them."""
    values: torch.Tensor
    bias: torch.Tensor | None = None  # [N], the GEMV's bias, added by the reader


def sums_parts(x):
    """A reader's input, a tensor or Sums, as (its values, the bias to add, whether they are Sums
    to read and zero)."""
    return (x.values, x.bias, True) if isinstance(x, Sums) else (x, None, False)


def gemv(x, packed, group_size, bias=None, num_warps=None, cols_per_thread=None, k_tile=None, waves=None,
         split=None, swiglu=False, ptx=None, unroll=None, sums=False):
    """The CUDA-core decode path (M <= 4): x [M, K] -> y [M, N]. Unset options come from GEMV_CONFIG.
    swiglu: x is a gate|up pair [M, 2K] and the input is silu(gate) * up (the down projection).
    ptx: the fp16x2 inline-PTX step (default: gemv_ptx); it takes plain rows, so a swiglu input goes
    through SiLU-mul first (faster than each of its threads computing the SiLU of all its rows).
    unroll: K steps loaded together (1-3; a split's steps are rounded up to a multiple of it).
    sums: return Sums instead of y (the bias left to their reader)."""
    M, K, N = _check(x, packed, group_size, bias, swiglu)
    assert 1 <= M <= 4, M
    ptx = gemv_ptx(x, packed) if ptx is None else ptx
    if ptx and swiglu:
        x, swiglu = silu_mul(x.contiguous()), False
    nw, cpt, kt, wv, un = _gemv_config(M, K, N, ptx)
    num_warps, cpt, waves = num_warps or nw, cols_per_thread or cpt, waves or wv
    kt = _k_tile(group_size, k_tile or kt)
    block_n = cpt * 32 * num_warps  # every thread holds all KT/8 word rows of cpt columns
    counters = packed["counters"]
    n_tiles = triton.cdiv(N, block_n)
    split, per = _splits(n_tiles, K // kt, waves * sm_count(x.device), counters.numel(), split)
    unroll = min(unroll or un, per)
    assert 1 <= unroll <= 3, unroll
    if per % unroll:  # whole unrolled iterations, so that no program computes an empty step
        per = -(-per // unroll) * unroll
        split = -(-(K // kt) // per)
    workspace = packed["workspace"]
    y = workspace if sums else torch.empty(M, N, device=x.device, dtype=x.dtype)
    _gemv_kernel[(n_tiles, split)](
        x, packed["qweight"], packed["scales"], packed["zeros"], bias if bias is not None else x, y,
        workspace, counters, M, N // 8, K, x.stride(0), split, per, ONE_BITS, KT8=kt // 8, GROUP=group_size,
        BLOCK_M=triton.next_power_of_2(M), BLOCK_N=block_n, SPLIT_K=split > 1, HAS_BIAS=bias is not None and not sums,
        SWIGLU=swiglu, PTX=ptx, ORDER=fragment_order(group_size), UNROLL=unroll, SUMS=sums, num_warps=num_warps,
        **launch_options(x.device, dependent=True))
    return Sums(workspace[:M], bias) if sums else y


def gemv_ptx(x, packed) -> bool:
    """Whether the GEMV takes the fp16x2 PTX step: where ptx_dequant allows it and x's rows are
    4-byte aligned (it loads activation pairs as 32-bit words)."""
    return ptx_dequant(x, packed) and x.data_ptr() % 4 == 0 and x.stride(0) % 2 == 0


def _gemv_config(M, K, N, ptx):
    if not ptx:
        return GEMV_CONFIG[triton.next_power_of_2(M)]
    if M == 1 and K * N >= GEMV_PTX_WIDE_WEIGHTS:
        return GEMV_PTX_WIDE_CONFIG
    return GEMV_PTX_CONFIG[triton.next_power_of_2(M)]


def gemm(x, packed, group_size, bias=None, swapped=None, block_m=None, block_n=None, num_warps=None,
         num_stages=None, k_tile=None, waves=None, split=None):
    """The fused-dequant tensor-core path: x [M, K] -> y [M, N], the straight or the swapped-operand
    kernel. Unset options come from GEMM_CONFIG (FRAGMENT_GEMM_CONFIG in the fragment order)."""
    M, K, N = _check(x, packed, group_size, bias)
    table = FRAGMENT_GEMM_CONFIG if fragment_order(group_size) else GEMM_CONFIG
    cfg = next(c for c in table if M <= c[0])[1:]
    swapped, block_m, block_n, num_warps, num_stages, kt, waves = (b if a is None else a for a, b in zip(
        (swapped, block_m, block_n, num_warps, num_stages, k_tile, waves), cfg))
    kt = _k_tile(group_size, kt)
    counters = packed["counters"]
    m_tiles, n_tiles = triton.cdiv(M, block_m), triton.cdiv(N, block_n)
    split, per = _splits(m_tiles * n_tiles, K // kt, waves * sm_count(x.device), counters.numel(), split)
    y = torch.empty(M, N, device=x.device, dtype=x.dtype)
    part = torch.empty(split if split > 1 else 1, M, N, device=x.device, dtype=torch.float32)
    args = (x, packed["qweight"], packed["scales"], packed["zeros"], bias if bias is not None else x, y, part, counters,
            M, N // 8, K, x.stride(0), split, per)
    opts = dict(KT8=kt // 8, GROUP=group_size, BLOCK_M=block_m, BLOCK_N=block_n, SPLIT_K=split > 1,
                HAS_BIAS=bias is not None, PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
                num_warps=num_warps, num_stages=num_stages)
    grid = (m_tiles, n_tiles, split) if swapped else (m_tiles * n_tiles, split)
    _gemm_kernel[grid](*args, GROUP_M=8, SWAPPED=swapped, PTX=ptx_dequant(x, packed),
                       ORDER=fragment_order(group_size), **opts)
    return y


def ptx_dequant(x, packed) -> bool:
    """Whether the fused GEMM dequantizes in inline PTX: fp16 activations and scales on an NVIDIA
    GPU (not under the interpreter, which runs no PTX), unless TINYVILA_W4_PTX=0 (for A/B timing)."""
    return (x.dtype == torch.float16 and packed["scales"].dtype == torch.float16 and x.device.type == "cuda"
            and torch.version.hip is None and os.environ.get("TRITON_INTERPRET") != "1"
            and os.environ.get("TINYVILA_W4_PTX") != "0")


def dequantize(packed, group_size, dtype, block_n=256, num_warps=8, k_tile=128):
    """Triton dequantization into W [K, N] (row-major) of `dtype`: the cuBLAS path's operand."""
    qw = packed["qweight"]
    K8, N = qw.shape
    kt = _k_tile(group_size, k_tile)
    w = torch.empty(8 * K8, N, device=qw.device, dtype=dtype)
    _dequant_kernel[(8 * K8 // kt, triton.cdiv(N, block_n))](
        qw, packed["scales"], packed["zeros"], w, N // 8, ONE_BITS, KT8=kt // 8, GROUP=group_size, BLOCK_N=block_n,
        ORDER=fragment_order(group_size), num_warps=num_warps)
    return w


def dequant_matmul(x, packed, group_size, bias=None):
    """The large-M path: dequantize to the activation dtype, then cuBLAS (bias in its epilogue)."""
    _check(x, packed, group_size, bias)
    w = dequantize(packed, group_size, x.dtype)
    return torch.mm(x, w) if bias is None else torch.addmm(bias.to(x.dtype), x, w)


def w4a16_linear(x, packed, group_size, bias=None):
    """y = x @ W.T (+ bias) for x [..., K] in fp16 / bf16 (fp32 too: the interpreter); y in x.dtype."""
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    M = x2.shape[0]
    if M == 0:
        y = torch.empty(0, packed["qweight"].shape[1], device=x.device, dtype=x.dtype)
    elif M <= GEMV_MAX_M:
        y = gemv(x2, packed, group_size, bias)
    elif M < CUBLAS_MIN_M:
        y = gemm(x2, packed, group_size, bias)
    else:
        y = dequant_matmul(x2, packed, group_size, bias)
    return y.view(*lead, y.shape[-1])
