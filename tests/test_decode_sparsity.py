"""Decode sparsity (spec method.md, stage 2 and multi-turn): query-aware retrieval of the visual KV,
compaction into the decode buffer, history keep / evict.

The selection is checked against transformers' own attention probabilities (eager attention,
output_attentions) on the same prompt; compaction + decode against a decode run by hand over a
cache that holds only the selected tokens.
"""
import contextlib
import math

import pytest
import torch
from PIL import Image

import tinyvila
from tinyvila.kv_cache import KVCache

from fixtures_images import draw_image
from fixtures_qwen import build_qwen2_5_vl
from fixtures_vila import build_vila

QUESTION = "What is in the picture?"


@contextlib.contextmanager
def recorded_logits(eng):
    """Every logits row the LLM's output layer produces while inside (prefill's last, each step)."""
    lm = eng.model.language_model
    rows, real = [], lm.project
    lm.project = lambda h: rows.append(real(h)) or rows[-1]
    try:
        yield rows
    finally:
        del lm.project


def top_k(scores, k):
    """Sorted indices of the k largest scores per row, ties to the lower index."""
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices[..., :k]
    return order.sort(dim=-1).values


@pytest.fixture(scope="module")
def engines(llava_vicuna, llava_mistral):
    return {name: tinyvila.load(path, device="cpu", dtype="float32")
            for name, path in (("vicuna", llava_vicuna), ("mistral", llava_mistral))}


def hf_retrieval_scores(path, eng, img, question):
    """Per layer [L, H_kv, n_vis]: mean over the query heads of each KV head and over the question's
    tokens (every token after the image) of transformers' attention probabilities on each visual token."""
    from transformers import LlavaNextForConditionalGeneration

    from test_llava_next import hf_inputs, hf_processor, conversation

    model = LlavaNextForConditionalGeneration.from_pretrained(path, dtype=torch.float32,
                                                              attn_implementation="eager").eval()
    inputs = hf_inputs(hf_processor(path), conversation([("user", question)]), [img])
    with torch.no_grad():
        att = model(**inputs, output_attentions=True).attentions  # L x [1, H, T, T]
    ids = inputs["input_ids"][0]
    visual = torch.nonzero(ids == eng.image_token_id).flatten()
    rows = torch.arange(int(visual.max()) + 1, ids.numel())
    cfg = eng.model.language_model.cfg
    group = cfg.num_attention_heads // cfg.num_key_value_heads
    per_head = torch.stack([a[0][:, rows][:, :, visual].mean(1) for a in att])  # [L, H, n_vis]
    return per_head.view(per_head.shape[0], cfg.num_key_value_heads, group, -1).mean(2)


@pytest.mark.parametrize("name,granularity", [("vicuna", "layer"), ("mistral", "layer"), ("mistral", "kv_head")])
def test_selection_is_top_k_of_transformers_attention(engines, llava_vicuna, llava_mistral, image_files, name,
                                                      granularity):
    path = {"vicuna": llava_vicuna, "mistral": llava_mistral}[name]
    eng, img = engines[name], Image.open(image_files[2])
    scores = hf_retrieval_scores(path, eng, img, QUESTION)
    with eng.session(images=[img], decode_sparsity=0.75, retrieval_granularity=granularity) as s:
        r = s.ask(QUESTION, max_new_tokens=3)
        selection = s.last_selection
    n_vis = scores.shape[-1]
    k = math.ceil(0.25 * n_vis)
    expected = top_k(scores.mean(1), k) if granularity == "layer" else top_k(scores, k)
    assert torch.equal(selection, expected)
    assert r.stats.visual_tokens_selected == k and r.stats.visual_tokens_kept == n_vis


def test_two_questions_select_different_tokens_and_turn_2_finds_skipped_ones(engines, image_files):
    eng = engines["vicuna"]
    with eng.session(images=[Image.open(image_files[0])], decode_sparsity=0.75) as s:
        s.ask("Where is the blue circle?", max_new_tokens=2)
        first = s.last_selection.clone()
        s.ask("Describe the colours in the bottom right corner please.", max_new_tokens=2)
        second = s.last_selection
    for layer in range(first.shape[0]):
        a, b = set(first[layer].tolist()), set(second[layer].tolist())
        assert a != b and b - a  # turn 2 picked tokens turn 1 skipped: nothing was deleted


def test_compaction_then_decode_equals_decode_over_only_the_selected_tokens(engines, image_files):
    eng = engines["mistral"]  # GQA and a sliding window
    img = Image.open(image_files[1])
    with eng.session(images=[img], decode_sparsity=0.6) as s, recorded_logits(eng) as logits:
        ids = eng.encode_text(eng.render(s.history_start() + [s.user_message(QUESTION, s.pending)]))
        r = s.ask(QUESTION, max_new_tokens=6, ignore_eos=True)
        selection = s.last_selection
        h, positions = s.inputs(ids)
        keys, spans = s.expand(ids, s.media)
    (start, end, _), = spans
    lm = eng.model.language_model
    cfg = lm.cfg
    full = KVCache(cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim, 512, "cpu", torch.float32)
    with torch.no_grad():
        first = lm(h, positions, full, 0)
    assert torch.allclose(first, logits[0], atol=1e-4)
    # per layer, a cache holding the text and only that layer's selected visual tokens
    n = h.shape[0]
    only = KVCache(cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim, 512, "cpu", torch.float32)
    for layer in range(cfg.num_hidden_layers):
        slots = sorted(set(range(n)) - set(range(start, end)) | {start + i for i in selection[layer].tolist()})
        only.k[layer, :, :len(slots)] = full.k[layer, :, slots]
        only.v[layer, :, :len(slots)] = full.v[layer, :, slots]
    kept = len(slots)
    token = r.token_ids[0]
    for i in range(1, 6):
        with torch.no_grad():
            step = lm(lm.embed(torch.tensor([token])), torch.tensor([n + i - 1]), only, kept + i - 1)
        assert torch.allclose(step, logits[i], atol=1e-4), i
        token = r.token_ids[i]


def test_d0_is_token_for_token_dense_for_every_family(engines, image_files, tmp_path):
    d = tmp_path / "qwen"
    build_qwen2_5_vl(d)
    fx = build_vila(str(tmp_path / "vila"), backbone="qwen2")
    cases = [(engines["mistral"], dict(images=[Image.open(image_files[0])])),
             (tinyvila.load(d, device="cpu", dtype="float32"), dict(images=[draw_image(120, 90, seed=2)])),
             (tinyvila.load(fx.path, device="cpu", dtype="float32"), dict(videos=[[draw_image(64, 48, seed=3)] * 3]))]
    for eng, media in cases:
        answers = []
        for opts in ({}, dict(decode_sparsity=0.0)):
            with eng.session(**media, **opts) as s, recorded_logits(eng) as logits:
                turns = [s.ask(q, max_new_tokens=5, ignore_eos=True).token_ids for q in ("Hi?", "And?")]
                answers.append((turns, torch.cat(logits)))
        assert answers[0][0] == answers[1][0]
        assert torch.equal(answers[0][1], answers[1][1])


@pytest.mark.parametrize("opts", [dict(), dict(decode_sparsity=0.75), dict(sparsity="image")])
def test_evict_turn_2_equals_a_fresh_conversation(engines, image_files, opts):
    eng = engines["vicuna"]
    img = Image.open(image_files[0])
    with eng.session(images=[img], history="evict", **opts) as s:
        s.ask("First question about it?", max_new_tokens=4, ignore_eos=True)
        assert s.messages == [] and len(s.pending) == 1  # the turn's question and answer are gone
        with recorded_logits(eng) as logits:
            second = s.ask(QUESTION, max_new_tokens=6, ignore_eos=True)
        assert second.stats.vision_s == 0  # the visual KV stayed: nothing re-encoded
        selection = s.last_selection
    with eng.session(images=[img], history="evict", **opts) as fresh, recorded_logits(eng) as fresh_logits:
        alone = fresh.ask(QUESTION, max_new_tokens=6, ignore_eos=True)
        assert (selection is None) == (fresh.last_selection is None)
        assert selection is None or torch.equal(selection, fresh.last_selection)
    assert second.token_ids == alone.token_ids
    assert torch.equal(torch.cat(logits), torch.cat(fresh_logits))


def test_keep_history_selects_from_the_full_cache_each_turn(engines, image_files):
    eng = engines["vicuna"]
    with eng.session(images=[Image.open(image_files[0])], sparsity="image") as s:
        r1 = s.ask("What is it?", max_new_tokens=4, ignore_eos=True)
        full_after_1 = s.cache.length
        r2 = s.ask("And the colour?", max_new_tokens=4, ignore_eos=True)
        kept = s.visual[0].n_kept
        assert r1.stats.visual_tokens_selected == r2.stats.visual_tokens_selected == math.ceil(0.25 * kept)
        # the full cache holds every kept visual token and all the text; decode read the compact buffer
        assert r2.stats.context_tokens == s.cache.length > full_after_1
        assert r2.stats.decode_context_tokens == r2.stats.context_tokens - (kept - r2.stats.visual_tokens_selected)
        assert len(s.messages) == 4


def test_cli_decode_flags_and_stats(llava_vicuna, image_files):
    from test_cli import GREEDY, assert_clean_error, chat

    script = "What is it?\n/stats\nAnd now?\n/exit\n"
    code, out, err = chat(llava_vicuna, "--image", image_files[0], "-n", "3", *GREEDY, "--decode-sparsity", "0.5",
                          "--history", "evict", stdin=script)
    assert code == 0, err
    assert "selected" in err and "kept" in err
    code, _, err = chat(llava_vicuna, "--image", image_files[0], "-p", "Hi", *GREEDY, "--history", "forget")
    assert code == 2 and "history must be one of keep, evict" in err
    code, _, err = chat(llava_vicuna, "--image", image_files[0], "-p", "Hi", *GREEDY, "--decode-sparsity", "2")
    assert_clean_error(code, err, "decode_sparsity must be in [0, 1)")


def test_text_only_turns_and_a_late_image_under_sparsity(engines, image_files):
    """No media yet: nothing to prune or retrieve; an image attached later is pruned and retrieved."""
    eng = engines["vicuna"]
    with eng.session(sparsity="image") as s:
        r = s.ask("Hello there.", max_new_tokens=3, ignore_eos=True)
        assert s.last_selection is None and r.stats.visual_tokens == 0
        s.add_image(Image.open(image_files[3]))
        r = s.ask("What is this?", max_new_tokens=3, ignore_eos=True)
        assert 0 < r.stats.visual_tokens_selected < r.stats.visual_tokens_kept < r.stats.visual_tokens
