"""Qwen2.5-VL: a windowed-attention ViT with 2-D RoPE, a 2x2 patch merger, and a Qwen2 decoder
with multimodal RoPE (spec: qwen2_5_vl.md).

Vision: pixels arrive as rows of 1176 values (3 channels x 2 frames x 14 x 14), the 4 patches of a
merge group consecutive. The encoder permutes merge groups into window order (4x4 groups = 112 px
windows), runs 32 blocks (windowed, except `fullatt_block_indexes`, which attend over a whole image
or one 2-frame slice of a video), merges 2x2 patches and restores raster order. Attention runs per
segment, batching equal-length segments: no dense tokens x tokens mask is ever built.

Positions: M-RoPE ids (t, h, w) per token as the original Qwen code / vLLM compute them; the text
after a video continues at the largest id used so far + 1 (transformers 5.x differs after videos).
Checkpoint keys: hub `visual.*` / `model.*` / `lm_head.*`, or `model.visual.*` /
`model.language_model.*` (transformers 4.52+ saves); a missing lm_head means tied embeddings.
"""
import math
from collections import defaultdict
from dataclasses import dataclass, fields
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from tinyvila.errors import CheckpointError, TinyVilaError
from tinyvila.loader import iter_tensors, read_json, tensor_shapes, weight_files
from tinyvila.media import CLIP_MEAN, CLIP_STD

from . import qwen_preprocess as prep
from .layers import MLP, DecoderLM, RMSNorm, TextConfig, load_weights

RENAMES = [("model.visual.", "visual."), ("model.language_model.", "language_model."),
           ("lm_head.", "language_model.lm_head."), ("visual.", "visual."), ("model.", "language_model.")]


def canonical_name(name: str) -> str:
    """A checkpoint key in either layout -> this module's parameter name."""
    for old, new in RENAMES:
        if name.startswith(old):
            return new + name[len(old):]
    return name


# --------------------------------------------------------------------------- config

@dataclass
class QwenVisionConfig:
    # The released checkpoints' values (all sizes share the tower); config.json overrides them.
    depth: int = 32
    hidden_size: int = 1280
    intermediate_size: int = 3420
    num_heads: int = 16
    patch_size: int = 14
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    in_channels: int = 3
    window_size: int = 112
    fullatt_block_indexes: tuple = (7, 15, 23, 31)
    out_hidden_size: int = 3584
    tokens_per_second: float = 2
    hidden_act: str = "silu"

    @classmethod
    def from_dict(cls, d: dict):
        v = {f.name: d[f.name] for f in fields(cls) if d.get(f.name) is not None}
        if "in_channels" not in v and d.get("in_chans") is not None:
            v["in_channels"] = d["in_chans"]  # the hub files' spelling
        if "patch_size" not in v and d.get("spatial_patch_size") is not None:
            v["patch_size"] = d["spatial_patch_size"]
        cfg = cls(**v)
        cfg.fullatt_block_indexes = tuple(cfg.fullatt_block_indexes)
        return cfg


@dataclass
class Qwen2_5_VLConfig:
    text: TextConfig
    vision: QwenVisionConfig
    image_token_id: int = 151655
    video_token_id: int = 151656
    min_pixels: int = 3136
    max_pixels: int = 12845056
    image_mean: tuple = CLIP_MEAN
    image_std: tuple = CLIP_STD


def _mrope_section(config: dict):
    text = config.get("text_config") or {}
    for source in (text.get("rope_parameters"), text.get("rope_scaling"), config.get("rope_parameters"),
                   config.get("rope_scaling")):
        if isinstance(source, dict) and source.get("mrope_section"):
            return list(source["mrope_section"])
    return [16, 24, 24]


def parse_config(path: Path, config: dict) -> Qwen2_5_VLConfig:
    # Hub configs are flat (text fields at the root); newer saves nest them in text_config.
    text_fields = {k: v for k, v in config.items() if k not in ("vision_config", "text_config")}
    text_fields.update(config.get("text_config") or {})
    tie = config.get("tie_word_embeddings", (config.get("text_config") or {}).get("tie_word_embeddings", False))
    text = TextConfig.from_dict(text_fields, "qwen2", bool(tie))
    text.mrope_section = _mrope_section(config)
    if sum(text.mrope_section) * 2 != text.head_dim:
        raise CheckpointError(f"mrope_section {text.mrope_section} does not cover head_dim {text.head_dim}")
    if not weight_has_lm_head(path):
        text.tie_word_embeddings = True  # e.g. the 3B checkpoint ships no lm_head.weight
    pre = read_json(path / "preprocessor_config.json", required=False)
    size = pre.get("size") or {}
    return Qwen2_5_VLConfig(
        text=text, vision=QwenVisionConfig.from_dict(config.get("vision_config") or {}),
        image_token_id=int(config.get("image_token_id", 151655)),
        video_token_id=int(config.get("video_token_id", 151656)),
        min_pixels=int(pre.get("min_pixels") or size.get("shortest_edge") or 3136),
        max_pixels=int(pre.get("max_pixels") or size.get("longest_edge") or 12845056),
        image_mean=tuple(pre.get("image_mean", CLIP_MEAN)), image_std=tuple(pre.get("image_std", CLIP_STD)))


def weight_has_lm_head(path: Path) -> bool:
    return any(canonical_name(k) == "language_model.lm_head.weight" for k in tensor_shapes(weight_files(path)))


# --------------------------------------------------------------------------- vision encoder

def segment_attention(q, k, v, groups):
    """Non-causal attention inside segments. q, k, v: [N, H, D]; groups: index tensors [n, L],
    each row one segment of length L (segments of equal length are batched together)."""
    out = torch.empty_like(q)
    for idx in groups:
        qs, ks, vs = (t[idx].transpose(1, 2) for t in (q, k, v))  # [n, H, L, D]
        out[idx] = F.scaled_dot_product_attention(qs, ks, vs).transpose(1, 2)
    return out


def segment_groups(bounds, device):
    """[(start, end), ...] -> index tensors, one per distinct segment length."""
    by_len = defaultdict(list)
    for s, e in bounds:
        if e > s:
            by_len[e - s].append(s)
    return [(torch.tensor(starts)[:, None] + torch.arange(n)[None, :]).to(device) for n, starts in by_len.items()]


class VisionAttention(nn.Module):
    def __init__(self, cfg: QwenVisionConfig):
        super().__init__()
        self.n_heads = cfg.num_heads
        self.qkv = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size)
        self.proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)

    def forward(self, x, cos, sin, groups):
        N, C = x.shape
        q, k, v = self.qkv(x).view(N, 3, self.n_heads, C // self.n_heads).unbind(1)  # [N, H, D] each
        q, k = rope_fp32(q, cos, sin), rope_fp32(k, cos, sin)
        return self.proj(segment_attention(q, k, v, groups).reshape(N, C))


def rope_fp32(x, cos, sin):
    """Rotate-half RoPE computed in fp32 (as the reference does for the ViT), cast back."""
    xf = x.float()
    half = xf.shape[-1] // 2
    rotated = torch.cat([-xf[..., half:], xf[..., :half]], dim=-1)
    return (xf * cos[:, None] + rotated * sin[:, None]).to(x.dtype)


class VisionBlock(nn.Module):
    def __init__(self, cfg: QwenVisionConfig):
        super().__init__()
        self.norm1 = RMSNorm(cfg.hidden_size, 1e-6)
        self.attn = VisionAttention(cfg)
        self.norm2 = RMSNorm(cfg.hidden_size, 1e-6)
        self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size, cfg.hidden_act, bias=True)

    def forward(self, x, cos, sin, groups):
        x = x + self.attn(self.norm1(x), cos, sin, groups)
        return x + self.mlp(self.norm2(x))


class PatchMerger(nn.Module):
    def __init__(self, cfg: QwenVisionConfig):
        super().__init__()
        width = cfg.hidden_size * cfg.spatial_merge_size ** 2
        self.ln_q = RMSNorm(cfg.hidden_size, 1e-6)
        self.mlp = nn.Sequential(nn.Linear(width, width), nn.GELU(), nn.Linear(width, cfg.out_hidden_size))

    def forward(self, x):
        return self.mlp(self.ln_q(x).reshape(-1, self.mlp[0].in_features))


class VisionTransformer(nn.Module):
    def __init__(self, cfg: QwenVisionConfig):
        super().__init__()
        self.cfg = cfg
        self.patch_embed = nn.Module()
        p, t = cfg.patch_size, cfg.temporal_patch_size
        self.patch_embed.proj = nn.Module()  # a Conv3d with kernel = stride: a linear map over rows
        self.patch_embed.proj.weight = nn.Parameter(torch.empty(cfg.hidden_size, cfg.in_channels, t, p, p))
        self.blocks = nn.ModuleList(VisionBlock(cfg) for _ in range(cfg.depth))
        self.merger = PatchMerger(cfg)
        head_dim = cfg.hidden_size // cfg.num_heads
        steps = torch.arange(0, head_dim // 2, 2, dtype=torch.float, device="cpu")
        self._inv_freq = 1.0 / (10000.0 ** (steps / (head_dim // 2)))  # 2-D RoPE: theta 10000

    def forward(self, pixels: torch.Tensor, grids: list) -> torch.Tensor:
        """pixels [N, C*T*P*P] for all items; grids [(t, h, w)] in patches -> merged tokens [N/4, out]."""
        cfg, device = self.cfg, pixels.device
        unit = cfg.spatial_merge_size ** 2
        w = self.patch_embed.proj.weight
        x = F.linear(pixels.to(w.dtype), w.reshape(w.shape[0], -1))
        window_index, window_bounds = window_order(grids, cfg)
        window_index = window_index.to(device)
        N, C = x.shape
        x = x.view(N // unit, unit, C)[window_index].view(N, C)
        pos = patch_positions(grids, cfg.spatial_merge_size).to(device)  # [N, 2] (row, column)
        freqs = (pos.float()[..., None] * self._inv_freq.to(device)).flatten(1)  # [N, head_dim/2]
        freqs = freqs.view(N // unit, unit, -1)[window_index].view(N, -1)
        emb = torch.cat([freqs, freqs], dim=-1)
        cos, sin = emb.cos(), emb.sin()
        full = segment_groups(full_bounds(grids), device)
        windows = segment_groups(window_bounds, device)
        for i, block in enumerate(self.blocks):
            x = block(x, cos, sin, full if i in cfg.fullatt_block_indexes else windows)
        return self.merger(x)[torch.argsort(window_index)]


def patch_positions(grids, merge: int) -> torch.Tensor:
    """(row, column) of every patch, in the merge-group order the rows arrive in."""
    out = []
    for t, h, w in grids:
        rows = torch.arange(h)[:, None].expand(h, w)
        cols = torch.arange(w)[None, :].expand(h, w)
        shape = (h // merge, merge, w // merge, merge)
        rows, cols = (a.reshape(shape).transpose(1, 2).flatten() for a in (rows, cols))
        out.append(torch.stack([rows, cols], dim=-1).repeat(t, 1))
    return torch.cat(out)


def full_bounds(grids):
    """Full-attention segments in patches: one per image and per 2-frame slice of a video."""
    bounds, start = [], 0
    for t, h, w in grids:
        for _ in range(t):
            bounds.append((start, start + h * w))
            start += h * w
    return bounds


def window_order(grids, cfg: QwenVisionConfig):
    """Merge-group permutation into window order, and the windows' patch ranges in that order.

    Windows are `window_size` px squares (4x4 merge groups at 112 px) scanned row-major within each
    temporal slice; groups inside a window are row-major; edge windows are partial."""
    m = cfg.spatial_merge_size
    win = cfg.window_size // m // cfg.patch_size
    unit = m * m
    order, bounds, offset, start = [], [], 0, 0
    for t, h, w in grids:
        gh, gw = h // m, w // m
        idx = torch.arange(t * gh * gw).view(t, gh, gw) + offset
        nh, nw = math.ceil(gh / win), math.ceil(gw / win)
        for ti in range(t):
            for wy in range(nh):
                for wx in range(nw):
                    block = idx[ti, wy * win:(wy + 1) * win, wx * win:(wx + 1) * win].flatten()
                    order.append(block)
                    bounds.append((start, start + block.numel() * unit))
                    start += block.numel() * unit
        offset += t * gh * gw
    return torch.cat(order), bounds


# --------------------------------------------------------------------------- the model

@dataclass
class QwenMedia:
    """One preprocessed image or video: encoder rows, its patch grid and its LLM positions."""
    kind: str  # "image" | "video"
    pixels: torch.Tensor
    grid: tuple  # (t, h, w) in patches
    n_tokens: int
    second_per_grid_t: float = 0.0  # seconds per temporal slice (videos)


class Qwen2_5_VL(nn.Module):
    name = "Qwen2.5-VL"
    placeholders = {"image": "<|image_pad|>", "video": "<|video_pad|>"}
    default_template = None  # the checkpoints ship their chat template
    media_options = ("min_pixels", "max_pixels", "fps", "max_frames")

    def __init__(self, cfg: Qwen2_5_VLConfig):
        super().__init__()
        self.cfg = cfg
        self.visual = VisionTransformer(cfg.vision)
        self.language_model = DecoderLM(cfg.text)
        self.image_token_id, self.video_token_id = cfg.image_token_id, cfg.video_token_id

    @classmethod
    def config_from_dir(cls, path: Path, config: dict) -> Qwen2_5_VLConfig:
        return parse_config(path, config)

    def load_checkpoint(self, path: Path) -> None:
        tensors = ((canonical_name(n), t) for n, t in iter_tensors(weight_files(path)))
        load_weights(self, tensors, what=str(path))

    # ------------------------------------------------------------------ media
    def _pixel_range(self, min_pixels, max_pixels):
        return min_pixels or self.cfg.min_pixels, max_pixels or self.cfg.max_pixels

    def prepare_image(self, img, min_pixels=None, max_pixels=None, **_) -> QwenMedia:
        v = self.cfg.vision
        lo, hi = self._pixel_range(min_pixels, max_pixels)
        pixels, grid = prep.preprocess_image(img, lo, hi, self.cfg.image_mean, self.cfg.image_std, v.patch_size,
                                             v.temporal_patch_size, v.spatial_merge_size)
        return QwenMedia("image", pixels, tuple(grid), prep.num_tokens(grid, v.spatial_merge_size))

    def prepare_video(self, video, fps=None, max_frames=None, min_pixels=None, max_pixels=None, **_) -> QwenMedia:
        """A file is sampled at `fps` (2.0) from its own frame rate, at most `max_frames` frames;
        a frame list is taken as already sampled at `fps`. Per-frame pixels follow qwen-vl-utils'
        video budget (capped by `max_pixels`)."""
        v = self.cfg.vision
        frames, sampled_fps = prep.sample_video(video, fps=fps or prep.FPS, max_frames=max_frames or prep.FPS_MAX_FRAMES)
        lo, hi = min_pixels or prep.VIDEO_MIN_PIXELS, max_pixels or prep.VIDEO_MAX_PIXELS
        pixels, grid, spt = prep.preprocess_video(frames, sampled_fps, lo, hi, self.cfg.image_mean, self.cfg.image_std,
                                                  v.patch_size, v.temporal_patch_size, v.spatial_merge_size)
        return QwenMedia("video", pixels, tuple(grid), prep.num_tokens(grid, v.spatial_merge_size), spt)

    @torch.no_grad()
    def encode(self, items: list) -> list:
        """Merged visual tokens [n_tokens, hidden] for each item (one encoder call for all)."""
        device = self.language_model.embed_tokens.weight.device
        feats = self.visual(torch.cat([it.pixels for it in items]).to(device), [it.grid for it in items])
        return list(feats.split([it.n_tokens for it in items]))

    # ------------------------------------------------------------------ positions
    def positions(self, n_tokens: int, spans, media, device) -> torch.Tensor:
        """M-RoPE ids [3, n_tokens] for a prompt whose visual slots are `spans`."""
        pos = torch.empty(3, n_tokens, dtype=torch.long)
        merge, tps = self.cfg.vision.spatial_merge_size, self.cfg.vision.tokens_per_second
        nxt = done = 0  # next free position id; end of the last placed range
        for s, e, j in sorted(spans):
            pos[:, done:s] = torch.arange(nxt, nxt + s - done)
            base = nxt + s - done
            item = media[j]
            t, h, w = item.grid[0], item.grid[1] // merge, item.grid[2] // merge
            # temporal ids: floor(slice index x seconds per slice x tokens per second), float math
            time = torch.tensor([int(ti * item.second_per_grid_t * tps) for ti in range(t)])
            ids = torch.stack(torch.meshgrid(time, torch.arange(h), torch.arange(w), indexing="ij")).reshape(3, -1)
            pos[:, s:e] = base + ids
            nxt, done = int(pos[:, s:e].max()) + 1, e
        pos[:, done:] = torch.arange(nxt, nxt + n_tokens - done)
        return pos.to(device)
