"""tinyvila: quantized vision-language models, fast on one GPU.

    eng = tinyvila.load("llava-hf/llava-v1.6-vicuna-7b-hf", device="cuda")
    print(eng.generate("Describe the image.", images=["x.png"]).text)

Importing tinyvila is cheap: torch and the model code load on first use.
"""
import os
import sys

from .errors import CheckpointError, ContextError, MediaError, TinyVilaError

__all__ = ["load", "Engine", "TinyVilaError", "MediaError", "CheckpointError", "ContextError"]
__version__ = "0.1.0"


def _run_from_clone() -> None:
    """`python -m tinyvila...` from a clone's root imports this folder rather than the installed
    package. Then the clone's kernels/, models/, quant/ and tools/ are this package's subpackages,
    as setup.py installs them, and the clone's root moves behind site-packages: there, as the first
    entry of sys.path, its kernels/ would shadow Hugging Face's `kernels` package."""
    here = os.path.dirname(os.path.abspath(__file__))
    root = os.path.dirname(here)
    if os.path.isdir(os.path.join(here, "models")) or not os.path.isfile(os.path.join(root, "setup.py")):
        return  # an installed copy: the subpackages are inside it
    if root not in __path__:
        __path__.append(root)
    entries = [p for p in sys.path if os.path.abspath(p or os.curdir) == root]
    if entries:
        sys.path[:] = [p for p in sys.path if p not in entries] + [root]


_run_from_clone()


def load(model, device=None, dtype=None, progress=None, **options):
    """Load a checkpoint (local directory or hub id) and return an `Engine`.

    progress: progress bars on stderr while the weights load and repack. None (the default) shows
    them when stderr is a terminal and a step takes more than a moment; True always; False never."""
    from .engine import Engine

    return Engine.from_pretrained(model, device=device, dtype=dtype, progress=progress, **options)


def __getattr__(name):
    if name == "Engine":
        from .engine import Engine

        return Engine
    raise AttributeError(f"module 'tinyvila' has no attribute {name!r}")
