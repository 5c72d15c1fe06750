"""Prefill sparsity (spec method.md, stage 1): saliency, top-k per group, positions, the API.

The saliency every family computes is checked against one derived here from transformers' own
attention (output_attentions, or the attention inputs of Qwen's last full-attention block), pooled
with transformers' own packing where it has one; the kept set must be its top-k.
"""
import json
import math

import pytest
import torch
from PIL import Image

import tinyvila
from tinyvila.errors import TinyVilaError
from tinyvila.sparsity import (Sparsity, VisualTokens, compact_grid, kept_total, keep_count, positions_1d,
                               select_kept, visual_slots)

from fixtures_images import draw_image
from fixtures_qwen import build_qwen2_5_vl
from fixtures_vila import build_vila, siglip_pixels


def expected_kept(saliency, groups, p):
    """Top ceil((1-p) n) of every group by saliency (ties to the lower index) + structural ones."""
    keep = set(torch.nonzero(groups < 0).flatten().tolist())
    for g in torch.unique(groups[groups >= 0]).tolist():
        idx = torch.nonzero(groups == g).flatten().tolist()
        k = math.ceil((1 - p) * len(idx) - 1e-9)
        keep |= set(sorted(idx, key=lambda i: (-float(saliency[i]), i))[:k])
    return sorted(keep)


# --------------------------------------------------------------------------- policy


def test_select_kept_per_group_ties_and_structural():
    sal = torch.tensor([1.0, 3.0, 3.0, float("inf"), 2.0, 0.5, 2.0, 5.0, float("inf")])
    groups = torch.tensor([0, 0, 0, -1, 1, 1, 1, 1, -1])
    # group 0: 3 tokens, p=0.5 -> keep 2: the tied 3.0s (indices 1, 2); group 1: 4 -> 2: 7 and 4 (tie with 6)
    assert select_kept(sal, groups, 0.5).tolist() == [1, 2, 3, 4, 7, 8]
    assert kept_total(groups, 0.5) == 6
    assert select_kept(sal, groups, 0.5).tolist() == expected_kept(sal, groups, 0.5)


@pytest.mark.parametrize("seed", range(4))
def test_select_kept_matches_a_brute_force_top_k(seed):
    g = torch.Generator().manual_seed(seed)
    n = 300
    groups = torch.randint(-1, 7, (n,), generator=g)
    saliency = torch.randint(0, 20, (n,), generator=g).float()  # many ties
    saliency[groups < 0] = float("inf")
    for p in (0.3, 0.6, 0.9):
        assert select_kept(saliency, groups, p).tolist() == expected_kept(saliency, groups, p)


def test_global_budget_normalises_each_group():
    # group 1's scores are 10x group 0's: raw global top-k would take only group 1
    sal = torch.tensor([1.0, 2.0, 3.0, 10.0, 20.0, 30.0])
    groups = torch.tensor([0, 0, 0, 1, 1, 1])
    # normalised: [0.5, 1, 1.5] twice; top 3 = both 1.5s and the lower-index 1.0
    assert select_kept(sal, groups, 0.5, "global").tolist() == [1, 2, 5]
    assert select_kept(sal, groups, 0.5).tolist() == [1, 2, 4, 5]  # per group: ceil(1.5) = 2 each
    assert kept_total(groups, 0.5, "global") == 3


@pytest.mark.parametrize("n,p,k", [(576, 0.6, 231), (10, 0.0, 10), (3, 0.9, 1), (1, 0.99, 1), (0, 0.5, 0),
                                   (100, 0.75, 25), (5, 0.6, 2)])
def test_keep_count(n, p, k):
    assert keep_count(n, p) == k


def test_options_and_presets():
    assert Sparsity.from_options("image").prefill == 0.6 and Sparsity.from_options("image").decode == 0.75
    assert Sparsity.from_options("video", prefill_sparsity=0.5).prefill == 0.5
    s = Sparsity.from_options(prefill_sparsity=0.3, position_mode="original")
    assert s.overridden(sparsity="dense") == Sparsity(position_mode="original")
    for bad in (dict(sparsity="fast"), dict(prefill_sparsity=1.0), dict(prefill_sparsity=-0.1),
                dict(prefill_budget="tile"), dict(position_mode="shifted"), dict(prefill_sparsity="x")):
        with pytest.raises(TinyVilaError):
            Sparsity.from_options(**bad)


def test_positions_1d_compact_and_original():
    # prompt: 2 text, item 0 (6 dense positions, kept 1, 2, 5), 1 text, item 1 (dense 4, kept 0, 3), 2 text
    v0 = VisualTokens(6, torch.tensor([1, 2, 5]))
    v1 = VisualTokens(4, torch.tensor([0, 3]))
    spans = [(2, 5, 0), (6, 8, 1)]
    assert positions_1d(10, spans, {0: v0, 1: v1}, "compact", "cpu").tolist() == list(range(10))
    # dense prompt: text 0-1, item 0 at 2-7, text 8, item 1 at 9-12, text 13-14
    assert positions_1d(10, spans, {0: v0, 1: v1}, "original", "cpu").tolist() == [0, 1, 3, 4, 7, 8, 9, 12, 13, 14]


def test_compact_grid():
    ids = torch.tensor([[0, 0, 4, 4], [1, 3, 1, 2], [5, 5, 0, 7]])
    assert compact_grid(ids).tolist() == [[0, 0, 1, 1], [0, 2, 0, 1], [1, 1, 0, 2]]


# --------------------------------------------------------------------------- the three families


def test_llava_saliency_matches_transformers(llava_vicuna, image_files):
    from transformers import LlavaNextForConditionalGeneration

    from test_llava_next import hf_processor

    path = llava_vicuna
    img = Image.open(image_files[0])
    model = LlavaNextForConditionalGeneration.from_pretrained(path, dtype=torch.float32,
                                                              attn_implementation="eager").eval()
    inputs = hf_processor(path)(images=[img], text="<image>", return_tensors="pt")
    with torch.no_grad():
        out = model.model.vision_tower(inputs["pixel_values"][0], output_attentions=True)
    cls = out.attentions[-2][:, :, 0, 1:].mean(1)  # [crops, 576]: CLS row at vision_feature_layer -2
    n_crops = cls.shape[0]
    inf = torch.tensor([float("inf")])
    packed, _ = model.model.pack_image_features([cls[..., None]], inputs["image_sizes"], "default", inf)
    tile = torch.arange(n_crops, dtype=torch.float)[:, None, None].expand(n_crops, cls.shape[1], 1)
    groups, _ = model.model.pack_image_features([tile], inputs["image_sizes"], "default", torch.tensor([-1.0]))
    saliency, groups = packed[0].flatten(), groups[0].flatten().long()

    eng = tinyvila.load(path, device="cpu", dtype="float32")
    for p in (0.5, 0.75):
        with eng.session(images=[img], prefill_sparsity=p) as s:
            r = s.ask("What is it?", max_new_tokens=2)
            v = s.visual[0]
        assert v.n_tokens == saliency.numel() == r.stats.visual_tokens
        assert torch.allclose(v.saliency, saliency, rtol=1e-4, atol=1e-7)
        assert torch.equal(v.groups, groups)
        assert v.kept.tolist() == expected_kept(saliency, groups, p)
        assert r.stats.visual_tokens_kept == v.n_kept < v.n_tokens


def test_longvila_saliency_matches_transformers(tmp_path):
    fx = build_vila(str(tmp_path / "vila"), backbone="qwen2")
    frames = [draw_image(80, 60, seed=k) for k in range(3)]
    fx.vision.set_attn_implementation("eager")
    with torch.no_grad():
        att = fx.vision(pixel_values=siglip_pixels(fx, frames), output_attentions=True).attentions[-2]
    col = att.mean(1).mean(1)  # [frames, G*G]: mean over heads, then over the query rows
    G, k = fx.patches_per_side, fx.k
    g = -(-G // k)
    per_frame = []
    for f in range(len(frames)):
        grid = col[f].view(G, G)
        blocks = [[grid[i * k:(i + 1) * k, j * k:(j + 1) * k].mean() for j in range(g)] for i in range(g)]
        scores = torch.tensor(blocks)
        scores = scores.flatten() if fx.order == "row" else scores.t().flatten()
        per_frame.append(torch.cat([scores, torch.tensor([float("inf")])]))  # the "\n" token
    saliency = torch.cat(per_frame)
    groups = torch.cat([torch.cat([torch.full((g * g,), f), torch.tensor([-1])]) for f in range(len(frames))])

    eng = tinyvila.load(fx.path, device="cpu", dtype="float32")
    with eng.session(videos=[frames], prefill_sparsity=0.6) as s:
        s.ask("What happens?", max_new_tokens=2)
        v = s.visual[0]
    assert torch.allclose(v.saliency, saliency, rtol=1e-4, atol=1e-7)
    assert torch.equal(v.groups, groups)
    assert v.kept.tolist() == expected_kept(saliency, groups, 0.6)


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    d = tmp_path_factory.mktemp("qwen_sparse")
    _, ids = build_qwen2_5_vl(d)
    return d, ids, tinyvila.load(d, device="cpu", dtype="float32")


def hf_qwen_saliency(path, item):
    """Column mean of the attention of transformers' last full-attention vision block, per
    segment, mean over heads, averaged over each merge group, in merged-token order."""
    from transformers import Qwen2_5_VLForConditionalGeneration
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import apply_rotary_pos_emb_vision

    visual = Qwen2_5_VLForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval().model.visual
    seen = {}
    block = visual.blocks[max(visual.fullatt_block_indexes)]
    block.attn.register_forward_hook(lambda m, args, kwargs, out: seen.update(kwargs, x=args[0] if args else None),
                                     with_kwargs=True)
    with torch.no_grad():
        visual(item.pixels, grid_thw=torch.tensor([item.grid]))
        x = seen["x"] if seen["x"] is not None else seen["hidden_states"]
        attn = block.attn
        q, k, _ = attn.qkv(x).reshape(x.shape[0], 3, attn.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
        q, k = apply_rotary_pos_emb_vision(q, k, *seen["position_embeddings"])
    cu = seen["cu_seqlens"].tolist()
    col = torch.zeros(x.shape[0])
    for s, e in zip(cu[:-1], cu[1:]):
        scores = torch.einsum("qhd,khd->hqk", q[s:e], k[s:e]) * attn.scaling
        col[s:e] = scores.softmax(-1).mean((0, 1))
    merged = col.view(-1, 4).mean(-1)  # window order, merge groups of 4 patches
    t, h, w = item.grid
    # transformers' window order, rebuilt from its own helper
    from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl as m

    if hasattr(visual, "get_window_index"):
        window_index, _ = visual.get_window_index(torch.tensor([item.grid]))
    else:
        window_index, _ = m.get_vision_window_index(torch.tensor([item.grid]),
                                                    spatial_merge_size=visual.spatial_merge_size,
                                                    window_size=visual.window_size, patch_size=visual.patch_size,
                                                    kwargs={})
    return merged[torch.argsort(window_index)]


@pytest.mark.parametrize("kind", ["image", "video"])
def test_qwen_saliency_matches_transformers(qwen, kind):
    path, _, eng = qwen
    if kind == "image":
        opts = dict(images=[draw_image(200, 150, seed=1)])
    else:
        opts = dict(videos=[[draw_image(112, 84, seed=k) for k in range(6)]])
    with eng.session(prefill_sparsity=0.5, **opts) as s:
        item = s.pending[0]
        s.ask("Describe it.", max_new_tokens=2)
        v = s.visual[0]
    saliency = hf_qwen_saliency(path, item)
    t = item.grid[0]
    groups = torch.arange(t).repeat_interleave(item.n_tokens // t)
    assert torch.allclose(v.saliency, saliency, rtol=1e-4, atol=1e-8)
    assert v.kept.tolist() == expected_kept(saliency, groups, 0.5)


def test_qwen_positions_hand_checked(qwen):
    _, _, eng = qwen
    model = eng.model
    # An image of 4x6 patches -> 2x3 merged tokens, after 3 text tokens, then 2 text tokens.
    img = type("Item", (), dict(grid=(1, 4, 6), second_per_grid_t=0.0, n_tokens=6))()
    kept = VisualTokens(6, torch.tensor([0, 2, 5]))  # (h, w) = (0, 0), (0, 2), (1, 2)
    spans = [(3, 6, 0)]
    compact = model.positions(8, spans, [img], "cpu", {0: kept}, "compact")
    assert compact.tolist() == [[0, 1, 2, 3, 3, 3, 5, 6],
                                [0, 1, 2, 3, 3, 4, 5, 6],
                                [0, 1, 2, 3, 4, 4, 5, 6]]
    original = model.positions(8, spans, [img], "cpu", {0: kept}, "original")
    assert original.tolist() == [[0, 1, 2, 3, 3, 3, 6, 7],
                                 [0, 1, 2, 3, 3, 4, 6, 7],
                                 [0, 1, 2, 3, 5, 5, 6, 7]]
    # A video of 3 temporal slices of 2x2 patches (1 token each) at 1 s per slice, 2 tokens per
    # second (t ids 0, 2, 4): slices 0 and 2 kept -> compact t ids 0, 1.
    tps = model.cfg.vision.tokens_per_second
    vid = type("Item", (), dict(grid=(3, 2, 2), second_per_grid_t=1.0, n_tokens=3))()
    kept = VisualTokens(3, torch.tensor([0, 2]))
    compact = model.positions(4, [(1, 3, 0)], [vid], "cpu", {0: kept}, "compact")
    assert compact.tolist() == [[0, 1, 2, 3], [0, 1, 1, 3], [0, 1, 1, 3]]
    original = model.positions(4, [(1, 3, 0)], [vid], "cpu", {0: kept}, "original")
    assert original.tolist() == [[0, 1, 1 + 2 * tps, 2 + 2 * tps], [0, 1, 1, 2 + 2 * tps], [0, 1, 1, 2 + 2 * tps]]


# --------------------------------------------------------------------------- end to end


def test_p0_is_token_for_token_dense(llava_vicuna, qwen, tmp_path):
    fx = build_vila(str(tmp_path / "vila"), backbone="llama3")
    frames = [draw_image(80, 60, seed=k) for k in range(2)]
    cases = [(llava_vicuna, dict(images=[draw_image(150, 90, seed=3)])),
             (qwen[0], dict(images=[draw_image(120, 100, seed=4)])),
             (fx.path, dict(videos=[frames]))]
    for path, media in cases:
        eng = tinyvila.load(path, device="cpu", dtype="float32")
        dense = eng.generate("Describe it.", max_new_tokens=6, ignore_eos=True, **media)
        zero = eng.generate("Describe it.", max_new_tokens=6, ignore_eos=True, prefill_sparsity=0.0,
                            position_mode="original", **media)
        with eng.session(sparsity="dense", **media) as s:
            preset = s.ask("Describe it.", max_new_tokens=6, ignore_eos=True)
            assert s.visual[0].saliency is None and s.visual[0].n_kept == s.visual[0].n_tokens
        assert dense.token_ids == zero.token_ids == preset.token_ids
        assert dense.stats.prefill_tokens == zero.stats.prefill_tokens


@pytest.mark.parametrize("mode", ["compact", "original"])
def test_pruned_prompt_is_the_kept_features_at_their_positions(llava_vicuna, image_files, mode):
    """The LLM sees exactly the kept features, the prompt is shorter by the dropped count, and
    the answer equals the LLM run by hand on that shorter prompt."""
    eng = tinyvila.load(llava_vicuna, device="cpu", dtype="float32")
    img = Image.open(image_files[1])
    with eng.session(images=[img]) as s:
        dense_ids = eng.encode_text(eng.render(s.history_start() + [s.user_message("Look.", s.pending)]))
        dense_h, _ = s.inputs(dense_ids)
        (start, end, _), = s.expand(dense_ids, s.pending)[1]
    with eng.session(images=[img], prefill_sparsity=0.6, position_mode=mode) as s:
        h, positions = s.inputs(dense_ids)
        v = s.visual[0]
        r = s.ask("Look.", max_new_tokens=5, ignore_eos=True)
    n_drop = v.n_tokens - v.n_kept
    assert h.shape[0] == dense_h.shape[0] - n_drop == r.stats.prefill_tokens
    # (the saliency layer's attention runs per crop: equal up to float rounding of features up to ~100)
    assert torch.allclose(h[start:start + v.n_kept], dense_h[start:end][v.kept], atol=1e-4)
    assert torch.equal(h[start + v.n_kept:], dense_h[end:])
    expected = torch.arange(h.shape[0])
    if mode == "original":
        expected = torch.cat([torch.arange(start), start + v.kept, torch.arange(end, dense_h.shape[0])])
    assert torch.equal(positions, expected)
    # greedy by hand over the shorter prompt
    from tinyvila.kv_cache import KVCache

    lm = eng.model.language_model
    cfg = lm.cfg
    cache = KVCache(cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim, 4096, "cpu", torch.float32)
    banned = eng.banned
    logits = lm(h, positions, cache, 0)
    tokens = []
    for i in range(5):
        t = int(logits.reshape(-1).masked_fill(banned, -float("inf")).argmax()) if banned is not None \
            else int(logits.argmax())
        tokens.append(t)
        n = cache.length
        logits = lm(lm.embed(torch.tensor([t])), positions[-1:] + 1 + i, cache, n)
    assert r.token_ids == tokens


def test_follow_up_turn_reuses_the_pruned_cache(llava_vicuna, image_files):
    eng = tinyvila.load(llava_vicuna, device="cpu", dtype="float32")
    with eng.session(images=[Image.open(image_files[0])], sparsity="image") as s:
        r1 = s.ask("What is it?", max_new_tokens=3)
        kept = s.visual[0].kept.clone()
        r2 = s.ask("And the colour?", max_new_tokens=3)
        assert r2.stats.vision_s == 0 and r2.stats.prefill_tokens < r1.stats.prefill_tokens
        assert torch.equal(s.visual[0].kept, kept) and r2.stats.visual_tokens_kept == kept.numel()


def test_cache_is_sized_for_the_kept_tokens(llava_vicuna, image_files):
    eng = tinyvila.load(llava_vicuna, device="cpu", dtype="float32")
    eng.max_seq_len = 100  # room for 100 text tokens (the tiny model's 1024 limit would cap both)
    img = Image.open(image_files[0])
    with eng.session(images=[img]) as dense, eng.session(images=[img], prefill_sparsity=0.75) as sparse:
        n = dense.pending[0].n_tokens
        assert dense.cache.max_len - sparse.cache.max_len == n - visual_slots(eng.model, dense.pending[0], sparse.sparsity)
        assert sparse.cache.max_len < dense.cache.max_len


# --------------------------------------------------------------------------- the chat CLI


def test_cli_sparsity_flags_and_save_kept(llava_vicuna, image_files, tmp_path):
    from test_cli import GREEDY, assert_clean_error, chat

    args = [llava_vicuna, "--image", image_files[0], "-p", "Describe it.", "-n", "3", "--json", *GREEDY]
    stats = {}
    for name, flags in {"default": [], "dense": ["--dense"], "p": ["--prefill-sparsity", "0.5"],
                        "video": ["--sparsity", "video"]}.items():
        code, out, err = chat(*args, *flags)
        assert code == 0, err
        stats[name] = json.loads(out)["stats"]
    n = stats["dense"]["visual_tokens"]
    assert stats["dense"]["visual_tokens_kept"] == n
    eng = tinyvila.load(llava_vicuna, device="cpu", dtype="float32")
    item = eng.load_media(images=[image_files[0]])[0]
    for name, p in (("default", 0.6), ("p", 0.5), ("video", 0.75)):  # the image preset's p is 0.6
        assert stats[name]["visual_tokens_kept"] == visual_slots(eng.model, item, Sparsity(prefill=p)) < n
        assert stats[name]["prefill_tokens"] == stats["dense"]["prefill_tokens"] - n + stats[name]["visual_tokens_kept"]

    picture = tmp_path / "kept.png"
    code, _, err = chat(*args, "--prefill-sparsity", "0.5", "--save-kept", picture)
    assert code == 0 and f"drawn in {picture}" in err, err
    drawn = Image.open(picture)
    assert drawn.height == 340 and drawn.width > 2 * 336  # base image and anyres canvas side by side

    code, _, err = chat(*args, "--prefill-sparsity", "1.5")
    assert_clean_error(code, err, "prefill_sparsity must be in [0, 1)")


def test_save_kept_panels_cover_every_position(llava_vicuna, qwen, tmp_path):
    """Every visual position but the structural ones is drawn in exactly one cell."""
    fx = build_vila(str(tmp_path / "vila"), backbone="llama3")
    cases = [(tinyvila.load(llava_vicuna, device="cpu", dtype="float32"), dict(images=[draw_image(150, 90, seed=1)])),
             (qwen[2], dict(videos=[[draw_image(112, 84, seed=k) for k in range(4)]])),
             (tinyvila.load(fx.path, device="cpu", dtype="float32"), dict(videos=[[draw_image(80, 60, seed=2)] * 2]))]
    for eng, media in cases:
        with eng.session(prefill_sparsity=0.5, **media) as s:
            item = s.pending[0]
            s.ask("Go.", max_new_tokens=1)
            groups = s.visual[0].groups
            cells = torch.cat([c.flatten() for _, c in eng.model.token_panels(item)])
            assert sorted(cells.tolist()) == torch.nonzero(groups >= 0).flatten().tolist()
            from tinyvila.visualize import save_kept

            assert save_kept(s, tmp_path / "k.png")[0].is_file()
