"""Quantized checkpoints read into a model: AWQ 4-bit linears and the W8A8 vision encoder file.

Which linears are 4-bit is read from the checkpoint itself (the modules that have a qweight), so
`modules_to_not_convert` and a quantized or plain lm_head need no special case.

The SmoothQuant encoder is saved in its own file, `vision_w8a8.safetensors`, beside a checkpoint
(names in tinyvila's module namespace: `<linear>.weight_int8`, `<linear>.weight_scale`,
`<linear>.bias`, and the smoothed norms' `weight` / `bias`), so other loaders of the checkpoint
never see it. quant/smoothquant.py writes it.
"""
from pathlib import Path

import torch
import torch.nn as nn

from tinyvila.errors import CheckpointError
from tinyvila.loader import iter_tensors, progress_bar, tensor_shapes

from .layers import ViTLayer, fused_target, replace_module
from .quantized import W4Linear, W8A8Linear
from .qwen2_5_vl import VisionBlock
from .qwen3_vl import VisionBlock as Qwen3VisionBlock

W8A8_FILE = "vision_w8a8.safetensors"  # listed in loader.SIDE_FILES: not a checkpoint shard

# --------------------------------------------------------------------------- AWQ (W4A16)


def awq_config(config: dict, *more: dict) -> dict | None:
    """The checkpoint's quantization_config if it is AWQ in a layout tinyvila reads (the GEMM
    layout, 4 bits, zero points); None for an unquantized checkpoint; otherwise a clear error."""
    q = next((c["quantization_config"] for c in (config, config.get("text_config") or {}, *more)
              if isinstance(c.get("quantization_config"), dict)), None)
    if q is None:
        return None
    method = str(q.get("quant_method", "")).lower()
    if method != "awq":
        raise CheckpointError(f"quantization method {method!r} is not supported (tinyvila reads AWQ checkpoints "
                              f"in the AutoAWQ GEMM layout)")
    version = str(q.get("version", "gemm")).lower()
    if version != "gemm":
        raise CheckpointError(f"AWQ version {version!r} is not supported (tinyvila reads the 'gemm' layout)")
    if int(q.get("bits", q.get("w_bit", 4))) != 4 or not q.get("zero_point", True):
        raise CheckpointError("only 4-bit AWQ with zero points is supported")
    return q


def convert_to_w4(model: nn.Module, entries) -> int:
    """Swap the linears that the checkpoint stores as qweight/qzeros/scales for W4Linear modules
    (on whatever device `model` lives, meta included). `entries`: (file, stored name, module name)
    as layers.checkpoint_entries gives them. Returns how many modules were converted."""
    params = dict(model.named_parameters())
    scales = {}  # module name -> (file, stored name) of one of its scales tensors
    for f, stored, target in entries:
        if target is not None and target.endswith(".scales"):
            name, _ = fused_target(target.removesuffix(".scales") + ".weight", params)
            scales.setdefault(name.removesuffix(".weight"), (f, stored))
    shapes = tensor_shapes(sorted({f for f, _ in scales.values()}))
    for module_name, (f, stored) in scales.items():
        try:
            old = model.get_submodule(module_name)
        except AttributeError:
            old = None
        if not isinstance(old, nn.Linear):
            raise CheckpointError(f"{stored}: the checkpoint stores {module_name!r} in 4 bits, but this model "
                                  f"has no such linear layer")
        groups = shapes[stored][0]
        if groups == 0 or old.in_features % groups:
            raise CheckpointError(f"{stored}: {groups} scale groups do not divide {old.in_features} inputs")
        replace_module(model, module_name, W4Linear.like(old, old.in_features // groups))
    return len(scales)


def finalize_w4(model: nn.Module, dtype: torch.dtype, progress=False) -> None:
    """Repack every loaded W4Linear into the kernels' layout (with a progress bar: loader.progress_bar)."""
    todo = [m for m in model.modules() if isinstance(m, W4Linear) and m.packed_names is None]
    with progress_bar(progress if todo else False, total=len(todo), desc="Repacking 4-bit weights",
                      unit="layer") as bar:
        for module in todo:
            module.finalize(dtype)
            bar.update()


# --------------------------------------------------------------------------- W8A8 vision encoders

def encoder_blocks(model: nn.Module):
    """(prefix, block) for every block of the family's vision encoder (CLIP, SigLIP, Qwen2.5-VL's and
    Qwen3-VL's ViTs)."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, (ViTLayer, VisionBlock, Qwen3VisionBlock))]


def smoothing_pairs(block) -> list:
    """(norm, linear) pairs whose linear reads the norm's output; they get smoothed."""
    if isinstance(block, ViTLayer):  # CLIP / SigLIP
        return [("layer_norm1", "self_attn.qkv_proj"), ("layer_norm2", "mlp.fc1")]
    if isinstance(block, Qwen3VisionBlock):
        return [("norm1", "attn.qkv"), ("norm2", "mlp.linear_fc1")]
    return [("norm1", "attn.qkv"), ("norm2", "mlp.gate_up_proj")]  # Qwen2.5-VL


def block_linears(block) -> list:
    """Every linear of an encoder block: all of them run in int8."""
    if isinstance(block, ViTLayer):
        return ["self_attn.qkv_proj", "self_attn.out_proj", "mlp.fc1", "mlp.fc2"]
    if isinstance(block, Qwen3VisionBlock):
        return ["attn.qkv", "attn.proj", "mlp.linear_fc1", "mlp.linear_fc2"]
    return ["attn.qkv", "attn.proj", "mlp.gate_up_proj", "mlp.down_proj"]


def _load_norms(block, prefix: str, tensors: dict, path) -> None:
    """The smoothed norms' weights (and biases) of one block."""
    for norm_name, _ in smoothing_pairs(block):
        for leaf, p in block.get_submodule(norm_name).named_parameters():
            key = f"{prefix}.{norm_name}.{leaf}"
            if key not in tensors or tuple(tensors[key].shape) != tuple(p.shape):
                raise CheckpointError(f"{path}: {key} is missing or has the wrong shape")
            p.copy_(tensors.pop(key))


@torch.no_grad()
def load_w8a8(model: nn.Module, path) -> int:
    """Turn the encoder into its W8A8 version from a vision_w8a8.safetensors file; returns the
    number of int8 linears."""
    tensors = dict(iter_tensors([Path(path)]))
    count = 0
    for prefix, block in encoder_blocks(model):
        _load_norms(block, prefix, tensors, path)
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
