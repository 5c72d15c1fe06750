"""Image loading and small pixel helpers shared by the model preprocessors.

`load_image` turns a path, a PIL image or a uint8 numpy array into an upright RGB PIL image,
the way transformers 5.x hands images to its PIL-backend image processors:

* EXIF orientation applied (`ImageOps.exif_transpose`, as `transformers.image_utils.load_image`);
* conversion to RGB by `.convert("RGB")`, dropping any alpha band: what
  `transformers.image_utils.load_image(path)` does before the processor sees the image, and what
  the original LLaVA / VILA loaders do. `alpha="white"` instead composites transparency onto white,
  as transformers 5.23's processors do for an RGBA image handed to them directly.

Every user-caused problem (missing, empty, corrupt, truncated, oversized file ...) raises
`MediaError` with one line naming the file. The full decode happens here, so a truncated
file fails now, not halfway through a model call. PIL's global settings are never changed.

`resize_bicubic` and `to_normalized_tensor` reproduce the resize / rescale / normalise steps of
transformers' PIL backend bit for bit (uint8 PIL bicubic; x/255 in float64 then float32;
(x - mean) / std in float32).
"""
import os
import warnings

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import MediaError

# OpenAI CLIP and SigLIP normalisation constants (transformers OPENAI_CLIP_* / IMAGENET_STANDARD_*).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
SIGLIP_MEAN = (0.5, 0.5, 0.5)
SIGLIP_STD = (0.5, 0.5, 0.5)

# PIL raises DecompressionBombError above 2 * Image.MAX_IMAGE_PIXELS (default 89478485).
# Our own limit is a literal so that it does not depend on PIL's (global, mutable) setting.
DEFAULT_MAX_PIXELS = 178956970

_ACCEPTED = ("a file path (str or pathlib.Path), a PIL.Image.Image, or a uint8 numpy array "
             "of shape HxW, HxWx1, HxWx3 or HxWx4")


def _fail(name, reason):
    # One line, whatever the underlying library put in its message.
    reason = " ".join(str(reason).split())
    return MediaError(f"cannot read image '{name}': {reason}")


def _check_size(name, width, height, max_pixels):
    if width <= 0 or height <= 0:
        raise _fail(name, f"image has zero size ({width}x{height} pixels)")
    if max_pixels is not None and width * height > max_pixels:
        raise _fail(name, f"image is {width}x{height} = {width * height} pixels, over the limit "
                          f"of {max_pixels} pixels (possible decompression bomb)")


def _pil_to_rgb(img, alpha):
    """transformers `convert_to_rgb` for PIL input (alpha="white"), or plain convert (drop)."""
    has_alpha = "A" in img.getbands() or img.info.get("transparency") is not None
    if alpha == "white" and has_alpha:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    rgb = img.convert("RGB")
    rgb.info.pop("transparency", None)  # PIL carries it over; the pixels are plain RGB now
    return rgb


def _array_to_rgb(arr, alpha, max_pixels):
    """uint8 HxW / HxWx{1,3,4} array -> RGB PIL image (transformers' numpy convert_to_rgb)."""
    name = "<numpy array>"
    if arr.dtype != np.uint8 or arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] not in (1, 3, 4)):
        raise MediaError(f"cannot use numpy array of dtype {arr.dtype} and shape {arr.shape} as an "
                         f"image: expected {_ACCEPTED}")
    _check_size(name, arr.shape[1], arr.shape[0], max_pixels)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.shape[2] == 1:
        arr = np.repeat(arr, 3, axis=2)
    elif arr.shape[2] == 4:
        if alpha == "white":
            # Same float64 blend and rounding as transformers.image_transforms.convert_to_rgb.
            a = arr[:, :, 3:4] / 255
            arr = np.round(a * arr[:, :, :3] + (1 - a) * 255).astype(np.uint8)
        else:
            arr = arr[:, :, :3]
    return Image.fromarray(np.ascontiguousarray(arr), mode="RGB")


def _decode(img, name, alpha, max_pixels):
    """Header size check, full decode, EXIF orientation, RGB conversion of an opened PIL image."""
    _check_size(name, img.width, img.height, max_pixels)
    try:
        img.load()  # force the full decode now: truncated / corrupt data fails here
        img = ImageOps.exif_transpose(img)
        return _pil_to_rgb(img, alpha)
    except MemoryError:
        raise _fail(name, "out of memory while decoding") from None
    except Exception as e:  # PIL plugins raise OSError, SyntaxError, ValueError, struct.error, ...
        raise _fail(name, f"file is truncated or corrupt ({type(e).__name__}: {e})") from None


def load_image(src, max_pixels=DEFAULT_MAX_PIXELS, alpha="drop"):
    """Load `src` (path, PIL image or uint8 numpy array) as an upright RGB PIL image.

    max_pixels: refuse images with more pixels (checked from the header, before decoding);
    None disables this check (PIL's own bomb guard still applies).
    alpha: "white" composites transparency onto white (transformers processor `convert_to_rgb`),
    "drop" discards it (`Image.convert("RGB")`, as transformers `load_image` and LLaVA/VILA).
    """
    if alpha not in ("white", "drop"):
        raise ValueError(f"alpha must be 'white' or 'drop', got {alpha!r}")
    with warnings.catch_warnings():
        # PIL warns (DecompressionBombWarning, palette transparency, corrupt EXIF ...) instead of
        # failing; the limit is enforced by us, and warnings must not leak to the user's terminal.
        warnings.simplefilter("ignore")
        if isinstance(src, np.ndarray):
            return _array_to_rgb(src, alpha, max_pixels)
        if isinstance(src, Image.Image):
            name = getattr(src, "filename", "") or f"<PIL image {src.mode} {src.width}x{src.height}>"
            return _decode(src, name, alpha, max_pixels)
        if isinstance(src, (str, os.PathLike)):
            return _load_path(os.fspath(src), alpha, max_pixels)
    raise MediaError(f"cannot load an image from a {type(src).__name__}: expected {_ACCEPTED}")


def _load_path(path, alpha, max_pixels):
    if os.path.isdir(path):
        raise _fail(path, "is a directory, not an image file")
    if not os.path.exists(path):
        hint = " (URLs are not fetched; download the file first)" if "://" in path else ""
        raise _fail(path, "no such file" + hint)
    try:
        f = open(path, "rb")
    except PermissionError:
        raise _fail(path, "permission denied") from None
    except OSError as e:
        raise _fail(path, e.strerror or e) from None
    with f:
        if os.fstat(f.fileno()).st_size == 0:
            raise _fail(path, "file is empty (0 bytes)")
        try:
            img = Image.open(f)  # reads the header only
        except UnidentifiedImageError:
            raise _fail(path, "not an image file, or an unsupported image format") from None
        except Image.DecompressionBombError as e:
            # PIL's own hard limit (2 * Image.MAX_IMAGE_PIXELS) is hit before ours can be checked.
            raise _fail(path, f"image is too large ({e})") from None
        except Exception as e:
            raise _fail(path, f"file is truncated or corrupt ({type(e).__name__}: {e})") from None
        with img:
            return _decode(img, path, alpha, max_pixels)


def resize_bicubic(img, size):
    """Resize a PIL image to size=(width, height) with PIL bicubic on uint8 pixels.

    This is transformers' PIL backend resize (`Image.resize(..., BICUBIC)`, no reducing_gap);
    torch bicubic differs slightly (spec pitfall P16).
    """
    w, h = int(size[0]), int(size[1])
    return img.resize((w, h), resample=Image.Resampling.BICUBIC)


def to_normalized_tensor(img, mean, std):
    """RGB PIL image or uint8 HxWx3 array -> float32 tensor [3, H, W] = (x/255 - mean) / std.

    Precision steps as transformers' numpy `rescale` + `normalize`: x * (1/255) in float64,
    cast to float32, then subtract and divide in float32 (mean/std rounded to float32).
    """
    if isinstance(img, Image.Image):
        if img.mode != "RGB":
            raise ValueError(f"expected an RGB image, got mode {img.mode!r}")
        arr = np.asarray(img)
    else:
        arr = np.asarray(img)
        if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] != 3:
            raise ValueError(f"expected a uint8 HxWx3 array, got {arr.dtype} {arr.shape}")
    x = torch.from_numpy(np.array(arr)).permute(2, 0, 1)  # copy: PIL arrays are read-only
    x = (x.to(torch.float64) * (1 / 255)).to(torch.float32)
    m = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
    return (x - m) / s
