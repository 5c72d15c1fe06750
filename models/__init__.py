"""Model families: one file each, built from the shared blocks in layers.py, each a family.Family.

The registry maps a checkpoint's `architectures[0]` (or, failing that, its `model_type`) to the
family class that runs it.
"""
from tinyvila.errors import CheckpointError

from .family import Family
from .llava_next import LlavaNext
from .longvila import LongVILA
from .qwen2_5_vl import Qwen2_5_VL
from .qwen3_vl import Qwen3VL

# architectures[0] -> family
ARCHITECTURES = {
    "LlavaNextForConditionalGeneration": LlavaNext,
    "LlavaLlamaForCausalLM": LlavaNext,  # original liuhaotian/llava-v1.6-* files
    "LlavaMistralForCausalLM": LlavaNext,
    "Qwen2_5_VLForConditionalGeneration": Qwen2_5_VL,
    "Qwen3VLForConditionalGeneration": Qwen3VL,
    "LlavaLlamaModel": LongVILA,  # NVlabs' VILA layout (llm/, vision_tower/, mm_projector/)
}
# model_type -> family, for configs without `architectures`
MODEL_TYPES = {
    "llava_next": LlavaNext,
    "qwen2_5_vl": Qwen2_5_VL,
    "qwen3_vl": Qwen3VL,
}
# Hub checkpoints known to work, by their config.json architectures[0] (tinyvila-chat --list-models).
HUB_MODELS = {
    "LlavaNextForConditionalGeneration": ("llava-hf/llava-v1.6-vicuna-7b-hf", "llava-hf/llava-v1.6-mistral-7b-hf"),
    "LlavaLlamaForCausalLM": ("liuhaotian/llava-v1.6-vicuna-7b",),
    "LlavaMistralForCausalLM": ("liuhaotian/llava-v1.6-mistral-7b",),
    "Qwen2_5_VLForConditionalGeneration": tuple(f"Qwen/Qwen2.5-VL-{size}-Instruct"
                                                for size in ("3B", "7B", "32B", "72B")),
    "Qwen3VLForConditionalGeneration": tuple(f"Qwen/Qwen3-VL-{size}-Instruct" for size in ("2B", "4B", "8B", "32B")),
    "LlavaLlamaModel": ("Efficient-Large-Model/qwen2-7b-longvila-256f", "Efficient-Large-Model/qwen2-7b-longvila-1M",
                        "Efficient-Large-Model/qwen2-1.5b-longvila-256f",
                        *(f"Efficient-Large-Model/Llama-3-LongVILA-8B-{n}Frames" for n in (128, 256, 512, 1024))),
}
SUPPORTED = ("LLaVA-NeXT (LlavaNextForConditionalGeneration, LlavaLlamaForCausalLM, LlavaMistralForCausalLM), "
             "Qwen2.5-VL (Qwen2_5_VLForConditionalGeneration), Qwen3-VL dense (Qwen3VLForConditionalGeneration), "
             "LongVILA (VILA layout: LlavaLlamaModel)")


def family_for(config: dict) -> type[Family]:
    """The family class for a parsed config.json, or a CheckpointError naming what is supported."""
    archs = config.get("architectures") or []
    arch = archs[0] if isinstance(archs, list) and archs else None
    family = ARCHITECTURES.get(arch) or MODEL_TYPES.get(config.get("model_type"))
    if family is None:
        got = f"architecture {arch!r}" if arch else f"model_type {config.get('model_type')!r}"
        raise CheckpointError(f"unsupported {got}; tinyvila supports {SUPPORTED}")
    return family
