"""Qwen2.5-VL preprocessing (models/qwen2_5_vl.py): images against transformers 5.x `Qwen2VLImageProcessorPil` (test-only
dependency); sizes, frame sampling and video budget against hand-computed values of the spec's
formulas (qwen2_5_vl.md §3, §4, §12); video patch layout against an explicit loop."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from fixtures_images import draw_image
from tinyvila.errors import MediaError
from tinyvila.media import CLIP_MEAN, CLIP_STD, open_video
from tinyvila.models import qwen2_5_vl as qp
from tinyvila.models.qwen2_5_vl import (QwenMediaError, num_tokens, patchify, preprocess_image,
                                             preprocess_video, resize_frames_bicubic, sample_video,
                                             sampled_fps, smart_resize, video_frame_indices,
                                             video_num_frames, video_pixel_budget)

import transformers  # noqa: E402  (the reference: a test dependency, never skipped)
# 5.2x names the PIL-backed processor Qwen2VLImageProcessorPil; earlier 5.x's slow processor is it.
HFImageProcessor = (getattr(transformers, "Qwen2VLImageProcessorPil", None)
                    or transformers.Qwen2VLImageProcessor)
try:
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as hf_smart_resize
except ImportError:  # releases without the _pil module keep it next to the slow processor
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize as hf_smart_resize

MIN_PX, MAX_PX = 3136, 12845056


def hf_process(img, min_pixels, max_pixels):
    proc = HFImageProcessor(min_pixels=min_pixels, max_pixels=max_pixels)
    out = proc(images=[img], return_tensors="np")
    return out["pixel_values"], out["image_grid_thw"]


# ---------------------------------------------------------------------------------------------
# Images vs transformers

IMAGE_CASES = [
    # (width, height, min_pixels, max_pixels)
    (70, 50, MIN_PX, MAX_PX),            # small: 56x84 < min_pixels -> scaled up
    (9, 11, MIN_PX, MAX_PX),             # tiny, both sides round to 0
    (640, 480, MIN_PX, MAX_PX),          # plain rounding, no bound hit
    (1000, 800, MIN_PX, 200 * 28 * 28),  # big with a small max_pixels -> floor branch
    (3990, 20, MIN_PX, MAX_PX),          # aspect 199.5; 3990/28 = 142.5 rounds half to even
    (20, 3990, MIN_PX, MAX_PX),          # the same, portrait
    (2000, 13, MIN_PX, MAX_PX),          # aspect 153.8, short side rounds to 0 (transformers' branch)
    (5000, 25, 256 * 28 * 28, 300 * 28 * 28),  # aspect 200 exactly, max clamp keeps 28
    (333, 517, 256 * 28 * 28, 1280 * 28 * 28),  # README-style bounds, odd sizes
]


@pytest.mark.parametrize("w,h,min_pixels,max_pixels", IMAGE_CASES)
def test_image_matches_transformers(w, h, min_pixels, max_pixels):
    img = draw_image(w, h, seed=w * 7 + h)
    ref_pv, ref_grid = hf_process(img, min_pixels, max_pixels)
    pv, grid = preprocess_image(img, min_pixels, max_pixels)
    assert tuple(ref_grid[0].tolist()) == grid
    assert pv.dtype == torch.float32
    assert pv.shape == ref_pv.shape == (grid[0] * grid[1] * grid[2], 1176)
    np.testing.assert_allclose(pv.numpy(), ref_pv, rtol=0, atol=1e-5)


def test_image_rows_are_merge_units_and_time_duplicated():
    img = draw_image(56, 84, seed=3)  # already multiples of 28: no resize
    pv, grid = preprocess_image(img)
    assert grid == (1, 6, 4)
    x = pv.view(-1, 3, 2, 14, 14)
    assert torch.equal(x[:, :, 0], x[:, :, 1])  # both temporal frames are the image
    # Row 1 is the top-right patch of the first 2x2 unit: pixels y 0..13, x 14..27.
    ref = torch.tensor(np.asarray(img), dtype=torch.float64).permute(2, 0, 1) / 255
    ref = ((ref - torch.tensor(CLIP_MEAN, dtype=torch.float64).view(3, 1, 1))
           / torch.tensor(CLIP_STD, dtype=torch.float64).view(3, 1, 1))
    torch.testing.assert_close(x[1, :, 0].double(), ref[:, 0:14, 14:28], rtol=0, atol=1e-5)
    torch.testing.assert_close(x[2, :, 0].double(), ref[:, 14:28, 0:14], rtol=0, atol=1e-5)
    # Row 4 starts the second unit of the first unit row: x 28..41.
    torch.testing.assert_close(x[4, :, 0].double(), ref[:, 0:14, 28:42], rtol=0, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# smart_resize

@pytest.mark.parametrize("size,max_pixels,resized,grid,tokens", [
    ((1344, 1344), MAX_PX, (1344, 1344), (1, 96, 96), 2304),
    ((448, 448), MAX_PX, (448, 448), (1, 32, 32), 256),
    ((1080, 1920), MAX_PX, (1092, 1932), (1, 78, 138), 2691),
    ((1344, 1344), 1280 * 28 * 28, (980, 980), (1, 70, 70), 1225),
])
def test_smart_resize_spec_table(size, max_pixels, resized, grid, tokens):
    h, w = smart_resize(*size, 28, MIN_PX, max_pixels)
    assert (h, w) == resized
    assert (1, h // 14, w // 14) == grid
    assert num_tokens(grid) == tokens


def test_smart_resize_rounds_half_to_even():
    assert smart_resize(70, 700) == (56, 700)     # 70/28 = 2.5 -> 2, not 3
    assert smart_resize(98, 700) == (112, 700)    # 3.5 -> 4
    assert smart_resize(20, 3990) == (28, 3976)   # 3990/28 = 142.5 -> 142


def test_smart_resize_small_side_as_transformers():
    # A side under 14 px rounds to 0, so the min_pixels branch decides (transformers 5.23);
    # qwen-vl-utils would clamp it to 28 first and give (28, 1988).
    assert smart_resize(13, 2000) == (28, 700) == hf_smart_resize(13, 2000, 28, MIN_PX, MAX_PX)
    # The max branch never goes under one factor: 28 x 5600 with a 100k budget gives beta 1.252,
    # h = max(28, floor(0.80) * 28) = 28, w = floor(159.7) * 28 = 4452 (over the budget, as there).
    assert smart_resize(28, 5600, 28, MIN_PX, 100_000) == (28, 4452) == \
        hf_smart_resize(28, 5600, 28, MIN_PX, 100_000)


def test_smart_resize_matches_transformers_on_random_sizes():
    rng = np.random.default_rng(7)
    for _ in range(200):
        long = int(rng.integers(1, 6000))
        short = max(1, int(long / rng.uniform(1, 200)))
        h, w = (short, long) if rng.random() < 0.5 else (long, short)
        if long / short > 200:
            with pytest.raises(ValueError):
                hf_smart_resize(h, w, 28, 3136, 12845056)
            with pytest.raises(QwenMediaError):
                smart_resize(h, w)
            continue
        min_pixels = int(rng.choice([3136, 56 * 56, 128 * 28 * 28, 256 * 28 * 28]))
        max_pixels = int(rng.choice([12845056, 1003520, 602112, 200 * 28 * 28, min_pixels * 2]))
        assert smart_resize(h, w, 28, min_pixels, max_pixels) == \
            hf_smart_resize(h, w, factor=28, min_pixels=min_pixels, max_pixels=max_pixels), (h, w)


def test_smart_resize_aspect_ratio_limit():
    assert smart_resize(10, 2000) == hf_smart_resize(10, 2000, 28, MIN_PX, MAX_PX)  # exactly 200
    with pytest.raises(ValueError):
        hf_smart_resize(10, 2001, 28, MIN_PX, MAX_PX)
    with pytest.raises(QwenMediaError) as e:
        smart_resize(10, 2001)
    assert isinstance(e.value, ValueError) and isinstance(e.value, MediaError)
    msg = str(e.value)
    assert "\n" not in msg and "2001x10" in msg and "200" in msg
    with pytest.raises(MediaError):
        preprocess_image(Image.new("RGB", (4020, 20)))


# ---------------------------------------------------------------------------------------------
# Frame sampling (qwen-vl-utils smart_nframes; hand-computed)

def test_frame_indices_ten_seconds_at_30fps():
    # n = 300 / 30 * 2 = 20; round(linspace(0, 299, 20)), step 299/19 = 15.74.
    idx = video_frame_indices(300, 30.0)
    assert idx == [0, 16, 31, 47, 63, 79, 94, 110, 126, 142, 157, 173, 189, 205, 220, 236, 252, 268,
                   283, 299]
    assert sampled_fps(len(idx), 300, 30.0) == pytest.approx(2.0)


def test_frame_indices_short_clips():
    # 3 frames: n = 0.2 -> max(., 4) = 4 -> min(., floor2(3) = 2) -> 2 frames, the first and last.
    assert video_frame_indices(3, 30.0) == [0, 2]
    assert sampled_fps(2, 3, 30.0) == pytest.approx(20.0)
    assert video_frame_indices(2, 30.0) == [0, 1]
    # 5 frames at 1 fps: n = 10 -> min(10, floor2(5) = 4); linspace(0, 4, 4) = 0, 1.33, 2.67, 4.
    assert video_frame_indices(5, 1.0) == [0, 1, 3, 4]
    # 4 s at 2.5 fps -> n = 8 exactly
    assert video_num_frames(10, 2.5) == 8


def test_frame_indices_long_clip_is_capped():
    total = 2 * 3600 * 30  # two hours at 30 fps: n = 14400 -> 768
    idx = video_frame_indices(total, 30.0)
    assert len(idx) == 768
    assert idx[:3] == [0, 282, 563] and idx[-1] == total - 1  # step 215999/767 = 281.6
    assert sampled_fps(768, total, 30.0) == pytest.approx(768 / total * 30)
    assert all(b > a for a, b in zip(idx, idx[1:]))


def test_frame_indices_overrides():
    # One minute at 25 fps: n = 120 at 2 fps; 60 at 1 fps; max_frames=33 -> floor2 -> 32.
    assert video_num_frames(1500, 25.0) == 120
    assert video_num_frames(1500, 25.0, fps=1.0) == 60
    assert video_num_frames(1500, 25.0, max_frames=33) == 32
    assert video_frame_indices(1500, 25.0, max_frames=4) == [0, 500, 999, 1499]
    # min_frames is rounded up to even: 5 -> 6 (1 s at 2 fps would be 2 frames).
    assert video_num_frames(30, 30.0, min_frames=5) == 6
    # nframes given: round(n / 2) * 2, half to even: 5 -> 4, 7 -> 8.
    assert video_num_frames(100, 30.0, nframes=5) == 4
    assert video_num_frames(100, 30.0, nframes=7) == 8
    # 29.97 fps, 1000 frames: n = 66.73 -> 66.
    assert video_num_frames(1000, 29.97) == 66


def test_one_frame_video_is_refused():
    # qwen-vl-utils: max_frames = floor2(min(768, 1)) = 0 -> n = 0 -> ValueError.
    with pytest.raises(QwenMediaError) as e:
        video_frame_indices(1, 30.0)
    assert isinstance(e.value, ValueError) and "\n" not in str(e.value) and "1 frame" in str(e.value)
    with pytest.raises(QwenMediaError):
        video_num_frames(100, 30.0, nframes=200)  # more than the video has


# ---------------------------------------------------------------------------------------------
# Per-frame pixel budget (qwen-vl-utils fetch_video)

def test_video_pixel_budget():
    # Spec §12: 64 frames -> min(602112, 90316800 / 64 * 2 = 2822400) = 602112.
    assert video_pixel_budget(64) == (100352, 602112)
    h, w = smart_resize(448, 448, 28, *video_pixel_budget(64))
    assert (h, w) == (448, 448)
    grid = (64 // 2, h // 14, w // 14)
    assert grid == (32, 32, 32) and num_tokens(grid) == 8192
    # 1000 frames: 90316800 / 1000 * 2 = 180633.6 (a float, as qwen-vl-utils keeps it).
    assert video_pixel_budget(1000)[1] == pytest.approx(180633.6)
    # 2000 frames: 90316.8 is under the floor int(100352 * 1.05) = 105369.
    assert video_pixel_budget(2000)[1] == 105369
    # A user max_pixels caps it, a larger one does not raise it.
    assert video_pixel_budget(64, max_pixels=200_000)[1] == 200_000
    assert video_pixel_budget(64, max_pixels=10**7)[1] == 602112
    assert video_pixel_budget(64, min_pixels=3136, total_pixels=64 * 1000)[1] == 3292  # int(3136*1.05)


# ---------------------------------------------------------------------------------------------
# Video patchify, resize, preprocess

def test_patchify_layout_matches_explicit_loop():
    t, c, h, w = 4, 3, 56, 84
    frames = torch.arange(t * c * h * w, dtype=torch.float32).view(t, c, h, w)
    rows, grid = patchify(frames)
    gt, gh, gw = grid
    assert grid == (2, 4, 6) and rows.shape == (48, 3 * 2 * 14 * 14)
    r = 0
    for ti in range(gt):
        for uy in range(gh // 2):
            for ux in range(gw // 2):
                for my in range(2):
                    for mx in range(2):
                        y0, x0 = (uy * 2 + my) * 14, (ux * 2 + mx) * 14
                        ref = torch.stack([frames[ti * 2 + k, :, y0:y0 + 14, x0:x0 + 14] for k in range(2)], 1)
                        assert torch.equal(rows[r], ref.reshape(-1)), r  # (c, frame, py, px)
                        r += 1
    assert r == rows.shape[0]


def test_resize_rounds_like_torchvision():
    # Bicubic weights sum to 1, so a flat frame stays flat only if the float result is rounded
    # (truncation turns 199.99998 into 199), as torchvision's v1 tensor resize does.
    for value in (1, 77, 128, 200, 255):
        flat = torch.full((1, 3, 48, 64), value, dtype=torch.uint8)
        for size in ((84, 112), (28, 56), (48, 64)):
            out = resize_frames_bicubic(flat, *size)
            assert out.dtype == torch.uint8 and out.shape[-2:] == size
            assert torch.all(out == value), (value, size)
    # Same size: returned as is (torchvision returns the input unchanged).
    x = torch.randint(0, 256, (2, 3, 28, 56), dtype=torch.uint8)
    assert resize_frames_bicubic(x, 28, 56) is x
    # Overshoot at sharp edges is clamped, not wrapped.
    edge = torch.zeros(1, 3, 8, 8, dtype=torch.uint8)
    edge[..., 4:] = 255
    f = F.interpolate(edge.float(), size=(8, 40), mode="bicubic", align_corners=False, antialias=True)
    assert f.max() > 255 and f.min() < 0  # the float result rings ...
    out = resize_frames_bicubic(edge, 8, 40)
    assert torch.equal(out, f.clamp(0, 255).round().to(torch.uint8))  # ... the uint8 one is clamped


def test_resize_is_close_to_pil_bicubic():
    # torch's antialiased bicubic follows PIL's filter (a = -0.5, support scaled when shrinking);
    # PIL rounds to uint8 between its two passes, so pixels differ a little, never on average.
    for (w, h), (nw, nh) in [((640, 480), (224, 168)), ((97, 61), (56, 28)), ((64, 48), (112, 84))]:
        img = draw_image(w, h, seed=w)
        x = torch.from_numpy(np.array(img)).permute(2, 0, 1)[None]
        ours = resize_frames_bicubic(x, nh, nw)[0].permute(1, 2, 0).numpy().astype(int)
        pil = np.asarray(img.resize((nw, nh), Image.Resampling.BICUBIC)).astype(int)
        d = np.abs(ours - pil)
        assert d.mean() < 0.4 and np.percentile(d, 99) <= 3, (w, h, d.mean())


def synthetic_frames(n, w, h):
    return [draw_image(w, h, seed=100 + i) for i in range(n)]


def test_preprocess_video_grid_tokens_padding():
    frames = synthetic_frames(5, 100, 60)
    pv, grid, spg = preprocess_video(frames, fps_sampled=2.0, min_pixels=3136)
    # smart_resize(60, 100): round -> 56 x 112 = 6272 px, within [3136, 602112].
    # 5 frames padded to 6 -> grid_t 3.
    assert grid == (3, 4, 8) and num_tokens(grid) == 24
    assert pv.shape == (3 * 4 * 8, 1176) and pv.dtype == torch.float32
    assert spg == 1.0
    x = pv.view(3, 32, 3, 2, 14, 14)  # (slice, row in slice, c, frame, py, px)
    assert torch.equal(x[2, :, :, 0], x[2, :, :, 1])  # last slice: frame 4 and its repeat
    assert not torch.equal(x[0, :, :, 0], x[0, :, :, 1])  # frames 0 and 1 differ
    assert not torch.equal(x[1, :, :, 1], x[2, :, :, 0])  # frame 3 vs frame 4


def test_preprocess_video_default_budget_and_fps():
    frames = synthetic_frames(4, 100, 60)
    pv, grid, spg = preprocess_video(frames, fps_sampled=0.5)
    # Default per-frame bounds [100352, 602112]: 6272 < 100352 -> beta = sqrt(100352 / 6000);
    # h = ceil(60 * 4.0897 / 28) * 28 = 252, w = ceil(100 * 4.0897 / 28) * 28 = 420.
    assert grid == (2, 18, 30) and num_tokens(grid) == 270
    assert spg == 4.0  # temporal_patch_size / fps = 2 / 0.5


def test_preprocess_video_applies_the_total_budget():
    # 1000 frames would get 180633.6 px each; 600 x 800 frames are 480000 px -> scaled down:
    # beta = sqrt(480000 / 180633.6) = 1.630; h = floor(600 / 1.630 / 28) * 28 = 364,
    # w = floor(800 / 1.630 / 28) * 28 = 476. Checked on the size alone (no 1000-frame clip):
    assert smart_resize(600, 800, 28, *video_pixel_budget(1000)) == (364, 476)
    # Through preprocess_video with a small total budget: 4 frames of 64x48 and total_pixels
    # 4 * 3136 / 2 -> per-frame max max(min(602112, 3136), int(3136 * 1.05) = 3292) = 3292.
    frames = synthetic_frames(4, 64, 48)
    _, grid, _ = preprocess_video(frames, 2.0, min_pixels=3136, max_pixels=10**7, total_pixels=4 * 3136 // 2)
    assert smart_resize(48, 64, 28, 3136, 3292) == (56, 56) and grid == (2, 4, 4)
    # Without the total budget the bounds alone decide: min 100352 scales 48x64 up, beta =
    # sqrt(100352 / 3072) = 5.716, h = ceil(9.80) * 28 = 280, w = ceil(13.06) * 28 = 392.
    _, grid, _ = preprocess_video(frames, 2.0, total_pixels=None)
    assert grid == (2, 20, 28)


def test_preprocess_video_of_unresized_frames_equals_image_processor():
    # Two identical frames already at a valid size go through no resize: the rows must then be
    # those of the image processor (an image is a two-frame clip of itself).
    img = draw_image(112, 84, seed=5)
    ref_pv, ref_grid = hf_process(img, MIN_PX, MAX_PX)
    pv, grid, _ = preprocess_video([img, img], 2.0, min_pixels=MIN_PX, max_pixels=MAX_PX,
                                   total_pixels=None)
    assert grid == tuple(ref_grid[0].tolist()) == (1, 6, 8)
    np.testing.assert_allclose(pv.numpy(), ref_pv, rtol=0, atol=1e-5)


def test_preprocess_video_frames_are_resized_from_torchvision_rounding():
    # Every frame is resized once to the clip size with resize_frames_bicubic, then normalised.
    frames = synthetic_frames(2, 90, 50)
    pv, grid, _ = preprocess_video(frames, 2.0, min_pixels=3136, max_pixels=50 * 28 * 28)
    h, w = smart_resize(50, 90, 28, 3136, 50 * 28 * 28)
    assert grid == (1, h // 14, w // 14)
    u8 = torch.stack([torch.from_numpy(np.array(f)).permute(2, 0, 1) for f in frames])
    ref = resize_frames_bicubic(u8, h, w).double() / 255
    ref = (ref - torch.tensor(CLIP_MEAN, dtype=torch.float64).view(1, 3, 1, 1)) / \
        torch.tensor(CLIP_STD, dtype=torch.float64).view(1, 3, 1, 1)
    ref_rows, _ = patchify(ref)
    torch.testing.assert_close(pv.double(), ref_rows, rtol=0, atol=1e-5)
    # numpy frames give the same result
    pv2, _, _ = preprocess_video([np.array(f) for f in frames], 2.0, min_pixels=3136, max_pixels=50 * 28 * 28)
    assert torch.equal(pv, pv2)


def test_preprocess_video_rejects_mixed_sizes():
    with pytest.raises(ValueError):
        preprocess_video([draw_image(64, 48), draw_image(48, 64)], 2.0)


def test_sample_video_from_frame_list_and_file_like():
    frames = synthetic_frames(3, 64, 48)
    video = open_video(frames)
    got, fps = sample_video(video)
    assert got == video.frames(range(3)) and fps == 2.0
    pv, grid, spg = preprocess_video(got, fps, min_pixels=3136)
    assert grid == (2, 4, 4) and spg == 1.0  # 3 frames padded to 4; 48x64 -> 56x56

    class FakeFile:  # a 10 s, 30 fps file
        kind, name, num_frames, fps = "file", "clip.mp4", 300, 30.0

        def frames(self, idx):
            self.asked = list(idx)
            return [frames[0]] * len(self.asked)
    f = FakeFile()
    got, fps = sample_video(f)
    assert f.asked == video_frame_indices(300, 30.0) and len(got) == 20 and fps == pytest.approx(2.0)
    f.num_frames = 1
    with pytest.raises(QwenMediaError, match="clip.mp4"):
        sample_video(f)


def test_module_has_no_transformers_import():
    import ast
    import inspect
    tree = ast.parse(inspect.getsource(qp))
    names = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    names |= {(n.module or "").split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert "transformers" not in names and "torchvision" not in names
    assert math.isclose(qp.VIDEO_TOTAL_PIXELS, 90316800)
