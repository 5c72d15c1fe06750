"""Vision-encoder attention that also returns each token's saliency, without an N x N matrix.

Shapes: q, k, v [total, H, D] (strided views of a fused qkv are fine: the last dim must be
contiguous); `cu_seqlens` int32 [B+1] on the device: token ranges of the B segments (images, frames,
tiles), attention is non-causal and stays inside a segment. Returns `out` [total, H, D] (the ordinary
attention output, q's dtype) and `saliency` fp32 [total]: for a segment of N tokens,
  summary == 0   s_j = mean_h (1/N) sum_i softmax_i(q_i K^T scale)_j   (column mean; SigLIP, Qwen ViT)
  summary == c   s_j = mean_h mean_{r<c} softmax_r(...)_j              (the first c tokens of the
                 segment are its summary tokens, e.g. CLIP's CLS: c = 1)

Two kernels:
  _forward   flash attention, one program per (query block, head, segment). Besides `out` it keeps
             each row's log-sum-exp (base 2, log2(e) folded into the scale so the inner loop is one
             FMA and one exp2 a score).
  _colsum    one program per (key block, group of heads, segment) walks the segment's query rows
             (all of them, or only the c summary rows) and sums exp2(s_ij - lse_i) over i. With the
             row's final lse known, every term is already a normalised probability, so the column
             sums need no running rescale. The scores are computed transposed (K Q^T: keys on
             rows), so the sum over queries is a row reduction, done once per program on an
             element-wise accumulator.
Determinism (the caller ranks tokens by saliency): no float atomics. A program sums its heads in a
fixed order; when heads are split over programs (long single segments need the parallelism) each
group writes its own partial row and a torch sum adds the rows in a fixed order. Block shapes come
from a fixed table (no run-time autotuning), so the summation order is the same in every process.

Head dims that are not powers of two are cut into two power-of-two pieces, each at least 16 wide
(tl.dot's minimum): 72 = 64 + 16 (the second masked to 8), 80 = 64 + 16, 24 = 16 + 16 (masked),
8 = 16 (masked). Two narrower dots cost less than padding 72 to 128. fp16 / bf16 in (fp32 for tests),
fp32 accumulation.

Cost: the saliency pass is a third matmul and a second exponential per score on top of attention's
two and one, so it cannot be free. Tried and measured slower, so not kept: computing a
share of the exponentials on the FMA pipe (Cody-Waite + polynomial; the loops are issue- and
latency-bound rather than MUFU-bound), summing probabilities on the tensor cores (fp16 p times a
ones column; also loses precision), skipping the row predicates on full blocks (slower SigLIP
forward), and splitting a block's exponentials between the two units. PTX's
ex2.approx.f16x2 issues one MUFU op per half on sm_90, so half precision buys nothing either.
"""
import os

import torch

from tinyvila.kernels.gpu import SM_COUNT_DEFAULT, sm_count
from tinyvila.kernels.triton_lang import tl, triton

LOG2E = 1.4426950408889634
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

# Block shapes by head dim, the fastest at each model's shape (python -m
# tinyvila.tools.saliency_bench --sweep): 64 CLIP tiles (5 x 577, CLS), 72 SigLIP frames (256 x 729),
# 80 Qwen2.5-VL's full-attention blocks (one segment of 9216).
# forward: (BLOCK_M queries, BLOCK_N keys, num_warps, num_stages)
# colsum:  (BLOCK_N keys, BLOCK_M queries, num_warps, num_stages)
FORWARD_CONFIG = {64: (64, 64, 4, 3), 72: (128, 64, 8, 3), 80: (128, 64, 8, 3), "default": (128, 64, 8, 3)}
COLSUM_CONFIG = {64: (64, 64, 4, 3), 72: (128, 32, 4, 3), 80: (64, 128, 4, 3), "default": (128, 32, 4, 3)}
INTERPRET_CONFIG = ((16, 16, 4, 1), (16, 16, 4, 1))  # the interpreter: small blocks run fastest


def split_head_dim(D: int):
    """(DA, DB): two power-of-two pieces covering D, each >= 16 (DB = 0: one piece)."""
    da = max(16, 1 << (D.bit_length() - 1))
    rest = D - da
    db = 0 if rest <= 0 else max(16, triton.next_power_of_2(rest))
    return da, db


# ----------------------------------------------------------------------------------------------
# Reference


def saliency_attention_ref(q, k, v, cu_seqlens, summary=0, scale=None):
    """Plain PyTorch reference: per segment, the explicit fp32 softmax; same outputs as
    `saliency_attention` (out in q's dtype, saliency fp32 [total])."""
    total, H, D = q.shape
    scale = scale if scale is not None else D ** -0.5
    out = torch.empty(total, H, D, dtype=q.dtype, device=q.device)
    sal = torch.zeros(total, dtype=torch.float32, device=q.device)
    bounds = [int(b) for b in cu_seqlens.tolist()]
    for a, b in zip(bounds[:-1], bounds[1:]):
        if b <= a:
            continue
        qs, ks, vs = (t[a:b].float().transpose(0, 1) for t in (q, k, v))  # [H, N, D]
        p = torch.softmax(qs @ ks.transpose(1, 2) * scale, dim=-1)  # [H, N(query), N(key)]
        out[a:b] = (p @ vs).transpose(0, 1).to(q.dtype)
        rows = p if summary == 0 else p[:, :summary]
        sal[a:b] = rows.mean(dim=(0, 1))
    return out, sal


# ----------------------------------------------------------------------------------------------
# Triton kernels


@triton.jit
def _load_rows(ptr, rows, valid, stride_t, DA: tl.constexpr, DB: tl.constexpr, D: tl.constexpr):
    """Rows of one head as two pieces [R, DA], [R, DB]; rows not `valid` and columns past D read
    as 0. (Dropping the row predicates on full blocks was measured slower.)"""
    da = tl.arange(0, DA)
    if DA > D:
        a = tl.load(ptr + rows[:, None] * stride_t + da[None, :], mask=valid[:, None] & (da[None, :] < D), other=0.0)
    else:
        a = tl.load(ptr + rows[:, None] * stride_t + da[None, :], mask=valid[:, None], other=0.0)
    if DB > 0:
        db = DA + tl.arange(0, DB)
        if DA + DB > D:
            b = tl.load(ptr + rows[:, None] * stride_t + db[None, :], mask=valid[:, None] & (db[None, :] < D),
                        other=0.0)
        else:
            b = tl.load(ptr + rows[:, None] * stride_t + db[None, :], mask=valid[:, None], other=0.0)
    else:
        b = a  # unused
    return a, b


@triton.jit
def _forward_block(q_a, q_b, K, V, stride_kt, stride_vt, n0, n, m_i, l_i, acc_a, acc_b, qk_scale,
                   BLOCK_N: tl.constexpr, DA: tl.constexpr, DB: tl.constexpr, D: tl.constexpr,
                   MASKED: tl.constexpr, PRECISION: tl.constexpr):
    # One key block of the online softmax. MASKED (the -inf select) only for the segment's last,
    # partial block.
    keys = n0 + tl.arange(0, BLOCK_N)
    ok = keys < n
    k_a, k_b = _load_rows(K, keys, ok, stride_kt, DA, DB, D)
    s = tl.dot(q_a, tl.trans(k_a), input_precision=PRECISION)
    if DB > 0:
        s = tl.dot(q_b, tl.trans(k_b), s, input_precision=PRECISION)
    if MASKED:
        s = tl.where(ok[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1) * qk_scale)
    p = tl.exp2(s * qk_scale - m_new[:, None])
    alpha = tl.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, axis=1)
    v_a, v_b = _load_rows(V, keys, ok, stride_vt, DA, DB, D)
    p = p.to(v_a.dtype)
    acc_a = tl.dot(p, v_a, acc_a * alpha[:, None], input_precision=PRECISION)
    if DB > 0:
        acc_b = tl.dot(p, v_b, acc_b * alpha[:, None], input_precision=PRECISION)
    return m_new, l_i, acc_a, acc_b


@triton.jit
def _forward(Q, K, V, Out, Lse, CuSeqlens, total, stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
             qk_scale, H: tl.constexpr, D: tl.constexpr, DA: tl.constexpr, DB: tl.constexpr,
             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, ALIGN: tl.constexpr, PRECISION: tl.constexpr):
    mblock = tl.program_id(0)
    head = tl.program_id(1)
    seg = tl.program_id(2)
    start = tl.load(CuSeqlens + seg)
    n = tl.load(CuSeqlens + seg + 1) - start
    m0 = mblock * BLOCK_M
    if m0 >= n:  # the grid is sized for the longest segment
        return
    # 64-bit base offsets (a video's qkv passes 2**31 elements); offsets inside a segment are small.
    base = start.to(tl.int64)
    Q += base * stride_qt + tl.multiple_of(head * stride_qh, ALIGN)
    K += base * stride_kt + tl.multiple_of(head * stride_kh, ALIGN)
    V += base * stride_vt + tl.multiple_of(head * stride_vh, ALIGN)
    rows = m0 + tl.arange(0, BLOCK_M)
    row_ok = rows < n
    q_a, q_b = _load_rows(Q, rows, row_ok, stride_qt, DA, DB, D)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc_a = tl.zeros([BLOCK_M, DA], tl.float32)
    acc_b = tl.zeros([BLOCK_M, DB if DB > 0 else 16], tl.float32)
    n_full = (n // BLOCK_N) * BLOCK_N
    for n0 in range(0, n_full, BLOCK_N):
        m_i, l_i, acc_a, acc_b = _forward_block(q_a, q_b, K, V, stride_kt, stride_vt, n0, n, m_i, l_i, acc_a, acc_b,
                                                qk_scale, BLOCK_N, DA, DB, D, False, PRECISION)
    if n_full < n:
        m_i, l_i, acc_a, acc_b = _forward_block(q_a, q_b, K, V, stride_kt, stride_vt, n_full, n, m_i, l_i, acc_a,
                                                acc_b, qk_scale, BLOCK_N, DA, DB, D, True, PRECISION)
    inv = 1.0 / l_i
    tok = base + rows  # global token index, int64
    out_ptr = Out + tok[:, None] * (H * D) + head * D
    da = tl.arange(0, DA)
    tl.store(out_ptr + da[None, :], (acc_a * inv[:, None]).to(Out.dtype.element_ty),
             mask=row_ok[:, None] & (da[None, :] < D))
    if DB > 0:
        db = DA + tl.arange(0, DB)
        tl.store(out_ptr + db[None, :], (acc_b * inv[:, None]).to(Out.dtype.element_ty),
                 mask=row_ok[:, None] & (db[None, :] < D))
    tl.store(Lse + head * total + tok, m_i + tl.log2(l_i), mask=row_ok)  # base 2, scaled domain


@triton.jit
def _colsum(Q, K, Lse, CuSeqlens, Partial, total, stride_qt, stride_qh, stride_kt, stride_kh, qk_scale, summary,
            H: tl.constexpr, HEADS: tl.constexpr, D: tl.constexpr, DA: tl.constexpr, DB: tl.constexpr,
            BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, ALIGN: tl.constexpr, PRECISION: tl.constexpr):
    nblock = tl.program_id(0)
    group = tl.program_id(1)
    seg = tl.program_id(2)
    start = tl.load(CuSeqlens + seg)
    n = tl.load(CuSeqlens + seg + 1) - start
    n0 = nblock * BLOCK_N
    if n0 >= n:
        return
    rows_used = tl.where(summary == 0, n, tl.minimum(summary, n))  # the query rows averaged
    base = start.to(tl.int64)
    keys = n0 + tl.arange(0, BLOCK_N)
    key_ok = keys < n
    acc = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)  # summed over rows once, at the end
    for hh in range(HEADS):
        head = group * HEADS + hh
        k_a, k_b = _load_rows(K + base * stride_kt + tl.multiple_of(head * stride_kh, ALIGN), keys, key_ok,
                              stride_kt, DA, DB, D)
        Qh = Q + base * stride_qt + tl.multiple_of(head * stride_qh, ALIGN)
        Lh = Lse + head * total + base
        for m0 in range(0, rows_used, BLOCK_M):
            rows = m0 + tl.arange(0, BLOCK_M)
            row_ok = rows < rows_used
            q_a, q_b = _load_rows(Qh, rows, row_ok, stride_qt, DA, DB, D)
            lse = tl.load(Lh + rows, mask=row_ok, other=float("inf"))  # rows past the end weigh 0
            s = tl.dot(k_a, tl.trans(q_a), input_precision=PRECISION)  # [keys, rows]
            if DB > 0:
                s = tl.dot(k_b, tl.trans(q_b), s, input_precision=PRECISION)
            acc += tl.exp2(s * qk_scale - lse[None, :])
    col = tl.sum(acc, axis=1) / (rows_used.to(tl.float32) * H)
    tl.store(Partial + group * total + base + keys, col, mask=key_ok)


# ----------------------------------------------------------------------------------------------
# Wrapper


def _config(table, D):
    return table.get(D, table["default"])


def heads_per_program(H: int, programs_per_head: int, sms: int = SM_COUNT_DEFAULT) -> int:
    """All heads in one program (one write, no reduction) when the key blocks alone fill the GPU
    a few times over; otherwise one head a program, so a long single segment still spreads."""
    return H if programs_per_head >= 4 * sms else 1


def saliency_attention(q, k, v, cu_seqlens, max_seqlen: int, summary: int = 0, scale: float | None = None,
                       configs=None):
    """q, k, v: [total, H, D] (may be strided views, e.g. q = qkv.view(N*T, 3, H, D)[:, 0]; last dim
    contiguous). cu_seqlens: int32 [B+1] device tensor of segment boundaries (attention only inside
    a segment, non-causal; they cover [0, total)). Returns (out [total, H, D] contiguous, same dtype as q; saliency
    float32 [total]). `configs` ((forward), (colsum), heads per colsum program): a tuning override
    (the benchmark's --sweep); None takes the tables."""
    total, H, D = q.shape
    assert k.shape == q.shape and v.shape == q.shape, (q.shape, k.shape, v.shape)
    assert q.stride(2) == 1 and k.stride(2) == 1 and v.stride(2) == 1, "the head dim must be contiguous"
    assert cu_seqlens.dtype == torch.int32 and cu_seqlens.device == q.device, cu_seqlens
    assert summary >= 0
    scale = scale if scale is not None else D ** -0.5
    qk_scale = scale * LOG2E
    if configs is not None:
        fwd, col, heads = configs
    elif INTERPRET:
        (fwd, col), heads = INTERPRET_CONFIG, None
    else:
        fwd, col, heads = _config(FORWARD_CONFIG, D), _config(COLSUM_CONFIG, D), None
    out, lse = _run_forward(q, k, v, cu_seqlens, max_seqlen, qk_scale, fwd)
    saliency = _run_colsum(q, k, lse, cu_seqlens, max_seqlen, summary, qk_scale, col, heads)
    return out, saliency


def _launchable(q, cu_seqlens, max_seqlen):
    return q.shape[0] > 0 and cu_seqlens.numel() > 1 and max_seqlen > 0


def _align(*tensors):
    """What every head offset is known to be a multiple of, in elements. Triton proves 16-byte
    alignment of integer arguments divisible by 16 itself, but a head stride is D (72, 80): saying
    that it is a multiple of 8 is what lets the row loads be 16-byte vectors."""
    return 8 if all(t.stride(1) % 8 == 0 and t.data_ptr() % 16 == 0 for t in tensors) else 1


def _run_forward(q, k, v, cu_seqlens, max_seqlen, qk_scale, config):
    """The attention output and each row's base-2 log-sum-exp (fp32 [H, total])."""
    total, H, D = q.shape
    da, db = split_head_dim(D)
    out = torch.empty(total, H, D, dtype=q.dtype, device=q.device)
    lse = torch.empty(H, total, dtype=torch.float32, device=q.device)
    bm, bn, warps, stages = config
    if _launchable(q, cu_seqlens, max_seqlen):
        _forward[(triton.cdiv(max_seqlen, bm), H, cu_seqlens.numel() - 1)](
            q, k, v, out, lse, cu_seqlens, total, q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0),
            v.stride(1), qk_scale, H=H, D=D, DA=da, DB=db, BLOCK_M=bm, BLOCK_N=bn,
            ALIGN=_align(q, k, v), PRECISION="ieee" if q.dtype == torch.float32 else "tf32", num_warps=warps,
            num_stages=stages)
    return out, lse


def _run_colsum(q, k, lse, cu_seqlens, max_seqlen, summary, qk_scale, config, heads=None):
    """Saliency fp32 [total] from the forward's lse."""
    total, H, D = q.shape
    da, db = split_head_dim(D)
    B = cu_seqlens.numel() - 1
    bn, bm, warps, stages = config
    if summary > 0:  # only the summary rows are read: one small query block covers them
        bm = min(bm, max(16, triton.next_power_of_2(summary)))
    nkb = triton.cdiv(max(max_seqlen, 1), bn)
    if heads is None:
        heads = H if summary > 0 else heads_per_program(H, nkb * B, sm_count(q.device))
    assert H % heads == 0, (H, heads)
    groups = H // heads
    partial = torch.empty(groups, total, dtype=torch.float32, device=q.device)
    if _launchable(q, cu_seqlens, max_seqlen):
        _colsum[(nkb, groups, B)](
            q, k, lse, cu_seqlens, partial, total, q.stride(0), q.stride(1), k.stride(0), k.stride(1), qk_scale,
            summary, H=H, HEADS=heads, D=D, DA=da, DB=db, BLOCK_N=bn, BLOCK_M=bm,
            ALIGN=_align(q, k), PRECISION="ieee" if q.dtype == torch.float32 else "tf32", num_warps=warps,
            num_stages=stages)
    return partial[0] if groups == 1 else partial.sum(0)  # rows added in a fixed order: deterministic
