"""W4A16 linear layers in the model, and reading AWQ checkpoints.

A quantized linear is loaded in the AutoAWQ "GEMM" layout the hub uses (quant/pack.py): its
parameters are named qweight / qzeros / scales (and bias) like the checkpoint's, so the families'
loaders fill them the way they fill fp16 weights, fused q/k/v and gate/up included (shards along N).
`finalize_w4(model)` then repacks every one of them once into the layout the Triton kernels read
and drops the checkpoint layout.

Which linears are quantized is read from the checkpoint itself (the modules that have a qweight),
so `modules_to_not_convert` and a quantized or plain lm_head need no special case.
"""
import torch
import torch.nn as nn

from tinyvila.errors import CheckpointError
from tinyvila.loader import progress_bar, tensor_shapes

PACK = 8  # 4-bit values per int32


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
        from tinyvila.kernels.w4a16 import repack_awq

        packed = repack_awq(self.qweight.data, self.qzeros.data, self.scales.data, dtype)
        for name, t in packed.items():
            self.register_buffer("w4_" + name, t, persistent=False)
        self.packed_names = list(packed)
        del self.qweight, self.qzeros, self.scales

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from tinyvila.kernels.w4a16 import w4a16_linear, w4a16_linear_ref

        packed = self.packed
        if packed is None:
            raise RuntimeError("W4Linear used before finalize()")
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        run = w4a16_linear if x.is_cuda else w4a16_linear_ref  # CPUs take the PyTorch reference
        y = run(x2, packed, self.group_size, self.bias)
        return y.reshape(*shape[:-1], self.out_features)

    def swiglu(self, gate_up: torch.Tensor) -> torch.Tensor | None:
        """down(silu(gate) * up) for one or two decode rows, the GEMV reading gate|up [.., 2K]
        itself (no SiLU-mul kernel and round trip in between); None where that path does not apply
        (the CPU, prefill rows), and the caller runs the two steps."""
        from tinyvila.kernels.w4a16 import GEMV_MAX_M, gemv

        rows = gate_up.reshape(-1, gate_up.shape[-1])
        if not gate_up.is_cuda or rows.shape[0] > GEMV_MAX_M or self.packed is None or rows.stride(-1) != 1:
            return None
        y = gemv(rows, self.packed, self.group_size, self.bias, swiglu=True)
        return y.reshape(*gate_up.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, group_size={self.group_size}"


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
    from tinyvila.models.layers import fused_target, replace_module

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
    """Repack every W4Linear of `model` (with a progress bar: loader.progress_bar)."""
    todo = [m for m in model.modules() if isinstance(m, W4Linear) and m.packed_names is None]
    with progress_bar(progress if todo else False, total=len(todo), desc="Repacking 4-bit weights",
                      unit="layer") as bar:
        for module in todo:
            module.finalize(dtype)
            bar.update()
