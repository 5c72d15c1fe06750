"""AWQ: activation-aware weight quantization of a decoder LM (Lin et al., arXiv 2306.00978).

A weight column that multiplies a large activation channel matters more than the others. AWQ
multiplies such columns by s > 1 before round-to-nearest quantization (their relative rounding
error shrinks) and divides the operation that produces the channel by s, so that the fp network is
unchanged. Per decoder block there are four scaling groups (as llm-awq / AutoAWQ for llama-style
blocks):

  group      divides                      multiplies the columns of   loss measured on
  attn_in    input_layernorm.weight       self_attn.qkv_proj          the self-attention output
  v_o        v rows of qkv_proj (+ bias)  self_attn.o_proj            o_proj's output (no GQA only)
  mlp_in     post_attention_layernorm     mlp.gate_up_proj            the MLP output
  up_down    up rows of gate_up_proj      mlp.down_proj               down_proj's output

For each group s = mean|x_j|^alpha over the calibration tokens (x_j: input channel j of the
multiplied linears), normalised by sqrt(max s * min s), with alpha on the grid 0, 1/n, ..., (n-1)/n;
alpha = 0 is plain round-to-nearest, so the search never does worse than RTN on its own loss. The
chosen alpha minimises the MSE between the fp output and the output with the weights replaced by
Q(W * s) / s (Q: the asymmetric group RTN of quant.pack, fake-quantized).

Then a clipping search per linear: for each (output channel, input group) the clamp range
[-r * max|w|, r * max|w|], r in 1, 1 - 1/n, ..., 1 - max_shrink, that minimises the error of that
group's partial output on a subsample of the linear's inputs (scaled inputs, scaled weights).
As in AutoAWQ, q and k are not clipped: an error of q or k passes through q.k^T and the softmax,
which the per-linear output MSE does not see; with the fused qkv_proj only the v rows are clipped.
Finally every decoder-block linear is quantized with quant.pack.quantize (RTN, asymmetric).

Memory: one DecoderLayer at a time is moved to `device` (and to fp32 when that device is the CPU,
where fp16 matmuls are slow or missing), the calibration activations it needs are kept on `device`
for that layer only, and the layer goes back to where it was (in its dtype) before the next one.
Losses, the mean |x| statistic and the fake quantization go through fp32 one chunk at a time.

Next-layer inputs are the outputs of the *fp* layer, taken in the same pass that collects the
features (before the layer is scaled, clipped and quantized), as llm-awq and AutoAWQ do: scaling
leaves the fp outputs unchanged (up to rounding), each block is then fitted to the input
distribution of the fp model, on which its fp reference output is defined, and no second forward
pass per layer is needed.
"""
import logging
import math
from dataclasses import dataclass

import torch
import torch.nn as nn

from tinyvila.models.layers import DecoderLayer, DecoderLM, FusedLinear, RMSNorm
from tinyvila.quant.pack import quantize

log = logging.getLogger(__name__)

_CHUNK_ELEMS = 1 << 26  # elements per temporary when losses are computed over token chunks
_CLIP_TOKENS = 512  # calibration tokens the clipping search looks at (AutoAWQ's n_sample_token)
_MAX_SHRINK = 0.5  # the clipping search tries ranges down to (1 - _MAX_SHRINK) * max|w|


# --------------------------------------------------------------------------- fake quantization

def fake_quantize(weight: torch.Tensor, group_size: int, w_bit: int = 4) -> torch.Tensor:
    """Round-to-nearest asymmetric group quantization of W [N, K], returned dequantized in fp32.

    The same arithmetic as quant.pack.quantize followed by dequantize (scales rounded to fp16 as
    they are stored), so the search optimises what the packed checkpoint will hold."""
    N, K = weight.shape
    assert K % group_size == 0, f"group size {group_size} must divide the input width {K}"
    top = 2 ** w_bit - 1
    w = weight.float().reshape(N, K // group_size, group_size)
    lo, hi = w.amin(dim=-1, keepdim=True), w.amax(dim=-1, keepdim=True)
    scales = ((hi - lo) / top).clamp(min=1e-5)
    zeros = (-torch.round(lo / scales)).clamp(0, top)
    q = (torch.round(w / scales) + zeros).clamp(0, top)
    return ((q - zeros) * scales.half().float()).reshape(N, K)


# --------------------------------------------------------------------------- scaling groups

@dataclass
class ScaleGroup:
    name: str
    prev: nn.Module  # RMSNorm, or the FusedLinear whose shard `prev_shard` produces the channels
    prev_shard: int | None
    linears: list  # linears whose input columns are multiplied by s
    feature: str  # key of the calibration input of `linears`
    target: str  # what the loss compares: "attn", "o", "mlp" or "down"


def scale_groups(layer: DecoderLayer) -> list[ScaleGroup]:
    """The scaling groups of one llama-style block (v -> o only without GQA)."""
    attn, mlp = layer.self_attn, layer.mlp
    groups = [ScaleGroup("attn_in", layer.input_layernorm, None, [attn.qkv_proj], "qkv", "attn")]
    if attn.qkv_proj.shard_sizes[2] == attn.o_proj.in_features:
        # Each v channel feeds exactly one o_proj input channel (attention mixes tokens, not channels).
        groups.append(ScaleGroup("v_o", attn.qkv_proj, 2, [attn.o_proj], "o", "o"))
    groups.append(ScaleGroup("mlp_in", layer.post_attention_layernorm, None, [mlp.gate_up_proj], "gate_up", "mlp"))
    # down_proj's input is act(gate) * up: dividing the up rows divides that channel.
    groups.append(ScaleGroup("up_down", mlp.gate_up_proj, 1, [mlp.down_proj], "down", "down"))
    return groups


@torch.no_grad()
def fold_scales(group: ScaleGroup, s: torch.Tensor) -> None:
    """Divide the channels' producer by s and multiply the consumers' columns by s (fp, exact up
    to rounding: the block computes the same function)."""
    if isinstance(group.prev, RMSNorm):
        w = group.prev.weight
        w.copy_((w.float() / s.to(w.device)).to(w.dtype))
    else:
        assert isinstance(group.prev, FusedLinear)
        for t in (group.prev.weight, group.prev.bias):
            if t is None:
                continue
            rows = group.prev.shard(t, group.prev_shard)
            d = s.to(t.device)
            rows.copy_((rows.float() / (d[:, None] if rows.dim() == 2 else d)).to(t.dtype))
    for lin in group.linears:
        lin.weight.copy_((lin.weight.float() * s.to(lin.weight.device)[None, :]).to(lin.weight.dtype))


def apply_scales(layer: DecoderLayer, scales: dict) -> None:
    """Fold {group name: s} into `layer` (no quantization). Groups absent from `scales` are skipped."""
    for group in scale_groups(layer):
        if group.name in scales:
            fold_scales(group, scales[group.name])


def _normalised_scales(x_mean: torch.Tensor, alpha: float) -> torch.Tensor:
    s = x_mean.pow(alpha).clamp(min=1e-4)
    return s / (s.max() * s.min()).sqrt()


# --------------------------------------------------------------------------- calibration data

class LayerCalibration:
    """Calibration activations of one decoder layer on `device`, for all samples.

    hidden [N, C]: the layer's inputs, all samples concatenated along tokens (spans[i] = sample i);
    tables[i] = (cos, sin, mask) of sample i. `collect` runs the layer once over every sample and
    records the inputs of qkv_proj, o_proj, gate_up_proj and down_proj (forward hooks) and the
    outputs of self_attn and mlp; it returns the layer's outputs [N, C]."""

    FEATURES = {"qkv": "self_attn.qkv_proj", "o": "self_attn.o_proj", "gate_up": "mlp.gate_up_proj",
                "down": "mlp.down_proj"}
    OUTPUTS = {"attn": "self_attn", "mlp": "mlp"}

    def __init__(self, layer: DecoderLayer, spans, tables):
        self.layer, self.spans, self.tables = layer, spans, tables
        self.features, self.outputs = {}, {}
        attn = layer.self_attn
        p = next(layer.parameters())
        t_max = max(b - a for a, b in spans)
        self.kv = (torch.empty(attn.n_kv, t_max, attn.head_dim, dtype=p.dtype, device=p.device),
                   torch.empty(attn.n_kv, t_max, attn.head_dim, dtype=p.dtype, device=p.device))

    @torch.no_grad()
    def collect(self, hidden: torch.Tensor) -> torch.Tensor:
        n = hidden.shape[0]
        cursor = [0]
        modules = dict(self.layer.named_modules())

        def recorder(store, key, take_input):
            def hook(module, args, output):
                t = args[0] if take_input else output
                if key not in store:
                    store[key] = torch.empty(n, t.shape[-1], dtype=t.dtype, device=t.device)
                store[key][cursor[0]:cursor[0] + t.shape[0]] = t
            return hook

        handles = [modules[m].register_forward_hook(recorder(self.features, k, True)) for k, m in self.FEATURES.items()]
        handles += [modules[m].register_forward_hook(recorder(self.outputs, k, False)) for k, m in self.OUTPUTS.items()]
        out = torch.empty_like(hidden)
        try:
            for (a, b), (cos, sin, mask) in zip(self.spans, self.tables):
                cursor[0] = a
                out[a:b] = self.layer(hidden[a:b], cos, sin, self.kv, 0, mask)
        finally:
            for h in handles:
                h.remove()
        return out

    @torch.no_grad()
    def loss(self, target: str) -> float:
        """Mean squared error of the current layer's `target` output against the recorded fp one."""
        layer = self.layer
        err, count = 0.0, 0
        if target == "attn":  # attention mixes tokens: one sample at a time
            x, ref = self.features["qkv"], self.outputs["attn"]
            for (a, b), (cos, sin, mask) in zip(self.spans, self.tables):
                out = layer.self_attn(x[a:b], cos, sin, self.kv, 0, mask)
                err += float((out.float() - ref[a:b].float()).pow(2).sum())
                count += out.numel()
            return err / count
        module, x, ref = {"o": (layer.self_attn.o_proj, "o", "attn"), "mlp": (layer.mlp, "gate_up", "mlp"),
                          "down": (layer.mlp.down_proj, "down", "mlp")}[target]
        x, ref = self.features[x], self.outputs[ref]
        width = max(x.shape[1], layer.mlp.gate_up_proj.out_features if target == "mlp" else ref.shape[1])
        step = max(1, _CHUNK_ELEMS // width)
        for a in range(0, x.shape[0], step):
            out = module(x[a:a + step])
            err += float((out.float() - ref[a:a + step].float()).pow(2).sum())
            count += out.numel()
        return err / count


def _abs_mean(x: torch.Tensor) -> torch.Tensor:
    """mean |x| per channel over tokens, in fp32, without an fp32 copy of x."""
    total = torch.zeros(x.shape[1], dtype=torch.float32, device=x.device)
    step = max(1, _CHUNK_ELEMS // x.shape[1])
    for a in range(0, x.shape[0], step):
        total += x[a:a + step].float().abs().sum(0)
    return total / x.shape[0]


def _divide_columns_(x: torch.Tensor, s: torch.Tensor) -> None:
    """x /= s per channel, in place, through fp32 one chunk of tokens at a time."""
    step = max(1, _CHUNK_ELEMS // x.shape[1])
    for a in range(0, x.shape[0], step):
        x[a:a + step] = (x[a:a + step].float() / s).to(x.dtype)


# --------------------------------------------------------------------------- searches

@torch.no_grad()
def search_scale(group: ScaleGroup, calib: LayerCalibration, group_size: int, w_bit: int, n_grid: int):
    """Best s for one group on the calibration data; returns (s fp32 [K], alpha, loss)."""
    x_mean = _abs_mean(calib.features[group.feature])
    originals = [lin.weight.detach().clone() for lin in group.linears]
    best = (math.inf, None, None)
    try:
        for i in range(n_grid):
            alpha = i / n_grid
            s = _normalised_scales(x_mean, alpha)
            for lin, w in zip(group.linears, originals):
                step = max(1, _CHUNK_ELEMS // (4 * w.shape[1]))  # rows per fp32 temporary
                for a in range(0, w.shape[0], step):
                    q = fake_quantize(w[a:a + step].float() * s, group_size, w_bit) / s
                    lin.weight[a:a + step] = q.to(w.dtype)
            loss = calib.loss(group.target)
            if loss < best[0]:  # a NaN loss never wins
                best = (loss, alpha, s)
    finally:
        for lin, w in zip(group.linears, originals):
            lin.weight.copy_(w)
    loss, alpha, s = best
    if s is None:  # every candidate gave NaN/inf: leave the group unscaled
        return torch.ones_like(x_mean), None, loss
    return s, alpha, loss


@torch.no_grad()
def search_clip(weight: torch.Tensor, x: torch.Tensor, group_size: int, w_bit: int, n_grid: int,
                max_shrink: float = _MAX_SHRINK, n_tokens: int = _CLIP_TOKENS) -> torch.Tensor:
    """Per (output channel, input group) clamp bound [N, K/G] minimising that group's partial
    output error on up to n_tokens rows of x [n, K] (evenly spaced)."""
    N, K = weight.shape
    G = K // group_size
    m = min(x.shape[0], n_tokens)
    idx = torch.linspace(0, x.shape[0] - 1, m, device=x.device).round().long()
    xg = x[idx].float().view(m, G, group_size).permute(1, 2, 0)  # [G, gs, m]
    steps = max(1, int(max_shrink * n_grid))
    batch = max(1, min(N, _CHUNK_ELEMS // (4 * G * m)))
    bounds = []
    for a in range(0, N, batch):
        wg = weight[a:a + batch].float().view(-1, G, group_size)  # [b, G, gs]
        b = wg.shape[0]
        ref = torch.bmm(wg.transpose(0, 1), xg)  # [G, b, m]
        full = wg.abs().amax(dim=-1)  # [b, G]
        best_err = torch.full_like(full, math.inf)
        best = full.clone()
        for i in range(steps):
            bound = full * (1 - i / n_grid)
            w = torch.minimum(torch.maximum(wg, -bound[..., None]), bound[..., None])
            q = fake_quantize(w.reshape(b, K), group_size, w_bit).view(b, G, group_size)
            err = (torch.bmm(q.transpose(0, 1), xg) - ref).pow(2).mean(dim=-1).t()  # [b, G]
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best = torch.where(better, bound, best)
        bounds.append(best)
    return torch.cat(bounds)


@torch.no_grad()
def apply_clip(weight: torch.Tensor, bounds: torch.Tensor) -> None:
    """Clamp W [N, K] (in place; a view of a parameter is fine) to +-bounds [N, K/G] per group."""
    N, K = weight.shape
    w = weight.float().view(N, bounds.shape[1], -1)
    b = bounds.to(w.device)[..., None]
    weight.copy_(torch.minimum(torch.maximum(w, -b), b).view(N, K).to(weight.dtype))


def clip_targets(layer: DecoderLayer):
    """(name, weight rows to clip, calibration feature) per linear; q and k are left out."""
    attn, mlp = layer.self_attn, layer.mlp
    return [("self_attn.qkv_proj[v]", attn.qkv_proj.shard(attn.qkv_proj.weight, 2), "qkv"),
            ("self_attn.o_proj", attn.o_proj.weight, "o"),
            ("mlp.gate_up_proj", mlp.gate_up_proj.weight, "gate_up"),
            ("mlp.down_proj", mlp.down_proj.weight, "down")]


# --------------------------------------------------------------------------- driver

def _linears(layer: nn.Module):
    return [(name, m) for name, m in layer.named_modules() if isinstance(m, nn.Linear)]


def _check_shapes(lm: DecoderLM, group_size: int, quantize_lm_head: bool):
    mods = [(f"layers.{i}.{n}", m) for i, layer in enumerate(lm.layers) for n, m in _linears(layer)]
    if quantize_lm_head:
        if lm.cfg.tie_word_embeddings:
            raise ValueError("quantize_lm_head: this model ties lm_head to the embedding table "
                             "(there is no separate lm_head to quantize)")
        mods.append(("lm_head", lm.lm_head))
    for name, m in mods:
        if m.in_features % group_size:
            raise ValueError(f"group size {group_size} does not divide {name}'s input width {m.in_features}")
        if m.out_features % 8:
            raise ValueError(f"{name}'s output width {m.out_features} is not a multiple of 8 (AWQ packing)")


def _pack(weight: torch.Tensor, group_size: int, device):
    return tuple(t.cpu() for t in quantize(weight.detach().to(device), group_size))


@torch.no_grad()
def awq_quantize(lm: DecoderLM, samples: list[tuple[torch.Tensor, torch.Tensor]], group_size: int = 128,
                 w_bit: int = 4, search: bool = True, clip: bool = True, quantize_lm_head: bool = False,
                 device=None, n_grid: int = 20, progress=None) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Quantize every decoder-block linear of `lm` to w_bit (4) in groups of `group_size`.

    samples: calibration sequences (h0 [T, C] input embeddings of the first block, positions [T]
    or [3, T]). search=False: plain round-to-nearest (no scaling, no clipping; samples unused).
    clip only applies with search. lm is mutated in place (folded scales in the norms and linears,
    clipped weights) and stays on its devices and dtypes. Returns {name relative to lm:
    (qweight int32 [K, N/8], qzeros int32 [K/G, N/8], scales fp16 [K/G, N])} on the CPU, in the
    AutoAWQ GEMM layout; fused linears are packed whole (slice shards along N).
    """
    assert w_bit == 4, "only 4-bit packing is implemented (quant.pack)"
    assert n_grid >= 1
    _check_shapes(lm, group_size, quantize_lm_head)
    p0 = next(lm.parameters())
    device = torch.device(device) if device is not None else p0.device
    total = len(lm.layers)
    result = {}

    if not search:
        for i, layer in enumerate(lm.layers):
            for name, m in _linears(layer):
                result[f"layers.{i}.{name}"] = _pack(m.weight, group_size, device)
            if progress is not None:
                progress(i + 1, total)
    else:
        if not samples:
            raise ValueError("AWQ search needs calibration samples")
        # fp32 on the CPU (fp16 matmuls are slow or missing there); the model's dtype on a GPU.
        work = torch.float32 if device.type == "cpu" else p0.dtype
        spans, a = [], 0
        for h0, _ in samples:
            spans.append((a, a + h0.shape[0]))
            a += h0.shape[0]
        # DeepStack models (Qwen3-VL): rows carry what is added after the first layers (DecoderLM.embed_prompt)
        hidden, stack = lm.split_deepstack(torch.cat([h0.to(device=device, dtype=work) for h0, _ in samples]))
        inv_freq = getattr(lm, "_inv_freq", None)
        tables = []
        for h0, pos in samples:
            cos, sin = lm.rope_tables(pos.to(device), work)
            tables.append((cos, sin, lm.attention_mask(h0.shape[0], 0, device)))
        if inv_freq is not None:
            lm._inv_freq = inv_freq  # rope_tables moves its table to `device`: put it back
        for i, layer in enumerate(lm.layers):
            homes = {n: (p.device, p.dtype) for n, p in layer.named_parameters()}
            layer.to(device=device, dtype=work)
            try:
                calib = LayerCalibration(layer, spans, tables)
                nxt = calib.collect(hidden)  # the fp layer's outputs: the next layer's inputs
                if stack is not None and i < stack.shape[1]:
                    nxt = nxt + stack[:, i]
                del hidden
                groups = scale_groups(layer)
                found = {}
                for g in groups:  # all searched on the unscaled layer, then all folded
                    s, alpha, loss = search_scale(g, calib, group_size, w_bit, n_grid)
                    found[g.name] = s
                    log.debug("layer %d %s: alpha %s, loss %.3g", i, g.name, alpha, loss)
                for g in groups:
                    fold_scales(g, found[g.name])
                    if clip:  # the clipping search sees the scaled inputs of the scaled weights
                        _divide_columns_(calib.features[g.feature], found[g.name])
                calib.outputs.clear()
                if clip:
                    for name, weight, feature in clip_targets(layer):
                        bounds = search_clip(weight, calib.features[feature], group_size, w_bit, n_grid)
                        apply_clip(weight, bounds)
                del calib
            finally:
                for n, p in layer.named_parameters():
                    p.data = p.data.to(device=homes[n][0], dtype=homes[n][1])
            for name, m in _linears(layer):
                result[f"layers.{i}.{name}"] = _pack(m.weight, group_size, device)
            hidden = nxt
            if progress is not None:
                progress(i + 1, total)
        del hidden

    if quantize_lm_head:  # no block follows the final norm: round-to-nearest
        result["lm_head"] = _pack(lm.lm_head.weight, group_size, device)
    return result
