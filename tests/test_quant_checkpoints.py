"""AWQ W4A16 checkpoints end to end, on the CPU: AutoAWQ-format checkpoints built here (as the hub
ships them) load in every family and give exactly the outputs of their dequantized weights; what
`tinyvila-quantize` writes is read back by this file's own unpacker; quantize-then-run works
through the command lines."""
import json
import re
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import tinyvila
from tinyvila.errors import CheckpointError
from tinyvila.quant.pack import quantize as rtn_quantize

from fixtures_images import draw_image
from fixtures_qwen import build_qwen2_5_vl
from fixtures_qwen3 import build_qwen3_vl
from fixtures_vila import build_vila

LLM_LINEAR = re.compile(r"layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)\.weight$")
AWQ_NIBBLE_OF_COLUMN = [0, 4, 1, 5, 2, 6, 3, 7]  # column j of a group of 8 sits in nibble [j]


def unpack_awq(packed: torch.Tensor) -> torch.Tensor:
    """This test's own unpacker: int32 [R, C/8] -> [R, C], bit by bit."""
    R, C8 = packed.shape
    out = torch.zeros(R, C8 * 8, dtype=torch.int64)
    words = packed.to(torch.int64) & 0xFFFFFFFF
    for j in range(8):
        nib = AWQ_NIBBLE_OF_COLUMN[j]
        out[:, j::8] = (words >> (4 * nib)) & 0xF
    return out


def dequant(qweight, qzeros, scales) -> torch.Tensor:
    """W [N, K] in fp32 from the AutoAWQ tensors."""
    q, z = unpack_awq(qweight).float(), unpack_awq(qzeros).float()
    group = q.shape[0] // z.shape[0]
    return ((q - z.repeat_interleave(group, 0)) * scales.float().repeat_interleave(group, 0)).t()


def read_folder(folder):
    tensors = {}
    for f in sorted(folder.rglob("*.safetensors")):
        with safe_open(str(f), framework="pt") as h:
            for k in h.keys():
                tensors[(f.relative_to(folder).as_posix(), k)] = h.get_tensor(k)
    return tensors


def make_awq_copies(src, awq_dir, deq_dir, group_size=16, lm_head=False):
    """Write an AutoAWQ-format copy of a checkpoint (LLM linears in 4 bits, as the hub's AWQ
    checkpoints hold them) and a 16-bit copy whose weights are exactly their dequantization."""
    shutil.copytree(src, awq_dir)
    shutil.copytree(src, deq_dir)
    for f in sorted(awq_dir.rglob("*.safetensors")):
        rel = f.relative_to(awq_dir)
        if "vision" in rel.as_posix() or "projector" in rel.as_posix():
            continue
        with safe_open(str(f), framework="pt") as h:
            tensors = {k: h.get_tensor(k) for k in h.keys()}
        awq, deq = {}, {}
        for name, t in tensors.items():
            if (LLM_LINEAR.search(name) and "vision" not in name) or (lm_head and name.endswith("lm_head.weight")):
                qweight, qzeros, scales = rtn_quantize(t.float(), group_size)
                stem = name.removesuffix("weight")
                awq.update({stem + "qweight": qweight, stem + "qzeros": qzeros, stem + "scales": scales})
                deq[name] = dequant(qweight, qzeros, scales).contiguous()  # fp32: exact
            else:
                awq[name] = deq[name] = t
        save_file(awq, str(f))
        save_file(deq, str(deq_dir / rel))
        config = f.parent / "config.json"
        if config.is_file():
            c = json.loads(config.read_text())
            c["quantization_config"] = {"quant_method": "awq", "bits": 4, "group_size": group_size,
                                        "zero_point": True, "version": "gemm", "modules_to_not_convert": ["visual"]}
            config.write_text(json.dumps(c))
    for index in awq_dir.rglob("model.safetensors.index.json"):
        index.unlink()
        (deq_dir / index.relative_to(awq_dir)).unlink()


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory, llava_vicuna):
    qwen = tmp_path_factory.mktemp("qwen")
    build_qwen2_5_vl(qwen)
    vila = tmp_path_factory.mktemp("vila")
    build_vila(str(vila), backbone="qwen2")
    qwen3 = tmp_path_factory.mktemp("qwen3")
    build_qwen3_vl(qwen3)
    return {"llava": llava_vicuna, "qwen": qwen, "vila": vila, "qwen3": qwen3}


@pytest.mark.parametrize("family", ["llava", "qwen", "vila", "qwen3"])
def test_autoawq_checkpoint_matches_its_dequantized_weights(tiny_models, tmp_path, family):
    make_awq_copies(tiny_models[family], tmp_path / "awq", tmp_path / "deq", lm_head=family == "llava")
    awq = tinyvila.load(tmp_path / "awq", device="cpu", dtype="float32")
    deq = tinyvila.load(tmp_path / "deq", device="cpu", dtype="float32")
    from tinyvila.models.quantized import W4Linear

    w4 = [n for n, m in awq.model.named_modules() if isinstance(m, W4Linear)]
    n_layers = awq.model.language_model.cfg.num_hidden_layers
    assert len(w4) == n_layers * 4 + (family == "llava")  # layers x (qkv, o, gate_up, down) [+ lm_head]
    assert all(n.startswith("language_model.") for n in w4)
    img = draw_image(96, 72, seed=3)
    a, b = awq.logits("What is this?", images=[img]), deq.logits("What is this?", images=[img])
    assert (a - b).abs().max() < 1e-4
    greedy = dict(temperature=0, max_new_tokens=8, ignore_eos=True)
    assert awq.generate("Go.", images=[img], **greedy).token_ids == deq.generate("Go.", images=[img],
                                                                                 **greedy).token_ids


def test_unsupported_quantization_configs_are_clear_errors(tiny_models, tmp_path):
    make_awq_copies(tiny_models["llava"], tmp_path / "awq", tmp_path / "deq")
    config_path = tmp_path / "awq" / "config.json"
    config = json.loads(config_path.read_text())
    for bad, message in [({"quant_method": "gptq"}, "'gptq' is not supported"),
                         ({"version": "gemv"}, "'gemv' is not supported"),
                         ({"bits": 8}, "only 4-bit")]:
        config_path.write_text(json.dumps(dict(config, quantization_config=dict(config["quantization_config"], **bad))))
        with pytest.raises(CheckpointError, match=message):
            tinyvila.load(tmp_path / "awq", device="cpu")


def run_tool(module, *args):
    proc = subprocess.run([sys.executable, "-m", module, *map(str, args)], capture_output=True, text=True, timeout=600)
    return proc.returncode, proc.stdout, proc.stderr


def test_quantize_writes_the_autoawq_layout_read_back_independently(tiny_models, tmp_path):
    """Round-to-nearest output, unpacked by this file's own code: every LLM linear within a
    quantization step of the original weight, shapes and config as AutoAWQ writes them."""
    src, out = tiny_models["qwen"], tmp_path / "q"
    code, _, err = run_tool("tinyvila.tools.quantize", src, "--out", out, "--group-size", "16", "--calib-samples", "2",
                            "--calib-seqlen", "40", "--device", "cpu", "--no-search")
    assert code == 0, err
    original, written = read_folder(src), read_folder(out)
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"] == {"quant_method": "awq", "version": "gemm", "bits": 4, "group_size": 16,
                                             "zero_point": True, "modules_to_not_convert": ["visual"]}
    quantized = [(f, k) for f, k in original if LLM_LINEAR.search(k)]
    assert len(quantized) == 2 * 7
    for f, k in quantized:
        stem = k.removesuffix("weight")
        assert (f, k) not in written
        qweight, qzeros, scales = (written[(f, stem + s)] for s in ("qweight", "qzeros", "scales"))
        w = original[(f, k)].float()
        N, K = w.shape
        assert qweight.dtype == qzeros.dtype == torch.int32 and scales.dtype == torch.float16
        assert qweight.shape == (K, N // 8) and qzeros.shape == (K // 16, N // 8) and scales.shape == (K // 16, N)
        step = scales.float().repeat_interleave(16, 0).t()
        err = (dequant(qweight, qzeros, scales) - w).abs()
        # round to nearest: half a step; about one at a group's ends (the zero point is rounded too)
        assert (err <= step * 1.1).all() and (err <= step / 2 * 1.01).float().mean() > 0.99
    for key, t in original.items():  # everything else is carried over unchanged
        if key not in quantized:
            assert torch.equal(written[key], t), key


@pytest.mark.parametrize("family", ["llava", "qwen", "vila", "qwen3"])
def test_quantize_then_run_through_the_command_lines(tiny_models, tmp_path, family, image_files):
    src, out = tiny_models[family], tmp_path / "awq"
    code, _, err = run_tool("tinyvila.tools.quantize", src, "--out", out, "--group-size", "16", "--calib-samples", "4",
                            "--calib-seqlen", "64", "--device", "cpu")
    assert code == 0, err
    assert "calibration: 4 samples" in err
    code, answer, err = run_tool("tinyvila.chat", out, "--image", image_files[0], "-p", "Describe it.", "-n", "6",
                                 "--temperature", "0", "--device", "cpu", "--ignore-eos")
    assert code == 0, err
    assert answer.strip()
    code, table, err = run_tool("tinyvila.tools.quant_check", src, out, "--samples", "2", "--max-new-tokens", "4",
                                "--device", "cpu", "--json", tmp_path / "check.json")
    assert code == 0, err
    record = json.loads((tmp_path / "check.json").read_text())
    assert len(record["samples"]) == 2 and "**mean**" in table
    assert 0.9 < record["mean"]["logits_cosine"] <= 1.0 + 1e-6  # close, but 4-bit: not identical
    assert record["mean"]["logits_cosine"] < 1.0 - 1e-7


def test_quantize_bad_inputs_are_one_line_errors(tiny_models, tmp_path):
    code, _, err = run_tool("tinyvila.tools.quantize", tiny_models["llava"], "--out", tmp_path / "x",
                            "--group-size", "48", "--device", "cpu")
    assert code == 2 and err.strip().startswith("error: --group-size 48 does not divide") and "Traceback" not in err
    code, _, err = run_tool("tinyvila.tools.quantize", tmp_path / "missing", "--out", tmp_path / "y", "--device", "cpu")
    assert code == 2 and err.strip().startswith("error: ") and len(err.strip().splitlines()) == 1


@pytest.mark.gpu
@pytest.mark.parametrize("family", ["llava", "qwen", "qwen3"])
def test_decode_with_gemv_sums_equals_decode_without(tiny_models, tmp_path, monkeypatch, family):
    """Graph-captured decode whose GEMVs hand their sums to add_rmsnorm / rope_append (w4a16.Sums;
    Qwen2.5-VL's QKV bias added by rope_append) answers as decode with every GEMV writing its
    output (W4Linear._sums_apply off)."""
    from tinyvila.models import quantized

    make_awq_copies(tiny_models[family], tmp_path / "awq", tmp_path / "deq")
    gpu = tinyvila.load(tmp_path / "awq", device="cuda", dtype="float16")
    img = draw_image(96, 72, seed=3)
    calls = []  # per GEMV call: (Sums asked for, with a bias)
    gemv = quantized.gemv
    monkeypatch.setattr(quantized, "gemv", lambda *a, **kw: calls.append(
        (kw.get("sums", False), len(a) > 3 and a[3] is not None)) or gemv(*a, **kw))

    def answer():
        gpu.drop_spare()  # no decode graph captured under the other setting
        with gpu.session(images=[img]) as s:
            return [s.ask(q, temperature=0, max_new_tokens=12, ignore_eos=True).token_ids for q in ("Go.", "More.")]

    with_sums = answer()
    assert any(sums for sums, _ in calls)  # the decode GEMVs did hand over Sums
    assert any(sums and bias for sums, bias in calls) == (family == "qwen")
    monkeypatch.setattr(quantized.W4Linear, "_sums_apply", lambda self, rows: False)
    calls.clear()
    assert answer() == with_sums and calls and not any(sums for sums, _ in calls)


@pytest.mark.gpu
@pytest.mark.parametrize("family", ["llava", "qwen", "vila", "qwen3"])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_awq_checkpoint_on_the_gpu_matches_the_cpu(tiny_models, tmp_path, family, dtype):
    """The Triton W4A16 path (prefill GEMM, graph-captured decode GEMV) against the CPU reference."""
    make_awq_copies(tiny_models[family], tmp_path / "awq", tmp_path / "deq")
    cpu = tinyvila.load(tmp_path / "deq", device="cpu", dtype="float32")
    gpu = tinyvila.load(tmp_path / "awq", device="cuda", dtype=dtype)
    img = draw_image(96, 72, seed=3)
    a, b = cpu.logits("What is this?", images=[img]), gpu.logits("What is this?", images=[img]).cpu()
    assert torch.nn.functional.cosine_similarity(a, b, dim=-1).min() > 0.99
    with gpu.session(images=[img]) as s:
        first = s.ask("Go.", temperature=0, max_new_tokens=8, ignore_eos=True)
        second = s.ask("More.", temperature=0, max_new_tokens=8, ignore_eos=True)
    assert len(first.token_ids) == len(second.token_ids) == 8
