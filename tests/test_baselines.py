"""The comparison baselines in tinyvila/sparsity.py: FastV (query-aware pruning inside the LLM at
layer K) and VisionZip (dominant + merged contextual tokens before the LLM).

FastV's kept set is checked against transformers' own attention (eager, output_attentions) of the
last prompt token at layer K-1, and its first logits against a layer-by-layer forward written
here from the model's blocks; VisionZip's merge against a hand-worked example."""
import pytest
import torch
from PIL import Image

import tinyvila
from tinyvila.chat import main as chat_main
from tinyvila.errors import TinyVilaError
from tinyvila.kv_cache import KVCache
from tinyvila.sparsity import Sparsity, kept_total, keep_count, visionzip_merge

from fixtures_images import draw_image
from fixtures_qwen import build_qwen2_5_vl
from test_decode_sparsity import QUESTION, recorded_logits, top_k


@pytest.fixture(scope="module")
def vicuna(llava_vicuna):
    return tinyvila.load(llava_vicuna, device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    d = tmp_path_factory.mktemp("qwen_baselines")
    build_qwen2_5_vl(d)
    return tinyvila.load(d, device="cpu", dtype="float32")


def test_policy_names():
    assert Sparsity.from_options("fastv") == Sparsity(prefill=0.5, method="fastv", fastv_layer=2,
                                                      position_mode="original")
    assert Sparsity.from_options("fastv:k=3,r=0.75").fastv_layer == 3
    assert Sparsity.from_options("visionzip:keep=0.25") == Sparsity(prefill=0.75, method="visionzip")
    assert Sparsity.from_options("sparsevila:image") == Sparsity.from_options("image")
    assert Sparsity.from_options("prefill:0.6") == Sparsity(prefill=0.6)
    assert Sparsity(decode=0.5).overridden(sparsity="fastv").method == "fastv"
    for bad, words in [("fastv:k=0", "integer >= 1"), ("fastv:x=1", "settings: k, r"), ("fastv:r=1.5", "[0, 1)"),
                       ("visionzip:keep=0", "(0, 1]"), ("prefill:", "unknown sparsity"), ("sparsevila:big", "unknown")]:
        with pytest.raises(TinyVilaError, match=words.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
            Sparsity.from_options(bad)
    with pytest.raises(TinyVilaError, match="no decode_sparsity"):
        Sparsity.from_options("fastv", decode_sparsity=0.5)


def hf_last_token_attention(path, eng, img, question, layer):
    """transformers' attention of the last prompt token on every image position at `layer`, mean over heads."""
    from transformers import LlavaNextForConditionalGeneration

    from test_llava_next import conversation, hf_inputs, hf_processor

    model = LlavaNextForConditionalGeneration.from_pretrained(path, dtype=torch.float32,
                                                              attn_implementation="eager").eval()
    inputs = hf_inputs(hf_processor(path), conversation([("user", question)]), [img])
    with torch.no_grad():
        att = model(**inputs, output_attentions=True).attentions[layer]  # [1, H, T, T]
    visual = torch.nonzero(inputs["input_ids"][0] == eng.image_token_id).flatten()
    return att[0, :, -1, visual].mean(0)


def test_fastv_keeps_the_top_of_transformers_last_token_attention(vicuna, llava_vicuna, image_files):
    img = Image.open(image_files[2])
    with vicuna.session(images=[img], sparsity="fastv:k=1,r=0.6") as s:
        r = s.ask(QUESTION, max_new_tokens=3)
        visual = s.visual[0]
    score = hf_last_token_attention(llava_vicuna, vicuna, img, QUESTION, layer=0)
    ranked = visual.groups >= 0  # image_newline positions are structural: always kept
    k = keep_count(int(ranked.sum()), 0.6)
    expected = torch.nonzero(~ranked).flatten().tolist() + torch.nonzero(ranked).flatten()[
        top_k(score[ranked], k)].tolist()
    assert visual.kept.tolist() == sorted(expected)
    assert r.stats.visual_tokens == visual.n_tokens and r.stats.visual_tokens_kept == visual.n_kept
    assert visual.n_kept < visual.n_tokens


def prompt_inputs(eng, img, question):
    """The dense prompt's input embeddings, positions and visual rows."""
    with eng.session(images=[img]) as s:
        messages = s.history_start() + [s.user_message(question, s.pending)]
        ids = eng.encode_text(eng.render(messages))
        h, positions = s.inputs(ids)
        keys, spans = s.expand(ids, s.pending)
    return h, positions, spans


def test_fastv_first_logits_equal_a_layer_by_layer_forward(vicuna, image_files):
    """Blocks below K on every token, blocks from K on only on the kept ones, dense positions."""
    img, K = Image.open(image_files[0]), 1  # the tiny model has two layers
    with vicuna.session(images=[img], sparsity=f"fastv:k={K},r=0.5") as s, recorded_logits(vicuna) as logits:
        s.ask(QUESTION, max_new_tokens=1)
        kept = s.visual[0].kept
    h, positions, spans = prompt_inputs(vicuna, img, QUESTION)
    (start, end, _), = spans
    lm = vicuna.model.language_model
    cos, sin = lm.rope_tables(positions, h.dtype)
    cache = KVCache(lm.cfg.num_hidden_layers, lm.cfg.num_key_value_heads, lm.cfg.head_dim, h.shape[0], "cpu", h.dtype)
    with torch.no_grad():
        for i in range(K):
            h = lm.layers[i](h, cos, sin, cache.layer(i), 0, lm.attention_mask(h.shape[0], 0, h.device))
        rows = torch.cat([torch.arange(start), start + kept, torch.arange(end, h.shape[0])])
        h, cos, sin = h[rows], cos[rows], sin[rows]
        for i in range(K, lm.cfg.num_hidden_layers):
            h = lm.layers[i](h, cos, sin, cache.layer(i), 0, lm.attention_mask(h.shape[0], 0, h.device))
        expected = lm.project(lm.norm(h)[-1:])
    assert torch.allclose(logits[0], expected, atol=1e-5)


@pytest.mark.parametrize("family", ["llava", "qwen"])
def test_fastv_keeping_every_token_is_dense(vicuna, qwen, image_files, family):
    """r so small that every token stays: the pruning path (scores, row gather, cache moves) runs
    and must change nothing."""
    eng, img = (vicuna, Image.open(image_files[1])) if family == "llava" else (qwen, draw_image(120, 90, seed=2))
    results = []
    for opts in (dict(), dict(sparsity="fastv:k=1,r=0.000001")):
        with eng.session(images=[img], **opts) as s, recorded_logits(eng) as logits:
            turns = [s.ask(q, max_new_tokens=4, ignore_eos=True).token_ids for q in ("Hi?", "And then?")]
            results.append((turns, torch.cat(logits)))
    assert results[0][0] == results[1][0]
    assert torch.equal(results[0][1], results[1][1])


@pytest.mark.parametrize("family", ["llava", "qwen"])
def test_fastv_conversation_keeps_its_pruned_cache(vicuna, qwen, image_files, family):
    """The drop is permanent: turn 2 neither re-encodes nor re-selects, and its prompt is
    the one the cache holds (dense positions for the kept tokens, M-RoPE included)."""
    eng, img = (vicuna, Image.open(image_files[0])) if family == "llava" else (qwen, draw_image(120, 90, seed=2))
    for history in ("keep", "evict"):
        with eng.session(images=[img], sparsity="fastv:k=1,r=0.75", history=history) as s:
            first = s.ask("What colour is it?", max_new_tokens=3, ignore_eos=True)
            kept = s.visual[0].kept.clone()
            second = s.ask(QUESTION, max_new_tokens=3, ignore_eos=True)
            assert torch.equal(s.visual[0].kept, kept)
            assert second.stats.vision_s == 0 and second.stats.visual_tokens_kept == first.stats.visual_tokens_kept
            assert first.stats.visual_tokens_kept < first.stats.visual_tokens
            assert second.stats.prefill_tokens < first.stats.prefill_tokens  # the media stayed cached
            # The cache's text matches a recomputation of the same pruned prompt.
            ids = s.engine.encode_text(s.engine.render(s.messages or s.history_start()
                                                       + [s.user_message(QUESTION, s.pending)]))
            keys, spans = s.expand(ids, s.media + s.pending)
            positions = s.positions(keys, spans, s.media + s.pending)
            assert positions.shape[-1] == len(keys)
            n_dense = len(keys) - spans[0][1] + spans[0][0] + s.visual[0].n_tokens
            assert int(positions.max()) + 1 == n_dense or family == "qwen"  # 1-D: the dense positions


def test_visionzip_merge_by_hand():
    # One group of 8 tokens, keep 4 (p = 0.5) with half of them contextual: 2 dominant by
    # saliency, 2 targets evenly strided over the other 6, each other token merged into the
    # target it is most similar to.
    f = torch.tensor([[1., 0], [0, 1], [9, 9], [1, .1], [0, 2], [8, 8], [2, .1], [.1, 3]])
    saliency = torch.tensor([0., 0, 5, 0, 0, 4, 0, 0])
    groups = torch.zeros(8, dtype=torch.long)
    kept, out = visionzip_merge(f, saliency, groups, 0.5, contextual=0.5)
    # Dominant: 2 and 5. Rest in order: 0 1 3 4 6 7; step 3 -> targets 0 and 4;
    # 1 and 7 point like 4 (up), 3 and 6 like 0 (right).
    assert kept.tolist() == [0, 2, 4, 5]
    assert torch.allclose(out[0], (f[0] + f[3] + f[6]) / 3)
    assert torch.allclose(out[2], (f[4] + f[1] + f[7]) / 3)
    assert torch.equal(out[1], f[2]) and torch.equal(out[3], f[5])
    # Structural positions always stay; each group gets its own budget (ties to the lower index):
    # group 0 = 0..3 keeps 2 and 0, group 1 = 5..7 keeps ceil(1.5) = 2: 5 and 6.
    groups = torch.tensor([0, 0, 0, 0, -1, 1, 1, 1])
    kept, out = visionzip_merge(f, saliency, groups, 0.5, contextual=0.0)
    assert kept.tolist() == [0, 2, 4, 5, 6] and torch.equal(out, f[kept])


@pytest.mark.parametrize("family", ["llava", "qwen"])
def test_visionzip_in_a_session(vicuna, qwen, image_files, family):
    eng, img = (vicuna, Image.open(image_files[0])) if family == "llava" else (qwen, draw_image(120, 90, seed=2))
    with eng.session(images=[img], sparsity="visionzip:keep=0.4") as s:
        r = s.ask(QUESTION, max_new_tokens=3, ignore_eos=True)
        v = s.visual[0]
        assert v.n_kept == kept_total(v.groups, 0.6) == r.stats.visual_tokens_kept < v.n_tokens
        assert s.features[0].shape[0] == v.n_kept
        # Dominant tokens keep their features; at least one contextual token is a merge.
        with eng.session(images=[img]) as dense:
            dense.ask(QUESTION, max_new_tokens=1)
            full = dense.features[0][v.kept]
        same = torch.isclose(full, s.features[0], atol=1e-4).all(-1)
        contextual = 0
        for n in torch.bincount(v.groups[v.groups >= 0]).tolist():
            k = keep_count(n, 0.6)
            contextual += min(round(k * 10 / 64), k - 1, n - k)
        assert contextual > 0 and int(same.sum()) == v.n_kept - contextual
    with eng.session(images=[img], sparsity="visionzip:keep=1") as s, recorded_logits(eng) as a:
        first = s.ask(QUESTION, max_new_tokens=3, ignore_eos=True).token_ids
    with eng.session(images=[img]) as s, recorded_logits(eng) as b:
        assert s.ask(QUESTION, max_new_tokens=3, ignore_eos=True).token_ids == first
    assert torch.equal(torch.cat(a), torch.cat(b))


def test_chat_takes_the_baselines(llava_vicuna, image_files, capsys):
    for policy in ("fastv:k=1", "visionzip"):
        code = chat_main([str(llava_vicuna), "--image", str(image_files[0]), "-p", "Hi?", "-n", "2",
                          "--device", "cpu", "--sparsity", policy, "--json"])
        assert code == 0, capsys.readouterr().err
    assert chat_main([str(llava_vicuna), "--sparsity", "fastv:k=x"]) == 2  # reported before loading
    assert "not a number" in capsys.readouterr().err
