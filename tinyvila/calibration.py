"""Calibration data for quantization: a built-in set that tinyvila draws itself (works offline),
or the user's images and prompts.

A sample is (image, question, answer). The built-in images are scenes of shapes, gradients,
stripes, text and noise at several sizes and aspect ratios, so the vision tower's features span
more than one kind of picture; the prompts are varied chat questions with plausible answers, so
the LLM's activations include both the user's and the assistant's side of a turn.
"""
import random
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from .errors import TinyVilaError
from .media import load_image

PROMPTS = [
    ("Describe this image in detail.", "The image shows several colored shapes on a textured background. "
     "A large circle sits near the center, partly covering a rectangle, and thin lines cross the scene."),
    ("What objects can you see?", "I can see a red circle, a blue square, two triangles and a few lines."),
    ("How many shapes are there in the picture?", "There are seven shapes in total: three circles, two "
     "rectangles and two triangles."),
    ("What is the dominant color?", "The dominant color is a deep blue that fades into green toward the bottom."),
    ("Is there any text in the image? If so, what does it say?", "Yes, there is a short line of text near the top "
     "that reads like a label or a sign."),
    ("Write a short story inspired by this picture.", "Once upon a time, a small red ball rolled across a quiet "
     "blue field. It met a tall green tower and asked where the river went. The tower pointed east."),
    ("What is in the top left corner?", "In the top left corner there is a small yellow triangle over a gray area."),
    ("Explain what is happening here.", "Nothing is moving; it is a still composition, but the diagonal stripes "
     "give a sense of motion from left to right."),
    ("Give me three adjectives for this scene.", "Bright, geometric and busy."),
    ("Could this be a photograph? Why or why not?", "Probably not. The edges are too sharp and the colors too "
     "uniform, which suggests it was drawn by a computer."),
    ("Summarize the image in one sentence.", "A colorful abstract arrangement of simple shapes on a gradient."),
    ("Which shape is the largest, and where is it?", "The largest shape is the orange ellipse in the lower right."),
    ("What would you title this artwork?", "I would call it \"Morning Geometry\"."),
    ("List the colors from left to right.", "From left to right: purple, teal, white, orange and black."),
    ("Is the image symmetric?", "No. The left half is crowded with small shapes while the right half is mostly empty."),
    ("What might this image be used for?", "It could be a test pattern, a poster background or an illustration "
     "for a children's book about shapes."),
]


def draw_scene(width: int, height: int, seed: int) -> Image.Image:
    """A deterministic synthetic picture: gradient or noise background, shapes, stripes and text."""
    rng = random.Random(seed)
    gen = np.random.default_rng(seed)
    if rng.random() < 0.5:  # a two-color gradient
        a, b = gen.integers(0, 256, 3), gen.integers(0, 256, 3)
        t = np.linspace(0, 1, height)[:, None, None]
        base = (a * (1 - t) + b * t).repeat(width, axis=1)
    else:  # smooth noise: coarse random colors upsampled
        coarse = gen.integers(0, 256, (4, 4, 3)).astype(np.uint8)
        base = np.asarray(Image.fromarray(coarse).resize((width, height), Image.BICUBIC))
    img = Image.fromarray(base.astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(img)
    color = lambda: tuple(rng.randrange(256) for _ in range(3))  # noqa: E731
    for _ in range(rng.randint(3, 9)):
        x0, y0 = rng.randrange(width), rng.randrange(height)
        x1, y1 = x0 + rng.randint(4, max(5, width // 2)), y0 + rng.randint(4, max(5, height // 2))
        kind = rng.choice(["ellipse", "rectangle", "triangle", "line"])
        if kind == "ellipse":
            draw.ellipse([x0, y0, x1, y1], fill=color())
        elif kind == "rectangle":
            draw.rectangle([x0, y0, x1, y1], fill=color(), outline=color())
        elif kind == "triangle":
            draw.polygon([(x0, y1), ((x0 + x1) // 2, y0), (x1, y1)], fill=color())
        else:
            draw.line([x0, y0, x1, y1], fill=color(), width=rng.randint(1, 6))
    if rng.random() < 0.5:
        draw.text((rng.randrange(max(1, width // 2)), rng.randrange(max(1, height // 2))),
                  rng.choice(["EXIT", "tinyvila", "42", "Hello!", "STOP", "Cafe"]), fill=color())
    return img


SIZES = [(336, 336), (448, 336), (336, 504), (640, 480), (224, 224), (512, 384)]


def builtin_samples(n: int, seed: int = 0) -> list:
    """n (image, question, answer) samples tinyvila draws itself."""
    rng = random.Random(seed)
    samples = []
    for i in range(n):
        w, h = SIZES[i % len(SIZES)]
        question, answer = PROMPTS[rng.randrange(len(PROMPTS))]
        samples.append((draw_scene(w, h, seed * 100_003 + i), question, answer))
    return samples


IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


def user_samples(n: int, images_dir=None, prompts_file=None, seed: int = 0) -> list:
    """n samples from a folder of images and/or a file of prompts (one per line), each cycling;
    whichever is not given comes from the built-in set. User prompts carry no answer."""
    builtin = builtin_samples(n, seed)
    images = [im for im, _, _ in builtin]
    if images_dir is not None:
        folder = Path(images_dir)
        if not folder.is_dir():
            raise TinyVilaError(f"--calib-images: '{folder}' is not a folder")
        paths = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not paths:
            raise TinyVilaError(f"--calib-images: no images in '{folder}'")
        images = [paths[i % len(paths)] for i in range(n)]
    texts = [(q, a) for _, q, a in builtin]
    if prompts_file is not None:
        path = Path(prompts_file)
        if not path.is_file():
            raise TinyVilaError(f"--calib-prompts: '{path}' does not exist")
        lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        if not lines:
            raise TinyVilaError(f"--calib-prompts: '{path}' has no prompts")
        texts = [(lines[i % len(lines)], None) for i in range(n)]
    return [(load_image(im) if not isinstance(im, Image.Image) else im, q, a) for im, (q, a) in zip(images, texts)]
