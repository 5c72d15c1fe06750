"""Shared fixtures: tiny checkpoints in the real formats and test images, built once per run."""
import numpy as np
import pytest
from PIL import Image, ImageDraw

from fixtures_llava import build_llava_next


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (run with -m gpu on the device)")


def pytest_collection_modifyitems(config, items):
    # GPU tests run only when asked for (pytest -m gpu on a CUDA machine); elsewhere they are
    # deselected, not skipped, so no skip is ever counted.
    if "gpu" in (config.getoption("-m") or ""):
        return
    gpu = [item for item in items if "gpu" in item.keywords]
    if gpu:
        config.hook.pytest_deselected(items=gpu)
        items[:] = [item for item in items if "gpu" not in item.keywords]


@pytest.fixture(scope="session")
def llava_vicuna(tmp_path_factory):
    d = tmp_path_factory.mktemp("llava_vicuna")
    build_llava_next(d, "vicuna")
    return d


@pytest.fixture(scope="session")
def llava_mistral(tmp_path_factory):
    d = tmp_path_factory.mktemp("llava_mistral")
    build_llava_next(d, "mistral")
    return d


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


@pytest.fixture(scope="session")
def image_files(tmp_path_factory):
    """Three aspect ratios (wide, tall, square) plus a small one, as PNG files."""
    d = tmp_path_factory.mktemp("images")
    paths = []
    for i, (w, h) in enumerate([(150, 90), (70, 160), (120, 120), (40, 30)]):
        p = d / f"img{i}_{w}x{h}.png"
        draw_image(w, h, seed=i).save(p)
        paths.append(p)
    return paths
