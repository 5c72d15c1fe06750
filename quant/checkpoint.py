"""Writing a quantized checkpoint in the AutoAWQ "GEMM" layout, beside the original's files.

The output keeps the source folder's structure, file names and tensor names, so vLLM and
transformers load it as they load the hub's AWQ checkpoints: each quantized `*.weight` becomes
`*.qweight`, `*.qzeros`, `*.scales` (quant/pack.py), every other tensor is written from the model's
current state (AWQ folds its scales into the norms and some biases), tensors the model never uses
are copied unchanged, and config.json gains a `quantization_config`.
"""
import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from tinyvila.errors import CheckpointError
from tinyvila.loader import iter_tensors, read_json
from tinyvila.models.layers import fused_target, param_view
from tinyvila.models.quantized import PACK


def awq_quantization_config(group_size: int, not_convert: list) -> dict:
    return {"quant_method": "awq", "version": "gemm", "bits": 4, "group_size": group_size, "zero_point": True,
            "modules_to_not_convert": list(not_convert) or None}


def _shard_packed(packed, sizes: list, index: int):
    """Shard `index` (along N) of a fused layer's (qweight, qzeros, scales)."""
    qweight, qzeros, scales = packed
    start, size = sum(sizes[:index]), sizes[index]
    return (qweight[:, start // PACK:(start + size) // PACK], qzeros[:, start // PACK:(start + size) // PACK],
            scales[:, start:start + size])


@torch.no_grad()
def write_awq_checkpoint(model, src, out, packed: dict, group_size: int, not_convert: list) -> list:
    """Write `model` (an fp model whose linears named in `packed` were quantized) to `out` in the
    layout of the checkpoint folder `src` it was loaded from. packed: {module name:
    (qweight, qzeros, scales)} in the AutoAWQ layout, fused modules over their whole N.
    Returns the files written."""
    src, out = Path(src), Path(out)
    if out.resolve() == src.resolve():
        raise CheckpointError("the output folder must differ from the model folder")
    out.mkdir(parents=True, exist_ok=True)
    weight_files = model.checkpoint_files(src)
    for f in sorted(src.rglob("*")):  # configs, tokenizer, templates: copied as they are
        if f.is_file() and not f.name.endswith((".safetensors", ".safetensors.index.json")):
            (out / f.relative_to(src)).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(f, out / f.relative_to(src))
    params = dict(model.named_parameters())
    owners = dict(model.named_modules())
    maps, sizes, quantized_folders, written = {}, {}, set(), []
    for f in weight_files:
        rel = f.relative_to(src)
        folder = rel.parent.as_posix()
        tensors = {}
        for name, t in iter_tensors([f]):
            target = model.module_name("" if folder == "." else folder, name)
            if target is None:  # never used by tinyvila (e.g. vision layers past the feature layer)
                tensors[name] = t
                continue
            pname, shard = fused_target(target, params)
            module_name, _, leaf = pname.rpartition(".")
            if leaf == "weight" and module_name in packed:
                parts = packed[module_name]
                if shard is not None:
                    parts = _shard_packed(parts, owners[module_name].shard_sizes, shard)
                stem = name.removesuffix("weight")
                for suffix, part in zip(("qweight", "qzeros", "scales"), parts):
                    tensors[stem + suffix] = part.contiguous().cpu()
                quantized_folders.add(folder)
            else:
                tensors[name] = param_view(model, pname, shard, params, owners).to(t.dtype).contiguous().cpu()
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(out / rel), metadata={"format": "pt"})
        written.append(out / rel)
        maps.setdefault(rel.parent, {}).update({n: rel.name for n in tensors})
        sizes[rel.parent] = sizes.get(rel.parent, 0) + sum(t.numel() * t.element_size() for t in tensors.values())
    for folder, weight_map in maps.items():  # sharded folders keep an index naming the new tensors
        if (src / folder / "model.safetensors.index.json").is_file():
            index = {"metadata": {"total_size": sizes[folder]}, "weight_map": dict(sorted(weight_map.items()))}
            (out / folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    qconfig = awq_quantization_config(group_size, not_convert)
    for folder in {"."} | quantized_folders:  # the top config, and the config beside the LLM weights
        path = out / folder / "config.json"
        if path.is_file():
            config = read_json(path)
            config["quantization_config"] = qconfig
            path.write_text(json.dumps(config, indent=2) + "\n")
    return written
