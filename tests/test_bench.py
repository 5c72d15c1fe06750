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
