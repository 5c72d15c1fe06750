"""LongVILA (NVlabs' VILA layout): SigLIP + `mlp_downsample` projector + Llama-3 or Qwen2 decoder.

A checkpoint is a folder with `llm/` (a plain HF causal LM and its tokenizer), `vision_tower/` (a
SigLIP vision model) and `mm_projector/`; the top-level config's sub-config paths point at the
training cluster and are ignored (the folders are found by name).

Two code generations produced these checkpoints, told apart by backbone and projector type:
* old VILA (Llama-3-LongVILA: llama backbone + `mlp_downsample`): the projector emits merged tokens
  column-major; the prompt holds an `<image>` per frame, spliced at a -200 sentinel by LLaVA's
  `tokenizer_image_token`, each followed by a "\\n" text token; the llama_3 conversation template is
  built into VILA's code; answers end with <|eot_id|> as well as the eos.
* NVILA era (qwen2 LongVILA, LongVILA-R1, `*_fix` projectors): row-major tokens; one media token per
  image (`<image>`) or video (`<vila/video>`), added to the tokenizer by VILA's loader and replaced by
  the encoder output, each frame followed by the embedding of "\\n"; the tokenizer's chat template.
Either way a media item here is its frames' tokens each followed by "\\n", so on the `input_ids=`
path an image or a video is one placeholder id. `projector_order` overrides the detected order.
"""
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from tinyvila.errors import CheckpointError, TinyVilaError
from tinyvila.loader import read_json, weight_files
from tinyvila.media import SIGLIP_MEAN, SIGLIP_STD, resize_bicubic, to_normalized_tensor
from tinyvila.sparsity import positions_1d
from tinyvila.visualize import denormalize

from .family import Family
from .layers import DecoderLM, TextConfig, ViTEncoder, VisionConfig

OLD_SENTINEL, OLD_VIDEO_SENTINEL = -200, -201  # LLaVA's IMAGE_TOKEN_INDEX; ours for a whole video
NVILA_MEDIA_TOKENS = ["<vila/sentinel>", "<image>", "<vila/video>"]  # added by VILA's loader, in order
FRAMES_PER_CHUNK = 32  # frames per encoder call: the encoder's peak memory does not grow with the video
SIGLIP_DEFAULTS = dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
                       image_size=384, patch_size=14, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6)


@dataclass
class VilaConfig:
    text: TextConfig
    vision: VisionConfig
    projector: str  # mm_projector_type
    feature_layer: int
    generation: str  # "old" | "nvila"
    order: str  # "column" | "row": the projector's token order
    num_video_frames: int
    image_mean: tuple = SIGLIP_MEAN
    image_std: tuple = SIGLIP_STD


def subfolder(path: Path, name: str) -> Path:
    d = path / name
    if not (d / "config.json").is_file():
        raise CheckpointError(f"'{path}' is not a complete VILA checkpoint: {name}/config.json is missing")
    return d


def parse_config(path: Path, config: dict, projector_order: str | None = None) -> VilaConfig:
    text = TextConfig.from_dict(read_json(subfolder(path, "llm") / "config.json"))
    vc = read_json(subfolder(path, "vision_tower") / "config.json")
    if "siglip" not in str(vc.get("model_type", "siglip")):
        raise CheckpointError(f"unsupported VILA vision tower {vc.get('model_type')!r} (only SigLIP)")
    vision = VisionConfig.from_dict(vc, **SIGLIP_DEFAULTS)
    projector = read_json(subfolder(path, "mm_projector") / "config.json").get("mm_projector_type", "mlp_downsample")
    if projector not in ("mlp_downsample", "mlp_downsample_2x2_fix", "mlp_downsample_3x3_fix"):
        raise CheckpointError(f"unsupported mm_projector_type {projector!r}")
    if config.get("mm_vision_select_feature", "cls_patch") != "cls_patch":
        raise CheckpointError("mm_vision_select_feature 'patch' would drop a SigLIP patch (SigLIP has no CLS)")
    if config.get("dynamic_s2") or config.get("image_aspect_ratio") == "dynamic_s2":
        raise CheckpointError("dynamic_s2 (NVILA multi-scale tiling) is not supported")
    old = text.model_type == "llama" and projector == "mlp_downsample"
    if projector_order not in (None, "row", "column"):
        raise TinyVilaError(f"projector_order must be 'row' or 'column', not {projector_order!r}")
    pre = read_json(path / "vision_tower" / "preprocessor_config.json", required=False)
    return VilaConfig(text=text, vision=vision, projector=projector,
                      feature_layer=int(config.get("mm_vision_select_layer", -2)),
                      generation="old" if old else "nvila",
                      order=projector_order or ("column" if old else "row"),
                      num_video_frames=int(config.get("num_video_frames") or 8),
                      image_mean=tuple(pre.get("image_mean", SIGLIP_MEAN)), image_std=tuple(pre.get("image_std", SIGLIP_STD)))


def downsample(x: torch.Tensor, k: int, order: str) -> torch.Tensor:
    """[N, G*G, C] -> [N, g*g, k*k*C]: k x k blocks concatenated row-major, after zero-padding the
    grid's bottom and right to a multiple of k; blocks emitted row-major or column-major."""
    N, T, C = x.shape
    G = math.isqrt(T)
    pad = -G % k
    x = F.pad(x.view(N, G, G, C), (0, 0, 0, pad, 0, pad))
    g = (G + pad) // k
    x = x.view(N, g, k, g, k, C).permute(0, 1, 3, 2, 4, 5).reshape(N, g, g, k * k * C)
    if order == "column":
        x = x.transpose(1, 2)
    return x.reshape(N, g * g, k * k * C)


class Projector(nn.Module):
    """`layers.N` keys as VILA's nn.Sequential saves them (index 0 is the parameter-free down-sampler)."""

    def __init__(self, kind: str, c: int, h: int):
        super().__init__()
        self.k = 3 if kind.endswith("3x3_fix") else 2
        if self.k == 2:
            self.layers = nn.Sequential(nn.Identity(), nn.LayerNorm(4 * c), nn.Linear(4 * c, h), nn.GELU(),
                                        nn.Linear(h, h))
        else:
            self.layers = nn.Sequential(nn.Identity(), nn.LayerNorm(9 * c), nn.Linear(9 * c, 3 * c), nn.GELU(),
                                        nn.LayerNorm(3 * c), nn.Linear(3 * c, h), nn.GELU(), nn.Linear(h, h))

    def forward(self, feats, order):
        return self.layers(downsample(feats, self.k, order))


@dataclass
class VilaMedia:
    kind: str  # "image" | "video"
    pixels: torch.Tensor  # [frames, 3, S, S]
    n_tokens: int  # frames x (tokens per frame + the "\n" tokens)


def frame_indices(total: int, n: int) -> list:
    """NVILA's uniform sampling: round(linspace(0, total - 1, n)) (frames repeat in short clips)."""
    if total < 1:
        raise TinyVilaError("the video has no frames")
    return np.round(np.linspace(0, total - 1, n)).astype(int).tolist()


class LongVILA(Family):
    name = "LongVILA"
    media_options = ("max_frames",)
    quant_skip = ("vision_tower", "mm_projector")  # stay 16-bit (AWQ modules_to_not_convert)
    load_options = ("projector_order",)  # "row" | "column": override the detected token order
    string_content = True  # VILA's templates take the user's text with the media markers as a string

    def __init__(self, cfg: VilaConfig):
        super().__init__()
        self.cfg = cfg
        v = cfg.vision
        self.vision_tower = ViTEncoder(v, [cfg.feature_layer], cls_token=False, pre_norm=False, patch_bias=True)
        self.mm_projector = Projector(cfg.projector, v.hidden_size, cfg.text.hidden_size)
        self.language_model = DecoderLM(cfg.text)
        old = cfg.generation == "old"
        self.placeholders = {"image": "<image>", "video": "<video>" if old else "<vila/video>"}
        self.default_template = "llama_3" if old else None
        self.image_token_id = OLD_SENTINEL if old else None  # NVILA ids: set from the tokenizer
        self.video_token_id = OLD_VIDEO_SENTINEL if old else None
        self.newline_ids = []

    @classmethod
    def config_from_dir(cls, path: Path, config: dict, **options) -> VilaConfig:
        return parse_config(path, config, **options)

    @property
    def projector(self) -> nn.Module:
        return self.mm_projector

    @staticmethod
    def tokenizer_path(path: Path) -> Path:
        return path / "llm"

    def bind_tokenizer(self, tokenizer) -> set:
        """Media token ids, the "\\n" after each frame, and the extra stop ids of this generation."""
        self.newline_ids = tokenizer.encode("\n", add_special_tokens=False)
        if self.cfg.generation == "old":
            eot = tokenizer.token_to_id("<|eot_id|>")  # the llama_3 template's turn separator
            return {eot} if eot is not None else set()
        missing = [t for t in NVILA_MEDIA_TOKENS if tokenizer.token_to_id(t) is None]
        if missing:
            tokenizer.add_special_tokens(missing)
        self.image_token_id = tokenizer.token_to_id("<image>")
        self.video_token_id = tokenizer.token_to_id("<vila/video>")
        # VILA stops on the eos and on the token that ends an assistant turn (<|im_end|> for Qwen2).
        return {tokenizer.eos_token_id} - {None}

    def checkpoint_files(self, path: Path) -> list:
        return [f for sub in ("vision_tower", "mm_projector", "llm") for f in weight_files(path / sub)]

    def module_name(self, folder: str, name: str) -> str | None:
        """This module's parameter for `name` in the checkpoint's `folder` (None: never used)."""
        if folder == "vision_tower":
            name = name.removeprefix("vision_model.")
            if name.startswith(("head.", "post_layernorm.")) or (
                    name.startswith("encoder.layers.") and int(name.split(".")[2]) >= len(self.vision_tower.encoder.layers)):
                return None  # the MAP head, the final norm and layers past the feature layer never run
            return "vision_tower." + name
        if folder == "mm_projector":
            return "mm_projector." + name
        if name.endswith("rotary_emb.inv_freq"):
            return None
        return "language_model." + name.removeprefix("model.")

    # ------------------------------------------------------------------ media
    def _pixels(self, images) -> torch.Tensor:
        size = self.cfg.vision.image_size  # image_aspect_ratio "resize": squash to the tower's size
        return torch.stack([to_normalized_tensor(resize_bicubic(im, (size, size)), self.cfg.image_mean,
                                                 self.cfg.image_std) for im in images])

    def _tokens_per_frame(self) -> int:
        g = self.cfg.vision.image_size // self.cfg.vision.patch_size
        return math.ceil(g / self.mm_projector.k) ** 2 + len(self.newline_ids)

    def prepare_image(self, img, **_) -> VilaMedia:
        return VilaMedia("image", self._pixels([img]), self._tokens_per_frame())

    def prepare_video(self, video, max_frames=None, **_) -> VilaMedia:
        """`max_frames` (default: the checkpoint's num_video_frames) frames sampled uniformly over a
        file; a frame list longer than that is sampled the same way, a shorter one used whole."""
        n = max_frames or self.cfg.num_video_frames
        if video.fps is None and video.num_frames <= n:
            indices = list(range(video.num_frames))
        else:
            indices = frame_indices(video.num_frames, n)
        pixels = self._pixels(video.frames(indices))
        return VilaMedia("video", pixels, len(indices) * self._tokens_per_frame())

    @torch.no_grad()
    def encode(self, items: list, saliency: bool = False) -> list:
        """Per item: each frame's projected tokens followed by the "\\n" embedding, [n_tokens, H];
        with `saliency`, (features, saliency [n_tokens]) pairs: the column mean of each frame's
        attention at the feature layer, averaged over the patches of a merged token (the
        zero-padding of mlp_downsample left out), +inf at the "\\n" positions."""
        lm = self.language_model
        device = lm.embed_tokens.weight.device
        newline = lm.embed(torch.tensor(self.newline_ids, device=device))
        structural = torch.full((len(self.newline_ids),), float("inf"))
        out = []
        for it in items:
            frames, scores = [], []
            for chunk in it.pixels.split(FRAMES_PER_CHUNK):
                feats = self.vision_tower(chunk.to(device), saliency)
                if saliency:
                    feats, s = feats
                    scores.append(self._pool(s.float()))  # on the device: no sync between chunks
                feats = self.mm_projector(feats, self.cfg.order)
                frames += [torch.cat([f, newline]) for f in feats]
            if saliency:
                merged = torch.cat(scores).cpu()
                scores = torch.cat([merged, structural.expand(merged.shape[0], -1)], dim=1).flatten()
            out.append((torch.cat(frames), scores) if saliency else torch.cat(frames))
        return out

    def _pool(self, scores: torch.Tensor) -> torch.Tensor:
        """Patch saliency [F, G*G] -> merged-token saliency [F, g*g], in the projector's order."""
        k, order = self.mm_projector.k, self.cfg.order
        total = downsample(scores[..., None], k, order).sum(-1)
        count = downsample(torch.ones_like(scores)[..., None], k, order).sum(-1)
        return total / count

    def token_panels(self, item) -> list:
        """Each frame with its grid of merged tokens (tinyvila.visualize); the zero-padded edge
        blocks of mlp_downsample cover less than a full cell."""
        v, k = self.cfg.vision, self.mm_projector.k
        G = v.image_size // v.patch_size
        g = -(-G // k)
        cells = torch.arange(g * g).view(g, g)
        cells = cells if self.cfg.order == "row" else cells.t()
        per_frame = self._tokens_per_frame()
        frames = denormalize(item.pixels, self.cfg.image_mean, self.cfg.image_std)
        span = g * k * v.patch_size  # the padded grid in pixels, cropped back to the frame
        padded = torch.nn.functional.pad(frames, (0, span - v.image_size, 0, span - v.image_size))
        return [(padded[f], f * per_frame + cells) for f in range(frames.shape[0])]

    def visual_groups(self, item) -> torch.Tensor:
        """Each frame is one attention group; its "\\n" tokens are structural (-1)."""
        per_frame = self._tokens_per_frame() - len(self.newline_ids)
        frame = torch.cat([torch.zeros(per_frame, dtype=torch.long), torch.full((len(self.newline_ids),), -1)])
        offsets = torch.arange(item.pixels.shape[0]).repeat_interleave(frame.numel())
        return torch.where(frame.repeat(item.pixels.shape[0]) < 0, -1, offsets)

    def positions(self, n_tokens: int, spans, media, device, kept=None, mode="compact") -> torch.Tensor:
        return positions_1d(n_tokens, spans, kept, mode, device)
