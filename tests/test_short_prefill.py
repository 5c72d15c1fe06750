"""Short prefills (follow-up questions, text-only first turns) and the per-turn host work.

DecoderLM.static_prefill, the fixed-shape work a CUDA graph captures, runs here on the CPU over
the same padded buffers (Triton kernels through the interpreter) and must equal the eager prefill:
logits, cache contents, retrieval scores, at the bucket edges. The graphs themselves are checked
on a GPU (tests/test_gpu_prefill.py, `pytest -m gpu`).
"""
import pytest
import torch

import tinyvila
from tinyvila.generate import PREFILL_BUCKETS, PrefillGraphs, reused_prefix
from tinyvila.kernels.retrieval import retrieval_attention
from tinyvila.kv_cache import KVCache
from tinyvila.models.layers import DecoderLM, TextConfig

from fixtures_images import draw_image
from fixtures_qwen import build_qwen2_5_vl
from fixtures_qwen3 import build_qwen3_vl


def tiny_lm(kind: str) -> DecoderLM:
    """Qwen2-like (GQA, q/k/v bias, M-RoPE) or Mistral-like (GQA, a sliding window the prompts pass)."""
    if kind == "qwen2":
        d = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, rope_scaling={"mrope_section": [2, 3, 3]})
    else:
        d = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, sliding_window=24)
    torch.manual_seed(0)
    lm = DecoderLM(TextConfig.from_dict(d, kind))
    with torch.no_grad():
        for name, p in lm.named_parameters():
            p.normal_(0, 0.3 if p.dim() > 1 else 0.05)
            if "norm" in name:
                p.add_(1.0)
    return lm.eval()


def positions_for(lm, n: int) -> torch.Tensor:
    """Distinct positions per axis for M-RoPE (as after an image), plain ones otherwise."""
    base = torch.arange(n) + 5
    return torch.stack([base, base + 3, base * 2]) if lm.cfg.mrope_section else base


@pytest.mark.parametrize("kind", ["qwen2", "mistral"])
@pytest.mark.parametrize("n", [1, 16, 17])  # a bucket's edges: full, and one past it (next bucket)
def test_static_prefill_equals_the_eager_prefill(kind, n):
    lm = tiny_lm(kind)
    start, bucket = 30, next(b for b in PREFILL_BUCKETS if n >= 1 and n <= b)
    total = start + bucket + 8
    g = torch.Generator().manual_seed(n)
    ids = torch.randint(0, lm.cfg.vocab_size, (start + n,), generator=g)
    pos = positions_for(lm, total)
    vis = torch.arange(3, 21)  # "visual" slots inside the cached prefix
    eager, static = (KVCache(2, 2, 16, total, "cpu", torch.float32) for _ in range(2))
    with torch.no_grad():
        for cache in (eager, static):
            lm(lm.embed(ids[:start]), pos[..., :start], cache, 0)
        want_logits, want_r = lm.scored(lm.embed(ids[start:]), pos[..., start:start + n], eager, start, vis)
        padded = torch.cat([ids[start:], torch.zeros(bucket - n, dtype=torch.long)])
        got_logits, got_r = lm.static_prefill(padded, pos[..., start:start + bucket], static,
                                              torch.tensor([start], dtype=torch.int32),
                                              torch.tensor([n], dtype=torch.int32), vis)
        plain, _ = lm.static_prefill(padded, pos[..., start:start + bucket], static,
                                     torch.tensor([start], dtype=torch.int32), torch.tensor([n], dtype=torch.int32))
    torch.testing.assert_close(got_logits, want_logits, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(plain, want_logits, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(got_r, want_r, atol=1e-6, rtol=1e-4)
    end = start + n
    torch.testing.assert_close(static.k[:, :, :end], eager.k[:, :, :end], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(static.v[:, :, :end], eager.v[:, :, :end], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("window", [None, 6])
def test_retrieval_kernel_reads_start_and_count_from_the_device(window):
    """Padding rows past `count` change neither the real rows' output nor the scores."""
    g = torch.Generator().manual_seed(1)
    T, B, H, Hkv, D, S, start = 5, 8, 4, 2, 16, 40, 13
    q = torch.randn(B, H, D, generator=g)
    k, v = torch.randn(2, Hkv, S, D, generator=g)
    slots = torch.tensor([2, 3, 4, 5, 6, 9])
    want_out, want_r = retrieval_attention(q[:T], k, v, start, slots, window=window)
    out, r = retrieval_attention(q, k, v, torch.tensor([start], dtype=torch.int32), slots, window=window,
                                 count=torch.tensor([T], dtype=torch.int32))
    torch.testing.assert_close(out[:T], want_out)
    torch.testing.assert_close(r, want_r)
    _, all_rows = retrieval_attention(q, k, v, start, slots, window=window)
    assert not torch.allclose(all_rows, want_r)  # the padding rows would have changed the scores


@pytest.fixture(scope="module")
def engines(llava_mistral, tmp_path_factory):
    qwen, qwen3 = tmp_path_factory.mktemp("qwen_short"), tmp_path_factory.mktemp("qwen3_short")
    build_qwen2_5_vl(qwen)
    build_qwen3_vl(qwen3)
    return {"llava": tinyvila.load(llava_mistral, device="cpu", dtype="float32"),
            "qwen": tinyvila.load(qwen, device="cpu", dtype="float32"),
            "qwen3": tinyvila.load(qwen3, device="cpu", dtype="float32")}


LONG = "Now tell me everything again, " * 30  # past the largest bucket: eager


def conversation(eng, static: bool, questions, **options):
    """Per turn: (answer ids, the cache's slots, the decode selection, whether the short path ran)."""
    out = []
    with eng.session(images=[draw_image(120, 90, seed=1)], max_seq_len=2048, **options) as s:
        if static:
            s.short_prefills = PrefillGraphs(graphed=False)
        for q in questions:
            r = s.ask(q, max_new_tokens=3, temperature=0)
            used = static and s.short_prefills.used
            out.append((r.token_ids, s.cache.k[:, :, :s.cache.length].clone(), s.last_selection, used))
            assert q != LONG or r.stats.prefill_tokens > PREFILL_BUCKETS[-1]
    return out


@pytest.mark.parametrize("name,options", [("llava", {}), ("qwen", dict(sparsity="image")),
                                          ("llava", dict(decode_sparsity=0.5, history="evict")),
                                          ("qwen3", dict(decode_sparsity=0.5))])  # q/k norms, DeepStack
def test_follow_ups_on_the_short_path_equal_the_eager_ones(engines, name, options):
    """A session mixing short and long turns: the image turn and the long question go eagerly,
    the short follow-ups through static_prefill; answers, caches and decode selections agree."""
    questions = ["Describe it.", "What colour is the top left corner?", LONG, "And the bottom?"]
    eager = conversation(engines[name], False, questions, **options)
    short = conversation(engines[name], True, questions, **options)
    assert [used for *_, used in short] == [False, True, False, True]
    for (ids_a, cache_a, sel_a, _), (ids_b, cache_b, sel_b, _) in zip(eager, short):
        assert ids_a == ids_b
        torch.testing.assert_close(cache_b, cache_a, atol=1e-5, rtol=1e-5)
        assert (sel_a is None) == (sel_b is None) and (sel_a is None or torch.equal(sel_a, sel_b))
    assert (eager[0][2] is not None) == bool(options)  # decode retrieval selects


def test_a_text_only_first_turn_takes_the_short_path(engines):
    eng = engines["llava"]
    with eng.session() as s:
        s.short_prefills = PrefillGraphs(graphed=False)
        short = s.ask("Hello there, who are you?", max_new_tokens=4, temperature=0)
        assert s.short_prefills.used
    assert short.token_ids == eng.session().ask("Hello there, who are you?", max_new_tokens=4,
                                                 temperature=0).token_ids


@pytest.mark.parametrize("name,options", [("qwen", dict(sparsity="image")), ("qwen", {}),
                                          ("llava", dict(prefill_sparsity=0.5, position_mode="original"))])
def test_positions_from_the_layout_equal_the_familys_for_every_turn(engines, name, options):
    """Session.positions slices the layout's positions: after the media (M-RoPE's max + 1, the
    dense end under "original") they must equal the family's for the whole prompt, turn after turn."""
    eng = engines[name]
    with eng.session(images=[draw_image(120, 90, seed=2)], **options) as s:
        pruned = check_positions_every_turn(eng, s)
        assert pruned or not options.get("sparsity") and not options.get("prefill_sparsity")


def check_positions_every_turn(eng, s) -> bool:
    """Two turns of session `s`; after each, the positions Session.positions gives a next question
    must equal the family's own for the whole prompt. Returns whether any media item was pruned."""
    for q in ("Describe it.", "And then?"):
        s.ask(q, max_new_tokens=2, temperature=0)
        ids = eng.encode_text(eng.render(list(s.messages) + [s.user_message("More?", [])]))
        media = s.media + s.pending
        keys, spans = s.expand(ids, media)
        pruned = {j: s._visual[j] for _, _, j in spans if s._visual[j].saliency is not None}
        want = eng.model.positions(len(keys), spans, media, "cpu", pruned, s.sparsity.position_mode)
        assert torch.equal(s.positions(keys, spans, media), want)
    return bool(pruned)


def test_reused_prefix_across_blocks():
    cached = list(range(1000))
    for cut in (0, 255, 256, 257, 700, 999):
        keys = cached[:cut] + [-5] + cached[cut + 1:] + [7]
        assert reused_prefix(cached, keys, []) == cut
    assert reused_prefix(cached, cached + [1], []) == 1000
    assert reused_prefix(cached, cached + [1], [(600, 1001, 0)]) == 600  # never inside a visual item


def test_prefill_graphs_are_opt_in_everywhere(llava_vicuna):
    """Off unless asked for (load, chat, serve, bench); asked for on a CPU they change nothing."""
    import argparse
    import subprocess
    import sys

    from tinyvila.cli_options import add_load_options, load_options

    parser = argparse.ArgumentParser()
    add_load_options(parser)
    assert "prefill_graphs" not in load_options(parser.parse_args([]))
    assert load_options(parser.parse_args(["--prefill-graphs"]))["prefill_graphs"] is True
    assert not tinyvila.load(llava_vicuna, device="cpu", dtype="float32").prefill_graphs
    eng = tinyvila.load(llava_vicuna, device="cpu", dtype="float32", prefill_graphs=True)
    with eng.session() as s:
        assert eng.prefill_graphs and s.short_prefills is None  # CUDA graphs only on a GPU
    proc = subprocess.run([sys.executable, "-m", "tinyvila.chat", str(llava_vicuna), "--device", "cpu",
                           "--prefill-graphs", "-p", "Hi", "-n", "2", "-q"], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip(), proc.stderr
