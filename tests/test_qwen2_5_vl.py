"""Qwen2.5-VL parity with transformers on tiny random checkpoints (fp32, CPU).

Images are checked against transformers end to end (pixels, grid, expanded ids, M-RoPE positions,
logits, greedy tokens). Videos follow the original Qwen / vLLM position convention, which
transformers 5.x does not (after a video it advances text positions by max(h, w)/2 only): the
reference for video positions is `reference_positions` below, written from the spec's description
of the original `get_rope_index`; the encoder output and the LLM (fed those positions) are
checked against transformers.
"""
import json

import pytest
import torch
import torch.nn.functional as F

import tinyvila
from fixtures_qwen import build_qwen2_5_vl
from fixtures_images import draw_image, write_audio_only, write_video, write_zero_frame_video


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    """Two checkpoints: untied lm_head with the hub's flat config and key names; tied (like 3B)
    with a nested config and transformers >= 4.52 key names."""
    out = {}
    for name, kw in {"untied": dict(tied=False, config_style="flat", layout="hub"),
                     "tied": dict(tied=True, config_style="nested", layout="module")}.items():
        d = tmp_path_factory.mktemp(f"qwen_{name}")
        _, ids = build_qwen2_5_vl(d, **kw)
        out[name] = (d, ids, tinyvila.load(d, device="cpu", dtype="float32"))
    return out


def hf_model(path):
    from transformers import Qwen2_5_VLForConditionalGeneration

    return Qwen2_5_VLForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()


def hf_inputs(path, ids, messages, images=()):
    """transformers' tokenizer, chat template and PIL image processor, with the processor's pad
    expansion (each <|image_pad|> becomes t*h*w/4 of them) done here: the Qwen2.5-VL and Qwen3-VL
    processors themselves need torchvision for their video half."""
    from transformers import AutoTokenizer, Qwen2VLImageProcessorPil

    tok = AutoTokenizer.from_pretrained(path)
    template = json.loads((path / "chat_template.json").read_text())["chat_template"]
    text = tok.apply_chat_template(messages, chat_template=template, tokenize=False, add_generation_prompt=True)
    inputs = dict(Qwen2VLImageProcessorPil.from_pretrained(path)(images=list(images), return_tensors="pt")) \
        if images else {}
    pieces = text.split("<|image_pad|>")
    counts = [int(g.prod()) // 4 for g in inputs.get("image_grid_thw", [])]
    text = pieces[0] + "".join("<|image_pad|>" * n + p for n, p in zip(counts, pieces[1:]))
    inputs["input_ids"] = tok(text, return_tensors="pt")["input_ids"]
    inputs["mm_token_type_ids"] = (inputs["input_ids"] == ids["image_pad"]).int()
    return inputs


def user(n_images, text, kind="image"):
    return {"role": "user", "content": [{"type": kind}] * n_images + [{"type": "text", "text": text}]}


def hf_greedy(model, inputs, n, banned):
    out = model.generate(**inputs, max_new_tokens=n, do_sample=False, suppress_tokens=banned, eos_token_id=None,
                         repetition_penalty=1.0, pad_token_id=0, temperature=None, top_k=None, top_p=None)
    return out[0, inputs["input_ids"].shape[1]:].tolist()


def banned_ids(eng):
    return eng.banned.nonzero().flatten().tolist()


def check_image_parity(entry, model, img, new_tokens):
    """One image and a question against transformers' `model`, step by step: preprocessing, the
    expanded prompt, M-RoPE positions, logits, greedy tokens (Qwen2.5-VL and Qwen3-VL share every
    step). Returns (the media item, the greedy result)."""
    path, ids, eng = entry
    inputs = hf_inputs(path, ids, [user(1, "What is shown here?")], [img])
    item = eng.model.prepare_image(img)
    assert item.grid == tuple(inputs["image_grid_thw"][0].tolist())
    assert torch.allclose(item.pixels, inputs["pixel_values"], atol=1e-5)
    with eng.session(images=[img]) as s:
        keys, spans = s.expand(eng.encode_text(eng.render([user(1, "What is shown here?")])), s.pending)
        positions = eng.model.positions(len(keys), spans, s.pending, "cpu")
    assert [k if k >= 0 else ids["image_pad"] for k in keys] == inputs["input_ids"][0].tolist()
    ref_pos, _ = model.model.get_rope_index(inputs["input_ids"], inputs["mm_token_type_ids"],
                                            image_grid_thw=inputs["image_grid_thw"])
    assert torch.equal(positions, ref_pos[:, 0])
    ours = eng.logits("What is shown here?", images=[img])
    with torch.no_grad():
        ref = model(**inputs).logits[0]
    assert (ours - ref).abs().max().item() <= 1e-4
    r = eng.generate("What is shown here?", images=[img], max_new_tokens=new_tokens, temperature=0, ignore_eos=True)
    assert r.token_ids == hf_greedy(model, inputs, new_tokens, banned_ids(eng))
    return item, r


IMAGES = [(200, 150), (90, 220), (140, 140)]


@pytest.mark.parametrize("bounds", [[(0, 4), (4, 8), (8, 12)], [(0, 4), (4, 7), (7, 11), (11, 12)]])
def test_segment_attention_views_and_gathers(bounds):
    """Back-to-back segments of one length are attended through a view, others through a gather;
    both equal attention computed segment by segment."""
    from tinyvila.models.qwen2_5_vl import segment_attention, segment_groups

    q, k, v = torch.randn(3, 12, 2, 8).unbind(0)
    groups = segment_groups(bounds, "cpu")
    assert (groups[0][3] is None) == (len(bounds) == 3)  # all of length 4 back to back: no index
    ref = torch.cat([F.scaled_dot_product_attention(*(t[s:e].transpose(0, 1) for t in (q, k, v))).transpose(0, 1)
                     for s, e in bounds])
    assert torch.allclose(segment_attention(q, k, v, groups), ref, atol=1e-6)


@pytest.mark.parametrize("name", ["untied", "tied"])
@pytest.mark.parametrize("size", IMAGES)
def test_image_parity_with_transformers(qwen, name, size):
    item, r = check_image_parity(qwen[name], hf_model(qwen[name][0]), draw_image(*size, seed=sum(size)), 20)
    assert r.stats.visual_tokens == item.n_tokens


def test_two_images_in_one_prompt(qwen):
    path, ids, eng = qwen["untied"]
    imgs = [draw_image(120, 90, seed=1), draw_image(60, 160, seed=2)]
    inputs = hf_inputs(path, ids, [user(2, "Compare them.")], imgs)
    model = hf_model(path)
    with torch.no_grad():
        ref = model(**inputs).logits[0]
    assert (eng.logits("Compare them.", images=imgs) - ref).abs().max().item() <= 1e-4
    banned = eng.banned.nonzero().flatten().tolist()
    r = eng.generate("Compare them.", images=imgs, max_new_tokens=20, temperature=0, ignore_eos=True)
    assert r.token_ids == hf_greedy(model, inputs, 20, banned)


def test_two_turn_session_equals_one_shot(qwen):
    path, ids, eng = qwen["tied"]
    img = draw_image(224, 200, seed=5)
    with eng.session(images=[img]) as s:
        first = s.ask("Describe it.", max_new_tokens=6, temperature=0, ignore_eos=True)
        second = s.ask("And the colours?", max_new_tokens=12, temperature=0, ignore_eos=True)
    assert second.stats.vision_s == 0 and second.stats.prefill_tokens < second.stats.visual_tokens
    messages = [user(1, "Describe it."), {"role": "assistant", "content": [{"type": "text", "text": first.text}]},
                user(0, "And the colours?")]
    banned = eng.banned.nonzero().flatten().tolist()
    assert second.token_ids == hf_greedy(hf_model(path), hf_inputs(path, ids, messages, [img]), 12, banned)


def test_stop_ids_come_from_generation_config(qwen):
    _, ids, eng = qwen["untied"]
    assert eng.stop_ids == {ids["im_end"], ids["endoftext"]}
    assert eng.image_token_id == ids["image_pad"] and eng.video_token_id == ids["video_pad"]


# ---------------------------------------------------------------------------------- video

def reference_positions(tokens, image_id, video_id, grids, seconds_per_grid, tokens_per_second, merge=2):
    """The original Qwen2.5-VL / vLLM get_rope_index, written out token by token from the spec:
    text runs continue from the next free id; a visual item's ids are base + (t', y, x) with
    t' = floor(t * seconds_per_grid * tokens_per_second); the next free id is the largest used + 1."""
    pos, nxt, i, item = [], 0, 0, 0
    while i < len(tokens):
        if tokens[i] not in (image_id, video_id):
            pos.append((nxt, nxt, nxt))
            nxt += 1
            i += 1
            continue
        t, h, w = grids[item]
        spg = seconds_per_grid[item] if tokens[i] == video_id else 0.0
        base = nxt
        for ti in range(t):
            for y in range(h // merge):
                for x in range(w // merge):
                    pos.append((base + int(ti * spg * tokens_per_second), base + y, base + x))
        i += t * (h // merge) * (w // merge)
        nxt = max(max(p) for p in pos) + 1
        item += 1
    return torch.tensor(pos).T


def test_video_encoder_positions_and_greedy(qwen):
    path, ids, eng = qwen["untied"]
    frames = [draw_image(112, 84, seed=k) for k in range(7)]  # odd: the last frame repeats
    model = hf_model(path)
    with eng.session(videos=[frames]) as s:
        item = s.pending[0]
        assert item.kind == "video" and item.grid[0] == 4  # 7 frames -> 8 -> 4 temporal slices
        assert item.second_per_grid_t == 1.0  # frame lists are taken as sampled at 2 fps
        with torch.no_grad():
            ref_feats = model.model.visual(item.pixels, grid_thw=torch.tensor([item.grid])).pooler_output
        assert (eng.model.encode([item])[0] - ref_feats).abs().max() <= 1e-4
        prompt = eng.encode_text(eng.render([user(1, "What happens?", kind="video")]))
        keys, spans = s.expand(prompt, s.pending)
        ours_pos = eng.model.positions(len(keys), spans, s.pending, "cpu")
    tokens = [k if k >= 0 else ids["video_pad"] for k in keys]
    ref_pos = reference_positions(tokens, ids["image_pad"], ids["video_pad"], [item.grid], [1.0], 2)
    assert torch.equal(ours_pos, ref_pos)
    # transformers' LLM fed the same positions: same logits, and the same greedy continuation
    # (each step recomputed in full, the next text position = max + 1).
    r = eng.generate("What happens?", videos=[frames], max_new_tokens=8, temperature=0, ignore_eos=True)
    banned = eng.banned.nonzero().flatten().tolist()
    seq, pos = list(tokens), ref_pos
    for _ in range(8):
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([seq]), pixel_values_videos=item.pixels,
                           video_grid_thw=torch.tensor([item.grid]), position_ids=pos[:, None],
                           mm_token_type_ids=(torch.tensor([seq]) == ids["video_pad"]).int() * 2).logits[0, -1]
        logits[banned] = -float("inf")
        seq.append(int(logits.argmax()))
        pos = torch.cat([pos, pos.max(dim=1, keepdim=True).values.max().expand(3, 1) + 1], dim=1)
    assert r.token_ids == seq[len(tokens):]


def test_video_file_through_decord(qwen, tmp_path):
    """A video file written in the test, read with decord and sampled at 2 fps from its own rate."""
    # 2 s at 8 fps -> 4 frames sampled at 2 fps
    path = write_video(tmp_path / "clip.mp4", [draw_image(112, 84, seed=k) for k in range(16)], fps=8)
    _, ids, eng = qwen["untied"]
    with eng.session(videos=[path]) as s:
        item = s.pending[0]
        assert item.grid[0] == 2 and item.second_per_grid_t == pytest.approx(1.0)
        r = s.ask("What happens?", max_new_tokens=4, temperature=0, ignore_eos=True)
    assert r.stats.visual_tokens == item.n_tokens and len(r.token_ids) == 4


def test_image_and_video_in_one_prompt(qwen):
    path, ids, eng = qwen["untied"]
    img, frames = draw_image(112, 84, seed=11), [draw_image(84, 84, seed=k) for k in range(4)]
    model = hf_model(path)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "video"},
                                             {"type": "text", "text": "Which matches?"}]}]
    with eng.session(images=[img], videos=[frames]) as s:
        image, video = s.pending
        keys, spans = s.expand(eng.encode_text(eng.render(messages)), s.pending)
        ours_pos = eng.model.positions(len(keys), spans, s.pending, "cpu")
    tokens = [k if k >= 0 else (ids["image_pad"] if k == -1 else ids["video_pad"]) for k in keys]
    ref_pos = reference_positions(tokens, ids["image_pad"], ids["video_pad"], [image.grid, video.grid],
                                  [0.0, video.second_per_grid_t], 2)
    assert torch.equal(ours_pos, ref_pos)
    t = torch.tensor([tokens])
    with torch.no_grad():
        ref = model(input_ids=t, pixel_values=image.pixels, image_grid_thw=torch.tensor([image.grid]),
                    pixel_values_videos=video.pixels, video_grid_thw=torch.tensor([video.grid]),
                    position_ids=ref_pos[:, None],
                    mm_token_type_ids=(t == ids["image_pad"]).int() + 2 * (t == ids["video_pad"]).int()).logits[0]
    ours = eng.logits("Which matches?", images=[img], videos=[frames])
    assert (ours - ref).abs().max().item() <= 1e-4


def test_pixel_budget_options(qwen):
    _, _, eng = qwen["untied"]
    img = draw_image(224, 224, seed=3)
    big = eng.session(images=[img]).pending[0]
    small = eng.session(images=[img], max_pixels=112 * 112).pending[0]
    assert big.grid == (1, 16, 16) and small.grid == (1, 8, 8)



def test_media_option_of_another_family_is_an_error(llava_vicuna):
    """fps means nothing to an image-only family: a clear error, not a silent no-op."""
    with pytest.raises(tinyvila.TinyVilaError, match="does not take fps"):
        tinyvila.load(llava_vicuna, device="cpu", fps=1.0)


def test_bad_videos_in_the_cli(qwen, tmp_path):
    """A corrupt video, a video with zero frames and a file with no video stream: one error line,
    exit status 2, no traceback, from the command line as a user runs it."""
    import subprocess
    import sys

    corrupt = tmp_path / "corrupt.mp4"
    corrupt.write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 8)
    zero = write_zero_frame_video(tmp_path / "zero.mp4")
    audio = write_audio_only(tmp_path / "sound.mkv")
    for path in (corrupt, zero, audio):
        proc = subprocess.run([sys.executable, "-m", "tinyvila.chat", str(qwen["untied"][0]), "--video", str(path),
                               "-p", "What happens?", "--device", "cpu"], capture_output=True, text=True, timeout=120)
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
        assert len(lines) == 1 and lines[0].startswith("error: ") and path.name in lines[0], proc.stderr
