"""Compact a KV cache to the selected slots: dst[l, h, s] = src[l, h, index[l, g, s]] for K and V.

Shapes: src_k, src_v [L, H_kv, S_src, D] (the full cache, all layers); index [L, G, S_c] sorted
source slots, G == 1 (one selection per layer, shared by its KV heads) or G == H_kv (one per KV
head); dst_k, dst_v [L, H_kv, S_dst, D] with S_dst >= S_c. Rows s >= S_c of dst are left as they
are, so a caller can gather into the front of a preallocated cache and append after it.

Pure data movement, so the kernel is about bytes: one launch covers every layer, head, K and V
(a per-layer loop would be L launches of a few microseconds each). A program copies BLOCK_S rows of
one (layer, head): it reads their indices once and moves whole D-wide rows of K, then of V, each row
a contiguous, coalesced read and write. Offsets are 64-bit (a 28-layer cache of 50K slots is over
2**31 elements). dst must not overlap src (programs run in no particular order).
"""
import torch

from tinyvila.kernels.triton_lang import tl, triton


def gather_kv_ref(src_k, src_v, index, dst_k, dst_v):
    """Plain PyTorch reference (writes dst_k/dst_v in place and returns them)."""
    L, H, _, D = src_k.shape
    S_c = index.shape[-1]
    idx = index.long().expand(L, H, S_c)[..., None].expand(L, H, S_c, D)
    dst_k[:, :, :S_c] = torch.gather(src_k, 2, idx)
    dst_v[:, :, :S_c] = torch.gather(src_v, 2, idx)
    return dst_k, dst_v


@triton.jit
def _gather(SrcK, SrcV, Index, DstK, DstV, S_c, H,
            sk_l, sk_h, sk_s, sv_l, sv_h, sv_s, dk_l, dk_h, dk_s, dv_l, dv_h, dv_s, si_l, si_g, si_s,
            PER_HEAD: tl.constexpr, D: tl.constexpr, BLOCK_S: tl.constexpr):
    lh = tl.program_id(1)
    layer = (lh // H).to(tl.int64)
    head = (lh % H).to(tl.int64)
    s = tl.program_id(0) * BLOCK_S + tl.arange(0, BLOCK_S)
    ok = s < S_c
    sel = head if PER_HEAD else 0
    src = tl.load(Index + layer * si_l + sel * si_g + s * si_s, mask=ok, other=0).to(tl.int64)
    s = s.to(tl.int64)
    d = tl.arange(0, D)[None, :]
    k = tl.load(SrcK + layer * sk_l + head * sk_h + src[:, None] * sk_s + d, mask=ok[:, None])
    tl.store(DstK + layer * dk_l + head * dk_h + s[:, None] * dk_s + d, k, mask=ok[:, None])
    v = tl.load(SrcV + layer * sv_l + head * sv_h + src[:, None] * sv_s + d, mask=ok[:, None])
    tl.store(DstV + layer * dv_l + head * dv_h + s[:, None] * dv_s + d, v, mask=ok[:, None])


def gather_kv(src_k, src_v, index, dst_k, dst_v, block_s=None, num_warps=4):
    """Triton gather; same contract as `gather_kv_ref` (returns dst_k, dst_v)."""
    L, H, S_src, D = src_k.shape
    Lg, G, S_c = index.shape
    assert src_v.shape == src_k.shape and Lg == L and G in (1, H), (src_k.shape, src_v.shape, index.shape)
    assert dst_k.shape[:2] == (L, H) and dst_k.shape[3] == D and dst_v.shape == dst_k.shape, (dst_k.shape, dst_v.shape)
    assert dst_k.shape[2] >= S_c, (dst_k.shape, S_c)
    assert dst_k.dtype == src_k.dtype and dst_v.dtype == src_v.dtype
    assert index.dtype in (torch.int32, torch.int64)
    assert all(t.stride(3) == 1 for t in (src_k, src_v, dst_k, dst_v)), "rows must be contiguous"
    assert D & (D - 1) == 0, f"head_dim {D} must be a power of two"
    if S_c == 0:
        return dst_k, dst_v
    # ~8 KB of K and 8 KB of V per program: enough bytes in flight, and thousands of programs.
    block_s = block_s or max(1, min(128, 8192 // (D * src_k.element_size())))
    grid = (triton.cdiv(S_c, block_s), L * H)
    _gather[grid](src_k, src_v, index, dst_k, dst_v, S_c, H,
                  *src_k.stride()[:3], *src_v.stride()[:3], *dst_k.stride()[:3], *dst_v.stride()[:3],
                  *index.stride(), PER_HEAD=G > 1, D=D, BLOCK_S=block_s, num_warps=num_warps)
    return dst_k, dst_v
