"""The CUDA path (run on a GPU machine with `pytest -m gpu`): same results as the CPU path in
fp32, and a working fp16 conversation with GPU-side stats."""
import pytest
import torch
from PIL import Image

import tinyvila

pytestmark = pytest.mark.gpu
GREEDY = dict(temperature=0, max_new_tokens=12, ignore_eos=True)


def test_cuda_fp32_matches_cpu(llava_mistral, image_files):
    torch.backends.cudnn.allow_tf32 = False  # the patch-embedding conv: compare true fp32
    cpu = tinyvila.load(llava_mistral, device="cpu", dtype="float32")
    gpu = tinyvila.load(llava_mistral, device="cuda", dtype="float32")
    img = Image.open(image_files[0])
    a, b = cpu.logits("What is it?", images=[img]), gpu.logits("What is it?", images=[img])
    assert b.device.type == "cuda"
    assert (a - b.cpu()).abs().max() < 1e-3
    assert cpu.generate("What?", images=[img], **GREEDY).token_ids == gpu.generate("What?", images=[img],
                                                                                   **GREEDY).token_ids


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_cuda_half_conversation(llava_vicuna, image_files, dtype):
    eng = tinyvila.load(llava_vicuna, device="cuda", dtype=dtype)
    assert eng.model.language_model.embed_tokens.weight.dtype == getattr(torch, dtype)
    ref = tinyvila.load(llava_vicuna, device="cpu", dtype="float32").logits("Hi", images=[image_files[1]])
    half = eng.logits("Hi", images=[image_files[1]]).cpu()
    cos = torch.nn.functional.cosine_similarity(ref, half, dim=-1)
    assert cos.min() > 0.99
    with eng.session(images=[image_files[1]]) as s:
        first = s.ask("Describe it.", **GREEDY)
        second = s.ask("More?", **GREEDY)
    assert len(first.token_ids) == len(second.token_ids) == 12
    assert second.stats.prefill_tokens < second.stats.visual_tokens
    assert 0 < first.stats.peak_mem_bytes < 2e9 and first.stats.decode_tok_s > 0


def test_qwen_cuda_matches_cpu_and_runs_video_in_bf16(tmp_path):
    from fixtures_images import draw_image
    from fixtures_qwen import build_qwen2_5_vl

    build_qwen2_5_vl(tmp_path)
    img, frames = draw_image(200, 150, seed=1), [draw_image(112, 84, seed=k) for k in range(6)]
    cpu = tinyvila.load(tmp_path, device="cpu", dtype="float32")
    gpu = tinyvila.load(tmp_path, device="cuda", dtype="float32")
    a = cpu.logits("What?", images=[img], videos=[frames])
    b = gpu.logits("What?", images=[img], videos=[frames]).cpu()
    assert (a - b).abs().max() < 1e-3
    bf16 = tinyvila.load(tmp_path, device="cuda", dtype="bfloat16")
    with bf16.session(images=[img], videos=[frames]) as s:
        r = s.ask("What happens?", **GREEDY)
        r2 = s.ask("And then?", **GREEDY)
    assert len(r.token_ids) == len(r2.token_ids) == 12 and r2.stats.vision_s == 0


def test_qwen_graphed_encoder_equals_eager(tmp_path):
    """Qwen2.5-VL's ViT replayed as a CUDA graph per image size gives the eager features and
    saliency, for sizes in turn and again after capture."""
    from fixtures_images import draw_image
    from fixtures_qwen import build_qwen2_5_vl

    build_qwen2_5_vl(tmp_path)
    graphed = tinyvila.load(tmp_path, device="cuda", dtype="float16")
    eager = tinyvila.load(tmp_path, device="cuda", dtype="float16", cuda_graphs=False)
    images = [draw_image(200, 150, seed=1), draw_image(112, 112, seed=2), draw_image(200, 150, seed=3)]
    for img in images:
        for saliency in (False, True):
            a = graphed.model.encode([graphed.model.prepare_image(img)], saliency=saliency)[0]
            b = eager.model.encode([eager.model.prepare_image(img)], saliency=saliency)[0]
            for x, y in zip(a, b) if saliency else [(a, b)]:
                assert torch.equal(x, y)
    assert graphed.model.visual.graphed and len(graphed.model.visual._graphs) == 4
    assert not eager.model.visual.graphed


def test_align_rows_keeps_values_and_results():
    """align_rows: 16-bit linears with K not a multiple of 8 get zero-padded weight storage (same
    parameter values); the padded input silu_mul writes for them gives the unpadded product.
    Aligned and fp32 linears are left alone."""
    from tinyvila.kernels.silu_mul import silu_mul
    from tinyvila.models.layers import PaddedLinear, align_rows

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(64, 20), torch.nn.Linear(20, 8), torch.nn.Linear(16, 4))
    net = net.half().cuda()
    before = [m.weight.detach().clone() for m in net]
    x = torch.randn(33, 40, device="cuda", dtype=torch.float16)
    h = silu_mul(x)
    want = net[1](h)
    align_rows(net)
    assert [type(m) for m in net] == [torch.nn.Linear, PaddedLinear, torch.nn.Linear]
    assert net[1].padded_width == 24 and all(torch.equal(m.weight, b) for m, b in zip(net, before))
    assert torch.allclose(net[1](silu_mul(x, width=24)), want, atol=1e-3)
    assert torch.allclose(net[1](h), want, atol=1e-3)  # an unpadded input still works
    fp32 = torch.nn.Linear(20, 8).cuda()
    align_rows(fp32)
    assert type(fp32) is torch.nn.Linear and fp32.weight.stride(0) == 20


def test_closing_a_session_frees_its_memory(llava_vicuna, image_files, tmp_path):
    """The KV cache and the captured decode graph stay with the engine for the next session of
    their size once the session closes, and go away with drop_spare() (after a first session has
    set up the per-process library workspaces)."""
    import gc
    import json
    import shutil

    long = shutil.copytree(llava_vicuna, tmp_path / "long")  # a position limit above the 200k cache below
    config = json.loads((long / "config.json").read_text())
    config["text_config"]["max_position_embeddings"] = 262144
    (long / "config.json").write_text(json.dumps(config))
    eng = tinyvila.load(long, device="cuda", dtype="float16")
    with eng.session(images=[image_files[0]]) as s:
        s.ask("Hi", **GREEDY)
    eng.drop_spare()
    gc.collect()
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    with eng.session(images=[image_files[0]], max_seq_len=200_000) as s:  # a ~50 MB cache
        s.ask("Hi", **GREEDY)
        assert torch.cuda.memory_allocated() > before + 40e6
    gc.collect()
    assert torch.cuda.memory_allocated() > before + 40e6  # the engine's spare now
    eng.drop_spare()
    gc.collect()
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() < before + 5e6


@pytest.mark.parametrize("sparsity", [{}, dict(decode_sparsity=0.5)])
def test_the_next_generate_of_the_same_size_captures_nothing(llava_vicuna, image_files, sparsity):
    """A second generate() takes the first one's cache (and decode buffer) and the decode graphs
    captured over them: no capture, the same tokens, after a different conversation in between."""
    eng = tinyvila.load(llava_vicuna, device="cuda", dtype="float32")
    opts = dict(GREEDY, max_seq_len=600, **sparsity)
    first = eng.generate("Describe it.", images=[image_files[1]], **opts)
    other = eng.generate("What colors are in the picture, and where?", images=[image_files[0]], **opts)
    again = eng.generate("Describe it.", images=[image_files[1]], **opts)
    assert first.stats.graph_capture_s > 0 and other.stats.graph_capture_s == again.stats.graph_capture_s == 0
    assert again.token_ids == first.token_ids and other.token_ids != first.token_ids


def test_greedy_decoding_ahead_of_the_host_stops_where_the_cpu_stops(llava_mistral, image_files):
    """The GPU computes each greedy token one step before the host reads it: an answer that ends on
    a stop token leaves one step past the end, which must not leak into the next turn."""
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    engines = [tinyvila.load(llava_mistral, device=d, dtype="float32") for d in ("cpu", "cuda")]
    free = engines[0].generate("Go on.", images=[image_files[2]], **GREEDY).token_ids
    stop = free[4]  # make the 5th token (or an earlier copy of it) a stop token
    answers = []
    for eng in engines:
        eng.stop_ids = {stop}
        with eng.session(images=[image_files[2]]) as s:
            first = s.ask("Go on.", temperature=0, max_new_tokens=12)
            second = s.ask("Again.", temperature=0, max_new_tokens=12, ignore_eos=True)
            assert first.finish_reason == "stop" and s.cache.length == len(s.tokens)
        answers.append((first.token_ids, second.token_ids))
    assert answers[0] == answers[1]
    assert answers[0][0] == free[:free.index(stop)]
