"""Checks of the tiny VILA checkpoints and of the reference pieces in fixtures_vila.py."""
import json
import math
import os

import numpy as np
import pytest
import torch

from fixtures_images import draw_image
from fixtures_vila import (CLUSTER, build_vila, downsample, reference_image_features, siglip_pixels,
                           uniform_frame_indices)

COMBOS = [("llama3", "mlp_downsample", 56), ("qwen2", "mlp_downsample", 56), ("qwen2", "mlp_downsample_3x3_fix", 42),
          ("qwen2", "mlp_downsample_2x2_fix", 42)]  # the last: odd 3x3 grid, zero-padded to 4x4 (P2)


@pytest.fixture(scope="module", params=COMBOS, ids=lambda c: f"{c[0]}-{c[1]}-{c[2]}")
def fx(request, tmp_path_factory):
    backbone, projector, size = request.param
    return build_vila(tmp_path_factory.mktemp(f"vila_{backbone}"), backbone, projector, size)


def _json(*parts):
    with open(os.path.join(*parts)) as f:
        return json.load(f)


def test_layout_and_configs(fx):
    files = {os.path.relpath(os.path.join(r, f), fx.path) for r, _, fs in os.walk(fx.path) for f in fs}
    common = {"config.json", "llm/config.json", "llm/generation_config.json", "llm/model.safetensors",
              "llm/tokenizer_config.json", "llm/special_tokens_map.json", "vision_tower/config.json",
              "vision_tower/model.safetensors", "vision_tower/preprocessor_config.json",
              "mm_projector/config.json", "mm_projector/model.safetensors"}
    if fx.backbone == "llama3":
        assert files == common | {"llm/tokenizer.json"}
    else:
        assert files == common | {"llm/vocab.json", "llm/merges.txt", "llm/added_tokens.json"}
    top = _json(fx.path, "config.json")
    assert top["architectures"] == ["LlavaLlamaModel"] and top["model_type"] == "llava_llama"
    assert top["mm_vision_select_layer"] == -2 and top["mm_vision_select_feature"] == "cls_patch"
    assert top["image_aspect_ratio"] == "resize" and top["fps"] == 0.0 and top["chat_template"] is None
    assert top["hidden_size"] == 64 and top["mm_hidden_size"] == 32
    for key, sub in [("llm_cfg", "llm"), ("vision_tower_cfg", "vision_tower"), ("mm_projector_cfg", "mm_projector")]:
        assert top[key]["_name_or_path"] == f"{CLUSTER}/{sub}" and not os.path.exists(top[key]["_name_or_path"])
        assert top[key] == _json(fx.path, sub, "config.json")
    assert top["mm_projector_cfg"]["mm_projector_type"] == fx.projector
    assert top["mm_projector_cfg"]["model_type"] == "v2l_projector"
    llm_cfg = top["llm_cfg"]
    assert llm_cfg["vocab_size"] == fx.vocab_rows and llm_cfg["torch_dtype"] == "bfloat16"
    assert llm_cfg["rope_theta"] == (207112184.0 if fx.backbone == "llama3" else 15300000.0)
    assert _json(fx.path, "llm", "generation_config.json")["eos_token_id"] == fx.eos
    pre = _json(fx.path, "vision_tower", "preprocessor_config.json")
    assert pre["size"] == {"height": fx.image_size, "width": fx.image_size} and pre["image_mean"] == [0.5] * 3


def test_llm_reloads_with_transformers(fx):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(os.path.join(fx.path, "llm"), dtype=torch.float32).eval()
    assert type(model) is type(fx.llm)
    ids = torch.tensor([[fx.newline, 5, 17, fx.pad - 1, 42, 7]])
    with torch.no_grad():
        a, b = model(ids).logits, fx.llm(ids).logits
    assert a.shape[-1] == fx.vocab_rows
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    assert b.std() > 0.5  # random weights large enough that the input matters
    q_bias = "model.layers.0.self_attn.q_proj.bias" in model.state_dict()
    assert q_bias == (fx.backbone == "qwen2")


def test_vision_tower_reloads_with_transformers(fx):
    from safetensors import safe_open
    from transformers import SiglipVisionModel

    vt = os.path.join(fx.path, "vision_tower")
    with safe_open(os.path.join(vt, "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        assert f.get_tensor("vision_model.embeddings.position_embedding.weight").dtype == torch.bfloat16
    assert all(k.startswith("vision_model.") for k in keys)
    assert any(k.startswith("vision_model.head.") for k in keys) == (fx.backbone == "llama3")
    model = SiglipVisionModel.from_pretrained(vt, dtype=torch.float32).eval()
    px = torch.randn(2, 3, fx.image_size, fx.image_size)
    with torch.no_grad():
        a = model(pixel_values=px, output_hidden_states=True).hidden_states[-2]
        b = fx.vision(pixel_values=px, output_hidden_states=True).hidden_states[-2]
    assert a.shape == (2, fx.patches_per_side ** 2, 32)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_projector_file(fx):
    from safetensors.torch import load_file

    state = load_file(os.path.join(fx.path, "mm_projector", "model.safetensors"))
    c, h = 32, 64
    if fx.k == 2:
        shapes = {"layers.1.weight": (4 * c,), "layers.1.bias": (4 * c,), "layers.2.weight": (h, 4 * c),
                  "layers.2.bias": (h,), "layers.4.weight": (h, h), "layers.4.bias": (h,)}
    else:
        shapes = {"layers.1.weight": (9 * c,), "layers.1.bias": (9 * c,), "layers.2.weight": (3 * c, 9 * c),
                  "layers.2.bias": (3 * c,), "layers.4.weight": (3 * c,), "layers.4.bias": (3 * c,),
                  "layers.5.weight": (h, 3 * c), "layers.5.bias": (h,), "layers.7.weight": (h, h),
                  "layers.7.bias": (h,)}
    assert {k: tuple(v.shape) for k, v in state.items()} == shapes
    mine = fx.mm_projector.state_dict()
    for k, v in state.items():
        assert torch.equal(v.float(), mine[k[len("layers."):]])


def test_tokenizer_loads_with_transformers(fx):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(os.path.join(fx.path, "llm"))
    assert len(tok) == fx.tokenizer_len
    ids = tok("What is this?\nA cat.").input_ids
    assert tok.encode("\n", add_special_tokens=False) == [fx.newline]
    if fx.backbone == "llama3":
        assert ids[0] == fx.bos and ids.count(fx.bos) == 1
        assert tok("<|begin_of_text|>hi").input_ids.count(fx.bos) == 2  # the P7 hazard, as on the hub
        assert tok.eos_token_id == fx.eos and tok.pad_token_id == fx.pad
        assert tok.convert_tokens_to_ids("<|eot_id|>") == fx.eot
        assert "<image>" not in tok.get_vocab()
        assert len(tok) == fx.vocab_rows
    else:
        assert fx.bos is None and tok.convert_tokens_to_ids("[BOS]") not in ids
        assert tok.eos_token_id == fx.im_end and tok.pad_token_id == fx.pad
        media = [tok.convert_tokens_to_ids(t) for t in ("<vila/sentinel>", "<image>", "<vila/video>")]
        assert media == [fx.sentinel, fx.image, fx.video]
        assert min(media) >= fx.vocab_rows == fx.llm.config.vocab_size  # pitfall P8
        assert tok("<vila/video>Describe.").input_ids[0] == fx.video
        text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
        assert text == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
                        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")


def test_reference_image_features(fx):
    imgs = [draw_image(90, 60, seed=1), draw_image(50, 70, seed=2)]
    px = siglip_pixels(fx, imgs)
    assert px.shape == (2, 3, fx.image_size, fx.image_size)
    s = fx.image_size
    manual = (np.asarray(imgs[0].resize((s, s), 3), dtype=np.float32) / 255 - 0.5) / 0.5
    np.testing.assert_allclose(px[0].permute(1, 2, 0).numpy(), manual, atol=1e-6)
    feats = reference_image_features(fx, px)
    g = fx.patches_per_side
    assert fx.tokens_per_image == math.ceil(g / fx.k) ** 2
    assert feats.shape == (2, fx.tokens_per_image, 64)
    assert (feats[0] - feats[1]).abs().max() > 0.1
    if fx.tokens_per_image > 1:
        other = reference_image_features(fx, px, "row" if fx.order == "column" else "column")
        assert not torch.allclose(feats, other)
        m = math.isqrt(fx.tokens_per_image)  # same tokens, transposed grid
        torch.testing.assert_close(other.reshape(2, m, m, -1).transpose(1, 2), feats.reshape(2, m, m, -1))


def test_downsample_by_hand():
    x = torch.arange(1.0, 10.0).reshape(1, 9, 1)  # 3x3 grid, rows 1 2 3 / 4 5 6 / 7 8 9
    row = [[1, 2, 4, 5], [3, 0, 6, 0], [7, 8, 0, 0], [9, 0, 0, 0]]  # zero padding to 4x4, bottom/right
    assert downsample(x, 2, "row")[0].tolist() == row
    assert downsample(x, 2, "column")[0].tolist() == [row[0], row[2], row[1], row[3]]
    for order in ("row", "column"):
        assert downsample(x, 3, order)[0].tolist() == [list(range(1, 10))]
    # 2 channels, 4x4 grid, k=2 (no padding): channel concat in row-major sub-order
    y = torch.stack([torch.arange(16.0), -torch.arange(16.0)], -1).reshape(1, 16, 2)
    out = downsample(y, 2, "row")
    assert out.shape == (1, 4, 8)
    assert out[0, 1].tolist() == [2, -2, 3, -3, 6, -6, 7, -7]
    assert downsample(y, 2, "column")[0, 1].tolist() == [8, -8, 9, -9, 12, -12, 13, -13]
    # 4x4 grid, k=3: pad to 6x6
    z = torch.arange(1.0, 17.0).reshape(1, 16, 1)
    out = downsample(z, 3, "row")[0].tolist()
    assert out == [[1, 2, 3, 5, 6, 7, 9, 10, 11], [4, 0, 0, 8, 0, 0, 12, 0, 0],
                   [13, 14, 15, 0, 0, 0, 0, 0, 0], [16, 0, 0, 0, 0, 0, 0, 0, 0]]
    assert downsample(z, 3, "column")[0].tolist() == [out[0], out[2], out[1], out[3]]


def test_uniform_frame_indices_by_hand():
    assert uniform_frame_indices(8, 3, "round") == [0, 4, 7]  # 3.5 -> 4
    assert uniform_frame_indices(8, 3, "int") == [0, 3, 7]  # 3.5 -> 3
    assert uniform_frame_indices(6, 3, "round") == [0, 2, 5]  # 2.5 -> 2: numpy rounds half to even
    assert uniform_frame_indices(10, 4, "round") == uniform_frame_indices(10, 4, "int") == [0, 3, 6, 9]
    assert uniform_frame_indices(100, 5, "int") == [0, 24, 49, 74, 99]
    assert uniform_frame_indices(100, 5, "round") == [0, 25, 50, 74, 99]  # 24.75, 49.5, 74.25
    assert uniform_frame_indices(3, 5, "int") == [0, 1, 2]  # short clip: all frames
    assert uniform_frame_indices(3, 5, "round") == [0, 0, 1, 2, 2]  # NVILA code repeats frames
    assert uniform_frame_indices(1, 4, "int") == [0]
    assert uniform_frame_indices(0, 4) == [] and uniform_frame_indices(5, 0) == []
