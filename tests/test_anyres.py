"""LLaVA-NeXT anyres preprocessing (models/llava_next.py) against transformers 5.x LLaVA-NeXT (test-only dependency)."""
import functools
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from tinyvila.media import CLIP_MEAN, CLIP_STD
from tinyvila.models import llava_next as anyres
from tinyvila.models.llava_next import DEFAULT_PINPOINTS as LLAVA_NEXT_PINPOINTS

from transformers import LlavaNextProcessor  # noqa: E402

from fixtures_llava import pil_image_processor  # noqa: E402

LlavaNextImageProcessorPil = pil_image_processor()
from transformers.models.llava_next import modeling_llava_next as hf_model  # noqa: E402

RNG = np.random.default_rng(7)


def pinpoints(t):
    return [[t, 2 * t], [2 * t, t], [2 * t, 2 * t], [3 * t, t], [t, 3 * t]]


def hf_processor(tile, pp):
    return LlavaNextImageProcessorPil(image_grid_pinpoints=pp, size={"shortest_edge": tile},
                                      crop_size={"height": tile, "width": tile})


def smooth_image(w, h):
    """Random noise plus a gradient, so resize / pad / tile order mistakes show."""
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([xx * 255 // max(w, 1), yy * 255 // max(h, 1), (xx + yy) % 256], -1)
    noise = RNG.integers(0, 64, (h, w, 3))
    return Image.fromarray(((base + noise) % 256).astype(np.uint8))


def hf_num_features(H, W, tile, patch, pp):
    """LlavaNextProcessor._get_number_of_features on a stub (no tokenizer needed), 'default'
    strategy (CLS counted then removed, as LlavaNextProcessor does)."""
    stub = SimpleNamespace(image_processor=SimpleNamespace(image_grid_pinpoints=pp), patch_size=patch,
                           num_additional_image_tokens=1)
    stub._get_unpadded_features = functools.partial(LlavaNextProcessor._get_unpadded_features, stub)
    return LlavaNextProcessor._get_number_of_features(stub, H, W, tile, tile) - 1


def hf_pack(feats, H, W, tile, patch, pp, newline):
    """LlavaNextModel.pack_image_features with a stub `self` holding only the config it reads."""
    cfg = SimpleNamespace(vision_config=SimpleNamespace(image_size=tile, patch_size=patch),
                          image_grid_pinpoints=pp)
    out, lens = hf_model.LlavaNextModel.pack_image_features(
        SimpleNamespace(config=cfg), [feats], torch.tensor([[H, W]]), "default", newline)
    assert int(lens[0]) == out[0].shape[0]
    return out[0]


# W x H; includes the sizes where int(x) and int(round(x, 7)) give different crops.
SMALL_SIZES = [(10, 300), (300, 10), (20, 20), (28, 28), (57, 57), (97, 41), (41, 97), (61, 173),
               (200, 150), (1, 2), (55, 88), (176, 55)]


@pytest.mark.parametrize("tile", [28, 56])
def test_pixels_match_transformers_small_tile(tile):
    pp = pinpoints(tile)
    proc = hf_processor(tile, pp)
    for w, h in SMALL_SIZES:
        img = smooth_image(w, h)
        ref = proc(images=[img], return_tensors="np")
        ours = anyres.preprocess(img, pp, tile, CLIP_MEAN, CLIP_STD)
        pv = ref["pixel_values"][0]
        assert ours.pixels.dtype == torch.float32
        assert tuple(ours.pixels.shape) == pv.shape, (w, h)
        assert np.abs(ours.pixels.numpy() - pv).max() <= 1e-5, (w, h)
        assert ours.image_size == tuple(int(v) for v in ref["image_sizes"][0]) == (h, w)
        rows, cols = ours.grid
        assert 1 + rows * cols == pv.shape[0]
        assert hf_model.get_anyres_image_grid_shape([h, w], pp, tile) == (rows, cols)


def test_pixels_match_transformers_real_size():
    pp = LLAVA_NEXT_PINPOINTS
    img = smooth_image(672, 480)
    ref = hf_processor(336, pp)(images=[img], return_tensors="np")["pixel_values"][0]
    ours = anyres.preprocess(img, pp, 336, CLIP_MEAN, CLIP_STD)
    assert ours.grid == (2, 2) and tuple(ours.pixels.shape) == ref.shape == (5, 3, 336, 336)
    assert np.abs(ours.pixels.numpy() - ref).max() <= 1e-5
    # Padding is black before normalisation: the top rows of tile 0 are (0 - mean) / std.
    pad = (672 - 480) // 2
    black = (-torch.tensor(CLIP_MEAN) / torch.tensor(CLIP_STD)).view(3, 1, 1)
    assert torch.allclose(ours.pixels[1, :, :pad, :], black.expand(3, pad, 336))
    assert not torch.allclose(ours.pixels[1, :, pad:pad + 1, :], black.expand(3, 1, 336))


# Spec §1.8 table: image W x H -> tokens (tile 336, patch 14, default llava-next pinpoints).
SPEC_TABLE = [((672, 672), 2928), ((1024, 1024), 2928), ((640, 480), 2340), ((800, 600), 2340),
              ((1024, 768), 2340), ((480, 640), 2352), ((1920, 1080), 1948), ((1080, 1920), 1968),
              ((1000, 300), 2182), ((899, 1024), 2640), ((336, 336), 1176), ((224, 224), 1176)]


@pytest.mark.parametrize("wh,tokens", SPEC_TABLE)
def test_spec_token_table(wh, tokens):
    w, h = wh
    assert anyres.num_image_tokens((h, w), LLAVA_NEXT_PINPOINTS, 336, 14) == tokens
    assert hf_num_features(h, w, 336, 14, LLAVA_NEXT_PINPOINTS) == tokens


def test_square_small_image_picks_wide_grid():
    # Pitfall P5: a tie between (336, 672) and (672, 336); transformers keeps the first.
    assert anyres.select_best_resolution(336, 336, LLAVA_NEXT_PINPOINTS) == (336, 672)
    assert anyres.grid_shape((224, 224), LLAVA_NEXT_PINPOINTS, 336) == (1, 2)


def _sizes_for_counts():
    sizes = [wh for wh, _ in SPEC_TABLE] + [(47, 1128), (55, 88), (99, 88), (176, 55), (205, 328),
                                            (1, 1), (1, 5000), (5000, 3), (333, 1001), (1279, 720)]
    sizes += [tuple(int(v) for v in RNG.integers(1, 3000, 2)) for _ in range(300)]
    return sizes


def test_token_counts_match_transformers():
    for tile, patch, pp in [(336, 14, LLAVA_NEXT_PINPOINTS), (28, 14, pinpoints(28)), (56, 14, pinpoints(56))]:
        for w, h in _sizes_for_counts():
            ours = anyres.num_image_tokens((h, w), pp, tile, patch)
            assert ours == hf_num_features(h, w, tile, patch, pp), (tile, w, h)
            P = tile // patch
            assert anyres.num_image_tokens((h, w), pp, tile, patch, newline=False) == ours - \
                anyres.unpadded_grid((h, w), anyres.grid_shape((h, w), pp, tile), P)[0]


def test_unpadded_grid_matches_unpad_image():
    for w, h in _sizes_for_counts():
        for grid in [(1, 2), (2, 1), (2, 2), (1, 3), (3, 1)]:
            P = 24
            dummy = torch.zeros(1, grid[0] * P, grid[1] * P)
            ref = hf_model.unpad_image(dummy, torch.tensor([h, w]))
            nh, nw, top, left = anyres.unpadded_grid((h, w), grid, P)
            assert (nh, nw) == tuple(ref.shape[1:]), (w, h, grid)
            # Symmetric crop: same number removed at both ends.
            assert grid[0] * P - nh == 2 * top and grid[1] * P - nw == 2 * left


@pytest.mark.parametrize("tile,patch,pp", [(336, 14, LLAVA_NEXT_PINPOINTS), (28, 14, pinpoints(28)),
                                           (56, 14, pinpoints(56))])
def test_pack_matches_transformers(tile, patch, pp):
    P, C = tile // patch, 5
    sizes = [(672, 480), (480, 672), (1000, 300), (300, 1000), (336, 336), (899, 1024), (55, 88),
             (176, 55), (47, 1128), (1920, 1080), (61, 173)]
    for w, h in sizes:
        rows, cols = anyres.grid_shape((h, w), pp, tile)
        feats = torch.randn(1 + rows * cols, P * P, C, dtype=torch.float64)
        newline = torch.randn(C, dtype=torch.float64)
        for nl in (newline, None):
            ref = hf_pack(feats, h, w, tile, patch, pp, nl)
            ours = anyres.pack(feats[0], feats[1:], (h, w), (rows, cols), nl)
            assert ours.shape == ref.shape and torch.equal(ours, ref), (w, h, nl is None)
        assert ours.shape[0] + anyres.unpadded_grid((h, w), (rows, cols), P)[0] == \
            anyres.num_image_tokens((h, w), pp, tile, patch)


def test_pack_index_consistency():
    P = 4
    for (h, w), grid in [((480, 672), (2, 2)), ((300, 1000), (1, 3)), ((1000, 300), (3, 1)),
                         ((88, 55), (2, 2)), ((10, 10), (1, 2))]:
        nh, nw, top, left = anyres.unpadded_grid((h, w), grid, P)
        idx = anyres.pack_index((h, w), grid, P)
        n_src = (1 + grid[0] * grid[1]) * P * P
        assert idx.dtype == torch.long and idx.shape[0] == P * P + nh * (nw + 1)
        assert torch.equal(idx[:P * P], torch.arange(P * P))
        body = idx[P * P:].view(nh, nw + 1)
        assert (body[:, -1] == -1).all() and (body[:, :-1] >= P * P).all() and (body[:, :-1] < n_src).all()
        real = body[:, :-1].reshape(-1)
        assert real.unique().numel() == real.numel()
        # Feed each source its own index as feature: pack must reproduce pack_index.
        feats = torch.arange(n_src, dtype=torch.float32).view(-1, P * P, 1)
        packed = anyres.pack(feats[0], feats[1:], (h, w), grid, torch.tensor([-1.0]))
        assert torch.equal(packed[:, 0].long(), idx)
        # Without newline: the same sources, minus the -1 column.
        assert torch.equal(anyres.pack_index((h, w), grid, P, newline=False), idx[idx >= 0])
        # Top-left kept position of the stitched map comes from the right tile and patch.
        y, x = top, left
        tile = (y // P) * grid[1] + x // P
        assert int(body[0, 0]) == (1 + tile) * P * P + (y % P) * P + (x % P)


def test_bad_inputs():
    # Extreme aspect: every candidate keeps 0 px, the first one wins the tie (as transformers).
    assert anyres.select_best_resolution(1, 100000, LLAVA_NEXT_PINPOINTS) == (336, 672)
    with pytest.raises(ValueError):
        anyres.select_best_resolution(10, 10, [])
    with pytest.raises(ValueError):
        anyres.grid_shape((10, 10), [[336, 600]], 336)
    with pytest.raises(ValueError):
        anyres.preprocess(Image.new("RGBA", (4, 4)), pinpoints(28), 28, CLIP_MEAN, CLIP_STD)
    with pytest.raises(ValueError):
        anyres.pack(torch.zeros(4, 2), torch.zeros(3, 4, 2), (10, 10), (1, 2), None)
