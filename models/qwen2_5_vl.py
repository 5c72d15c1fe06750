"""Qwen2.5-VL: a windowed-attention ViT with 2-D RoPE, a 2x2 patch merger, and a Qwen2 decoder
with multimodal RoPE.

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

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from tinyvila.errors import CheckpointError, MediaError, TinyVilaError
from tinyvila.loader import read_json, tensor_shapes, weight_files
from tinyvila.media import CLIP_MEAN, CLIP_STD, resize_bicubic, to_normalized_tensor
from tinyvila.kernels.rope import rope_
from tinyvila.sparsity import compact_grid
from tinyvila.visualize import denormalize

from .family import Family
from .layers import MLP, DecoderLM, GraphCache, RMSNorm, TextConfig, attention_with_saliency, rename_key
from .quantized import norm_input  # fused with int8 quantization under W8A8

RENAMES = [("model.visual.", "visual."), ("model.language_model.", "language_model."),
           ("lm_head.", "language_model.lm_head."), ("visual.", "visual."), ("model.", "language_model.")]


def canonical_name(name: str) -> str:
    """A checkpoint key in either layout -> this module's parameter name."""
    return rename_key(name, RENAMES)


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


# --------------------------------------------------------------------------- preprocessing
#
# Qwen2.5-VL image and video preprocessing (pure functions).
#
# Images reproduce transformers 5.23 `Qwen2VLImageProcessorPil` (the parity reference):
# `smart_resize` -> PIL bicubic resize on uint8 -> x/255 -> (x - mean) / std -> duplicate in time
# -> patchify. Videos reproduce qwen-vl-utils 0.0.10 `fetch_video` (frame sampling, per-frame pixel
# budget, torchvision bicubic+antialias resize) followed by the transformers video processor's
# normalise + patchify.
#
# Patch rows come in merge-unit order: the merge x merge patches of one LLM token are consecutive
# rows (top-left, top-right, bottom-left, bottom-right), units in raster order over (t, h, w).
# Columns are (channel, frame, py, px), the flattening of the Conv3d patch-embedding weight.
#
# Where transformers 5.23 and qwen-vl-utils disagree, transformers wins for `smart_resize` (no
# `max(28, .)` clamp on the first rounding, a `max(28, .)` clamp in the max_pixels branch; the two
# only differ for a side under 14 px) and qwen-vl-utils for frame sampling and the video budget
# (transformers' video processor samples nothing by default and caps the budget only on request).

PATCH_SIZE = 14
TEMPORAL_PATCH_SIZE = 2
MERGE_SIZE = 2
IMAGE_FACTOR = PATCH_SIZE * MERGE_SIZE  # 28
MAX_RATIO = 200

# Image pixel bounds: qwen-vl-utils MIN/MAX_PIXELS = hub preprocessor_config.json min/max_pixels.
MIN_PIXELS = 4 * 28 * 28            # 3,136
MAX_PIXELS = 16384 * 28 * 28        # 12,845,056

# Video (qwen-vl-utils 0.0.10).
VIDEO_MIN_PIXELS = 128 * 28 * 28    # 100,352
VIDEO_MAX_PIXELS = 768 * 28 * 28    # 602,112
VIDEO_TOTAL_PIXELS = int(128000 * 28 * 28 * 0.9)  # 90,316,800 (its env override is not read)
FPS = 2.0
FRAME_FACTOR = 2
FPS_MIN_FRAMES = 4
FPS_MAX_FRAMES = 768


class QwenMediaError(MediaError, ValueError):
    """An image or video Qwen2.5-VL cannot take (aspect ratio over 200, a one-frame video).

    A `MediaError` (one-line message for the user) that is also the `ValueError` transformers and
    qwen-vl-utils raise in the same cases.
    """


# ---------------------------------------------------------------------------------------------
# Sizes

def smart_resize(height, width, factor=IMAGE_FACTOR, min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS):
    """(height, width) -> (h, w): multiples of `factor`, h*w within [min_pixels, max_pixels],
    aspect ratio kept as closely as possible (transformers 5.23 `smart_resize`).

    Python's `round` (half to even) for the first rounding; in the max_pixels branch each side is
    floored to a multiple of `factor`, but never below `factor`; in the min_pixels branch each side
    is ceiled. Raises QwenMediaError when max(h, w) / min(h, w) > 200.
    """
    if height <= 0 or width <= 0:
        raise QwenMediaError(f"image has zero size ({width}x{height} pixels)")
    if max(height, width) / min(height, width) > MAX_RATIO:
        raise QwenMediaError(f"image is {width}x{height} pixels: its aspect ratio "
                             f"{max(height, width) / min(height, width):.1f} is over the "
                             f"{MAX_RATIO} that Qwen2.5-VL accepts")
    h = round(height / factor) * factor
    w = round(width / factor) * factor
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / beta / factor) * factor)
        w = max(factor, math.floor(width / beta / factor) * factor)
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h = math.ceil(height * beta / factor) * factor
        w = math.ceil(width * beta / factor) * factor
    return h, w


def num_tokens(grid_thw, merge=MERGE_SIZE):
    """LLM placeholder tokens for one image or video: t * h * w // merge**2."""
    t, h, w = (int(v) for v in grid_thw)
    return t * h * w // (merge * merge)


# ---------------------------------------------------------------------------------------------
# Patchify

def patchify(frames, patch=PATCH_SIZE, temporal=TEMPORAL_PATCH_SIZE, merge=MERGE_SIZE):
    """float [T, C, H, W] -> (rows [T/temporal * H/patch * W/patch, C*temporal*patch*patch],
    (T/temporal, H/patch, W/patch)).

    T must be a multiple of `temporal` and H, W of patch*merge. Frames (k*temporal .. k*temporal +
    temporal - 1) form temporal slice k. Rows: merge units in raster order over (t, h/merge,
    w/merge), the merge x merge patches of a unit consecutive in raster order. Columns: (channel,
    frame within the slice, py, px).
    """
    t, c, h, w = frames.shape
    if t % temporal or h % (patch * merge) or w % (patch * merge):
        raise ValueError(f"patchify needs T % {temporal} == 0 and H, W multiples of "
                         f"{patch * merge}, got {tuple(frames.shape)}")
    gt, gh, gw = t // temporal, h // patch, w // patch
    x = frames.reshape(gt, temporal, c, gh // merge, merge, patch, gw // merge, merge, patch)
    # axes: 0 gt, 1 tp, 2 c, 3 h-unit, 4 mh, 5 py, 6 w-unit, 7 mw, 8 px
    x = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
    return x.reshape(gt * gh * gw, c * temporal * patch * patch), (gt, gh, gw)


# ---------------------------------------------------------------------------------------------
# Images

def preprocess_image(img, min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS, mean=CLIP_MEAN, std=CLIP_STD,
                     patch=PATCH_SIZE, temporal=TEMPORAL_PATCH_SIZE, merge=MERGE_SIZE):
    """RGB PIL image -> (pixel_values float32 [gh*gw, 3*temporal*patch*patch], grid_thw (1, gh, gw)).

    As transformers' `Qwen2VLImageProcessorPil`: smart_resize (factor patch*merge), PIL bicubic
    resize of the uint8 image, x/255 then (x - mean)/std, the single frame repeated `temporal`
    times, patchify. Load the image with `tinyvila.media.load_image` first.
    """
    h, w = smart_resize(img.height, img.width, patch * merge, min_pixels, max_pixels)
    x = to_normalized_tensor(resize_bicubic(img, (w, h)), mean, std)  # [3, h, w] float32
    rows, grid = patchify(x.unsqueeze(0).expand(temporal, -1, -1, -1), patch, temporal, merge)
    return rows.contiguous(), grid


# ---------------------------------------------------------------------------------------------
# Video: frame sampling and pixel budget (qwen-vl-utils 0.0.10)

def video_num_frames(total_frames, video_fps, fps=FPS, max_frames=FPS_MAX_FRAMES,
                     min_frames=FPS_MIN_FRAMES, nframes=None):
    """How many frames to sample (qwen-vl-utils `smart_nframes`).

    nframes given: round(nframes / 2) * 2. Otherwise n = total_frames / video_fps * fps, clamped
    to [ceil2(min_frames), floor2(min(max_frames, total_frames))] and to <= total_frames, then
    floored to even. The result must satisfy 2 <= n <= total_frames, else QwenMediaError: a
    one-frame video cannot be sampled (qwen-vl-utils raises ValueError; pass such a video as an
    image, or as a one-frame list, which is padded to two frames).
    """
    if nframes is not None:
        n = round(nframes / FRAME_FACTOR) * FRAME_FACTOR
    else:
        lo = math.ceil(min_frames / FRAME_FACTOR) * FRAME_FACTOR
        hi = math.floor(min(max_frames, total_frames) / FRAME_FACTOR) * FRAME_FACTOR
        n = total_frames / video_fps * fps
        n = min(min(max(n, lo), hi), total_frames)
        n = math.floor(n / FRAME_FACTOR) * FRAME_FACTOR
    if not FRAME_FACTOR <= n <= total_frames:
        if total_frames < FRAME_FACTOR:
            raise QwenMediaError(f"video has {total_frames} frame(s); Qwen2.5-VL video input needs at "
                                 f"least {FRAME_FACTOR} (pass a single frame as an image instead)")
        raise QwenMediaError(f"cannot sample {n} frames from a video of {total_frames} frames "
                             f"(need {FRAME_FACTOR} <= frames <= {total_frames})")
    return int(n)


def video_frame_indices(total_frames, video_fps, fps=FPS, max_frames=FPS_MAX_FRAMES,
                        min_frames=FPS_MIN_FRAMES, nframes=None):
    """Frame indices to decode: round(linspace(0, total_frames - 1, n)) with n from
    `video_num_frames`. Evaluated as qwen-vl-utils does (torch float32 linspace, round half to
    even), so the indices agree for very long videos too."""
    n = video_num_frames(total_frames, video_fps, fps, max_frames, min_frames, nframes)
    return torch.linspace(0, total_frames - 1, n, dtype=torch.float32).round().long().tolist()


def sampled_fps(n_sampled, total_frames, video_fps):
    """Frame rate the sampled frames stand for: n / total_frames * video_fps (qwen-vl-utils
    `sample_fps`, what the processor receives as `fps`)."""
    return n_sampled / max(total_frames, 1e-6) * video_fps


def video_pixel_budget(n_frames, min_pixels=VIDEO_MIN_PIXELS, max_pixels=VIDEO_MAX_PIXELS,
                       total_pixels=VIDEO_TOTAL_PIXELS):
    """Per-frame (min_pixels, max_pixels) for a clip of `n_frames` sampled frames:
    max = max(min(VIDEO_MAX_PIXELS, total_pixels / n_frames * 2), int(min_pixels * 1.05)), then
    capped by the user's `max_pixels` (a larger one does not raise the limit, as in qwen-vl-utils).
    The max may be a float; smart_resize takes it as is, like qwen-vl-utils."""
    budget = max(min(VIDEO_MAX_PIXELS, total_pixels / n_frames * FRAME_FACTOR), int(min_pixels * 1.05))
    return min_pixels, min(max_pixels, budget)


def sample_video(video, fps=FPS, max_frames=FPS_MAX_FRAMES, min_frames=FPS_MIN_FRAMES, nframes=None):
    """A `tinyvila.media.Video` -> (frames: list of RGB PIL images, fps_sampled).

    A file: `video_frame_indices` frames, decoded only those, fps_sampled = n / total * video fps
    (a file without a usable frame rate is taken as `fps` frames per second). A frame list: all
    its frames, standing for `fps` frames per second (qwen-vl-utils' default 2.0), unsampled.
    Errors name the video.
    """
    if video.kind == "frames":
        return video.frames(range(video.num_frames)), float(fps)
    video_fps = video.fps if video.fps is not None else float(fps)
    try:
        idx = video_frame_indices(video.num_frames, video_fps, fps, max_frames, min_frames, nframes)
    except QwenMediaError as e:
        raise QwenMediaError(f"cannot use video '{video.name}': {e}") from None
    return video.frames(idx), sampled_fps(len(idx), video.num_frames, video_fps)


# ---------------------------------------------------------------------------------------------
# Video: resize, normalise, patchify

def resize_frames_bicubic(frames, height, width):
    """uint8 [N, 3, H, W] -> uint8 [N, 3, height, width], as qwen-vl-utils 0.0.10 resizes videos:
    `torchvision.transforms.functional.resize(video, [h, w], BICUBIC, antialias=True)`.

    Verified in pytorch/vision's source (torchvision/transforms/functional.py `resize`, and
    _functional_tensor.py `resize`, `_cast_squeeze_in/_out` at commit 0ffa6ae2): that v1 API returns the
    input unchanged when the size is already right; otherwise it casts a uint8 tensor to float32,
    calls `interpolate(mode="bicubic", align_corners=False, antialias=True)`, clamps to [0, 255]
    (bicubic + uint8 only), rounds with `torch.round` (half to even) and casts back to uint8.
    qwen-vl-utils calls `.float()` only after that, so its frames hold integer values in [0, 255]
    (no rounding or clamping after that `.float()`; the resize itself rounds). The v2 API
    (`transforms.v2.functional.resize_image`, commit 00bf6d49) would instead run PyTorch's native
    uint8 bicubic kernel on CPU, which differs by up to ~10 levels on some pixels; qwen-vl-utils
    0.0.10 calls the v1 API.
    """
    if frames.dtype != torch.uint8 or frames.dim() != 4:
        raise ValueError(f"expected uint8 [N, 3, H, W] frames, got {frames.dtype} {tuple(frames.shape)}")
    if tuple(frames.shape[-2:]) == (height, width):
        return frames
    x = F.interpolate(frames.to(torch.float32), size=[height, width], mode="bicubic",
                      align_corners=False, antialias=True)
    return x.clamp_(0, 255).round_().to(torch.uint8)


def _frames_to_uint8(frames, height, width):
    """RGB PIL images / uint8 HxWx3 arrays, all height x width -> uint8 tensor [N, 3, H, W]."""
    arrs = []
    for f in frames:
        if isinstance(f, Image.Image) and f.mode != "RGB":
            raise ValueError(f"expected RGB frames, got mode {f.mode!r}")
        a = np.asarray(f)
        if a.dtype != np.uint8 or a.ndim != 3 or a.shape[2] != 3:
            raise ValueError(f"expected uint8 HxWx3 frames, got {a.dtype} {a.shape}")
        if a.shape[:2] != (height, width):
            raise ValueError(f"all frames must have one size: the first is {width}x{height}, "
                             f"got one of {a.shape[1]}x{a.shape[0]}")
        arrs.append(a)
    return torch.from_numpy(np.stack(arrs)).permute(0, 3, 1, 2)


def preprocess_video(frames, fps_sampled=FPS, min_pixels=VIDEO_MIN_PIXELS, max_pixels=VIDEO_MAX_PIXELS,
                     mean=CLIP_MEAN, std=CLIP_STD, patch=PATCH_SIZE, temporal=TEMPORAL_PATCH_SIZE,
                     merge=MERGE_SIZE, total_pixels=VIDEO_TOTAL_PIXELS, chunk=16):
    """Sampled frames -> (pixel_values float32 [grid_t*gh*gw, 3*temporal*patch*patch],
    grid_thw (grid_t, gh, gw), second_per_grid_t).

    frames: RGB PIL images (or uint8 HxWx3 arrays), all of one size, e.g. from `sample_video`.
    fps_sampled: the rate the frames stand for; second_per_grid_t = temporal / fps_sampled.
    min_pixels / max_pixels: the per-frame bounds asked for (qwen-vl-utils' video `min_pixels` /
    `max_pixels`). As in qwen-vl-utils the max is then lowered to the clip's share of
    `total_pixels`: smart_resize uses `video_pixel_budget(n, min_pixels, max_pixels, total_pixels)`
    with n = the frame count padded to a multiple of `temporal`. total_pixels=None: no total
    budget, min_pixels / max_pixels are used as they are.

    One smart_resize for the clip (from the first frame's size), every frame resized with
    `resize_frames_bicubic` (torchvision bicubic + antialias, rounded to uint8), the frame count
    padded to a multiple of `temporal` by repeating the last frame, normalised as transformers'
    torchvision backend does (fused: (x - 255*mean) / (255*std) in float32), patchified.
    Frames are converted `chunk` at a time to bound the temporary memory.
    """
    n = len(frames)
    if n == 0:
        raise ValueError("preprocess_video needs at least one frame")
    if fps_sampled is None or not fps_sampled > 0:
        raise ValueError(f"fps_sampled must be > 0, got {fps_sampled!r}")
    first = frames[0]
    if isinstance(first, Image.Image):
        height, width = first.height, first.width
    else:
        height, width = np.asarray(first).shape[:2]
    n_pad = -(-n // temporal) * temporal
    if total_pixels is not None:
        min_pixels, max_pixels = video_pixel_budget(n_pad, min_pixels, max_pixels, total_pixels)
    h, w = smart_resize(height, width, patch * merge, min_pixels, max_pixels)

    # transformers' TorchvisionBackend fuses rescale into normalise: mean and std (float32) times
    # 1/rescale_factor, then (x - mean) / std on the float32 0..255 pixels.
    rescale = 1 / 255
    m = (torch.tensor(mean, dtype=torch.float32) * (1.0 / rescale)).view(1, 3, 1, 1)
    s = (torch.tensor(std, dtype=torch.float32) * (1.0 / rescale)).view(1, 3, 1, 1)
    out = torch.empty(n_pad, 3, h, w, dtype=torch.float32)
    for start in range(0, n, chunk):
        part = resize_frames_bicubic(_frames_to_uint8(frames[start:start + chunk], height, width), h, w)
        out[start:start + part.shape[0]] = (part.to(torch.float32) - m) / s
    if n_pad > n:
        out[n:] = out[n - 1]
    rows, grid = patchify(out, patch, temporal, merge)
    return rows.contiguous(), grid, temporal / fps_sampled


# --------------------------------------------------------------------------- vision encoder

def segment_attention(q, k, v, groups):
    """Non-causal attention inside segments. q, k, v: [N, H, D]; groups: segment_groups' output
    (segments of equal length are batched together)."""
    out = torch.empty_like(q)
    for start, count, length, idx in groups:
        if idx is None:  # back to back: a view of the rows, nothing gathered
            rows = slice(start, start + count * length)
            qs, ks, vs = (t[rows].unflatten(0, (count, length)).transpose(1, 2) for t in (q, k, v))
            out[rows] = F.scaled_dot_product_attention(qs, ks, vs).transpose(1, 2).flatten(0, 1)
        else:
            qs, ks, vs = (t[idx].transpose(1, 2) for t in (q, k, v))  # [n, H, L, D]
            out[idx] = F.scaled_dot_product_attention(qs, ks, vs).transpose(1, 2)
    return out


def segment_groups(bounds, device):
    """[(start, end), ...] -> (first start, count, length, index) per distinct segment length.
    `index` [count, length] gathers the segments' rows; it is None when they lie back to back
    (an image's full attention, the windows of an image whose sides are whole windows), where a
    view serves and the gather and scatter copies are saved."""
    by_len = defaultdict(list)
    for s, e in bounds:
        if e > s:
            by_len[e - s].append(s)
    groups = []
    for n, starts in by_len.items():
        back_to_back = all(b - a == n for a, b in zip(starts, starts[1:]))
        idx = None if back_to_back else (torch.tensor(starts)[:, None] + torch.arange(n)[None, :]).to(device)
        groups.append((starts[0], len(starts), n, idx))
    return groups


class VisionAttention(nn.Module):
    def __init__(self, cfg: QwenVisionConfig):
        super().__init__()
        self.n_heads = cfg.num_heads
        self.qkv = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size)
        self.proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)

    def forward(self, x, cos, sin, groups, saliency_bounds=None):
        """With `saliency_bounds` (the full-attention segments as (start, end) ranges and as the
        int32 device tensor of their boundaries; `groups` is then unused): also each patch's
        saliency [N], the column mean of its segment's attention."""
        qkv = self.qkv(x)
        N, C = qkv.shape[0], qkv.shape[1] // 3
        q, k, v = qkv.view(N, 3, self.n_heads, C // self.n_heads).unbind(1)  # [N, H, D] each
        q, k = rope_fp32(q, cos, sin), rope_fp32(k, cos, sin)
        if saliency_bounds is not None:
            bounds, cu = saliency_bounds
            out, saliency = attention_with_saliency(q, k, v, bounds, 0, cu_seqlens=cu)
            return self.proj(out.reshape(N, C)), saliency
        return self.proj(segment_attention(q, k, v, groups).reshape(N, C))


def rope_fp32(x, cos, sin):
    """Rotate-half RoPE computed in fp32 (as the reference does for the ViT), cast back. On a GPU
    in place, in one Triton kernel (x may be a view into the fused qkv)."""
    if x.is_cuda:
        return rope_(x, cos, sin)
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

    def mlp_input(self) -> nn.Module:
        """The linear that reads norm2's output (under W8A8 the norm also quantizes for it)."""
        return self.mlp.gate_up_proj

    def forward(self, x, cos, sin, groups, saliency_bounds=None):
        """With `saliency_bounds`: (output, each patch's saliency) (VisionAttention.forward)."""
        attn = self.attn(norm_input(self.norm1, x, self.attn.qkv), cos, sin, groups, saliency_bounds)
        saliency = None
        if saliency_bounds is not None:
            attn, saliency = attn
        x = x + attn
        x = x + self.mlp(norm_input(self.norm2, x, self.mlp_input()))
        return x if saliency_bounds is None else (x, saliency)


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
        self._graphs = GraphCache()

    graphed = False  # the engine turns it on with CUDA graphs (layers.use_encoder_graphs)
    # Inputs up to this many patches replay as a graph (a 1344x1344 image is 9216: its launches
    # outran the GPU by a quarter). Longer videos are GPU-bound anyway, and a graph would keep
    # their activations allocated between calls.
    GRAPH_MAX_PATCHES = 16384

    def forward(self, pixels: torch.Tensor, grids: list, saliency: bool = False) -> torch.Tensor:
        """pixels [N, C*T*P*P] for all items; grids [(t, h, w)] in patches -> merged tokens [N/4, out];
        with `saliency`, also each merged token's saliency [N/4] (fp32, CPU): the column mean of
        the last full-attention block's attention over its image or frame pair, averaged over the
        token's merge group."""
        if saliency and not self.cfg.fullatt_block_indexes:
            raise TinyVilaError("prefill sparsity needs a full-attention block in the vision encoder")
        if self.graphed and pixels.is_cuda and not torch.is_grad_enabled() and len(pixels) <= self.GRAPH_MAX_PATCHES:
            key = (tuple(pixels.shape), pixels.dtype, tuple(map(tuple, grids)), saliency)
            out = self._graphs.run(key, lambda: self._bind(grids, pixels.device, saliency), pixels)
        else:
            out = self._bind(grids, pixels.device, saliency)(pixels)
        return (out[0], out[1].cpu()) if saliency else out

    def _bind(self, grids, device, saliency):
        """The encoder for one set of grids as a function of the pixels alone: the window order,
        rotary tables and segment tables are made here, once (on the host, then copied), so the
        function itself copies nothing from the host and can be captured as a CUDA graph."""
        cfg = self.cfg
        unit = cfg.spatial_merge_size ** 2
        window_index, window_bounds = window_order(grids, cfg)
        window_index = window_index.to(device)
        N = int(window_index.numel()) * unit
        pos = patch_positions(grids, cfg.spatial_merge_size).to(device)  # [N, 2] (row, column)
        freqs = (pos.float()[..., None] * self._inv_freq.to(device)).flatten(1)  # [N, head_dim/2]
        freqs = freqs.view(N // unit, unit, -1)[window_index].view(N, -1)
        emb = torch.cat([freqs, freqs], dim=-1)
        cos, sin = emb.cos(), emb.sin()
        bounds = full_bounds(grids)
        full, windows = segment_groups(bounds, device), segment_groups(window_bounds, device)
        source = max(cfg.fullatt_block_indexes, default=-1) if saliency else -1  # windows only rank inside one
        cu = torch.tensor([0] + [e for _, e in bounds], dtype=torch.int32).to(device) if source >= 0 else None
        unwindow = torch.argsort(window_index)

        def run(pixels):
            w = self.patch_embed.proj.weight
            x = F.linear(pixels.to(w.dtype), w.reshape(w.shape[0], -1))
            C = x.shape[1]
            x = x.view(N // unit, unit, C)[window_index].view(N, C)
            for i, block in enumerate(self.blocks):
                if i == source:
                    x, scores = block(x, cos, sin, None, (bounds, cu))
                else:
                    x = block(x, cos, sin, full if i in cfg.fullatt_block_indexes else windows)
            merged = self.merger(x)[unwindow]
            if source < 0:
                return merged
            return merged, scores.float().view(N // unit, unit).mean(-1)[unwindow]

        return run


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


class Qwen2_5_VL(Family):
    name = "Qwen2.5-VL"
    placeholders = {"image": "<|image_pad|>", "video": "<|video_pad|>"}
    default_template = None  # the checkpoints ship their chat template
    media_options = ("min_pixels", "max_pixels", "fps", "max_frames")
    quant_skip = ("visual",)  # the vision tower stays 16-bit (AWQ modules_to_not_convert)

    def __init__(self, cfg: Qwen2_5_VLConfig):
        super().__init__()
        self.cfg = cfg
        self.visual = VisionTransformer(cfg.vision)
        self.language_model = DecoderLM(cfg.text)
        self.image_token_id, self.video_token_id = cfg.image_token_id, cfg.video_token_id

    @classmethod
    def config_from_dir(cls, path: Path, config: dict) -> Qwen2_5_VLConfig:
        return parse_config(path, config)

    @property
    def projector(self) -> nn.Module:
        return self.visual.merger

    def checkpoint_files(self, path: Path) -> list:
        return weight_files(path)

    def module_name(self, folder: str, name: str) -> str:
        return canonical_name(name)

    # ------------------------------------------------------------------ media
    def _pixel_range(self, min_pixels, max_pixels):
        return min_pixels or self.cfg.min_pixels, max_pixels or self.cfg.max_pixels

    def prepare_image(self, img, min_pixels=None, max_pixels=None, **_) -> QwenMedia:
        v = self.cfg.vision
        lo, hi = self._pixel_range(min_pixels, max_pixels)
        pixels, grid = preprocess_image(img, lo, hi, self.cfg.image_mean, self.cfg.image_std, v.patch_size,
                                             v.temporal_patch_size, v.spatial_merge_size)
        return QwenMedia("image", pixels, tuple(grid), num_tokens(grid, v.spatial_merge_size))

    def prepare_video(self, video, fps=None, max_frames=None, min_pixels=None, max_pixels=None, **_) -> QwenMedia:
        """A file is sampled at `fps` (2.0) from its own frame rate, at most `max_frames` frames;
        a frame list is taken as already sampled at `fps`. Per-frame pixels follow qwen-vl-utils'
        video budget (capped by `max_pixels`)."""
        v = self.cfg.vision
        frames, fps_sampled = sample_video(video, fps=fps or FPS, max_frames=max_frames or FPS_MAX_FRAMES)
        lo, hi = min_pixels or VIDEO_MIN_PIXELS, max_pixels or VIDEO_MAX_PIXELS
        pixels, grid, spt = preprocess_video(frames, fps_sampled, lo, hi, self.cfg.image_mean, self.cfg.image_std,
                                                  v.patch_size, v.temporal_patch_size, v.spatial_merge_size)
        return QwenMedia("video", pixels, tuple(grid), num_tokens(grid, v.spatial_merge_size), spt)

    @torch.no_grad()
    def encode(self, items: list, saliency: bool = False) -> list:
        """Merged visual tokens [n_tokens, hidden] for each item (one encoder call for all); with
        `saliency`, (features, saliency [n_tokens]) pairs (VisionTransformer.forward)."""
        device = self.language_model.embed_tokens.weight.device
        feats = self.visual(torch.cat([it.pixels for it in items]).to(device), [it.grid for it in items], saliency)
        sizes = [it.n_tokens for it in items]
        if saliency:
            return list(zip(feats[0].split(sizes), feats[1].split(sizes)))
        return list(feats.split(sizes))

    def token_panels(self, item) -> list:
        """The first frame of each temporal slice with its grid of merged tokens (tinyvila.visualize)."""
        v = self.cfg.vision
        m, p, tp = v.spatial_merge_size, v.patch_size, v.temporal_patch_size
        t, h, w = item.grid
        # patchify's inverse: rows (t, h-unit, w-unit, mh, mw) x columns (c, frame, py, px)
        x = item.pixels.view(t, h // m, w // m, m, m, 3, tp, p, p).permute(0, 6, 5, 1, 3, 7, 2, 4, 8)
        frames = denormalize(x.reshape(t * tp, 3, h * p, w * p), self.cfg.image_mean, self.cfg.image_std)
        per_slice = (h // m) * (w // m)
        cells = torch.arange(per_slice).view(h // m, w // m)
        return [(frames[ti * tp], ti * per_slice + cells) for ti in range(t)]

    def visual_groups(self, item) -> torch.Tensor:
        """Attention group of every visual token: an image is one group, a video one per frame
        pair (temporal slice)."""
        t = item.grid[0]
        return torch.arange(t).repeat_interleave(item.n_tokens // t)

    # ------------------------------------------------------------------ positions
    def positions(self, n_tokens: int, spans, media, device, kept=None, mode="compact") -> torch.Tensor:
        """M-RoPE ids [3, n_tokens] for a prompt whose visual slots are `spans`. Items in `kept`
        were pruned: their kept tokens keep their own (t, h, w) ids ("original") or the smallest
        contiguous grid holding them ("compact", each axis rank-compressed); the text after an
        item starts after its largest id."""
        kept = kept or {}
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
            end = base + int(ids.max()) + 1  # the next free id after the item, gaps included
            if j in kept:
                ids = ids[:, kept[j].kept]
                if mode == "compact":
                    ids = compact_grid(ids)
                    end = base + int(ids.max()) + 1
            pos[:, s:e] = base + ids
            nxt, done = end, e
        pos[:, done:] = torch.arange(nxt, nxt + n_tokens - done)
        return pos.to(device)
