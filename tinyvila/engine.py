"""The Engine: one loaded checkpoint (weights, tokenizer, chat template) and the calls that use it.

An Engine holds no conversation state; each `session()` owns its KV cache and history, and
`generate()` is a one-turn session. The last closed session's preallocated caches and the GPU graphs
captured over them stay with the engine for the next session of the same context size (a spare:
repeated `generate()` calls allocate and capture nothing). Engines share nothing, so several can
live in one process.
"""
import os
import re
import threading
import time
from pathlib import Path

import torch

from tinyvila.models import family_for
from tinyvila.models.layers import align_rows, checkpoint_entries, load_checkpoint, materialize, use_encoder_graphs
from tinyvila.models.quantized_checkpoint import W8A8_FILE, awq_config, convert_to_w4, finalize_w4, load_w8a8

from . import loader
from .errors import CheckpointError, TinyVilaError
from .generate import GenerationResult
from .media import load_image, open_video
from .sampling import SamplingParams, is_number
from .session import Session
from .sparsity import OPTIONS as SPARSITY_OPTIONS, Sparsity, visual_slots
from .template import ChatTemplate
from .tokenizer import Tokenizer

DTYPES = {"float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
          "bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float32": torch.float32, "fp32": torch.float32}
DEFAULT_MAX_SEQ_LEN = 8192
# Conversation options: defaults on load(), overridable per session(). Families add their media
# options (e.g. Qwen2.5-VL's min_pixels, max_pixels, fps, max_frames). The sparsity options
# (sparsity.py) default to dense in the Python API.
CONVERSATION_OPTIONS = ("max_seq_len",) + SPARSITY_OPTIONS
MEDIA_OPTIONS = ("min_pixels", "max_pixels", "fps", "max_frames")


def resolve_device(device) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise TinyVilaError(f"unknown device {device!r} (use cpu, cuda or cuda:N)")
    if device.type not in ("cpu", "cuda"):  # torch knows mps, xpu, meta...: tinyvila runs on these two
        raise TinyVilaError(f"device '{device}' is not supported (use cpu, cuda or cuda:N)")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise TinyVilaError("CUDA is not available on this machine; use --device cpu")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise TinyVilaError(f"no device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def resolve_dtype(dtype, device: torch.device, config: dict) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is not None:
        if str(dtype) not in DTYPES:
            raise TinyVilaError(f"unknown dtype {dtype!r} (use float16, bfloat16 or float32)")
        return DTYPES[str(dtype)]
    if device.type == "cpu":
        return torch.float32  # half precision on CPUs is slow or unsupported
    stored = str(config.get("torch_dtype") or config.get("dtype") or "float16")
    return torch.bfloat16 if "bfloat16" in stored else torch.float16


def stop_token_ids(path: Path, config: dict, tokenizer: Tokenizer) -> set:
    """The checkpoint's stop ids: generation_config first, as transformers' generate does."""
    for source in (loader.read_json(path / "generation_config.json", required=False),
                   config.get("text_config") or {}, config):
        eos = source.get("eos_token_id")
        if eos is not None:
            return set(eos) if isinstance(eos, list) else {int(eos)}
    return {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()


class Engine:
    def __init__(self, model, tokenizer: Tokenizer, template: ChatTemplate, path: Path, config: dict,
                 device: torch.device, dtype: torch.dtype, stop_ids: set, options: dict):
        self.model = model
        self.tokenizer = tokenizer
        self.template = template
        self.path = path
        self.config = config
        self.device = device
        self.dtype = dtype
        self.image_token_id = model.image_token_id
        self.video_token_id = model.video_token_id
        self.stop_ids = stop_ids
        text = model.language_model.cfg
        self.cuda_graphs = bool(options.pop("cuda_graphs", True))  # capture GPU decode steps as CUDA graphs
        # also short prefills (follow-up questions) as CUDA graphs: opt-in until measured on a GPU
        self.prefill_graphs = bool(options.pop("prefill_graphs", False)) and self.cuda_graphs
        self._capture_stream = None
        self._prefill_pool = None
        self.defaults = self._check_options(options)  # max_seq_len included; None values dropped
        self.explicit_max_seq_len = "max_seq_len" in self.defaults
        self.max_seq_len = int(self.defaults.pop("max_seq_len", None) or min(text.max_position_embeddings,
                                                                             DEFAULT_MAX_SEQ_LEN))
        self.sparsity = Sparsity.from_options(**{k: self.defaults.pop(k) for k in SPARSITY_OPTIONS
                                                 if k in self.defaults})
        self.banned = self._banned_ids(text.vocab_size)
        self.lock = threading.Lock()  # one forward at a time per engine: sessions interleave steps
        self._spare = None  # a closed session's session.Spare, for the next session of its size
        self._spare_lock = threading.Lock()

    @classmethod
    def from_pretrained(cls, model, device=None, dtype=None, **options) -> "Engine":
        progress = options.pop("progress", None)  # bars while loading: loader.progress_bar
        path = loader.resolve(model)
        with loader.naming(path):  # one place for all the checks that do not know the folder
            config = loader.read_json(path / "config.json")
            family = family_for(config)
            family_options = {k: options.pop(k) for k in family.load_options if k in options}
            vision_w8a8 = options.pop("vision_w8a8", True)  # False: keep the 16-bit encoder of a W8A8 checkpoint
            family_cfg = family.config_from_dir(path, config, **family_options)
            device = resolve_device(device)
            dtype = resolve_dtype(dtype, device, config)
            text_dir = family.tokenizer_path(path)
            tokenizer = Tokenizer.from_dir(text_dir)
            with torch.device("meta"):
                net = family(family_cfg)
            check_max_seq_len(options.get("max_seq_len"), net.language_model.cfg)  # before any allocation
            extra_stops = net.bind_tokenizer(tokenizer)
            template = ChatTemplate.from_dir(text_dir, default=net.default_template,
                                             special_tokens=tokenizer.special_tokens_map)
            try:
                net = net.to(dtype)
                w4 = awq_config(config, loader.read_json(text_dir / "config.json", required=False))
                if w4 and not convert_to_w4(net, checkpoint_entries(net, path)):
                    raise CheckpointError("config.json says it is AWQ-quantized but it stores no qweight tensors")
                net = materialize(net, device)
                load_checkpoint(net, path, progress)
                finalize_w4(net, dtype, progress)
                if vision_w8a8 and (path / W8A8_FILE).is_file():  # the SmoothQuant encoder beside the checkpoint
                    load_w8a8(net, path / W8A8_FILE)
                align_rows(net)
            except torch.cuda.OutOfMemoryError:
                raise TinyVilaError(f"out of GPU memory loading '{model}' in {str(dtype).split('.')[-1]} "
                                    f"on {device}; try a smaller model or a quantized checkpoint")
            use_encoder_graphs(net, device.type == "cuda" and options.get("cuda_graphs", True))
            stop_ids = stop_token_ids(text_dir, config, tokenizer) | extra_stops
            return cls(net.eval(), tokenizer, template, path, config, device, dtype, stop_ids, dict(options))

    def capture_stream(self):
        """The side stream this engine's sessions warm up and capture decode graphs on (None: no
        graphs). One per engine: cuBLAS keeps a workspace per stream for the life of the process."""
        if not self.cuda_graphs or self.device.type != "cuda":
            return None
        if self._capture_stream is None:
            self._capture_stream = torch.cuda.Stream(self.device)
        return self._capture_stream

    def prefill_graph_pool(self):
        """The memory pool every session's short-prefill graphs share (generate.PrefillGraphs):
        one forward runs at a time per engine and each replay's outputs are read before the next
        replay, so the graphs can reuse each other's scratch memory."""
        if self._prefill_pool is None:
            self._prefill_pool = torch.cuda.graph_pool_handle()
        return self._prefill_pool

    def take_spare(self, max_len: int):
        """The kept session.Spare if its cache holds exactly `max_len` tokens, else None. Either way
        the engine keeps it no longer, so a new cache is never allocated beside an unused one."""
        with self._spare_lock:
            spare, self._spare = self._spare, None
        return spare if spare is not None and spare.cache.max_len == max_len else None

    def keep_spare(self, spare) -> None:
        """Keep a closed session's caches and graphs (session.Spare) for the next session."""
        with self._spare_lock:
            self._spare = spare

    def drop_spare(self) -> None:
        """Free the closed session's caches and graphs the engine keeps (their GPU memory goes back
        to PyTorch's allocator, as when a session closes without a spare)."""
        self.take_spare(-1)

    def _banned_ids(self, vocab_size: int):
        """Ids sampling must never produce: embedding rows without a token string (checkpoints pad
        the vocabulary, e.g. 32064 rows for 32002 tokens) and the media placeholders."""
        banned = torch.zeros(vocab_size, dtype=torch.bool)
        banned[len(self.tokenizer):] = True
        for i in (self.image_token_id, self.video_token_id):
            if i is not None and 0 <= i < vocab_size:
                banned[i] = True
        return banned.to(self.device) if banned.any() else None

    # ------------------------------------------------------------------ prompts
    def encode_text(self, text: str) -> list:
        """Token ids for rendered prompt text, one placeholder id per media item.

        As transformers' processors do: the tokenizer adds its special tokens (BOS) unless the
        text already starts with them. Checkpoints whose tokenizer has no image token (original
        LLaVA, Llama-3 LongVILA) get LLaVA's own `tokenizer_image_token` instead: every chunk
        between placeholders tokenized with the tokenizer's defaults; if chunk 0 starts with BOS,
        that BOS is kept once and the first token of every chunk is dropped; chunks joined by the
        sentinel id. Training used exactly this, double BOS included where it happens.
        """
        tok = self.tokenizer
        # Placeholders that are not tokens of this tokenizer are spliced as sentinel ids.
        sentinels = {marker: i for kind, i in (("image", self.image_token_id), ("video", self.video_token_id))
                     if (marker := self.model.placeholders.get(kind)) and marker in text
                     and tok.token_to_id(marker) is None}
        if not sentinels:
            return tok.encode_prompt(text, add_special_tokens=not (tok.bos_token and text.startswith(tok.bos_token)))
        parts = re.split("(" + "|".join(map(re.escape, sentinels)) + ")", text)
        chunks = [tok.encode_prompt(chunk) for chunk in parts[0::2]]
        offset = 1 if chunks[0] and chunks[0][0] == tok.bos_token_id else 0
        ids = chunks[0][:offset]
        for i, chunk in enumerate(chunks):
            ids += ([sentinels[parts[2 * i - 1]]] if i else []) + chunk[offset:]
        return ids

    def render(self, messages: list, add_generation_prompt: bool = True) -> str:
        return self.template.render(messages, add_generation_prompt=add_generation_prompt)

    def _check_options(self, options: dict) -> dict:
        options = {k: v for k, v in options.items() if v is not None}
        unknown = set(options) - set(CONVERSATION_OPTIONS + MEDIA_OPTIONS)
        if unknown:
            raise TypeError(f"unknown option(s): {', '.join(sorted(unknown))}")
        unsupported = set(options) - set(CONVERSATION_OPTIONS + tuple(self.model.media_options))
        if unsupported:  # a real option, but not one this family has (e.g. fps for an image-only model)
            raise TinyVilaError(f"{self.model.name} does not take {', '.join(sorted(unsupported))}")
        check_max_seq_len(options.get("max_seq_len"), self.model.language_model.cfg)
        if "max_frames" in options:
            _check_positive("max_frames", options["max_frames"], integer=True)
        for name in ("min_pixels", "max_pixels", "fps"):
            if name in options:
                _check_positive(name, options[name])
        return options

    def load_media(self, images=None, videos=None, **media_options) -> list:
        """Preprocess user images and videos into the family's media items (decoded and checked
        once), images first. Videos: a file path, or a list of frames (PIL images / HxWx3 arrays)."""
        if images is not None and not isinstance(images, (list, tuple)):
            images = [images]  # one image given bare (a path string would be iterated by character)
        if isinstance(videos, (str, os.PathLike)):
            videos = [videos]
        items = [self.model.prepare_image(load_image(src), **media_options) for src in (images or [])]
        if videos:
            if not self.model.takes_video:
                raise TinyVilaError(f"{self.model.name} takes images only, not videos")
            for src in videos:
                item = self.model.prepare_video(open_video(src), **media_options)
                items += item if isinstance(item, list) else [item]  # a list: the family splits videos
        return items

    # ------------------------------------------------------------------ public API
    def session(self, images=None, videos=None, system=None, **options) -> Session:
        """A multi-turn conversation about `images` / `videos`; the KV cache is allocated once, here.
        `options` override load()'s conversation and media options for this session."""
        options = self._check_options(options)
        sparsity = self.sparsity.overridden(**{k: options.pop(k) for k in SPARSITY_OPTIONS if k in options})
        opts = dict(self.defaults, **options)
        media_opts = {k: v for k, v in opts.items() if k in self.model.media_options}
        media = self.load_media(images, videos, **media_opts)
        return Session(self, media, system, opts.get("max_seq_len") or self.default_context(media, sparsity),
                       media_opts, sparsity)

    def default_context(self, media, sparsity: Sparsity) -> int:
        """Without max_seq_len: room for the session's media (as pruned) plus DEFAULT_MAX_SEQ_LEN
        tokens of text, within the model's limit (a long video needs far more than a chat about an
        image)."""
        if self.explicit_max_seq_len:
            return self.max_seq_len
        limit = self.model.language_model.cfg.max_position_embeddings
        return min(limit, self.max_seq_len + sum(visual_slots(self.model, m, sparsity) for m in media))

    def logits(self, prompt=None, images=None, videos=None, *, input_ids=None, template=True, system=None,
               **options):
        """fp32 logits [T, vocab] for every position of a one-turn prompt (same inputs as generate)."""
        with self.session(images=images, videos=videos, system=system, **options) as s:
            return s.logits(self._prompt_ids(s, prompt, input_ids, template))

    def _prompt_ids(self, session, prompt, input_ids, template) -> list:
        if (prompt is None) == (input_ids is None):
            raise TinyVilaError("give either a prompt or input_ids")
        if input_ids is not None:
            return list(input_ids)
        if not template:
            return self.encode_text(prompt)
        messages = session.history_start() + [session.user_message(prompt, session.pending)]
        return self.encode_text(self.render(messages))

    def generate(self, prompt=None, images=None, videos=None, *, input_ids=None, template=True, system=None,
                 callback=None, **sampling) -> GenerationResult:
        """Answer one prompt. `callback(text_piece)` is called as the answer streams; session
        options (max_seq_len, media options) apply to this one-turn conversation.

        prompt + template=True: the prompt is the user's message, rendered with the chat template.
        prompt + template=False: the prompt string is used as is (raw).
        input_ids: already templated ids with `image_token_id` once per image (expanded here).
        """
        session_options = {k: sampling.pop(k) for k in list(sampling) if k in CONVERSATION_OPTIONS + MEDIA_OPTIONS}
        params = SamplingParams.from_options(**sampling)
        with self.session(images=images, videos=videos, system=system, **session_options) as s:
            if input_ids is None and template:
                return s.ask(prompt, callback=callback, **vars(params))
            t = time.perf_counter()
            ids = self._prompt_ids(s, prompt, input_ids, template)
            return s.complete(ids, params, callback, prompt_s=time.perf_counter() - t)


def check_max_seq_len(value, text_cfg) -> None:
    """max_seq_len (None: the default) must be a positive integer within the model's position
    limit: beyond it a cache would be allocated for positions the model was never built for."""
    if value is None:
        return
    _check_positive("max_seq_len", value, integer=True)
    if value > text_cfg.max_position_embeddings:
        raise TinyVilaError(f"max_seq_len {value} is more than this model's limit of "
                            f"{text_cfg.max_position_embeddings} positions (max_position_embeddings "
                            f"in config.json)")


def _check_positive(name: str, value, integer: bool = False) -> None:
    """An option that must be a positive (integer) number: one clear line otherwise."""
    if not is_number(value, integer) or not 0 < value < float("inf"):
        raise TinyVilaError(f"{name} must be a positive {'integer' if integer else 'number'}, got {value!r}")
