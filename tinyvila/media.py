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

`open_video` opens a video file (decoded by decord, only the frames asked for) or wraps a list of
frames (each one through `load_image`) as a `Video`. Its problems raise `MediaError` with one line
naming the file too; ffmpeg's and decord's own messages to stderr are captured, not shown.
"""
import contextlib
import math
import operator
import os
import re
import sys
import tempfile
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


def _check_size(name, width, height, max_pixels, fail=None, noun="image"):
    """Reject a zero-size picture, or one over `max_pixels`, before anything is decoded."""
    fail = fail or _fail
    if width <= 0 or height <= 0:
        raise fail(name, f"{noun} has zero size ({width}x{height} pixels)")
    if max_pixels is not None and width * height > max_pixels:
        raise fail(name, f"{noun} is {width}x{height} = {width * height} pixels, over the limit "
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


def _check_path(path, fail, noun):
    """A clear error for a directory or a missing file, before anything is opened."""
    if os.path.isdir(path):
        raise fail(path, f"is a directory, not {noun} file")
    if not os.path.exists(path):
        hint = " (URLs are not fetched; download the file first)" if "://" in path else ""
        raise fail(path, "no such file" + hint)


def _load_path(path, alpha, max_pixels):
    _check_path(path, _fail, "an image")
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
    torch's bicubic gives slightly different pixels, so it is not used.
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
    # These steps on each of the 256 levels, then one lookup a pixel: the same values, 2.4x faster.
    levels = (torch.arange(256, dtype=torch.float64) * (1 / 255)).to(torch.float32)
    m = torch.tensor(mean, dtype=torch.float32).view(3, 1)
    s = torch.tensor(std, dtype=torch.float32).view(3, 1)
    table = (levels - m) / s  # [3, 256]
    h, w = arr.shape[:2]
    index = torch.from_numpy(arr.transpose(2, 0, 1).reshape(3, h * w).astype(np.int64))
    return torch.gather(table, 1, index).view(3, h, w)


# ---------------------------------------------------------------------------------------------
# Video

_VIDEO_ACCEPTED = ("a video file path (str or pathlib.Path), or a list/tuple of frames (PIL images, "
                   "uint8 HxWx3 numpy arrays or image paths)")


def _vfail(name, reason):
    reason = " ".join(str(reason).split())
    return MediaError(f"cannot read video '{name}': {reason}")


@contextlib.contextmanager
def _captured_stderr():
    """Redirect file descriptor 2 to a temporary file for the duration of the block.

    decord and ffmpeg write their logs from C/C++ straight to fd 2, out of reach of Python's
    `sys.stderr`; the capture keeps them off the user's terminal (and lets an error message quote
    ffmpeg's reason). Yields a function returning what was captured so far. The redirect is
    process-wide: another thread's C-level stderr output during the block is captured as well.
    """
    try:
        saved = os.dup(2)
    except OSError:  # no fd 2 at all: nothing to silence
        yield lambda: ""
        return
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 2)

        def read():
            tmp.flush()
            tmp.seek(0)
            return tmp.read().decode("utf-8", "replace")
        try:
            yield read
        finally:
            os.dup2(saved, 2)
            os.close(saved)


# ffmpeg log lines look like "[mov,mp4,m4a,3gp,3g2,mj2 @ 0x55d0c0a1b2c3] moov atom not found".
_FFMPEG_LINE = re.compile(r"\[[^\]@]+ @ 0x[0-9a-fA-F]+\]\s*(.+)")
# decord's own: "[01:15:15] /path/video_reader.cc:83: ERROR opening: name, Invalid data found ..."
_DECORD_OPEN = re.compile(r"ERROR opening: .*, ([^,]+)$")


def _decoder_detail(log, exc):
    """The most telling short reason among ffmpeg's captured log lines and decord's exception."""
    for line in log.splitlines():
        m = _FFMPEG_LINE.search(line)
        if m:
            return "ffmpeg: " + m.group(1).strip().rstrip(".")
    for line in log.splitlines():
        m = _DECORD_OPEN.search(line.strip())
        if m:
            return "ffmpeg: " + m.group(1).strip().rstrip(".")
    if "broken metadata" in str(exc):
        return "decord: cannot measure the duration or frame count"
    return ""


class Video:
    """A video to sample frames from: a file read lazily with decord, or a list of frames.

    num_frames: frames in the video (for a file: decord's count from the container).
    fps: the file's average frame rate (float); None for a frame list, which is taken as
        already sampled (the caller picks the rate it stands for), or when the file has none.
    name: the path, or "<list of N frames>", for messages.
    kind: "file" or "frames" (a frame list).
    width, height: the frame size in pixels.
    frames(indices): the requested frames only, as RGB PIL images.
    """

    def __init__(self, name, num_frames, fps, width, height, reader=None, images=None):
        self.name = name
        self.kind = "frames" if images is not None else "file"
        self.num_frames = num_frames
        self.fps = fps
        self.width = width
        self.height = height
        self._reader = reader
        self._images = images
        self._broken = None  # the error message once decoding has failed

    def __len__(self):
        return self.num_frames

    def __repr__(self):
        fps = "None" if self.fps is None else f"{self.fps:g}"
        return (f"Video({self.name!r}, num_frames={self.num_frames}, fps={fps}, "
                f"size={self.width}x{self.height})")

    @property
    def duration(self):
        """Seconds covered by the frames (None without an fps)."""
        return None if self.fps is None else self.num_frames / self.fps

    def frames(self, indices):
        """The frames at `indices` (ints in [0, num_frames), any order, repeats allowed) as RGB PIL
        images, in the order asked. A file decodes just those frames (decord `get_batch`)."""
        idx = [operator.index(i) for i in indices]
        for i in idx:
            if not 0 <= i < self.num_frames:
                raise IndexError(f"frame index {i} out of range for {self.num_frames} frames "
                                 f"of video '{self.name}'")
        if self._images is not None:
            return [self._images[i] for i in idx]
        if not idx:
            return []
        if self._broken is not None:
            raise MediaError(self._broken)
        wanted = sorted(set(idx))
        err = None
        with _captured_stderr() as log:
            try:
                batch = self._reader.get_batch(wanted).asnumpy()
            except MemoryError:
                err = _vfail(self.name, f"out of memory decoding {len(wanted)} frames")
            except Exception as e:
                detail = _decoder_detail(log(), e)
                err = _vfail(self.name, f"file is corrupt or truncated: cannot decode {_span(wanted)}"
                                        + (f" ({detail})" if detail else ""))
            if err is not None:
                # A decoder that failed keeps its threads busy and would print later, outside the
                # capture: destroy it here, while stderr is still captured (the except block is
                # over, so no traceback keeps it alive). A corrupt file stays corrupt: later calls
                # fail with the same message.
                self._broken, self._reader = str(err), None
        if err is not None:
            raise err
        if batch.ndim != 4 or batch.shape[0] != len(wanted) or batch.shape[3] != 3:
            raise _vfail(self.name, f"decoder returned frames of shape {batch.shape}, expected "
                                    f"({len(wanted)}, H, W, 3)")
        pos = {f: k for k, f in enumerate(wanted)}
        return [Image.fromarray(np.ascontiguousarray(batch[pos[i]]), mode="RGB") for i in idx]


def _span(frames):
    if len(frames) == 1:
        return f"frame {frames[0]}"
    return f"{len(frames)} frames between {frames[0]} and {frames[-1]}"


def open_video(src, max_pixels=DEFAULT_MAX_PIXELS):
    """Open `src` as a `Video`.

    src: a video file path (str / pathlib.Path), read with decord on the CPU, frames decoded only
    when asked for; or a list/tuple of frames (PIL images, uint8 HxWx3 numpy arrays, image paths;
    a 4-D uint8 array THWC is taken as such a list). List frames go through `load_image` (EXIF
    orientation, RGB conversion, size limit) and must all have the same size.
    max_pixels: refuse frames with more pixels (None: no limit), as `load_image`.
    """
    if isinstance(src, np.ndarray) and src.ndim == 4:
        src = list(src)
    if isinstance(src, (list, tuple)):
        return _open_frame_list(src, max_pixels)
    if isinstance(src, (str, os.PathLike)):
        return _open_video_file(os.fspath(src), max_pixels)
    raise MediaError(f"cannot load a video from a {type(src).__name__}: expected {_VIDEO_ACCEPTED}")


def _open_frame_list(frames, max_pixels):
    name = f"<list of {len(frames)} frame{'s' if len(frames) != 1 else ''}>"
    if not frames:
        raise _vfail(name, "the frame list is empty")
    images = []
    for i, frame in enumerate(frames):
        try:
            img = load_image(frame, max_pixels=max_pixels)
        except MediaError as e:
            raise _vfail(name, f"frame {i}: {e}") from None
        if images and img.size != images[0].size:
            raise _vfail(name, f"frame {i} is {img.width}x{img.height} pixels but frame 0 is "
                               f"{images[0].width}x{images[0].height}; all frames must have the same size")
        images.append(img)
    return Video(name, len(images), None, images[0].width, images[0].height, images=images)


def _open_video_file(path, max_pixels):
    _check_path(path, _vfail, "a video")
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
    except PermissionError:
        raise _vfail(path, "permission denied") from None
    except OSError as e:
        raise _vfail(path, e.strerror or e) from None
    if size == 0:
        raise _vfail(path, "file is empty (0 bytes)")
    try:
        import decord
    except ImportError:
        raise _vfail(path, "video files need the 'decord' package (pip install decord); "
                           "a list of frames works without it") from None
    err = reader = None
    with _captured_stderr() as log:
        try:
            # ffmpeg's reasons (e.g. "moov atom not found") are logged while the file is opened,
            # synchronously, into the capture. Afterwards the log level is quiet: decord's decoder
            # threads read ahead and can report damaged packets after a call has returned,
            # outside any capture; decode errors still reach us as decord's exceptions.
            decord.logging.set_level(decord.logging.ERROR)
            try:
                reader = decord.VideoReader(path, ctx=decord.cpu(0))
            finally:
                decord.logging.set_level(decord.logging.QUIET)
            num_frames = len(reader)
            first = reader.get_batch([0]).asnumpy() if num_frames > 0 else None
        except MemoryError:
            err = _vfail(path, "out of memory while opening")
        except Exception as e:
            err = _vfail(path, _open_failure(path, log(), e))
        if err is None and num_frames <= 0:
            err = _vfail(path, "video has no frames")
        if err is not None:
            reader = None  # its decoder threads end while stderr is still captured
    if err is not None:
        raise err
    height, width = int(first.shape[1]), int(first.shape[2])
    _check_size(path, width, height, max_pixels, _vfail, "video frame")
    fps = float(reader.get_avg_fps())
    if not math.isfinite(fps) or fps <= 0:
        fps = None
    return Video(path, num_frames, fps, width, height, reader=reader)


def _open_failure(path, log, exc):
    """One-line reason why decord could not open `path`."""
    if "cannot find video stream" in str(exc):
        return "no video stream in the file (audio only, or a video with no frames)"
    detail = _decoder_detail(log, exc)
    try:  # an image given where a video was expected deserves a precise message
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(path) as img:
                fmt = img.format
        return f"is a {fmt} image, not a video (pass it as an image, or as a one-frame list)"
    except Exception:
        pass
    reason = "not a video file, or an unsupported, corrupt or truncated one"
    return reason + (f" ({detail})" if detail else "")
