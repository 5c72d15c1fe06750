"""What a model family provides to the engine, a session and the tools: declared once, here.

A family is an nn.Module holding a vision encoder, a projector and `language_model` (a
layers.DecoderLM). It subclasses `Family`, which names every attribute and method the rest of
tinyvila uses, implements the required ones (abstract here) and overrides the defaults it needs.
"""
from abc import ABC, abstractmethod
from pathlib import Path

import torch
import torch.nn as nn

from tinyvila.errors import TinyVilaError


class Family(nn.Module, ABC):
    # ------------------------------------------------------------------ declared by every family
    name: str  # shown in messages, e.g. "LLaVA-NeXT"
    placeholders: dict  # media kind -> what the chat template writes for one item ("image", "video")
    default_template: str | None  # built-in chat template when the checkpoint ships none (template.py)
    image_token_id: int | None  # the placeholder id of one image in input_ids (set by bind_tokenizer if None)
    language_model: nn.Module  # layers.DecoderLM

    # ------------------------------------------------------------------ optional, with defaults
    video_token_id: int | None = None  # None: the family takes no videos
    media_options: tuple = ()  # media options prepare_image / prepare_video take (engine.MEDIA_OPTIONS)
    load_options: tuple = ()  # extra keyword options of tinyvila.load passed to config_from_dir
    quant_skip: tuple = ()  # module prefixes that stay 16-bit in an AWQ checkpoint (modules_to_not_convert)
    string_content = False  # True: the template takes the user's text with the media markers as one string

    # ------------------------------------------------------------------ loading
    @classmethod
    @abstractmethod
    def config_from_dir(cls, path: Path, config: dict, **options):
        """The family's config from the checkpoint folder and its parsed config.json."""

    @staticmethod
    def tokenizer_path(path: Path) -> Path:
        """The folder holding the tokenizer and the chat template."""
        return path

    def bind_tokenizer(self, tokenizer) -> set:
        """Read what the family needs from the tokenizer (media token ids, ...); returns extra stop ids."""
        return set()

    @abstractmethod
    def checkpoint_files(self, path: Path) -> list:
        """The checkpoint's safetensors files."""

    @abstractmethod
    def module_name(self, folder: str, name: str) -> str | None:
        """This module's parameter for tensor `name` of the file in `folder` (relative to the
        checkpoint, "" at the top); None for tensors the model never uses."""

    # ------------------------------------------------------------------ media
    @property
    def takes_video(self) -> bool:
        return "video" in self.placeholders

    @abstractmethod
    def prepare_image(self, img, **media_options):
        """A PIL image -> the family's media item (kind "image", n_tokens, pixels, ...)."""

    def prepare_video(self, video, **media_options):
        """A media.Video -> the family's media item (kind "video"), or a list of items (Qwen3-VL:
        one per frame pair)."""
        raise TinyVilaError(f"{self.name} takes images only, not videos")

    def media_content(self, item) -> list:
        """The chat-message content items of one media item (Qwen3-VL puts a video frame pair's
        timestamp, as text, before it)."""
        return [{"type": item.kind}]

    def media_text(self, item) -> str:
        """The marker of one media item in a `string_content` message."""
        return self.placeholders[item.kind]

    @property
    @abstractmethod
    def projector(self) -> nn.Module:
        """The module that maps vision features into the language model's embedding space."""

    @abstractmethod
    def encode(self, items: list, saliency: bool = False) -> list:
        """Embeddings [n_tokens, hidden] per item; with `saliency`, (embeddings, saliency [n_tokens])."""

    @abstractmethod
    def token_panels(self, item) -> list:
        """(image [3, H, W], visual position of each grid cell) panels of one item (visualize.py)."""

    @abstractmethod
    def visual_groups(self, item) -> torch.Tensor:
        """The attention group of each visual position of one item (-1: structural tokens)."""

    @abstractmethod
    def positions(self, n_tokens: int, spans, media, device, kept=None, mode="compact") -> torch.Tensor:
        """RoPE positions of a fused sequence: [n_tokens] or M-RoPE's [3, n_tokens]."""
