"""Shared fixtures: tiny checkpoints in the real formats and test images, built once per run."""
import os

import pytest
import torch

# First of the project's imports: `python -m pytest` puts the clone's root first on sys.path, and
# tinyvila moves it behind site-packages, where its kernels/ folder cannot shadow Hugging Face's
# `kernels` package (which transformers imports).
import tinyvila  # noqa: F401

if not torch.cuda.is_available():  # CI has no GPU: Triton kernels run in the interpreter (set before they load)
    os.environ.setdefault("TRITON_INTERPRET", "1")

from fixtures_images import draw_image
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
