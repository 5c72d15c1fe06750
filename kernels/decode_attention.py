"""Decode attention: one new query token per head over a contiguous KV buffer, split-K.

Shapes: q [Hq, D]; k, v [Hkv, S, D] (a layer's preallocated cache); `length` a 1-element int32
DEVICE tensor: keys [max(0, length - window), length) are attended. Keeping the length on the device
is what lets a CUDA graph replay the same launch while the cache grows.

Flash-decoding: the key range is cut into `splits` chunks handled by separate programs, each
leaving a partial softmax (running max, sum, weighted values); a second kernel merges the partials.
Tried and not kept: cutting the chunks from the live length on the device (equal work for every
program; faster alone, but slower in the decode chain, where the next GEMV's early start shares the
GPU), and merging in the last program of each KV head behind a semaphore (its serial tail cost more
than the launch it saves, which PDL already overlaps).
Grouped-query attention: query head h reads KV head h // (Hq // Hkv); one program serves a whole
group, so every key and value is read once. fp16 / bf16 in (fp32 for tests), fp32 accumulation.

`decode_attention_rows`: one launch for B conversations' tokens (batched decode), row b over its own
cache, found through a table of device addresses and capacities (an int64 device tensor a CUDA
graph replays), with its own length; the key range of a row is cut into SPLITS chunks of its
live length, as the rows' lengths differ.
"""
import math

import torch

from tinyvila.kernels.gpu import SM_COUNT_DEFAULT, sm_count
from tinyvila.kernels.pdl import chain_start, launch_options
from tinyvila.kernels.triton_lang import tl, triton


def decode_attention_ref(q, k, v, length, scale=None, window=None):
    """Plain PyTorch reference: q [Hq, D], k/v [Hkv, S, D], length int or 1-element tensor."""
    n = int(length)
    lo = max(0, n - window) if window else 0
    group = q.shape[0] // k.shape[0]
    keys = k[:, lo:n].repeat_interleave(group, 0).float()
    values = v[:, lo:n].repeat_interleave(group, 0).float()
    scale = scale if scale is not None else q.shape[-1] ** -0.5
    p = torch.softmax(torch.einsum("hd,hsd->hs", q.float(), keys) * scale, dim=-1)
    return torch.einsum("hs,hsd->hd", p, values).to(q.dtype)


def decode_attention_rows_ref(q, kvs, lengths, scale=None, window=None):
    """q [B, Hq, D]; kvs: row b's (k, v) [Hkv, S_b, D]; lengths: ints. Row by row, as above."""
    return torch.stack([decode_attention_ref(q[b], k, v, int(n), scale, window)
                        for b, ((k, v), n) in enumerate(zip(kvs, lengths))])


@triton.jit
def _partial(Q, K, V, Length, Out, Max, Sum, stride_kh, stride_ks, scale, window, split_size,
             Table, layer, n_kv, GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, SPLITS: tl.constexpr,
             D: tl.constexpr, BLOCK: tl.constexpr, PRECISION: tl.constexpr, ROWS: tl.constexpr, PDL: tl.constexpr):
    # One program per (KV head, split), or per (row, KV head, split) with ROWS: the GROUP query
    # heads sharing that KV head are scored together with tensor-core dots, so each key and value
    # is read once.
    chain_start(PDL)  # programmatic dependent launch in decode (kernels/pdl.py)
    split = tl.program_id(1)
    if ROWS:  # row b's cache [L, Hkv, cap, D] from the table's columns b (K address, V address, cap)
        n_rows = tl.num_programs(0) // n_kv
        row = tl.program_id(0) // n_kv
        kv = (tl.program_id(0) % n_kv).to(tl.int64)
        length = tl.load(Length + row)
        stride_kh = tl.load(Table + 2 * n_rows + row) * D
        stride_ks = D
        layer_offset = layer * n_kv * stride_kh
        # An address read from memory has no known alignment: say it (allocations and layer
        # starts are 16-byte aligned), or every load would be a 2-byte one.
        K = tl.multiple_of(tl.load(Table + row).to(tl.pointer_type(Q.dtype.element_ty)) + layer_offset, 16)
        V = tl.multiple_of(tl.load(Table + n_rows + row).to(tl.pointer_type(Q.dtype.element_ty)) + layer_offset, 16)
    else:
        row = 0
        kv = tl.program_id(0).to(tl.int64)  # 64-bit offsets: a KV head of a long cache is large
        length = tl.load(Length)
    lo = tl.where(window > 0, tl.maximum(length - window, 0), 0)
    if ROWS:  # the row's own live keys, cut in SPLITS
        split_size = tl.cdiv(tl.cdiv(length - lo, SPLITS), BLOCK) * BLOCK
        first = lo + split * split_size
    else:
        first = split * split_size
    start = tl.maximum(lo, first)
    end = tl.minimum(length, first + split_size)
    g = tl.arange(0, GROUP_PAD)
    heads = (row * n_kv + kv) * GROUP + g
    in_group = g < GROUP
    d = tl.arange(0, D)
    q = tl.load(Q + heads[:, None] * D + d[None, :], mask=in_group[:, None], other=0.0)  # [GROUP_PAD, D]
    m = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    s = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, D], tl.float32)
    for n0 in range(start, end, BLOCK):
        n = n0 + tl.arange(0, BLOCK)
        valid = n < end
        offs = kv * stride_kh + n[:, None] * stride_ks + d[None, :]
        k = tl.load(K + offs, mask=valid[:, None], other=0.0)  # [BLOCK, D]
        score = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale  # [GROUP_PAD, BLOCK]
        score = tl.where(valid[None, :], score, float("-inf"))
        m_new = tl.maximum(m, tl.max(score, axis=1))
        p = tl.exp(score - m_new[:, None])
        alpha = tl.exp(m - m_new)
        vals = tl.load(V + offs, mask=valid[:, None], other=0.0)
        s = s * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(vals.dtype), vals, input_precision=PRECISION)
        m = m_new
    part = heads * SPLITS + split
    tl.store(Out + part[:, None] * D + d[None, :], acc, mask=in_group[:, None])
    tl.store(Max + part, m, mask=in_group)
    tl.store(Sum + part, s, mask=in_group)


@triton.jit
def _merge(Out, Max, Sum, Final, SPLITS: tl.constexpr, D: tl.constexpr, PDL: tl.constexpr):
    chain_start(PDL)  # programmatic dependent launch in decode (kernels/pdl.py)
    head = tl.program_id(0)
    i = tl.arange(0, SPLITS)
    m = tl.load(Max + head * SPLITS + i)
    s = tl.load(Sum + head * SPLITS + i)
    top = tl.max(m, axis=0)
    w = tl.where(m == float("-inf"), 0.0, tl.exp(m - top))  # empty splits weigh nothing
    d = tl.arange(0, D)
    acc = tl.load(Out + (head * SPLITS + i)[:, None] * D + d[None, :])
    out = tl.sum(acc * w[:, None], axis=0) / tl.sum(s * w, axis=0)
    tl.store(Final + head * D + d, out.to(Final.dtype.element_ty))


def split_count(max_len: int, n_kv_heads: int, sms: int = SM_COUNT_DEFAULT) -> int:
    """Enough splits to give every multiprocessor a couple of programs (a power of two); a split
    is never shorter than 256 keys."""
    want = max(1, min(max_len // 256, (2 * sms + n_kv_heads - 1) // n_kv_heads))
    return 1 << (want - 1).bit_length()


def decode_attention(q, k, v, length, scale=None, window=None, splits=None, block=64, workspace=None, num_warps=4):
    """Triton decode attention; same contract as `decode_attention_ref` (length: int32 tensor)."""
    Hq, D = q.shape
    Hkv, S, Dk = k.shape
    assert Dk == D and v.shape == k.shape and Hq % Hkv == 0, (q.shape, k.shape, v.shape)
    assert D & (D - 1) == 0, f"head_dim {D} must be a power of two"
    assert k.stride(2) == 1 and v.stride() == k.stride() and q.is_contiguous()
    assert length.numel() == 1 and length.dtype == torch.int32 and length.device == q.device
    if workspace is not None:  # sized for its split count (decode_workspace)
        assert splits in (None, workspace[1].numel() // Hq), f"splits={splits} against a workspace for another count"
        splits = workspace[1].numel() // Hq
    splits = splits or split_count(S, Hkv, sm_count(q.device))
    split_size = math.ceil(S / splits / block) * block
    if workspace is None:
        workspace = decode_workspace(Hq, splits, D, q.device)
    part, mx, sm = workspace
    out = torch.empty_like(q)
    scale = scale if scale is not None else D ** -0.5
    group = Hq // Hkv
    _partial[(Hkv, splits)](q, k, v, length, part, mx, sm, k.stride(0), k.stride(1), scale, window or 0, split_size,
                            length, 0, Hkv, ROWS=False,
                            GROUP=group, GROUP_PAD=max(16, triton.next_power_of_2(group)), SPLITS=splits, D=D,
                            BLOCK=block, PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
                            num_warps=num_warps, **launch_options(q.device, dependent=True))
    _merge[(Hq,)](part, mx, sm, out, SPLITS=splits, D=D, **launch_options(q.device, dependent=True))
    return out


def decode_attention_rows(q, table, layer: int, lengths, n_kv: int, scale=None, window=None, splits=None, block=64,
                          workspace=None, num_warps=4):
    """Triton decode attention of B conversations' tokens, q [B, Hq, D]: row b attends over
    layer `layer` of its own cache, a contiguous K and V [L, n_kv, cap_b, D] of q's dtype, given by
    `table` int64 [3, B] (K address, V address, cap_b), its first lengths[b] keys (int32 [B], on the
    device). Same result as decode_attention_rows_ref. The table and lengths are read on the
    device, so a CUDA graph replays the launch for any rows."""
    B, Hq, D = q.shape
    assert D & (D - 1) == 0 and Hq % n_kv == 0 and q.is_contiguous(), (q.shape, n_kv)
    assert table.shape == (3, B) and table.dtype == torch.int64 and table.is_contiguous() and table.device == q.device
    assert lengths.shape == (B,) and lengths.dtype == torch.int32 and lengths.device == q.device
    if workspace is not None:
        splits = workspace[1].numel() // (B * Hq)
    splits = splits or rows_split_count(B, n_kv, sm_count(q.device))
    part, mx, sm = workspace if workspace is not None else decode_workspace(B * Hq, splits, D, q.device)
    assert mx.numel() == B * Hq * splits, "the workspace is for another batch or split count"
    out = torch.empty_like(q)
    group = Hq // n_kv
    _partial[(B * n_kv, splits)](q, q, q, lengths, part, mx, sm, 0, 0, scale if scale is not None else D ** -0.5,
                                 window or 0, 0, table, layer, n_kv, ROWS=True, GROUP=group,
                                 GROUP_PAD=max(16, triton.next_power_of_2(group)), SPLITS=splits, D=D, BLOCK=block,
                                 PRECISION="ieee" if q.dtype == torch.float32 else "tf32", num_warps=num_warps,
                                 **launch_options(q.device, dependent=True))
    _merge[(B * Hq,)](part, mx, sm, out, SPLITS=splits, D=D, **launch_options(q.device, dependent=True))
    return out


def rows_split_count(n_rows: int, n_kv_heads: int, sms: int = SM_COUNT_DEFAULT) -> int:
    """Splits per row for decode_attention_rows: a couple of programs per multiprocessor in all
    (a power of two, at most 16; each row's live keys are cut in this many)."""
    want = max(1, (2 * sms + n_rows * n_kv_heads - 1) // (n_rows * n_kv_heads))
    return min(16, 1 << (want - 1).bit_length())


def decode_workspace(n_heads: int, splits: int, head_dim: int, device):
    """fp32 scratch for the partial results (allocate once per session for CUDA graphs)."""
    return (torch.empty(n_heads * splits * head_dim, device=device, dtype=torch.float32),
            torch.empty(n_heads * splits, device=device, dtype=torch.float32),
            torch.empty(n_heads * splits, device=device, dtype=torch.float32))
