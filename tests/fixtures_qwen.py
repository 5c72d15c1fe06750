"""Tiny random Qwen2.5-VL checkpoints in the real on-disk formats, written by transformers.

The tower is tiny but structured like the real one: windows of 2x2 merge groups (window_size 56 at
patch 14), full-attention blocks between windowed ones, 2x2 merging, M-RoPE sections summing to half
the head size. The hub's config.json is flat (text fields at the root); transformers saves it
nested: both are written. The 3B checkpoint ties lm_head to the embeddings: `tied=True` does too.
"""
import json
import os

import torch

from fixtures_tokenizer import build_qwen2_tokenizer

MIN_PIXELS, MAX_PIXELS = 56 * 56, 224 * 224


def build_qwen2_5_vl(out_dir, tied=False, config_style="flat", layout="hub", seed=0):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    from tinyvila.tokenizer import Tokenizer

    os.makedirs(out_dir, exist_ok=True)
    build_qwen2_tokenizer(str(out_dir), files="json")
    tok = Tokenizer.from_dir(out_dir)
    ids = {name: tok.token_to_id(f"<|{name}|>") for name in ("image_pad", "video_pad", "vision_start",
                                                               "vision_end", "vision_pad", "endoftext", "im_end")}
    rows = (len(tok) + 63) // 64 * 64
    text = dict(vocab_size=rows, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=4096, rms_norm_eps=1e-6, tie_word_embeddings=tied,
                rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 1000000.0},
                bos_token_id=ids["endoftext"], eos_token_id=ids["im_end"])
    vision = dict(depth=4, hidden_size=32, intermediate_size=48, num_heads=2, patch_size=14, temporal_patch_size=2,
                  spatial_merge_size=2, window_size=56, fullatt_block_indexes=[1, 3], out_hidden_size=64,
                  tokens_per_second=2, in_channels=3, hidden_act="silu")
    cfg = Qwen2_5_VLConfig(text_config=text, vision_config=vision, image_token_id=ids["image_pad"],
                           video_token_id=ids["video_pad"], vision_start_token_id=ids["vision_start"],
                           vision_end_token_id=ids["vision_end"], tie_word_embeddings=tied)
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(0, 0.2 if p.dim() > 1 else 0.05)
            if name.endswith("norm.weight") or "ln_q" in name or "norm1" in name or "norm2" in name:
                p.add_(1.0)  # RMSNorm gains around 1, as trained models have
    if layout == "hub":
        model.save_pretrained(out_dir)
    else:  # transformers >= 4.52 in-memory names: model.visual.*, model.language_model.*
        from safetensors.torch import save_file

        model.config.save_pretrained(out_dir)
        state = {k: v.contiguous() for k, v in model.state_dict().items() if not (tied and k == "lm_head.weight")}
        save_file(state, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    if config_style == "flat":
        _flatten_config(out_dir)
    _write(out_dir, "preprocessor_config.json", {
        "image_processor_type": "Qwen2VLImageProcessor", "min_pixels": MIN_PIXELS, "max_pixels": MAX_PIXELS,
        "patch_size": 14, "temporal_patch_size": 2, "merge_size": 2, "do_convert_rgb": True,
        "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
        "resample": 3, "rescale_factor": 1 / 255})
    _write(out_dir, "generation_config.json", {"bos_token_id": ids["endoftext"], "pad_token_id": ids["endoftext"],
                                               "eos_token_id": [ids["im_end"], ids["endoftext"]],
                                               "do_sample": True, "temperature": 1e-6, "repetition_penalty": 1.05})
    return model, ids


def _flatten_config(out_dir):
    """The hub's Qwen2.5-VL config.json: text fields at the root (with rope_scaling spelled the hub
    way), vision_config nested, `in_chans` for the channel count."""
    path = os.path.join(out_dir, "config.json")
    with open(path) as f:
        cfg = json.load(f)
    text = cfg.pop("text_config")
    rope = text.pop("rope_parameters", None) or {}
    text.pop("model_type", None)
    for k, v in text.items():
        cfg.setdefault(k, v)
    cfg["rope_theta"] = rope.get("rope_theta", 1000000.0)
    cfg["rope_scaling"] = {"type": "mrope", "mrope_section": rope.get("mrope_section", [16, 24, 24])}
    cfg["vision_config"]["in_chans"] = cfg["vision_config"].pop("in_channels", 3)
    _write(out_dir, "config.json", cfg)


def _write(out_dir, name, obj):
    with open(os.path.join(out_dir, name), "w") as f:
        json.dump(obj, f, indent=2)
