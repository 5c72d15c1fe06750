"""Continuous batching (tinyvila/batch.py): every conversation of a batch gets the tokens it gets
alone, whatever joins, leaves, fails or is cancelled around it."""
import gc
import json
import re
import time
import types
import weakref

import pytest
import torch

import tinyvila
from tinyvila.batch import Batcher
from tinyvila.errors import ContextError, TinyVilaError
from tinyvila.sampling import SamplingParams

from fixtures_images import draw_image
from fixtures_qwen import build_qwen2_5_vl

# (image index, session options, questions, sampling): mixed lengths and sparsity settings
CONVERSATIONS = [
    (0, {}, ["What is in the picture?"], dict(max_new_tokens=9)),
    (1, {"sparsity": "image"}, ["Describe the colors."], dict(max_new_tokens=5)),
    (2, {"sparsity": "fastv:k=1"}, ["Is there a circle?"], dict(max_new_tokens=7)),
    (3, {"decode_sparsity": 0.5, "history": "evict"}, ["Where is the sun?", "And the sky?"], dict(max_new_tokens=6)),
    (2, {"sparsity": "image", "history": "keep"}, ["Count the shapes.", "Which is largest?"],
     dict(max_new_tokens=4)),
]


@pytest.fixture(scope="module")
def eng(llava_mistral):
    return tinyvila.load(llava_mistral, device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    d = tmp_path_factory.mktemp("qwen_batch")
    build_qwen2_5_vl(d)
    return tinyvila.load(d, device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory):
    from fixtures_qwen3 import build_qwen3_vl

    d = tmp_path_factory.mktemp("qwen3_batch")
    build_qwen3_vl(d)
    return tinyvila.load(d, device="cpu", dtype="float32")


def session(eng, image_files, conv):
    image, options, _, _ = conv
    return eng.session(images=[image_files[image]], **options)


def solo(eng, image_files, conv, **extra) -> list:
    """Each turn's tokens when the conversation runs alone (batch 1, Session.ask)."""
    questions, sampling = conv[2], dict(conv[3], ignore_eos=True, **extra)
    with session(eng, image_files, conv) as s:
        return [s.ask(q, **sampling).token_ids for q in questions]


@pytest.fixture(scope="module")
def expected(eng, image_files):
    return [solo(eng, image_files, conv) for conv in CONVERSATIONS]


def submit_all(batcher, eng, image_files, convs, **extra):
    """Every turn of every conversation submitted at once (follow-ups queue behind their own
    conversation's answer): (sessions, [[request per turn] per conversation])."""
    sessions = [session(eng, image_files, conv) for conv in convs]
    requests = [[batcher.ask(s, q, **dict(conv[3], ignore_eos=True, **extra)) for q in conv[2]]
                for s, conv in zip(sessions, convs)]
    return sessions, requests


def tokens(requests) -> list:
    return [[r.wait().token_ids for r in turns] for turns in requests]


@pytest.fixture()
def batch_sizes(eng):
    """The batch size of every decode step the LLM runs."""
    lm, sizes = eng.model.language_model, []
    real = lm.decode_rows
    lm.decode_rows = lambda ids, *a: sizes.append(ids.shape[0]) or real(ids, *a)
    yield sizes
    del lm.decode_rows


def test_each_conversation_gets_its_batch_1_tokens(eng, image_files, expected, batch_sizes):
    batcher = Batcher(eng, max_batch=8, prefill_chunk=48)
    _, requests = submit_all(batcher, eng, image_files, CONVERSATIONS)
    batcher.run()
    assert tokens(requests) == expected
    assert max(batch_sizes) >= 3  # they really shared decode steps (the short ones end before the last joins)
    assert len({tuple(t[0]) for t in expected}) == len(expected)  # different inputs, different answers
    # the follow-up was templated after the first answer: the history holds both turns (history keep)
    finished = [r.wait() for r in requests[4]]
    assert [r.finish_reason for r in finished] == ["length", "length"]


def test_max_batch_is_respected(eng, image_files, expected, batch_sizes):
    batcher = Batcher(eng, max_batch=2)
    _, requests = submit_all(batcher, eng, image_files, CONVERSATIONS[:4])
    batcher.run()
    assert tokens(requests) == expected[:4]
    assert max(batch_sizes) == 2


def test_sampling_with_seeds_equals_batch_1(eng, image_files):
    convs = [(0, {}, ["What is in the picture?"], dict(max_new_tokens=8, seed=3)),
             (1, {"sparsity": "image"}, ["Describe it."], dict(max_new_tokens=8, seed=4, top_k=20, top_p=0.9))]
    sampling = dict(temperature=1.5)
    batcher = Batcher(eng)
    _, requests = submit_all(batcher, eng, image_files, convs, **sampling)
    batcher.run()
    got = tokens(requests)
    assert got == [solo(eng, image_files, c, **sampling) for c in convs]
    greedy = [solo(eng, image_files, c) for c in convs]
    assert got != greedy  # the sampling really sampled


def test_one_joins_mid_way_while_the_others_decode(eng, image_files, expected):
    batcher = Batcher(eng, prefill_chunk=8)
    _, early = submit_all(batcher, eng, image_files, CONVERSATIONS[:2])
    while batcher._waiting or batcher._opening is not None or not batcher._running:  # both admitted, one decoding
        batcher.step()
    _, late = submit_all(batcher, eng, image_files, CONVERSATIONS[3:4])
    batcher.step()  # the newcomer is admitted (its media encoded): a step of its own ...
    assert batcher._opening is not None and batcher._opening[1].done == 0
    before = len(batcher._running[0][1].answer.tokens)
    batcher.step()  # ... then gets one chunk, while the others go on decoding
    assert batcher._opening[1].done == 8
    assert len(batcher._running[0][1].answer.tokens) == before + 1
    batcher.run()
    assert tokens(early) + tokens(late) == expected[:2] + expected[3:4]
    assert batcher.longest_stall_s > 0
    assert re.fullmatch(r"admission \(media encoding\)|a prefill chunk of [1-8] tokens|the first token \(\d+ prompt "
                        r"tokens left\)", batcher.longest_stall_cause), batcher.longest_stall_cause


def test_qwen2_5_vl_mrope_rows(qwen, image_files):
    convs = [(0, {}, ["What is in the picture?"], dict(max_new_tokens=6)),
             (1, {"sparsity": "image"}, ["Describe it.", "More?"], dict(max_new_tokens=5)),
             (2, {"decode_sparsity": 0.5}, ["Colors?"], dict(max_new_tokens=8))]
    batcher = Batcher(qwen, prefill_chunk=32)
    _, requests = submit_all(batcher, qwen, image_files, convs)
    batcher.run()
    assert tokens(requests) == [solo(qwen, image_files, c) for c in convs]


def test_cancel_running_waiting_and_opening(eng, image_files, expected):
    batcher = Batcher(eng, max_batch=2, prefill_chunk=8)
    sessions, requests = submit_all(batcher, eng, image_files, CONVERSATIONS[:2] + CONVERSATIONS[3:4])
    waiting = requests[2][1]  # the conversation's follow-up: queued behind its first turn
    waiting.cancel()
    for _ in range(3):
        batcher.step()
    running = requests[0][0]
    running.cancel()
    batcher.step()
    assert running.done and running.wait().finish_reason == "cancelled"
    assert running.wait().token_ids == expected[0][0][:len(running.wait().token_ids)]
    for _ in range(20):  # until conversation 3's first turn is being prefilled in chunks
        if batcher._opening is not None and batcher._opening[0] is requests[2][0]:
            break
        batcher.step()
    opening = requests[2][0]
    assert batcher._opening[0] is opening
    opening.cancel()
    batcher.run()
    assert waiting.wait().finish_reason == "cancelled" and waiting.wait().token_ids == []
    assert opening.wait().finish_reason == "cancelled" and opening.wait().token_ids == []
    assert tokens(requests[1:2]) == expected[1:2]
    # the cancelled conversations stay usable, with the answers they would get alone
    s0, s3 = sessions[0], sessions[2]
    assert not s3.busy
    assert [s3.ask(q, **dict(CONVERSATIONS[3][3], ignore_eos=True)).token_ids
            for q in CONVERSATIONS[3][2]] == expected[3]
    assert s0.last_result.finish_reason == "cancelled"


def test_a_bad_request_fails_alone(eng, image_files, expected):
    batcher = Batcher(eng)
    sessions, requests = submit_all(batcher, eng, image_files, CONVERSATIONS[:2])
    empty = batcher.ask(sessions[0], "   ")  # queued behind conversation 0's turn
    tiny = eng.session(images=[image_files[0]], max_seq_len=16)
    too_long = batcher.ask(tiny, "What is in the picture?")
    batcher.run()
    with pytest.raises(TinyVilaError, match="empty"):
        empty.wait()
    with pytest.raises(ContextError):
        too_long.wait()
    with pytest.raises(ContextError):
        list(too_long.stream())
    assert tokens(requests) == expected[:2]


def test_a_failing_callback_fails_its_request_alone(eng, image_files, expected):
    def broken(piece):
        raise ValueError("the client went away")

    batcher = Batcher(eng)
    sessions, requests = submit_all(batcher, eng, image_files, CONVERSATIONS[:2])
    other = eng.session(images=[image_files[3]])
    failing = batcher.ask(other, "Hello?", callback=broken, max_new_tokens=5)
    batcher.run()
    with pytest.raises(ValueError, match="went away"):
        failing.wait()
    assert tokens(requests) == expected[:2]
    assert not other.busy and other.ask("Hello?", max_new_tokens=2).token_ids


def test_background_thread_streams_and_callbacks(eng, image_files, expected):
    batcher = Batcher(eng).start()
    try:
        pieces = []
        sessions, requests = submit_all(batcher, eng, image_files, CONVERSATIONS[:3])
        cb = batcher.ask(sessions[0], "And the sky?", callback=pieces.append, max_new_tokens=4, ignore_eos=True)
        other = eng.session(images=[image_files[3]])
        ids = eng.encode_text(eng.render([other.user_message("Hello?", other.pending)]))
        events = []  # "open" when admitted, None when its first token is chosen, then its pieces
        started = batcher.submit(other, ids, SamplingParams(max_new_tokens=3, temperature=0, ignore_eos=True),
                                 callback=events.append, on_start=lambda: events.append(None),
                                 on_open=lambda: events.append("open"))
        streamed = ["".join(r.stream()) for r in (requests[0][0], requests[1][0], requests[2][0])]
        assert cb.wait(timeout=120).text == "".join(pieces) and pieces
        assert events[:2] == ["open", None] and None not in events[2:]
        assert "".join(events[2:]) == started.wait().text
        with pytest.raises(TinyVilaError, match="background thread"):
            batcher.step()
    finally:
        batcher.stop()
    assert tokens(requests) == expected[:3]
    assert streamed == [r[0].wait().text for r in requests]
    assert sessions[0].turns == 2  # the follow-up ran after the first answer, in the same conversation


def test_nothing_is_held_after(eng, image_files):
    batcher = Batcher(eng)
    sessions, requests = submit_all(batcher, eng, image_files, CONVERSATIONS[:3])
    batcher.run()
    refs = [weakref.ref(s) for s in sessions]
    results = tokens(requests)
    assert all(results) and batcher.idle() and batcher.active == 0
    del sessions, requests
    gc.collect()
    assert [r() for r in refs] == [None] * 3  # caches and decode buffers go with their sessions


def test_decode_time_leaves_out_only_the_steps_own_captures(eng, image_files):
    """Graph captures done before the batch runs (prepare()) are not taken out of its decode time
    (they once were, and the aggregate rate came out too high); on a CPU nothing is captured."""
    batcher = Batcher(eng)
    batcher._step_gpu = types.SimpleNamespace(capture_s=5.0)  # as prepare() leaves it on a GPU
    t0 = time.perf_counter()
    submit_all(batcher, eng, image_files, CONVERSATIONS[:2])
    batcher.run()
    assert batcher.capture_s == 5.0 and 0 < batcher.decode_s < time.perf_counter() - t0


def test_decode_rows_each_row_over_its_own_cache(eng, image_files):
    """Rows with different caches, slots and lengths: each row's logits are its batch-1 logits."""
    lm = eng.model.language_model
    sessions = [session(eng, image_files, conv) for conv in CONVERSATIONS[:3]]
    for s, conv in zip(sessions, CONVERSATIONS):
        s.ask(conv[2][0], max_new_tokens=2, ignore_eos=True)
    rows = [(s.cache, s.cache.length, 5 + i) for i, s in enumerate(sessions)]
    with torch.no_grad():
        alone = [lm(lm.embed(torch.tensor([t])), torch.tensor([n]), c, n) for c, n, t in rows]
        for c, n, _ in rows:
            c.length = n
        together = lm.decode_rows(torch.tensor([t for _, _, t in rows]), torch.tensor([n for _, n, _ in rows]),
                                  [c for c, _, _ in rows], [n for _, n, _ in rows])
    torch.testing.assert_close(together, torch.cat(alone), rtol=1e-5, atol=1e-5)
    assert [c.length for c, _, _ in rows] == [n + 1 for _, n, _ in rows]


@pytest.mark.parametrize("family", ["llava_mistral", "qwen", "qwen3"])
def test_decode_batch_kernels_equal_decode_rows(eng, qwen, qwen3, image_files, family):
    """The GPU step (Triton kernels, here in the interpreter): one launch for every row's own
    cache through the address table, a padding row over a one-slot scratch cache among them.
    Mistral's sliding window and GQA; Qwen2.5's M-RoPE and q/k/v biases; Qwen3's q/k norms and
    interleaved M-RoPE."""
    from tinyvila.kernels.decode_attention import decode_workspace, rows_split_count
    from tinyvila.kv_cache import KVCache

    engine = {"llava_mistral": eng, "qwen": qwen, "qwen3": qwen3}[family]
    lm = engine.model.language_model
    sessions = [session(engine, image_files, conv) for conv in CONVERSATIONS[:3]]
    for s, conv in zip(sessions, CONVERSATIONS):
        s.ask(conv[2][0], max_new_tokens=2, ignore_eos=True)
    cfg = lm.cfg
    scratch = KVCache(cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim, 1, "cpu", torch.float32)
    caches = [s.cache for s in sessions]
    slots = [c.length for c in caches]
    ids, pos = torch.tensor([5, 6, 0, 7]), torch.tensor(slots[:2] + [0] + slots[2:])
    table = torch.tensor([a for a in zip(*(c.address() for c in caches[:2] + [scratch] + caches[2:]))])
    positions = pos.expand(3, -1) if family != "llava_mistral" else pos
    with torch.no_grad():
        want = lm.decode_rows(ids[[0, 1, 3]], positions[..., [0, 1, 3]], caches, slots)
        for c, n in zip(caches, slots):
            c.length = n
        ws = decode_workspace(4 * cfg.num_attention_heads, rows_split_count(4, cfg.num_key_value_heads), cfg.head_dim,
                              "cpu")
        slot_t = torch.tensor(slots[:2] + [0] + slots[2:])
        got = lm.decode_batch(ids, positions, table, slot_t, (slot_t + 1).int(), ws)
    torch.testing.assert_close(got[[0, 1, 3]], want, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(got[0], got[1]) and not torch.allclose(got[1], got[3])  # the rows differ


def test_prepare_captures_nothing_on_a_cpu(eng):
    batcher = Batcher(eng, max_batch=4)
    assert batcher.prepare() is batcher and batcher._step_gpu is None


def test_batcher_arguments():
    with pytest.raises(TinyVilaError, match="max_batch"):
        Batcher(None, max_batch=0)
    with pytest.raises(TinyVilaError, match="prefill_chunk"):
        Batcher(None, prefill_chunk=1.5)


def test_eval_batch_gives_the_batch_1_answers(llava_vicuna, tmp_path, capsys):
    from tinyvila.tools.eval import main

    for i in range(3):
        draw_image(120 + 10 * i, 90, seed=i).save(tmp_path / f"img{i}.png")
    samples = [{"id": "a", "image": "img0.png", "question": "What colour?", "answers": ["red"], "metric": "exact"},
               {"id": "b", "image": "img1.png", "metric": "vqa",
                "turns": [{"question": "Which shape?", "answers": ["circle"]}, {"question": "How many?", "answers": ["2"]}]},
               {"id": "c", "image": "img2.png", "question": "Which? A. x B. y", "answers": ["B"], "metric": "choice"}]
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(s) + "\n" for s in samples))
    answers = {}
    for batch in ("1", "3"):
        out = tmp_path / f"out{batch}"
        assert main([str(llava_vicuna), "--data", str(data), "--configs", "dense,sparsevila:image", "--out", str(out),
                     "--device", "cpu", "--max-new-tokens", "5", "--no-plots", "--batch", batch]) == 0
        records = [json.loads(line) for line in (out / "answers.jsonl").read_text().splitlines()]
        answers[batch] = sorted((r["config"], r["id"], [t["answer"] for t in r["turns"]]) for r in records)
    assert len(answers["3"]) == 6 and answers["3"] == answers["1"]
    with pytest.raises(SystemExit):
        main([str(llava_vicuna), "--data", str(data), "--batch", "0"])
    assert "--batch must be at least 1" in capsys.readouterr().err


def test_bench_batch_runs_and_matches_batch_1(llava_vicuna, tmp_path, capsys):
    from tinyvila.tools import bench

    out = tmp_path / "batch.json"
    assert bench.main(["--model", str(llava_vicuna), "--device", "cpu", "--dtype", "float32", "--image", "64x48",
                       "--new-tokens", "16", "--batch", "3", "--stagger", "1", "--prefill-chunk", "32",
                       "--sparsity", "image", "--json", str(out)]) == 0
    runs = json.loads(out.read_text())["runs"]
    assert [(r["sparsity"], r["batch"]) for r in runs] == [
        ("dense", 1), ("dense", 3), ("p=0.6 d=0", 1), ("p=0.6 d=0", 3), ("p=0.6 d=0.75", 1), ("p=0.6 d=0.75", 3)]
    assert all(r["tokens_same"] == r["conversations"] == 3 and r["aggregate_tok_s"] > 0 for r in runs)
    assert all(len({tuple(t) for t in r["tokens"]}) == 3 for r in runs)  # their own images and questions
    for r in runs:  # batch 1: every step holds all its rows; batch 3 also fills and drains
        assert 0 < r["full_batch_steps"] <= r["decode_steps"] and r["full_batch_tok_s"] > 0
        if r["batch"] == 1:
            assert r["full_batch_steps"] == r["decode_steps"] == 3 * 15  # the first token is the prefill's
            assert r["full_batch_tok_s"] == pytest.approx(r["aggregate_tok_s"])
        else:
            assert r["full_batch_steps"] < r["decode_steps"] < 3 * 15
    table = capsys.readouterr().out
    assert table.count("\n| ") == 6 and "longest stall ms" in table


def test_bench_batch_samples_with_a_seed_per_conversation(llava_vicuna, tmp_path):
    from tinyvila.tools import bench

    def tokens(*sampling):
        out = tmp_path / "sampled.json"
        assert bench.main(["--model", str(llava_vicuna), "--device", "cpu", "--dtype", "float32", "--image", "64x48",
                           "--new-tokens", "6", "--batch", "2", *sampling, "--json", str(out)]) == 0
        runs = json.loads(out.read_text())["runs"]
        assert all(r["tokens_same"] == r["conversations"] == 2 for r in runs)  # batch 2 = batch 1, seeds included
        return runs[-1]["tokens"]

    assert tokens("--temperature", "1.5", "--top-p", "0.95") != tokens()  # it really samples


@pytest.mark.gpu
def test_gpu_batch_tokens_equal_batch_1(llava_mistral, image_files):
    """On a GPU in fp32 (never run on the CPU CI): the batched step, graphed per batch bucket (and
    eager without graphs), gives each conversation the tokens of its batch-1 decode (greedy: graphed;
    one conversation sampled with a seed)."""
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    for graphs in (True, False):
        gpu = tinyvila.load(llava_mistral, device="cuda", dtype="float32", cuda_graphs=graphs)
        sampled = (3, {"decode_sparsity": 0.5}, ["Where is the sun?"], dict(max_new_tokens=8, temperature=1.5, seed=7,
                                                                            top_p=0.95))
        convs = CONVERSATIONS[:3] + [sampled]
        alone = [solo(gpu, image_files, conv) for conv in convs]
        batcher = Batcher(gpu, max_batch=5, prefill_chunk=32).prepare()  # buckets 1, 2, 4, 8 captured now
        captured = batcher._step_gpu.capture_s
        _, requests = submit_all(batcher, gpu, image_files, convs)
        batcher.run()
        assert tokens(requests) == alone
        buckets = batcher._step_gpu.buckets
        assert sorted(buckets) == [1, 2, 4, 8]
        assert all((b["graph"] is not None) == graphs for b in buckets.values())
        assert batcher._step_gpu.capture_s == captured and (captured > 0) == graphs  # none while running


def test_what_a_newcomer_prefills_ahead(eng, image_files):
    """All but the last token (dense), up to the media's end (retrieval: the question scores them in
    one pass), up to the fresh media (FastV: its pruning pass needs them and all after)."""
    from tinyvila.generate import open_turn

    ends = {}
    for name, options in (("dense", {}), ("retrieval", {"decode_sparsity": 0.5}), ("fastv", {"sparsity": "fastv:k=1"})):
        with eng.session(images=[image_files[0]], **options) as s:
            ids, media, _ = s.question_turn("What is it?")
            opening = open_turn(s, ids, media, SamplingParams())
            prompt = opening.prompt
            ends[name] = opening.ahead_end()
            s.busy = False
    assert ends["dense"] == len(prompt.keys) - 1
    assert ends["retrieval"] == prompt.vis_end < ends["dense"]
    assert ends["fastv"] == prompt.spans[0][0] > 0


def test_longvila_videos_and_an_image(tmp_path_factory):
    from fixtures_vila import build_vila

    vila = tinyvila.load(build_vila(str(tmp_path_factory.mktemp("vila_batch")), backbone="qwen2").path, device="cpu",
                         dtype="float32")
    clips = [[draw_image(64, 48, seed=10 * c + k) for k in range(4)] for c in range(2)]
    convs = [dict(videos=[clips[0]]), dict(videos=[clips[1]], sparsity="video"),
             dict(images=[draw_image(60, 60, seed=5)], decode_sparsity=0.5)]
    greedy = dict(max_new_tokens=6, ignore_eos=True)
    alone = []
    for options in convs:
        with vila.session(**options) as s:
            alone.append([s.ask(q, **greedy).token_ids for q in ("What happens?", "Then?")])
    batcher = Batcher(vila, prefill_chunk=24)
    requests = [[batcher.ask(s, q, **greedy) for q in ("What happens?", "Then?")]
                for s in [vila.session(**options) for options in convs]]
    batcher.run()
    assert tokens(requests) == alone
    assert len({tuple(a[0]) for a in alone}) == len(convs)  # different media, different answers


@pytest.fixture(scope="module")
def batch_server(llava_vicuna, tmp_path_factory):
    from test_serve import LiveServer

    s = LiveServer(tmp_path_factory.mktemp("batch_server"), llava_vicuna, "--api-key", "sk-test",
                   "--served-model-name", "tiny-llava", "--max-batch", "4")
    yield s
    s.stop()


def test_serve_max_batch_concurrent_clients_get_their_batch_1_answers(batch_server, llava_vicuna):
    """Six clients at once, text and images (the server's image preset), different lengths, half of
    them streamed: each answer is the one Engine.generate gives alone."""
    import threading

    from test_serve import data_url, user

    eng = tinyvila.load(llava_vicuna, device="cpu", dtype="float32", sparsity="image")
    pictures = {i: draw_image(90 + 10 * i, 70, seed=20 + i) for i in range(0, 6, 2)}
    answers = {}

    def run(i):
        content = user(f"Tell me about picture {i}.", data_url(pictures[i])) if i in pictures else \
            {"role": "user", "content": f"Tell me about number {i}."}
        r = batch_server.client().chat.completions.create(model="tiny-llava", messages=[content], temperature=0,
                                                          max_tokens=4 + i, stream=i % 2 == 1)
        answers[i] = ("".join(c.choices[0].delta.content or "" for c in r if c.choices) if i % 2 else
                      r.choices[0].message.content)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    alone = {i: eng.generate(f"Tell me about picture {i}.", images=[pictures[i]], temperature=0, max_new_tokens=4 + i)
             if i in pictures else eng.generate(f"Tell me about number {i}.", temperature=0, max_new_tokens=4 + i)
             for i in range(6)}
    assert answers == {i: r.text for i, r in alone.items()}
    health = batch_server.http.get("/health").json()
    assert health["max_batch"] == 4 and health["answers"] == 6
    assert (health["longest_stall_ms"] > 0) == bool(health["longest_stall_cause"])  # a cause with every stall


def test_qwen3_vl_rows(qwen3, image_files):
    """Qwen3-VL: q/k norms in the batched projections, interleaved M-RoPE, DeepStack prefill."""
    q3 = qwen3
    convs = [(0, {}, ["What is in the picture?"], dict(max_new_tokens=6)),
             (1, {"sparsity": "image"}, ["Describe it.", "More?"], dict(max_new_tokens=5)),
             (2, {"decode_sparsity": 0.5}, ["Colors?"], dict(max_new_tokens=8))]
    batcher = Batcher(q3, prefill_chunk=32)
    _, requests = submit_all(batcher, q3, image_files, convs)
    batcher.run()
    assert tokens(requests) == [solo(q3, image_files, c) for c in convs]
