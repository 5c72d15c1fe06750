"""LLaVA-NeXT (LLaVA-1.6): CLIP ViT-L/14-336 + 2-layer MLP projector + Llama/Mistral decoder.

Mirrors transformers' LlavaNextForConditionalGeneration (spec: llava_next_and_vila.md part 1):
anyres tiles + a squashed base image go through CLIP up to `vision_feature_layer`, the CLS token is
dropped, the projector maps every patch token, and the tile features are stitched, unpadded and
given an `image_newline` column (models/anyres.py). Checkpoints load from three key layouts: the
llava-hf hub files (`language_model.model.*`), transformers >= 4.52 in-memory names
(`model.language_model.*`) and the original liuhaotian files (`model.*`, `model.mm_projector.*`).
"""
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from tinyvila.errors import CheckpointError
from tinyvila.loader import iter_tensors, read_json, tensor_shapes, weight_files
from tinyvila.media import CLIP_MEAN, CLIP_STD

from . import anyres
from .layers import DecoderLM, TextConfig, ViTEncoder, VisionConfig, activation, load_weights

DEFAULT_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]

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
    for old, new in RENAMES:
        if name.startswith(old):
            return new + name[len(old):]
    return name


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
    image: anyres.AnyresImage
    n_tokens: int
    kind: str = "image"


class LlavaNext(nn.Module):
    name = "LLaVA-NeXT"
    placeholders = {"image": "<image>"}  # what the chat template writes for one image
    video_token_id = None
    media_options = ()

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

    # ------------------------------------------------------------------ weights
    def checkpoint_tensors(self, path: Path):
        """(module name, tensor) pairs from the checkpoint, whatever its key layout."""
        n_vision_layers = len(self.vision_tower.encoder.layers)
        for name, tensor in iter_tensors(weight_files(path)):
            if name.endswith("rotary_emb.inv_freq"):
                continue  # old checkpoints saved the RoPE buffer
            name = canonical_name(name)
            if name.startswith("vision_tower."):
                rest = name[len("vision_tower."):]
                if rest.startswith("post_layernorm."):
                    continue  # LLaVA reads a hidden layer; the final norm is never used
                if rest.startswith("encoder.layers.") and int(rest.split(".")[2]) >= n_vision_layers:
                    continue  # layers past the feature layer never run
            yield name, tensor

    def load_checkpoint(self, path: Path) -> None:
        load_weights(self, self.checkpoint_tensors(path), what=str(path))

    # ------------------------------------------------------------------ media
    def prepare_image(self, img) -> ImageItem:
        c = self.cfg
        tile, patch = c.vision.image_size, c.vision.patch_size
        image = anyres.preprocess(img, c.pinpoints, tile, c.image_mean, c.image_std)
        return ImageItem(image, anyres.num_image_tokens(image.image_size, c.pinpoints, tile, patch))

    @torch.no_grad()
    def encode(self, items: list) -> list:
        """Features [n_tokens, hidden] for each ImageItem, all crops in one encoder batch."""
        pixels = torch.cat([it.image.pixels for it in items]).to(self.image_newline.device)
        feats = self.vision_tower(pixels)[:, 1:]  # drop CLS ("default" feature strategy)
        feats = self.multi_modal_projector(feats)
        out, i = [], 0
        for it in items:
            n = it.image.pixels.shape[0]
            packed = anyres.pack(feats[i], feats[i + 1:i + n], it.image.image_size, it.image.grid,
                                 self.image_newline)
            if packed.shape[0] != it.n_tokens:  # the count and the packing must never disagree
                raise RuntimeError(f"image packed into {packed.shape[0]} tokens, expected {it.n_tokens}")
            out.append(packed)
            i += n
        return out

    # ------------------------------------------------------------------ positions
    def positions(self, n_tokens: int, spans, media, device) -> torch.Tensor:
        """1-D RoPE over the fused sequence: text and visual positions alike."""
        return torch.arange(n_tokens, device=device)
