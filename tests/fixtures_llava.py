"""Tiny random LLaVA-NeXT checkpoints in the real on-disk formats, written by transformers.

Sizes are tiny (CLIP 64-wide tiles of 56 px, a 2-layer 64-wide decoder) but every structural
feature of the 7B checkpoints is there: anyres pinpoints (scaled to the tile), a vocabulary padded
to a multiple of 64 rows past the tokenizer (like the hub's 32064 rows for 32002 tokens), MHA for
the vicuna flavour, GQA and an active sliding window for the mistral flavour.
"""
import json
import os

import torch

from fixtures_tokenizer import build_llama_tokenizer

TILE, PATCH = 56, 14
PINPOINTS = [[TILE, 2 * TILE], [2 * TILE, TILE], [2 * TILE, 2 * TILE], [3 * TILE, TILE], [TILE, 3 * TILE]]


def hf_config(flavor: str, vocab_rows: int, image_token_id: int, pad_token_id: int, **overrides):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaNextConfig, MistralConfig

    vision = CLIPVisionConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=3,
                              num_attention_heads=2, image_size=TILE, patch_size=PATCH, projection_dim=32)
    if flavor == "vicuna":  # MHA, rope_theta left at its default as in the hub file
        text = LlamaConfig(vocab_size=vocab_rows, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=1024,
                           rms_norm_eps=1e-5, pad_token_id=0)
    else:  # GQA with a sliding window shorter than the prompts, so the window really acts
        text = MistralConfig(vocab_size=vocab_rows, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                             rms_norm_eps=1e-5, sliding_window=40,
                             rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})
    kw = dict(image_grid_pinpoints=PINPOINTS, vision_feature_layer=-2, vision_feature_select_strategy="default")
    kw.update(overrides)
    return LlavaNextConfig(vision_config=vision, text_config=text, image_token_index=image_token_id,
                           pad_token_id=pad_token_id, **kw)


def build_llava_next(out_dir, flavor="vicuna", layout="hub", seed=0, **config_overrides):
    """Write a checkpoint folder; layout: "hub" (save_pretrained), "module" (transformers >= 4.52
    in-memory key names), or "original" (liuhaotian: LLaVA's own config and key names, no <image>
    token in the tokenizer, no chat template)."""
    from transformers import LlavaNextForConditionalGeneration

    os.makedirs(out_dir, exist_ok=True)
    original = layout == "original"
    tok = build_llama_tokenizer(out_dir, flavor=flavor, files="spm" if original else "json",
                                layout="original" if original else "hub")
    image_id, pad_id = tok.vocab_size, tok.vocab_size + 1  # llava-hf's <image>, <pad> (the original has neither)
    vocab_rows = (tok.vocab_size + 2 + 63) // 64 * 64
    torch.manual_seed(seed)
    cfg = hf_config(flavor, vocab_rows, image_id, pad_id, **config_overrides)
    model = LlavaNextForConditionalGeneration(cfg).eval()
    with torch.no_grad():  # random weights big enough that the image and the prompt change the answer
        for name, p in model.named_parameters():
            p.normal_(0, 0.2 if p.dim() > 1 else 0.05)
            if "norm" in name and name.endswith("weight"):
                p.add_(1.0)  # norm gains around 1, as trained models have: near 0 they mute every layer
        model.model.image_newline.normal_(0, 1.0)
    preprocessor = {
        "image_processor_type": "LlavaNextImageProcessor", "crop_size": {"height": TILE, "width": TILE},
        "size": {"shortest_edge": TILE}, "image_grid_pinpoints": PINPOINTS, "do_center_crop": True,
        "do_normalize": True, "do_rescale": True, "do_resize": True, "do_convert_rgb": True, "do_pad": True,
        "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
        "resample": 3, "rescale_factor": 1 / 255,
    }
    if layout == "hub":
        model.save_pretrained(out_dir)
        _hub_vision_names(out_dir)
        _write(out_dir, "preprocessor_config.json", preprocessor)
    elif layout == "module":
        from safetensors.torch import save_file

        model.config.save_pretrained(out_dir)
        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        save_file(state, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
        _write(out_dir, "preprocessor_config.json", preprocessor)
    elif layout == "original":
        _save_original(model, cfg, out_dir, flavor)
    else:
        raise ValueError(layout)
    return model, tok


def _save_original(model, cfg, out_dir, flavor):
    """The liuhaotian/llava-v1.6-* layout: one flat namespace, mm_projector.{0,2}, no <image> row."""
    from safetensors.torch import save_file

    renames = [("model.language_model.", "model."),
               ("model.vision_tower.", "model.vision_tower.vision_tower.vision_model."),
               ("model.multi_modal_projector.linear_1.", "model.mm_projector.0."),
               ("model.multi_modal_projector.linear_2.", "model.mm_projector.2."),
               ("model.image_newline", "model.image_newline"), ("lm_head.", "lm_head.")]
    state = {}
    for k, v in model.state_dict().items():
        for old, new in renames:
            if k.startswith(old):
                state[new + k[len(old):]] = v.contiguous()
                break
        else:
            raise AssertionError(k)
    save_file(state, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    t = cfg.text_config
    config = {
        "architectures": ["LlavaLlamaForCausalLM" if flavor == "vicuna" else "LlavaMistralForCausalLM"],
        "model_type": "llava_llama" if flavor == "vicuna" else "llava_mistral",
        "hidden_size": t.hidden_size, "intermediate_size": t.intermediate_size,
        "num_hidden_layers": t.num_hidden_layers, "num_attention_heads": t.num_attention_heads,
        "num_key_value_heads": t.num_key_value_heads, "max_position_embeddings": t.max_position_embeddings,
        "rms_norm_eps": t.rms_norm_eps, "rope_theta": t.rope_parameters["rope_theta"],
        "vocab_size": t.vocab_size, "sliding_window": getattr(t, "sliding_window", None),
        "image_aspect_ratio": "anyres", "image_grid_pinpoints": PINPOINTS, "mm_patch_merge_type": "spatial_unpad",
        "mm_projector_type": "mlp2x_gelu", "mm_hidden_size": cfg.vision_config.hidden_size,
        "mm_vision_tower": "openai/clip-vit-large-patch14-336", "mm_vision_select_layer": -2,
        "mm_vision_select_feature": "patch", "mm_use_im_start_end": False, "mm_use_im_patch_token": False,
        "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, "torch_dtype": "float16",
    }
    _write(out_dir, "config.json", config)
    # The original repos ship no chat template and no <image> token: tinyvila splices as LLaVA did.


def _hub_vision_names(out_dir):
    """transformers 5.x saves `vision_tower.embeddings.*`; the llava-hf hub files (and 4.x saves)
    say `vision_tower.vision_model.embeddings.*`. Write the hub's names (transformers reads both)."""
    from safetensors.torch import load_file, save_file

    path = os.path.join(out_dir, "model.safetensors")
    state = load_file(path)
    renamed = {("vision_tower.vision_model." + k[len("vision_tower."):]
                if k.startswith("vision_tower.") and not k.startswith("vision_tower.vision_model.") else k): v
               for k, v in state.items()}
    save_file(renamed, path, metadata={"format": "pt"})


def _write(out_dir, name, obj):
    with open(os.path.join(out_dir, name), "w") as f:
        json.dump(obj, f, indent=2)


def pil_image_processor():
    """transformers' PIL-based LLaVA-NeXT image processor class, the reference, in any 5.x:
    5.2x names it LlavaNextImageProcessorPil; earlier releases' slow LlavaNextImageProcessor is it."""
    import transformers

    return getattr(transformers, "LlavaNextImageProcessorPil", None) or transformers.LlavaNextImageProcessor
