"""Finding a checkpoint and reading its files.

`resolve(model)` turns a local directory or a hub id into a directory: the local path first, then
the local hub cache, then a download (with a progress bar) when the network allows. Weights are
read from safetensors only (never pickles): memory-mapped, one tensor at a time, so the host never
holds a full copy of the model.
"""
import contextlib
import json
import os
import sys
from pathlib import Path

from tqdm import tqdm

from .errors import CheckpointError

# What a download fetches: configs, tokenizer files and safetensors. Never code, never pickles.
HUB_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "tokenizer.model", "*.txt", "*/*.json",
                "*/*.safetensors", "*/tokenizer.model", "*/*.txt", "*/*.jinja"]


# tinyvila's own files beside a checkpoint's weights (quant/smoothquant.py): not checkpoint shards.
SIDE_FILES = {"vision_w8a8.safetensors"}


def resolve(model) -> Path:
    """A local checkpoint directory for `model` (a path or a hub id such as org/name)."""
    path = Path(os.path.expanduser(str(model)))
    if path.is_dir():
        return path
    looks_like_hub_id = str(model).count("/") == 1 and not str(model).startswith((".", "/", "~"))
    if path.exists() or not looks_like_hub_id:
        what = "is not a directory" if path.exists() else "does not exist"
        raise CheckpointError(f"model directory '{model}' {what}")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:  # pragma: no cover - a runtime dependency
        raise CheckpointError(f"cannot look up '{model}' on the hub: huggingface_hub is not installed")
    try:  # the local cache first: no network needed, no progress bar
        return Path(snapshot_download(str(model), allow_patterns=HUB_PATTERNS, local_files_only=True))
    except Exception:
        pass
    try:
        return Path(snapshot_download(str(model), allow_patterns=HUB_PATTERNS))
    except Exception as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"model '{model}' is not in the local hub cache and could not be "
                              f"downloaded ({reason[:160]}); pass a local checkpoint with --model PATH")


@contextlib.contextmanager
def naming(folder: Path):
    """CheckpointErrors raised inside name the checkpoint `folder`: config checks (an unsupported
    architecture or quantization, a wrongly typed field) see only the parsed config, not its folder."""
    try:
        yield
    except CheckpointError as e:
        if str(folder) in str(e):  # already names it (or a file in it)
            raise
        raise type(e)(f"{folder}: {e}") from e


def read_json(path: Path, required: bool = True) -> dict:
    path = Path(path)
    if not path.is_file():
        if required:
            raise CheckpointError(f"{path.name} is missing from '{path.parent}'")
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON ({e})")
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} should hold a JSON object")
    return data


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files of a checkpoint folder: from its index when there is one."""
    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{index} has no weight_map")
        files = [folder / f for f in sorted(set(weight_map.values()))]
        for f in files:
            if not f.is_file():
                raise CheckpointError(f"shard '{f.name}' listed in {index.name} is missing from '{folder}'")
        return files
    files = sorted(f for f in folder.glob("*.safetensors") if f.name not in SIDE_FILES)
    if files:
        return files
    pickles = [p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt")]
    if pickles:
        raise CheckpointError(f"'{folder}' has only pickled weights ({pickles[0]}); tinyvila loads "
                              f"safetensors only (convert them with safetensors first)")
    raise CheckpointError(f"no *.safetensors weights in '{folder}'")


def iter_tensors(files):
    """Yield (name, tensor) from safetensors files, memory-mapped, one tensor at a time."""
    from safetensors import safe_open

    for f in files:
        try:
            handle = safe_open(str(f), framework="pt", device="cpu")
        except Exception as e:
            raise CheckpointError(f"cannot read weights '{f}': {str(e).splitlines()[0] if str(e) else e!r} "
                                  f"(truncated or corrupt file?)")
        with handle:
            for name in handle.keys():
                try:
                    tensor = handle.get_tensor(name)
                except Exception as e:
                    raise CheckpointError(f"cannot read tensor {name!r} from '{f}': {e}")
                yield name, tensor


def tensor_shapes(files) -> dict:
    """{name: shape} from safetensors headers, without reading any tensor data."""
    from safetensors import safe_open

    shapes = {}
    for f in files:
        try:
            with safe_open(str(f), framework="pt", device="cpu") as handle:
                for name in handle.keys():
                    shapes[name] = list(handle.get_slice(name).get_shape())
        except Exception as e:
            raise CheckpointError(f"cannot read weights '{f}': {e} (truncated or corrupt file?)")
    return shapes


def progress_bar(progress, **kwargs) -> tqdm:
    """A tqdm bar on stderr for a step of loading. progress: True shows it from the start; None
    (auto) only when stderr is a terminal and the step takes more than a moment; False never.
    The bar is erased when done, so a log captured from a terminal keeps no trace of it."""
    if progress is None:
        show, delay = _is_terminal(sys.stderr), 0.5
    else:
        show, delay = bool(progress), 0
    return tqdm(disable=not show, file=sys.stderr, delay=delay, leave=False, dynamic_ncols=True, **kwargs)


def _is_terminal(stream) -> bool:
    try:
        return stream is not None and stream.isatty()
    except (ValueError, OSError):  # closed or detached
        return False
