"""tinyvila-bench on a tiny checkpoint on the CPU: the record it writes is complete and consistent."""
import json

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
    from tinyvila.quant.linear import W4Linear

    cfg = TextConfig.from_dict(dict(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2), "qwen2")
    lm = DecoderLM(cfg)
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
