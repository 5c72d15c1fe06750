"""LLaVA-NeXT "anyres" preprocessing, token counting and feature packing (pure functions).

Reproduces, in transformers' (height, width) convention for `image_grid_pinpoints`:
  * `LlavaNextImageProcessorPil` pixel values: best pinpoint -> aspect-preserving bicubic resize
    -> black padding (centred, odd pixel bottom/right) -> row-major tiles, after a base image
    squashed to tile x tile (spec §1.6);
  * `LlavaNextModel.pack_image_features` / `unpad_image`: stitch tile features, crop the rows or
    columns that only saw padding, add a newline column, flatten, prepend the base (§1.7);
  * `LlavaNextProcessor._get_number_of_features` token counts (§1.8).

Counting and cropping share `unpadded_grid`, and `pack` is implemented with `pack_index`, so the
placeholder count and the packed features cannot disagree (spec pitfall P6). The float
expressions (`min(w/W, h/H)`, `ceil`, `round(x, 7)`) are written exactly as transformers
evaluates them, so ties and off-by-one cases fall the same way.
"""
import math
from dataclasses import dataclass

import torch
from PIL import Image

from tinyvila.media import resize_bicubic, to_normalized_tensor

# llava-hf/llava-v1.6-* image_grid_pinpoints, (height, width) pairs.
LLAVA_NEXT_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]


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


def pack_index(image_size, grid, patches_per_side, newline=True):
    """Source of every packed position: index into the flat [(1 + rows*cols) * P*P] token list
    (base tokens first, then tile 0, tile 1, ...), or -1 for an image_newline position."""
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
