"""tinyvila-bench on a tiny checkpoint on the CPU: the record it writes is complete and consistent."""
import json

import pytest

from tinyvila.tools import bench


def test_bench_on_a_checkpoint_records_every_stage(llava_vicuna, tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert bench.main(["--model", str(llava_vicuna), "--device", "cpu", "--dtype", "float32", "--image", "64x48",
                       "--new-tokens", "5", "--runs", "2", "--json", str(out)]) == 0
    table = capsys.readouterr().out
    assert table.count(str(llava_vicuna)) == 2  # one row per measured run (the warm-up is not shown)
    record = json.loads(out.read_text())
    assert len(record["runs"]) == 2
    for run in record["runs"]:
        assert run["decode_tokens"] == 4  # 5 new tokens: the first comes from the prefill
        assert run["visual_tokens"] > 0 and run["prefill_tokens"] > run["visual_tokens"]
        assert 0 < run["projector_s"] < run["vision_s"]  # the projector runs inside the vision stage
        assert run["bytes_per_step"] > 0


def test_random_w4_layers_run_and_count_their_packed_bytes():
    import torch

    from tinyvila.models.layers import DecoderLM, TextConfig
    from tinyvila.models.quantized import W4Linear

    cfg = TextConfig.from_dict(dict(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2), "qwen2")
    torch.manual_seed(0)
    lm = DecoderLM(cfg)
    with torch.no_grad():
        lm.embed_tokens.weight.normal_(0, 0.02)  # the embedding has no init of its own: rows come from checkpoints
    fp16_bytes = bench.decode_bytes(lm, 0)
    bench.random_w4(lm, group_size=16)
    assert sum(isinstance(m, W4Linear) for m in lm.modules()) == 8
    linear_weights = 2 * 64 * (64 + 32 + 32 + 64 + 2 * 128 + 128)  # per layer: qkv, o, gate_up, down
    groups = linear_weights // 16
    expected = fp16_bytes - linear_weights * 4 + linear_weights // 2 + groups * 5 // 2  # fp32 -> 4-bit + scales/zeros
    assert bench.decode_bytes(lm, 0) == expected
    from tinyvila.kv_cache import KVCache

    with torch.no_grad():
        logits = lm(lm.embed(torch.arange(5)), torch.arange(5), KVCache(2, 2, 16, 8, "cpu", torch.float32), 0)
    assert torch.isfinite(logits).all()


def test_bench_runs_dense_then_the_sparse_setting(llava_vicuna, tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert bench.main(["--model", str(llava_vicuna), "--device", "cpu", "--dtype", "float32", "--image", "64x48",
                       "--new-tokens", "3", "--runs", "1", "--prefill-sparsity", "0.6", "--json", str(out)]) == 0
    table = capsys.readouterr().out
    assert "p=0.6 d=0 turn 1 vs dense: LLM prefill x" in table
    dense, sparse = json.loads(out.read_text())["runs"]
    assert (dense["prefill_sparsity"], sparse["prefill_sparsity"]) == (0, 0.6)
    assert dense["visual_tokens_kept"] == dense["visual_tokens"] == sparse["visual_tokens"]
    assert sparse["visual_tokens_kept"] < dense["visual_tokens"]
    assert sparse["prefill_tokens"] == dense["prefill_tokens"] - dense["visual_tokens"] + sparse["visual_tokens_kept"]


def test_bench_warms_every_setting_up_untimed(llava_vicuna, tmp_path, capsys, monkeypatch):
    """Each setting's first conversation (Triton compilation, graph capture) is run but never timed."""
    started, real = [], bench.conversation

    def numbered(*args, **kwargs):  # marks each conversation's stats with its number
        number = len(started)
        started.append(args[0].sparsity)  # the setting's session
        for turn, stats, projector_s in real(*args, **kwargs):
            stats.ttft_s = 1000.0 + number
            yield turn, stats, projector_s

    monkeypatch.setattr(bench, "conversation", numbered)
    out = tmp_path / "bench.json"
    assert bench.main(["--model", str(llava_vicuna), "--device", "cpu", "--dtype", "float32", "--image", "64x48",
                       "--new-tokens", "3", "--runs", "2", "--turns", "2", "--prefill-sparsity", "0.6",
                       "--json", str(out)]) == 0
    assert [s.prefill for s in started] == [0, 0, 0, 0.6, 0.6, 0.6]  # per setting: a warm-up, then 2 runs
    runs = json.loads(out.read_text())["runs"]
    assert [(r["ttft_s"] - 1000, r["turn"]) for r in runs] == [
        (1, 1), (1, 2), (2, 1), (2, 2), (4, 1), (4, 2), (5, 1), (5, 2)]  # conversations 0 and 3 are not there


def test_bench_max_seq_len_sizes_the_sessions_context(llava_vicuna, capsys, monkeypatch):
    """--max-seq-len: the context a chat session would have (decode attention splits what the
    cache holds room for), never less than the turns need."""
    sizes, real = [], bench.conversation

    def recorded(session, *args, **kwargs):
        sizes.append(session.cache.max_len)
        yield from real(session, *args, **kwargs)

    monkeypatch.setattr(bench, "conversation", recorded)
    common = ["--model", str(llava_vicuna), "--device", "cpu", "--dtype", "float32", "--image", "64x48",
              "--new-tokens", "3", "--runs", "1"]
    assert bench.main(common) == 0
    assert bench.main(common + ["--max-seq-len", "3000"]) == 0
    assert bench.main(common + ["--max-seq-len", "8"]) == 0
    need = sizes[0]
    assert sizes == [need, need, 3000, 3000, need, need] and need < 3000


def test_bench_multi_turn_decode_sparsity(llava_vicuna, tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert bench.main(["--model", str(llava_vicuna), "--device", "cpu", "--dtype", "float32", "--image", "64x48",
                       "--new-tokens", "4", "--runs", "1", "--turns", "2", "--prefill-sparsity", "0.5",
                       "--decode-sparsity", "0.75", "--json", str(out)]) == 0
    table = capsys.readouterr().out
    assert "p=0.5 d=0.75 turn 2 vs dense:" in table and "vs d=0: decode x" in table and "bytes predict" in table
    runs = json.loads(out.read_text())["runs"]
    assert [(r["prefill_sparsity"], r["decode_sparsity"], r["turn"]) for r in runs] == [
        (0, 0, 1), (0, 0, 2), (0.5, 0, 1), (0.5, 0, 2), (0.5, 0.75, 1), (0.5, 0.75, 2)]
    dense2, pruned2, both2 = runs[1], runs[3], runs[5]
    assert dense2["prefill_tokens"] < runs[0]["prefill_tokens"]  # turn 2 prefilled only its question
    assert both2["visual_tokens_selected"] < pruned2["visual_tokens_selected"] == pruned2["visual_tokens_kept"]
    assert both2["decode_context_tokens"] < pruned2["decode_context_tokens"] == pruned2["context_tokens"]


def test_bench_plots_the_latency_breakdown_of_each_setting(llava_vicuna, tmp_path, capsys, monkeypatch):
    from PIL import Image

    from tinyvila.tools import plots

    drawn = []
    draw = plots.latency_breakdown
    monkeypatch.setattr(plots, "latency_breakdown", lambda rows, *a, **k: drawn.append(rows) or draw(rows, *a, **k))
    out, png = tmp_path / "bench.json", tmp_path / "latency.png"
    assert bench.main(["--model", str(llava_vicuna), "--device", "cpu", "--dtype", "float32", "--image", "64x48",
                       "--new-tokens", "3", "--runs", "1", "--prefill-sparsity", "0.6", "--json", str(out),
                       "--plot", str(png)]) == 0
    with Image.open(png) as im:
        assert im.format == "PNG" and im.width > 0
    (rows,) = drawn
    runs = json.loads(out.read_text())["runs"]
    assert [r["name"] for r in rows] == ["dense", "p=0.6 d=0"]
    for row, run in zip(rows, runs):  # one run per setting: the medians are that run's times
        assert (row["vision_s"], row["prefill_s"]) == (run["vision_s"], run["prefill_s"])
        assert row["decode_s"] == run["decode_s"] - run["graph_capture_s"] and row["tokens"] == run["prefill_tokens"]


@pytest.mark.parametrize("path", ["latency.svg", "missing/latency.png"])
def test_bench_checks_the_plot_path_before_running(path, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:  # no checkpoint needed: it stops before loading one
        bench.main(["--model", str(tmp_path / "nowhere"), "--device", "cpu", "--plot", str(tmp_path / path)])
    assert e.value.code == 2 and "--plot" in capsys.readouterr().err


def test_bench_follow_ups_of_a_set_length_in_one_session_per_setting(llava_vicuna, tmp_path, capsys, monkeypatch):
    """--question-tokens sets each question's length; turns 2.. prefill only the last answer and
    the question, over the image cached in the setting's one session (cleared between runs), and
    each turn's TTFT is printed."""
    sessions = []
    real = bench.Session

    def recorded(*args, **kwargs):
        sessions.append(real(*args, **kwargs))
        return sessions[-1]

    monkeypatch.setattr(bench, "Session", recorded)
    out = tmp_path / "bench.json"
    assert bench.main(["--model", str(llava_vicuna), "--device", "cpu", "--dtype", "float32", "--image", "64x48",
                       "--new-tokens", "3", "--runs", "2", "--turns", "3", "--question-tokens", "37",
                       "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert len(sessions) == 1  # one setting (dense): one session for the warm-up and both runs
    runs = json.loads(out.read_text())["runs"]
    assert [r["turn"] for r in runs] == [1, 2, 3, 1, 2, 3]
    for first, follow in ((runs[0], runs[1]), (runs[3], runs[4])):
        assert follow["prefill_tokens"] < first["prefill_tokens"] - first["visual_tokens"]
        assert follow["vision_s"] == 0 and first["vision_s"] > 0  # each run starts over: the image encoded again
    assert runs[2]["prefill_tokens"] == runs[1]["prefill_tokens"]  # the same answer length and question
    assert runs[1]["prefill_tokens"] == 1 + 37  # the answer's last token (never fed back) and the question
    line = next(l for l in printed.splitlines() if l.startswith("dense TTFT: "))
    assert line.count(" ms (") == 3 and "turn 3 " in line
    with pytest.raises(SystemExit) as e:
        bench.main(["--model", str(llava_vicuna), "--device", "cpu", "--question-tokens", "0"])
    assert e.value.code == 2 and "--question-tokens" in capsys.readouterr().err


@pytest.mark.parametrize("arch", ["qwen3-vl-2b", "qwen3-vl-4b", "qwen3-vl-8b"])
def test_qwen3_archs_have_transformers_parameter_shapes(arch):
    """Built on the meta device (no memory): every parameter of transformers' model of the same
    config has its counterpart, q/k/v and gate/up fused."""
    import torch

    model = bench.build(arch, torch.device("meta"), torch.bfloat16)
    with torch.device("meta"):
        ref = bench.hf_model(arch, "meta", torch.bfloat16)
    ours = sum(p.numel() for p in model.parameters())
    theirs = sum(p.numel() for n, p in ref.named_parameters())
    assert ours == theirs and model.language_model.deepstack_layers == 3
