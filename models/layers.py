"""Shared blocks of every family: config parsing, RoPE, the decoder LM, the ViT encoder, weight loading.

Conventions: batch size 1 everywhere, so activations are [T, C] (tokens, channels) and attention
tensors [H, T, D]. Parameter names follow Hugging Face's, except that q/k/v and gate/up are fused
into `qkv_proj` and `gate_up_proj` at load time (one GEMM instead of three or two); `load_weights`
slices each checkpoint tensor into its shard of the fused parameter.
Numerics mirror transformers (RMSNorm in fp32 then cast, RoPE tables in fp32), so tiny fp32 models
match it to ~1e-5.
"""
import math
from dataclasses import dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open

from tinyvila.errors import CheckpointError, TinyVilaError
from tinyvila.kernels.decode_attention import decode_attention, decode_attention_rows
from tinyvila.kernels.retrieval import retrieval_attention
from tinyvila.kernels.rmsnorm import add_rmsnorm, rmsnorm
from tinyvila.kernels.rope import rope_
from tinyvila.kernels.rope_append import rope_append, rope_append_rows
from tinyvila.kernels.saliency import saliency_attention
from tinyvila.loader import iter_tensors, progress_bar

from .quantized import W4Linear, act_input, norm_input

# --------------------------------------------------------------------------- config

# transformers' class defaults, applied to fields a config.json leaves out (hub files are written
# as a diff against them, e.g. a vicuna text_config without rope_theta or num_key_value_heads).
TEXT_DEFAULTS = {
    "llama": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                  num_attention_heads=32, max_position_embeddings=2048, rms_norm_eps=1e-6,
                  sliding_window=None, qkv_bias=False, o_bias=False),
    "mistral": dict(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                    num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131072,
                    rms_norm_eps=1e-6, sliding_window=4096, qkv_bias=False, o_bias=False),
    "qwen2": dict(vocab_size=151936, hidden_size=4096, intermediate_size=22016, num_hidden_layers=32,
                  num_attention_heads=32, max_position_embeddings=32768, rms_norm_eps=1e-6,
                  sliding_window=None, qkv_bias=True, o_bias=False),
    "qwen3": dict(vocab_size=151936, hidden_size=4096, intermediate_size=22016, num_hidden_layers=32,
                  num_attention_heads=32, head_dim=128, max_position_embeddings=128000, rms_norm_eps=1e-6,
                  sliding_window=None, qkv_bias=False, o_bias=False, qk_norm=True),
}


@dataclass
class TextConfig:
    model_type: str = "llama"
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 0  # 0 = same as num_attention_heads
    head_dim: int = 0  # 0 = hidden_size // num_attention_heads
    hidden_act: str = "silu"
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # {"rope_type": "linear"|"llama3"|..., ...}
    max_position_embeddings: int = 2048
    sliding_window: int | None = None
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    mrope_section: list | None = None  # Qwen2.5-VL multimodal RoPE: frequencies per (t, h, w)
    mrope_interleaved: bool = False  # Qwen3-VL: the (t, h, w) frequencies alternate instead of forming chunks
    qk_norm: bool = False  # Qwen3: RMSNorm over each head of q and k before RoPE

    @classmethod
    def from_dict(cls, d: dict, model_type: str | None = None, tie_word_embeddings: bool | None = None):
        model_type = model_type or d.get("model_type") or "llama"
        base = "qwen2" if model_type.startswith("qwen2") else "qwen3" if model_type.startswith("qwen3") else model_type
        if base not in TEXT_DEFAULTS:
            raise CheckpointError(f"unsupported language model type {model_type!r} "
                                  f"(supported: {', '.join(TEXT_DEFAULTS)})")
        v = dict(TEXT_DEFAULTS[base], model_type=model_type)
        known = {f.name for f in fields(cls)}
        v.update({k: d[k] for k in known if k in d and d[k] is not None and k != "model_type"})
        if "attention_bias" in d:  # Llama/Mistral spelling: one flag for q, k, v and o
            v["qkv_bias"] = v["o_bias"] = bool(d["attention_bias"])
        if base == "mistral" and "sliding_window" in d:
            v["sliding_window"] = d["sliding_window"]  # an explicit null disables it
        if base == "qwen3":
            v["sliding_window"] = None
        if base == "qwen2":  # Qwen2 uses its window only when use_sliding_window is set
            v["sliding_window"] = d.get("sliding_window") if d.get("use_sliding_window") else None
        # RoPE: transformers 4.x spells rope_theta / rope_scaling, 5.x rope_parameters.
        rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
        v["rope_theta"] = float(rope.get("rope_theta", d.get("rope_theta") or cls.rope_theta))
        kind = rope.get("rope_type", rope.get("type", "default"))
        if "mrope_section" in rope:
            v["mrope_section"] = list(rope["mrope_section"])
            v["mrope_interleaved"] = bool(rope.get("mrope_interleaved", False))
            kind = "default"
        v["rope_scaling"] = None if kind in ("default", "mrope", None) else dict(rope, rope_type=kind)
        if tie_word_embeddings is not None and "tie_word_embeddings" not in d:
            v["tie_word_embeddings"] = tie_word_embeddings
        for f in fields(cls):  # a wrongly typed size in config.json would fail deep inside torch
            if f.type in (int, "int") and f.name in d and d[f.name] is not None and (
                    isinstance(v[f.name], bool) or not isinstance(v[f.name], int) or v[f.name] < 0):
                raise CheckpointError(f"config.json: {f.name}={v.get(f.name)!r} should be a non-negative integer")
        cfg = cls(**v)
        cfg.num_key_value_heads = cfg.num_key_value_heads or cfg.num_attention_heads
        cfg.head_dim = cfg.head_dim or cfg.hidden_size // cfg.num_attention_heads
        return cfg


# --------------------------------------------------------------------------- small ops

ACTIVATIONS = {
    "silu": F.silu,
    "gelu": F.gelu,  # exact erf GELU
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),
}


def activation(name: str):
    if name not in ACTIVATIONS:
        raise CheckpointError(f"unsupported activation {name!r} (supported: {', '.join(ACTIVATIONS)})")
    return ACTIVATIONS[name]


class Embedding(nn.Embedding):
    """An nn.Embedding without the random init: its rows always come from the checkpoint, and
    nn.Embedding's normal_ on the meta device (where models are built) imports torch._dynamo."""

    def reset_parameters(self) -> None:
        pass


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        # Normalise in fp32, cast back, then scale: the order transformers uses.
        if x.is_cuda and x.dtype == self.weight.dtype:  # one Triton kernel instead of six
            return rmsnorm(x.contiguous(), self.weight, self.eps)
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


class FusedLinear(nn.Linear):
    """One GEMM for several checkpoint linears sharing an input (q/k/v, gate/up)."""

    def __init__(self, in_features: int, shard_sizes: list[int], bias: bool):
        super().__init__(in_features, sum(shard_sizes), bias=bias)
        self.shard_sizes = list(shard_sizes)

    def shard(self, tensor: torch.Tensor, index: int, leaf: str = "weight") -> torch.Tensor:
        start = sum(self.shard_sizes[:index])
        return tensor.narrow(0, start, self.shard_sizes[index])


# Checkpoint module name -> (fused module name, shard index).
PACKED = {"q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2),
          "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1)}


def fused_target(name: str, params) -> tuple[str, int | None]:
    """Where checkpoint tensor `name` lives in a module with parameters `params`: (parameter name,
    shard index), the shard index None unless q/k/v or gate/up were fused into one parameter."""
    prefix, _, leaf = name.rpartition(".")
    mod_path, _, mod_name = prefix.rpartition(".")
    if name not in params and mod_name in PACKED:
        fused, shard = PACKED[mod_name]
        return (f"{mod_path}.{fused}.{leaf}" if mod_path else f"{fused}.{leaf}"), shard
    return name, None


def param_view(module: nn.Module, name: str, shard: int | None, params=None, owners=None) -> torch.Tensor:
    """The part of `module`'s parameter `name` that a checkpoint tensor fills (a shard of a fused one)."""
    params = params if params is not None else dict(module.named_parameters())
    p = params[name]
    if shard is None:
        return p.data
    owner_name, _, leaf = name.rpartition(".")
    owner = owners[owner_name] if owners is not None else module.get_submodule(owner_name)
    return owner.shard(p.data, shard, leaf)


def load_weights(module: nn.Module, tensors, what: str = "checkpoint") -> None:
    """Copy (name, tensor) pairs into `module`'s already allocated parameters.

    Names must already be in the module's namespace (the family renames them). Every parameter
    must be filled exactly once and every tensor must have a home: anything else is a malformed
    checkpoint, reported with the tensor's name.
    """
    params = dict(module.named_parameters())
    owners = {n: m for n, m in module.named_modules()}
    needed = {}
    for name, p in params.items():
        owner = owners[name.rpartition(".")[0]]
        needed[name] = len(owner.shard_sizes) if hasattr(owner, "shard_sizes") else 1
    filled = {name: set() for name in params}
    unexpected = []
    for name, t in tensors:
        target, shard = fused_target(name, params)
        if target not in params:
            unexpected.append(name)
            continue
        dst = param_view(module, target, shard, params, owners)
        if tuple(dst.shape) != tuple(t.shape):
            raise CheckpointError(f"{what}: tensor {name!r} has shape {list(t.shape)}, expected "
                                  f"{list(dst.shape)} from config.json")
        with torch.no_grad():
            dst.copy_(t)
        filled[target].add(0 if shard is None else shard)
    if unexpected:
        more = f" and {len(unexpected) - 3} more" if len(unexpected) > 3 else ""
        raise CheckpointError(f"{what}: unexpected tensors {unexpected[:3]}{more}")
    missing = [n for n, got in filled.items() if len(got) < needed[n]]
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise CheckpointError(f"{what}: missing tensors for {missing[:3]}{more}")


def checkpoint_entries(model: nn.Module, path):
    """(file, stored name, module parameter name or None) for every tensor of a checkpoint folder,
    read from the safetensors headers only. None marks tensors the model never uses (e.g. vision
    layers past the feature layer). Families give `checkpoint_files(path)` and
    `module_name(folder, name)` (folder: the file's folder relative to `path`, "" at the top)."""
    for f in model.checkpoint_files(path):
        folder = f.parent.relative_to(path).as_posix()
        try:
            with safe_open(str(f), framework="pt", device="cpu") as handle:
                names = list(handle.keys())
        except Exception as e:
            raise CheckpointError(f"cannot read weights '{f}': {e} (truncated or corrupt file?)")
        for name in names:
            yield f, name, model.module_name("" if folder == "." else folder, name)


def load_checkpoint(model: nn.Module, path, progress=False) -> None:
    """Fill `model`'s parameters from the checkpoint folder `path` (see checkpoint_entries), with
    a progress bar over the bytes of its shards (loader.progress_bar)."""
    files = model.checkpoint_files(path)

    def tensors(bar):
        for f in files:
            folder, read = f.parent.relative_to(path).as_posix(), 0
            for name, t in iter_tensors([f]):
                target = model.module_name("" if folder == "." else folder, name)
                if target is not None:
                    yield target, t
                bar.update(t.numel() * t.element_size())
                read += t.numel() * t.element_size()
            bar.update(f.stat().st_size - read)  # the header: the bar ends at the shards' size

    with progress_bar(progress, total=sum(f.stat().st_size for f in files), desc="Loading weights",
                      unit="B", unit_scale=True, unit_divisor=1024) as bar:
        load_weights(model, tensors(bar), what=str(path))


def materialize(model: nn.Module, device) -> nn.Module:
    """`model.to_empty(device=device)`: uninitialised storage for a model built on the meta device.
    torch.empty instead of to_empty's torch.empty_like, whose meta path imports torch.fx's symbolic
    shapes and sympy, slow to import for a command that only wants an answer."""
    return model._apply(lambda t: torch.empty(t.shape, dtype=t.dtype, device=device))


def replace_module(root: nn.Module, name: str, new: nn.Module) -> None:
    """Put `new` at dotted path `name` inside `root` (quantized layers replacing 16-bit ones)."""
    parent, _, leaf = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, new)


def rename_key(name: str, renames) -> str:
    """Map a checkpoint key through (old prefix, new prefix) rules; the first match wins."""
    for old, new in renames:
        if name.startswith(old):
            return new + name[len(old):]
    return name


# --------------------------------------------------------------------------- RoPE

def rope_inv_freq(head_dim: int, theta: float, scaling: dict | None) -> torch.Tensor:
    """Inverse frequencies [head_dim/2] in fp32, with the position-independent scalings."""
    # Built on the CPU explicitly: models are constructed under torch.device("meta").
    steps = torch.arange(0, head_dim, 2, dtype=torch.int64, device="cpu").float()
    inv = 1.0 / (theta ** (steps / head_dim))
    kind = (scaling or {}).get("rope_type", "default")
    if kind == "linear":
        inv = inv / float(scaling["factor"])  # positions / factor, folded into the frequencies
    elif kind == "llama3":
        factor, lo, hi = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        old = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > old / lo, inv / factor, inv)
        smooth = (old / wavelen - lo) / (hi - lo)
        medium = (wavelen >= old / hi) & (wavelen <= old / lo)
        inv = torch.where(medium, (1 - smooth) * scaled / factor + smooth * scaled, scaled)
    elif kind != "default":
        raise CheckpointError(f"unsupported rope scaling {kind!r} (supported: linear, llama3)")
    return inv


def rope_cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor, mrope_section=None, mrope_axis=None):
    """cos/sin tables [T, head_dim] in fp32 for 1-D positions [T] or M-RoPE positions [3, T].
    mrope_axis (interleaved M-RoPE, Qwen3-VL): each frequency's position axis (mrope_axes), on
    the positions' device."""
    if positions.dim() == 1:
        freqs = positions.float()[:, None] * inv_freq[None, :]
    else:
        per_axis = positions.float()[:, :, None] * inv_freq[None, None, :]  # [3, T, D/2]
        if mrope_axis is not None:  # interleaved: each frequency from its own axis
            freqs = per_axis.gather(0, mrope_axis.expand(1, per_axis.shape[1], -1))[0]
        else:  # M-RoPE: frequency chunk i takes its angle from the t, h or w position in turn
            chunks = per_axis.split(list(mrope_section), dim=-1)
            freqs = torch.cat([c[i % 3] for i, c in enumerate(chunks)], dim=-1)
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos(), emb.sin()


def mrope_axes(mrope_section, n_freqs: int) -> torch.Tensor:
    """Interleaved M-RoPE: the position axis (0 t, 1 h, 2 w) of each of the n_freqs frequencies:
    h for i % 3 == 1 and w for i % 3 == 2 up to 3x their sections, t elsewhere."""
    axis = torch.zeros(n_freqs, dtype=torch.long, device="cpu")  # models are built under torch.device("meta")
    axis[1:mrope_section[1] * 3:3] = 1
    axis[2:mrope_section[2] * 3:3] = 2
    return axis


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE on x [H, T, D] with tables [T, D] already in x's dtype."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


# --------------------------------------------------------------------------- decoder LM

CAUSAL = "causal"  # attention_mask's marker for plain causal attention over a fresh cache


def sums_or_output(linear: nn.Module, x: torch.Tensor):
    """linear(x) for a reader that also takes w4a16.Sums (add_rmsnorm, rope_append): a 4-bit decode
    GEMV then leaves its output as fp32 sums in its workspace, which the reader rounds and zeroes,
    so that the GEMV ends at its split-K adds, without its tail (0.7-2.0 us a call on an H100)."""
    return linear(x, sums=True) if isinstance(linear, W4Linear) else linear(x)


class Attention(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        q, kv = self.n_heads * self.head_dim, self.n_kv * self.head_dim
        self.qkv_proj = FusedLinear(cfg.hidden_size, [q, kv, kv], bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(q, cfg.hidden_size, bias=cfg.o_bias)
        # Qwen3: RMSNorm over each head of q and k, before RoPE
        norm = (lambda: RMSNorm(cfg.head_dim, cfg.rms_norm_eps)) if cfg.qk_norm else (lambda: None)
        self.q_norm, self.k_norm = norm(), norm()

    def _qk_normed(self, qkv: torch.Tensor) -> torch.Tensor:
        """The fused projection [T, (H + 2 H_kv) D] with q and k RMS-normed per head (Qwen3)."""
        if self.q_norm is None:
            return qkv
        T, D = qkv.shape[0], self.head_dim
        q, k, v = qkv.split([self.n_heads * D, self.n_kv * D, self.n_kv * D], dim=-1)
        q, k = self.q_norm(q.reshape(T, -1, D)), self.k_norm(k.reshape(T, -1, D))
        return torch.cat([q.reshape(T, -1), k.reshape(T, -1), v], dim=-1)

    def forward(self, x, cos, sin, kv, start: int, mask) -> torch.Tensor:
        """Attention of x's T tokens (cache slots start..start+T) over the cache."""
        q, k_cache, v_cache = self._store(x, cos, sin, kv, start)
        return self._attend(q, k_cache, v_cache, start, mask)

    def scored(self, x, cos, sin, kv, start: int, mask, vis_slots, score_from: int, window):
        """forward's output and the retrieval scores r [H_kv, n_vis]: the attention mass the queries
        from row `score_from` on put on each visual token (cache slots `vis_slots`), from the same
        kernel (score_from > 0: the rows before, the media, go through SDPA)."""
        q, k_cache, v_cache = self._store(x, cos, sin, kv, start)
        out, r = self._retrieval_attention(q[:, score_from:], k_cache, v_cache, start + score_from, vis_slots, window)
        if score_from == 0:
            return self.o_proj(out.reshape(x.shape[0], -1)), r
        return self._attend(q, k_cache, v_cache, start, mask), r

    def _store(self, x, cos, sin, kv, start: int):
        """Project x, rotate q and k, write k and v to cache slots start..: (q [H, T, D], this
        layer's K and V caches [H_kv, S_max, D])."""
        T = x.shape[0]
        q, k, v = self._qkv(x, cos, sin)
        k_cache, v_cache = kv  # [H_kv, S_max, D] views of this layer's cache
        k_cache[:, start:start + T] = k
        v_cache[:, start:start + T] = v
        return q, k_cache, v_cache

    def _qkv(self, x, cos, sin):
        """Project x [T, C] and rotate q and k: q [H, T, D], k and v [H_kv, T, D]."""
        T = x.shape[0]
        q, k, v = self._qk_normed(self.qkv_proj(x)).split(
            [self.n_heads * self.head_dim, self.n_kv * self.head_dim, self.n_kv * self.head_dim], dim=-1)
        q, k, v = (t.view(T, -1, self.head_dim) for t in (q, k, v))  # views into the fused projection
        if x.is_cuda:  # rotate in place with one Triton kernel each
            q, k = rope_(q, cos, sin).transpose(0, 1), rope_(k, cos, sin).transpose(0, 1)
        else:
            q, k = apply_rope(q.transpose(0, 1), cos, sin), apply_rope(k.transpose(0, 1), cos, sin)
        return q, k, v.transpose(0, 1)

    def rows(self, x, cos, sin, kvs, slots, masks) -> torch.Tensor:
        """One decode step of B conversations: row b of x [B, C] is conversation b's token at slot
        slots[b] of its own cache kvs[b] (mask masks[b]). The projections run once for all rows
        (one weight read), attention row by row over each row's own cache."""
        q, k, v = self._qkv(x, cos, sin)
        out = []
        for b, ((k_cache, v_cache), slot) in enumerate(zip(kvs, slots)):
            k_cache[:, slot] = k[:, b]
            v_cache[:, slot] = v[:, b]
            out.append(self._decode_row(q[:, b], k_cache, v_cache, slot, masks[b]))
        return self.o_proj(torch.cat(out))

    def _decode_row(self, q, k_cache, v_cache, slot: int, mask) -> torch.Tensor:
        """One token's attention, q [H, D], over cache slots 0..slot: [1, H * D]. Under GQA each KV
        head's query heads go as that head's queries, so the cache is read as it is, never repeated."""
        keys, values = k_cache[None, :, :slot + 1], v_cache[None, :, :slot + 1]
        out = F.scaled_dot_product_attention(q.view(1, self.n_kv, -1, self.head_dim), keys, values, attn_mask=mask)
        return out.reshape(1, -1)

    def static(self, x, cos, sin, kv, start, count, slots, vis_slots, window):
        """Attention of x's B rows (B fixed, the first `count` real) at cache slots `slots`
        (start.. , a device tensor), over the cache, with every shape and address fixed: what a
        CUDA graph captures (Triton retrieval kernel; start and count are read on the device).
        Returns the output and, with `vis_slots`, the retrieval scores r [H_kv, n_vis] of the
        real rows."""
        q, k, v = self._qkv(x, cos, sin)
        k_cache, v_cache = kv
        k_cache.index_copy_(1, slots, k)
        v_cache.index_copy_(1, slots, v)
        scored = vis_slots is not None
        out, r = retrieval_attention(q.transpose(0, 1), k_cache, v_cache, start,
                                     vis_slots if scored else slots[:0], window=window, scores=scored, count=count)
        return self.o_proj(out.reshape(x.shape[0], -1)), r

    def _attend(self, q, k_cache, v_cache, start: int, mask) -> torch.Tensor:
        """SDPA of q [H, T, D] over cache slots 0..start+T, then the output projection."""
        return self.o_proj(self._sdpa(q, k_cache, v_cache, start, mask))

    def _sdpa(self, q, k_cache, v_cache, start: int, mask) -> torch.Tensor:
        """SDPA of q [H, T, D] over cache slots 0..start+T: [T, H * D]."""
        T = q.shape[1]
        keys, values = k_cache[:, :start + T], v_cache[:, :start + T]
        if self.n_kv != self.n_heads:  # GQA: each KV head serves a group of query heads
            rep = self.n_heads // self.n_kv
            keys, values = keys.repeat_interleave(rep, 0), values.repeat_interleave(rep, 0)
        # SDPA's fused (flash / memory-efficient) kernels take 4-D inputs only: add the batch dim.
        q, keys, values = q[None], keys[None], values[None]
        if mask is CAUSAL:
            out = F.scaled_dot_product_attention(q, keys, values, is_causal=True)
        else:
            out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)
        return out[0].transpose(0, 1).reshape(T, -1)

    def _retrieval_attention(self, q, k_cache, v_cache, start, vis_slots, window):
        """q [H, T, D] -> (out [T, H, D], r [H_kv, n_vis]): Triton on a GPU; explicit softmax on a CPU."""
        if q.is_cuda:
            return retrieval_attention(q.transpose(0, 1), k_cache, v_cache, start, vis_slots, window=window)
        S = start + q.shape[1]
        rep = self.n_heads // self.n_kv
        keys = k_cache[:, :S].repeat_interleave(rep, 0).float()
        values = v_cache[:, :S].repeat_interleave(rep, 0).float()
        scores = q.float() @ keys.transpose(1, 2) * self.head_dim ** -0.5  # [H, T, S]
        slot = torch.arange(start, S)[:, None]
        key = torch.arange(S)[None, :]
        visible = (key <= slot) & ((slot - key < window) if window else True)
        p = torch.softmax(scores.masked_fill(~visible, float("-inf")), dim=-1)
        r = p[:, :, vis_slots].mean(1).view(self.n_kv, rep, -1).mean(1)
        return (p @ values).to(q.dtype).transpose(0, 1), r

    def decode(self, x, cos, sin, kv, slot, length, window, workspace):
        """One token (x [1, C]) at cache slot `slot` (device tensor), Triton kernels only between
        the projections: graph-capturable, no host sync."""
        k_cache, v_cache = kv
        norms = None if self.q_norm is None else (self.q_norm.weight, self.k_norm.weight, self.q_norm.eps)
        qkv = sums_or_output(self.qkv_proj, x)
        q = rope_append(qkv, cos, sin, k_cache, v_cache, slot, self.n_heads, self.n_kv, norms)
        out = decode_attention(q, k_cache, v_cache, length, window=window, workspace=workspace)
        return sums_or_output(self.o_proj, out.reshape(1, -1))

    def decode_batch(self, x, cos, sin, table, layer: int, slots, lengths, window, workspace):
        """decode for B conversations' tokens x [B, C], row b at slot slots[b] of its own cache (table:
        KVCache.address columns), attending over its first lengths[b] slots; graph-capturable."""
        norms = None if self.q_norm is None else (self.q_norm.weight, self.k_norm.weight, self.q_norm.eps)
        qkv = sums_or_output(self.qkv_proj, x)
        q = rope_append_rows(qkv, cos, sin, table, layer, slots, self.n_heads, self.n_kv, norms)
        out = decode_attention_rows(q, table, layer, lengths, self.n_kv, window=window, workspace=workspace)
        return sums_or_output(self.o_proj, out.reshape(x.shape[0], -1))


class MLP(nn.Module):
    def __init__(self, hidden: int, intermediate: int, act: str, bias: bool):
        super().__init__()
        self.gate_up_proj = FusedLinear(hidden, [intermediate, intermediate], bias=bias)
        self.down_proj = nn.Linear(intermediate, hidden, bias=bias)
        self.act_name, self.act = act, activation(act)

    def forward(self, x, sums: bool = False):
        """On a GPU, SiLU and the product run in one Triton kernel (act_input), or inside a 4-bit
        down projection's decode GEMV (W4Linear.swiglu; None where that does not apply).
        sums: for add_rmsnorm, which takes w4a16.Sums too (sums_or_output)."""
        gate_up = self.gate_up_proj(x)
        swiglu = getattr(self.down_proj, "swiglu", None) if self.act is F.silu else None
        y = swiglu(gate_up, sums=sums) if swiglu is not None else None
        if y is not None:
            return y
        h = act_input(self.act_name, self.act, gate_up, self.down_proj, gated=True)
        return sums_or_output(self.down_proj, h) if sums else self.down_proj(h)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size, cfg.hidden_act, cfg.mlp_bias)

    def forward(self, x, cos, sin, kv, start, mask) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, kv, start, mask)
        return x + self.mlp(self.post_attention_layernorm(x))

    def scored(self, x, cos, sin, kv, start, mask, vis_slots, score_from, window):
        """(the block's output, retrieval scores r [H_kv, n_vis]) (Attention.scored)."""
        attn, r = self.self_attn.scored(self.input_layernorm(x), cos, sin, kv, start, mask, vis_slots, score_from,
                                        window)
        x = x + attn
        return x + self.mlp(self.post_attention_layernorm(x)), r


class DecoderLM(nn.Module):
    """Llama / Mistral / Qwen2 decoder over a preallocated KV cache (batch 1).

    Prefill: `forward` (logits), `fill` (the cache only), `scored` (logits and every layer's
    retrieval scores of the visual tokens), `pruned` (FastV's pruning hook inside the pass),
    `static_prefill` (a short run of text tokens with fixed shapes, for a CUDA graph).
    Decode: `decode_step`, the graph-capturable GPU step."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        if not cfg.tie_word_embeddings:
            self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self._inv_freq = rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
        self._mrope_axis = mrope_axes(cfg.mrope_section, cfg.head_dim // 2) if cfg.mrope_interleaved else None

    def project(self, h: torch.Tensor) -> torch.Tensor:
        """fp32 logits for final hidden states h [T, C] (the output layer may be 4-bit)."""
        if self.cfg.tie_word_embeddings:
            return F.linear(h, self.embed_tokens.weight).float()
        return self.lm_head(h).float()

    deepstack_layers = 0  # Qwen3-VL: the first layers whose outputs get visual features added (set by the family)

    def embed_prompt(self, ids: torch.Tensor) -> torch.Tensor:
        """Input rows of a prompt to prefill: embed(ids), followed by `deepstack_layers` zero blocks
        of C columns where a DeepStack model's media features write what is added after each of
        its first layers (text rows add nothing)."""
        h = self.embed(ids)
        if not self.deepstack_layers:
            return h
        return torch.cat([h, h.new_zeros(h.shape[0], self.deepstack_layers * h.shape[1])], dim=1)

    def split_deepstack(self, h: torch.Tensor):
        """Rows [T, (1+D) C] from embed_prompt -> (h [T, C], DeepStack additions [T, D, C] or None)."""
        C = self.cfg.hidden_size
        if h.shape[1] == C:
            return h, None
        return h[:, :C].contiguous(), h[:, C:].view(h.shape[0], -1, C)  # the fused blocks need rows contiguous

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        # Placeholder ids (media tokens) may lie outside the table: clamp, the caller overwrites them.
        return self.embed_tokens(ids.clamp(0, self.cfg.vocab_size - 1))

    def attention_mask(self, T: int, start: int, device):
        """Boolean [T, start+T] mask (True = attend); None when every key is visible; CAUSAL when
        plain causal attention from slot 0 applies (SDPA's fused kernels need no mask then)."""
        window = self.cfg.sliding_window
        if T == 1 and (window is None or start + 1 <= window):
            return None
        if start == 0 and (window is None or T <= window):
            return CAUSAL
        q = torch.arange(start, start + T, device=device)[:, None]
        k = torch.arange(start + T, device=device)[None, :]
        mask = k <= q
        if window is not None:  # a query sees `window` keys, itself included
            mask &= q - k < window
        return mask

    def rope_tables(self, positions: torch.Tensor, dtype):
        """cos/sin [T, head_dim] for positions [T] or [3, T], in the activation dtype."""
        if self._inv_freq.device != positions.device:  # moved once, before any CUDA graph capture
            self._inv_freq = self._inv_freq.to(positions.device)
        if self._mrope_axis is not None and self._mrope_axis.device != positions.device:
            self._mrope_axis = self._mrope_axis.to(positions.device)
        cos, sin = rope_cos_sin(positions, self._inv_freq, self.cfg.mrope_section, self._mrope_axis)
        return cos.to(dtype), sin.to(dtype)

    def fused_blocks(self, h: torch.Tensor, attend, prune=None, extra=None) -> torch.Tensor:
        """All decoder blocks with the residual adds, norms and SwiGLU fused (Triton, GPU), the
        final norm included. attend(i, layer, x) is the attention of block i on its normed input
        (a tensor, or a 4-bit decode GEMV's w4a16.Sums: sums_or_output).
        prune: (K, rows_of) drops rows before block K: rows_of() gives the rows that go on.
        extra(i): rows added to block i's output, or None (DeepStack)."""
        eps, delta = self.cfg.rms_norm_eps, None  # each norm also adds the block output before it
        for i, layer in enumerate(self.layers):
            if prune is not None and i == prune[0]:
                rows = prune[1]()
                h, delta = h[rows], delta[rows]
            if delta is None:
                x = rmsnorm(h, layer.input_layernorm.weight, eps)
            else:
                x, h = add_rmsnorm(h, delta, layer.input_layernorm.weight, eps)
            x, h = add_rmsnorm(h, attend(i, layer, x), layer.post_attention_layernorm.weight, eps)
            added = extra(i) if extra is not None else None
            delta = layer.mlp(x, sums=added is None and prune is None)
            if added is not None:
                delta = delta + added
        return add_rmsnorm(h, delta, self.norm.weight, eps)[0]

    def forward(self, h: torch.Tensor, positions: torch.Tensor, cache, start: int, logits: str = "last"):
        """h: input embeddings [T, C] for cache slots start..start+T, positions: [T] (1-D RoPE) or
        [3, T] (M-RoPE). Returns fp32 logits [1, V] ("last") or [T, V] ("all")."""
        h = self._blocks(h, positions, cache, start)[0]
        return self.project(h if logits == "all" else h[-1:])

    def fill(self, h: torch.Tensor, positions: torch.Tensor, cache, start: int) -> None:
        """forward without the logits: only the cache slots start..start+T are written."""
        self._blocks(h, positions, cache, start)

    def scored(self, h, positions, cache, start: int, vis_slots: torch.Tensor, score_from: int = 0):
        """forward's last logits and r [L, H_kv, n_vis]: each layer's retrieval scores of the
        visual tokens at cache slots `vis_slots` from h's rows `score_from`.. (Attention.scored)."""
        h, scores = self._blocks(h, positions, cache, start,
                                 {i: (vis_slots, score_from) for i in range(len(self.layers))})
        return self.project(h[-1:]), torch.stack(scores)

    def pruned(self, h, positions, cache, start: int, pruner) -> torch.Tensor:
        """forward's last logits with a pruning hook inside the pass (FastV): block K - 1
        (K = pruner.layer) also scores the visual tokens at cache slots `pruner.slots` by the last
        row's attention (r [H_kv, n_vis]); pruner(r) returns the sorted rows of h that go on
        through blocks K.. (the last row among them). Those rows move to cache slots start.. in
        every layer, blocks below K included, so the cache ends up as if only they had been
        prefilled (their positions unchanged)."""
        K = pruner.layer
        return self.project(self._blocks(h, positions, cache, start, {K - 1: (pruner.slots, h.shape[0] - 1)},
                                         (K, pruner))[0][-1:])

    def _blocks(self, h, positions, cache, start: int, score=None, prune=None):
        """Every block and the final norm over h [T, C] at cache slots start.. (on a GPU the fused
        Triton blocks); returns (hidden states, scores). score: {block index: (vis_slots,
        score_from)}, the blocks whose attention also scores visual tokens, their r in `scores`.
        prune: (K, choose): before block K, choose(the last r) gives the rows that go on."""
        h, stack = self.split_deepstack(h)
        cos, sin = self.rope_tables(positions, h.dtype)
        state = {"cos": cos, "sin": sin, "mask": self.attention_mask(h.shape[0], start, h.device), "stack": stack}
        window, scores, score = self.cfg.sliding_window, [], score or {}

        def extra(i):  # what DeepStack adds to block i's output (for the rows still going on)
            stack = state["stack"]
            return stack[:, i] if stack is not None and i < stack.shape[1] else None

        def attend(i, block, x):  # block: the whole DecoderLayer, or its Attention in fused_blocks
            args = (x, state["cos"], state["sin"], cache.layer(i), start, state["mask"])
            if i not in score:
                return block(*args)
            out, r = block.scored(*args, *score[i], window)
            scores.append(r)
            return out

        def rows_of():
            K, choose = prune
            rows = choose(scores.pop())
            n = rows.numel()
            state["cos"], state["sin"] = state["cos"][rows], state["sin"][rows]
            state["mask"] = self.attention_mask(n, start, h.device)
            if state["stack"] is not None:
                state["stack"] = state["stack"][rows]
            cache.k[:K, :, start:start + n] = cache.k[:K, :, start + rows]
            cache.v[:K, :, start:start + n] = cache.v[:K, :, start + rows]
            return rows

        hook = None if prune is None else (prune[0], rows_of)
        if h.is_cuda:
            h = self.fused_blocks(h, lambda i, layer, x: attend(i, layer.self_attn, x), hook, extra)
        else:
            for i, layer in enumerate(self.layers):
                if hook is not None and i == hook[0]:
                    h = h[rows_of()]
                h = attend(i, layer, h)
                if extra(i) is not None:
                    h = h + extra(i)
            h = self.norm(h)
        cache.length = start + h.shape[0]
        return h, scores

    def static_prefill(self, ids, positions, cache, start, count, vis_slots=None):
        """The prefill of a short run of text tokens with every shape and address fixed, as a CUDA
        graph captures it once and replays it for any such run: ids [B] and positions [B] or
        [3, B] (B a bucket size), of which the first `count` are real, at cache slots start..;
        start and count are 1-element int32 device tensors. The padding rows' K/V land past the
        prompt, where nothing reads them before they are overwritten. Returns (fp32 logits [1, V]
        of the last real row, r [L, H_kv, n_vis] each layer's retrieval scores of the visual
        tokens at `vis_slots` from the real rows, or None without vis_slots)."""
        h = self.embed(ids)
        cos, sin = self.rope_tables(positions, h.dtype)
        slots = start.long() + torch.arange(ids.shape[0], device=ids.device)
        window, scores = self.cfg.sliding_window, []

        def attend(i, layer, x):
            out, r = layer.self_attn.static(x, cos, sin, cache.layer(i), start, count, slots, vis_slots, window)
            scores.append(r)
            return out

        h = self.fused_blocks(h, attend)
        last = h.index_select(0, count.long() - 1)
        return self.project(last), (torch.stack(scores) if vis_slots is not None else None)

    def decode_step(self, token, positions, cache, slot, length, workspace):
        """The GPU decode step: token [1] at cache slot `slot` [1] with `length` = slot + 1 (int32),
        all device tensors, so a CUDA graph can capture it once and replay it for every token.
        positions: [1] or [3, 1]. Returns fp32 logits [1, V]."""
        h = self.embed(token)
        cos, sin = self.rope_tables(positions, h.dtype)
        window = self.cfg.sliding_window
        h = self.fused_blocks(h, lambda i, layer, x: layer.self_attn.decode(x, cos, sin, cache.layer(i), slot, length,
                                                                            window, workspace))
        return self.project(h)

    def decode_batch(self, ids, positions, table, slots, lengths, workspace):
        """The GPU decode step of B conversations, every input a device tensor so that a CUDA graph
        can capture it once per batch size: ids [B], positions [B] or [3, B], table int64 [3, B]
        (each row's KVCache.address), slots [B], lengths int32 [B] (slots + 1). The linears run at
        M = B, attention in one launch over each row's own cache. Returns fp32 logits [B, V]."""
        h = self.embed(ids)
        cos, sin = self.rope_tables(positions, h.dtype)
        window = self.cfg.sliding_window
        h = self.fused_blocks(h, lambda i, layer, x: layer.self_attn.decode_batch(x, cos, sin, table, i, slots, lengths,
                                                                                  window, workspace))
        return self.project(h)

    def decode_rows(self, ids, positions, caches, slots) -> torch.Tensor:
        """One decode step of B conversations in plain PyTorch (the CPU path): ids [B] (each row's
        token), positions [B] or [3, B], caches: each row's own KVCache, slots: each row's slot in
        it (ints). The linears run at M = B, attention row by row over each row's own cache.
        Sets each cache's length; returns fp32 logits [B, V]."""
        h = self.embed(ids)
        cos, sin = self.rope_tables(positions, h.dtype)
        masks = [self.attention_mask(1, slot, h.device) for slot in slots]
        for i, layer in enumerate(self.layers):
            kvs = [cache.layer(i) for cache in caches]
            h = h + layer.self_attn.rows(layer.input_layernorm(h), cos, sin, kvs, slots, masks)
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        for cache, slot in zip(caches, slots):
            cache.length = slot + 1
        return self.project(self.norm(h))


# --------------------------------------------------------------------------- ViT encoder (CLIP, SigLIP)

@dataclass
class VisionConfig:
    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    image_size: int = 336
    patch_size: int = 14
    num_channels: int = 3
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5

    @classmethod
    def from_dict(cls, d: dict, **defaults):
        v = dict(defaults)
        v.update({f.name: d[f.name] for f in fields(cls) if d.get(f.name) is not None})
        return cls(**v)


class ViTAttention(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        C = cfg.hidden_size
        self.n_heads = cfg.num_attention_heads
        self.qkv_proj = FusedLinear(C, [C, C, C], bias=True)
        self.out_proj = nn.Linear(C, C)

    def forward(self, x, summary=None):  # x [N, T, C]: N independent crops or frames (or their int8 form)
        """With `summary` (the number of summary tokens, 0 for none) also the saliency [N, T] of
        every token (see attention_with_saliency)."""
        qkv = self.qkv_proj(x)
        N, T, C = qkv.shape[0], qkv.shape[1], qkv.shape[2] // 3
        if summary is not None:
            q, k, v = qkv.view(N * T, 3, self.n_heads, C // self.n_heads).unbind(1)  # [N*T, H, D] views
            out, saliency = attention_with_saliency(q, k, v, [(i * T, (i + 1) * T) for i in range(N)], summary)
            return self.out_proj(out.view(N, T, C)), saliency.view(N, T)
        q, k, v = qkv.view(N, T, 3, self.n_heads, C // self.n_heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.out_proj(out.transpose(1, 2).reshape(N, T, C))


def attention_with_saliency(q, k, v, bounds, summary: int, cu_seqlens=None):
    """Non-causal attention inside the segments `bounds` [(start, end), ...] (contiguous, in order)
    of q, k, v [n, H, D], and each token's saliency: the attention it receives,
    averaged over heads and over its segment's queries (summary = 0) or over the segment's first
    `summary` tokens (CLIP's CLS: 1). Returns (out [n, H, D], saliency fp32 [n]).

    On a GPU one streaming Triton kernel sequence (kernels/saliency.py); on a CPU the rows are
    scored a chunk at a time, so neither builds the whole attention matrix. `cu_seqlens`: the
    bounds as an int32 device tensor made beforehand (inside a CUDA graph capture no host data
    can be copied)."""
    if q.is_cuda:
        lengths = {e - s for s, e in bounds}
        if cu_seqlens is not None:
            cu = cu_seqlens
        elif len(lengths) == 1:  # crops or frames of one size: built on the device (graph capture copies nothing)
            cu = torch.arange(bounds[0][0], bounds[-1][1] + 1, lengths.pop(), dtype=torch.int32, device=q.device)
        else:
            cu = torch.tensor([bounds[0][0]] + [e for _, e in bounds], dtype=torch.int32, device=q.device)
        return saliency_attention(q, k, v, cu, max(e - s for s, e in bounds), summary)
    out = torch.empty(q.shape, dtype=q.dtype)
    saliency = torch.zeros(q.shape[0], dtype=torch.float32)
    scale = q.shape[-1] ** -0.5
    for s, e in bounds:
        qs, ks, vs = (t[s:e].transpose(0, 1) for t in (q, k, v))  # [H, L, D]
        out[s:e] = F.scaled_dot_product_attention(qs, ks, vs).transpose(0, 1)
        rows = qs[:, :summary] if summary else qs
        keys = ks.float().transpose(1, 2)
        for c in range(0, rows.shape[1], 1024):
            saliency[s:e] += torch.softmax(rows[:, c:c + 1024].float() @ keys * scale, dim=-1).sum((0, 1))
        saliency[s:e] /= rows.shape[0] * rows.shape[1]
    return out, saliency


class ViTLayer(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        C = cfg.hidden_size
        self.layer_norm1 = nn.LayerNorm(C, eps=cfg.layer_norm_eps)
        self.self_attn = ViTAttention(cfg)
        self.layer_norm2 = nn.LayerNorm(C, eps=cfg.layer_norm_eps)
        self.mlp = nn.Module()
        self.mlp.fc1 = nn.Linear(C, cfg.intermediate_size)
        self.mlp.fc2 = nn.Linear(cfg.intermediate_size, C)
        self.act_name, self.act = cfg.hidden_act, activation(cfg.hidden_act)

    def forward(self, x, summary=None):
        """With `summary` set: (output, saliency [N, T]) (ViTAttention.forward)."""
        # PyTorch's LayerNorm and GELU are single fused kernels already. With W8A8 linears
        # (models/quantized.py) the norms and the activation are fused with the int8 quantization of their outputs.
        mlp = self.mlp
        attn = self.self_attn(norm_input(self.layer_norm1, x, self.self_attn.qkv_proj), summary)
        saliency = None
        if summary is not None:
            attn, saliency = attn
        x = x + attn
        h = mlp.fc1(norm_input(self.layer_norm2, x, mlp.fc1))
        x = x + mlp.fc2(act_input(self.act_name, self.act, h, mlp.fc2))
        return x if summary is None else (x, saliency)


class PaddedLinear(nn.Linear):
    """An nn.Linear whose weight is a view into storage zero-padded to a multiple of 8 columns
    (align_rows). An input as wide as that storage (zero-padded, e.g. silu_mul(..., width=)) is
    multiplied by the padded weight, so cuBLAS sees K a multiple of 8; any other input as usual."""

    @property
    def padded_width(self) -> int:
        return self.weight.stride(0)

    def forward(self, x):
        w = self.weight
        if x.shape[-1] == self.padded_width != w.shape[1]:
            w = w.as_strided((w.shape[0], self.padded_width), (self.padded_width, 1))
        return F.linear(x, w, self.bias)


def align_rows(model: nn.Module) -> None:
    """16-bit nn.Linear layers on a GPU whose input width is not a multiple of 8 become
    PaddedLinear: same parameters and values, the weight moved into zero-padded storage. cuBLAS
    takes its fast Hopper kernels only for K a multiple of 8 (Qwen2.5-VL's ViT down projection has
    3420 inputs)."""
    for m in model.modules():
        w = m.weight if type(m) is nn.Linear else None
        if w is not None and w.is_cuda and w.element_size() == 2 and w.shape[1] % 8:
            padded = torch.zeros(w.shape[0], -(-w.shape[1] // 8) * 8, dtype=w.dtype, device=w.device)
            padded[:, :w.shape[1]] = w.data
            w.data = padded[:, :w.shape[1]]
            m.__class__ = PaddedLinear  # in place: the parent module and any hooks keep it


def use_encoder_graphs(model: nn.Module, on: bool) -> None:
    """Turn per-shape CUDA graphs of the vision encoders in `model` on or off."""
    for m in model.modules():
        if isinstance(getattr(m, "_graphs", None), GraphCache):
            m.graphed = on


def capture_graph(fn, device, side, warm_up=None, runs: int = 1, pool=None):
    """fn() captured as a CUDA graph: (graph, fn's outputs, which each replay rewrites).
    warm_up() (fn by default) runs `runs` times first on the side stream, so kernels compile and
    libraries set up their workspaces outside the capture. `pool`: a memory pool shared with
    other graphs (torch.cuda.graph_pool_handle()) whose replays never overlap."""
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side), torch.no_grad():
        for _ in range(runs):
            (warm_up or fn)()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool), torch.no_grad():
        out = fn()
    return graph, out


def pool_bytes(pool) -> int:
    """GPU memory held by a CUDA graph memory pool (torch.cuda.graph_pool_handle()): its segments.
    Unlike the change in memory_reserved around a capture, other allocations cannot blur it."""
    return sum(seg["total_size"] for seg in torch.cuda.memory_snapshot() if tuple(seg["segment_pool_id"]) == tuple(pool))


class GraphCache:
    """A vision encoder as one CUDA graph per input key (shape, options): its ~10 kernels a layer
    (more under W8A8) launch as one, so the host no longer sets the pace. A few keys are kept
    (anyres crop counts, video chunks, image sizes), the least recently used dropped."""

    def __init__(self, limit: int = 4):
        self.limit = limit
        self.entries = {}  # key -> (graph, static input, static output, the captured function)

    def __len__(self):
        return len(self.entries)

    def run(self, key, build, x):
        """fn(x) replayed from the graph captured for `key`, fn = build() (called only to capture,
        so per-key host work such as index tables happens once); outputs are fresh tensors."""
        if key not in self.entries:
            if len(self.entries) >= self.limit:
                self.entries.pop(next(iter(self.entries)))
            fn, static_in = build(), x.clone()
            graph, static_out = capture_graph(lambda: fn(static_in), x.device, torch.cuda.Stream(x.device))
            self.entries[key] = (graph, static_in, static_out, fn)  # fn holds what the graph reads
        entry = self.entries.pop(key)
        self.entries[key] = entry  # most recently used last
        graph, static_in, static_out, _ = entry
        static_in.copy_(x)
        graph.replay()
        return tuple(t.clone() for t in static_out) if isinstance(static_out, tuple) else static_out.clone()


class ViTEmbeddings(nn.Module):
    def __init__(self, cfg: VisionConfig, cls_token: bool, patch_bias: bool):
        super().__init__()
        n = (cfg.image_size // cfg.patch_size) ** 2 + int(cls_token)
        self.patch_embedding = nn.Conv2d(cfg.num_channels, cfg.hidden_size, cfg.patch_size,
                                         stride=cfg.patch_size, bias=patch_bias)
        self.class_embedding = nn.Parameter(torch.zeros(cfg.hidden_size)) if cls_token else None
        self.position_embedding = Embedding(n, cfg.hidden_size)

    def forward(self, pixels):  # [N, 3, S, S] -> [N, T, C]
        x = self.patch_embedding(pixels.to(self.patch_embedding.weight.dtype)).flatten(2).transpose(1, 2)
        if self.class_embedding is not None:
            x = torch.cat([self.class_embedding.expand(x.shape[0], 1, -1), x], dim=1)
        # Written contiguous: `x + pos` would keep the conv's channels-first layout, and so would
        # every residual add after it (SigLIP has no pre-norm to undo it), and each LayerNorm would
        # copy its input.
        out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
        return torch.add(x, self.position_embedding.weight, out=out)


class ViTEncoder(nn.Module):
    """CLIP (CLS token + pre-LayerNorm) or SigLIP (neither) encoder, run only up to the deepest
    layer the projector reads. hidden_states[0] is the (pre-normed) embedding output, as in HF."""

    def __init__(self, cfg: VisionConfig, feature_layers: list[int], cls_token: bool, pre_norm: bool,
                 patch_bias: bool):
        super().__init__()
        L = cfg.num_hidden_layers
        self.feature_layers = [k if k >= 0 else L + 1 + k for k in feature_layers]
        if not all(0 <= k <= L for k in self.feature_layers):
            raise CheckpointError(f"vision_feature_layer {feature_layers} is out of range for {L} layers")
        self.embeddings = ViTEmbeddings(cfg, cls_token, patch_bias)
        self.pre_layrnorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps) if pre_norm else None
        self.encoder = nn.Module()
        self.encoder.layers = nn.ModuleList(ViTLayer(cfg) for _ in range(max(self.feature_layers)))
        self._graphs = GraphCache()

    graphed = False  # the engine turns it on with CUDA graphs: each input shape captured once

    def forward(self, pixels, saliency: bool = False):
        """pixels [N, 3, S, S] -> features [N, T, C * len(feature_layers)]; with `saliency`, also
        each token's saliency [N, T] at the deepest layer the projector reads (the
        attention it gets from the CLS token, or from all tokens of its crop when there is none)."""
        if self.graphed and pixels.is_cuda and not torch.is_grad_enabled():
            key = (tuple(pixels.shape), pixels.dtype, pixels.device, saliency)
            return self._graphs.run(key, lambda: (lambda p: self._forward(p, saliency)), pixels)
        return self._forward(pixels, saliency)

    def _forward(self, pixels, saliency=False):
        x = self.embeddings(pixels)
        if self.pre_layrnorm is not None:
            x = self.pre_layrnorm(x)
        kept = {0: x} if 0 in self.feature_layers else {}  # keep only the states the projector reads
        layers = self.encoder.layers
        if saliency and not layers:
            raise TinyVilaError("prefill sparsity needs an encoder layer before the features the projector reads")
        summary = int(self.embeddings.class_embedding is not None)
        for i, layer in enumerate(layers, start=1):
            if saliency and i == len(layers):
                x, scores = layer(x, summary)
            else:
                x = layer(x)
            if i in self.feature_layers:
                kept[i] = x
        features = torch.cat([kept[k] for k in self.feature_layers], dim=-1)
        return (features, scores) if saliency else features
