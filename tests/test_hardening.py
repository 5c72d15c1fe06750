"""Hardening: one table of bad inputs (images, videos, prompts, checkpoints, chat CLI flags), each
with the clear error it must give; a 200-turn history="evict" conversation that must not grow in
memory or time per turn; a streaming answer cancelled from another thread.

The corpus (CASES below) is meant to be read in one place. Each row says what the user does and
what they must get:

* library rows: the call raises the given `TinyVilaError` subclass whose message is one line (no
  newline, no traceback text) matching `match` and naming the file where there is one; rows with
  `expect=None` are inputs that must simply work (odd image modes, formats);
* CLI rows: `tinyvila.chat.main(argv)` run in-process returns (or exits with) status 2, no exception
  escapes (in the real CLI that would be a traceback), and stderr holds exactly one `error:` line:
  either `error: ...` alone (tinyvila's run_cli) or argparse's usage lines followed by
  `tinyvila-chat: error: ...`.

"""
import array
import contextlib
import gc
import io
import json
import os
import pickle
import re
import shutil
import statistics
import sys
import threading
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import pytest
import torch
from PIL import Image

import tinyvila
from tinyvila.errors import CheckpointError, ContextError, MediaError, TinyVilaError

from fixtures_images import (draw_image, png_header_only, write_audio_only, write_video,
                             write_zero_frame_video)

GREEDY = dict(temperature=0, max_new_tokens=2, ignore_eos=True)


# ============================================================================ the environment

class _Unpickled:
    """Unpickling this creates the file `marker`: proof that a loader unpickled the checkpoint."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return open, (self.marker, "w")


class Env:
    """Checkpoints, engines and media files the corpus rows use; everything is built lazily (a
    row only pays for what it uses) and at most once per module."""

    def __init__(self, root, llava):
        self.root = root
        self.llava = llava
        self._cache = {}

    def once(self, key, make):
        if key not in self._cache:
            with contextlib.redirect_stderr(io.StringIO()):  # transformers' progress bars when saving
                self._cache[key] = make()
        return self._cache[key]

    def path(self, name):
        return self.root / name

    # ---- checkpoints and engines
    @property
    def qwen(self):
        def build():
            from fixtures_qwen import build_qwen2_5_vl

            build_qwen2_5_vl(self.root / "qwen")
            return self.root / "qwen"
        return self.once("qwen", build)

    @property
    def vila(self):
        def build():
            from fixtures_vila import build_vila

            build_vila(str(self.root / "vila"), backbone="qwen2", num_video_frames=4)
            return self.root / "vila"
        return self.once("vila", build)

    @property
    def llava_engine(self):
        return self.once("llava_engine", lambda: tinyvila.load(self.llava, device="cpu", dtype="float32"))

    @property
    def qwen_engine(self):
        return self.once("qwen_engine", lambda: tinyvila.load(self.qwen, device="cpu", dtype="float32"))

    @property
    def vila_engine(self):
        return self.once("vila_engine", lambda: tinyvila.load(self.vila, device="cpu", dtype="float32"))

    _copies = 0

    def broken(self, breaker, src=None):
        """A fresh copy of a checkpoint (the LLaVA one by default) with `breaker(dir)` applied."""
        Env._copies += 1
        d = self.root / f"ckpt{Env._copies}"
        shutil.copytree(src or self.llava, d)
        breaker(d)
        self.last_broken = d  # for `names`: the folder the row's error must name
        return d

    # ---- media
    @property
    def image(self):
        def make():
            p = self.root / "photo.png"
            draw_image(40, 30, seed=1).save(p)
            return p
        return self.once("image", make)

    @property
    def clip(self):
        return self.once("clip", lambda: write_video(self.root / "clip.mp4",
                                                     [draw_image(64, 48, seed=i) for i in range(8)], fps=4))

    def file(self, name, data):
        p = self.root / name
        p.write_bytes(data) if isinstance(data, bytes) else p.write_text(data)
        return p

    def truncated(self, name, fmt):
        from io import BytesIO

        buf = BytesIO()
        draw_image(64, 48, seed=2).save(buf, fmt)
        data = buf.getvalue()
        return self.file(name, data[:len(data) // 2])

    def saved(self, name, img, **kw):
        p = self.root / name
        img.save(p, **kw)
        return p

    def audio_only(self):
        return write_audio_only(self.root / "sound.mkv")

    def zero_frame_video(self):
        return write_zero_frame_video(self.root / "zero.mp4", fps=4)


@pytest.fixture(scope="module")
def env(tmp_path_factory, llava_vicuna):
    return Env(tmp_path_factory.mktemp("hardening"), llava_vicuna)


# ============================================================================ checkpoint breakers

def edit_json(path, fn):
    data = json.loads(path.read_text())
    fn(data)
    path.write_text(json.dumps(data))


def edit_config(fn):
    return lambda d: edit_json(d / "config.json", fn)


def edit_weights(fn):
    def breaker(d):
        from safetensors.torch import load_file, save_file

        state = load_file(d / "model.safetensors")
        fn(state)
        save_file(state, d / "model.safetensors", metadata={"format": "pt"})
    return breaker


def _wrong_shape(state):
    key = next(k for k in state if k.endswith("mlp.down_proj.weight"))
    state[key] = torch.zeros(state[key].shape[0], state[key].shape[1] + 1)


def _drop_tensor(state):
    del state[next(k for k in state if k.endswith("post_attention_layernorm.weight"))]


def _truncate(d):
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[:f.stat().st_size // 2])


def _pickle_only(d):
    (d / "model.safetensors").unlink()
    (d / "pytorch_model.bin").write_bytes(pickle.dumps({"w": _Unpickled(str(d / "UNPICKLED"))}))


def _load_pickle_only(env):
    d = env.broken(_pickle_only)
    try:
        tinyvila.load(d, device="cpu")
    finally:
        assert not (d / "UNPICKLED").exists(), "the loader unpickled pytorch_model.bin"


# ============================================================================ the corpus

@dataclass
class Case:
    id: str
    # library rows: run(env) does the call; CLI rows (cli=True): run(env) returns the argv
    run: Callable
    expect: type | None = TinyVilaError  # the exception class (None: the call must succeed)
    match: str = ""  # regex the message (or the CLI's error line) must match
    names: Callable | None = None  # env -> the path the message must name
    cli: bool = False


def ask(engine, **kw):
    """Open a session on `engine` with kw, ask one short question, close it."""
    def call(env):
        opts = {k: (v(env) if callable(v) else v) for k, v in kw.items()}
        with getattr(env, engine).session(**opts) as s:
            return s.ask("What is it?", **GREEDY)
    return call


def session_with(engine, **kw):
    """Only open (preprocess the media of) a session on `engine`."""
    def call(env):
        opts = {k: (v(env) if callable(v) else v) for k, v in kw.items()}
        getattr(env, engine).session(**opts).close()
    return call


def llava_image(make):
    return session_with("llava_engine", images=lambda env: [make(env)])


def qwen_video(make):
    return session_with("qwen_engine", videos=lambda env: [make(env)])


# Modes and formats that are not plain RGB but must load: file name -> (picture, save options).
ODD_IMAGES = {
    "cmyk.jpg": (lambda: draw_image(33, 21).convert("CMYK"), {}),
    "gray16.png": (lambda: Image.fromarray((np.arange(24 * 17).reshape(17, 24) * 150).astype(np.uint16)), {}),
    "palette-transparency.png": (lambda: draw_image(30, 20).quantize(16), {"transparency": 3}),
    "la.png": (lambda: draw_image(25, 25).convert("LA"), {}),
    "bilevel.png": (lambda: draw_image(25, 25).convert("1"), {}),
    "rgba.webp": (lambda: draw_image(31, 17).convert("RGBA"), {}),
    "animated.gif": (lambda: draw_image(20, 20), {"save_all": True, "append_images": [draw_image(20, 20, seed=3)]}),
    "dot.png": (lambda: Image.new("RGB", (1, 1), (9, 9, 9)), {}),
}


def odd_image(env, name):
    picture, options = ODD_IMAGES[name]
    return env.once(name, lambda: env.saved(name, picture(), **options))


def frames(n, w=40, h=30):
    return [np.asarray(draw_image(w, h, seed=i)) for i in range(n)]


def cli(*args):
    """A chat command line; callables among args are resolved against the env."""
    return lambda env: [str(a(env) if callable(a) else a) for a in args]


LLAVA = (lambda env: env.llava)
QWEN = (lambda env: env.qwen)
VILA = (lambda env: env.vila)
IMAGE = (lambda env: env.image)
BROKEN = (lambda env: env.last_broken)
RUN = ["-p", "What is it?", "-n", "2", "--temperature", "0", "--device", "cpu"]

CASES = [
    # ---------------------------------------------------------------- images (Engine.session)
    Case("image-missing", llava_image(lambda env: env.path("nope.png")), MediaError, "no such file",
         names=lambda env: env.path("nope.png")),
    Case("image-directory", llava_image(lambda env: env.once("dir", lambda: (env.path("folder.png").mkdir(),
                                                                             env.path("folder.png"))[1])),
         MediaError, "is a directory", names=lambda env: env.path("folder.png")),
    Case("image-empty-file", llava_image(lambda env: env.file("empty.png", b"")), MediaError, "empty",
         names=lambda env: env.path("empty.png")),
    Case("image-truncated-png", llava_image(lambda env: env.truncated("cut.png", "PNG")), MediaError,
         "truncated or corrupt", names=lambda env: env.path("cut.png")),
    Case("image-truncated-jpeg", llava_image(lambda env: env.truncated("cut.jpg", "JPEG")), MediaError,
         "truncated or corrupt", names=lambda env: env.path("cut.jpg")),
    Case("image-text-file-named-jpg", llava_image(lambda env: env.file("notes.jpg", "hello, not a picture\n")),
         MediaError, "not an image file", names=lambda env: env.path("notes.jpg")),
    Case("image-random-bytes", llava_image(lambda env: env.file("noise.png", bytes(range(256)) * 8)),
         MediaError, "not an image file|corrupt", names=lambda env: env.path("noise.png")),
    Case("image-zero-size", llava_image(lambda env: png_header_only(env.path("zero.png"), 0, 5)), MediaError,
         "", names=lambda env: env.path("zero.png")),
    Case("image-zero-size-array", llava_image(lambda env: np.zeros((5, 0, 3), np.uint8)), MediaError, "zero size"),
    Case("image-huge-dimensions", llava_image(lambda env: png_header_only(env.path("bomb.png"), 20000, 20000)),
         MediaError, "too large|over the limit", names=lambda env: env.path("bomb.png")),
    Case("image-url", llava_image(lambda env: "https://example.com/cat.png"), MediaError, "URLs are not fetched"),
    Case("image-float-array", llava_image(lambda env: np.zeros((8, 8, 3), np.float32)), MediaError, "uint8"),
    Case("image-wrong-type", llava_image(lambda env: 123), MediaError, "cannot load an image from a int"),
    Case("image-video-file-as-image", llava_image(lambda env: env.clip), MediaError, "not an image file",
         names=lambda env: env.clip),
    Case("image-single-path-not-a-list", session_with("llava_engine", images=lambda env: str(env.image)), None),
    # modes and formats that must simply work (see also test_odd_modes_answer_like_their_rgb_conversion)
    *[Case(f"image-{name.replace('.', '-')}-works", llava_image(lambda env, name=name: odd_image(env, name)), None)
      for name in ODD_IMAGES],

    # ---------------------------------------------------------------- videos (Qwen2.5-VL / LongVILA)
    Case("video-missing", qwen_video(lambda env: env.path("nope.mp4")), MediaError, "no such file",
         names=lambda env: env.path("nope.mp4")),
    Case("video-empty-file", qwen_video(lambda env: env.file("empty.mp4", b"")), MediaError, "empty",
         names=lambda env: env.path("empty.mp4")),
    Case("video-corrupt", qwen_video(lambda env: env.file("noise.mkv", np.random.default_rng(0).integers(
        0, 256, 5000, dtype=np.uint8).tobytes())), MediaError, "not a video file|corrupt",
         names=lambda env: env.path("noise.mkv")),
    Case("video-truncated", qwen_video(lambda env: env.file("cut.mp4", env.clip.read_bytes()[
        :env.clip.stat().st_size // 2])), MediaError, "corrupt|truncated|no frames|not a video",
         names=lambda env: env.path("cut.mp4")),
    Case("video-audio-only", qwen_video(lambda env: env.audio_only()), MediaError, "no video stream",
         names=lambda env: env.path("sound.mkv")),
    Case("video-zero-frames", qwen_video(lambda env: env.zero_frame_video()), MediaError, "no frames|no video",
         names=lambda env: env.path("zero.mp4")),
    Case("video-image-given-as-video", qwen_video(lambda env: env.image), MediaError, "is a PNG image, not a video",
         names=lambda env: env.image),
    Case("video-text-file", qwen_video(lambda env: env.file("notes.mp4", "not a video\n")), MediaError,
         "not a video file", names=lambda env: env.path("notes.mp4")),
    Case("video-one-frame-qwen", qwen_video(lambda env: env.once("one.mp4", lambda: write_video(
        env.path("one.mp4"), [draw_image(64, 48)], fps=4))), MediaError, "at least 2",
         names=lambda env: env.path("one.mp4")),
    Case("video-empty-frame-list", qwen_video(lambda env: []), MediaError, "frame list is empty"),
    Case("video-mixed-frame-sizes", qwen_video(lambda env: frames(1) + frames(1, 10, 10)), MediaError,
         "same size"),
    Case("video-to-image-only-model", session_with("llava_engine", videos=lambda env: [env.clip]), TinyVilaError,
         "takes images only"),
    Case("video-negative-fps", session_with("qwen_engine", videos=lambda env: [frames(4)], fps=-1.0), TinyVilaError,
         "fps"),
    Case("video-negative-max-frames-longvila", session_with("vila_engine", videos=lambda env: [env.clip],
                                                            max_frames=-3), TinyVilaError, "max_frames"),

    # ---------------------------------------------------------------- prompts and options
    Case("prompt-empty-question", lambda env: env.llava_engine.generate("", images=[env.image], **GREEDY),
         TinyVilaError, "empty"),
    Case("prompt-whitespace-question", lambda env: env.llava_engine.generate(" \n\t ", **GREEDY), TinyVilaError,
         "empty"),
    Case("prompt-none-question", lambda env: env.llava_engine.session().ask(None), TinyVilaError, "empty"),
    Case("prompt-too-many-placeholders", lambda env: env.llava_engine.generate(
        "<image> and <image>?", images=[env.image], **GREEDY), TinyVilaError, "placeholder"),
    Case("prompt-placeholder-without-media", lambda env: env.llava_engine.generate(
        input_ids=[1, env.llava_engine.image_token_id, 5], **GREEDY), TinyVilaError, "placeholder"),
    Case("prompt-ids-more-placeholders-than-media", lambda env: env.llava_engine.generate(
        input_ids=[1, env.llava_engine.image_token_id, env.llava_engine.image_token_id], images=[env.image],
        **GREEDY), TinyVilaError, "more media placeholders"),
    Case("prompt-and-input-ids", lambda env: env.llava_engine.generate("Hi", input_ids=[1, 5]), TinyVilaError,
         "either a prompt or input_ids"),
    Case("prompt-empty-input-ids", lambda env: env.llava_engine.generate(input_ids=[], **GREEDY), TinyVilaError,
         "empty"),
    Case("prompt-input-id-outside-vocabulary", lambda env: env.llava_engine.generate(
        input_ids=[1, 10 ** 9, 5], **GREEDY), TinyVilaError, "vocabulary|out of range|outside"),
    Case("prompt-longer-than-context", lambda env: tinyvila.load(env.llava, device="cpu", max_seq_len=64).generate(
        "word " * 100, **GREEDY), ContextError, "context holds 64"),
    Case("prompt-image-larger-than-context", ask("llava_engine", images=lambda env: [env.image], max_seq_len=24),
         ContextError, "context holds 24"),
    Case("prompt-media-kind-mismatch", lambda env: env.qwen_engine.generate(
        input_ids=[1, env.qwen_engine.video_token_id, 5], images=[env.image], **GREEDY), TinyVilaError,
         "is an image but the prompt has a video placeholder"),
    Case("option-not-taken-by-family", lambda env: env.llava_engine.generate("Hi", fps=2.0, **GREEDY),
         TinyVilaError, "does not take fps"),
    Case("option-negative-max-new-tokens", lambda env: env.llava_engine.generate("Hi", max_new_tokens=-3),
         TinyVilaError, "max_new_tokens"),
    Case("option-negative-temperature", lambda env: env.llava_engine.generate("Hi", temperature=-1),
         TinyVilaError, "temperature"),
    Case("option-nan-temperature", lambda env: env.llava_engine.generate("Hi", temperature=float("nan"),
                                                                         max_new_tokens=2),
         TinyVilaError, "temperature"),
    Case("option-top-p-zero", lambda env: env.llava_engine.generate("Hi", top_p=0), TinyVilaError, "top_p"),
    # wrong types: bools are ints in Python, floats are not integers, strings are not numbers
    Case("option-top-k-float", lambda env: env.llava_engine.generate("Hi", top_k=1.5, max_new_tokens=2),
         TinyVilaError, r"^top_k must be an integer >= 0, got 1\.5$"),
    Case("option-top-k-bool-in-session", lambda env: env.llava_engine.session().ask("Hi", top_k=True, max_new_tokens=2),
         TinyVilaError, "^top_k must be an integer >= 0, got True$"),
    Case("option-seed-string", lambda env: env.llava_engine.generate("Hi", seed="x", temperature=1.0, max_new_tokens=2),
         TinyVilaError, "^seed must be a 64-bit integer, got 'x'$"),
    Case("option-seed-bool", lambda env: env.llava_engine.generate("Hi", seed=True, temperature=1.0, max_new_tokens=2),
         TinyVilaError, "^seed must be a 64-bit integer, got True$"),
    Case("option-seed-float-in-stream", lambda env: next(env.llava_engine.session().stream(
        "Hi", seed=1.5, temperature=1.0, max_new_tokens=2)), TinyVilaError,
         r"^seed must be a 64-bit integer, got 1\.5$"),
    Case("option-seed-over-64-bits", lambda env: env.llava_engine.generate(
        "Hi", seed=2 ** 64, temperature=1.0, max_new_tokens=2), TinyVilaError,
         f"^seed must be a 64-bit integer, got {2 ** 64}$"),
    Case("option-max-new-tokens-bool", lambda env: env.llava_engine.generate("Hi", max_new_tokens=True),
         TinyVilaError, "^max_new_tokens must be a positive integer, got True$"),
    Case("option-top-p-string", lambda env: env.llava_engine.generate("Hi", top_p="0.5", max_new_tokens=2),
         TinyVilaError, r"^top_p must be a number in \(0, 1\], got '0\.5'$"),
    Case("option-temperature-string", lambda env: env.llava_engine.generate("Hi", temperature="1", max_new_tokens=2),
         TinyVilaError, "^temperature must be a number >= 0, got '1'$"),
    Case("option-temperature-bool", lambda env: env.llava_engine.generate("Hi", temperature=True, max_new_tokens=2),
         TinyVilaError, "^temperature must be a number >= 0, got True$"),
    Case("option-max-seq-len-bool", lambda env: env.llava_engine.session(max_seq_len=True), TinyVilaError,
         "^max_seq_len must be a positive integer, got True$"),
    Case("option-negative-max-seq-len", lambda env: env.llava_engine.session(max_seq_len=-5), TinyVilaError,
         "max_seq_len"),
    Case("option-unknown-sparsity", lambda env: env.llava_engine.session(sparsity="bogus"), TinyVilaError,
         "sparsity"),
    Case("option-prefill-sparsity-1.5", lambda env: env.llava_engine.session(prefill_sparsity=1.5), TinyVilaError,
         "prefill_sparsity"),
    Case("option-negative-max-pixels", session_with("qwen_engine", images=lambda env: [env.image], max_pixels=-5),
         TinyVilaError, "max_pixels"),
    Case("session-closed", lambda env: (lambda s: (s.close(), s.ask("Hi")))(env.llava_engine.session()),
         TinyVilaError, "closed"),

    # ---------------------------------------------------------------- checkpoints (tinyvila.load)
    Case("ckpt-missing-dir", lambda env: tinyvila.load(env.path("no-model"), device="cpu"), CheckpointError,
         "does not exist", names=lambda env: env.path("no-model")),
    Case("ckpt-path-is-a-file", lambda env: tinyvila.load(env.image, device="cpu"), CheckpointError,
         "is not a directory", names=lambda env: env.image),
    Case("ckpt-no-config", lambda env: tinyvila.load(env.broken(lambda d: (d / "config.json").unlink())),
         CheckpointError, "config.json is missing"),
    Case("ckpt-config-not-json", lambda env: tinyvila.load(env.broken(
        lambda d: (d / "config.json").write_text("{not json"))), CheckpointError, r"config\.json is not valid JSON"),
    Case("ckpt-config-json-list", lambda env: tinyvila.load(env.broken(
        lambda d: (d / "config.json").write_text("[1, 2]"))), CheckpointError, "JSON object"),
    Case("ckpt-unknown-architecture", lambda env: tinyvila.load(env.broken(edit_config(
        lambda c: c.update(architectures=["FancyVLM"], model_type="fancy")))), CheckpointError,
         "unsupported architecture 'FancyVLM'", names=BROKEN),
    Case("ckpt-unknown-model-type", lambda env: tinyvila.load(env.broken(edit_config(
        lambda c: (c.pop("architectures", None), c.update(model_type="fancy"))))), CheckpointError,
         "unsupported model_type 'fancy'", names=BROKEN),
    Case("ckpt-no-safetensors", lambda env: tinyvila.load(env.broken(lambda d: (d / "model.safetensors").unlink())),
         CheckpointError, "no \\*.safetensors weights", names=BROKEN),
    Case("ckpt-truncated-safetensors", lambda env: tinyvila.load(env.broken(_truncate)), CheckpointError,
         "truncated or corrupt", names=lambda env: "model.safetensors"),
    Case("ckpt-garbage-safetensors", lambda env: tinyvila.load(env.broken(
        lambda d: (d / "model.safetensors").write_bytes(bytes(range(256)) * 16))), CheckpointError,
         "truncated or corrupt", names=lambda env: "model.safetensors"),
    Case("ckpt-pickle-only-never-unpickled", _load_pickle_only, CheckpointError, "safetensors only",
         names=lambda env: "pytorch_model.bin"),
    Case("ckpt-wrong-tensor-shape", lambda env: tinyvila.load(env.broken(edit_weights(_wrong_shape))),
         CheckpointError, "has shape"),
    Case("ckpt-missing-tensor", lambda env: tinyvila.load(env.broken(edit_weights(_drop_tensor))), CheckpointError,
         "missing tensors"),
    Case("ckpt-missing-shard", lambda env: tinyvila.load(env.broken(lambda d: (
        d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"x": "model-00001.safetensors"}})))),
         CheckpointError, "model-00001.safetensors"),
    Case("ckpt-no-tokenizer", lambda env: tinyvila.load(env.broken(lambda d: [
        (d / f).unlink() for f in ("tokenizer.json", "tokenizer.model")])), CheckpointError, "tokenizer"),
    Case("ckpt-tokenizer-not-json", lambda env: tinyvila.load(env.broken(
        lambda d: (d / "tokenizer.json").write_text("{"))), CheckpointError, "tokenizer.json"),
    Case("ckpt-generation-config-not-json", lambda env: tinyvila.load(env.broken(
        lambda d: (d / "generation_config.json").write_text("{"))), CheckpointError, "generation_config.json"),
    Case("ckpt-bad-chat-template", lambda env: tinyvila.load(env.broken(lambda d: (d / "chat_template.json").write_text(
        json.dumps({"chat_template": "{% for %}"})))), CheckpointError, "chat template"),
    Case("ckpt-gptq-refused", lambda env: tinyvila.load(env.broken(edit_config(
        lambda c: c.update(quantization_config={"quant_method": "gptq", "bits": 4})))), CheckpointError, "gptq",
         names=BROKEN),
    Case("ckpt-awq-version-gemv-refused", lambda env: tinyvila.load(env.broken(edit_config(lambda c: c.update(
        quantization_config={"quant_method": "awq", "version": "gemv", "bits": 4})))), CheckpointError,
         "'gemv' is not supported", names=BROKEN),
    Case("ckpt-awq-without-qweight", lambda env: tinyvila.load(env.broken(edit_config(lambda c: c.update(
        quantization_config={"quant_method": "awq", "version": "gemm", "bits": 4, "group_size": 128})))),
         CheckpointError, "AWQ", names=BROKEN),
    Case("ckpt-config-field-wrong-type", lambda env: tinyvila.load(env.broken(edit_config(
        lambda c: c["text_config"].update(hidden_size="big")))), CheckpointError, "hidden_size", names=BROKEN),
    Case("ckpt-anyres-pinpoints-not-tile-multiples", lambda env: tinyvila.load(env.broken(edit_config(
        lambda c: c.update(image_grid_pinpoints=[[50, 100]])))).session(images=[env.image]), CheckpointError,
         "pinpoint"),
    Case("ckpt-vila-without-llm", lambda env: tinyvila.load(env.broken(
        lambda d: shutil.rmtree(d / "llm"), src=env.vila)), CheckpointError, "llm/config.json is missing"),
    Case("ckpt-vila-unknown-projector", lambda env: tinyvila.load(env.broken(lambda d: edit_json(
        d / "mm_projector" / "config.json", lambda c: c.update(mm_projector_type="linear")), src=env.vila)),
         CheckpointError, "unsupported mm_projector_type 'linear'", names=BROKEN),

    # ---------------------------------------------------------------- the chat CLI (in-process)
    Case("cli-unknown-flag", cli(LLAVA, "--frobnicate"), match="unrecognized arguments: --frobnicate", cli=True),
    Case("cli-flag-without-value", cli(LLAVA, "--image"), match="--image.*expected one argument", cli=True),
    Case("cli-model-given-twice", cli(LLAVA, "-m", LLAVA), match="give the model once", cli=True),
    Case("cli-bad-sparsity", cli(LLAVA, "--image", IMAGE, "--sparsity", "bogus", *RUN), match="sparsity", cli=True),
    Case("cli-prefill-sparsity-1.5", cli(LLAVA, "--image", IMAGE, "--prefill-sparsity", "1.5", *RUN),
         match=r"prefill_sparsity must be in \[0, 1\), got 1.5", cli=True),
    Case("cli-decode-sparsity-negative", cli(LLAVA, "--image", IMAGE, "--decode-sparsity", "-0.1", *RUN),
         match="decode_sparsity", cli=True),
    Case("cli-prefill-sparsity-not-a-number", cli(LLAVA, "--image", IMAGE, "--prefill-sparsity", "abc", *RUN),
         match="abc", cli=True),
    Case("cli-negative-max-new-tokens", cli(LLAVA, "--image", IMAGE, *RUN, "-n", "-3"),
         match="max_new_tokens must be a positive integer, got -3", cli=True),
    Case("cli-negative-temperature", cli(LLAVA, "--image", IMAGE, *RUN, "--temperature", "-1"),
         match="temperature must be", cli=True),
    Case("cli-nan-temperature", cli(LLAVA, "--image", IMAGE, *RUN, "--temperature", "nan"), match="temperature",
         cli=True),
    Case("cli-top-p-1.5", cli(LLAVA, "--image", IMAGE, *RUN, "--top-p", "1.5"), match="top_p", cli=True),
    Case("cli-top-k-negative", cli(LLAVA, "--image", IMAGE, *RUN, "--top-k", "-1"), match="top_k", cli=True),
    Case("cli-top-k-not-an-integer", cli(LLAVA, "--image", IMAGE, *RUN, "--top-k", "1.5"),
         match="--top-k.*'1.5'", cli=True),
    Case("cli-seed-not-an-integer", cli(LLAVA, "--image", IMAGE, *RUN, "--seed", "x"), match="--seed.*'x'", cli=True),
    Case("cli-seed-over-64-bits", cli(LLAVA, "--image", IMAGE, *RUN, "--seed", 10 ** 20),
         match=f"^seed must be a 64-bit integer, got {10 ** 20}$", cli=True),
    Case("cli-top-p-not-a-number", cli(LLAVA, "--image", IMAGE, *RUN, "--top-p", "half"), match="--top-p.*'half'",
         cli=True),
    Case("cli-bad-dtype", cli(LLAVA, "--image", IMAGE, *RUN, "--dtype", "int8"), match="int8", cli=True),
    Case("cli-bad-device", cli(LLAVA, "--image", IMAGE, "-p", "Hi", "--device", "tpu"), match="unknown device 'tpu'",
         cli=True),
    Case("cli-missing-image", cli(LLAVA, "--image", lambda env: env.path("nope.png"), *RUN),
         match="cannot read image .*nope.png.*no such file", cli=True),
    Case("cli-image-is-directory", cli(LLAVA, "--image", lambda env: env.root, *RUN), match="is a directory",
         cli=True),
    Case("cli-video-to-image-only-model", cli(LLAVA, "--video", lambda env: env.clip, *RUN),
         match="takes images only", cli=True),
    Case("cli-fps-to-image-only-model", cli(LLAVA, "--image", IMAGE, "--fps", "2", *RUN), match="does not take fps",
         cli=True),
    Case("cli-corrupt-video", cli(QWEN, "--video", lambda env: env.file("bad.mp4", b"\x00" * 3000), *RUN),
         match="cannot read video .*bad.mp4", cli=True),
    Case("cli-missing-model-dir", cli(lambda env: env.path("no-model"), *RUN), match="does not exist", cli=True),
    Case("cli-malformed-config", cli(lambda env: env.broken(lambda d: (d / "config.json").write_text("{")), *RUN),
         match="not valid JSON", cli=True),
    Case("cli-unknown-architecture", cli(lambda env: env.broken(edit_config(
        lambda c: c.update(architectures=["FancyVLM"], model_type="fancy"))), *RUN),
         match="unsupported architecture 'FancyVLM'", names=BROKEN, cli=True),
    Case("cli-empty-prompt", cli(LLAVA, "--image", IMAGE, "-p", "", "--device", "cpu"), match="the question is empty",
         cli=True),
    Case("cli-too-many-placeholders", cli(LLAVA, "--image", IMAGE, "-p", "<image> <image>", "--device", "cpu"),
         match="placeholder", cli=True),
    Case("cli-prompt-longer-than-context", cli(LLAVA, "--image", IMAGE, *RUN, "--max-seq-len", "16"),
         match="context holds 16", cli=True),
    Case("cli-negative-max-seq-len", cli(LLAVA, "--image", IMAGE, *RUN, "--max-seq-len", "-5"),
         match="max.seq.len", cli=True),
    Case("cli-save-kept-into-missing-dir", cli(LLAVA, "--image", IMAGE, *RUN, "--save-kept",
                                               lambda env: env.path("no-such-dir") / "kept.png"),
         match="no-such-dir", cli=True),
    Case("cli-negative-max-pixels", cli(QWEN, "--image", IMAGE, *RUN, "--max-pixels", "-5"), match="max.pixels",
         cli=True),
    Case("cli-two-images-after-one-flag", cli("--image", IMAGE, IMAGE, LLAVA, *RUN), match="-i a.png -i b.png",
         cli=True),
    Case("cli-image-given-as-model", cli(IMAGE, *RUN), match="is a file, not a checkpoint folder", cli=True),
    Case("cli-device-mps", cli(LLAVA, *RUN[:-2], "--device", "mps"), match="device 'mps' is not supported",
         cli=True),
    Case("cli-device-cuda-7", cli(LLAVA, *RUN[:-2], "--device", "cuda:7"), match="CUDA is not available|cuda:7",
         cli=True),
    Case("cli-save-kept-is-a-folder", cli(LLAVA, "--image", IMAGE, *RUN, "--save-kept", lambda env: env.root),
         match="is a folder", cli=True),
    Case("cli-max-seq-len-zero", cli(LLAVA, *RUN, "--max-seq-len", "0"), match="--max-seq-len.*positive", cli=True),
    Case("cli-bad-prefill-budget", cli(LLAVA, *RUN, "--prefill-budget", "all"), match="prefill_budget", cli=True),
    Case("cli-negative-max-frames", cli(VILA, "--video", lambda env: env.clip, *RUN, "--max-frames", "-3"),
         match="max.frames", cli=True),
]


def _param(case):
    return pytest.param(case, id=case.id)


def check_message(msg, case, env):
    assert msg and msg == msg.strip() and "\n" not in msg and "Traceback" not in msg, repr(msg)
    assert len(msg) < 600, msg  # one readable line, not a dump
    assert re.search(case.match, msg), (case.match, msg)
    if case.names is not None:
        assert str(case.names(env)) in msg, msg


def run_chat(argv):
    """tinyvila.chat.main in-process: its exit status (argparse exits through SystemExit)."""
    from tinyvila.chat import main

    try:
        return main(argv)
    except SystemExit as e:
        return e.code


def check_cli_error(code, err, case, env):
    """Status 2 and exactly one `error:` line: tinyvila's own (`error: ...` alone on stderr) or
    argparse's (usage lines, then `tinyvila-chat: error: ...`)."""
    assert code == 2, (code, err)
    assert "Traceback" not in err, err
    # an error found after loading follows the load summary line (`loaded MODEL: ...`)
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("loaded ")]
    errors = [line for line in lines if "error:" in line]
    assert len(errors) == 1, err
    line = errors[0]
    if line.startswith("error: "):
        assert lines == [line], err
        msg = line[len("error: "):]
    else:
        assert line.startswith("tinyvila-chat: error: ") and line == lines[-1], err
        assert lines[0].startswith("usage: "), err
        msg = line[len("tinyvila-chat: error: "):]
    check_message(msg, case, env)


@pytest.mark.parametrize("case", [_param(c) for c in CASES])
def test_corpus(case, env, capfd):
    if case.cli:
        argv = case.run(env)
        capfd.readouterr()
        code = run_chat(argv)  # an exception escaping here is the traceback a user would see
        out, err = capfd.readouterr()
        check_cli_error(code, err, case, env)
        return
    if case.expect is None:
        case.run(env)
        return
    with pytest.raises(TinyVilaError) as ei:
        case.run(env)
    assert isinstance(ei.value, case.expect), f"{type(ei.value).__name__} is not a {case.expect.__name__}"
    check_message(str(ei.value), case, env)
    # library errors print nothing themselves (ffmpeg / decord / PIL chatter stays captured)
    assert capfd.readouterr().err == ""


def test_corpus_is_large_and_ids_unique():
    assert len(CASES) >= 30
    assert len({c.id for c in CASES}) == len(CASES)


def test_odd_modes_answer_like_their_rgb_conversion(env):
    """The odd modes give the same answer as the same picture converted to RGB beforehand (the
    conversion is all that happens to them)."""
    eng = env.llava_engine
    for name in ("cmyk.jpg", "gray16.png", "palette-transparency.png", "la.png"):
        p = odd_image(env, name)
        with Image.open(p) as im:
            rgb = np.asarray(im.convert("RGB"))
        assert eng.generate("What?", images=[p], **GREEDY).token_ids == \
            eng.generate("What?", images=[rgb], **GREEDY).token_ids, name


def test_chat_set_bad_seed_is_reported_and_the_chat_goes_on(env, capfd, monkeypatch):
    """In the interactive chat a seed torch cannot take (/set parses any int) is one `error:` line
    at the next answer, not a traceback; the chat answers the question after it."""
    from tinyvila.chat import main

    monkeypatch.setattr(sys, "stdin", io.StringIO(f"/set seed {10 ** 20}\nHi\n/set seed 3\nHi\n"))
    capfd.readouterr()
    assert main([str(env.llava), "-n", "2", "--temperature", "1", "--device", "cpu", "--json", "-q"]) == 0
    out, err = capfd.readouterr()
    assert err.splitlines() == [f"error: seed must be a 64-bit integer, got {10 ** 20}"], err
    assert [json.loads(line)["finish_reason"] for line in out.splitlines()] == ["length"]  # the answer after it


def test_turn_embeddings_build_no_autograd_graph(env, monkeypatch):
    """Every forward of a session runs without autograd, the input embeddings included: with an
    embedding weight that requires grad (as a fine-tuning script's would), a turn builds no graph."""
    from tinyvila.session import Session

    eng = env.llava_engine
    monkeypatch.setattr(eng.model.language_model.embed_tokens.weight, "requires_grad", True)
    embedded, embed = [], Session.embed

    def spy(self, *args):
        embedded.append(embed(self, *args))
        return embedded[-1]

    monkeypatch.setattr(Session, "embed", spy)
    with eng.session(images=[env.image]) as s:
        s.ask("What is it?", **GREEDY)
        s.ask("And the colours?", **GREEDY)  # a follow-up embeds only its new suffix
    assert len(embedded) == 2
    for h in embedded:
        assert not h.requires_grad and h.grad_fn is None


# ============================================================================ 200 turns, history="evict"

def _live_tensors():
    return sum(1 for o in gc.get_objects() if type(o) in (torch.Tensor, torch.nn.Parameter))


def _rss():
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:  # not Linux: the other checks still apply
        return 0


@pytest.mark.parametrize("sparsity", ["dense", "image"])
def test_200_turn_evict_conversation_does_not_grow(env, sparsity):
    """200 questions under history="evict" on the tiny LLaVA-NeXT: after every answer the cache
    holds exactly the same tokens (system prefix + the image), nothing piles up (messages, media,
    live tensors, Python heap blocks, RSS), every answer equals the first answer to the same
    question, and a turn costs the same CPU time at the end as after the warm-up."""
    eng = env.llava_engine
    questions = ["What is in the picture?", "Describe the colours.", "Is there a circle?", "Count the shapes."]
    turns, warm = 200, 30
    cpu = array.array("d", bytes(8 * turns))  # no float objects allocated per turn by the test
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # idle intra-op threads spinning count as CPU time too: one thread, one cost
    with contextlib.ExitStack() as stack:
        stack.callback(torch.set_num_threads, threads)
        s = stack.enter_context(eng.session(images=[env.image], sparsity=sparsity, history="evict"))
        first = {}
        state = None
        for i in range(turns):
            if i == warm:
                gc.collect()
                blocks, rss, tensors = sys.getallocatedblocks(), _rss(), _live_tensors()
                k_ptr = s.cache.k.data_ptr()
            t = time.process_time()
            r = s.ask(questions[i % len(questions)], temperature=0, max_new_tokens=6, ignore_eos=True)
            cpu[i] = time.process_time() - t
            assert r.finish_reason == "length" and len(r.token_ids) == 6
            expected = first.setdefault(i % len(questions), r.token_ids)
            assert r.token_ids == expected, i
            now = (s.cache.length, tuple(s.tokens), len(s.messages), len(s.media), len(s.pending),
                   len(s.features))
            state = state or now
            assert now == state, i
        assert s.cache.length == len(s.tokens) and s.messages == [] and len(s.pending) == 1
        assert s.cache.k.data_ptr() == k_ptr  # the preallocated cache is never reallocated
        gc.collect()
        assert _live_tensors() == tensors
        assert sys.getallocatedblocks() - blocks < 1000  # < 6 objects per turn, with room for noise
        assert _rss() - rss < 64 * 2 ** 20
        # and each answer is a fresh conversation's
        for j, q in enumerate(questions[:2]):
            fresh = eng.generate(q, images=[env.image], sparsity=sparsity, temperature=0, max_new_tokens=6,
                                 ignore_eos=True)
            assert fresh.token_ids == first[j]
    # CPU time (not wall time: other processes on a shared CI box do not count), medians (one GC
    # pause does not count either)
    early = statistics.median(cpu[10:30])
    late = statistics.median(cpu[-20:])
    assert late < 2.0 * early + 1e-3, (early, late)


# ============================================================================ cancellation from another thread

QUESTION, FOLLOW_UP = "Tell me everything about it.", "And the colours?"
# Seeded sampling: the tiny random model's greedy answers are long runs of byte-fallback pieces,
# which the stream decoder holds back (no piece, so no point to stop at) until the run ends.
SAMPLED = dict(temperature=1.0, seed=1, ignore_eos=True)


def _consume_until(gen, stop, started, resume, pieces):
    """The worker: streams the answer; after the first piece it lets the main thread look at the
    busy session, then goes on until the main thread sets `stop`."""
    for piece in gen:
        pieces.append(piece)
        if len(pieces) == 1:
            started.set()
            resume.wait(60)
        if stop.is_set():
            gen.close()  # the consumer's thread closes it: a generator cannot be closed while running
            break


@pytest.mark.parametrize("sparsity", ["dense", "image"])
def test_cancel_stream_from_another_thread_keeps_session_usable(env, sparsity):
    """A worker thread streams a long answer; the main thread asks it to stop (an Event the
    consumer checks between pieces, then closes the generator). The answer ends "cancelled", the
    session stays usable and its next answer is exactly the one a twin conversation stopped at
    the same token gives, and (dense) the one a fresh one-shot prompt of that history gives."""
    eng, img = env.llava_engine, env.image
    with eng.session(images=[img], sparsity=sparsity) as s:
        s.ask("What is it?", **GREEDY)
        started, resume, stop, pieces = threading.Event(), threading.Event(), threading.Event(), []
        worker = threading.Thread(target=_consume_until, args=(
            s.stream(QUESTION, max_new_tokens=800, **SAMPLED), stop, started, resume, pieces))
        worker.start()
        try:
            assert started.wait(60), "the answer never started streaming"
            with pytest.raises(TinyVilaError, match="already answering"):
                s.ask("Me too?")  # the session refuses a second user while it answers
            resume.set()
            time.sleep(0.005)  # let it stream a little further
            stop.set()
        finally:
            resume.set()
            stop.set()
            worker.join(60)
        assert not worker.is_alive()
        cancelled = s.last_result
        assert cancelled.finish_reason == "cancelled"
        n = len(cancelled.token_ids)
        assert 0 < n < 800 and "".join(pieces) == eng.tokenizer.decode(cancelled.token_ids)[:len("".join(pieces))]
        after = s.ask(FOLLOW_UP, temperature=0, max_new_tokens=8, ignore_eos=True)
        assert after.finish_reason == "length" and len(after.token_ids) == 8
        history = list(s.messages[:-2])  # the conversation before the follow-up

    # a twin conversation that stops the same answer at the same token, on one thread
    with eng.session(images=[img], sparsity=sparsity) as twin:
        twin.ask("What is it?", **GREEDY)
        twin.ask(QUESTION, max_new_tokens=n, **SAMPLED)
        assert twin.last_result.token_ids == cancelled.token_ids
        assert twin.ask(FOLLOW_UP, temperature=0, max_new_tokens=8, ignore_eos=True).token_ids == after.token_ids
    if sparsity == "dense":  # a fresh one-shot prompt of the same history
        with eng.session() as fresh:
            ids = eng.encode_text(eng.render(history + [fresh.user_message(FOLLOW_UP, [])]))
        ref = eng.generate(input_ids=ids, images=[img], temperature=0, max_new_tokens=8, ignore_eos=True)
        assert ref.token_ids == after.token_ids


def test_cancel_api_from_another_thread(env):
    eng = env.llava_engine
    with eng.session(images=[env.image]) as s:
        started, result = threading.Event(), {}

        def consume():
            for _ in s.stream(QUESTION, max_new_tokens=150, **SAMPLED):
                started.set()  # a consumer that never looks at any flag
            result["r"] = s.last_result

        worker = threading.Thread(target=consume)
        worker.start()
        try:
            assert started.wait(60)
            s.cancel()  # stops the running answer at its next token
        finally:
            worker.join(60)
        assert result["r"].finish_reason == "cancelled" and len(result["r"].token_ids) < 150
        assert s.ask(FOLLOW_UP, **GREEDY).token_ids
