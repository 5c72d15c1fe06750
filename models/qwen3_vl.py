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
import math
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from tinyvila.errors import CheckpointError
from tinyvila.loader import read_json
from tinyvila.sparsity import compact_grid

from .layers import DecoderLM, GraphCache, TextConfig, activation
from .quantized import act_input
from .qwen2_5_vl import VisionBlock as Qwen25VisionBlock
from .qwen2_5_vl import (MAX_RATIO, QwenMedia, QwenMediaError, Qwen2_5_VL, VisionAttention, _frames_to_uint8,
                         full_bounds, patch_positions, patchify, resize_frames_bicubic, segment_groups,
                         weight_has_lm_head)

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
    # videos: transformers' Qwen3VLVideoProcessor defaults unless video_preprocessor_config.json says
    video_min_pixels: int = 128 * 32 * 32
    video_max_pixels: int = 768 * 32 * 32
    video_mean: tuple = HALF
    video_std: tuple = HALF


def parse_config(path: Path, config: dict) -> Qwen3VLConfig:
    text_fields = dict(config.get("text_config") or {})
    if "tie_word_embeddings" not in text_fields:
        text_fields["tie_word_embeddings"] = bool(config.get("tie_word_embeddings", False))
    text = TextConfig.from_dict(text_fields, "qwen3")
    text.mrope_interleaved = True  # transformers interleaves whatever the flag says
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
    video = read_json(path / "video_preprocessor_config.json", required=False)
    video_size = video.get("size") or {}
    return Qwen3VLConfig(
        text=text, vision=vision,
        image_token_id=int(config.get("image_token_id", 151655)),
        video_token_id=int(config.get("video_token_id", 151656)),
        vision_start_token_id=int(config.get("vision_start_token_id", 151652)),
        vision_end_token_id=int(config.get("vision_end_token_id", 151653)),
        min_pixels=int(pre.get("min_pixels") or size.get("shortest_edge") or 65536),
        max_pixels=int(pre.get("max_pixels") or size.get("longest_edge") or 16777216),
        image_mean=tuple(pre.get("image_mean", HALF)), image_std=tuple(pre.get("image_std", HALF)),
        video_min_pixels=int(video_size.get("shortest_edge") or 128 * 32 * 32),
        video_max_pixels=int(video_size.get("longest_edge") or 768 * 32 * 32),
        video_mean=tuple(video.get("image_mean", HALF)), video_std=tuple(video.get("image_std", HALF)))


# --------------------------------------------------------------------------- video preprocessing
#
# As transformers 5.25's Qwen3VLVideoProcessor and Qwen3VLProcessor: frames sampled at `fps` (2)
# from the file's rate, one size for the clip from a budget over all its frames, bicubic resize,
# x/255, (x - mean) / std, the frame count padded to even with the last frame, patchify. Each
# frame pair is one LLM item, preceded in the prompt by its timestamp as text ("<1.5 seconds>":
# the mean time of its two frames).

FPS = 2.0
MIN_FRAMES, MAX_FRAMES = 4, 768


def video_frame_indices(total_frames: int, video_fps: float, fps=FPS, max_frames=MAX_FRAMES):
    """The frames to decode: int(seconds * fps) of them, at least 4, at most max_frames and the
    whole video, evenly spread (numpy's linspace, rounded)."""
    n = int(total_frames / video_fps * fps)
    n = min(max(n, MIN_FRAMES), max_frames, total_frames)
    return np.linspace(0, total_frames - 1, n).round().astype(int).tolist()


def frame_pair_times(indices: list, video_fps: float, temporal: int = 2) -> list:
    """Seconds of each frame pair: the mean of its frames' times (the last frame repeats to pad)."""
    indices = list(indices) + [indices[-1]] * (-len(indices) % temporal)
    times = [i / video_fps for i in indices]
    return [(times[k] + times[k + temporal - 1]) / 2 for k in range(0, len(times), temporal)]


def video_size(num_frames, height, width, factor, temporal, min_pixels, max_pixels):
    """(h, w) for every frame of a clip: multiples of `factor`, its frame count (rounded to a
    multiple of `temporal`) x h x w within [min_pixels, max_pixels] (the video smart_resize of
    transformers' Qwen3VL; a side under `factor` is first scaled up, aspect kept)."""
    given = f"{width}x{height}"
    if height < factor or width < factor:
        scale = max(factor / height, factor / width)
        height, width = int(height * scale), int(width * scale)
    if max(height, width) / min(height, width) > MAX_RATIO:
        raise QwenMediaError(f"its frames are {given} pixels: an aspect ratio over {MAX_RATIO}")
    h, w = round(height / factor) * factor, round(width / factor) * factor
    t = round(num_frames / temporal) * temporal
    if t * h * w > max_pixels:
        beta = math.sqrt(num_frames * height * width / max_pixels)
        h = max(factor, math.floor(height / beta / factor) * factor)
        w = max(factor, math.floor(width / beta / factor) * factor)
    elif t * h * w < min_pixels:
        beta = math.sqrt(min_pixels / (num_frames * height * width))
        h, w = math.ceil(height * beta / factor) * factor, math.ceil(width * beta / factor) * factor
    return h, w


def preprocess_video(frames, min_pixels, max_pixels, mean, std, patch=16, temporal=2, merge=2):
    """Sampled RGB frames -> (rows [t*gh*gw, 3*temporal*patch*patch], grid (t, gh, gw)), the rows
    of frame pair k contiguous."""
    first = np.asarray(frames[0])
    height, width = first.shape[:2]
    if len(frames) < temporal:
        raise QwenMediaError(f"a video needs at least {temporal} frames, got {len(frames)}")
    h, w = video_size(len(frames), height, width, patch * merge, temporal, min_pixels, max_pixels)
    x = resize_frames_bicubic(_frames_to_uint8(frames, height, width), h, w).float()
    m = (torch.tensor(mean, dtype=torch.float32) * 255).view(1, 3, 1, 1)
    sd = (torch.tensor(std, dtype=torch.float32) * 255).view(1, 3, 1, 1)
    x = (x - m) / sd
    if len(frames) % temporal:
        x = torch.cat([x, x[-1:].expand(temporal - len(frames) % temporal, -1, -1, -1)])
    rows, grid = patchify(x, patch, temporal, merge)
    return rows.contiguous(), grid


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


class VisionBlock(Qwen25VisionBlock):
    """Qwen2.5-VL's block with LayerNorms and a plain (ungated) MLP."""

    def __init__(self, cfg: Qwen3VisionConfig):
        nn.Module.__init__(self)
        self.norm1 = nn.LayerNorm(cfg.hidden_size, eps=1e-6)
        self.attn = VisionAttention(cfg)
        self.norm2 = nn.LayerNorm(cfg.hidden_size, eps=1e-6)
        self.mlp = VisionMLP(cfg)

    def mlp_input(self) -> nn.Module:
        return self.mlp.linear_fc1


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
        return self.linear_fc2(F.gelu(self.linear_fc1(x)))


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

@dataclass
class FramePair(QwenMedia):
    """One frame pair of a video (kind "video", grid (1, h, w)): an LLM item of its own, its
    timestamp written as text before it. `part`: its index in the video."""
    seconds: float = 0.0
    part: int = 0


class Qwen3VL(Qwen2_5_VL):
    """Image preparation, encoding and panels as Qwen2.5-VL (its preprocessing at patch 16 with
    mean and std 0.5); its own encoder, decoder options, videos and positions."""
    name = "Qwen3-VL"

    def __init__(self, cfg: Qwen3VLConfig):
        nn.Module.__init__(self)  # not Qwen2_5_VL's: it would build the Qwen2.5 encoder
        self.cfg = cfg
        self.visual = VisionTransformer(cfg.vision)
        self.language_model = DecoderLM(cfg.text)
        self.language_model.deepstack_layers = len(cfg.vision.deepstack_visual_indexes)
        self.image_token_id, self.video_token_id = cfg.image_token_id, cfg.video_token_id

    @classmethod
    def config_from_dir(cls, path: Path, config: dict) -> Qwen3VLConfig:
        return parse_config(path, config)

    def prepare_video(self, video, fps=None, max_frames=None, min_pixels=None, max_pixels=None, **_) -> list:
        """A file is sampled at `fps` (2.0) from its own rate, at most `max_frames` frames; a frame
        list is taken as already sampled at `fps`. Returns one FramePair per two frames."""
        v, fps = self.cfg.vision, fps or FPS
        if video.kind == "frames":
            indices, rate = list(range(video.num_frames)), fps
        else:
            rate = video.fps or fps
            indices = video_frame_indices(video.num_frames, rate, fps, max_frames or MAX_FRAMES)
        if len(indices) < v.temporal_patch_size:
            raise QwenMediaError(f"video '{video.name}' has {video.num_frames} frame(s); Qwen3-VL needs at least "
                                 f"{v.temporal_patch_size} (pass a single frame as an image instead)")
        try:
            pixels, (t, h, w) = preprocess_video(
                video.frames(indices), min_pixels or self.cfg.video_min_pixels,
                max_pixels or self.cfg.video_max_pixels, self.cfg.video_mean, self.cfg.video_std, v.patch_size,
                v.temporal_patch_size, v.spatial_merge_size)
        except QwenMediaError as e:
            raise QwenMediaError(f"cannot use video '{video.name}': {e}") from None
        n = h * w // v.spatial_merge_size ** 2
        times = frame_pair_times(indices, rate, v.temporal_patch_size)
        return [FramePair("video", rows, (1, h, w), n, seconds=sec, part=k)
                for k, (rows, sec) in enumerate(zip(pixels.split(h * w), times))]

    def media_content(self, item) -> list:
        """A frame pair's timestamp comes before it, as text (Qwen3VLProcessor's "<1.5 seconds>")."""
        if isinstance(item, FramePair):
            return [{"type": "text", "text": f"<{item.seconds:.1f} seconds>"}, {"type": "video"}]
        return [{"type": item.kind}]

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
