"""Test pictures drawn in code (no image files in the repo)."""
import numpy as np
from PIL import Image, ImageDraw


def draw_image(width: int, height: int, seed: int = 0) -> Image.Image:
    """A picture with structure (gradient, shapes, noise), so features vary across tiles."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    arr = np.stack([x * 255 // max(width - 1, 1), y * 255 // max(height - 1, 1),
                    (x + y) * 127 // max(width + height - 2, 1)], -1).astype(np.uint8)
    img = Image.fromarray(arr)
    d = ImageDraw.Draw(img)
    for _ in range(4):
        x0, y0 = int(rng.integers(0, width)), int(rng.integers(0, height))
        d.ellipse([x0, y0, x0 + width // 3, y0 + height // 3], fill=tuple(int(c) for c in rng.integers(0, 255, 3)))
    noise = rng.integers(-20, 20, (height, width, 3))
    return Image.fromarray(np.clip(np.asarray(img).astype(int) + noise, 0, 255).astype(np.uint8))


def write_video(path, frames, fps=10, codec="mpeg4"):
    """Encode PIL frames into a video file with PyAV (as a user's camera file would be)."""
    import av

    with av.open(str(path), "w") as out:
        stream = out.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = frames[0].width, frames[0].height, "yuv420p"
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.asarray(frame), format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path
