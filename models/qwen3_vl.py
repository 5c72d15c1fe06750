"""Qwen3-VL: a SigLIP-2-style ViT (learned position embeddings resampled to each grid, 2-D RoPE,
full attention per image or frame pair), a 2x2 patch merger, DeepStack mergers on intermediate
ViT layers, and a Qwen3 decoder (q/k RMSNorm per head) with interleaved multimodal RoPE.

Visual features: the encoder returns, per merged token, the main merger's output followed by each
DeepStack merger's, [n, (1 + D) * C]. Whatever selects or prunes visual tokens moves those rows
whole, so a pruned token is gone from every layer it would have been added to; the decoder
(layers.DecoderLM) splits the columns and adds block k to the hidden states after layer k.

Positions: as transformers 5.x computes them. Each image, and each frame pair of a video, is one
grid whose (t, h, w) ids all start at the next free id (t = that id: a video's frames are told
apart by their text timestamps, not by temporal ids); the text after it continues
max(h, w) / merge ids later.
Checkpoint keys: `model.visual.*`, `model.language_model.*`, `lm_head.*` (hub and transformers
saves alike); a missing lm_head means tied embeddings (2B, 4B).
"""
from dataclasses import dataclass, fields
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from tinyvila.errors import CheckpointError, TinyVilaError
from tinyvila.loader import read_json, weight_files
from tinyvila.sparsity import compact_grid

from .layers import TextConfig, activation
from .quantized import act_input, norm_input
from .qwen2_5_vl import (QwenMedia, Qwen2_5_VL, VisionAttention, canonical_name, full_bounds, patch_positions,
                         preprocess_image, num_tokens, segment_groups, weight_has_lm_head)
from .layers import DecoderLM, GraphCache

HALF = (0.5, 0.5, 0.5)  # Qwen3-VL's image mean and std


# --------------------------------------------------------------------------- config

@dataclass
class Qwen3VisionConfig:
    # Qwen3-VL-8B-Instruct's values (2B/4B: depth 24, hidden 1024, intermediate 4096, deepstack
    # [5, 11, 17]); config.json overrides them.
    depth: int = 27
    hidden_size: int = 1152
    intermediate_size: int = 4304
    num_heads: int = 16
    patch_size: int = 16
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    in_channels: int = 3
    out_hidden_size: int = 4096
    num_position_embeddings: int = 2304
    deepstack_visual_indexes: tuple = (8, 16, 24)
    hidden_act: str = "gelu_pytorch_tanh"
    rope_theta: float = 10000.0

    @classmethod
    def from_dict(cls, d: dict):
        v = {f.name: d[f.name] for f in fields(cls) if d.get(f.name) is not None}
        rope = d.get("rope_parameters") or {}
        if rope.get("rope_theta") is not None:
            v["rope_theta"] = float(rope["rope_theta"])
        cfg = cls(**v)
        cfg.deepstack_visual_indexes = tuple(cfg.deepstack_visual_indexes)
        if not all(0 <= i < cfg.depth for i in cfg.deepstack_visual_indexes):
            raise CheckpointError(f"deepstack_visual_indexes {list(cfg.deepstack_visual_indexes)} are outside the "
                                  f"{cfg.depth} vision layers")
        side = int(round(cfg.num_position_embeddings ** 0.5))
        if side * side != cfg.num_position_embeddings:
            raise CheckpointError(f"num_position_embeddings {cfg.num_position_embeddings} is not a square grid")
        return cfg


@dataclass
class Qwen3VLConfig:
    text: TextConfig
    vision: Qwen3VisionConfig
    image_token_id: int = 151655
    video_token_id: int = 151656
    vision_start_token_id: int = 151652
    vision_end_token_id: int = 151653
    min_pixels: int = 65536
    max_pixels: int = 16777216
    image_mean: tuple = HALF
    image_std: tuple = HALF


def parse_config(path: Path, config: dict) -> Qwen3VLConfig:
    text_fields = dict(config.get("text_config") or {})
    if "tie_word_embeddings" not in text_fields:
        text_fields["tie_word_embeddings"] = bool(config.get("tie_word_embeddings", False))
    text = TextConfig.from_dict(text_fields, "qwen3")
    text.qk_norm, text.mrope_interleaved = True, True  # transformers interleaves whatever the flag says
    text.mrope_section = text.mrope_section or [24, 20, 20]
    if sum(text.mrope_section) * 2 != text.head_dim:
        raise CheckpointError(f"mrope_section {text.mrope_section} does not cover head_dim {text.head_dim}")
    if not weight_has_lm_head(path):
        text.tie_word_embeddings = True
    vision = Qwen3VisionConfig.from_dict(config.get("vision_config") or {})
    if vision.out_hidden_size != text.hidden_size:
        raise CheckpointError(f"vision out_hidden_size {vision.out_hidden_size} differs from the language "
                              f"model's hidden_size {text.hidden_size}")
    pre = read_json(path / "preprocessor_config.json", required=False)
    size = pre.get("size") or {}
    return Qwen3VLConfig(
        text=text, vision=vision,
        image_token_id=int(config.get("image_token_id", 151655)),
        video_token_id=int(config.get("video_token_id", 151656)),
        vision_start_token_id=int(config.get("vision_start_token_id", 151652)),
        vision_end_token_id=int(config.get("vision_end_token_id", 151653)),
        min_pixels=int(pre.get("min_pixels") or size.get("shortest_edge") or 65536),
        max_pixels=int(pre.get("max_pixels") or size.get("longest_edge") or 16777216),
        image_mean=tuple(pre.get("image_mean", HALF)), image_std=tuple(pre.get("image_std", HALF)))


# --------------------------------------------------------------------------- vision encoder

def position_taps(grids, side: int, merge: int):
    """Bilinear resampling (align_corners) of the side x side learned position table to each
    grid, in the rows' merge-group order: (indices [N, 4] into the table, weights [N, 4] fp32)."""
    pos = patch_positions(grids, merge).float()  # [N, 2] (row, column)
    sizes = torch.cat([torch.tensor([[h, w]]).expand(t * h * w, 2) for t, h, w in grids]).float()
    src = pos * (side - 1) / (sizes - 1).clamp(min=1)
    low = src.floor()
    frac = src - low
    taps, weights = [], []
    for dy in (0, 1):
        for dx in (0, 1):
            row = (low[:, 0] + dy).clamp(max=side - 1).long()
            col = (low[:, 1] + dx).clamp(max=side - 1).long()
            wy = (1 - frac[:, 0]) if dy == 0 else frac[:, 0]
            wx = (1 - frac[:, 1]) if dx == 0 else frac[:, 1]
            taps.append(row * side + col)
            weights.append(wy * wx)
    return torch.stack(taps, 1), torch.stack(weights, 1)


class VisionMLP(nn.Module):
    def __init__(self, cfg: Qwen3VisionConfig):
        super().__init__()
        self.linear_fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.linear_fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)
        self.act_name, self.act = cfg.hidden_act, activation(cfg.hidden_act)

    def forward(self, x):
        return self.linear_fc2(act_input(self.act_name, self.act, self.linear_fc1(x), self.linear_fc2))


class VisionBlock(nn.Module):
    def __init__(self, cfg: Qwen3VisionConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.hidden_size, eps=1e-6)
        self.attn = VisionAttention(cfg)
        self.norm2 = nn.LayerNorm(cfg.hidden_size, eps=1e-6)
        self.mlp = VisionMLP(cfg)

    def forward(self, x, cos, sin, groups, saliency_bounds=None):
        """With `saliency_bounds`: (output, each patch's saliency) (VisionAttention.forward)."""
        attn = self.attn(norm_input(self.norm1, x, self.attn.qkv), cos, sin, groups, saliency_bounds)
        saliency = None
        if saliency_bounds is not None:
            attn, saliency = attn
        x = x + attn
        x = x + self.mlp(norm_input(self.norm2, x, self.mlp.linear_fc1))
        return x if saliency_bounds is None else (x, saliency)


class PatchMerger(nn.Module):
    """LayerNorm, 2x2 patches concatenated, fc1, exact GELU, fc2. The DeepStack mergers normalise
    after concatenating (`postshuffle`), the main one before."""

    def __init__(self, cfg: Qwen3VisionConfig, postshuffle: bool):
        super().__init__()
        width = cfg.hidden_size * cfg.spatial_merge_size ** 2
        self.width, self.postshuffle = width, postshuffle
        self.norm = nn.LayerNorm(width if postshuffle else cfg.hidden_size, eps=1e-6)
        self.linear_fc1 = nn.Linear(width, width)
        self.linear_fc2 = nn.Linear(width, cfg.out_hidden_size)

    def forward(self, x):
        x = self.norm(x.reshape(-1, self.width)) if self.postshuffle else self.norm(x).reshape(-1, self.width)
        return self.linear_fc2(act_input("gelu", F.gelu, self.linear_fc1(x), self.linear_fc2))


class VisionTransformer(nn.Module):
    def __init__(self, cfg: Qwen3VisionConfig):
        super().__init__()
        self.cfg = cfg
        p, t = cfg.patch_size, cfg.temporal_patch_size
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Module()  # a Conv3d with kernel = stride: a linear map over rows
        self.patch_embed.proj.weight = nn.Parameter(torch.empty(cfg.hidden_size, cfg.in_channels, t, p, p))
        self.patch_embed.proj.bias = nn.Parameter(torch.empty(cfg.hidden_size))
        self.pos_embed = nn.Module()
        self.pos_embed.weight = nn.Parameter(torch.empty(cfg.num_position_embeddings, cfg.hidden_size))
        self.blocks = nn.ModuleList(VisionBlock(cfg) for _ in range(cfg.depth))
        self.merger = PatchMerger(cfg, postshuffle=False)
        self.deepstack_merger_list = nn.ModuleList(PatchMerger(cfg, postshuffle=True)
                                                   for _ in cfg.deepstack_visual_indexes)
        head_dim = cfg.hidden_size // cfg.num_heads
        steps = torch.arange(0, head_dim // 2, 2, dtype=torch.float, device="cpu")
        self._inv_freq = 1.0 / (cfg.rope_theta ** (steps / (head_dim // 2)))
        self._graphs = GraphCache()

    graphed = False  # the engine turns it on with CUDA graphs (layers.use_encoder_graphs)
    GRAPH_MAX_PATCHES = 16384  # as Qwen2.5-VL's encoder

    def forward(self, pixels: torch.Tensor, grids: list, saliency: bool = False):
        """pixels [N, C*T*P*P]; grids [(t, h, w)] in patches -> merged tokens [N/4, (1 + D) * out]
        (the main merger's output, then each DeepStack merger's); with `saliency`, also each merged
        token's saliency [N/4] (fp32, CPU): the mean attention its patches receive in the last
        block the main merger reads, over their image or frame pair."""
        if self.graphed and pixels.is_cuda and not torch.is_grad_enabled() and len(pixels) <= self.GRAPH_MAX_PATCHES:
            key = (tuple(pixels.shape), pixels.dtype, tuple(map(tuple, grids)), saliency)
            out = self._graphs.run(key, lambda: self._bind(grids, pixels.device, saliency), pixels)
        else:
            out = self._bind(grids, pixels.device, saliency)(pixels)
        return (out[0], out[1].cpu()) if saliency else out

    def _bind(self, grids, device, saliency):
        """The encoder for one set of grids as a function of the pixels alone (tables made here,
        once, so the function copies nothing from the host and can be captured as a CUDA graph)."""
        cfg = self.cfg
        unit = cfg.spatial_merge_size ** 2
        side = int(round(cfg.num_position_embeddings ** 0.5))
        taps, weights = (t.to(device) for t in position_taps(grids, side, cfg.spatial_merge_size))
        pos = patch_positions(grids, cfg.spatial_merge_size).to(device)
        emb = (pos.float()[..., None] * self._inv_freq.to(device)).flatten(1)  # [N, head_dim/2]: rows, then columns
        emb = torch.cat([emb, emb], dim=-1)
        cos, sin = emb.cos(), emb.sin()
        bounds = full_bounds(grids)
        groups = segment_groups(bounds, device)
        source = len(self.blocks) - 1 if saliency else -1
        cu = torch.tensor([0] + [e for _, e in bounds], dtype=torch.int32).to(device) if saliency else None
        stack_at = {i: k for k, i in enumerate(cfg.deepstack_visual_indexes)}

        def run(pixels):
            w, b = self.patch_embed.proj.weight, self.patch_embed.proj.bias
            x = F.linear(pixels.to(w.dtype), w.reshape(w.shape[0], -1), b)
            table = self.pos_embed.weight
            x = x + (table[taps] * weights[:, :, None]).sum(1).to(x.dtype)
            stacked, scores = [None] * len(stack_at), None
            for i, block in enumerate(self.blocks):
                if i == source:
                    x, scores = block(x, cos, sin, None, (bounds, cu))
                else:
                    x = block(x, cos, sin, groups)
                if i in stack_at:
                    stacked[stack_at[i]] = self.deepstack_merger_list[stack_at[i]](x)
            merged = torch.cat([self.merger(x)] + stacked, dim=1)
            if scores is None:
                return merged
            return merged, scores.float().view(-1, unit).mean(-1)

        return run


# --------------------------------------------------------------------------- the model

class Qwen3VL(Qwen2_5_VL):
    """Media preparation, encoding and panels as Qwen2.5-VL (its preprocessing at patch 16 with
    mean and std 0.5); its own encoder, decoder options and positions."""
    name = "Qwen3-VL"
    media_options = ("min_pixels", "max_pixels")

    def __init__(self, cfg: Qwen3VLConfig):
        nn.Module.__init__(self)
        self.cfg = cfg
        self.visual = VisionTransformer(cfg.vision)
        self.language_model = DecoderLM(cfg.text)
        self.language_model.deepstack_layers = len(cfg.vision.deepstack_visual_indexes)
        self.image_token_id, self.video_token_id = cfg.image_token_id, None

    @classmethod
    def config_from_dir(cls, path: Path, config: dict) -> Qwen3VLConfig:
        return parse_config(path, config)

    def positions(self, n_tokens: int, spans, media, device, kept=None, mode="compact") -> torch.Tensor:
        """M-RoPE ids [3, n_tokens]. Each item (an image, a video's frame pair) is a grid of
        (t, h, w) = (base, base + row, base + column) and the text after it starts at base +
        max(rows, columns). Items in `kept` were pruned: their kept tokens keep their ids
        ("original") or take the smallest grid holding them ("compact", each axis
        rank-compressed, the text then following its largest id)."""
        kept = kept or {}
        pos = torch.empty(3, n_tokens, dtype=torch.long)
        merge = self.cfg.vision.spatial_merge_size
        nxt = done = 0  # next free position id; end of the last placed range
        for s, e, j in sorted(spans):
            pos[:, done:s] = torch.arange(nxt, nxt + s - done)
            base = nxt + s - done
            t, h, w = media[j].grid[0], media[j].grid[1] // merge, media[j].grid[2] // merge
            ids = torch.stack(torch.meshgrid(torch.zeros(t, dtype=torch.long), torch.arange(h), torch.arange(w),
                                             indexing="ij")).reshape(3, -1)
            end = base + max(h, w)
            if j in kept:
                ids = ids[:, kept[j].kept]
                if mode == "compact":
                    ids = compact_grid(ids)
                    end = base + int(ids.max()) + 1
            pos[:, s:e] = base + ids
            nxt, done = end, e
        pos[:, done:] = torch.arange(nxt, nxt + n_tokens - done)
        return pos.to(device)
