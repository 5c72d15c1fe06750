"""Property / fuzz tests of the preprocessing of all three families, on the tiny checkpoints.

For images of random size (1..2000 px a side, log-uniform, plus the extreme aspect ratios 1x2000 and
2000x1) in random modes (RGB, L, LA, RGBA, P, I;16, CMYK, 1), and for random frame lists:

* the visual tokens the runtime reserves for the item in the prompt (the slots the session's
  `inputs()` expands the placeholder into) equal the rows its encoder produces (and, with prefill
  pruning, the rows that stay), and equal the item's `n_tokens` when dense;
* that count equals transformers' own where a cheap oracle exists: LLaVA-NeXT's
  `LlavaNextProcessor._get_number_of_features` and `image_size_to_num_patches` (crops), Qwen2.5-VL's
  `smart_resize` grid (and, on a subset, `Qwen2VLImageProcessorPil`'s `image_grid_thw`) / merge**2;
  LongVILA's spec formulas (fixtures_vila: tokens per image, uniform frame indices);
* Qwen2.5-VL refuses aspect ratios over 200 with a one-line MediaError, as transformers raises.

Fixed seeds; every family's cases run in a few seconds.
"""
import contextlib
import functools
import io
import math
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

import tinyvila
from tinyvila.errors import MediaError

from fixtures_llava import PATCH as LLAVA_PATCH, PINPOINTS as LLAVA_PINPOINTS, TILE as LLAVA_TILE
from fixtures_qwen import MAX_PIXELS as QWEN_MAX_PIXELS, MIN_PIXELS as QWEN_MIN_PIXELS

MODES = ["RGB", "L", "LA", "RGBA", "P", "I;16", "CMYK", "1"]
EXTREMES = [(1, 1), (1, 2000), (2000, 1), (2000, 2000), (1, 2), (2, 1), (3, 1999), (1999, 3), (10, 2000),
            (2000, 10), (27, 29), (56, 56), (57, 55)]


def random_sizes(seed, n):
    """EXTREMES, then n (width, height) pairs with log-uniform sides in [1, 2000]."""
    rng = np.random.default_rng(seed)
    sides = np.exp(rng.uniform(0, math.log(2000), (n, 2))).round().astype(int).clip(1, 2000)
    return EXTREMES + [tuple(int(v) for v in wh) for wh in sides]


def make_image(w, h, mode, seed):
    """A w x h PIL image in `mode`: a random 8x8 picture blown up (cheap at any size)."""
    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).resize((w, h), Image.Resampling.NEAREST)
    if mode == "I;16":
        return Image.fromarray(np.asarray(img.convert("L")).astype(np.uint16) * 257)
    return img if mode == "RGB" else img.convert(mode)


def cases(seed, n):
    rng = np.random.default_rng(seed + 1)
    return [(w, h, MODES[int(rng.integers(len(MODES)))], seed * 1000 + i) for i, (w, h) in enumerate(random_sizes(seed, n))]


def quiet(fn, *args, **kw):
    with contextlib.redirect_stderr(io.StringIO()):  # transformers' progress bars when saving
        return fn(*args, **kw)


def reserved_tokens(eng, sparsity="dense", **media):
    """Open a session on `media` (images=[...] or videos=[...]) and expand a one-question prompt:
    (the media item, the slots reserved for it in the prompt, the encoder rows it got)."""
    with eng.session(sparsity=sparsity, **media) as s:
        item = s.pending[0]
        ids = eng.encode_text(eng.render([s.user_message("Hi", s.pending)]))
        placeholders = [t for t in ids if t in (eng.image_token_id, eng.video_token_id)]
        assert len(placeholders) == 1
        h, positions = s.inputs(ids)  # expands the placeholder and runs the encoder
        reserved = h.shape[0] - (len(ids) - 1)
        assert positions.shape[-1] == h.shape[0]
        visual = s.visual[0]
        assert visual.n_tokens == item.n_tokens
        rows = s.features[0].shape[0]
        assert reserved == visual.n_kept == rows, (reserved, visual.n_kept, rows)
        if sparsity == "dense":
            assert reserved == item.n_tokens
        return item, reserved, rows


# ============================================================================ LLaVA-NeXT anyres

def hf_llava_num_features(H, W, tile, patch, pinpoints):
    """transformers' LlavaNextProcessor._get_number_of_features on a stub (no tokenizer), the
    'default' strategy (the CLS token counted, then removed, as the processor does)."""
    from transformers import LlavaNextProcessor

    stub = SimpleNamespace(image_processor=SimpleNamespace(image_grid_pinpoints=pinpoints), patch_size=patch,
                           num_additional_image_tokens=1)
    stub._get_unpadded_features = functools.partial(LlavaNextProcessor._get_unpadded_features, stub)
    return LlavaNextProcessor._get_number_of_features(stub, H, W, tile, tile) - 1


@pytest.fixture(scope="module")
def llava(llava_vicuna):
    return tinyvila.load(llava_vicuna, device="cpu", dtype="float32")


def test_llava_next_token_counts(llava):
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    for i, (w, h, mode, seed) in enumerate(cases(1, 90)):
        sparsity = "image" if i % 4 == 3 else "dense"
        item, reserved, _ = reserved_tokens(llava, sparsity, images=[make_image(w, h, mode, seed)])
        where = (w, h, mode, sparsity)
        assert item.image.image_size == (h, w), where
        assert item.n_tokens == hf_llava_num_features(h, w, LLAVA_TILE, LLAVA_PATCH, LLAVA_PINPOINTS), where
        assert item.image.pixels.shape[0] == image_size_to_num_patches((h, w), LLAVA_PINPOINTS, LLAVA_TILE), where
        if sparsity != "dense":
            assert 0 < reserved < item.n_tokens, where


# ============================================================================ Qwen2.5-VL smart_resize

@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    from fixtures_qwen import build_qwen2_5_vl

    d = tmp_path_factory.mktemp("fuzz_qwen")
    quiet(build_qwen2_5_vl, d)
    return tinyvila.load(d, device="cpu", dtype="float32")


def hf_qwen_grid(h, w, min_pixels, max_pixels, patch=14):
    try:
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize
    except ImportError:  # releases without the _pil module keep it next to the slow processor
        from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize
    rh, rw = smart_resize(h, w, factor=2 * patch, min_pixels=min_pixels, max_pixels=max_pixels)
    return 1, rh // patch, rw // patch


def test_qwen_image_token_counts(qwen):
    import transformers

    HFProcessor = getattr(transformers, "Qwen2VLImageProcessorPil", None) or transformers.Qwen2VLImageProcessor
    rng = np.random.default_rng(5)
    refused = 0
    for i, (w, h, mode, seed) in enumerate(cases(2, 90)):
        options = {}
        if i % 3 == 1:  # the user's own pixel budget
            lo = int(rng.choice([56 * 56, 4 * 28 * 28, 16 * 28 * 28]))
            options = dict(min_pixels=lo, max_pixels=int(rng.choice([lo, 2 * lo, 64 * 28 * 28, 120 * 28 * 28])))
        min_pixels, max_pixels = options.get("min_pixels", QWEN_MIN_PIXELS), options.get("max_pixels", QWEN_MAX_PIXELS)
        img = make_image(w, h, mode, seed)
        where = (w, h, mode, options)
        if max(w, h) / min(w, h) > 200:
            with pytest.raises(MediaError, match="aspect ratio") as e:
                reserved_tokens(qwen, images=[img], **options)
            assert "\n" not in str(e.value)
            with pytest.raises(ValueError):
                hf_qwen_grid(h, w, min_pixels, max_pixels)  # transformers refuses it too
            refused += 1
            continue
        item, reserved, _ = reserved_tokens(qwen, "image" if i % 4 == 3 else "dense", images=[img], **options)
        grid = hf_qwen_grid(h, w, min_pixels, max_pixels)
        assert item.grid == grid, where
        assert item.n_tokens == grid[0] * grid[1] * grid[2] // 4, where
        if i % 6 == 0:  # the whole transformers image processor on a subset
            ref = HFProcessor(min_pixels=min_pixels, max_pixels=max_pixels)(images=[img.convert("RGB")],
                                                                           return_tensors="np")
            assert tuple(ref["image_grid_thw"][0].tolist()) == item.grid, where
            assert ref["pixel_values"].shape[0] == item.pixels.shape[0], where
    assert refused >= 4  # 1x2000, 2000x1, 3x1999, 1999x3 (at least)


def test_qwen_video_token_counts(qwen):
    """Frame lists of random length and size: ceil(n / 2) temporal slices (the last frame repeated
    to pad), the qwen-vl-utils video pixel budget, and as many encoder rows as reserved slots."""
    from tinyvila.models.qwen2_5_vl import VIDEO_MIN_PIXELS, video_pixel_budget

    rng = np.random.default_rng(11)
    for i in range(12):
        n = int(rng.integers(1, 8))
        w, h = int(rng.integers(8, 400)), int(rng.integers(8, 400))
        if max(w, h) / min(w, h) > 200:
            continue
        mode = MODES[i % len(MODES)]
        frames = [make_image(w, h, mode, 100 * i + k) for k in range(n)]
        max_pixels = int(rng.choice([VIDEO_MIN_PIXELS, 160 * 28 * 28]))
        item, reserved, _ = reserved_tokens(qwen, "video" if i % 3 == 2 else "dense", videos=[frames],
                                            max_pixels=max_pixels)
        lo, hi = video_pixel_budget(-(-n // 2) * 2, VIDEO_MIN_PIXELS, max_pixels)
        grid = (-(-n // 2),) + hf_qwen_grid(h, w, lo, hi)[1:]
        assert item.kind == "video" and item.grid == grid, (w, h, n, mode)
        assert item.n_tokens == grid[0] * grid[1] * grid[2] // 4


# ============================================================================ Qwen3-VL

@pytest.fixture(scope="module")
def qwen3(tmp_path_factory):
    from fixtures_qwen3 import build_qwen3_vl

    d = tmp_path_factory.mktemp("fuzz_qwen3")
    quiet(build_qwen3_vl, d)
    return tinyvila.load(d, device="cpu", dtype="float32")


def test_qwen3_image_token_counts(qwen3):
    """transformers' smart_resize at factor 32 (patch 16), and on a subset its whole image processor."""
    from transformers import Qwen2VLImageProcessorPil

    from fixtures_qwen3 import MAX_PIXELS, MIN_PIXELS

    for i, (w, h, mode, seed) in enumerate(cases(4, 30)):
        img = make_image(w, h, mode, seed)
        if max(w, h) / min(w, h) > 200:
            with pytest.raises(MediaError, match="aspect ratio"):
                reserved_tokens(qwen3, images=[img])
            continue
        item, reserved, _ = reserved_tokens(qwen3, "image" if i % 4 == 3 else "dense", images=[img])
        grid = hf_qwen_grid(h, w, MIN_PIXELS, MAX_PIXELS, patch=16)
        assert item.grid == grid and item.n_tokens == grid[1] * grid[2] // 4, (w, h, mode)
        if i % 6 == 0:
            ref = Qwen2VLImageProcessorPil(patch_size=16, min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)(
                images=[img.convert("RGB")], return_tensors="np")
            assert tuple(ref["image_grid_thw"][0].tolist()) == item.grid, (w, h, mode)


def test_qwen3_video_token_counts(qwen3):
    """Frame lists of random length and size: one item per frame pair, each of the size
    transformers' Qwen3VL video smart_resize gives the clip, timestamps in order."""
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import smart_resize

    rng = np.random.default_rng(13)
    cfg = qwen3.model.cfg
    for i in range(12):
        n = int(rng.integers(2, 9))
        w, h = int(rng.integers(8, 400)), int(rng.integers(8, 400))
        if max(w, h) / min(w, h) > 200:
            continue
        frames = [make_image(w, h, MODES[i % len(MODES)], 100 * i + k) for k in range(n)]
        with qwen3.session(sparsity="video" if i % 3 == 2 else "dense", videos=[frames]) as s:
            pairs = list(s.pending)
            ids = qwen3.encode_text(qwen3.render([s.user_message("Hi", s.pending)]))
            h_in, _ = s.inputs(ids)
            assert h_in.shape[0] - len(ids) + len(pairs) == sum(v.n_kept for v in s.visual)
        rh, rw = smart_resize(n, h, w, temporal_factor=2, factor=32, min_pixels=cfg.video_min_pixels,
                              max_pixels=cfg.video_max_pixels)
        assert len(pairs) == -(-n // 2) and all(p.grid == (1, rh // 16, rw // 16) for p in pairs), (w, h, n)
        assert [p.seconds for p in pairs] == sorted(p.seconds for p in pairs)


# ============================================================================ LongVILA (VILA layout)

@pytest.fixture(scope="module")
def vila(tmp_path_factory):
    from fixtures_vila import build_vila

    out = {}
    for name, kw in {"2x2": dict(), "3x3": dict(projector="mlp_downsample_3x3_fix", image_size=42)}.items():
        d = str(tmp_path_factory.mktemp(f"fuzz_vila_{name}"))
        fx = quiet(build_vila, d, backbone="qwen2", num_video_frames=4, **kw)
        out[name] = (fx, tinyvila.load(d, device="cpu", dtype="float32"))
    return out


@pytest.mark.parametrize("name", ["2x2", "3x3"])
def test_longvila_image_token_counts(vila, name):
    """Any size and mode is squashed to the tower's square: always ceil(G/k)**2 tokens plus the
    "\\n" after the frame."""
    fx, eng = vila[name]
    per_frame = fx.tokens_per_image + 1
    for i, (w, h, mode, seed) in enumerate(cases(3, 30)):
        item, reserved, _ = reserved_tokens(eng, "image" if i % 4 == 3 else "dense",
                                            images=[make_image(w, h, mode, seed)])
        assert item.n_tokens == per_frame, (w, h, mode)


def test_longvila_video_token_counts(vila):
    """Frame lists of random length against max_frames: used whole when short enough, else the
    spec's uniform round(linspace) sample; every used frame gives a frame's tokens."""
    from fixtures_vila import uniform_frame_indices

    fx, eng = vila["2x2"]
    per_frame = fx.tokens_per_image + 1
    rng = np.random.default_rng(13)
    for i in range(14):
        n = int(rng.integers(1, 13))
        max_frames = [None, 1, 2, 3, 5, 8][i % 6]
        w, h = int(rng.integers(1, 300)), int(rng.integers(1, 300))
        frames = [make_image(w, h, MODES[(i + k) % len(MODES)], 50 * i + k) for k in range(n)]
        item, reserved, _ = reserved_tokens(eng, "video" if i % 3 == 2 else "dense", videos=[frames],
                                            max_frames=max_frames)
        limit = max_frames or 4  # the checkpoint's num_video_frames
        used = n if n <= limit else len(uniform_frame_indices(n, limit))
        assert item.pixels.shape[0] == used and item.n_tokens == used * per_frame, (n, max_frames)
