"""Qwen3-VL parity with transformers on tiny random checkpoints (fp32, CPU): pixels, grids,
expanded ids, interleaved M-RoPE positions, logits (DeepStack included) and greedy tokens."""
import json

import pytest
import torch

import tinyvila
from fixtures_images import draw_image
from fixtures_qwen3 import build_qwen3_vl
from test_qwen2_5_vl import banned_ids, check_image_parity, hf_greedy, hf_inputs, user


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory):
    """Two checkpoints: untied lm_head (8B-like) and tied embeddings (2B/4B-like)."""
    out = {}
    for name, tied in {"untied": False, "tied": True}.items():
        d = tmp_path_factory.mktemp(f"qwen3_{name}")
        _, ids = build_qwen3_vl(d, tied=tied, seed=int(tied))
        out[name] = (d, ids, tinyvila.load(d, device="cpu", dtype="float32"))
    return out


_HF = {}


def hf_model(path):
    from transformers import Qwen3VLForConditionalGeneration

    if path not in _HF:
        _HF[path] = Qwen3VLForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()
    return _HF[path]


def test_config_and_stop_ids(qwen3):
    _, ids, eng = qwen3["untied"]
    text = eng.model.cfg.text
    assert text.qk_norm and text.mrope_interleaved and text.mrope_section == [6, 5, 5] and text.head_dim == 32
    assert eng.model.language_model.deepstack_layers == 2
    assert eng.stop_ids == {ids["im_end"], ids["endoftext"]}
    assert qwen3["tied"][2].model.cfg.text.tie_word_embeddings


def test_interleaved_mrope_tables_equal_transformers():
    """The real sections (head_dim 128, [24, 20, 20]) on random (t, h, w) positions."""
    from transformers import Qwen3VLTextConfig
    from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLTextRotaryEmbedding

    from tinyvila.models.layers import mrope_axes, rope_cos_sin, rope_inv_freq

    cfg = Qwen3VLTextConfig(head_dim=128, rope_parameters={"rope_type": "default", "rope_theta": 5000000.0,
                                                           "mrope_section": [24, 20, 20], "mrope_interleaved": True})
    positions = torch.randint(0, 500, (3, 40))
    ref_cos, ref_sin = Qwen3VLTextRotaryEmbedding(cfg)(torch.zeros(1, dtype=torch.float32), positions[:, None])
    cos, sin = rope_cos_sin(positions, rope_inv_freq(128, 5000000.0, None), [24, 20, 20], mrope_axes([24, 20, 20], 64))
    assert torch.allclose(cos, ref_cos[0], atol=1e-6) and torch.allclose(sin, ref_sin[0], atol=1e-6)
    chunked, _ = rope_cos_sin(positions, rope_inv_freq(128, 5000000.0, None), [24, 20, 20])
    assert not torch.allclose(chunked, cos, atol=1e-3)  # Qwen2.5-VL's layout differs


def test_decode_step_kernels_equal_the_prefill_path(qwen3):
    """Attention.decode (RoPE-append with the q/k norms fused, decode attention kernel; Triton
    interpreted on the CPU) gives the output and cache row of the module path for the next token."""
    from tinyvila.kv_cache import KVCache

    lm = qwen3["untied"][2].model.language_model
    cfg, attn = lm.cfg, lm.layers[0].self_attn
    torch.manual_seed(0)
    x = torch.randn(6, cfg.hidden_size)
    positions = torch.stack([torch.arange(6), torch.arange(6) * 2, torch.arange(6) * 3])
    cos, sin = lm.rope_tables(positions, x.dtype)
    caches = [KVCache(1, cfg.num_key_value_heads, cfg.head_dim, 16, torch.device("cpu"), torch.float32) for _ in "ab"]
    with torch.no_grad():
        ref = attn(x, cos, sin, caches[0].layer(0), 0, lm.attention_mask(6, 0, x.device))[-1:]
        attn(x[:5], cos[:5], sin[:5], caches[1].layer(0), 0, lm.attention_mask(5, 0, x.device))
        slot = torch.tensor([5])
        out = attn.decode(x[5:], cos[5:], sin[5:], caches[1].layer(0), slot, torch.tensor([6], dtype=torch.int32),
                          None, None)
    assert (out - ref).abs().max() <= 1e-4
    assert torch.allclose(caches[1].k[0, :, 5], caches[0].k[0, :, 5], atol=1e-5)


@pytest.mark.parametrize("name", ["untied", "tied"])
def test_text_only_parity(qwen3, name):
    path, ids, eng = qwen3[name]
    inputs = hf_inputs(path, ids, [user(0, "Say something about colours.")])
    model = hf_model(path)
    with torch.no_grad():
        ref = model(input_ids=inputs["input_ids"]).logits[0]
    assert (eng.logits("Say something about colours.") - ref).abs().max().item() <= 1e-4
    r = eng.generate("Say something about colours.", max_new_tokens=12, temperature=0, ignore_eos=True)
    assert r.token_ids == hf_greedy(model, {"input_ids": inputs["input_ids"]}, 12, banned_ids(eng))


@pytest.mark.parametrize("name,size", [("untied", (200, 150)), ("untied", (90, 260)), ("tied", (140, 140))])
def test_image_parity_with_transformers(qwen3, name, size):
    item, r = check_image_parity(qwen3[name], hf_model(qwen3[name][0]), draw_image(*size, seed=sum(size)), 16)
    assert r.stats.visual_tokens == item.n_tokens


def test_encoder_features_equal_transformers(qwen3):
    """Main merger output, then each DeepStack merger's, per visual token."""
    path, _, eng = qwen3["untied"]
    items = [eng.model.prepare_image(draw_image(120, 90, seed=1)), eng.model.prepare_image(draw_image(64, 200, seed=2))]
    with torch.no_grad():
        out = hf_model(path).model.visual(torch.cat([it.pixels for it in items]),
                                          grid_thw=torch.tensor([it.grid for it in items]))
    ref = torch.cat([out.pooler_output] + list(out.deepstack_features), dim=1)
    ours = torch.cat(eng.model.encode(items))
    assert ours.shape == (sum(it.n_tokens for it in items), 3 * 64)
    assert (ours - ref).abs().max().item() <= 1e-4


def test_deepstack_changes_the_answer(qwen3):
    """Without the DeepStack additions the logits move: the parity tests above do check them."""
    _, _, eng = qwen3["untied"]
    img = draw_image(160, 128, seed=9)
    with_stack = eng.logits("What is shown here?", images=[img])
    lm = eng.model.language_model
    split = lm.split_deepstack
    lm.split_deepstack = lambda h: (split(h)[0], None)
    try:
        without = eng.logits("What is shown here?", images=[img])
    finally:
        del lm.split_deepstack
    assert (with_stack - without).abs().max().item() > 1e-2


def test_different_images_give_different_answers(qwen3):
    _, _, eng = qwen3["untied"]
    a = eng.logits("What is shown here?", images=[draw_image(128, 128, seed=1)])[-1]
    b = eng.logits("What is shown here?", images=[draw_image(128, 128, seed=2)])[-1]
    assert (a - b).abs().max().item() > 1e-2


def test_two_images_in_one_prompt(qwen3):
    path, ids, eng = qwen3["untied"]
    imgs = [draw_image(120, 90, seed=1), draw_image(60, 160, seed=2)]
    inputs = hf_inputs(path, ids, [user(2, "Compare them.")], imgs)
    model = hf_model(path)
    with torch.no_grad():
        ref = model(**inputs).logits[0]
    assert (eng.logits("Compare them.", images=imgs) - ref).abs().max().item() <= 1e-4
    r = eng.generate("Compare them.", images=imgs, max_new_tokens=12, temperature=0, ignore_eos=True)
    assert r.token_ids == hf_greedy(model, inputs, 12, banned_ids(eng))


def test_two_turn_session_equals_one_shot(qwen3):
    path, ids, eng = qwen3["tied"]
    img = draw_image(224, 200, seed=5)
    with eng.session(images=[img]) as s:
        first = s.ask("Describe it.", max_new_tokens=6, temperature=0, ignore_eos=True)
        second = s.ask("And the colours?", max_new_tokens=10, temperature=0, ignore_eos=True)
    assert second.stats.vision_s == 0 and second.stats.prefill_tokens < second.stats.visual_tokens
    messages = [user(1, "Describe it."), {"role": "assistant", "content": [{"type": "text", "text": first.text}]},
                user(0, "And the colours?")]
    assert second.token_ids == hf_greedy(hf_model(path), hf_inputs(path, ids, messages, [img]), 10, banned_ids(eng))


# ---------------------------------------------------------------------------------- video

def hf_video_ids(path, messages, pairs, image_tokens=()):
    """input_ids as Qwen3VLProcessor writes them: each video wrapper of the template replaced by
    "<t seconds><|vision_start|>" + pads + "<|vision_end|>" per frame pair (its video processor needs
    torchvision, so the replacement is done here, with the processor's own timestamp function)."""
    from transformers import AutoTokenizer
    from transformers.models.qwen3_vl.processing_qwen3_vl import Qwen3VLProcessor

    tok = AutoTokenizer.from_pretrained(path)
    template = json.loads((path / "chat_template.json").read_text())["chat_template"]
    text = tok.apply_chat_template(messages, chat_template=template, tokenize=False, add_generation_prompt=True)
    for indices, fps, n in pairs:
        times = Qwen3VLProcessor._calculate_timestamps(None, indices, fps, 2)
        text = text.replace("<|vision_start|><|video_pad|><|vision_end|>", "".join(
            f"<{t:.1f} seconds><|vision_start|>" + "<|video_pad|>" * n + "<|vision_end|>" for t in times), 1)
    pieces = text.split("<|image_pad|>")
    text = pieces[0] + "".join("<|image_pad|>" * n + p for n, p in zip(image_tokens, pieces[1:]))
    return tok(text, return_tensors="pt")["input_ids"]


def test_video_timestamps_positions_and_greedy(qwen3):
    path, ids, eng = qwen3["untied"]
    frames = [draw_image(112, 84, seed=k) for k in range(7)]  # odd: the last frame repeats
    with eng.session(videos=[frames]) as s:
        pairs = list(s.pending)
        keys, spans = s.expand(eng.encode_text(eng.render([s.user_message("What happens?", s.pending)])), pairs)
        positions = eng.model.positions(len(keys), spans, pairs, "cpu")
    assert len(pairs) == 4 and [p.seconds for p in pairs] == [0.25, 1.25, 2.25, 3.0]
    n = pairs[0].n_tokens
    input_ids = hf_video_ids(path, [user(1, "What happens?", kind="video")], [(list(range(7)), 2.0, n)])
    assert [k if k >= 0 else ids["video_pad"] for k in keys] == input_ids[0].tolist()
    grid = torch.tensor([[len(pairs), *pairs[0].grid[1:]]])
    mm = (input_ids == ids["video_pad"]).int() * 2
    model = hf_model(path)
    ref_pos, _ = model.model.get_rope_index(input_ids, mm, video_grid_thw=grid)
    assert torch.equal(positions, ref_pos[:, 0])
    inputs = dict(input_ids=input_ids, pixel_values_videos=torch.cat([p.pixels for p in pairs]), video_grid_thw=grid,
                  mm_token_type_ids=mm)
    with torch.no_grad():
        ref = model(**inputs).logits[0]
    assert (eng.logits("What happens?", videos=[frames]) - ref).abs().max().item() <= 1e-4
    r = eng.generate("What happens?", videos=[frames], max_new_tokens=10, temperature=0, ignore_eos=True)
    assert r.token_ids == hf_greedy(model, inputs, 10, banned_ids(eng))


def test_image_and_video_in_one_prompt(qwen3):
    """DeepStack rows of images and videos land at their own positions."""
    path, ids, eng = qwen3["untied"]
    img, frames = draw_image(112, 84, seed=11), [draw_image(84, 84, seed=k) for k in range(4)]
    with eng.session(images=[img], videos=[frames]) as s:
        image, *pairs = s.pending
    hf_messages = [{"role": "user", "content": [{"type": "image"}, {"type": "video"},
                                                {"type": "text", "text": "Which matches?"}]}]
    input_ids = hf_video_ids(path, hf_messages, [(list(range(4)), 2.0, pairs[0].n_tokens)], [image.n_tokens])
    mm = (input_ids == ids["image_pad"]).int() + 2 * (input_ids == ids["video_pad"]).int()
    with torch.no_grad():
        ref = hf_model(path)(input_ids=input_ids, pixel_values=image.pixels, image_grid_thw=torch.tensor([image.grid]),
                             pixel_values_videos=torch.cat([p.pixels for p in pairs]),
                             video_grid_thw=torch.tensor([[len(pairs), *pairs[0].grid[1:]]]),
                             mm_token_type_ids=mm).logits[0]
    ours = eng.logits("Which matches?", images=[img], videos=[frames])
    assert (ours - ref).abs().max().item() <= 1e-4


@pytest.mark.parametrize("options", [{}, dict(sparsity="video")])
def test_follow_up_positions_from_the_layout_equal_the_familys(qwen3, tmp_path, options):
    """Session.positions reuses the media layout's positions turn after turn: after a timestamped
    video and an image (kept whole or pruned) they must equal the family's for the whole prompt."""
    from fixtures_images import write_video
    from test_short_prefill import check_positions_every_turn

    _, _, eng = qwen3["tied"]
    video = write_video(tmp_path / "clip.mp4", [draw_image(96, 64, seed=k) for k in range(8)], fps=4)
    with eng.session(videos=[str(video)], images=[draw_image(120, 90, seed=3)], **options) as s:
        assert check_positions_every_turn(eng, s) == bool(options)


def test_video_sampling_and_size():
    from tinyvila.models.qwen3_vl import frame_pair_times, video_frame_indices, video_size

    assert video_frame_indices(240, 24.0) == [round(i * 239 / 19) for i in range(20)]  # 10 s at 2 fps
    assert len(video_frame_indices(30, 30.0)) == 4  # 1 s: at least 4 frames
    assert len(video_frame_indices(3000, 10.0, max_frames=16)) == 16
    assert frame_pair_times([0, 12, 24], 24.0) == [0.25, 1.0]
    h, w = video_size(8, 480, 640, 32, 2, 128 * 32 * 32, 768 * 32 * 32)
    assert h % 32 == 0 and w % 32 == 0 and 8 * h * w <= 768 * 32 * 32


def test_bad_frame_lists_are_one_line_media_errors(qwen3):
    from PIL import Image

    from tinyvila.errors import MediaError

    _, _, eng = qwen3["untied"]
    for frames, message in (([draw_image(40, 30)], "has 1 frame"), ([Image.new("RGB", (1, 300))] * 2,
                                                                   "1x300 pixels: an aspect ratio over 200")):
        with pytest.raises(MediaError, match=message) as e:
            eng.session(videos=[frames])
        assert "\n" not in str(e.value)


def test_video_file_through_decord(qwen3, tmp_path):
    from fixtures_images import write_video

    path = write_video(tmp_path / "clip.mp4", [draw_image(112, 84, seed=k) for k in range(24)], fps=8)
    _, _, eng = qwen3["untied"]
    with eng.session(videos=[path]) as s:
        pairs = list(s.pending)  # 3 s at 8 fps -> 6 frames at 2 fps -> 3 pairs
        r = s.ask("What happens?", max_new_tokens=4, temperature=0, ignore_eos=True)
    from tinyvila.models.qwen3_vl import frame_pair_times, video_frame_indices

    assert [p.seconds for p in pairs] == frame_pair_times(video_frame_indices(24, 8.0), 8.0) == [0.3125, 1.4375, 2.5625]
    assert r.stats.visual_tokens == sum(p.n_tokens for p in pairs) and len(r.token_ids) == 4


def test_bad_videos_in_the_cli(qwen3, tmp_path):
    """A corrupt video and a video with zero frames: one error line, exit status 2, no traceback."""
    import subprocess
    import sys

    from fixtures_images import write_zero_frame_video

    corrupt = tmp_path / "corrupt.mp4"
    corrupt.write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 8)
    zero = write_zero_frame_video(tmp_path / "zero.mp4")
    for path in (corrupt, zero):
        proc = subprocess.run([sys.executable, "-m", "tinyvila.chat", str(qwen3["untied"][0]), "--video", str(path),
                               "-p", "What happens?", "--device", "cpu"], capture_output=True, text=True, timeout=120)
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
        assert len(lines) == 1 and lines[0].startswith("error: ") and path.name in lines[0], proc.stderr


# ---------------------------------------------------------------------------------- sparsity

def hf_saliency(path, item):
    """Mean attention each patch receives in transformers' last vision block (the one the merger
    reads), over its image or frame pair, mean over heads, averaged over each merge group."""
    from transformers.models.qwen3_vl.modeling_qwen3_vl import apply_rotary_pos_emb_vision

    visual = hf_model(path).model.visual
    seen = {}
    attn = visual.blocks[-1].attn
    hook = attn.register_forward_hook(lambda m, args, kwargs, out: seen.update(kwargs, x=args[0] if args else None),
                                      with_kwargs=True)
    try:
        with torch.no_grad():
            visual(item.pixels, grid_thw=torch.tensor([item.grid]))
    finally:
        hook.remove()
    x = seen["x"] if seen["x"] is not None else seen["hidden_states"]
    with torch.no_grad():
        q, k, _ = attn.qkv(x).reshape(x.shape[0], 3, attn.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
        q, k = apply_rotary_pos_emb_vision(q, k, *seen["position_embeddings"])
    cu = seen["cu_seqlens"].tolist()
    col = torch.zeros(x.shape[0])
    for s, e in zip(cu[:-1], cu[1:]):
        scores = torch.einsum("qhd,khd->hqk", q[s:e], k[s:e]) * attn.scaling
        col[s:e] = scores.softmax(-1).mean((0, 1))
    return col.view(-1, 4).mean(-1)


def test_saliency_matches_transformers(qwen3):
    path, _, eng = qwen3["untied"]
    with eng.session(prefill_sparsity=0.5, images=[draw_image(200, 150, seed=1)]) as s:
        item = s.pending[0]
        s.ask("Describe it.", max_new_tokens=2)
        v = s.visual[0]
    saliency = hf_saliency(path, item)
    assert torch.allclose(v.saliency, saliency, rtol=1e-4, atol=1e-8)
    k = -(-item.n_tokens // 2)
    assert v.kept.tolist() == sorted(saliency.topk(k).indices.tolist())


def test_p0_and_d0_are_token_for_token_dense(qwen3):
    _, _, eng = qwen3["untied"]
    media = dict(images=[draw_image(150, 120, seed=4)], videos=[[draw_image(96, 64, seed=k) for k in range(4)]])
    dense = eng.generate("Describe it.", max_new_tokens=8, ignore_eos=True, temperature=0, **media)
    zero = eng.generate("Describe it.", max_new_tokens=8, ignore_eos=True, temperature=0, prefill_sparsity=0.0,
                        decode_sparsity=0.0, position_mode="original", **media)
    assert dense.token_ids == zero.token_ids and dense.stats.prefill_tokens == zero.stats.prefill_tokens


@pytest.mark.parametrize("mode", ["compact", "original"])
def test_pruned_prompt_carries_the_kept_deepstack_rows(qwen3, mode):
    """Under prefill pruning the LLM sees the kept tokens' main and DeepStack features only, at the
    position mode's ids: the logits equal transformers' language model fed exactly those."""
    path, ids, eng = qwen3["untied"]
    img = draw_image(200, 150, seed=7)
    with eng.session(prefill_sparsity=0.6, position_mode=mode, images=[img]) as s:
        item = s.pending[0]
        ids_ = eng.encode_text(eng.render([s.user_message("What is shown here?", s.pending)]))
        s.encode_new(s.expand(ids_, s.pending)[1], s.pending)
        keys, spans = s.expand(ids_, s.pending)
        h, positions = s.inputs(ids_)
        ours = s.logits(ids_)
        kept = s.visual[0].kept
    full = eng.model.encode([item])[0]
    assert kept.numel() < item.n_tokens and spans[0][1] - spans[0][0] == kept.numel()
    # main and DeepStack columns follow the kept tokens (the saliency pass rounds a little differently)
    assert s.features[0].shape == (kept.numel(), 3 * 64) and torch.allclose(s.features[0], full[kept], atol=1e-5)
    vis = torch.tensor([k < 0 for k in keys])
    C = eng.model.cfg.text.hidden_size
    model = hf_model(path)
    with torch.no_grad():
        embeds = model.model.language_model.embed_tokens(torch.tensor([max(k, 0) for k in keys]))
        embeds[vis] = full[kept, :C]
        stack = [full[kept, C * (i + 1):C * (i + 2)] for i in range(2)]
        out = model.model.language_model(inputs_embeds=embeds[None], position_ids=positions[:, None],
                                         visual_pos_masks=vis[None], deepstack_visual_embeds=stack)
        ref = model.lm_head(out.last_hidden_state)[0]
    assert (ours - ref).abs().max().item() <= 1e-4


def test_positions_of_a_pruned_item_hand_checked(qwen3):
    from tinyvila.sparsity import VisualTokens

    model = qwen3["untied"][2].model
    # 4x6 patches -> 2x3 tokens after 3 text tokens, then 2 text tokens; kept (0,0), (0,2), (1,2).
    img = type("Item", (), dict(grid=(1, 4, 6), n_tokens=6))()
    kept = {0: VisualTokens(6, torch.tensor([0, 2, 5]))}
    compact = model.positions(8, [(3, 6, 0)], [img], "cpu", kept, "compact")
    assert compact.tolist() == [[0, 1, 2, 3, 3, 3, 5, 6],
                                [0, 1, 2, 3, 3, 4, 5, 6],
                                [0, 1, 2, 3, 4, 4, 5, 6]]
    original = model.positions(8, [(3, 6, 0)], [img], "cpu", kept, "original")
    assert original.tolist() == [[0, 1, 2, 3, 3, 3, 6, 7],
                                 [0, 1, 2, 3, 3, 4, 6, 7],
                                 [0, 1, 2, 3, 5, 5, 6, 7]]


def test_evicted_history_second_turn_equals_a_fresh_one(qwen3):
    """history="evict" with decode retrieval: the media are prefilled apart from the question
    (DeepStack rows with them), and the next turn reuses them as a fresh conversation would."""
    _, _, eng = qwen3["untied"]
    img = draw_image(200, 160, seed=12)
    opts = dict(history="evict", decode_sparsity=0.5)
    with eng.session(images=[img], **opts) as s:
        s.ask("Describe it.", max_new_tokens=5, ignore_eos=True, temperature=0)
        second = s.ask("What colour?", max_new_tokens=8, ignore_eos=True, temperature=0)
    fresh = eng.generate("What colour?", images=[img], max_new_tokens=8, ignore_eos=True, temperature=0, **opts)
    assert second.stats.vision_s == 0 and second.token_ids == fresh.token_ids


@pytest.mark.parametrize("preset", ["image", "video", "fastv", "fastv:k=1,r=0.5", "visionzip"])
def test_sparsity_presets_run_and_prune(qwen3, preset):
    _, _, eng = qwen3["untied"]
    media = dict(images=[draw_image(224, 200, seed=3)], videos=[[draw_image(96, 64, seed=k) for k in range(4)]])
    with eng.session(sparsity=preset, **media) as s:
        first = s.ask("Describe them.", max_new_tokens=6, ignore_eos=True, temperature=0)
        second = s.ask("And then?", max_new_tokens=6, ignore_eos=True, temperature=0)
    assert first.stats.visual_tokens_kept < first.stats.visual_tokens
    assert len(first.token_ids) == len(second.token_ids) == 6
    if preset in ("image", "video"):
        assert first.stats.visual_tokens_selected < first.stats.visual_tokens_kept


# ---------------------------------------------------------------------------------- the server

def test_image_and_video_through_the_server(qwen3, tmp_path):
    """The OpenAI-compatible server runs the family's media as the engine does (a video's frame
    pairs and their timestamps included)."""
    import base64
    import signal

    from fixtures_images import write_video
    from test_serve import KEY, LiveServer, data_url, user as chat_user

    path, _, eng = qwen3["tied"]
    img = draw_image(120, 90, seed=2)
    video = write_video(tmp_path / "clip.mp4", [draw_image(96, 64, seed=k) for k in range(8)], fps=4)
    server = LiveServer(tmp_path, path, "--api-key", KEY, "--sparsity", "dense")
    try:
        for media, url, kind in ((dict(images=[img]), data_url(img), "image"),
                                 (dict(videos=[str(video)]),
                                  "data:video/mp4;base64," + base64.b64encode(video.read_bytes()).decode(), "video")):
            ref = eng.generate("What is it?", temperature=0, max_new_tokens=8, **media)
            r = server.client().chat.completions.create(model=str(path), messages=[chat_user("What is it?", url,
                                                                                             kind=kind)],
                                                        temperature=0, max_tokens=8)
            assert r.choices[0].message.content == ref.text
            assert r.model_extra["tinyvila"]["visual_tokens"] == ref.stats.visual_tokens > 0
    finally:
        assert server.stop() in (0, -signal.SIGTERM, 128 + signal.SIGTERM)


# ---------------------------------------------------------------------------------- GPU (pytest -m gpu)

GPU_GREEDY = dict(temperature=0, max_new_tokens=12, ignore_eos=True)


@pytest.mark.gpu
@pytest.mark.parametrize("sparsity", ["dense", "image", "fastv:k=1,r=0.5"])
def test_gpu_fast_path_matches_cpu(qwen3, sparsity):
    """The fused Triton blocks (DeepStack added inside them, FastV pruning before a DeepStack
    layer), the q/k-norm before the RoPE kernels and the decode graph, in fp32 against the CPU."""
    torch.backends.cuda.matmul.allow_tf32 = False
    path, _, cpu = qwen3["untied"]
    gpu = tinyvila.load(path, device="cuda", dtype="float32")
    media = dict(images=[draw_image(200, 150, seed=1)], videos=[[draw_image(112, 84, seed=k) for k in range(6)]])
    a = cpu.logits("What?", sparsity=sparsity, **media) if sparsity != "fastv:k=1,r=0.5" else None
    if a is not None:
        b = gpu.logits("What?", sparsity=sparsity, **media).cpu()
        assert (a - b).abs().max() < 1e-3
    ref = cpu.generate("What happens?", sparsity=sparsity, **GPU_GREEDY, **media)
    out = gpu.generate("What happens?", sparsity=sparsity, **GPU_GREEDY, **media)
    assert out.token_ids == ref.token_ids and out.stats.visual_tokens_kept == ref.stats.visual_tokens_kept


@pytest.mark.gpu
def test_gpu_bf16_conversation_with_image_and_video(qwen3):
    path, _, cpu = qwen3["tied"]
    media = dict(images=[draw_image(200, 150, seed=1)], videos=[[draw_image(112, 84, seed=k) for k in range(6)]])
    bf16 = tinyvila.load(path, device="cuda", dtype="bfloat16")
    ref = cpu.logits("What?", **media)
    cos = torch.nn.functional.cosine_similarity(ref, bf16.logits("What?", **media).cpu().float(), dim=-1)
    assert cos.min() > 0.99
    with bf16.session(**media) as s:
        r = s.ask("What happens?", **GPU_GREEDY)
        r2 = s.ask("And then?", **GPU_GREEDY)
    assert len(r.token_ids) == len(r2.token_ids) == 12 and r2.stats.vision_s == 0


@pytest.mark.gpu
def test_gpu_graphed_encoder_equals_eager(qwen3):
    """The ViT (DeepStack mergers included) replayed as a CUDA graph per image size gives the eager
    features and saliency."""
    path = qwen3["untied"][0]
    graphed = tinyvila.load(path, device="cuda", dtype="float16")
    eager = tinyvila.load(path, device="cuda", dtype="float16", cuda_graphs=False)
    for img in (draw_image(200, 150, seed=1), draw_image(112, 112, seed=2), draw_image(200, 150, seed=3)):
        for saliency in (False, True):
            a = graphed.model.encode([graphed.model.prepare_image(img)], saliency=saliency)[0]
            b = eager.model.encode([eager.model.prepare_image(img)], saliency=saliency)[0]
            for x, y in zip(a, b) if saliency else [(a, b)]:
                assert torch.equal(x, y)
    assert graphed.model.visual.graphed and not eager.model.visual.graphed


def test_eval_runs_images_and_videos(qwen3, tmp_path, capsys):
    """tinyvila-eval through the family interface: an image sample and a video sample (its frame
    pairs), dense and the video preset."""
    from fixtures_images import write_video
    from tinyvila.tools.eval import main

    draw_image(150, 120, seed=1).save(tmp_path / "img.png")
    write_video(tmp_path / "clip.mp4", [draw_image(96, 64, seed=k) for k in range(12)], fps=4)
    samples = [{"id": "i", "image": "img.png", "question": "What colour?", "answers": ["red"], "metric": "exact"},
               {"id": "v", "video": "clip.mp4", "num_frames": 6, "question": "Which? A. x B. y", "answers": ["B"],
                "metric": "choice"}]
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(s) + "\n" for s in samples))
    out = tmp_path / "out"
    assert main([str(qwen3["untied"][0]), "--data", str(data), "--configs", "dense,sparsevila:video", "--out",
                 str(out), "--device", "cpu", "--max-new-tokens", "3", "--no-plots"]) == 0
    records = [json.loads(line) for line in (out / "answers.jsonl").read_text().splitlines()]
    assert sorted((r["config"], r["id"]) for r in records) == [("dense", "i"), ("dense", "v"),
                                                                ("sparsevila:video", "i"), ("sparsevila:video", "v")]


@pytest.mark.parametrize("change,message", [
    (lambda c: c.update(architectures=["Qwen3VLMoeForConditionalGeneration"], model_type="qwen3_vl_moe"),
     "unsupported architecture 'Qwen3VLMoeForConditionalGeneration'"),
    (lambda c: c["vision_config"].update(deepstack_visual_indexes=[0, 9]), "deepstack_visual_indexes"),
    (lambda c: c["text_config"]["rope_parameters"].update(mrope_section=[8, 5, 5]), "does not cover head_dim"),
    (lambda c: c["vision_config"].update(out_hidden_size=32), "out_hidden_size 32"),
])
def test_bad_configs_are_clear_errors(qwen3, tmp_path, change, message):
    """The MoE models and inconsistent configs: one CheckpointError naming the problem."""
    import shutil

    from tinyvila.errors import CheckpointError

    src = qwen3["untied"][0]
    dst = tmp_path / "bad"
    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    change(config)
    (dst / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=message) as e:
        tinyvila.load(dst, device="cpu")
    assert "\n" not in str(e.value)


def test_quantized_w4a16_llm_and_w8a8_encoder_load_and_answer(qwen3, tmp_path):
    """tinyvila-quantize's AWQ LLM and SmoothQuant encoder on the tiny checkpoint: the result loads
    with 4-bit decoder linears and int8 encoder linears, and stays close to the 16-bit model."""
    from tinyvila.models.quantized import W4Linear, W8A8Linear
    from tinyvila.tools.quantize import quantize

    path, _, eng = qwen3["untied"]
    out = quantize(path, tmp_path / "q", group_size=32, calib_samples=2, calib_seqlen=128, device="cpu",
                   w8a8_vision=True, progress=False, log=lambda m: None)
    q = tinyvila.load(out, device="cpu", dtype="float32")
    kinds = {type(m) for m in q.model.modules()}
    assert W4Linear in kinds and W8A8Linear in kinds
    assert isinstance(q.model.visual.blocks[0].mlp.linear_fc1, W8A8Linear)
    img = draw_image(160, 120, seed=6)
    a, b = eng.logits("What is it?", images=[img]), q.logits("What is it?", images=[img])
    assert torch.nn.functional.cosine_similarity(a, b, dim=-1).mean() > 0.9
    assert len(q.generate("What is it?", images=[img], max_new_tokens=4, ignore_eos=True).token_ids) == 4
