"""tinyvila.media against transformers 5.x (test-only dependency) and against bad inputs."""
import builtins
import io
import os
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from tinyvila.errors import MediaError
from tinyvila.media import (CLIP_MEAN, CLIP_STD, SIGLIP_MEAN, SIGLIP_STD, load_image, resize_bicubic,
                            to_normalized_tensor)

from fixtures_images import png_header_only  # noqa: E402
from fixtures_llava import pil_image_processor  # noqa: E402

LlavaNextImageProcessorPil = pil_image_processor()
from transformers.image_utils import PILImageResampling, SizeDict  # noqa: E402
from transformers.image_utils import load_image as hf_load_image  # noqa: E402

RNG = np.random.default_rng(1234)


@pytest.fixture(scope="module")
def proc():
    return LlavaNextImageProcessorPil()


def rand_rgb(w, h):
    return Image.fromarray(RNG.integers(0, 256, (h, w, 3), dtype=np.uint8))


def expect_media_error(src, *words, **kw):
    """load_image(src) must raise MediaError with a one-line message containing `words`,
    and emit no warning."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(MediaError) as ei:
            load_image(src, **kw)
    msg = str(ei.value)
    assert "\n" not in msg and msg.strip() == msg and msg
    for w in words:
        assert w in msg, msg
    assert not caught, [str(c.message) for c in caught]
    assert ei.value.__cause__ is None  # raised `from None`: no chained traceback
    return msg


# ---------------------------------------------------------------- bad inputs

def test_missing_file(tmp_path):
    p = tmp_path / "nope.png"
    expect_media_error(str(p), str(p), "no such file")


def test_directory(tmp_path):
    expect_media_error(tmp_path, str(tmp_path), "directory")


def test_empty_file(tmp_path):
    p = tmp_path / "empty.png"
    p.write_bytes(b"")
    expect_media_error(p, str(p), "empty")


def test_text_file_named_png(tmp_path):
    p = tmp_path / "notes.png"
    p.write_text("this is not an image\n" * 20)
    expect_media_error(p, str(p), "not an image")


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated(tmp_path, fmt):
    buf = io.BytesIO()
    rand_rgb(128, 96).save(buf, format=fmt)
    data = buf.getvalue()
    p = tmp_path / f"half.{fmt.lower()}"
    p.write_bytes(data[: len(data) // 2])
    expect_media_error(p, str(p), "truncated")
    # The full file loads, so the failure really is the truncation.
    p.write_bytes(data)
    assert load_image(p).size == (128, 96)


def test_decompression_bomb_pil_limit(tmp_path):
    p = png_header_only(tmp_path / "bomb.png", 20000, 20000)
    assert p.stat().st_size < 100
    expect_media_error(p, str(p), "too large")
    assert Image.MAX_IMAGE_PIXELS == 89478485  # PIL's global setting untouched


def test_pixel_limit_checked_before_decode(tmp_path):
    # 1e8 pixels: PIL only warns (DecompressionBombWarning); our limit must refuse it from the
    # header (the file has no pixel data, so decoding would fail differently) and not warn.
    p = png_header_only(tmp_path / "big.png", 10000, 10000)
    expect_media_error(p, str(p), "10000x10000", "limit of 50000000", max_pixels=50_000_000)
    ok = tmp_path / "ok.png"
    rand_rgb(20, 10).save(ok)
    expect_media_error(ok, "20x10", max_pixels=199)
    assert load_image(ok, max_pixels=200).size == (20, 10)
    assert load_image(ok, max_pixels=None).size == (20, 10)


def test_zero_size(tmp_path):
    p = png_header_only(tmp_path / "zero.png", 0, 5)
    expect_media_error(p, str(p))
    expect_media_error(Image.new("RGB", (0, 5)), "zero size")
    expect_media_error(np.zeros((5, 0, 3), np.uint8), "zero size")


def test_permission_denied(tmp_path, monkeypatch):
    p = tmp_path / "secret.png"
    rand_rgb(8, 8).save(p)
    if os.geteuid() != 0:
        p.chmod(0)
    else:
        # root reads any file regardless of mode bits: make open() fail as it would for a user.
        real_open = builtins.open

        def fake_open(file, *args, **kwargs):
            if isinstance(file, (str, os.PathLike)) and os.fspath(file) == str(p):
                raise PermissionError(13, "Permission denied", str(p))
            return real_open(file, *args, **kwargs)
        monkeypatch.setattr(builtins, "open", fake_open)
    expect_media_error(p, str(p), "permission denied")


@pytest.mark.parametrize("bad", [123, None, b"x.png", [1, 2, 3], np.zeros((4, 4, 3), np.float32),
                                 np.zeros((4, 4, 2), np.uint8), np.zeros((2, 4, 4, 3), np.uint8)])
def test_unsupported_inputs(bad):
    expect_media_error(bad, "expected", "PIL.Image.Image", "numpy")


def test_bad_alpha_option():
    with pytest.raises(ValueError):
        load_image(np.zeros((2, 2, 3), np.uint8), alpha="black")


# ---------------------------------------------------------------- agreement with transformers

def test_exif_orientation(tmp_path):
    arr = np.zeros((20, 40, 3), np.uint8)
    arr[:, :20] = (255, 0, 0)
    arr[:, 20:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    p = tmp_path / "rot.jpg"
    Image.fromarray(arr).save(p, exif=exif.tobytes(), quality=95)
    ours = load_image(p)
    ref = hf_load_image(str(p))
    assert ours.size == ref.size == (20, 40)  # upright: width and height swapped
    assert np.array_equal(np.asarray(ours), np.asarray(ref))
    # Same for an already opened PIL image.
    assert np.array_equal(np.asarray(load_image(Image.open(p))), np.asarray(ref))


def over_white(img):
    """RGB of `img` composited onto white, straight from the alpha formula."""
    rgba = np.asarray(img.convert("RGBA")).astype(float)
    alpha = rgba[..., 3:] / 255
    return np.round(rgba[..., :3] * alpha + 255 * (1 - alpha)).astype(int)


def _mode_images():
    h, w = 13, 17
    rgba = RNG.integers(0, 256, (h, w, 4), dtype=np.uint8)
    gray = RNG.integers(0, 256, (h, w), dtype=np.uint8)
    pal = Image.fromarray(RNG.integers(0, 256, (h, w, 3), dtype=np.uint8)).quantize(16)
    pal_t = pal.copy()
    pal_t.info["transparency"] = 3
    return {
        "RGBA": (Image.fromarray(rgba, "RGBA"), "png"),
        "LA": (Image.fromarray(rgba[:, :, [0, 3]], "LA"), "png"),
        "P": (pal, "png"),
        "P+transparency": (pal_t, "png"),
        "L": (Image.fromarray(gray, "L"), "png"),
        "1": (Image.fromarray(gray > 127), "png"),
        "I;16": (Image.fromarray((RNG.integers(0, 400, (h, w))).astype(np.uint16)), "png"),
        "CMYK": (Image.fromarray(rgba, "RGBA").convert("CMYK"), "tiff"),
        "RGB": (Image.fromarray(rgba[:, :, :3], "RGB"), "png"),
    }


@pytest.mark.parametrize("mode", list(_mode_images()))
def test_modes_match_transformers(tmp_path, proc, mode):
    img, ext = _mode_images()[mode]
    p = tmp_path / f"img.{ext}"
    img.save(p, transparency=img.info["transparency"]) if "transparency" in img.info else img.save(p)
    opened = Image.open(p)
    # Default: transformers.image_utils.load_image (plain .convert("RGB"), alpha dropped).
    ref_drop = np.asarray(hf_load_image(str(p)))
    assert np.array_equal(np.asarray(load_image(p)), ref_drop)
    assert np.array_equal(np.asarray(load_image(opened)), ref_drop)
    # alpha="white": transparency composited onto white (what transformers 5.23's processors do;
    # checked against the formula, since transformers changed this between 5.x releases).
    ref_white = over_white(Image.open(p))
    assert np.abs(np.asarray(load_image(p, alpha="white")).astype(int) - ref_white).max() <= 1
    # And the processor, fed our image, leaves it as is (it is already RGB).
    assert np.array_equal(proc.convert_to_rgb(load_image(p)), ref_drop)
    assert load_image(p).mode == "RGB"
    if mode in ("RGBA", "LA", "P+transparency"):
        assert not np.array_equal(ref_white, ref_drop)  # the two policies are really exercised


def test_numpy_inputs(proc):
    h, w = 7, 9  # neither 1, 3 nor 4, so transformers infers channels-last unambiguously
    rgb = RNG.integers(0, 256, (h, w, 3), dtype=np.uint8)
    assert np.array_equal(np.asarray(load_image(rgb)), rgb)
    rgba = RNG.integers(0, 256, (h, w, 4), dtype=np.uint8)
    assert np.array_equal(np.asarray(load_image(rgba)), rgba[:, :, :3])
    white = np.asarray(load_image(rgba, alpha="white")).astype(int)
    assert np.abs(white - over_white(Image.fromarray(rgba, "RGBA"))).max() <= 1
    gray = RNG.integers(0, 256, (h, w), dtype=np.uint8)
    expected = np.asarray(Image.fromarray(gray, "L").convert("RGB"))
    assert np.array_equal(np.asarray(load_image(gray)), expected)
    assert np.array_equal(np.asarray(load_image(gray[:, :, None])), expected)


# ---------------------------------------------------------------- pixel helpers

@pytest.mark.parametrize("src,dst", [((50, 37), (28, 28)), ((13, 29), (41, 17)), ((336, 336), (336, 336))])
def test_resize_bicubic_matches_transformers(proc, src, dst):
    img = rand_rgb(*src)
    chw = np.moveaxis(np.asarray(img), -1, 0)
    ref = proc.resize(chw, SizeDict(height=dst[1], width=dst[0]), resample=PILImageResampling.BICUBIC)
    ours = np.moveaxis(np.asarray(resize_bicubic(img, dst)), -1, 0)
    assert ours.shape == ref.shape and np.array_equal(ours, ref)


@pytest.mark.parametrize("mean,std", [(CLIP_MEAN, CLIP_STD), (SIGLIP_MEAN, SIGLIP_STD)])
def test_normalize_matches_transformers(proc, mean, std):
    every_level = np.stack([RNG.permutation(256) for _ in range(3)], -1).astype(np.uint8).reshape(16, 16, 3)
    for img in (rand_rgb(31, 23), Image.fromarray(every_level)):
        chw = np.moveaxis(np.asarray(img), -1, 0)
        ref = proc.normalize(proc.rescale(chw, 1 / 255), mean, std)
        for src in (img, np.asarray(img)):
            ours = to_normalized_tensor(src, mean, std)
            assert ours.dtype == torch.float32 and tuple(ours.shape) == (3, img.height, img.width)
            assert np.array_equal(ours.numpy(), ref)  # same float64/float32 steps: bit-identical


def test_constants():
    from transformers.image_utils import (IMAGENET_STANDARD_MEAN, IMAGENET_STANDARD_STD, OPENAI_CLIP_MEAN,
                                          OPENAI_CLIP_STD)
    assert list(CLIP_MEAN) == list(OPENAI_CLIP_MEAN) and list(CLIP_STD) == list(OPENAI_CLIP_STD)
    assert list(SIGLIP_MEAN) == list(IMAGENET_STANDARD_MEAN) and list(SIGLIP_STD) == list(IMAGENET_STANDARD_STD)
