"""Query-aware retrieval: prefill attention of T question tokens over the KV cache that also reports
how much attention the question puts on each visual token already in the cache.

Shapes: q [T, H, D] (the new tokens' queries after RoPE; any strides with the last dim contiguous,
e.g. a view into a fused qkv projection); k_cache, v_cache [H_kv, S_max, D] (one layer's
preallocated cache, the new tokens' K/V already written at slots start..start+T-1). Query i sits at
slot start+i and attends keys 0..start+i (with a sliding `window`: only keys j with
(start+i) - j < window). Grouped-query attention: head h reads KV head h // (H // H_kv).

Outputs: `out` [T, H, D], the causal attention; `r` float32 [H_kv, n_vis], for every visual slot
vis_slots[j] the attention probability it receives, averaged over the T query rows and the query
heads of the KV head's group. The softmax denominator runs over ALL visible keys (text included),
so r cannot be known before the whole row has been seen. Three launches (four when a KV head has
more than one block of rows):

1. `_attn_partial`, flash-decoding style: the rows of a KV head (all T tokens x its `group` query
   heads, token-major so a block of rows spans few tokens and the causal edge is narrow) are cut
   into blocks of BLOCK_M rows, the visible key range into `splits` chunks; each program keeps an
   online softmax (running max, sum, weighted values) over its chunk. Key blocks that every row
   of the block sees skip the mask arithmetic; only blocks at the causal or window edge pay for it.
   The row blocks of one (KV head, split) are adjacent in launch order, so when a KV head needs two
   row blocks the second reads the keys and values from L2 rather than from memory.
2. `_attn_merge` combines the splits of each row into `out` and the row's log-sum-exp (log2 units).
3. `_visual_scores`: kernel 1's shape without V. A program holds one row block's queries and
   log-sum-exps and streams the K rows of a chunk of visual slots (gathered through vis_slots),
   writing each slot's sum of exp2(score - lse) over its rows; with several row blocks per KV head
   the blocks' sums are added afterwards in a fixed order. No atomics anywhere: r is bit-identical
   run to run (the caller takes its top-k).

r costs one more read of the visual keys (not their values) and one more QK^T over them; the
alternative, keeping the probabilities of kernel 1, would write T*group floats per visual key.
fp16 / bf16 in (fp32 for tests), fp32 accumulation; offsets along a KV head are 64-bit.
"""
import torch

from tinyvila.kernels.gpu import SM_COUNT_DEFAULT, sm_count
from tinyvila.kernels.triton_lang import tl, triton

LOG2E = 1.4426950408889634


def retrieval_attention_ref(q, k_cache, v_cache, start: int, vis_slots, scale=None, window=None):
    """Plain PyTorch reference, one query row at a time over exactly its visible keys, in fp32."""
    T, H, D = q.shape
    Hkv = k_cache.shape[0]
    group = H // Hkv
    scale = scale if scale is not None else D ** -0.5
    slots = vis_slots.long()
    out = torch.empty(T, H, D, dtype=torch.float32, device=q.device)
    r = torch.zeros(H, slots.numel(), dtype=torch.float32, device=q.device)
    for i in range(T):
        pos = start + i
        lo = max(0, pos - window + 1) if window else 0
        keys = k_cache[:, lo:pos + 1].float().repeat_interleave(group, 0)  # [H, n, D]
        values = v_cache[:, lo:pos + 1].float().repeat_interleave(group, 0)
        p = torch.softmax(torch.einsum("hd,hnd->hn", q[i].float(), keys) * scale, dim=-1)
        out[i] = torch.einsum("hn,hnd->hd", p, values)
        full = torch.zeros(H, pos + 1, dtype=torch.float32, device=q.device)
        full[:, lo:] = p
        r += full[:, slots]
    return out.to(q.dtype), r.view(Hkv, group, -1).sum(1) / (T * group)


@triton.jit
def _attend(q, k_ptr, v_ptr, stride_ks, stride_vs, n0, s_hi, pos, window, acc, m, l, scale2,
            D: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr, HAS_WINDOW: tl.constexpr,
            PRECISION: tl.constexpr):
    # One key block of the online softmax. pos [BLOCK_M]: each row's own cache slot.
    n = n0 + tl.arange(0, BLOCK_N)
    d = tl.arange(0, D)
    if MASKED:
        in_split = n < s_hi
        k = tl.load(k_ptr + n[:, None] * stride_ks + d[None, :], mask=in_split[:, None], other=0.0)
    else:
        k = tl.load(k_ptr + n[:, None] * stride_ks + d[None, :])
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale2  # [BLOCK_M, BLOCK_N], log2 units
    if MASKED:
        ok = (n[None, :] <= pos[:, None]) & in_split[None, :]
        if HAS_WINDOW:
            ok = ok & (pos[:, None] - n[None, :] < window)
        s = tl.where(ok, s, float("-inf"))
    m_new = tl.maximum(m, tl.max(s, axis=1))
    if MASKED:  # a row may see none of this block (nor any before): keep exp2 away from -inf - -inf
        m_new_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    else:
        m_new_safe = m_new
    p = tl.exp2(s - m_new_safe[:, None])
    alpha = tl.exp2(m - m_new_safe)
    if MASKED:
        v = tl.load(v_ptr + n[:, None] * stride_vs + d[None, :], mask=in_split[:, None], other=0.0)
    else:
        v = tl.load(v_ptr + n[:, None] * stride_vs + d[None, :])
    l = l * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
    return acc, m_new, l


@triton.jit
def _attn_partial(Q, K, V, PartO, PartM, PartL, stride_qt, stride_qh, stride_kh, stride_ks, stride_vh, stride_vs,
                  start, window, split_size, scale2, ROWS, GROUP: tl.constexpr, N_RB: tl.constexpr,
                  SPLITS: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                  HAS_WINDOW: tl.constexpr, PRECISION: tl.constexpr, START_ON_DEVICE: tl.constexpr = False):
    if START_ON_DEVICE:  # a CUDA graph replays the launch for any start: it is read here, not baked in
        start = tl.load(start)
    rb = tl.program_id(0)  # fastest: the row blocks of one (KV head, split) share its keys through L2
    kv = tl.program_id(1).to(tl.int64)
    split = tl.program_id(2)
    rows = rb * BLOCK_M + tl.arange(0, BLOCK_M)
    tok = rows // GROUP
    head = kv * GROUP + rows % GROUP
    d = tl.arange(0, D)
    q = tl.load(Q + tok[:, None].to(tl.int64) * stride_qt + head[:, None] * stride_qh + d[None, :],
                mask=(rows < ROWS)[:, None], other=0.0)
    pos = start + tok
    # Keys any row of the block sees: [lo_any, hi_any); keys every row sees: [full_lo, full_hi).
    i0 = rb * BLOCK_M // GROUP
    i1 = (tl.minimum(rb * BLOCK_M + BLOCK_M, ROWS) - 1) // GROUP
    hi_any = start + i1 + 1
    full_hi = start + i0 + 1
    if HAS_WINDOW:
        lo_any = tl.maximum(start + i0 - window + 1, 0)
        full_lo = tl.maximum(start + i1 - window + 1, 0)
    else:
        lo_any = 0
        full_lo = 0
    s_lo = lo_any // BLOCK_N * BLOCK_N + split * split_size  # split_size: a multiple of BLOCK_N
    s_hi = tl.maximum(tl.minimum(hi_any, s_lo + split_size), s_lo)
    u_lo = tl.minimum(tl.maximum(s_lo, tl.cdiv(full_lo, BLOCK_N) * BLOCK_N), s_hi)
    u_hi = tl.maximum(tl.minimum(s_hi, full_hi // BLOCK_N * BLOCK_N), u_lo)
    k_ptr = K + kv * stride_kh
    v_ptr = V + kv * stride_vh
    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D], tl.float32)
    for n0 in range(s_lo, u_lo, BLOCK_N):  # window edge
        acc, m, l = _attend(q, k_ptr, v_ptr, stride_ks, stride_vs, n0, s_hi, pos, window, acc, m, l, scale2,
                            D, BLOCK_N, True, HAS_WINDOW, PRECISION)
    for n0 in range(u_lo, u_hi, BLOCK_N):  # seen by every row: no mask
        acc, m, l = _attend(q, k_ptr, v_ptr, stride_ks, stride_vs, n0, s_hi, pos, window, acc, m, l, scale2,
                            D, BLOCK_N, False, HAS_WINDOW, PRECISION)
    for n0 in range(u_hi, s_hi, BLOCK_N):  # causal edge
        acc, m, l = _attend(q, k_ptr, v_ptr, stride_ks, stride_vs, n0, s_hi, pos, window, acc, m, l, scale2,
                            D, BLOCK_N, True, HAS_WINDOW, PRECISION)
    # Every program writes its slot, empty splits too (max -inf, sum 0), so the merge reads no garbage.
    part = ((kv * N_RB + rb) * SPLITS + split) * BLOCK_M + tl.arange(0, BLOCK_M)
    tl.store(PartO + part[:, None] * D + d[None, :], acc)
    tl.store(PartM + part, m)
    tl.store(PartL + part, l)


@triton.jit
def _attn_merge(PartO, PartM, PartL, Out, Lse, ROWS, H, GROUP: tl.constexpr, N_RB: tl.constexpr,
                SPLITS: tl.constexpr, SPLITS_PAD: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr):
    row = tl.program_id(0)
    kv = tl.program_id(1).to(tl.int64)
    rb = row // BLOCK_M
    i = tl.arange(0, SPLITS_PAD)
    part = ((kv * N_RB + rb) * SPLITS + i) * BLOCK_M + row % BLOCK_M
    m = tl.load(PartM + part, mask=i < SPLITS, other=float("-inf"))
    s = tl.load(PartL + part, mask=i < SPLITS, other=0.0)
    top = tl.max(m, axis=0)  # finite: every row sees at least its own key
    w = tl.exp2(m - top)  # empty splits (max -inf, sum 0) weigh nothing
    d = tl.arange(0, D)
    acc = tl.load(PartO + part[:, None] * D + d[None, :], mask=(i < SPLITS)[:, None], other=0.0)
    total = tl.sum(s * w, axis=0)
    out = tl.sum(acc * w[:, None], axis=0) / total
    tok = row // GROUP
    head = kv * GROUP + row % GROUP
    tl.store(Out + (tok * H + head) * D + d, out.to(Out.dtype.element_ty))
    tl.store(Lse + kv * ROWS + row, top + tl.log2(total))


@triton.jit
def _visual_scores(Q, K, Lse, Vis, Part, stride_qt, stride_qh, stride_kh, stride_ks, start, window, n_vis, chunk,
                   scale2, inv_rows, ROWS, LSE_ROWS, GROUP: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr,
                   BLOCK_V: tl.constexpr, HAS_WINDOW: tl.constexpr, PRECISION: tl.constexpr,
                   START_ON_DEVICE: tl.constexpr = False, Count=None):
    # Like kernel 1 without V: a program holds one row block's queries and log-sum-exps and streams
    # (pipelined) the K rows of a chunk of visual slots, writing each slot's column sum. Scores are
    # formed transposed, [BLOCK_V, BLOCK_M] = K q^T, so the sum over rows runs along the product's
    # N axis, inside each warp; summing along M would cross warps through shared memory every block.
    if START_ON_DEVICE:  # and the count of real tokens: rows past it are padding, scored 0
        start = tl.load(start)
        ROWS = tl.load(Count) * GROUP
        inv_rows = 1.0 / ROWS.to(tl.float32)
    rb = tl.program_id(0)  # fastest: the row blocks of one (KV head, chunk) gather the same K rows via L2
    kv = tl.program_id(1).to(tl.int64)
    c = tl.program_id(2)
    rows = rb * BLOCK_M + tl.arange(0, BLOCK_M)
    in_rows = rows < ROWS
    tok = rows // GROUP
    head = kv * GROUP + rows % GROUP
    d = tl.arange(0, D)
    qt = tl.load(Q + tok[None, :].to(tl.int64) * stride_qt + head[None, :] * stride_qh + d[:, None],
                 mask=in_rows[None, :], other=0.0)  # [D, BLOCK_M]
    lse = tl.load(Lse + kv * LSE_ROWS + rows, mask=in_rows, other=float("inf"))  # padding rows: exp2(-inf) = 0
    k_ptr = K + kv * stride_kh
    part = Part + (rb * tl.num_programs(1) + kv) * n_vis
    j_hi = tl.minimum(n_vis, c * chunk + chunk)
    for j0 in range(c * chunk, j_hi, BLOCK_V):
        j = j0 + tl.arange(0, BLOCK_V)
        in_vis = j < j_hi
        slot = tl.load(Vis + j, mask=in_vis, other=0).to(tl.int64)
        k = tl.load(k_ptr + slot[:, None] * stride_ks + d[None, :], mask=in_vis[:, None], other=0.0)
        p = tl.exp2(tl.dot(k, qt, input_precision=PRECISION) * scale2 - lse[None, :])  # [BLOCK_V, BLOCK_M]
        if HAS_WINDOW:
            p = tl.where(start + tok[None, :] - slot[:, None] < window, p, 0.0)
        tl.store(part + j, tl.sum(p, axis=1) * inv_rows, mask=in_vis)


def plan(T: int, H: int, Hkv: int, D: int, start: int, window=None, device=None, block_m=None, block_n=None,
         splits=None):
    """Launch parameters of kernel 1: (BLOCK_M, BLOCK_N, row blocks, splits, split_size, warps).
    About one program per multiprocessor (a 128-row program fills one); a split is never under
    256 keys."""
    rows = T * (H // Hkv)
    block_m = block_m or (128 if rows > 64 else max(16, triton.next_power_of_2(rows)))
    block_n = block_n or (64 if D <= 128 else 32)
    n_rb = triton.cdiv(rows, block_m)
    # The key range one row block spans (all of the cache, or the window plus the block's tokens).
    span = start + T
    if window:
        span = min(span, window + block_m // (H // Hkv) + 1)
    sm = sm_count(device, cpu=4) if device is not None else SM_COUNT_DEFAULT  # cpu: the tests cross split edges
    if splits is None:  # one wave: about one program per multiprocessor (two waves were slower)
        splits = max(1, min(sm // (n_rb * Hkv), triton.cdiv(span, 256)))
    span += block_n if window else 0  # a windowed block's range starts at a block boundary below it
    split_size = triton.cdiv(triton.cdiv(span, splits), block_n) * block_n
    splits = triton.cdiv(span, split_size)  # no split left empty by the rounding
    warps = 8 if block_m >= 128 else 4
    return block_m, block_n, n_rb, splits, split_size, warps


def retrieval_attention(q, k_cache, v_cache, start, vis_slots, scale=None, window=None, *, block_m=None,
                        block_n=None, splits=None, block_v=None, num_stages=None, scores=True, count=None):
    """Triton version of `retrieval_attention_ref`: returns (out [T, H, D] in q's dtype, contiguous;
    r float32 [H_kv, n_vis]). `start` and the sizes are host ints (no device sync); the tuning
    keywords default to a plan for the shape. scores=False skips r (returns None for it).

    For a CUDA graph (static prefill): `start` may be a 1-element int32 device tensor, read by the
    kernels, with `count` (the same kind) the number of real tokens among q's T rows: r averages
    over those rows only (the rest are padding). The launch is planned for any start then."""
    T, H, D = q.shape
    Hkv, S, Dk = k_cache.shape
    assert Dk == D and v_cache.shape == k_cache.shape and H % Hkv == 0, (q.shape, k_cache.shape, v_cache.shape)
    assert D & (D - 1) == 0 and D >= 16, f"head_dim {D} must be a power of two >= 16"
    assert q.stride(2) == 1 and k_cache.stride(2) == 1 and v_cache.stride(2) == 1, "last dims must be contiguous"
    on_device = torch.is_tensor(start)
    assert on_device == (count is not None), "a device start comes with a device count"
    assert on_device or 0 <= start and start + T <= S, (start, T, S)
    assert vis_slots.dim() == 1 and vis_slots.dtype in (torch.int32, torch.int64) and vis_slots.device == q.device
    group = H // Hkv
    rows = T * group
    scale = scale if scale is not None else D ** -0.5
    scale2 = scale * LOG2E
    window = int(window) if window else 0
    precision = "ieee" if q.dtype == torch.float32 else "tf32"
    plan_start = S - T if on_device else start  # on the device: planned for the longest span
    bm, bn, n_rb, n_splits, split_size, warps = plan(T, H, Hkv, D, plan_start, window, q.device, block_m, block_n,
                                                     splits)
    dev = q.device
    part_o = torch.empty(Hkv * n_rb * n_splits * bm * D, device=dev, dtype=torch.float32)
    part_m = torch.empty(Hkv * n_rb * n_splits * bm, device=dev, dtype=torch.float32)
    part_l = torch.empty_like(part_m)
    out = torch.empty(T, H, D, device=dev, dtype=q.dtype)
    lse = torch.empty(Hkv * rows, device=dev, dtype=torch.float32)
    extra = {} if num_stages is None else {"num_stages": num_stages}
    _attn_partial[(n_rb, Hkv, n_splits)](
        q, k_cache, v_cache, part_o, part_m, part_l, q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1),
        v_cache.stride(0), v_cache.stride(1), start, window, split_size, scale2, rows, GROUP=group, N_RB=n_rb,
        SPLITS=n_splits, D=D, BLOCK_M=bm, BLOCK_N=bn, HAS_WINDOW=window > 0, PRECISION=precision, num_warps=warps,
        START_ON_DEVICE=on_device, **extra)
    _attn_merge[(rows, Hkv)](part_o, part_m, part_l, out, lse, rows, H, GROUP=group, N_RB=n_rb, SPLITS=n_splits,
                             SPLITS_PAD=triton.next_power_of_2(n_splits), D=D, BLOCK_M=bm,
                             num_warps=4 if D * triton.next_power_of_2(n_splits) >= 2048 else 1)
    if not scores:
        return out, None
    n_vis = vis_slots.numel()
    r = torch.empty(Hkv, n_vis, device=dev, dtype=torch.float32)
    if n_vis:
        bv = block_v or 128
        # Chunks of visual slots: about two programs per multiprocessor, whole blocks of BLOCK_V each.
        chunks = max(1, min(triton.cdiv(2 * sm_count(dev, cpu=4), n_rb * Hkv), triton.cdiv(n_vis, bv)))
        chunk = triton.cdiv(triton.cdiv(n_vis, chunks), bv) * bv
        # Several row blocks: each writes its own column sums, added below in a fixed order.
        part = r if n_rb == 1 else torch.empty(n_rb, Hkv, n_vis, device=dev, dtype=torch.float32)
        _visual_scores[(n_rb, Hkv, triton.cdiv(n_vis, chunk))](
            q, k_cache, lse, vis_slots, part, q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), start,
            window, n_vis, chunk, scale2, 1.0 / rows, rows, rows, GROUP=group, D=D, BLOCK_M=bm, BLOCK_V=bv,
            HAS_WINDOW=window > 0, PRECISION=precision, num_warps=8 if bv * bm >= 128 * 128 else 4,
            START_ON_DEVICE=on_device, Count=count, **extra)
        if n_rb > 1:
            torch.sum(part, dim=0, out=r)
    return out, r
