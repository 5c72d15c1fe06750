"""Rotary embedding for one decode token, fused with the KV-cache append.

`rope_append(qkv, cos, sin, k_cache, v_cache, slot, n_heads, n_kv)` takes the fused q/k/v projection
of one token [1, (Hq + 2 Hkv) D], rotates q and k (rotate-half layout, tables cos/sin [1, D] in the
activation dtype) and writes the rotated k and the v into the caches at slot `slot` (a 1-element
device tensor, so CUDA graphs can replay it). Returns the rotated q [Hq, D]. M-RoPE needs nothing
special here: its tables already mix the t/h/w angles. `qk_norm=(q weight, k weight, eps)` (Qwen3)
first RMS-normalises each q and k head as the RMSNorm module does (fp32, cast, then the weight).

`rope_append_rows`: the same for B conversations' tokens in one launch (batched decode), row b
into its own cache at its own slot, the caches given by a table of device addresses as
`decode_attention_rows` reads them.
"""
import torch

from tinyvila.kernels.pdl import chain_start, launch_options
from tinyvila.kernels.triton_lang import tl, triton
from tinyvila.kernels.w4a16 import sums_parts


def rope_append_ref(qkv, cos, sin, k_cache, v_cache, slot, n_heads, n_kv, qk_norm=None):
    D = cos.shape[-1]
    q, k, v = qkv.view(-1).split([n_heads * D, n_kv * D, n_kv * D])
    half = D // 2
    if qk_norm is not None:
        q_w, k_w, eps = qk_norm

        def norm(x, w):
            xf = x.view(-1, D).float()
            return w * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)

        q, k = norm(q, q_w), norm(k, k_w)

    def rot(x):
        x = x.view(-1, D)
        return x * cos + torch.cat([-x[:, half:], x[:, :half]], dim=-1) * sin

    k_cache[:, int(slot)] = rot(k)
    v_cache[:, int(slot)] = v.view(-1, D)
    return rot(q)


def rope_append_rows_ref(qkv, cos, sin, kvs, slots, n_heads, n_kv, qk_norm=None):
    """qkv [B, (Hq + 2 Hkv) D], cos/sin [B, D], kvs: row b's (k, v) cache [Hkv, S_b, D], slots: ints.
    Returns q [B, Hq, D]."""
    return torch.stack([rope_append_ref(qkv[b], cos[b:b + 1], sin[b:b + 1], k, v, slots[b], n_heads, n_kv, qk_norm)
                        for b, (k, v) in enumerate(kvs)])


@triton.jit
def _rope_append(QKV, Bias, Cos, Sin, Q_out, K_cache, V_cache, Slot, stride_kh, stride_ks, QW, KW, eps, Table, layer,
                 N_HEADS: tl.constexpr, N_KV: tl.constexpr, D: tl.constexpr, HALF: tl.constexpr,
                 QK_NORM: tl.constexpr, ROWS: tl.constexpr, CONSUME: tl.constexpr, HAS_BIAS: tl.constexpr,
                 PDL: tl.constexpr):
    chain_start(PDL)  # programmatic dependent launch in decode (kernels/pdl.py)
    head = tl.program_id(0)  # 0..N_HEADS-1: query heads, then N_KV key heads, then N_KV value heads
    row = tl.program_id(1)  # ROWS: the conversation; its cache from the table's column `row`
    if ROWS:
        n_rows = tl.num_programs(1)
        stride_kh = tl.load(Table + 2 * n_rows + row) * D
        stride_ks = D
        # addresses read from memory: their 16-byte alignment said, so the stores stay vectorised
        K_cache = tl.multiple_of(tl.load(Table + row).to(tl.pointer_type(Q_out.dtype.element_ty))
                                 + layer * N_KV * stride_kh, 16)
        V_cache = tl.multiple_of(tl.load(Table + n_rows + row).to(tl.pointer_type(Q_out.dtype.element_ty))
                                 + layer * N_KV * stride_kh, 16)
        QKV += row * (N_HEADS + 2 * N_KV) * D
        Q_out += row * N_HEADS * D
        Cos += row * D
        Sin += row * D
    half = HALF
    i = tl.arange(0, HALF)
    cos = tl.load(Cos + i)
    sin = tl.load(Sin + i)
    base = QKV + head * D
    x1 = tl.load(base + i)
    x2 = tl.load(base + half + i)
    if CONSUME:  # a GEMV's fp32 sums (w4a16.Sums): its bias added and rounded as its store would, zeroed
        tl.store(base + i, tl.zeros_like(x1))
        tl.store(base + half + i, tl.zeros_like(x2))
        if HAS_BIAS:
            x1 += tl.load(Bias + head * D + i).to(tl.float32)
            x2 += tl.load(Bias + head * D + half + i).to(tl.float32)
        x1 = x1.to(Q_out.dtype.element_ty)
        x2 = x2.to(Q_out.dtype.element_ty)
    slot = tl.load(Slot + row)
    if head < N_HEADS + N_KV:
        if QK_NORM:  # RMSNorm of the head: fp32 statistics, cast back, then the weight
            f1, f2 = x1.to(tl.float32), x2.to(tl.float32)
            rstd = 1.0 / tl.sqrt((tl.sum(f1 * f1, axis=0) + tl.sum(f2 * f2, axis=0)) / D + eps)
            is_q = head < N_HEADS
            w1 = tl.where(is_q, tl.load(QW + i), tl.load(KW + i))
            w2 = tl.where(is_q, tl.load(QW + half + i), tl.load(KW + half + i))
            x1 = (f1 * rstd).to(x1.dtype) * w1
            x2 = (f2 * rstd).to(x2.dtype) * w2
        # x * cos + rotate_half(x) * sin, each product rounded as torch rounds it
        o1 = (x1 * cos) + (-x2 * sin)
        o2 = (x2 * cos) + (x1 * sin)
        if head < N_HEADS:
            tl.store(Q_out + head * D + i, o1)
            tl.store(Q_out + head * D + half + i, o2)
        else:
            dst = K_cache + (head - N_HEADS) * stride_kh + slot * stride_ks
            tl.store(dst + i, o1)
            tl.store(dst + half + i, o2)
    else:
        dst = V_cache + (head - N_HEADS - N_KV) * stride_kh + slot * stride_ks
        tl.store(dst + i, x1)
        tl.store(dst + half + i, x2)


def _qkv_input(qkv, dtype):
    """(the qkv tensor, whether it is a GEMV's Sums to read and zero, its bias and whether it has
    one): qkv a tensor of `dtype`, or a decode GEMV's w4a16.Sums."""
    qkv, bias, consume = sums_parts(qkv)
    assert qkv.dtype == (torch.float32 if consume else dtype), (qkv.dtype, dtype)
    return qkv, consume, (bias if bias is not None else qkv), bias is not None


def rope_append(qkv, cos, sin, k_cache, v_cache, slot, n_heads, n_kv, qk_norm=None):
    """qkv: a tensor in cos's dtype, or a decode GEMV's w4a16.Sums (read once: zeroed)."""
    D = cos.shape[-1]
    qkv, consume, bias, has_bias = _qkv_input(qkv, cos.dtype)
    assert qkv.is_contiguous() and qkv.numel() == (n_heads + 2 * n_kv) * D, (qkv.shape, n_heads, n_kv, D)
    assert k_cache.shape[0] == n_kv and k_cache.shape[-1] == D and k_cache.stride(2) == 1
    assert v_cache.stride() == k_cache.stride() and k_cache.dtype == cos.dtype and slot.numel() == 1
    q = torch.empty(n_heads, D, device=qkv.device, dtype=cos.dtype)
    q_w, k_w, eps = qk_norm if qk_norm is not None else (q, q, 0.0)  # unused without the norm
    _rope_append[(n_heads + 2 * n_kv,)](qkv, bias, cos.contiguous(), sin.contiguous(), q, k_cache, v_cache, slot,
                                       k_cache.stride(0), k_cache.stride(1), q_w, k_w, eps, slot, 0, N_HEADS=n_heads,
                                       N_KV=n_kv, D=D, HALF=D // 2, QK_NORM=qk_norm is not None, ROWS=False,
                                       CONSUME=consume, HAS_BIAS=has_bias, **launch_options(qkv.device, dependent=True))
    return q


def rope_append_rows(qkv, cos, sin, table, layer: int, slots, n_heads, n_kv, qk_norm=None):
    """rope_append for B rows: qkv [B, (Hq + 2 Hkv) D] (or Sums), cos/sin [B, D], row b's k and v
    written to slot slots[b] (device tensor [B]) of layer `layer` of its cache, given by `table`
    int64 [3, B] as decode_attention_rows reads it. Returns q [B, Hq, D]."""
    B, D = cos.shape
    qkv, consume, bias, has_bias = _qkv_input(qkv, cos.dtype)
    assert qkv.is_contiguous() and qkv.shape == (B, (n_heads + 2 * n_kv) * D), (qkv.shape, n_heads, n_kv, D)
    assert table.shape == (3, B) and table.dtype == torch.int64 and slots.shape == (B,)
    q = torch.empty(B, n_heads, D, device=qkv.device, dtype=cos.dtype)
    q_w, k_w, eps = qk_norm if qk_norm is not None else (q, q, 0.0)
    _rope_append[(n_heads + 2 * n_kv, B)](qkv, bias, cos.contiguous(), sin.contiguous(), q, q, q, slots, 0, 0,
                                          q_w, k_w, eps, table, layer, N_HEADS=n_heads, N_KV=n_kv, D=D,
                                          HALF=D // 2, QK_NORM=qk_norm is not None, ROWS=True, CONSUME=consume,
                                          HAS_BIAS=has_bias, **launch_options(qkv.device, dependent=True))
    return q
