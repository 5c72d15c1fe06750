"""Tiny random Qwen3-VL checkpoints in the real on-disk format, written by transformers'
save_pretrained (keys `model.visual.*`, `model.language_model.*`, `lm_head.*`; config nested).

Structured like the real ones at toy size: patch 16, 2x2 merging, a 4x4 learned position grid
(resampled to every image), DeepStack mergers after vision blocks 0 and 2 (added after decoder
layers 0 and 1 of 3), head_dim 32 (wider than hidden / heads, as the real 2B-8B have), interleaved
M-RoPE sections [6, 5, 5]. `tied=True` ties lm_head to the embeddings (2B, 4B do). The tokenizer
and chat template are the Qwen2-VL fixture's (same special tokens).
"""
import json
import os

import torch

from fixtures_tokenizer import build_qwen2_tokenizer

MIN_PIXELS, MAX_PIXELS = 64 * 64, 256 * 256


def build_qwen3_vl(out_dir, tied=False, seed=0):
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    from tinyvila.tokenizer import Tokenizer

    os.makedirs(out_dir, exist_ok=True)
    build_qwen2_tokenizer(str(out_dir), files="json")
    tok = Tokenizer.from_dir(out_dir)
    ids = {name: tok.token_to_id(f"<|{name}|>") for name in ("image_pad", "video_pad", "vision_start",
                                                               "vision_end", "endoftext", "im_end")}
    rows = (len(tok) + 63) // 64 * 64
    text = dict(vocab_size=rows, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                num_key_value_heads=2, head_dim=32, max_position_embeddings=4096, rms_norm_eps=1e-6,
                tie_word_embeddings=tied,
                rope_parameters={"rope_type": "default", "mrope_section": [6, 5, 5], "mrope_interleaved": True,
                                 "rope_theta": 5000000.0},
                bos_token_id=ids["endoftext"], eos_token_id=ids["im_end"])
    vision = dict(depth=4, hidden_size=32, intermediate_size=48, num_heads=2, patch_size=16, temporal_patch_size=2,
                  spatial_merge_size=2, out_hidden_size=64, num_position_embeddings=16, in_channels=3,
                  deepstack_visual_indexes=[0, 2], hidden_act="gelu_pytorch_tanh")
    cfg = Qwen3VLConfig(text_config=text, vision_config=vision, image_token_id=ids["image_pad"],
                        video_token_id=ids["video_pad"], vision_start_token_id=ids["vision_start"],
                        vision_end_token_id=ids["vision_end"], tie_word_embeddings=tied)
    torch.manual_seed(seed)
    model = Qwen3VLForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(0, 0.2 if p.dim() > 1 else 0.05)
            if name.endswith("norm.weight") or "norm1" in name or "norm2" in name:
                p.add_(1.0)  # norm gains around 1, as trained models have
            if "pos_embed" in name:
                p.mul_(5.0)  # position embeddings that matter next to the patch embedding
    model.save_pretrained(out_dir)
    _write(out_dir, "preprocessor_config.json", {
        "image_processor_type": "Qwen2VLImageProcessorFast", "patch_size": 16, "temporal_patch_size": 2,
        "merge_size": 2, "size": {"shortest_edge": MIN_PIXELS, "longest_edge": MAX_PIXELS},
        "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5], "do_convert_rgb": True, "resample": 3,
        "rescale_factor": 1 / 255})
    _write(out_dir, "generation_config.json", {"bos_token_id": ids["endoftext"], "pad_token_id": ids["endoftext"],
                                               "eos_token_id": [ids["im_end"], ids["endoftext"]],
                                               "do_sample": True, "temperature": 0.7, "top_k": 20, "top_p": 0.8})
    return model, ids


def _write(out_dir, name, obj):
    with open(os.path.join(out_dir, name), "w") as f:
        json.dump(obj, f, indent=2)
