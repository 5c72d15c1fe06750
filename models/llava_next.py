"""LLaVA-NeXT (LLaVA-1.6): CLIP ViT-L/14-336 + 2-layer MLP projector + Llama/Mistral decoder.

Mirrors transformers' LlavaNextForConditionalGeneration:
anyres tiles + a squashed base image go through CLIP up to `vision_feature_layer`, the CLS token is
dropped, the projector maps every patch token, and the tile features are stitched, unpadded and
given an `image_newline` column (the anyres section below). Checkpoints load from three key layouts: the
llava-hf hub files (`language_model.model.*`), transformers >= 4.52 in-memory names
(`model.language_model.*`) and the original liuhaotian files (`model.*`, `model.mm_projector.*`).
"""
import functools
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
from PIL import Image

from tinyvila.errors import CheckpointError
from tinyvila.loader import read_json, tensor_shapes, weight_files
from tinyvila.media import CLIP_MEAN, CLIP_STD, resize_bicubic, to_normalized_tensor
from tinyvila.sparsity import positions_1d
from tinyvila.visualize import denormalize

from .family import Family
from .layers import DecoderLM, TextConfig, ViTEncoder, VisionConfig, activation, rename_key

INF = torch.tensor([float("inf")])  # the "newline vector" that packs saliency: structural, always kept
# llava-hf/llava-v1.6-* image_grid_pinpoints, (height, width) pairs.
DEFAULT_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]

# --------------------------------------------------------------------------- anyres preprocessing
#
# LLaVA-NeXT "anyres" preprocessing, token counting and feature packing (pure functions).
#
# Reproduces, in transformers' (height, width) convention for `image_grid_pinpoints`:
#   * `LlavaNextImageProcessorPil` pixel values: best pinpoint -> aspect-preserving bicubic resize
#     -> black padding (centred, odd pixel bottom/right) -> row-major tiles, after a base image
#     squashed to tile x tile;
#   * `LlavaNextModel.pack_image_features` / `unpad_image`: stitch tile features, crop the rows or
#     columns that only saw padding, add a newline column, flatten, prepend the base;
#   * `LlavaNextProcessor._get_number_of_features` token counts.
#
# Counting and cropping share `unpadded_grid`, and `pack` is implemented with `pack_index`, so the
# placeholder count and the packed features cannot disagree. The float
# expressions (`min(w/W, h/H)`, `ceil`, `round(x, 7)`) are written exactly as transformers
# evaluates them, so ties and off-by-one cases fall the same way.


@dataclass
class AnyresImage:
    pixels: torch.Tensor  # float32 [1 + rows*cols, 3, tile, tile]: base, then tiles row-major
    grid: tuple  # (rows, cols) of tiles
    image_size: tuple  # (H, W) of the original image


def select_best_resolution(height, width, pinpoints):
    """Pinpoint (h, w) keeping the most image pixels, then wasting the fewest; first wins ties."""
    best, best_eff, best_waste = None, 0, float("inf")
    for h, w in pinpoints:
        scale = min(w / width, h / height)
        eff = min(int(width * scale) * int(height * scale), width * height)
        waste = w * h - eff
        if eff > best_eff or (eff == best_eff and waste < best_waste):
            best, best_eff, best_waste = (h, w), eff, waste
    if best is None:
        raise ValueError("image_grid_pinpoints is empty")
    return best


def fit_size(height, width, target_h, target_w):
    """Size (h, w) of the aspect-preserving resize into (target_h, target_w) (get_patch_output_size)."""
    scale_w = target_w / width
    scale_h = target_h / height
    if scale_w < scale_h:
        return min(math.ceil(height * scale_w), target_h), target_w
    return target_h, min(math.ceil(width * scale_h), target_w)


def _check_pinpoints(pinpoints, tile_size):
    for h, w in pinpoints:
        if h <= 0 or w <= 0 or h % tile_size or w % tile_size:
            raise ValueError(f"pinpoint {[h, w]} is not a positive multiple of the tile size {tile_size}")


def grid_shape(image_size, pinpoints, tile_size):
    """(rows, cols) of tiles chosen for an image of image_size=(H, W)."""
    _check_pinpoints(pinpoints, tile_size)
    h, w = select_best_resolution(image_size[0], image_size[1], pinpoints)
    return h // tile_size, w // tile_size


def preprocess(img, pinpoints, tile_size, mean, std):
    """RGB PIL image -> AnyresImage (pixels equal to LlavaNextImageProcessorPil's)."""
    if img.mode != "RGB":
        raise ValueError(f"expected an RGB image (use tinyvila.media.load_image), got mode {img.mode!r}")
    H, W = img.height, img.width
    rows, cols = grid_shape((H, W), pinpoints, tile_size)
    th, tw = rows * tile_size, cols * tile_size
    new_h, new_w = fit_size(H, W, th, tw)
    # Pad with black before normalisation; the odd pixel of padding goes bottom/right.
    canvas = Image.new("RGB", (tw, th), (0, 0, 0))
    canvas.paste(resize_bicubic(img, (new_w, new_h)), ((tw - new_w) // 2, (th - new_h) // 2))
    # transformers then resizes (shortest edge) and centre-crops every crop to tile size; both
    # are no-ops on tile x tile crops, and normalisation is per pixel, so normalise once.
    full = to_normalized_tensor(canvas, mean, std)
    crops = [to_normalized_tensor(resize_bicubic(img, (tile_size, tile_size)), mean, std)]
    for r in range(rows):
        for c in range(cols):
            crops.append(full[:, r * tile_size:(r + 1) * tile_size, c * tile_size:(c + 1) * tile_size])
    return AnyresImage(torch.stack(crops), (rows, cols), (H, W))


def unpadded_grid(image_size, grid, patches_per_side):
    """Feature-map crop kept by `unpad_image`: (new_h, new_w, top, left) in patch units.

    The stitched map is (rows*P, cols*P). The side with spare room loses `pad` rows/cols at
    BOTH ends, pad = (current - round(orig * scale, 7)) // 2, even when the difference is odd.
    """
    H, W = image_size
    cur_h, cur_w = grid[0] * patches_per_side, grid[1] * patches_per_side
    if W / H > cur_w / cur_h:
        new_h = int(round(H * (cur_w / W), 7))  # round(.., 7) as transformers: 29.999999999999996 -> 30
        pad = (cur_h - new_h) // 2
        return cur_h - 2 * pad, cur_w, pad, 0
    new_w = int(round(W * (cur_h / H), 7))
    pad = (cur_w - new_w) // 2
    return cur_h, cur_w - 2 * pad, 0, pad


def num_image_tokens(image_size, pinpoints, tile_size, patch_size, newline=True):
    """LLM positions for one image: base P*P + unpadded h*w (+ h newline tokens)."""
    P = tile_size // patch_size
    h, w, _, _ = unpadded_grid(image_size, grid_shape(image_size, pinpoints, tile_size), P)
    return P * P + h * w + (h if newline else 0)


@functools.lru_cache(maxsize=16)
def pack_index(image_size, grid, patches_per_side, newline=True):
    """Source of every packed position: index into the flat [(1 + rows*cols) * P*P] token list
    (base tokens first, then tile 0, tile 1, ...), or -1 for an image_newline position.
    Built once per image layout (cached; callers never modify it): the packing of the features
    and of the saliency and the attention groups all read it."""
    P = patches_per_side
    rows, cols = grid
    h, w, top, left = unpadded_grid(image_size, grid, P)
    y = torch.arange(top, top + h).view(h, 1)  # rows of the stitched map that are kept
    x = torch.arange(left, left + w).view(1, w)
    tile = (y // P) * cols + (x // P)
    idx = (1 + tile) * (P * P) + (y % P) * P + (x % P)
    if newline:
        idx = torch.cat([idx, torch.full((h, 1), -1, dtype=idx.dtype)], dim=1)
    return torch.cat([torch.arange(P * P), idx.reshape(-1)])


def pack(base_feats, tile_feats, image_size, grid, newline_vec=None):
    """[P*P, C] base + [rows*cols, P*P, C] tiles -> [n, C] (LlavaNextModel.pack_image_features)."""
    P = math.isqrt(base_feats.shape[0])
    rows, cols = grid
    if P * P != base_feats.shape[0] or tuple(tile_feats.shape[:2]) != (rows * cols, P * P):
        raise ValueError(f"feature shapes {tuple(base_feats.shape)} / {tuple(tile_feats.shape)} "
                         f"do not fit a {rows}x{cols} grid")
    C = base_feats.shape[-1]
    flat = torch.cat([base_feats.unsqueeze(0), tile_feats]).reshape(-1, C)
    idx = pack_index(image_size, grid, P, newline=newline_vec is not None)
    if newline_vec is not None:
        # Newline positions (-1) read an extra last row holding the newline vector.
        flat = torch.cat([flat, newline_vec.to(device=flat.device, dtype=flat.dtype).view(1, C)])
        idx = torch.where(idx < 0, flat.shape[0] - 1, idx)
    return flat[idx.to(flat.device)]


# Checkpoint prefix -> module prefix, first match wins (longest prefixes first).
RENAMES = [
    ("language_model.model.", "language_model."),
    ("language_model.lm_head.", "language_model.lm_head."),
    ("model.language_model.", "language_model."),
    ("model.vision_tower.vision_tower.vision_model.", "vision_tower."),  # liuhaotian
    ("model.vision_tower.vision_model.", "vision_tower."),  # transformers 4.52-4.57 in memory
    ("model.vision_tower.", "vision_tower."),  # transformers 5.x in memory
    ("vision_tower.vision_model.", "vision_tower."),  # llava-hf hub files
    ("model.multi_modal_projector.", "multi_modal_projector."),
    ("model.mm_projector.0.", "multi_modal_projector.linear_1."),  # liuhaotian mlp2x_gelu
    ("model.mm_projector.2.", "multi_modal_projector.linear_2."),
    ("model.image_newline", "image_newline"),
    ("lm_head.", "language_model.lm_head."),
    ("model.", "language_model."),  # liuhaotian LLM: model.layers.*, model.embed_tokens, model.norm
]


def canonical_name(name: str) -> str:
    """A checkpoint key in any supported layout -> this module's parameter name."""
    return rename_key(name, RENAMES)


@dataclass
class LlavaNextConfig:
    text: TextConfig
    vision: VisionConfig
    image_token_id: int = 32000
    feature_layers: list = field(default_factory=lambda: [-2])
    pinpoints: list = field(default_factory=lambda: DEFAULT_PINPOINTS)
    projector_act: str = "gelu"
    projector_bias: bool = True
    image_mean: tuple = CLIP_MEAN
    image_std: tuple = CLIP_STD

    def __post_init__(self):
        try:  # checked at load, not at the first image
            _check_pinpoints(self.pinpoints, self.vision.image_size)
        except (ValueError, TypeError) as e:
            raise CheckpointError(f"image_grid_pinpoints: {e}") from None


def _feature_layers(value) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [int(value)]


def parse_config(path: Path, config: dict) -> LlavaNextConfig:
    pre = read_json(path / "preprocessor_config.json", required=False)
    norm = dict(image_mean=tuple(pre.get("image_mean", CLIP_MEAN)), image_std=tuple(pre.get("image_std", CLIP_STD)))
    arch = (config.get("architectures") or [""])[0]
    if arch == "LlavaNextForConditionalGeneration" or config.get("model_type") == "llava_next":
        if config.get("vision_feature_select_strategy", "default") != "default":
            raise CheckpointError("vision_feature_select_strategy 'full' is not supported with anyres packing")
        vc = config.get("vision_config") or {}
        if vc.get("model_type", "clip_vision_model") != "clip_vision_model":
            raise CheckpointError(f"unsupported LLaVA-NeXT vision tower {vc.get('model_type')!r} (only CLIP)")
        return LlavaNextConfig(
            text=TextConfig.from_dict(config.get("text_config") or {}, None, config.get("tie_word_embeddings")),
            # LlavaNextConfig's defaults for a missing vision_config are CLIP-L/336 (VisionConfig's).
            vision=VisionConfig.from_dict(vc, **({} if vc else {})),
            image_token_id=int(config.get("image_token_id", config.get("image_token_index", 32000))),
            feature_layers=_feature_layers(config.get("vision_feature_layer", -2)),
            pinpoints=config.get("image_grid_pinpoints") or DEFAULT_PINPOINTS,
            projector_act=config.get("projector_hidden_act", "gelu"),
            projector_bias=bool(config.get("multimodal_projector_bias", True)),
            **norm)
    # The original LLaVA layout (liuhaotian/llava-v1.6-*): LLM fields at the top level.
    if config.get("image_aspect_ratio") != "anyres":
        raise CheckpointError(f"image_aspect_ratio {config.get('image_aspect_ratio')!r} is not supported "
                              f"(LLaVA-1.5-style checkpoints); tinyvila supports LLaVA-1.6 'anyres'")
    if config.get("mm_projector_type", "mlp2x_gelu") != "mlp2x_gelu":
        raise CheckpointError(f"unsupported mm_projector_type {config['mm_projector_type']!r}")
    if config.get("mm_vision_select_feature", "patch") != "patch":
        raise CheckpointError("mm_vision_select_feature 'cls_patch' is not supported with anyres packing")
    text_type = "mistral" if arch == "LlavaMistralForCausalLM" else "llama"
    return LlavaNextConfig(
        text=TextConfig.from_dict(config, text_type),
        vision=_original_vision_config(path, config),
        image_token_id=-200,  # LLaVA's own IMAGE_TOKEN_INDEX: these tokenizers have no <image> token
        feature_layers=_feature_layers(config.get("mm_vision_select_layer", -2)),
        pinpoints=config.get("image_grid_pinpoints") or DEFAULT_PINPOINTS,
        **norm)


def _original_vision_config(path: Path, config: dict) -> VisionConfig:
    """The original layout names its tower (e.g. openai/clip-vit-large-patch14-336) but does not
    describe it: read its size from the tensor shapes (CLIP towers use 64-wide heads)."""
    if config.get("vision_config"):
        return VisionConfig.from_dict(config["vision_config"])
    shapes = tensor_shapes(weight_files(path))
    pre = "model.vision_tower.vision_tower.vision_model."
    try:
        hidden, channels, patch, _ = shapes[pre + "embeddings.patch_embedding.weight"]
        n_pos = shapes[pre + "embeddings.position_embedding.weight"][0]
        inter = shapes[pre + "encoder.layers.0.mlp.fc1.weight"][0]
    except KeyError as e:
        raise CheckpointError(f"original LLaVA checkpoint without the vision tower tensor {e}")
    layers = len({k[len(pre):].split(".")[2] for k in shapes if k.startswith(pre + "encoder.layers.")})
    side = round((n_pos - 1) ** 0.5)
    return VisionConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                        num_attention_heads=max(1, hidden // 64), image_size=side * patch,
                        patch_size=patch, num_channels=channels)


class Projector(nn.Module):
    def __init__(self, in_dim: int, out_dim: int, act: str, bias: bool):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, out_dim, bias=bias)
        self.linear_2 = nn.Linear(out_dim, out_dim, bias=bias)
        self.act = activation(act)

    def forward(self, x):
        return self.linear_2(self.act(self.linear_1(x)))


@dataclass
class ImageItem:
    """One preprocessed image: tiles for the encoder and how many LLM positions it fills."""
    image: AnyresImage
    n_tokens: int
    kind: str = "image"


class LlavaNext(Family):
    name = "LLaVA-NeXT"
    placeholders = {"image": "<image>"}  # what the chat template writes for one image
    video_token_id = None
    media_options = ()
    quant_skip = ("vision_tower", "multi_modal_projector", "mm_projector")  # stay 16-bit (AWQ modules_to_not_convert)

    def __init__(self, cfg: LlavaNextConfig):
        super().__init__()
        self.cfg = cfg
        v = cfg.vision
        self.vision_tower = ViTEncoder(v, cfg.feature_layers, cls_token=True, pre_norm=True, patch_bias=False)
        self.multi_modal_projector = Projector(v.hidden_size * len(cfg.feature_layers), cfg.text.hidden_size,
                                               cfg.projector_act, cfg.projector_bias)
        self.image_newline = nn.Parameter(torch.zeros(cfg.text.hidden_size))
        self.language_model = DecoderLM(cfg.text)
        self.image_token_id = cfg.image_token_id
        self.default_template = "mistral_instruct" if cfg.text.model_type == "mistral" else "llava_v1"

    @classmethod
    def config_from_dir(cls, path: Path, config: dict) -> LlavaNextConfig:
        return parse_config(path, config)

    @property
    def projector(self) -> nn.Module:
        return self.multi_modal_projector

    # ------------------------------------------------------------------ weights
    def checkpoint_files(self, path: Path) -> list:
        return weight_files(path)

    def module_name(self, folder: str, name: str) -> str | None:
        """This module's parameter for checkpoint key `name`, whatever its key layout (None: unused)."""
        if name.endswith("rotary_emb.inv_freq"):
            return None  # old checkpoints saved the RoPE buffer
        name = canonical_name(name)
        if name.startswith("vision_tower."):
            rest = name[len("vision_tower."):]
            if rest.startswith("post_layernorm."):
                return None  # LLaVA reads a hidden layer; the final norm is never used
            if rest.startswith("encoder.layers.") and int(rest.split(".")[2]) >= len(self.vision_tower.encoder.layers):
                return None  # layers past the feature layer never run
        return name

    # ------------------------------------------------------------------ media
    def prepare_image(self, img) -> ImageItem:
        c = self.cfg
        tile, patch = c.vision.image_size, c.vision.patch_size
        image = preprocess(img, c.pinpoints, tile, c.image_mean, c.image_std)
        return ImageItem(image, num_image_tokens(image.image_size, c.pinpoints, tile, patch))

    @torch.no_grad()
    def encode(self, items: list, saliency: bool = False) -> list:
        """Features [n_tokens, hidden] for each ImageItem, all crops in one encoder batch; with
        `saliency`, (features, saliency [n_tokens]) pairs: each patch's CLS attention at the
        feature layer, packed like the features (newline positions +inf: always kept)."""
        pixels = torch.cat([it.image.pixels for it in items]).to(self.image_newline.device)
        feats = self.vision_tower(pixels, saliency)
        if saliency:
            feats, scores = feats
        feats = self.multi_modal_projector(feats[:, 1:])  # drop CLS ("default" feature strategy)
        out, i = [], 0
        for it in items:
            n = it.image.pixels.shape[0]
            packed = pack(feats[i], feats[i + 1:i + n], it.image.image_size, it.image.grid,
                                 self.image_newline)
            if packed.shape[0] != it.n_tokens:  # the count and the packing must never disagree
                raise RuntimeError(f"image packed into {packed.shape[0]} tokens, expected {it.n_tokens}")
            if saliency:  # packed as the features are (one channel), newlines +inf; no sync yet
                s = scores[i:i + n, 1:, None].float()
                packed = (packed, pack(s[0], s[1:], it.image.image_size, it.image.grid, INF)[:, 0])
            out.append(packed)
            i += n
        return [(f, s.cpu()) for f, s in out] if saliency else out

    def token_panels(self, item) -> list:
        """What each visual position covers (tinyvila.visualize): the base image's P x P grid,
        then the anyres canvas cropped as unpadding crops it, one cell per kept-able patch."""
        c = self.cfg
        P, patch = c.vision.image_size // c.vision.patch_size, c.vision.patch_size
        pixels = denormalize(item.image.pixels, c.image_mean, c.image_std)
        rows, cols = item.image.grid
        S = c.vision.image_size
        canvas = pixels[1:].view(rows, cols, 3, S, S).permute(2, 0, 3, 1, 4).reshape(3, rows * S, cols * S)
        h, w, top, left = unpadded_grid(item.image.image_size, item.image.grid, P)
        canvas = canvas[:, top * patch:(top + h) * patch, left * patch:(left + w) * patch]
        tiles = P * P + torch.arange(h * (w + 1)).view(h, w + 1)[:, :w]  # each row ends with a newline
        return [(pixels[0], torch.arange(P * P).view(P, P)), (canvas, tiles)]

    def visual_groups(self, item) -> torch.Tensor:
        """Attention group of every visual position: 0 the base image, 1 + t anyres tile t (its
        tokens that survive unpadding), -1 an image_newline."""
        P = self.cfg.vision.image_size // self.cfg.vision.patch_size
        idx = pack_index(item.image.image_size, item.image.grid, P)
        return torch.where(idx < 0, -1, idx // (P * P))

    # ------------------------------------------------------------------ positions
    def positions(self, n_tokens: int, spans, media, device, kept=None, mode="compact") -> torch.Tensor:
        """1-D RoPE over the fused sequence: text and visual positions alike (kept: pruned items,
        see sparsity.positions_1d)."""
        return positions_1d(n_tokens, spans, kept, mode, device)
