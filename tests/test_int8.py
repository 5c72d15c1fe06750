"""SmoothQuant W8A8 kernels (kernels/quantize_int8.py, kernels/int8_gemm.py) against their PyTorch
references: tiny shapes on the CPU through the Triton interpreter, real shapes on the GPU
(`pytest -m gpu`)."""
import pytest
import torch
import torch.nn.functional as F

from tinyvila.kernels.int8_gemm import (Int8Config, int8_linear, int8_linear_ref, pick_config,
                                        prepare_int8_weight)
from tinyvila.kernels.quantize_int8 import (ACTS, K_ALIGN, act_quant, act_quant_ref, layernorm_quant,
                                            layernorm_quant_ref, padded_k, quantize_per_token,
                                            quantize_per_token_ref, quantize_weight_per_channel, rmsnorm_quant,
                                            rmsnorm_quant_ref)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SHAPES = [(1, 32, 16), (5, 48, 24), (33, 40, 40)]  # M, K, N: none a multiple of the tiles


def _rand(*shape, dtype=torch.float32, scale=3.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale).to(dtype)


def _check_quant(got, ref, scale_rtol=1e-6, max_off=0.0):
    """int8 equal or off by one LSB (rounding ties), in at most a `max_off` fraction of the
    elements; scales to scale_rtol; the xq buffer's padding columns are zeros."""
    (q, s), (rq, rs) = got, ref
    assert q.shape == rq.shape and q.dtype == torch.int8 and s.dtype == torch.float32 and s.shape == rs.shape
    assert q.stride(0) == padded_k(q.shape[1]) and q.stride(1) == 1
    full = torch.as_strided(q, (q.shape[0], q.stride(0)), (q.stride(0), 1))
    assert not full[:, q.shape[1]:].any()
    diff = (q.cpu().int() - rq.cpu().int()).abs()
    assert diff.max() <= 1 and (diff > 0).float().mean() <= max_off, (diff.max(), (diff > 0).float().mean())
    assert torch.allclose(s.cpu(), rs.cpu(), rtol=scale_rtol, atol=0)


# ----------------------------------------------------------------------------------------------
# Quantization kernels (interpreter on the CPU)


@pytest.mark.parametrize("M, K, _N", SHAPES)
def test_quantize_per_token(M, K, _N):
    x = _rand(M, K, seed=M)
    x[0, 3] = 40.0  # an outlier channel
    if M > 1:
        x[M - 1] = 0.0  # a zero row: scale 0, zeros
    got = quantize_per_token(x.to(DEVICE))
    _check_quant(got, quantize_per_token_ref(x))
    if M > 1:
        assert got[1][M - 1] == 0 and not got[0][M - 1].any()


def test_quantize_rounds_ties_to_even_and_saturates():
    x = torch.tensor([[127.0, 0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 126.5, -127.0, 3.49]])
    x = torch.cat([x, torch.zeros(1, 22)], 1)
    q, s = quantize_per_token(x.to(DEVICE))  # scale exactly 1: every .5 is a tie
    assert s.item() == 1.0
    assert q[0, :10].tolist() == [127, 0, 2, 2, 0, -2, -2, 126, -127, 3]
    assert torch.equal(q.cpu(), quantize_per_token_ref(x)[0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("M, K, _N", SHAPES)
def test_layernorm_quant(dtype, M, K, _N):
    x = (_rand(M, K, seed=1) + 2).to(dtype)
    w, b = _rand(K, seed=2, scale=1).to(dtype), _rand(K, seed=3, scale=1).to(dtype)
    _check_quant(layernorm_quant(x.to(DEVICE), w.to(DEVICE), b.to(DEVICE), 1e-6), layernorm_quant_ref(x, w, b, 1e-6),
                 scale_rtol=1e-6 if dtype == torch.float32 else 1e-3, max_off=0.05)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("M, K, _N", SHAPES)
def test_rmsnorm_quant(dtype, M, K, _N):
    x = _rand(M, K, seed=4).to(dtype)
    w = _rand(K, seed=5, scale=1).to(dtype)
    _check_quant(rmsnorm_quant(x.to(DEVICE), w.to(DEVICE), 1e-6), rmsnorm_quant_ref(x, w, 1e-6),
                 scale_rtol=1e-6 if dtype == torch.float32 else 1e-3, max_off=0.05)


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_act_quant(act, dtype):
    M, K = 5, 48 if act != "silu_mul" else 80  # silu_mul quantizes 40 columns of [gate, up]
    x = _rand(M, K, seed=6).to(dtype)
    got = act_quant(x.to(DEVICE), act)
    assert got[0].shape == (M, K // 2 if act == "silu_mul" else K)
    _check_quant(got, act_quant_ref(x, act), scale_rtol=1e-6 if dtype == torch.float32 else 1e-3, max_off=0.05)


def test_quantize_leading_dims_and_weights():
    x = _rand(2, 3, 40, seed=7)
    _check_quant(layernorm_quant(x.to(DEVICE), torch.ones(40, device=DEVICE), torch.zeros(40, device=DEVICE), 1e-5),
                 layernorm_quant_ref(x.reshape(6, 40), torch.ones(40), torch.zeros(40), 1e-5))
    w = _rand(24, 40, seed=8, scale=0.02)
    w[5] = 0.0
    wq, ws = quantize_weight_per_channel(w)
    assert wq.shape == (24, 40) and wq.dtype == torch.int8 and ws.shape == (24,) and ws[5] == 0
    assert (wq.float() * ws[:, None] - w).abs().max() <= ws.max() / 2 + 1e-9
    wp = prepare_int8_weight(wq)
    assert wp.shape == (24, K_ALIGN) and torch.equal(wp[:, :40], wq) and not wp[:, 40:].any()


# ----------------------------------------------------------------------------------------------
# int8_linear (interpreter on the CPU)

TINY = {"ptr": Int8Config(kind="ptr", BM=16, BN=16, BK=32, GROUP_M=2, num_warps=4, num_stages=1),
        "tma": Int8Config(kind="tma", BM=16, BN=16, BK=64, GROUP_M=2, num_warps=4, num_stages=1),
        # the H100 default's shape: TMA store in two column slices, 2 programs per SM
        "tma_store": Int8Config(kind="tma", BM=16, BN=32, BK=32, GROUP_M=2, num_warps=4, num_stages=1,
                                ctas_per_sm=2, tma_store=True, epi_split=2)}


def _linear_inputs(M, K, N, seed=0, dtype=torch.float32):
    x = _rand(M, K, seed=seed).to(dtype)
    w = _rand(N, K, seed=seed + 1, scale=0.05)
    wq, ws = quantize_weight_per_channel(w)
    bias = _rand(N, seed=seed + 2, scale=0.5).to(dtype)
    return x, w, wq, ws, bias


@pytest.mark.parametrize("kind", list(TINY))
@pytest.mark.parametrize("M, K, N", SHAPES)
def test_int8_linear(kind, M, K, N):
    x, w, wq, ws, bias = _linear_inputs(M, K, N, seed=M + K)
    xq, xs = quantize_per_token(x.to(DEVICE))
    wp, wsd = prepare_int8_weight(wq).to(DEVICE), ws.to(DEVICE)
    for b in (bias, None):
        y = int8_linear(xq, xs, wp, wsd, None if b is None else b.to(DEVICE), out_dtype=torch.float32,
                        config=TINY[kind])
        ref = int8_linear_ref(xq.cpu(), xs.cpu(), wq, ws, b, out_dtype=torch.float32)
        assert y.shape == (M, N) and torch.allclose(y.cpu(), ref, rtol=1e-6, atol=1e-6)
    # and W8A8 stays close to the float linear it stands for
    assert (ref - (x @ w.t())).norm() / (x @ w.t()).norm() < 0.03


def test_int8_linear_unpadded_input_half_output_and_epilogue_act():
    M, K, N = 33, 40, 24
    x, w, wq, ws, bias = _linear_inputs(M, K, N, seed=3)
    xq, xs = quantize_per_token_ref(x)  # plain contiguous [M, K]: int8_linear pads a copy
    wp = prepare_int8_weight(wq).to(DEVICE)
    y = int8_linear(xq.to(DEVICE), xs.to(DEVICE), wp, ws.to(DEVICE), bias.half().to(DEVICE))
    ref = int8_linear_ref(xq, xs, wq, ws, bias.half())
    assert y.dtype == torch.float16 and torch.allclose(y.cpu().float(), ref.float(), rtol=1e-3, atol=1e-3)
    for act in ("gelu", "gelu_pytorch_tanh", "quick_gelu"):
        y = int8_linear(xq.to(DEVICE), xs.to(DEVICE), wp, ws.to(DEVICE), bias.to(DEVICE), out_dtype=torch.float32,
                        act=act, config=TINY["tma"])
        ref = int8_linear_ref(xq, xs, wq, ws, bias, out_dtype=torch.float32, act=act)
        assert torch.allclose(y.cpu(), ref, rtol=1e-6, atol=1e-6), act


def test_encoder_mlp_chain_matches_fp():
    """layernorm_quant -> fc1 (quick_gelu in the epilogue) -> quantize -> fc2, against the float MLP."""
    M, K, I = 5, 32, 48
    x = _rand(M, K, seed=11)
    lw, lb = _rand(K, seed=12, scale=0.2) + 1, _rand(K, seed=13, scale=0.2)
    w1, w2 = _rand(I, K, seed=14, scale=0.1), _rand(K, I, seed=15, scale=0.1)
    (q1, s1), (q2, s2) = quantize_weight_per_channel(w1), quantize_weight_per_channel(w2)
    d = lambda t: t.to(DEVICE)  # noqa: E731
    xq, xs = layernorm_quant(d(x), d(lw), d(lb), 1e-5)
    h = int8_linear(xq, xs, d(prepare_int8_weight(q1)), d(s1), out_dtype=torch.float32, act="quick_gelu")
    hq, hs = quantize_per_token(h)
    y = int8_linear(hq, hs, d(prepare_int8_weight(q2)), d(s2), out_dtype=torch.float32).cpu()
    hf = F.layer_norm(x, (K,), lw, lb, 1e-5) @ w1.t()
    ref = (hf * torch.sigmoid(1.702 * hf)) @ w2.t()
    assert (y - ref).norm() / ref.norm() < 0.05


# ----------------------------------------------------------------------------------------------
# GPU, real shapes

GPU_LINEARS = [(2885, 1024, 4096), (2885, 4096, 1024), (777, 4304, 1152), (333, 3420, 1280), (577, 1152, 1001),
               (9216, 1280, 6840), (23328, 1152, 4304), (129, 1280, 1)]


def _close(y, ref, dtype):
    tol = 2e-3 if dtype == torch.float16 else 1.6e-2  # one unit in the last place, or two
    return ((y.float() - ref.float()).abs() <= tol * ref.float().abs() + 1e-4 * ref.float().abs().max()).all()


@pytest.mark.gpu
@pytest.mark.parametrize("out_dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("M, K, N", GPU_LINEARS)
def test_int8_linear_real_shapes(out_dtype, M, K, N):
    x, w, wq, ws, bias = _linear_inputs(M, K, N, seed=M)
    x, wq, ws, bias = x.cuda().to(out_dtype), wq.cuda(), ws.cuda(), bias.cuda().to(out_dtype)
    xq, xs = quantize_per_token(x)
    wp = prepare_int8_weight(wq)
    ref = int8_linear_ref(xq, xs, wq, ws, bias, torch.float32)
    configs = [None, Int8Config(kind="ptr", BM=128, BN=128, num_warps=8, num_stages=4)]
    if torch.cuda.get_device_capability()[0] >= 9:
        configs.append(Int8Config(kind="tma", BM=128, BN=128, num_warps=8, num_stages=4))
    for cfg in configs:
        y = torch.full((M, N), float("nan"), device="cuda", dtype=out_dtype)
        y.copy_(int8_linear(xq, xs, wp, ws, bias, out_dtype=out_dtype, config=cfg))
        assert _close(y, ref, out_dtype), (cfg, (y.float() - ref).abs().max())
    y = int8_linear(xq.contiguous(), xs, wp, ws, None, out_dtype=out_dtype)  # unpadded input, no bias
    assert _close(y, int8_linear_ref(xq, xs, wq, ws, None, torch.float32), out_dtype)
    y = int8_linear(xq, xs, wp, ws, bias, out_dtype=out_dtype, act="gelu_pytorch_tanh")
    assert _close(y, int8_linear_ref(xq, xs, wq, ws, bias, torch.float32, act="gelu_pytorch_tanh"), out_dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("M, K", [(2885, 1024), (23328, 1152), (9216, 1280), (777, 4304), (5, 3420), (1, 5120)])
def test_quant_kernels_real_shapes(dtype, M, K):
    g = torch.Generator(device="cuda").manual_seed(K)
    x = torch.randn(M, K, device="cuda", generator=g).to(dtype) * 2
    w = (torch.randn(K, device="cuda", generator=g) * 0.3 + 1).to(dtype)
    b = (torch.randn(K, device="cuda", generator=g) * 0.1).to(dtype)
    half = dict(scale_rtol=8e-3, max_off=1e-3)  # a y rounded one ulp apart, or a tie
    _check_quant(quantize_per_token(x), quantize_per_token_ref(x), max_off=1e-3)
    _check_quant(layernorm_quant(x, w, b, 1e-6), layernorm_quant_ref(x, w, b, 1e-6), **half)
    _check_quant(rmsnorm_quant(x, w, 1e-6), rmsnorm_quant_ref(x, w, 1e-6), **half)
    for act in ACTS:
        xx = torch.cat([x, x.flip(0)], 1) if act == "silu_mul" else x
        _check_quant(act_quant(xx, act), act_quant_ref(xx, act), **half)


@pytest.mark.gpu
def test_int8_past_two_to_the_31_bytes():
    """A 256-frame SigLIP video is 186K rows; 500K rows of 4304 put xq past 2**31 bytes."""
    M, K, N = 500_000, 4304, 64
    x = torch.randn(M, K, device="cuda", dtype=torch.float16)
    xq, xs = quantize_per_token(x)
    tail = slice(M - 3, M)
    rq, rs = quantize_per_token_ref(x[tail])
    assert (xq[tail].int() - rq.int()).abs().max() <= 1 and torch.allclose(xs[tail], rs, rtol=1e-6)
    del x
    wq, ws = quantize_weight_per_channel(torch.randn(N, K, device="cuda"))
    y = int8_linear(xq, xs, prepare_int8_weight(wq), ws)
    assert _close(y[tail], int8_linear_ref(xq[tail], xs[tail], wq, ws, None, torch.float32), torch.float16)


def test_pick_config_divides_the_padding():
    for M, N, K in [(1, 16, 32), (2885, 4096, 1024), (23328, 1152, 4304), (9216, 1280, 3420)]:
        cfg = pick_config(M, N, K, torch.device(DEVICE))
        assert padded_k(K) % cfg.BK == 0
