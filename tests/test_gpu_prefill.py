"""Short prefills as CUDA graphs (`pytest -m gpu` on a GPU machine): the graphed static prefill
against the eager prefill in real conversations (answers, cache contents, retrieval selections),
at the bucket edges, in a session mixing short and long turns, with its capture done once and
its memory reported."""
import pytest
import torch

import tinyvila
from tinyvila.generate import PREFILL_BUCKETS, PrefillGraphs, Prompt
from tinyvila.kv_cache import KVCache

from fixtures_images import draw_image
from fixtures_qwen import build_qwen2_5_vl
from fixtures_qwen3 import build_qwen3_vl

pytestmark = pytest.mark.gpu
LONG = "Now tell me everything again, " * 30  # past the largest bucket: eager
QUESTIONS = ("Describe it.", "What colour is the top left corner?", "And the bottom?", LONG, "Thanks, and the sky?")


@pytest.fixture(scope="module")
def paths(llava_mistral, tmp_path_factory):
    qwen, qwen3 = tmp_path_factory.mktemp("qwen_gpu_prefill"), tmp_path_factory.mktemp("qwen3_gpu_prefill")
    build_qwen2_5_vl(qwen)
    build_qwen3_vl(qwen3)
    return {"llava": llava_mistral, "qwen": qwen, "qwen3": qwen3}


def conversation(eng, **options):
    """Per turn: the result, the cache's slots, the decode selection."""
    out = []
    options = {"max_seq_len": 2048, **options}
    with eng.session(images=[draw_image(120, 90, seed=1)], **options) as s:
        for q in QUESTIONS:
            r = s.ask(q, max_new_tokens=6, temperature=0, ignore_eos=True)
            out.append((r, s.cache.k[:, :, :s.cache.length].clone(), s.last_selection))
    return out


@pytest.mark.parametrize("which", ["llava", "qwen", "qwen3"])
@pytest.mark.parametrize("options", [{}, dict(sparsity="image"), dict(decode_sparsity=0.5, history="evict")])
def test_graphed_follow_ups_equal_eager_in_fp32(paths, which, options):
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    path = paths[which]
    graphed = conversation(tinyvila.load(path, device="cuda", dtype="float32", prefill_graphs=True), **options)
    eager = conversation(tinyvila.load(path, device="cuda", dtype="float32"), **options)
    assert [r.stats.prefill_graphed for r, _, _ in graphed] == [False, True, True, False, True]
    assert not any(r.stats.prefill_graphed for r, _, _ in eager)
    for (a, cache_a, sel_a), (b, cache_b, sel_b) in zip(graphed, eager):
        assert a.token_ids == b.token_ids
        torch.testing.assert_close(cache_a, cache_b, atol=1e-4, rtol=1e-4)
        assert (sel_a is None) == (sel_b is None) and (sel_a is None or torch.equal(sel_a, sel_b))


def test_capture_once_per_bucket_and_memory_reported(llava_vicuna):
    """A session captures a bucket on its first use only; the next session of its size, once it
    has closed, takes its graphs (Engine.take_spare) and captures nothing; a session of another
    size captures its own, reusing the engine's pool rather than growing it as much. The graphs'
    memory is reported and bounded."""
    eng = tinyvila.load(llava_vicuna, device="cuda", dtype="float16", prefill_graphs=True)
    held = []
    for max_seq_len, inherited in ((1024, False), (1024, True), (1000, False)):  # 1024: the checkpoint's limit
        captured = set()
        for r, _, _ in conversation(eng, max_seq_len=max_seq_len):
            s = r.stats
            if not s.prefill_graphed:
                assert s.prefill_graph_capture_s == 0, (s.prefill_tokens, s.prefill_graph_capture_s)
                continue
            bucket = next(b for b in PREFILL_BUCKETS if s.prefill_tokens <= b)
            fresh = bucket not in captured and not inherited
            assert (s.prefill_graph_capture_s > 0) == fresh, (bucket, captured, inherited, s)
            captured.add(bucket)
        assert captured
        held.append(r.stats.prefill_graph_bytes)
    assert 0 < held[0] < 2 ** 30 and held[1] == held[0] and held[2] <= held[0], held


@pytest.mark.parametrize("n", [1, 16, 17, 512])
def test_graphed_static_prefill_at_bucket_edges_equals_eager(llava_mistral, n):
    """One prefill of n text tokens after a cached prefix, graphed, against the eager one: logits,
    every cache slot written, retrieval scores of the real rows."""
    torch.backends.cuda.matmul.allow_tf32 = False
    eng = tinyvila.load(llava_mistral, device="cuda", dtype="float32", prefill_graphs=True)
    with eng.session(max_seq_len=1200) as s:
        lm, start = s.lm, 40
        ids = torch.randint(3, 200, (start + n,), generator=torch.Generator().manual_seed(n)).tolist()
        eager = KVCache(*s.cache.k.shape[:2], s.cache.k.shape[-1], s.cache.max_len, "cuda", torch.float32)
        prompt = Prompt(ids, [], s.positions(ids, [], []), s.layout([], [], len(ids)))
        vis = torch.arange(5, 30, device="cuda")
        with torch.no_grad():
            for cache in (eager, s.cache):
                lm(lm.embed(torch.tensor(ids[:start], device="cuda")), prompt.positions[:start], cache, 0)
            want, want_r = lm.scored(lm.embed(torch.tensor(ids[start:], device="cuda")), prompt.positions[start:],
                                     eager, start, vis)
            prompt.layout.vis_slots = vis
            s.tokens = ids[:start]
            got, got_r = s.short_prefills.run(s, prompt, start, True)
        assert s.short_prefills.used and len(s.short_prefills.entries) == 1
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(got_r, want_r, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(s.cache.k[:, :, :start + n], eager.k[:, :, :start + n], atol=1e-5, rtol=1e-5)
        assert s.cache.length == start + n
        assert s.short_prefills.run(s, Prompt(ids + [5] * (PREFILL_BUCKETS[-1] + 1 - n), [], prompt.positions,
                                              prompt.layout), start, False) is None  # too long: eager


def test_prefill_graphs_stay_off_by_default_on_a_gpu(llava_vicuna):
    eng = tinyvila.load(llava_vicuna, device="cuda", dtype="float16")
    with eng.session() as s:
        assert s.short_prefills is None
        r = s.ask("Hello, who are you?", max_new_tokens=2)
        assert not r.stats.prefill_graphed and r.stats.prefill_graph_bytes == 0
    graphed = tinyvila.load(llava_vicuna, device="cuda", dtype="float16", prefill_graphs=True)
    with graphed.session() as s:
        assert isinstance(s.short_prefills, PrefillGraphs)
        assert s.ask("Hello, who are you?", max_new_tokens=2).stats.prefill_graphed  # text-only first turn
