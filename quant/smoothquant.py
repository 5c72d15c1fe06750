"""SmoothQuant W8A8 for the vision encoders (CLIP, SigLIP, Qwen2.5-VL's ViT): calibration,
smoothing, quantization and writing the encoder's file.

Every linear of the encoder blocks runs int8 x int8 -> int32 (models/quantized.py: W8A8Linear);
attention, softmax and the residual stream stay 16-bit. The linears that read a norm's output
(qkv, fc1 / gate-up) are smoothed first: s_j = max|X_j|^alpha / max|W_j|^(1 - alpha) moves
activation outliers into the weights, folded as norm.weight /= s (and its bias) and W[:, j] *= s,
which leaves the fp model's function unchanged.

The result is saved as `vision_w8a8.safetensors` beside a checkpoint
(models/quantized_checkpoint.py reads it).
"""
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import save_file

from tinyvila.models.layers import replace_module
from tinyvila.models.quantized import W8A8Linear, flat
from tinyvila.models.quantized_checkpoint import W8A8_FILE, block_linears, encoder_blocks, smoothing_pairs


@torch.no_grad()
def activation_maxima(model: nn.Module, run) -> dict:
    """max |x| per input channel of every smoothed linear, over whatever `run()` feeds the encoder."""
    maxima, hooks = {}, []
    for prefix, block in encoder_blocks(model):
        for _, linear in smoothing_pairs(block):
            name = f"{prefix}.{linear}"

            def hook(module, args, name=name):
                m = flat(args[0]).abs().amax(0).float()
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
    names = []
    for prefix, block in encoder_blocks(model):
        for name in block_linears(block):
            replace_module(block, name, W8A8Linear.from_float(block.get_submodule(name)))
            names.append(f"{prefix}.{name}")
    return names


def save_w8a8(model: nn.Module, folder, alpha: float) -> Path:
    """Write the quantized encoder (and its smoothed norms) as `folder`/vision_w8a8.safetensors."""
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
