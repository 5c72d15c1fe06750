"""The quantized linear layers a model runs, and the int8 activation dispatch around them.

W4Linear (W4A16): 4-bit weights in groups, 16-bit activations. It is loaded in the AutoAWQ "GEMM"
layout the hub uses (quant/pack.py): its parameters are named qweight / qzeros / scales (and bias)
like the checkpoint's, so the families' loaders fill them the way they fill fp16 weights, fused
q/k/v and gate/up included (shards along N). `finalize()` then repacks them once into the layout
the Triton kernels read and drops the checkpoint layout.

W8A8Linear (SmoothQuant, the vision encoders): int8 x int8 -> int32 with per-output-channel
symmetric weights and per-token dynamic activations, fp16/bf16 out. A norm or MLP activation whose
output a W8A8Linear reads is fused with the quantization of that output (`norm_input`,
`act_input`), so the linear receives a `Quantized` pair.

Off the GPU every layer runs the kernels' PyTorch references.
"""
from collections import namedtuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from tinyvila.errors import CheckpointError
from tinyvila.kernels import int8_gemm, quantize_int8
from tinyvila.kernels.silu_mul import silu_mul
from tinyvila.kernels.w4a16 import GEMV_MAX_M, gemv, repack_awq, w4a16_linear, w4a16_linear_ref

PACK = 8  # 4-bit values per int32

# --------------------------------------------------------------------------- W4A16


class W4Linear(nn.Module):
    """y = x W^T + b with W [N, K] stored as 4-bit groups of `group_size` along K.

    `shard_sizes` (q/k/v or gate/up fused into one GEMM) splits N the way FusedLinear does."""

    def __init__(self, in_features: int, out_features: int, group_size: int, bias: bool, shard_sizes=None):
        super().__init__()
        K, N, G = in_features, out_features, group_size
        if K % G or N % PACK:
            raise CheckpointError(f"a 4-bit linear {K}->{N} needs the group size ({G}) to divide {K} and "
                                  f"{N} to be a multiple of 8")
        self.in_features, self.out_features, self.group_size = K, N, G
        if shard_sizes is not None:
            self.shard_sizes = list(shard_sizes)
        keep = dict(requires_grad=False)
        self.qweight = nn.Parameter(torch.empty(K, N // PACK, dtype=torch.int32), **keep)
        self.qzeros = nn.Parameter(torch.empty(K // G, N // PACK, dtype=torch.int32), **keep)
        self.scales = nn.Parameter(torch.empty(K // G, N, dtype=torch.float16), **keep)
        self.bias = nn.Parameter(torch.empty(N)) if bias else None
        self.packed_names = None  # the kernels' layout (buffers "w4_<name>"), after finalize()

    @classmethod
    def like(cls, linear: nn.Linear, group_size: int) -> "W4Linear":
        """An empty 4-bit layer in place of `linear` (same widths, bias, fused shards, device)."""
        with torch.device(linear.weight.device):
            new = cls(linear.in_features, linear.out_features, group_size, linear.bias is not None,
                      getattr(linear, "shard_sizes", None))
            if linear.bias is not None:
                new.bias = nn.Parameter(torch.empty(linear.bias.shape, dtype=linear.bias.dtype),
                                        requires_grad=False)  # not empty_like: see layers.materialize
        return new

    @property
    def packed(self) -> dict | None:
        """The kernels' tensors by name, from the buffers (so they follow the module's device)."""
        if self.packed_names is None:
            return None
        return {name: getattr(self, "w4_" + name) for name in self.packed_names}

    def shard(self, tensor: torch.Tensor, index: int, leaf: str) -> torch.Tensor:
        """The rows (output channels) of shard `index`: packed tensors hold 8 of them per int32."""
        start, size = sum(self.shard_sizes[:index]), self.shard_sizes[index]
        if leaf in ("qweight", "qzeros"):
            return tensor.narrow(1, start // PACK, size // PACK)
        return tensor.narrow(1 if leaf == "scales" else 0, start, size)

    @torch.no_grad()
    def finalize(self, dtype: torch.dtype) -> None:
        """Repack into the kernels' layout once, after loading; the checkpoint layout is freed."""
        packed = repack_awq(self.qweight.data, self.qzeros.data, self.scales.data, dtype)
        for name, t in packed.items():
            self.register_buffer("w4_" + name, t, persistent=False)
        self.packed_names = list(packed)
        del self.qweight, self.qzeros, self.scales

    def forward(self, x: torch.Tensor, sums: bool = False):
        """y, or with `sums` where the decode GEMV runs (a GPU, rows <= GEMV_MAX_M) its w4a16.Sums
        for add_rmsnorm or rope_append to read (no split-K tail at the GEMV's end)."""
        packed = self.packed
        if packed is None:
            raise RuntimeError("W4Linear used before finalize()")
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if sums and self._sums_apply(x2):
            return gemv(x2, packed, self.group_size, self.bias, sums=True)
        run = w4a16_linear if x.is_cuda else w4a16_linear_ref  # CPUs take the PyTorch reference
        y = run(x2, packed, self.group_size, self.bias)
        return y.reshape(*shape[:-1], self.out_features)

    def swiglu(self, gate_up: torch.Tensor, sums: bool = False):
        """down(silu(gate) * up) for one or two decode rows, the GEMV taking gate|up [.., 2K] (read
        by its fp32 step itself, no SiLU-mul kernel and round trip in between; its fp16x2 step runs
        SiLU-mul first); None where that path does not apply (the CPU, prefill rows), and the caller
        runs the two steps. sums: as in forward."""
        rows = gate_up.reshape(-1, gate_up.shape[-1])
        if not gate_up.is_cuda or rows.shape[0] > GEMV_MAX_M or self.packed is None or rows.stride(-1) != 1:
            return None
        if sums and self._sums_apply(rows):
            return gemv(rows, self.packed, self.group_size, self.bias, swiglu=True, sums=True)
        y = gemv(rows, self.packed, self.group_size, self.bias, swiglu=True)
        return y.reshape(*gate_up.shape[:-1], self.out_features)

    def _sums_apply(self, rows: torch.Tensor) -> bool:
        return rows.is_cuda and rows.shape[0] <= GEMV_MAX_M and rows.stride(-1) == 1

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, group_size={self.group_size}"


# --------------------------------------------------------------------------- W8A8

# int8 activations [M, K] (rows as quantize_int8 lays them out), fp32 per-token scales [M], and the
# leading shape the M rows stand for
Quantized = namedtuple("Quantized", "q scale lead")

# model activation name -> the fused activation + quantize kernel's name
ACT_KERNEL = {"gelu": "gelu", "gelu_pytorch_tanh": "gelu_pytorch_tanh", "gelu_new": "gelu_pytorch_tanh",
              "quick_gelu": "quick_gelu", "silu": "silu_mul"}


def _kernels(cuda: bool):
    if cuda:
        return (quantize_int8.quantize_per_token, quantize_int8.layernorm_quant, quantize_int8.rmsnorm_quant,
                quantize_int8.act_quant, int8_gemm.int8_linear)
    return (quantize_int8.quantize_per_token_ref, quantize_int8.layernorm_quant_ref, quantize_int8.rmsnorm_quant_ref,
            quantize_int8.act_quant_ref, int8_gemm.int8_linear_ref)


def flat(x: torch.Tensor) -> torch.Tensor:
    """x [..., C] as rows [M, C]."""
    return x.reshape(-1, x.shape[-1])


class W8A8Linear(nn.Module):
    """y = dequant(int8(x) @ int8(W)^T) + b. Takes a 16-bit tensor (quantized per token here) or a
    `Quantized` pair from a fused norm / activation kernel."""

    def __init__(self, in_features: int, out_features: int, bias: bool, dtype: torch.dtype):
        super().__init__()
        self.in_features, self.out_features, self.dtype = in_features, out_features, dtype
        self.register_buffer("weight_int8", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("weight_scale", torch.ones(out_features, dtype=torch.float32))
        self.register_buffer("bias", torch.zeros(out_features, dtype=dtype) if bias else None)
        self.prepared = None  # the GEMM kernel's weight layout, made once on first use

    @classmethod
    @torch.no_grad()
    def from_float(cls, linear: nn.Linear) -> "W8A8Linear":
        w = linear.weight
        new = cls(linear.in_features, linear.out_features, linear.bias is not None, w.dtype).to(w.device)
        q, s = quantize_int8.quantize_weight_per_channel(w.float())
        new.weight_int8.copy_(q)
        new.weight_scale.copy_(s)
        if linear.bias is not None:
            new.bias.copy_(linear.bias)
        return new

    def forward(self, x) -> torch.Tensor:
        if not isinstance(x, Quantized):
            quantize = _kernels(x.is_cuda)[0]
            x = Quantized(*quantize(flat(x)), x.shape[:-1])
        cuda = x.q.is_cuda
        if cuda and (self.prepared is None or self.prepared.device != x.q.device):
            self.prepared = int8_gemm.prepare_int8_weight(self.weight_int8)
        linear = _kernels(cuda)[4]
        y = linear(x.q, x.scale, self.prepared if cuda else self.weight_int8, self.weight_scale, self.bias,
                   out_dtype=self.dtype)
        return y.reshape(*x.lead, self.out_features)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, int8"


def norm_input(norm: nn.Module, x: torch.Tensor, consumer: nn.Module):
    """norm(x), or, when the linear reading it is W8A8, the norm fused with per-token quantization."""
    if not isinstance(consumer, W8A8Linear):
        return norm(x)
    _, layernorm_quant, rmsnorm_quant, _, _ = _kernels(x.is_cuda)
    if isinstance(norm, nn.LayerNorm):
        q, s = layernorm_quant(flat(x), norm.weight, norm.bias, norm.eps)
    else:
        q, s = rmsnorm_quant(flat(x), norm.weight, norm.eps)
    return Quantized(q, s, x.shape[:-1])


def act_input(act_name: str, act, h: torch.Tensor, consumer: nn.Module, gated: bool = False):
    """The MLP activation of h (silu(gate) * up when `gated`), fused with quantization when the
    linear reading it is W8A8."""
    if not isinstance(consumer, W8A8Linear):
        if gated and h.is_cuda and act is F.silu:  # one Triton kernel, reading gate/up once
            return silu_mul(h.contiguous(), width=getattr(consumer, "padded_width", None))
        if gated:
            gate, up = h.chunk(2, dim=-1)
            return act(gate) * up
        return act(h)
    kernel = "silu_mul" if gated else ACT_KERNEL.get(act_name)
    if kernel is None or (kernel == "silu_mul") != gated:
        raise CheckpointError(f"W8A8: no fused kernel for the activation {act_name!r}")
    _, _, _, act_quant, _ = _kernels(h.is_cuda)
    q, s = act_quant(flat(h), kernel)
    return Quantized(q, s, h.shape[:-1])
