"""SmoothQuant W8A8 vision encoders on the CPU (int8 kernels' PyTorch references): smoothing alone
keeps the encoder's function, smoothing makes int8 more accurate when activations carry outlier
channels, and a W8A8 checkpoint written by tinyvila-quantize loads beside an untouched original."""
import subprocess
import sys

import pytest
import torch

import tinyvila
from tinyvila.models.layers import ViTEncoder, VisionConfig
from tinyvila.models.qwen2_5_vl import QwenVisionConfig, VisionTransformer
from tinyvila.quant import smoothquant as sq

OUTLIERS = [3, 17, 40]


def clip_like(hidden_act="quick_gelu", cls_token=True):
    torch.manual_seed(0)
    cfg = VisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                       image_size=56, patch_size=14, hidden_act=hidden_act)
    enc = ViTEncoder(cfg, [-1], cls_token=cls_token, pre_norm=cls_token, patch_bias=not cls_token)
    with torch.no_grad():
        for name, p in enc.named_parameters():
            if "layer_norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.1 * torch.randn_like(p))
                p[OUTLIERS] *= 25  # outlier channels in the norms' outputs, as real encoders have
            elif "layer_norm" in name:
                p.normal_(0, 0.1)
            else:
                p.normal_(0, 0.05)
    return enc.eval(), torch.randn(2, 3, 56, 56)


def qwen_like():
    torch.manual_seed(0)
    cfg = QwenVisionConfig(depth=2, hidden_size=64, intermediate_size=96, num_heads=4, patch_size=14,
                           temporal_patch_size=2, spatial_merge_size=2, window_size=56, fullatt_block_indexes=[1],
                           out_hidden_size=32, in_channels=3, hidden_act="silu")
    vt = VisionTransformer(cfg)
    with torch.no_grad():
        for name, p in vt.named_parameters():
            if name.endswith(("norm1.weight", "norm2.weight")):
                p.copy_(1 + 0.1 * torch.randn_like(p))
                p[OUTLIERS] *= 25
            else:
                p.normal_(0, 0.05)
    grid = (1, 8, 8)
    pixels = torch.randn(64, 3 * 2 * 14 * 14)
    return vt.eval(), (pixels, [grid])


def qwen3_like():
    from tinyvila.models.qwen3_vl import Qwen3VisionConfig, VisionTransformer as Qwen3VisionTransformer

    torch.manual_seed(0)
    cfg = Qwen3VisionConfig(depth=2, hidden_size=64, intermediate_size=96, num_heads=4, patch_size=16,
                            out_hidden_size=32, num_position_embeddings=16, deepstack_visual_indexes=(0,))
    vt = Qwen3VisionTransformer(cfg)
    with torch.no_grad():
        for name, p in vt.named_parameters():
            if name.endswith(("norm1.weight", "norm2.weight")):
                p.copy_(1 + 0.1 * torch.randn_like(p))
                p[OUTLIERS] *= 25
            elif name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0, 0.05)
    return vt.eval(), (torch.randn(64, 3 * 2 * 16 * 16), [(1, 8, 8)])


def run_of(model, inputs):
    return (lambda: model(*inputs)) if isinstance(inputs, tuple) else (lambda: model(inputs))


@pytest.mark.parametrize("make", [clip_like, lambda: clip_like("gelu_pytorch_tanh", cls_token=False), qwen_like,
                                  qwen3_like], ids=["clip", "siglip", "qwen", "qwen3"])
def test_smoothing_alone_keeps_the_encoder_output(make):
    model, inputs = make()
    run = run_of(model, inputs)
    with torch.no_grad():
        before = run()
        maxima = sq.activation_maxima(model, run)
        assert len(maxima) == 2 * 2 and all((m > 0).all() for m in maxima.values())
        sq.smooth(model, maxima, alpha=0.5)
        after = run()
    assert (after - before).abs().max() <= 1e-4 * before.abs().max()
    # and the smoothing did move the outliers: the norms' outlier channels shrank
    norm = next(m for n, m in model.named_modules() if n.endswith(("layer_norm1", "norm1")))
    assert norm.weight[OUTLIERS].abs().mean() < 5


@pytest.mark.parametrize("make", [clip_like, qwen_like, qwen3_like], ids=["clip", "qwen", "qwen3"])
def test_smoothed_w8a8_error_is_clearly_below_unsmoothed(make):
    import copy

    model, inputs = make()
    with torch.no_grad():
        reference = run_of(model, inputs)()
        plain = copy.deepcopy(model)
        names = sq.quantize_encoder(plain)
        assert len(names) == 2 * 4
        smoothed = copy.deepcopy(model)
        sq.smooth(smoothed, sq.activation_maxima(smoothed, run_of(smoothed, inputs)), alpha=0.5)
        sq.quantize_encoder(smoothed)
        err = lambda m: float((run_of(m, inputs)() - reference).norm() / reference.norm())  # noqa: E731
        e_plain, e_smooth = err(plain), err(smoothed)
    print(f"relative output error: W8A8 {e_plain:.4f}, smoothed W8A8 {e_smooth:.4f}")
    assert e_smooth < 0.6 * e_plain
    assert e_smooth < 0.05


def test_w8a8_checkpoint_written_beside_an_untouched_original(llava_vicuna, tmp_path, image_files):
    out = tmp_path / "q"
    proc = subprocess.run([sys.executable, "-m", "tinyvila.tools.quantize", str(llava_vicuna), "--out", str(out),
                           "--group-size", "16", "--calib-samples", "3", "--calib-seqlen", "48", "--device", "cpu",
                           "--no-search", "--w8a8-vision"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert (out / sq.W8A8_FILE).is_file() and "int8 vision linears" in proc.stderr
    from safetensors import safe_open

    def vision_tensors(folder):
        out = {}
        for f in sorted(folder.glob("*.safetensors")):
            if f.name == sq.W8A8_FILE:
                continue
            with safe_open(str(f), framework="pt") as h:
                out.update({k: h.get_tensor(k) for k in h.keys() if "vision_tower" in k})
        return out

    original, written = vision_tensors(llava_vicuna), vision_tensors(out)
    assert original.keys() == written.keys() and all(torch.equal(original[k], written[k]) for k in original)
    w8 = tinyvila.load(out, device="cpu", dtype="float32")
    fp = tinyvila.load(out, device="cpu", dtype="float32", vision_w8a8=False)
    int8 = [n for n, m in w8.model.named_modules() if isinstance(m, sq.W8A8Linear)]
    assert len(int8) == 4 * len(w8.model.vision_tower.encoder.layers)
    assert not any(isinstance(m, sq.W8A8Linear) for m in fp.model.modules())
    a, b = w8.logits("What?", images=[image_files[0]]), fp.logits("What?", images=[image_files[0]])
    assert torch.nn.functional.cosine_similarity(a, b, dim=-1).min() > 0.98
    assert not torch.equal(a, b)


@pytest.mark.gpu
@pytest.mark.parametrize("make", [clip_like, lambda: clip_like("gelu_pytorch_tanh", cls_token=False), qwen_like,
                                  qwen3_like], ids=["clip", "siglip", "qwen", "qwen3"])
def test_w8a8_encoder_on_the_gpu_matches_the_cpu_reference(make):
    """The Triton int8 path (fused norm/activation quantization, int8 GEMM) against the references."""
    import copy

    model, inputs = make()
    with torch.no_grad():
        sq.smooth(model, sq.activation_maxima(model, run_of(model, inputs)), alpha=0.5)
        sq.quantize_encoder(model)
        ref = run_of(model, inputs)()
        gpu = copy.deepcopy(model).cuda()
        cuda_inputs = (inputs[0].cuda(), inputs[1]) if isinstance(inputs, tuple) else inputs.cuda()
        out = run_of(gpu, cuda_inputs)().cpu()
    assert (out - ref).abs().max() <= 1e-3 * ref.abs().max()


@pytest.mark.gpu
@pytest.mark.parametrize("w8a8", [False, True])
def test_graphed_encoder_replays_exactly_the_eager_one(w8a8):
    """The vision encoder captured as a CUDA graph per input shape gives the eager outputs, for
    several shapes in turn and again after they were captured."""
    model, pixels = clip_like()
    model = model.cuda().half()
    if w8a8:
        sq.quantize_encoder(model)
    inputs = [torch.randn(n, 3, 56, 56, device="cuda") for n in (2, 3, 2, 1)]
    with torch.no_grad():
        eager = [model(x) for x in inputs]
        model.graphed = True
        graphed = [model(x) for x in inputs] + [model(inputs[0])]
    assert len(model._graphs) == 3
    for a, b in zip(eager + [eager[0]], graphed):
        assert torch.equal(a, b)
