"""tinyvila: quantized vision-language models, fast on one GPU.

    eng = tinyvila.load("llava-hf/llava-v1.6-vicuna-7b-hf", device="cuda")
    print(eng.generate("Describe the image.", images=["x.png"]).text)

Importing tinyvila is cheap: torch and the model code load on first use.
"""
from .errors import CheckpointError, ContextError, MediaError, TinyVilaError

__all__ = ["load", "Engine", "TinyVilaError", "MediaError", "CheckpointError", "ContextError"]
__version__ = "0.1.0"


def load(model, device=None, dtype=None, **options):
    """Load a checkpoint (local directory or hub id) and return an `Engine`."""
    from .engine import Engine

    return Engine.from_pretrained(model, device=device, dtype=dtype, **options)


def __getattr__(name):
    if name == "Engine":
        from .engine import Engine

        return Engine
    raise AttributeError(f"module 'tinyvila' has no attribute {name!r}")
