"""The AutoAWQ "GEMM" 4-bit layout, which vLLM and transformers load.

For a linear layer with weight W [N, K] (out, in) and group size G along K:
  qweight int32 [K, N/8]   8 four-bit values per int32 along N, nibble i holding column AWQ_ORDER[i]
                            of its group of 8 (so reading the nibbles back needs AWQ_REVERSE_ORDER)
  qzeros  int32 [K/G, N/8] the zero points, packed the same way
  scales  fp16  [K/G, N]
  W[n, k] = (q[k, n] - z[k // G, n]) * s[k // G, n],  q, z in [0, 15]
Quantization is asymmetric round-to-nearest per group: s = (max - min) / 15,
z = clamp(-round(min / s), 0, 15), q = clamp(round(w / s) + z, 0, 15).
"""
import torch

AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]  # nibble i holds column AWQ_ORDER[i]
AWQ_REVERSE_ORDER = [0, 4, 1, 5, 2, 6, 3, 7]  # column j sits in nibble AWQ_REVERSE_ORDER[j]
SHIFTS = torch.arange(0, 32, 4)


def pack(values: torch.Tensor) -> torch.Tensor:
    """int [R, C] with entries in [0, 15] -> int32 [R, C / 8] in AWQ order."""
    R, C = values.shape
    assert C % 8 == 0, f"the packed dimension ({C}) must be a multiple of 8"
    assert int(values.min()) >= 0 and int(values.max()) <= 15, "values must be 4-bit"
    nibbles = values.to(torch.int64).view(R, C // 8, 8)[:, :, AWQ_ORDER]
    packed = (nibbles << SHIFTS.to(values.device)).sum(-1)  # < 2**32: fits, then wraps to int32
    return (packed - (packed >= 2**31).to(torch.int64) * 2**32).to(torch.int32)


def unpack(packed: torch.Tensor) -> torch.Tensor:
    """int32 [R, C / 8] in AWQ order -> int32 [R, C] in [0, 15], columns in their natural order."""
    R, C8 = packed.shape
    nibbles = (packed.to(torch.int64)[:, :, None] >> SHIFTS.to(packed.device)) & 0xF  # [R, C/8, 8]
    return nibbles[:, :, AWQ_REVERSE_ORDER].reshape(R, C8 * 8).to(torch.int32)


def quantize(weight: torch.Tensor, group_size: int):
    """Round-to-nearest asymmetric 4-bit quantization of W [N, K] in groups of `group_size` along K.
    Returns (qweight int32 [K, N/8], qzeros int32 [K/G, N/8], scales fp16 [K/G, N])."""
    N, K = weight.shape
    assert K % group_size == 0, f"group size {group_size} must divide the input width {K}"
    w = weight.float().t().reshape(K // group_size, group_size, N)  # [groups, G, N]
    lo, hi = w.amin(dim=1), w.amax(dim=1)  # [groups, N]
    scales = ((hi - lo) / 15).clamp(min=1e-5)
    zeros = (-torch.round(lo / scales)).clamp(0, 15)
    q = (torch.round(w / scales[:, None]) + zeros[:, None]).clamp(0, 15)
    scales = scales.half()
    return pack(q.reshape(K, N).to(torch.int32)), pack(zeros.to(torch.int32)), scales


def dequantize(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """The fp32 weight W [N, K] the packed tensors stand for."""
    q = unpack(qweight).float()  # [K, N]
    z = unpack(qzeros).float()  # [K/G, N]
    group = q.shape[0] // z.shape[0]
    w = (q - z.repeat_interleave(group, 0)) * scales.float().repeat_interleave(group, 0)
    return w.t().contiguous()
