"""SmoothQuant W8A8 for the vision encoders (CLIP, SigLIP, Qwen2.5-VL's ViT).

Every linear of the encoder blocks runs int8 x int8 -> int32 with per-output-channel symmetric
weights and per-token dynamic activations, fp16/bf16 out; attention, softmax and the residual
stream stay 16-bit. The linears that read a norm's output (qkv, fc1 / gate-up) are smoothed first:
s_j = max|X_j|^alpha / max|W_j|^(1 - alpha) moves activation outliers into the weights, folded as
norm.weight /= s (and its bias) and W[:, j] *= s, which leaves the fp model's function unchanged.
The norm and the quantization of its output are one fused kernel, as are the MLP activation and
the quantization of its output.

Saved in its own file, `vision_w8a8.safetensors`, beside a checkpoint (names in tinyvila's module
namespace: `<linear>.weight_int8`, `<linear>.weight_scale`, `<linear>.bias`, and the smoothed
norms' `weight` / `bias`), so other loaders of the checkpoint never see it.
"""
from collections import namedtuple
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from tinyvila.errors import CheckpointError

W8A8_FILE = "vision_w8a8.safetensors"  # listed in loader.SIDE_FILES: not a checkpoint shard
# int8 activations [M, K] (rows as quantize_int8 lays them out), fp32 per-token scales [M], and the
# leading shape the M rows stand for
Quantized = namedtuple("Quantized", "q scale lead")

# model activation name -> the fused activation + quantize kernel's name
ACT_KERNEL = {"gelu": "gelu", "gelu_pytorch_tanh": "gelu_pytorch_tanh", "gelu_new": "gelu_pytorch_tanh",
              "quick_gelu": "quick_gelu", "silu": "silu_mul"}


def _kernels(cuda: bool):
    from tinyvila.kernels import int8_gemm, quantize_int8

    if cuda:
        return (quantize_int8.quantize_per_token, quantize_int8.layernorm_quant, quantize_int8.rmsnorm_quant,
                quantize_int8.act_quant, int8_gemm.int8_linear)
    return (quantize_int8.quantize_per_token_ref, quantize_int8.layernorm_quant_ref, quantize_int8.rmsnorm_quant_ref,
            quantize_int8.act_quant_ref, int8_gemm.int8_linear_ref)


def _flat(x: torch.Tensor) -> torch.Tensor:
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
        from tinyvila.kernels.quantize_int8 import quantize_weight_per_channel

        w = linear.weight
        new = cls(linear.in_features, linear.out_features, linear.bias is not None, w.dtype).to(w.device)
        q, s = quantize_weight_per_channel(w.float())
        new.weight_int8.copy_(q)
        new.weight_scale.copy_(s)
        if linear.bias is not None:
            new.bias.copy_(linear.bias)
        return new

    def forward(self, x) -> torch.Tensor:
        if not isinstance(x, Quantized):
            quantize = _kernels(x.is_cuda)[0]
            x = Quantized(*quantize(_flat(x)), x.shape[:-1])
        cuda = x.q.is_cuda
        if cuda and (self.prepared is None or self.prepared.device != x.q.device):
            from tinyvila.kernels.int8_gemm import prepare_int8_weight

            self.prepared = prepare_int8_weight(self.weight_int8)
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
        q, s = layernorm_quant(_flat(x), norm.weight, norm.bias, norm.eps)
    else:
        q, s = rmsnorm_quant(_flat(x), norm.weight, norm.eps)
    return Quantized(q, s, x.shape[:-1])


def act_input(act_name: str, act, h: torch.Tensor, consumer: nn.Module, gated: bool = False):
    """The MLP activation of h (silu(gate) * up when `gated`), fused with quantization when the
    linear reading it is W8A8."""
    if not isinstance(consumer, W8A8Linear):
        if gated and h.is_cuda and act is F.silu:  # one Triton kernel, reading gate/up once
            from tinyvila.kernels.silu_mul import silu_mul

            return silu_mul(h.contiguous(), width=getattr(consumer, "padded_width", None))
        if gated:
            gate, up = h.chunk(2, dim=-1)
            return act(gate) * up
        return act(h)
    kernel = "silu_mul" if gated else ACT_KERNEL.get(act_name)
    if kernel is None or (kernel == "silu_mul") != gated:
        raise CheckpointError(f"W8A8: no fused kernel for the activation {act_name!r}")
    _, _, _, act_quant, _ = _kernels(h.is_cuda)
    q, s = act_quant(_flat(h), kernel)
    return Quantized(q, s, h.shape[:-1])


# --------------------------------------------------------------------------- the encoders' layers

def encoder_blocks(model: nn.Module):
    """(prefix, block) for every block of the family's vision encoder."""
    from tinyvila.models.layers import ViTLayer
    from tinyvila.models.qwen2_5_vl import VisionBlock

    return [(n, m) for n, m in model.named_modules() if isinstance(m, (ViTLayer, VisionBlock))]


def smoothing_pairs(block) -> list:
    """(norm, linear) pairs whose linear reads the norm's output; they get smoothed."""
    if hasattr(block, "layer_norm1"):  # CLIP / SigLIP
        return [("layer_norm1", "self_attn.qkv_proj"), ("layer_norm2", "mlp.fc1")]
    return [("norm1", "attn.qkv"), ("norm2", "mlp.gate_up_proj")]  # Qwen2.5-VL


def block_linears(block) -> list:
    if hasattr(block, "layer_norm1"):
        return ["self_attn.qkv_proj", "self_attn.out_proj", "mlp.fc1", "mlp.fc2"]
    return ["attn.qkv", "attn.proj", "mlp.gate_up_proj", "mlp.down_proj"]


@torch.no_grad()
def activation_maxima(model: nn.Module, run) -> dict:
    """max |x| per input channel of every smoothed linear, over whatever `run()` feeds the encoder."""
    maxima, hooks = {}, []
    for prefix, block in encoder_blocks(model):
        for _, linear in smoothing_pairs(block):
            name = f"{prefix}.{linear}"

            def hook(module, args, name=name):
                m = _flat(args[0]).abs().amax(0).float()
                maxima[name] = torch.maximum(maxima[name], m) if name in maxima else m

            hooks.append(block.get_submodule(linear).register_forward_pre_hook(hook))
    try:
        run()
    finally:
        for h in hooks:
            h.remove()
    return maxima


@torch.no_grad()
def smooth(model: nn.Module, maxima: dict, alpha: float = 0.5) -> None:
    """Fold s = max|X|^alpha / max|W|^(1 - alpha) into each (norm, linear) pair."""
    for prefix, block in encoder_blocks(model):
        for norm_name, linear_name in smoothing_pairs(block):
            norm, linear = block.get_submodule(norm_name), block.get_submodule(linear_name)
            x_max = maxima[f"{prefix}.{linear_name}"].to(linear.weight.device)
            w_max = linear.weight.abs().amax(0).float()
            s = (x_max.clamp(min=1e-5) ** alpha / w_max.clamp(min=1e-5) ** (1 - alpha)).clamp(min=1e-5)
            norm.weight.div_(s.to(norm.weight.dtype))
            if getattr(norm, "bias", None) is not None:
                norm.bias.div_(s.to(norm.bias.dtype))
            linear.weight.mul_(s.to(linear.weight.dtype))


def quantize_encoder(model: nn.Module) -> list:
    """Swap every encoder-block linear for its W8A8 version; returns the swapped names."""
    from tinyvila.models.layers import replace_module

    names = []
    for prefix, block in encoder_blocks(model):
        for name in block_linears(block):
            replace_module(block, name, W8A8Linear.from_float(block.get_submodule(name)))
            names.append(f"{prefix}.{name}")
    return names


def save_w8a8(model: nn.Module, folder, alpha: float) -> Path:
    from safetensors.torch import save_file

    tensors = {}
    for prefix, block in encoder_blocks(model):
        for norm_name, _ in smoothing_pairs(block):
            for leaf, p in block.get_submodule(norm_name).named_parameters():
                tensors[f"{prefix}.{norm_name}.{leaf}"] = p.detach().cpu().contiguous()
        for name in block_linears(block):
            m = block.get_submodule(name)
            tensors[f"{prefix}.{name}.weight_int8"] = m.weight_int8.cpu().contiguous()
            tensors[f"{prefix}.{name}.weight_scale"] = m.weight_scale.cpu().contiguous()
            if m.bias is not None:
                tensors[f"{prefix}.{name}.bias"] = m.bias.cpu().contiguous()
    path = Path(folder) / W8A8_FILE
    save_file(tensors, str(path), metadata={"format": "pt", "tinyvila": "w8a8 vision encoder",
                                            "alpha": str(alpha)})
    return path


@torch.no_grad()
def load_w8a8(model: nn.Module, path) -> int:
    """Turn the encoder into its W8A8 version from a vision_w8a8.safetensors file; returns the
    number of int8 linears."""
    from tinyvila.loader import iter_tensors
    from tinyvila.models.layers import replace_module

    tensors = dict(iter_tensors([Path(path)]))
    count = 0
    for prefix, block in encoder_blocks(model):
        for norm_name, _ in smoothing_pairs(block):
            for leaf, p in block.get_submodule(norm_name).named_parameters():
                key = f"{prefix}.{norm_name}.{leaf}"
                if key not in tensors or tuple(tensors[key].shape) != tuple(p.shape):
                    raise CheckpointError(f"{path}: {key} is missing or has the wrong shape")
                p.copy_(tensors.pop(key))
        for name in block_linears(block):
            old = block.get_submodule(name)
            key = f"{prefix}.{name}"
            w = tensors.pop(key + ".weight_int8", None)
            s = tensors.pop(key + ".weight_scale", None)
            if w is None or s is None or tuple(w.shape) != (old.out_features, old.in_features):
                raise CheckpointError(f"{path}: {key} is missing or has the wrong shape")
            new = W8A8Linear(old.in_features, old.out_features, old.bias is not None, old.weight.dtype)
            new.weight_int8.copy_(w)
            new.weight_scale.copy_(s)
            if old.bias is not None:
                new.bias.copy_(tensors.pop(key + ".bias"))
            replace_module(block, name, new.to(old.weight.device))
            count += 1
    if tensors:
        raise CheckpointError(f"{path}: unexpected tensors {sorted(tensors)[:3]}")
    return count
